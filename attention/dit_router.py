"""The DiT half of the attention router: ComfyUI glue for transformer (DiT) models.

UNet sites are routed by `router.py` (attn1 / attn2 replace patches). DiT families (Flux, Flux.2,
Chroma, SD3, Wan, Qwen-Image, Lumina 2, Z-Image) are reached through the one slot
`transformer_options["optimized_attention_override"]`: every DiT attention goes through ComfyUI's
`comfy.ldm.modules.attention.wrap_attn`, which calls the override as `override(func, *args, **kwargs)`
where `func` is the attention it would have run, `args` / `kwargs` its own call: `q, k, v` are always
positional; `heads` is positional (Flux, Qwen-Image, Lumina) or a keyword (SD3, Wan); `mask` is a
keyword (Flux), positional (Qwen-Image, Lumina) or absent (SD3, Wan); kwargs also carry
`transformer_options`, `skip_reshape` where q/k/v are (B, H, N, D) and `_inside_attn_wrapper`, which
stops `func` from calling the override again.

Installation and composition. The router's override is never stored in the MODEL's `model_options`.
`attach_dit` puts a `DitRouter` in `model_options["transformer_options"][DIT_ROUTER_KEY]` and an
APPLY_MODEL wrapper; for each model call that wrapper copies the call's transformer_options and sets
the slot to a fresh `DitOverride` that holds whatever override the call carried (another pack's,
a SageAttention-style speed patch), which it calls as the default attention. So:
- a foreign override stored in `model_options` before or after `attach_dit` runs, inside ours, and
  its effect is kept (both tested). A pack that wraps the slot's current value at node time finds
  ours absent and wraps whatever was there; one that overwrites the slot there removes nothing of
  ours (tested): either way it runs inside ours.
- a pack that sets the slot per model call from a wrapper that runs *outside* ours (an APPLY_MODEL
  wrapper added before attach_dit) is chained like a stored one. From a wrapper that runs *inside*
  ours (an APPLY_MODEL wrapper added later, a DIFFUSION_MODEL wrapper) it wraps ours if it chains
  the value it finds (both run; tested) and drops ours if it overwrites it: then our controllers see
  no call of that model call. Nothing we can do from the slot prevents that; the router notices a
  model call in which its override never ran and logs it once per router (tested).
- our own override found in a call's options (an enclosing model call) is unwrapped to its default,
  never nested.

Block ids. Flux / Flux.2, Chroma and Qwen-Image set `block_type` / `block_index` in transformer_options
before each block: the site takes them from there. SD3, Wan and Lumina 2 / Z-Image set none: the
site takes the n-th entry of the model's call schedule (built from its module tree at attach time),
n counted per model call by the override of that call (reset by the APPLY_MODEL wrapper).

Controllers (`DitController`) are asked per attention call, the one added last first: `attend(call)`
returns None (pass: the next controller, finally the default) or the attention output, in the
layout the default returns (see `DitCall.merge_heads`).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import comfy.patcher_extension as comfy_ext

from .core import AttentionControlError, UnsupportedModelError

log = logging.getLogger("attention_control")

DIT_ROUTER_KEY = "attention_control_dit_router"
OVERRIDE_SLOT = "optimized_attention_override"
WRAPPER_KEY = "attention_control_dit"

__all__ = ["attach_dit", "get_dit_router", "detect_family", "DitSite", "DitCall", "DitController", "DitRouter",
           "DitOverride", "SUPPORTED_DIT_FAMILIES", "DIT_ROUTER_KEY"]

# diffusion-model class (module, name) -> family; exact classes only (subclasses such as Wan's VACE or
# camera models add calls the schedules below do not describe)
_FAMILY_OF_CLASS = {
    ("comfy.ldm.flux.model", "Flux"): "Flux",
    ("comfy.ldm.chroma.model", "Chroma"): "Chroma",
    ("comfy.ldm.modules.diffusionmodules.mmdit", "OpenAISignatureMMDITWrapper"): "SD3",
    ("comfy.ldm.wan.model", "WanModel"): "Wan",
    ("comfy.ldm.qwen_image.model", "QwenImageTransformer2DModel"): "Qwen-Image",
    ("comfy.ldm.lumina.model", "NextDiT"): "Lumina 2",
}
SUPPORTED_DIT_FAMILIES = ("Flux", "Flux.2", "Chroma", "SD3", "Wan", "Qwen-Image", "Lumina 2", "Z-Image")
# families whose forward sets block_type / block_index in transformer_options
_IDS_FROM_OPTIONS = frozenset({"Flux", "Flux.2", "Chroma", "Qwen-Image"})


@dataclass(frozen=True)
class DitSite:
    """One attention call of a DiT forward.

    block_type: "double" / "single" (Flux, Flux.2, Chroma), "double" (Qwen-Image), "joint" (SD3), "block" (Wan),
    "context_refiner" / "noise_refiner" / "layer" (Lumina 2, Z-Image); "extra" for calls beyond the
    model's schedule. stream: "joint" (text tokens first, then image tokens), "image_self",
    "text_cross" (image queries, text keys), "clip_image_cross" (Wan i2v), "text_refiner",
    "image_refiner". call_index: the order of the call in its model call. ids_from: "options" where
    the block ids come from transformer_options, "counter" where from the call count.
    layout: "bhnd" (q/k/v are (B, H, N, D), `skip_reshape`) or "bnc" ((B, N, H*D); SD3's v comes as
    (B, N, H, D))."""
    family: str
    block_type: str
    block_index: int
    stream: str
    call_index: int
    heads: int
    layout: str
    ids_from: str

    @property
    def block(self) -> tuple:
        return (self.block_type, self.block_index)

    def label(self) -> str:
        return f"{self.family} {self.block_type}:{self.block_index} {self.stream}"


def detect_family(model_patcher) -> str:
    """The DiT family of a ModelPatcher (or BaseModel); UnsupportedModelError names the class otherwise."""
    model = getattr(model_patcher, "model", model_patcher)
    dm = getattr(model, "diffusion_model", None)
    cls = type(dm) if dm is not None else type(model)
    fam = _FAMILY_OF_CLASS.get((cls.__module__, cls.__name__))
    if fam is None:
        cfg = getattr(model, "model_config", None)
        what = f"{cls.__module__}.{cls.__name__}" + (f" ({type(cfg).__name__})" if cfg is not None else "")
        raise UnsupportedModelError(
            f"model: {what} is not a supported transformer (DiT) model. The DiT attention router supports "
            f"{', '.join(SUPPORTED_DIT_FAMILIES)}; UNet models (SD1.x, SD2.x, SDXL) go through the UNet router.")
    cfg_name = type(getattr(model, "model_config", None)).__name__
    if fam == "Flux" and getattr(getattr(dm, "params", None), "global_modulation", False):
        fam = "Flux.2"
    if fam == "Lumina 2" and cfg_name == "ZImage":
        fam = "Z-Image"
    return fam


def call_schedule(family: str, dm) -> tuple:
    """(block_type, block_index, stream) of each attention call of one forward, in order."""
    out = []
    if family in ("Flux", "Flux.2", "Chroma"):
        out += [("double", i, "joint") for i in range(len(dm.double_blocks))]
        out += [("single", i, "joint") for i in range(len(dm.single_blocks))]
    elif family == "Qwen-Image":
        out += [("double", i, "joint") for i in range(len(dm.transformer_blocks))]
    elif family == "SD3":
        for i, blk in enumerate(dm.joint_blocks):
            out.append(("joint", i, "joint"))
            if getattr(blk.x_block, "x_block_self_attn", False):      # SD3.5 medium (MMDiT-X)
                out.append(("joint", i, "image_self"))
    elif family == "Wan":
        for i, blk in enumerate(dm.blocks):
            out.append(("block", i, "image_self"))
            if hasattr(blk.cross_attn, "k_img"):                       # i2v: CLIP image tokens first
                out.append(("block", i, "clip_image_cross"))
            out.append(("block", i, "text_cross"))
    elif family in ("Lumina 2", "Z-Image"):
        out += [("context_refiner", i, "text_refiner") for i in range(len(dm.context_refiner))]
        out += [("noise_refiner", i, "image_refiner") for i in range(len(dm.noise_refiner))]
        out += [("layer", i, "joint") for i in range(len(dm.layers))]
    return tuple(out)


class DitController:
    """Base class of what acts on DiT attention calls: override `attend`; `wants` filters sites."""
    name = "dit controller"

    def __deepcopy__(self, memo):
        return self

    def wants(self, site: DitSite) -> bool:
        return True

    def attend(self, call: "DitCall"):
        """None to pass, or the attention output (the layout `call.default()` returns)."""
        return None


class DitRouter:
    """An immutable stack of DiT controllers over one model's family and call schedule."""

    def __init__(self, family: str, schedule: tuple, controllers: tuple = ()):
        self.family = family
        self.schedule = schedule
        self.controllers = tuple(controllers)
        self._warned = set()

    def __deepcopy__(self, memo):
        return self

    def warn_once(self, tag, msg, *args):
        if tag not in self._warned:
            self._warned.add(tag)
            log.warning(msg, *args)


_ARG_NAMES = ("q", "k", "v", "heads", "mask")


class DitCall:
    """One attention call as a controller sees it: the site, q / k / v and heads as the model passed
    them, the mask (or None), the call's transformer_options, and the default attention.

    A controller that needs the host's fused attention on other tensors uses `default(q, k, v)`;
    calling ComfyUI's `optimized_attention` with this call's transformer_options from `attend` would
    enter the override again (it is the same slot)."""
    __slots__ = ("site", "q", "k", "v", "heads", "mask", "transformer_options", "_override", "_func", "_args",
                 "_kwargs")

    def __init__(self, site, bound, kwargs, override, func, args):
        self.site = site
        self.q, self.k, self.v = bound["q"], bound["k"], bound["v"]
        self.heads = bound["heads"]
        self.mask = bound.get("mask")
        self.transformer_options = kwargs.get("transformer_options") or {}
        self._override, self._func, self._args, self._kwargs = override, func, args, kwargs

    @property
    def cond_or_uncond(self) -> list:
        return list(self.transformer_options.get("cond_or_uncond", [0]))

    @property
    def sigmas(self):
        return self.transformer_options.get("sigmas")

    def default(self, q=None, k=None, v=None):
        """The attention this call runs without our controllers (the previous override, else the
        host's function), on the call's own tensors or on the ones given (same shapes and layout)."""
        args, kwargs = self._args, self._kwargs
        if q is not None or k is not None or v is not None:
            args, kwargs = list(args), dict(kwargs)
            for i, (name, t) in enumerate((("q", q), ("k", k), ("v", v))):
                if t is None:
                    continue
                if i < len(args):
                    args[i] = t
                else:
                    kwargs[name] = t
        return self._override.run_default(self._func, args, kwargs)

    def split_heads(self, t: torch.Tensor) -> torch.Tensor:
        """q, k or v of this call as (B, H, N, D), whatever the family's layout."""
        if self.site.layout == "bhnd":
            return t
        b, n = t.shape[0], t.shape[1]
        return t.reshape(b, n, self.heads, -1).transpose(1, 2)

    def merge_heads(self, o: torch.Tensor) -> torch.Tensor:
        """An output computed as (B, H, N, D), in the layout the default returns ((B, N, H*D); Wan's
        `skip_output_reshape` calls keep (B, H, N, D))."""
        if self._kwargs.get("skip_output_reshape", False):
            return o
        b, h, n, d = o.shape
        return o.transpose(1, 2).reshape(b, n, h * d)


class DitOverride:
    """The callable set in one model call's `optimized_attention_override` slot; `prev` is the
    override that call carried before (run as the default), `calls` counts the attention calls."""

    def __init__(self, router: DitRouter, prev=None):
        self.router = router
        self.prev = prev
        self.calls = 0

    def __deepcopy__(self, memo):
        return self

    def run_default(self, func, args, kwargs):
        if self.prev is not None:
            return self.prev(func, *args, **kwargs)
        return func(*args, **kwargs)

    def _site(self, bound, kwargs, n: int) -> DitSite:
        router = self.router
        to = kwargs.get("transformer_options") or {}
        layout = "bhnd" if kwargs.get("skip_reshape", False) else "bnc"
        sched = router.schedule
        if router.family in _IDS_FROM_OPTIONS and "block_type" in to and "block_index" in to:
            btype, bidx = str(to["block_type"]), int(to["block_index"])
            stream = "joint"
            src = "options"
        elif n < len(sched):
            btype, bidx, stream = sched[n]
            src = "counter"
        else:
            router.warn_once(("extra", n), "attention_control: %s made more attention calls per forward than its "
                             "schedule (%d) lists; calls beyond it get block type 'extra'", router.family, len(sched))
            btype, bidx, stream, src = "extra", n - len(sched), "unknown", "counter"
        heads = bound.get("heads")
        return DitSite(router.family, btype, bidx, stream, n, int(heads) if heads is not None else 0, layout, src)

    def __call__(self, func, *args, **kwargs):
        n = self.calls
        self.calls += 1
        ctrls = self.router.controllers
        if not ctrls:
            return self.run_default(func, args, kwargs)
        bound = dict(zip(_ARG_NAMES, args))
        for name in _ARG_NAMES:
            if name in kwargs:
                bound[name] = kwargs[name]
        site = self._site(bound, kwargs, n)
        call = None
        for c in reversed(ctrls):
            if not c.wants(site):
                continue
            if call is None:
                call = DitCall(site, bound, kwargs, self, func, args)
            out = c.attend(call)
            if out is not None:
                return out
        return self.run_default(func, args, kwargs)


def _apply_model_wrapper(executor, x, t, c_concat=None, c_crossattn=None, control=None, transformer_options={},
                         **kwargs):
    router = transformer_options.get(DIT_ROUTER_KEY)
    if router is None:
        return executor(x, t, c_concat, c_crossattn, control, transformer_options, **kwargs)
    prev = transformer_options.get(OVERRIDE_SLOT)
    if isinstance(prev, DitOverride):          # ours from an enclosing call: chain what it chained
        prev = prev.prev
    ov = DitOverride(router, prev)
    to = dict(transformer_options)
    to[OVERRIDE_SLOT] = ov
    out = executor(x, t, c_concat, c_crossattn, control, to, **kwargs)
    if ov.calls == 0 and router.schedule and router.controllers:
        router.warn_once("silent", "attention_control: the %s model ran a forward in which the DiT attention "
                         "router saw no attention call: another patch replaced transformer_options['%s'] inside "
                         "this model call without chaining it", router.family, OVERRIDE_SLOT)
    return out


def get_dit_router(model_patcher) -> DitRouter | None:
    return model_patcher.model_options.get("transformer_options", {}).get(DIT_ROUTER_KEY)


def attach_dit(model_patcher, controller: DitController | None = None):
    """Clone `model_patcher` with the DiT router installed and `controller` (if any) added on top of
    its stack. The input model is untouched; its `optimized_attention_override`, if any, stays where
    it is and runs as the default. Raises UnsupportedModelError for models of other families."""
    old = get_dit_router(model_patcher)
    if old is None:
        family = detect_family(model_patcher)
        schedule = call_schedule(family, model_patcher.model.diffusion_model)
        controllers = ()
    else:
        family, schedule, controllers = old.family, old.schedule, old.controllers
    if controller is not None:
        if not isinstance(controller, DitController):
            raise AttentionControlError(f"controller: {type(controller).__name__} is not a DitController")
        controllers = controllers + (controller,)
    m = model_patcher.clone()
    to = m.model_options.setdefault("transformer_options", {})
    to[DIT_ROUTER_KEY] = DitRouter(family, schedule, controllers)
    if not m.get_wrappers(comfy_ext.WrappersMP.APPLY_MODEL, WRAPPER_KEY):
        m.add_wrapper_with_key(comfy_ext.WrappersMP.APPLY_MODEL, WRAPPER_KEY, _apply_model_wrapper)
    return m
