"""ComfyUI glue of tiled sampling (attention/tiled.py): model wrappers installed on a clone.

Patch point: an `APPLY_MODEL` wrapper (`WrappersMP.APPLY_MODEL`, added with
`ModelPatcher.add_wrapper_with_key` on a clone). Why there and not at `DIFFUSION_MODEL`:
- `BaseModel.apply_model` is the same for every model family and every sampler (KSampler,
  SamplerCustom, SamplerCustomAdvanced, any guider): one model call on the whole latent, with
  sigma, the cross-attention context, `c_concat` (inpainting latents / denoise masks) as its own
  argument, ControlNet residuals (`control`) and the ADM vector `y`, before anything is
  concatenated; `DIFFUSION_MODEL` only exists where a family's forward implements it, and sees
  `c_concat` already stacked onto the latent;
- its output is the denoised prediction, so MultiDiffusion averages what the paper averages and
  each tile goes through the model's own `calculate_input` / `calculate_denoised`;
- ComfyUI's area and mask conditioning are resolved before it (`calc_cond_batch` narrows the latent
  to a cond's area and weights its output by the mask on the whole canvas), so they compose with the
  tiles unchanged: an area smaller than a tile is one tile, a larger one is tiled on its own.

On DiT models (Flux, Flux.2, Chroma, SD3, Wan, Qwen-Image, Lumina 2, Z-Image) the same wrapper tiles
4-D and (Wan, Qwen-Image) 5-D latents on the model's patch grid, and each tile's call carries the
positions its tokens have in the canvas (dit_tiled_glue.py); other transformer models are refused
when the node is attached. One tile covering the canvas calls the model once on the canvas itself.

Per run: an `OUTER_SAMPLE` wrapper checks the canvas (errors before the first step), logs the
layout and keeps a cache of plans and weights in the per-run copy of transformer_options; it is
dropped when the run ends. A `PREPARE_SAMPLING` wrapper hands ComfyUI's model loader the memory
estimate of one tile batch instead of the whole canvas, so a large canvas does not push the
weights off the GPU.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

import comfy.model_base
import comfy.patcher_extension as comfy_ext
import torch

from . import dit_tiled_glue as DT
from . import tiled as T
from .core import AttentionControlError
from .tiled import TILE_KEY

log = logging.getLogger("attention_control")

WRAPPER_KEY = "attention_control_tiled"
RUN_KEY = "attention_control_tiled_run"
SIZE_CONDS = ("per tile", "as given")


@dataclass
class TiledRun:
    cfg: T.TileConfig
    cache: dict = field(default_factory=dict)
    align: int = 1

    def plan(self, height: int, width: int, device=None):
        key = (height, width, str(device))
        if key not in self.cache:
            plan = T.plan_tiles(height, width, self.cfg, self.align)
            self.cache[key] = (plan, T.piece_weights(plan, device=device))
        return self.cache[key]


def _latent_scale(model) -> int:
    fmt = getattr(model, "latent_format", None)
    return int(getattr(fmt, "spacial_downscale_ratio", 8) or 8)


class TiledWrappers:
    """The wrappers of one TiledDiffusion node (immutable config; shared by clones). `dit`: the
    DitTiling of a DiT model (None for UNets)."""

    def __init__(self, cfg: T.TileConfig, size_cond: str = "per tile", dit: DT.DitTiling | None = None):
        self.cfg = cfg
        self.size_cond = size_cond
        self.dit = dit

    def __deepcopy__(self, memo):
        return self

    @property
    def align(self) -> int:
        return self.dit.patch if self.dit is not None else 1

    @property
    def per_call(self) -> int:
        """Tiles per model call: the tile batch size, 1 on DiTs positioned by rope_options."""
        n = self.dit.per_call if self.dit is not None else None
        return self.cfg.batch if n is None else min(n, self.cfg.batch)

    # ---------------------------------------------------------------- run lifecycle
    def check_canvas(self, shape, latent_shapes=None) -> T.Plan:
        if latent_shapes is not None and len(latent_shapes) > 1:
            raise AttentionControlError("latent: tiled diffusion samples one image latent; this run has several "
                                        "packed latents: sample them separately")
        d = self.dit
        if d is None and len(shape) != 4:
            raise AttentionControlError(
                f"latent: tiled diffusion needs an image latent (batch, channels, height, width); got shape "
                f"{tuple(shape)} (video or audio latents are not supported): remove the Tiled Diffusion node")
        if d is not None:
            if len(shape) not in d.ndims:
                want = "(batch, channels, frames, height, width)" if 5 in d.ndims else "(batch, channels, height, width)"
                raise AttentionControlError(
                    f"latent: tiled diffusion on {d.family} needs a latent {want}; got shape {tuple(shape)}: remove the "
                    f"Tiled Diffusion node")
            step = d.patch * d.px
            bad = [(n, v) for n, v in (("height", shape[-2]), ("width", shape[-1])) if v % d.patch]
            if bad:
                name, v = bad[0]
                raise AttentionControlError(
                    f"latent: the canvas {name} ({v * d.px} px) is not a multiple of {step} px, the {d.family} patch "
                    f"({d.patch} latent pixel{'s' if d.patch > 1 else ''}): tiles start on the patch grid; use a "
                    f"{name} of {(v // d.patch) * step or step} or {(v // d.patch + 1) * step} px")
        return T.plan_tiles(shape[-2], shape[-1], self.cfg, self.align)

    def outer_sample(self, executor, noise, latent_image, sampler, sigmas, *args, **kwargs):
        plan = self.check_canvas(noise.shape, kwargs.get("latent_shapes"))
        d = self.dit
        log.info("tiled diffusion: %s, tile batch %d", plan.describe(d.px if d is not None else 8), self.per_call)
        if d is not None and not plan.single:
            log.info("tiled diffusion: %s tiles get their canvas positions (%s)", d.family, DT.HOW[d.family])
            if d.family in DT.ABS_EMBED_FAMILIES:
                dm = executor.class_obj.model_patcher.model.diffusion_model
                axes = DT.sd3_axes(dm, (plan.height, plan.width), d.patch, plan.wrap)
                for ok, name in zip(axes, ("height", "width")):
                    if not ok:
                        log.warning("tiled diffusion: along the %s the SD3 tiles keep their own position embedding "
                                    "(each a standalone image): %s", name,
                                    "a wrapped panorama has no absolute column" if name == "width" and plan.wrap
                                    else "the canvas is larger than the model's position grid")
        to = executor.class_obj.model_options.setdefault("transformer_options", {})
        prev = to.get(RUN_KEY)
        to[RUN_KEY] = TiledRun(self.cfg, align=self.align)
        try:
            return executor(noise, latent_image, sampler, sigmas, *args, **kwargs)
        finally:
            if prev is None:
                to.pop(RUN_KEY, None)
            else:
                to[RUN_KEY] = prev

    def prepare_sampling(self, executor, model, noise_shape, conds, model_options=None):
        shape = list(noise_shape)
        if len(shape) == 4 or (self.dit is not None and len(shape) in self.dit.ndims):
            try:
                plan = T.plan_tiles(shape[-2], shape[-1], self.cfg, self.align)
            except AttentionControlError:
                return executor(model, shape, conds, model_options=model_options)   # reported by outer_sample
            n = min(self.per_call, len(plan.pieces))
            shape = [shape[0] * n] + shape[1:-2] + [plan.tile_h, plan.tile_w]
        return executor(model, shape, conds, model_options=model_options)

    # ---------------------------------------------------------------- one model call
    def apply_model(self, executor, x, t, c_concat=None, c_crossattn=None, control=None, transformer_options={},
                    **kwargs):
        d = self.dit
        if x.ndim not in (d.ndims if d is not None else (4,)):
            return executor(x, t, c_concat, c_crossattn, control, transformer_options, **kwargs)
        run = transformer_options.get(RUN_KEY)
        if not isinstance(run, TiledRun) or run.cfg != self.cfg or run.align != self.align:
            run = TiledRun(self.cfg, align=self.align)
        H, W = x.shape[-2:]
        plan, weights = run.plan(H, W, x.device)
        B = x.shape[0]
        model = executor.class_obj
        cou = list(transformer_options.get("cond_or_uncond", []))
        uuids = list(transformer_options.get("uuids", []))
        scale = _latent_scale(model)
        y_sizes = (self.size_cond == "per tile" and not plan.single and isinstance(model, comfy.model_base.SDXL)
                   and torch.is_tensor(kwargs.get("y")) and kwargs["y"].shape[-1] == 2816)
        ndims = d.ndims if d is not None else (4,)
        dm = model.diffusion_model if d is not None else None
        if d is not None:
            sd3_axes = DT.sd3_axes(dm, (H, W), d.patch, plan.wrap) if d.family in DT.ABS_EMBED_FAMILIES else None
            ids_dtype = model.manual_cast_dtype if model.manual_cast_dtype is not None else model.get_dtype()
            text_len = int(c_crossattn.shape[1]) if torch.is_tensor(c_crossattn) and c_crossattn.ndim == 3 else None

        def call(idx, xb):
            pieces = [plan.pieces[i] for i in idx]
            k = len(pieces)
            to = dict(transformer_options)
            if cou:
                to["cond_or_uncond"] = cou * k
            if uuids:
                to["uuids"] = uuids * k
            to[TILE_KEY] = {"pieces": pieces, "canvas": (H, W)}
            kw = {name: T.batch_kwarg(v, pieces, B, H, W, ndims, lists=d is not None) for name, v in kwargs.items()}
            if y_sizes:
                kw["y"] = T.sdxl_size_rows(kwargs["y"], pieces, lambda v: model.embedder(torch.Tensor([v])), scale)
            cc = None if c_concat is None else T.batch_kwarg(c_concat, pieces, B, H, W, ndims)
            ca = None if c_crossattn is None else T.repeat_rows(c_crossattn, k)
            if d is None:
                ctrl = None if control is None else T.batch_control(control, pieces, B, H, W)
                return executor(xb, T.repeat_rows(t, k), cc, ca, ctrl, to, **kw)
            ctrl = None if control is None else DT.batch_dit_control(
                control, pieces, B, (H, W), d.patch, lambda c: T.batch_kwarg(c, pieces, B, H, W, ndims))
            if not plan.single:
                DT.tile_options(d, dm, to, pieces, B, (H, W), text_len, sd3_axes, ids_dtype)
            ovs = DT.fresh_override(to, d.family, dm, xb, ca, kw)
            out = executor(xb, T.repeat_rows(t, k), cc, ca, ctrl, to, **kw)
            if ovs is not None:
                ovs[0].calls += ovs[1].calls
            return out

        if plan.single:              # one tile covering the canvas: its weight is 1 everywhere, no crop or merge
            return call([0], x)
        return T.tiled_call(x, plan, weights, self.per_call, call)


def attach_tiled(model_patcher, cfg: T.TileConfig, size_cond: str = "per tile"):
    """Clone `model_patcher` and install the tiled wrappers (replacing those of an earlier tiled node).
    UNets and the DiT families of dit_tiled_glue tile; other models raise UnsupportedModelError.
    On a DiT the tile sizes and the overlap (latent pixels) must be multiples of its patch."""
    cfg.validate()
    if size_cond not in SIZE_CONDS:
        raise AttentionControlError(f"sdxl_size_cond: '{size_cond}' is not an option; use one of {', '.join(SIZE_CONDS)}")
    dit = DT.tiling_of(model_patcher)
    if dit is not None:
        for name, v in (("tile_width", cfg.tile_w), ("tile_height", cfg.tile_h), ("overlap", cfg.overlap)):
            if v % dit.patch:
                raise AttentionControlError(f"{name}: {v} latent pixels is not a multiple of the {dit.family} patch "
                                            f"({dit.patch} latent pixels)")
    m = model_patcher.clone()
    w = TiledWrappers(cfg, size_cond, dit)
    for kind, fn in ((comfy_ext.WrappersMP.OUTER_SAMPLE, w.outer_sample),
                     (comfy_ext.WrappersMP.PREPARE_SAMPLING, w.prepare_sampling),
                     (comfy_ext.WrappersMP.APPLY_MODEL, w.apply_model)):
        m.remove_wrappers_with_key(kind, WRAPPER_KEY)
        m.add_wrapper_with_key(kind, WRAPPER_KEY, fn)
    return m


def tiled_wrappers(model_patcher) -> TiledWrappers | None:
    ws = model_patcher.get_wrappers(comfy_ext.WrappersMP.APPLY_MODEL, WRAPPER_KEY)
    return ws[-1].__self__ if ws else None
