"""The DiT half of the attention router: ComfyUI glue for transformer (DiT) models.

UNet sites are routed by `router.py` (attn1 / attn2 replace patches). DiT families (Flux, Flux.2,
Chroma, SD3, Wan, Qwen-Image, Lumina 2, Z-Image, HunyuanVideo, HunyuanVideo 1.5, HunyuanImage 2.1,
HiDream) are reached through the one slot
`transformer_options["optimized_attention_override"]`: every DiT attention goes through ComfyUI's
`comfy.ldm.modules.attention.wrap_attn`, which calls the override as `override(func, *args, **kwargs)`
where `func` is the attention it would have run, `args` / `kwargs` its own call: `q, k, v` are always
positional; `heads` is positional (Flux, Qwen-Image, Lumina, HunyuanVideo, HiDream) or a keyword (SD3, Wan);
`mask` is a keyword (Flux, HunyuanVideo), positional (Qwen-Image, Lumina) or absent (SD3, Wan,
HiDream); kwargs also carry
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

Block ids. Flux / Flux.2, Chroma, Qwen-Image and HunyuanVideo / HunyuanVideo 1.5 / HunyuanImage 2.1
set `block_type` / `block_index` in transformer_options before each block: the site takes them from
there. SD3, Wan, Lumina 2 / Z-Image and HiDream set none: the site takes the n-th entry of the
model's call schedule (built from its module tree at attach time), n counted per model call by the
override of that call (a fresh one per model call). HunyuanVideo's two text token-refiner calls run
before its forward sets any block id, so refiner entries of the schedule always take their ids from
the counter: the forward writes its ids into the per-call copy of transformer_options that our
APPLY_MODEL wrapper makes, so a later model call starts without them, but ids a caller put in the
options itself (tested: in the MODEL's options) would otherwise name the refiner calls.

Token order. Text tokens come first in the joint sequences of Flux, Chroma, SD3, Qwen-Image and
Lumina 2 / Z-Image; image tokens come first (then text) in HunyuanVideo's and HiDream's. What a
call's text slice holds per family is in `DitGeometry`; HiDream has no word positions (see
`DitRouter.word_positions_supported`).

Controllers (`DitController`) are asked per attention call, the one added last first: `attend(call)`
returns None (pass: the next controller, finally the default) or the attention output, in the
layout the default returns (see `DitCall.merge_heads`). Observers (`observer = True`: capture) never
return an output; they are asked before every other controller whatever the order of attachment, so
a controller that computes the output (region prompts) cannot hide the call from them, and they see
what the others do to the scores through `DitCall.controller_allow(rows)` (the keys each query may
attend to under the other controllers: region prompts' mask).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import comfy.patcher_extension as comfy_ext

from .core import AttentionControlError, UnsupportedModelError, chain_model_controllers, sample_in_run

log = logging.getLogger("attention_control")

DIT_ROUTER_KEY = "attention_control_dit_router"
DIT_RUN_KEY = "attention_control_dit_run"
DIT_GUIDE_KEY = "attention_control_dit_guidance"
OVERRIDE_SLOT = "optimized_attention_override"
WRAPPER_KEY = "attention_control_dit"

__all__ = ["attach_dit", "get_dit_router", "detect_family", "DitSite", "DitCall", "DitController", "DitRouter",
           "DitOverride", "DitGeometry", "SUPPORTED_DIT_FAMILIES", "WORD_POSITION_FAMILIES", "DIT_ROUTER_KEY",
           "DIT_RUN_KEY", "is_dit", "word_positions_error"]

# diffusion-model class (module, name) -> family; exact classes only (subclasses such as Wan's VACE or
# camera models add calls the schedules below do not describe)
_FAMILY_OF_CLASS = {
    ("comfy.ldm.flux.model", "Flux"): "Flux",
    ("comfy.ldm.chroma.model", "Chroma"): "Chroma",
    ("comfy.ldm.modules.diffusionmodules.mmdit", "OpenAISignatureMMDITWrapper"): "SD3",
    ("comfy.ldm.wan.model", "WanModel"): "Wan",
    ("comfy.ldm.qwen_image.model", "QwenImageTransformer2DModel"): "Qwen-Image",
    ("comfy.ldm.lumina.model", "NextDiT"): "Lumina 2",
    ("comfy.ldm.hunyuan_video.model", "HunyuanVideo"): "HunyuanVideo",
    ("comfy.ldm.hidream.model", "HiDreamImageTransformer2DModel"): "HiDream",
}
SUPPORTED_DIT_FAMILIES = ("Flux", "Flux.2", "Chroma", "SD3", "Wan", "Qwen-Image", "Lumina 2", "Z-Image",
                          "HunyuanVideo", "HunyuanVideo 1.5", "HunyuanImage 2.1", "HiDream")
HUNYUAN = ("HunyuanVideo", "HunyuanVideo 1.5", "HunyuanImage 2.1")
# HunyuanVideo's diffusion-model class also runs these checkpoints; the model config class names them
_HUNYUAN_OF_CONFIG = {"HunyuanVideo15": "HunyuanVideo 1.5", "HunyuanVideo15_SR_Distilled": "HunyuanVideo 1.5",
                      "HunyuanImage21": "HunyuanImage 2.1", "HunyuanImage21Refiner": "HunyuanImage 2.1"}
# families whose forward sets block_type / block_index in transformer_options (for their main blocks)
_IDS_FROM_OPTIONS = frozenset({"Flux", "Flux.2", "Chroma", "Qwen-Image"} | set(HUNYUAN))
# block types of the schedule whose ids always come from the call counter (they run before any id is set)
_COUNTED_BLOCK_TYPES = frozenset({"context_refiner", "noise_refiner"})
# joint sequences with the image tokens first, then the text
_IMAGE_FIRST = frozenset(set(HUNYUAN) | {"HiDream"})
# families whose text keys have no single key column per context (prompt) token position
_NO_WORD_POSITIONS = {
    "HiDream": "every block's text keys are the T5 context followed by two Llama-3 segments (the last Llama layer, "
               "carried from block to block, and the block's own layer) in Llama's own tokenization, so a prompt "
               "word has no one set of key columns",
}
WORD_POSITION_FAMILIES = tuple(f for f in SUPPORTED_DIT_FAMILIES if f not in _NO_WORD_POSITIONS)


@dataclass(frozen=True)
class DitSite:
    """One attention call of a DiT forward.

    block_type: "double" / "single" (Flux, Flux.2, Chroma, HiDream), "double" (Qwen-Image), "joint" (SD3),
    "block" (Wan), "context_refiner" / "noise_refiner" / "layer" (Lumina 2, Z-Image), "context_refiner"
    (HunyuanVideo's text token refiner) / "double" / "single" (HunyuanVideo); "extra" for calls beyond the
    model's schedule. stream: "joint" (text and image tokens; which come first is the family's
    `DitGeometry.order`), "image_self",
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
    depth: tuple | None = None          # (k, n): place among the model's n main blocks; None for refiners

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
    if fam == "HunyuanVideo":
        fam = _HUNYUAN_OF_CONFIG.get(cfg_name, fam)
        if fam == "HunyuanVideo" and getattr(dm, "cond_type_embedding", None) is not None:
            fam = "HunyuanVideo 1.5"          # a config class of another name on 1.5 weights
    return fam


def word_positions_error(family: str, what: str) -> UnsupportedModelError:
    """The named error of a controller (`what`: "the capture node", ...) that needs the key columns
    of prompt words on a family that has none."""
    return UnsupportedModelError(
        f"model: {what} needs the key columns of the prompt's words, and {family} has none: "
        f"{_NO_WORD_POSITIONS.get(family, 'unknown token layout')}. It works on {', '.join(WORD_POSITION_FAMILIES)}.")


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
    elif family in HUNYUAN:
        # txt_in: self-attention over the context alone, before the blocks (2 blocks in 0.3.75)
        out += [("context_refiner", i, "text_refiner") for i in range(len(dm.txt_in.individual_token_refiner.blocks))]
        out += [("double", i, "joint") for i in range(len(dm.double_blocks))]
        out += [("single", i, "joint") for i in range(len(dm.single_blocks))]
    elif family == "HiDream":
        out += [("double", i, "joint") for i in range(len(dm.double_stream_blocks))]
        out += [("single", i, "joint") for i in range(len(dm.single_stream_blocks))]
    return tuple(out)


@dataclass(frozen=True)
class DitGeometry:
    """Where text and image tokens sit in the sequences of one model call (from its inputs).

    grid: (frames, rows, columns) of image tokens after patching (frames 1 for images); n_image
    their number; context_len: tokens of the context (c_crossattn) the model received; text_len:
    text tokens of a joint sequence (context_len plus SD3's register tokens, which come first, or
    Lumina 2 / Z-Image's padding to a token multiple, which comes after; HiDream: see below);
    word_offset: where context token 0 sits among the text tokens (SD3's register count, else 0).

    order: "text_image" (text first, then image: Flux, Chroma, SD3, Qwen-Image, Lumina 2 / Z-Image;
    tokens after the image, Kontext reference images, are neither) or "image_text" (HunyuanVideo,
    HiDream). For "image_text" the image slice is [0, n_image) of any sequence that long and the text
    slice [n_image, n_image + text_len) only of a sequence exactly that long:
    - HunyuanVideo (v1, 1.5, HunyuanImage 2.1): the text is the refined context; ByT5 glyph tokens
      (`txt_byt5`: after the context in HunyuanImage 2.1, before it in 1.5) and 1.5's vision states
      (`clip_fea`, before it) lengthen it, and then the call has no text slice (controllers that need
      one stand aside). Reference latents (`ref_latent`) go before the image: such a model call has
      no geometry.
    - HiDream: every block's text is the T5 context (c_crossattn, context_len tokens), then the last
      Llama-3 layer's tokens (carried from block to block), then the block's own Llama-3 layer's
      tokens (`encoder_hidden_states_llama3`, L tokens each): text_len = context_len + 2 L. Word
      positions are T5 positions there and miss the Llama copies of the words, so HiDream has none
      (`DitRouter.word_positions_supported`; `DitCall.key_columns` refuses). HiDream E1's edit image
      (`image_cond`) widens every image row: such a model call has no geometry."""
    grid: tuple
    n_image: int
    context_len: int
    text_len: int
    word_offset: int = 0
    order: str = "text_image"


def host_mask(mask: torch.Tensor | None) -> torch.Tensor | None:
    """An attention mask as ComfyUI's attention functions broadcast it: (B, H, Nq or 1, Nk), a 2-D
    mask taken as (Nq, Nk) and a 3-D one as (B, Nq, Nk); bool keeps where True, float is added."""
    if mask is None:
        return None
    if mask.ndim == 2:
        mask = mask.unsqueeze(0)
    if mask.ndim == 3:
        mask = mask.unsqueeze(1)
    return mask


def _ceil_div(a: int, b: int) -> int:
    return -(-int(a) // int(b))


def model_call_geometry(family: str, dm, x: torch.Tensor, context, extra: dict | None = None) -> DitGeometry | None:
    """The geometry of one model call of `family`'s diffusion model `dm` on latent `x` with
    `context` and the call's other conditioning `extra` (the model's keyword inputs); None where the
    inputs do not have the expected shape or put other tokens among the image's."""
    extra = extra or {}
    if context is None or not torch.is_tensor(context) or context.ndim != 3:
        return None
    if (family in HUNYUAN and extra.get("ref_latent") is not None) or (
            family == "HiDream" and extra.get("image_cond") is not None):
        return None
    ps = getattr(dm, "patch_size", 1)
    ps = tuple(ps) if isinstance(ps, (tuple, list)) else (1, ps, ps)
    if len(ps) == 2:
        ps = (1,) + ps
    if x.ndim == 5:
        f, h, w = x.shape[-3:]
    elif x.ndim == 4:
        f, (h, w) = 1, x.shape[-2:]
    else:
        return None
    grid = (_ceil_div(f, ps[0]), _ceil_div(h, ps[1]), _ceil_div(w, ps[2]))
    ctx = int(context.shape[1])
    text_len, offset = ctx, 0
    if family == "SD3":
        offset = int(getattr(dm, "register_length", 0) or 0)
        text_len = ctx + offset
    elif family in ("Lumina 2", "Z-Image"):
        m = getattr(dm, "pad_tokens_multiple", None)
        if m:
            text_len = _ceil_div(ctx, m) * m
    elif family == "HiDream":
        llama = extra.get("encoder_hidden_states_llama3")
        if torch.is_tensor(llama) and llama.ndim == 4:              # (B, layers, L, C)
            text_len = ctx + 2 * int(llama.shape[2])
    order = "image_text" if family in _IMAGE_FIRST else "text_image"
    return DitGeometry(grid, grid[0] * grid[1] * grid[2], ctx, text_len, offset, order)


class DitController:
    """Base class of what acts on DiT attention calls: override `attend`; `wants` filters sites.

    `selector` (a DitLayerSelector) chooses the blocks; `streams` the streams acted on (empty: any).
    `validate(router)` runs when the controller is attached (an empty layer choice is an error that
    lists the model's blocks); `begin_run(run)` before the first step of a sampling run (raise
    AttentionControlError on a configuration the run cannot take), `end_run(run, ok)` after it.
    Controllers that act on whole model calls set `wraps_model` and override `apply_model`
    (the UNet controllers' signature: apply(x) -> output of the rest)."""
    name = "dit controller"
    selector = None
    streams: frozenset = frozenset()
    wraps_model = False
    observer = False          # never returns an output; asked first (see the module docstring)
    # controllers that act on the guided prediction of a whole step (gradient guidance) set this and
    # override `guide` (the UNet controllers' signature); their guidance forwards reach only them,
    # with `call.guidance` set to the state they passed to `passes.cond_pass`
    wraps_guider = False

    def __deepcopy__(self, memo):
        return self

    def validate(self, router: "DitRouter") -> None:
        if self.selector is not None:
            self.selector.select(router.blocks, input_name=f"{self.name} layers")

    def wants(self, site: DitSite) -> bool:
        if self.streams and site.stream not in self.streams:
            return False
        if self.selector is None:
            return True
        return self.selector.matches(site.block_type, site.block_index, site.depth)

    def begin_run(self, run) -> None:
        pass

    def end_run(self, run, ok: bool) -> None:
        pass

    def attend(self, call: "DitCall"):
        """None to pass, or the attention output (the layout `call.default()` returns)."""
        return None

    def allowed_keys(self, call: "DitCall", rows: list[int], queries: slice | None = None):
        """The keys this controller's output lets each query of the batch rows `rows` attend to:
        bool (len(rows), 1, Nq, Nk) (the queries of `queries` only, when given), or None where it
        blocks none (or does not act on the call)."""
        return None

    def apply_model(self, apply, x, sigma, run, cond_or_uncond, options=None):
        return apply(x)

    def guide(self, predict, x, sigma, run, passes):
        return predict(x)


class DitRouter:
    """An immutable stack of DiT controllers over one model's family and call schedule."""

    def __init__(self, family: str, schedule: tuple, controllers: tuple = (), dm=None):
        self.family = family
        self.schedule = schedule
        self.controllers = tuple(controllers)
        self.blocks = tuple(dict.fromkeys((t, i) for t, i, _ in schedule))
        main = [b for b in self.blocks if b[0] not in ("context_refiner", "noise_refiner")]
        self.depth = {b: (k, len(main)) for k, b in enumerate(main)}
        self.dm = dm
        self._warned = set()

    def __deepcopy__(self, memo):
        return self

    @property
    def word_positions_supported(self) -> bool:
        """Whether `DitCall.key_columns` maps prompt (context) token positions to key columns on
        this family; controllers that need word positions call `require_word_positions`."""
        return self.family not in _NO_WORD_POSITIONS

    def require_word_positions(self, what: str) -> None:
        if not self.word_positions_supported:
            raise word_positions_error(self.family, what)

    def warn_once(self, tag, msg, *args):
        if tag not in self._warned:
            self._warned.add(tag)
            log.warning(msg, *args)

    def begin_run(self, run) -> None:
        for c in self.controllers:
            c.begin_run(run)

    def end_run(self, run, ok: bool) -> None:
        for c in self.controllers:
            c.end_run(run, ok)


_ARG_NAMES = ("q", "k", "v", "heads", "mask")


class DitCall:
    """One attention call as a controller sees it: the site, q / k / v and heads as the model passed
    them, the mask (or None), the call's transformer_options, the default attention, the sampling
    run (None outside one) with the call's step and sigma, and where the tokens are:

    - `q_text` / `q_image` and `k_text` / `k_image`: slices of the query and key sequences that hold
      text and image tokens (None where the stream has none, or where the sequence does not have
      the length the model call's inputs imply: a patch that adds tokens; controllers that need
      them stand aside). In text-first joint sequences tokens after `q_image` / `k_image` (Kontext
      reference images) are neither; image-first ones (HunyuanVideo, HiDream) put the text after the
      image (`DitGeometry.order`). `key_columns(positions)`: the key columns of context token
      positions (none on HiDream: `DitRouter.word_positions_supported`).
    - `grid`: (frames, rows, columns) of the image tokens.
    - the batch: rows are (chunk, item): one chunk per entry of `cond_or_uncond` (0 cond, 1 uncond;
      guidance-distilled models sample with one cond chunk), `batch` items per chunk.

    A controller that needs the host's fused attention on other tensors uses `default(q, k, v)`;
    calling ComfyUI's `optimized_attention` with this call's transformer_options from `attend` would
    enter the override again (it is the same slot)."""
    __slots__ = ("site", "q", "k", "v", "heads", "mask", "transformer_options", "_override", "_func", "_args",
                 "_kwargs", "run", "step", "sigma", "geometry", "grid", "q_text", "q_image", "k_text", "k_image",
                 "cond_or_uncond", "batch", "guidance")

    def __init__(self, site, bound, kwargs, override, func, args):
        self.site = site
        self.q, self.k, self.v = bound["q"], bound["k"], bound["v"]
        self.heads = bound["heads"]
        self.mask = bound.get("mask")
        self.transformer_options = to = kwargs.get("transformer_options") or {}
        # the state of the guidance forward this call belongs to (None in a sampling forward)
        self.guidance = to.get(DIT_GUIDE_KEY)
        self._override, self._func, self._args, self._kwargs = override, func, args, kwargs
        self.run = override.run
        sig = to.get("sigmas")
        if self.run is not None and sig is not None:
            self.step, self.sigma = self.run.step_of(sig)
        else:
            self.step, self.sigma = 0, (float(sig.flatten()[0]) if torch.is_tensor(sig) else None)
        self.cond_or_uncond = list(to.get("cond_or_uncond", [0]))
        self.batch = max(int(self.q.shape[0]) // max(len(self.cond_or_uncond), 1), 1)
        g = self.geometry = override.geometry
        self.grid = g.grid if g is not None else None
        self.q_text = self.q_image = self.k_text = self.k_image = None
        if g is not None:
            nq = self.q.shape[2] if site.layout == "bhnd" else self.q.shape[1]
            nk = self.k.shape[2] if site.layout == "bhnd" else self.k.shape[1]
            self.q_text, self.q_image = _stream_slices(site.stream, g, nq, query=True)
            self.k_text, self.k_image = _stream_slices(site.stream, g, nk, query=False)

    @property
    def sigmas(self):
        return self.transformer_options.get("sigmas")

    @property
    def located(self) -> bool:
        """Whether the text and image tokens of this call are where the model call's inputs say."""
        return self.q_image is not None or self.q_text is not None

    def key_columns(self, positions) -> list[int]:
        """Key columns of context token positions (0 = the first context token). Families without
        word positions (HiDream) raise the named error of `word_positions_error`."""
        if self.site.family in _NO_WORD_POSITIONS:
            raise word_positions_error(self.site.family, "a controller on word positions")
        if self.k_text is None:
            raise AttentionControlError(f"{self.site.label()}: this call has no text keys")
        off = self.k_text.start + (self.geometry.word_offset if self.site.stream == "joint" else 0)
        return [off + int(p) for p in positions]

    def chunk(self, j: int) -> slice:
        return slice(j * self.batch, (j + 1) * self.batch)

    def cond_chunks(self) -> list[int]:
        return [j for j, c in enumerate(self.cond_or_uncond) if c == 0]

    def uncond_chunks(self) -> list[int]:
        return [j for j, c in enumerate(self.cond_or_uncond) if c == 1]

    def cond_rows(self) -> list[int]:
        return [j * self.batch + i for j in self.cond_chunks() for i in range(self.batch)]

    def controller_allow(self, rows: list[int], queries: slice | None = None):
        """The keys each query of the batch rows `rows` (the queries of `queries`, when given) may
        attend to under the controllers that compute outputs (observers excluded): bool
        (len(rows), 1, Nq, Nk), or None where none blocks any key. The host's own mask (`mask`) is
        not included."""
        allow = None
        for c in self._override.router.controllers:
            if c.observer or not c.wants(self.site):
                continue
            a = c.allowed_keys(self, rows, queries)
            if a is not None:
                allow = a if allow is None else allow & a
        return allow

    def default(self, q=None, k=None, v=None, mask=...):
        """The attention this call runs without our controllers (the previous override, else the
        host's function), on the call's own tensors or on the ones given (same layout), with the
        call's mask or `mask` (None for no mask; a bool or additive float mask broadcastable to
        (B, H, Nq, Nk))."""
        args, kwargs = self._args, self._kwargs
        repl = [(i, name, t) for i, (name, t) in enumerate((("q", q), ("k", k), ("v", v)))]
        if mask is not ...:
            repl.append((4, "mask", mask))
        if any(t is not None for _, n, t in repl if n != "mask") or mask is not ...:
            args, kwargs = list(args), dict(kwargs)
            for i, name, t in repl:
                if t is None and name != "mask":
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
        if t.ndim == 4:                      # SD3's v arrives as (B, N, H, D)
            return t.transpose(1, 2)
        b, n = t.shape[0], t.shape[1]
        return t.reshape(b, n, self.heads, -1).transpose(1, 2)

    def merge_heads(self, o: torch.Tensor) -> torch.Tensor:
        """An output computed as (B, H, N, D), in the layout the default returns ((B, N, H*D); Wan's
        `skip_output_reshape` calls keep (B, H, N, D))."""
        if self._kwargs.get("skip_output_reshape", False):
            return o
        b, h, n, d = o.shape
        return o.transpose(1, 2).reshape(b, n, h * d)


def _stream_slices(stream: str, g: DitGeometry, n: int, query: bool):
    """(text slice, image slice) of a sequence of n tokens of `stream`; (None, None) where n does
    not fit the geometry."""
    if stream == "joint":
        if g.order == "image_text":
            i = slice(0, g.n_image) if n >= g.n_image else None
            t = slice(g.n_image, g.n_image + g.text_len) if n == g.n_image + g.text_len else None
            return t, i
        t, i = slice(0, g.text_len), slice(g.text_len, g.text_len + g.n_image)
        return (t, i) if n >= g.text_len + g.n_image else (None, None)
    if stream in ("image_self", "image_refiner"):
        return (None, slice(0, g.n_image)) if n >= g.n_image else (None, None)
    if stream == "text_refiner":
        return (slice(0, n), None) if n >= g.context_len else (None, None)
    if stream == "text_cross":
        if query:
            return (None, slice(0, g.n_image)) if n >= g.n_image else (None, None)
        return (slice(0, n), None) if n == g.context_len else (None, None)
    return None, None


class DitOverride:
    """The callable set in one model call's `optimized_attention_override` slot; `prev` is the
    override that call carried before (run as the default), `calls` counts the attention calls."""

    def __init__(self, router: DitRouter, prev=None, run=None, geometry: DitGeometry | None = None):
        self.router = router
        self.prev = prev
        self.run = run
        self.geometry = geometry
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
        counted = n < len(sched) and sched[n][0] in _COUNTED_BLOCK_TYPES
        if router.family in _IDS_FROM_OPTIONS and not counted and "block_type" in to and "block_index" in to:
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
        return DitSite(router.family, btype, bidx, stream, n, int(heads) if heads is not None else 0, layout, src,
                       router.depth.get((btype, bidx)))

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
        guidance = (kwargs.get("transformer_options") or {}).get(DIT_GUIDE_KEY)
        if guidance is not None:
            # a guidance forward belongs to one controller: the others neither act nor record
            ctrls = tuple(c for c in ctrls if c is guidance.controller)
        for c in [c for c in reversed(ctrls) if c.observer] + [c for c in reversed(ctrls) if not c.observer]:
            if not c.wants(site):
                continue
            if call is None:
                call = DitCall(site, bound, kwargs, self, func, args)
            out = c.attend(call)
            if out is not None:
                return out
        return self.run_default(func, args, kwargs)


def _outer_sample_wrapper(executor, noise, latent_image, sampler, sigmas, *args, **kwargs):
    to = executor.class_obj.model_options.setdefault("transformer_options", {})
    router = to.get(DIT_ROUTER_KEY)
    if router is None or not router.controllers:
        return executor(noise, latent_image, sampler, sigmas, *args, **kwargs)
    return sample_in_run(router, to, DIT_RUN_KEY, executor, noise, latent_image, sampler, sigmas, args, kwargs)


def _apply_model_wrapper(executor, x, t, c_concat=None, c_crossattn=None, control=None, transformer_options={},
                         **kwargs):
    router = transformer_options.get(DIT_ROUTER_KEY)
    if router is None:
        return executor(x, t, c_concat, c_crossattn, control, transformer_options, **kwargs)
    run = transformer_options.get(DIT_RUN_KEY)
    if run is not None and run.router is not router:
        run = None
    prev = transformer_options.get(OVERRIDE_SLOT)
    if isinstance(prev, DitOverride):          # ours from an enclosing call: chain what it chained
        prev = prev.prev
    geom = model_call_geometry(router.family, router.dm, x, c_crossattn, kwargs) if router.controllers else None
    ov = DitOverride(router, prev, run, geom)
    to = dict(transformer_options)
    to[OVERRIDE_SLOT] = ov
    ctrls = [c for c in router.controllers if c.wraps_model]
    if ctrls and run is not None:
        out = chain_model_controllers(ctrls, lambda x_: executor(x_, t, c_concat, c_crossattn, control, to, **kwargs),
                                      x, t, run, to)
    else:
        out = executor(x, t, c_concat, c_crossattn, control, to, **kwargs)
    if ov.calls == 0 and router.schedule and router.controllers:
        router.warn_once("silent", "attention_control: the %s model ran a forward in which the DiT attention "
                         "router saw no attention call: another patch replaced transformer_options['%s'] inside "
                         "this model call without chaining it", router.family, OVERRIDE_SLOT)
    return out


def _predict_noise_wrapper(executor, x, timestep, model_options={}, seed=None):
    """Gradient guidance of whole steps (`DitController.wraps_guider`), as the UNet router's."""
    from .router import guided_predict_noise         # the router module imports this one
    return guided_predict_noise(executor, x, timestep, model_options, seed, DIT_RUN_KEY, DIT_ROUTER_KEY,
                                DIT_GUIDE_KEY)


def get_dit_router(model_patcher) -> DitRouter | None:
    return model_patcher.model_options.get("transformer_options", {}).get(DIT_ROUTER_KEY)


def attach_dit(model_patcher, controller: DitController | None = None):
    """Clone `model_patcher` with the DiT router installed and `controller` (if any) added on top of
    its stack. The input model is untouched; its `optimized_attention_override`, if any, stays where
    it is and runs as the default. Raises UnsupportedModelError for models of other families."""
    old = get_dit_router(model_patcher)
    dm = model_patcher.model.diffusion_model
    if old is None:
        family = detect_family(model_patcher)
        schedule = call_schedule(family, dm)
        controllers = ()
    else:
        family, schedule, controllers = old.family, old.schedule, old.controllers
    if controller is not None:
        if not isinstance(controller, DitController):
            raise AttentionControlError(f"controller: {type(controller).__name__} is not a DitController")
        controllers = controllers + (controller,)
    router = DitRouter(family, schedule, controllers, dm)
    if controller is not None:
        controller.validate(router)
    m = model_patcher.clone()
    to = m.model_options.setdefault("transformer_options", {})
    to[DIT_ROUTER_KEY] = router
    if not m.get_wrappers(comfy_ext.WrappersMP.OUTER_SAMPLE, WRAPPER_KEY):
        m.add_wrapper_with_key(comfy_ext.WrappersMP.OUTER_SAMPLE, WRAPPER_KEY, _outer_sample_wrapper)
    if not m.get_wrappers(comfy_ext.WrappersMP.APPLY_MODEL, WRAPPER_KEY):
        m.add_wrapper_with_key(comfy_ext.WrappersMP.APPLY_MODEL, WRAPPER_KEY, _apply_model_wrapper)
    if controller is not None and controller.wraps_guider and not m.get_wrappers(
            comfy_ext.WrappersMP.PREDICT_NOISE, WRAPPER_KEY):
        m.add_wrapper_with_key(comfy_ext.WrappersMP.PREDICT_NOISE, WRAPPER_KEY, _predict_noise_wrapper)
    return m


def is_dit(model_patcher) -> bool:
    """Whether a MODEL is one of the DiT families this router reaches."""
    try:
        detect_family(model_patcher)
    except UnsupportedModelError:
        return False
    return True
