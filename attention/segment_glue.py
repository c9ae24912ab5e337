"""ComfyUI glue of word segmentation: one model call on a noised latent through ComfyUI's own
CFGGuider with a custom KSAMPLER (positive only, CFG 1), so model patches, wrappers, the pack's
router runs and memory management behave exactly as in a sampling step."""
from __future__ import annotations

import torch

import comfy.sample
import comfy.samplers


def noise_sigma(model, noise_level: float) -> float:
    """The sigma a sampler run with denoise = noise_level starts from (0: the clean image; 1: the
    schedule's highest noise), on the model's own schedule (eps / v / rectified flow)."""
    ms = model.get_model_object("model_sampling")
    # percent_to_sigma(0) is a sentinel above every sigma: the schedule's top is sigma_max
    return min(float(ms.percent_to_sigma(1.0 - float(noise_level))), float(ms.sigma_max))


def _one_call(model_k, x, sigmas, extra_args=None, callback=None, disable=None):
    s_in = x.new_ones([x.shape[0]])
    model_k(x, sigmas[0] * s_in, **(extra_args or {}))
    return x


def forward_at(model, positive, samples: torch.Tensor, sigma: float, seed: int) -> None:
    """One model call (the prediction is discarded: the controllers on `model` read its attention)
    on `samples` noised to `sigma` with ComfyUI's noise for `seed`."""
    samples = comfy.sample.fix_empty_latent_channels(model, samples)
    noise = comfy.sample.prepare_noise(samples, seed)
    guider = comfy.samplers.CFGGuider(model)
    guider.set_conds(positive, positive)
    guider.set_cfg(1.0)
    sampler = comfy.samplers.KSAMPLER(_one_call)
    sigmas = torch.tensor([float(sigma), 0.0])
    with torch.no_grad():
        guider.sample(noise, samples, sampler, sigmas, disable_pbar=True, seed=seed)
