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


# --------------------------------------------------------------------------------------------
# null-text inversion (Mokady et al. 2022)

def _with_context(cond: dict, context: torch.Tensor) -> dict:
    """A copy of a processed cond entry whose cross-attention context is `context`."""
    import comfy.conds
    c = dict(cond)
    mc = dict(c.get("model_conds", {}))
    mc["c_crossattn"] = comfy.conds.CONDCrossAttn(context)
    c["model_conds"] = mc
    c["cross_attn"] = context
    return c


def _null_text_sampler(trajectory: Trajectory, cfg: float, iterations: int, lr: float, record: list, log: list):
    """Sampler function: walks the schedule down from the inverted latent and, for each step,
    optimises that step's negative embedding (Adam, lr * (1 - i / 100), early stop at
    1e-5 + 2e-5 * i) so that the CFG step lands on the inversion trajectory."""
    from ..attention.grad import WeightReferences

    def run(model, x, sigmas, extra_args=None, callback=None, disable=None):
        extra_args = extra_args or {}
        guider = model.inner_model
        base = guider.inner_model
        mo = extra_args.get("model_options", {})
        positive = guider.conds.get("positive")
        negative = guider.conds.get("negative")
        if not negative:
            raise ValueError("negative: null-text inversion needs a negative conditioning to start from")
        with torch.inference_mode(False):
            u = negative[0]["cross_attn"].detach().clone().float()
        s_in = x.new_ones([x.shape[0]])
        for i in range(len(sigmas) - 1):
            s, s_next = sigmas[i], sigmas[i + 1]
            target = trajectory.at(float(s_next)) if s_next > 0 else trajectory.latents[0]
            target = target.to(x.device, x.dtype)
            with torch.inference_mode(False):
                xi = x.detach().clone()
                ts = (s * s_in).detach().clone()
                tgt = target.detach().clone()
                with torch.no_grad():
                    d_c = comfy.samplers.calc_cond_batch(base, [positive], xi, ts, mo)[0].detach()
                u = u.detach().clone().requires_grad_(True)
                opt = torch.optim.Adam([u], lr=lr * (1.0 - i / 100.0))
                losses = []
                for _ in range(iterations):
                    with torch.enable_grad(), WeightReferences():
                        d_u = comfy.samplers.calc_cond_batch(base, [[_with_context(negative[0], u.to(xi.dtype))]],
                                                             xi, ts, mo)[0]
                        den = d_u + cfg * (d_c - d_u)
                        x_next = xi + (s_next - s) * (xi - den) / s
                        loss = torch.nn.functional.mse_loss(x_next, tgt)
                    losses.append(float(loss))
                    if float(loss) < 1e-5 + 2e-5 * i:
                        break
                    opt.zero_grad()
                    loss.backward()
                    opt.step()
                u = u.detach()
            log.append(losses)
            record.append(u.clone())
            neg_i = [_with_context(negative[0], u.to(x.dtype).clone())]
            with torch.no_grad():
                d_u = comfy.samplers.calc_cond_batch(base, [neg_i], x, s * s_in, mo)[0]
            den = d_u + cfg * (d_c.to(d_u.dtype) - d_u)
            x = x + (s_next - s) * (x - den) / s
            if callback is not None:
                callback({"x": x, "i": i, "sigma": s, "sigma_hat": s, "denoised": den})
        return x
    return run


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
    sampler = comfy.samplers.KSAMPLER(_null_text_sampler(traj, cfg, iterations, lr, record, log))
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
