"""DDIM inversion (Song et al. 2021; as used by Mokady et al. 2022, "Null-text Inversion for Editing
Real Images using Guided Diffusion Models"): the sampler functions, pure torch.

The encoded image is taken up the deterministic DDIM path with the given conditioning at CFG 1:
for the schedule 0 = s_0 < s_1 < ... < s_N (the sampler's sigmas reversed), each step evaluates the
noise prediction at the NEXT level on the current latent (the reference's "next timestep") and moves
    x_{k+1} = x_k + (s_{k+1} - s_k) * eps(x_k rescaled to s_{k+1}, s_{k+1})
which is the DDIM (= Euler in sigma) update run backwards. Sampling the result with the same steps
and scheduler, a deterministic first-order sampler (euler / ddim), CFG 1 and no added noise
reconstructs the latent up to the inversion's approximation eps(x_k) ~ eps(x_{k+1}).

Noise regularisation (Parmar et al. 2023, Pix2Pix-Zero): the predicted noise of each inversion step
is pushed toward white Gaussian noise before the step uses it, by gradient steps on
    L_ac = sum_channels sum_pyramid levels (mean(n * roll(n, r, H))^2 + mean(n * roll(n, r, W))^2)
(auto-correlation at a random shift r < size/2, on a 2x average-pooled pyramid down to 8 px; each
step averages the gradient of `rolls` draws of r) and
    L_kl = var(n) + mean(n)^2 - 1 - log var(n)
(KL to N(0, 1)), `iterations` times each, with weight lambda (the reference: 20, 5 iterations, 5 rolls).
Inverted noise without it keeps the image's structure in its correlations, which a guided edit
then fights; the shifts are drawn from a generator seeded per step, so inversion stays deterministic.

Both sampler functions have the signature of a k-diffusion sampler function, `fn(model, x, sigmas,
extra_args, callback, disable)`; `attention/inversion_glue.py` runs them through ComfyUI's own
guider (so patches, wrappers, hooks, ControlNets and memory management act as in sampling).
"""
from __future__ import annotations

import torch

from ..attention.grad import WeightReferences


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


REG_ITERATIONS = 5       # the reference's num_reg_steps
REG_ROLLS = 5            # ... num_ac_rolls


def auto_correlation_loss(noise: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """L_ac of one (C, H, W) noise map (see the module docstring); shifts from `generator`."""
    total = noise.new_zeros(())
    for c in range(noise.shape[0]):
        n = noise[c][None, None]
        while True:
            r = int(torch.randint(max(n.shape[-1] // 2, 1), (1,), generator=generator))
            total = total + (n * torch.roll(n, r, dims=2)).mean() ** 2 + (n * torch.roll(n, r, dims=3)).mean() ** 2
            if n.shape[-1] <= 8 or n.shape[-2] <= 8:
                break
            n = torch.nn.functional.avg_pool2d(n, kernel_size=2)
    return total


def kl_loss(noise: torch.Tensor) -> torch.Tensor:
    """KL of the values of `noise` (as one Gaussian) to N(0, 1), up to a factor 2."""
    var = noise.var()
    return var + noise.mean() ** 2 - 1.0 - torch.log(var + 1e-7)


def regularise_noise(eps: torch.Tensor, weight: float, generator: torch.Generator,
                     iterations: int = REG_ITERATIONS, rolls: int = REG_ROLLS) -> torch.Tensor:
    """The predicted noise (B, C, H, W) after `iterations` auto-correlation steps (each the mean gradient of
    `rolls` random shifts) and `iterations` KL steps of size `weight`, per batch item, in float32."""
    if weight == 0.0:
        return eps
    out = []
    with torch.inference_mode(False), torch.enable_grad():
        for item in eps.detach().float().clone():
            n = item.clone()
            for _ in range(iterations):
                g = torch.zeros_like(n)
                for _ in range(rolls):
                    v = n.detach().clone().requires_grad_(True)
                    g += torch.autograd.grad(auto_correlation_loss(v, generator), [v])[0]
                n = n - weight * g / rolls
            for _ in range(iterations):
                v = n.detach().clone().requires_grad_(True)
                n = n - weight * torch.autograd.grad(kl_loss(v), [v])[0]
            out.append(n.detach())
    return torch.stack(out).to(eps.dtype)


def inversion_sampler(record: list, regularisation: float = 0.0, seed: int = 0):
    """Sampler function of DDIM inversion; appends (sigma, latent) to `record`. `regularisation`: the
    weight of Pix2Pix-Zero's noise regularisation (0 = plain DDIM inversion)."""
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
            if regularisation:
                eps = regularise_noise(eps, regularisation, torch.Generator().manual_seed(seed * 100003 + i))
            x = x + (hi - lo) * eps
            record.append((float(hi), x.detach().cpu().clone()))
            if callback is not None:
                callback({"x": x, "i": i, "sigma": hi, "sigma_hat": hi, "denoised": den})
        return x
    return invert


def null_text_sampler(trajectory: Trajectory, cfg: float, iterations: int, lr: float, record: list, log: list,
                      denoisers):
    """Sampler function: walks the schedule down from the inverted latent and, for each step,
    optimises that step's negative embedding (Adam, lr * (1 - i / 100), early stop at
    1e-5 + 2e-5 * i) so that the CFG step lands on the inversion trajectory.

    `denoisers(model, extra_args) -> (cond(x, sigma), uncond(x, sigma, context), context0)`: the
    positive prediction, the negative prediction with a given context, and the starting context."""

    def run(model, x, sigmas, extra_args=None, callback=None, disable=None):
        d_cond, d_uncond, u0 = denoisers(model, extra_args or {})
        with torch.inference_mode(False):
            u = u0.detach().clone().float()
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
                    d_c = d_cond(xi, ts).detach()
                u = u.detach().clone().requires_grad_(True)
                opt = torch.optim.Adam([u], lr=lr * (1.0 - i / 100.0))
                losses = []
                for _ in range(iterations):
                    with torch.enable_grad(), WeightReferences():
                        d_u = d_uncond(xi, ts, u.to(xi.dtype))
                        den = d_u + cfg * (d_c - d_u)
                        # the sigmas are inference tensors (ComfyUI samples under inference mode): floats here
                        x_next = xi + (float(s_next) - float(s)) * (xi - den) / float(s)
                        loss = torch.nn.functional.mse_loss(x_next, tgt)
                    losses.append(float(loss.detach()))
                    if losses[-1] < 1e-5 + 2e-5 * i:
                        break
                    opt.zero_grad()
                    loss.backward()
                    opt.step()
                u = u.detach()
            log.append(losses)
            record.append(u.clone())
            with torch.no_grad():
                d_u = d_uncond(x, s * s_in, u.to(x.dtype).clone())
            den = d_u + cfg * (d_c.to(d_u.dtype) - d_u)
            x = x + (s_next - s) * (x - den) / s
            if callback is not None:
                callback({"x": x, "i": i, "sigma": s, "sigma_hat": s, "denoised": den})
        return x
    return run
