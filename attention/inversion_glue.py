"""ComfyUI glue of real-image inversion: runs the pure sampler functions of
`samplers/inversion.py` through ComfyUI's own CFGGuider with a custom KSAMPLER, so model patches,
wrappers, hooks, ControlNets and memory management behave exactly as in normal sampling."""
from __future__ import annotations

import torch

import comfy.conds
import comfy.model_management
import comfy.sample
import comfy.samplers

from ..samplers.inversion import Trajectory, inversion_sampler, null_text_sampler


def ddim_invert(model, positive, latent: dict, steps: int, scheduler: str, callback=None, regularisation: float = 0.0):
    """-> (latent dict of the inverted noise (sample it with add_noise off), Trajectory).
    `callback(i, denoised, x, total_steps)` as for ComfyUI's guiders (progress and previews);
    `regularisation`: Pix2Pix-Zero's noise regularisation weight (0 = plain DDIM inversion)."""
    samples = comfy.sample.fix_empty_latent_channels(model, latent["samples"])
    sigmas = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), scheduler, steps).cpu()
    guider = comfy.samplers.CFGGuider(model)
    guider.set_conds(positive, positive)
    guider.set_cfg(1.0)
    record: list = []
    sampler = comfy.samplers.KSAMPLER(inversion_sampler(record, regularisation))
    noise = torch.zeros_like(samples)
    out = guider.sample(noise, samples, sampler, sigmas, callback=callback, disable_pbar=True, seed=0)
    out = out.to(comfy.model_management.intermediate_device())
    traj = Trajectory([s for s, _ in record], [x for _, x in record], steps, scheduler)
    res = {k: v for k, v in latent.items() if k not in ("noise_mask", "batch_index")}
    res["samples"] = out
    return res, traj


def _with_context(cond: dict, context: torch.Tensor) -> dict:
    """A copy of a processed cond entry whose cross-attention context is `context`."""
    c = dict(cond)
    mc = dict(c.get("model_conds", {}))
    mc["c_crossattn"] = comfy.conds.CONDCrossAttn(context)
    c["model_conds"] = mc
    c["cross_attn"] = context
    return c


def _guider_denoisers(model, extra_args):
    """Positive / context-replaced negative predictions of the guider inside a sampler function."""
    guider = model.inner_model
    base = guider.inner_model
    mo = extra_args.get("model_options", {})
    positive = guider.conds.get("positive")
    negative = guider.conds.get("negative")
    if not negative:
        raise ValueError("negative: null-text inversion needs a negative conditioning to start from")

    def cond(x, sigma):
        return comfy.samplers.calc_cond_batch(base, [positive], x, sigma, mo)[0]

    def uncond(x, sigma, context):
        return comfy.samplers.calc_cond_batch(base, [[_with_context(negative[0], context)]], x, sigma, mo)[0]

    return cond, uncond, negative[0]["cross_attn"]


def null_text_invert(model, positive, negative, latent: dict, steps: int, scheduler: str, cfg: float = 7.5,
                     iterations: int = 10, lr: float = 1e-2, callback=None):
    """DDIM inversion, then per-step negative embeddings that make CFG sampling follow the
    inversion trajectory. Returns (inverted latent, Trajectory, per-step negative CONDITIONING,
    losses per step). The negative is one conditioning entry per step, each limited to its step's
    sigma interval (ComfyUI's timestep_start / timestep_end), so any sampler node picks it up."""
    inv, traj = ddim_invert(model, positive, latent, steps, scheduler)
    sigmas = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), scheduler, steps).cpu()
    guider = comfy.samplers.CFGGuider(model)
    guider.set_conds(positive, negative)
    guider.set_cfg(cfg)
    record, log = [], []
    sampler = comfy.samplers.KSAMPLER(null_text_sampler(traj, cfg, iterations, lr, record, log, _guider_denoisers))
    samples = comfy.sample.fix_empty_latent_channels(model, inv["samples"])
    guider.sample(torch.zeros_like(samples), samples, sampler, sigmas, callback=callback, disable_pbar=True, seed=0)
    extra = dict(negative[0][1])
    for k in ("timestep_start", "timestep_end", "start_percent", "end_percent"):
        extra.pop(k, None)
    cond = []
    for i, u in enumerate(record):
        s, s_next = float(sigmas[i]), float(sigmas[i + 1])
        e = dict(extra)
        e["timestep_start"] = float("inf") if i == 0 else s * (1 + 1e-6)
        e["timestep_end"] = s_next * (1 + 1e-6)
        cond.append([u.cpu(), e])
    return inv, traj, cond, log
