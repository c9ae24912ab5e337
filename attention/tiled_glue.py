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

    def plan(self, height: int, width: int, device=None):
        key = (height, width, str(device))
        if key not in self.cache:
            plan = T.plan_tiles(height, width, self.cfg)
            self.cache[key] = (plan, T.piece_weights(plan, device=device))
        return self.cache[key]


def _latent_scale(model) -> int:
    fmt = getattr(model, "latent_format", None)
    return int(getattr(fmt, "spacial_downscale_ratio", 8) or 8)


class TiledWrappers:
    """The wrappers of one TiledDiffusion node (immutable config; shared by clones)."""

    def __init__(self, cfg: T.TileConfig, size_cond: str = "per tile"):
        self.cfg = cfg
        self.size_cond = size_cond

    def __deepcopy__(self, memo):
        return self

    # ---------------------------------------------------------------- run lifecycle
    def check_canvas(self, shape, latent_shapes=None) -> T.Plan:
        if latent_shapes is not None and len(latent_shapes) > 1:
            raise AttentionControlError("latent: tiled diffusion samples one image latent; this run has several "
                                        "packed latents: sample them separately")
        if len(shape) != 4:
            raise AttentionControlError(
                f"latent: tiled diffusion needs an image latent (batch, channels, height, width); got shape "
                f"{tuple(shape)} (video or audio latents are not supported): remove the Tiled Diffusion node")
        return T.plan_tiles(shape[-2], shape[-1], self.cfg)

    def outer_sample(self, executor, noise, latent_image, sampler, sigmas, *args, **kwargs):
        plan = self.check_canvas(noise.shape, kwargs.get("latent_shapes"))
        log.info("tiled diffusion: %s, tile batch %d", plan.describe(), self.cfg.batch)
        to = executor.class_obj.model_options.setdefault("transformer_options", {})
        prev = to.get(RUN_KEY)
        to[RUN_KEY] = TiledRun(self.cfg)
        try:
            return executor(noise, latent_image, sampler, sigmas, *args, **kwargs)
        finally:
            if prev is None:
                to.pop(RUN_KEY, None)
            else:
                to[RUN_KEY] = prev

    def prepare_sampling(self, executor, model, noise_shape, conds, model_options=None):
        shape = list(noise_shape)
        if len(shape) == 4:
            plan = T.plan_tiles(shape[-2], shape[-1], self.cfg)
            n = min(self.cfg.batch, len(plan.pieces))
            shape = [shape[0] * n, shape[1], plan.tile_h, plan.tile_w]
        return executor(model, shape, conds, model_options=model_options)

    # ---------------------------------------------------------------- one model call
    def apply_model(self, executor, x, t, c_concat=None, c_crossattn=None, control=None, transformer_options={},
                    **kwargs):
        if x.ndim != 4:
            return executor(x, t, c_concat, c_crossattn, control, transformer_options, **kwargs)
        run = transformer_options.get(RUN_KEY)
        if not isinstance(run, TiledRun) or run.cfg != self.cfg:
            run = TiledRun(self.cfg)
        H, W = x.shape[-2:]
        plan, weights = run.plan(H, W, x.device)
        B = x.shape[0]
        model = executor.class_obj
        cou = list(transformer_options.get("cond_or_uncond", []))
        uuids = list(transformer_options.get("uuids", []))
        scale = _latent_scale(model)
        y_sizes = (self.size_cond == "per tile" and not plan.single and isinstance(model, comfy.model_base.SDXL)
                   and torch.is_tensor(kwargs.get("y")) and kwargs["y"].shape[-1] == 2816)

        def call(idx, xb):
            pieces = [plan.pieces[i] for i in idx]
            k = len(pieces)
            to = dict(transformer_options)
            if cou:
                to["cond_or_uncond"] = cou * k
            if uuids:
                to["uuids"] = uuids * k
            to[TILE_KEY] = {"pieces": pieces, "canvas": (H, W)}
            kw = {name: T.batch_kwarg(v, pieces, B, H, W) for name, v in kwargs.items()}
            if y_sizes:
                kw["y"] = T.sdxl_size_rows(kwargs["y"], pieces, lambda v: model.embedder(torch.Tensor([v])), scale)
            cc = None if c_concat is None else T.batch_kwarg(c_concat, pieces, B, H, W)
            ca = None if c_crossattn is None else T.repeat_rows(c_crossattn, k)
            ctrl = None if control is None else T.batch_control(control, pieces, B, H, W)
            return executor(xb, T.repeat_rows(t, k), cc, ca, ctrl, to, **kw)

        return T.tiled_call(x, plan, weights, self.cfg.batch, call)


def attach_tiled(model_patcher, cfg: T.TileConfig, size_cond: str = "per tile"):
    """Clone `model_patcher` and install the tiled wrappers (replacing those of an earlier tiled node)."""
    cfg.validate()
    if size_cond not in SIZE_CONDS:
        raise AttentionControlError(f"sdxl_size_cond: '{size_cond}' is not an option; use one of {', '.join(SIZE_CONDS)}")
    m = model_patcher.clone()
    w = TiledWrappers(cfg, size_cond)
    for kind, fn in ((comfy_ext.WrappersMP.OUTER_SAMPLE, w.outer_sample),
                     (comfy_ext.WrappersMP.PREPARE_SAMPLING, w.prepare_sampling),
                     (comfy_ext.WrappersMP.APPLY_MODEL, w.apply_model)):
        m.remove_wrappers_with_key(kind, WRAPPER_KEY)
        m.add_wrapper_with_key(kind, WRAPPER_KEY, fn)
    return m


def tiled_wrappers(model_patcher) -> TiledWrappers | None:
    ws = model_patcher.get_wrappers(comfy_ext.WrappersMP.APPLY_MODEL, WRAPPER_KEY)
    return ws[-1].__self__ if ws else None
