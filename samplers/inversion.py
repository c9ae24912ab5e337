"""DDIM inversion (Song et al. 2021; as used by Mokady et al. 2022, "Null-text Inversion for Editing
Real Images using Guided Diffusion Models"), run through ComfyUI's own sampling machinery.

The encoded image is taken up the deterministic DDIM path with the given conditioning at CFG 1:
for the schedule 0 = s_0 < s_1 < ... < s_N (the sampler's sigmas reversed), each step evaluates the
noise prediction at the NEXT level on the current latent (the reference's "next timestep") and moves
    x_{k+1} = x_k + (s_{k+1} - s_k) * eps(x_k rescaled to s_{k+1}, s_{k+1})
which is the DDIM (= Euler in sigma) update run backwards. Sampling the result with the same steps
and scheduler, a deterministic first-order sampler (euler / ddim), CFG 1 and no added noise
reconstructs the latent up to the inversion's approximation eps(x_k) ~ eps(x_{k+1}).

The model call goes through a CFGGuider with a custom KSAMPLER, so model patches, wrappers, hooks,
ControlNets and memory management behave exactly as in normal sampling.
"""
from __future__ import annotations

import torch

import comfy.model_management
import comfy.sample
import comfy.samplers


class Trajectory:
    """Latents of an inversion (model space, k-diffusion scale), one per sigma, ascending from 0."""

    def __init__(self, sigmas: list[float], latents: list[torch.Tensor], steps: int, scheduler: str):
        self.sigmas = [float(s) for s in sigmas]
        self.latents = latents
        self.steps = steps
        self.scheduler = scheduler

    def __deepcopy__(self, memo):
        return self

    def index_of(self, sigma: float, rel: float = 1e-4) -> int | None:
        for i, s in enumerate(self.sigmas):
            if abs(s - sigma) <= rel * max(abs(s), 1e-8):
                return i
        return None

    def at(self, sigma: float) -> torch.Tensor | None:
        i = self.index_of(sigma)
        return None if i is None else self.latents[i]


def _inversion_sampler(record: list):
    @torch.no_grad()
    def invert(model, x, sigmas, extra_args=None, callback=None, disable=None):
        extra_args = extra_args or {}
        s_in = x.new_ones([x.shape[0]])
        asc = sigmas.flip(0)
        record.append((float(asc[0]), x.detach().cpu().clone()))
        for i in range(len(asc) - 1):
            lo, hi = asc[i], asc[i + 1]
            x_in = x * ((1.0 + hi ** 2) / (1.0 + lo ** 2)).sqrt()
            den = model(x_in, hi * s_in, **extra_args)
            eps = (x_in - den) / hi
            x = x + (hi - lo) * eps
            record.append((float(hi), x.detach().cpu().clone()))
            if callback is not None:
                callback({"x": x, "i": i, "sigma": hi, "sigma_hat": hi, "denoised": den})
        return x
    return invert


def ddim_invert(model, positive, latent: dict, steps: int, scheduler: str, callback=None):
    """-> (latent dict of the inverted noise (sample it with add_noise off), Trajectory).
    `callback(i, denoised, x, total_steps)` as for ComfyUI's guiders (progress and previews)."""
    samples = comfy.sample.fix_empty_latent_channels(model, latent["samples"])
    sigmas = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), scheduler, steps).cpu()
    guider = comfy.samplers.CFGGuider(model)
    guider.set_conds(positive, positive)
    guider.set_cfg(1.0)
    record: list = []
    sampler = comfy.samplers.KSAMPLER(_inversion_sampler(record))
    noise = torch.zeros_like(samples)
    out = guider.sample(noise, samples, sampler, sigmas, callback=callback, disable_pbar=True, seed=0)
    out = out.to(comfy.model_management.intermediate_device())
    traj = Trajectory([s for s, _ in record], [x for _, x in record], steps, scheduler)
    res = {k: v for k, v in latent.items() if k not in ("noise_mask", "batch_index")}
    res["samples"] = out
    return res, traj
