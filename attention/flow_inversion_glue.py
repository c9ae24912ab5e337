"""ComfyUI glue of rectified-flow inversion: runs `samplers/flow_inversion.py` through ComfyUI's own
CFGGuider with a custom KSAMPLER (patches, wrappers, hooks, ControlNets and memory management as in
sampling), as `inversion_glue.ddim_invert` does for DDIM inversion.

Starting from a given latent on a flow model. CONST's noise scaling starts the sampler at
sigma_0 * noise + (1 - sigma_0) * latent, and flow schedules start at sigma_0 = 1, so with the noise off
(KSamplerAdvanced add_noise disable) a flow model starts from zeros whatever the latent. The inversion
therefore hands the latent to the guider as both the noise (model space, processed by hand as the
guider processes the latent) and the latent, which starts the sampler exactly on it at any sigma_0;
and the inverted noise goes back to sampling the same way: as a NOISE (`InvertedNoise`, for
SamplerCustomAdvanced) together with the inverted LATENT.
"""
from __future__ import annotations

import torch

import comfy.model_management
import comfy.model_sampling
import comfy.sample
import comfy.samplers

from ..samplers.flow_inversion import Trajectory, flow_inversion_sampler, step_gammas
from .core import AttentionControlError


def is_flow(model) -> bool:
    """Rectified flow in ComfyUI's sigma form (CONST: ModelSamplingFlux, ModelSamplingDiscreteFlow)."""
    return isinstance(model.get_model_object("model_sampling"), comfy.model_sampling.CONST)


def sampling_name(model) -> str:
    ms = model.get_model_object("model_sampling")
    return ", ".join(c.__name__ for c in type(ms).__mro__[1:3])


def to_model_space(model, samples: torch.Tensor) -> torch.Tensor:
    """The latent as the guider hands it to the sampler (an all-zero latent is not shifted)."""
    if torch.count_nonzero(samples) > 0:
        return model.model.process_latent_in(samples)
    return samples


class InvertedNoise:
    """A ComfyUI NOISE (as RandomNoise / DisableNoise): the inverted noise, repeated to the batch of the
    latent it is asked for (e.g. an edit's [source, target] batch)."""
    def __init__(self, noise: torch.Tensor, seed: int = 0):
        self.noise = noise.cpu()
        self.seed = seed

    def generate_noise(self, input_latent: dict) -> torch.Tensor:
        shape = tuple(input_latent["samples"].shape)
        if shape[1:] != tuple(self.noise.shape[1:]):
            raise AttentionControlError(
                f"noise: the inverted noise is {tuple(self.noise.shape[1:])} per item but the latent is "
                f"{shape[1:]}; sample the inverted latent (or a batch of it)")
        return self.noise[:1].expand(shape).clone()


def flow_invert(model, positive, latent: dict, steps: int, scheduler: str, gamma: float = 0.0, seed: int = 0,
                gamma_steps: tuple[int, int | None] = (0, None), callback=None):
    """-> (inverted latent dict, Trajectory, InvertedNoise). `gamma` > 0: RF-Inversion's controlled
    inversion toward y1 = ComfyUI's noise for `seed` on inversion steps [gamma_steps) (default all)."""
    samples = comfy.sample.fix_empty_latent_channels(model, latent["samples"])
    sigmas = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), scheduler, steps).cpu()
    guider = comfy.samplers.CFGGuider(model)
    guider.set_conds(positive, positive)
    guider.set_cfg(1.0)
    y1 = comfy.sample.prepare_noise(samples, seed) if gamma != 0.0 else None
    record: list = []
    gammas = step_gammas(gamma, len(sigmas) - 1, *gamma_steps)
    sampler = comfy.samplers.KSAMPLER(flow_inversion_sampler(record, gammas, y1))
    start = to_model_space(model, samples)
    out = guider.sample(start, samples, sampler, sigmas, callback=callback, disable_pbar=True, seed=seed)
    out = out.to(comfy.model_management.intermediate_device())
    traj = Trajectory([s for s, _ in record], [x for _, x in record], steps, scheduler)
    res = {k: v for k, v in latent.items() if k not in ("noise_mask", "batch_index")}
    res["samples"] = out
    return res, traj, InvertedNoise(traj.latents[-1], seed)
