"""Inversion of rectified-flow models (Flux, SD3, Wan, Qwen-Image, Lumina 2 ...: ComfyUI's CONST
model sampling), plain and controlled (RF-Inversion: Rout et al. 2024, "Semantic image inversion and
editing using rectified stochastic differential equations"): the sampler functions, pure torch.

ComfyUI's sigma form of a rectified flow. The latent at level sigma is x = (1 - sigma) x0 + sigma * n
(sigma 0: the image, sigma 1: the noise), the model's prediction is returned as denoised
D = x - sigma * out, so the velocity of the ODE in sigma is
    v(x, sigma) = dx / dsigma = (x - D(x, sigma)) / sigma        (= n - x0 on the straight path)
which is k-diffusion's `to_d`: sampling with euler is x <- x + (sigma_next - sigma) v(x, sigma).

Plain inversion, the counterpart of DDIM inversion (`samplers/inversion.py`): for the schedule
0 = s_0 < s_1 < ... < s_N = 1 (the sampler's sigmas reversed), each step evaluates the velocity at the
NEXT level on the current latent and moves
    x_{k+1} = x_k + (s_{k+1} - s_k) * v(x_k, s_{k+1})
which is the same Euler step in sigma run backwards, the same formula as DDIM inversion's
x + (hi - lo) * (x_in - D) / hi, with x_in = x_k: a flow latent is already the model's input at every
level (CONST's calculate_input is the identity), where DDIM inversion rescales the VE latent to the
next level. Sampling the result with euler, the same steps and scheduler, CFG 1, from the inverted
latent as the start, reconstructs the image up to v(x_k, s) ~ v(x_{k+1}, s) (first order in the step).

RF-Inversion, paper notation -> ComfyUI sigma. The paper's controlled forward ODE runs from the image
Y_0 = y0 (t = 0) to the noise (t = 1), so t = sigma, and its unconditional field u_t(Y_t) = v(Y_t, sigma)
above. With a fixed noise sample y1 ~ N(0, I) (here: ComfyUI's own noise for the node's seed) and the
conditional field toward it, u_t(Y_t | y1) = (y1 - Y_t) / (1 - t), the controlled field is
    u^ = u + gamma * (u(. | y1) - u)                                       (paper: Algorithm 1, eq. 8)
and the Euler step is
    x_{k+1} = x_k + (s_{k+1} - s_k) * [v + gamma_k * ((y1 - x_k) / (1 - s_k) - v)],  v = v(x_k, s_{k+1})
(the conditional field at the current level s_k < 1, where it is finite; the model's field at the next
level, as in the plain inversion). gamma_k = 0 is the plain step, bit for bit (the term is skipped).
Limiting case gamma = 1 on every step: y1 - x_{k+1} = (y1 - x_k)(1 - s_{k+1}) / (1 - s_k), which
telescopes to y1 - x_N = (y1 - x_0)(1 - s_N) / (1 - s_0) = 0 at s_N = 1: the inversion lands on y1
whatever the model. The paper applies gamma on every forward step (its Flux experiments: gamma 0.5).

The controlled reverse ODE (the edit's sampling, paper time t = 1 - sigma from the noise to the image):
the model's field is pulled toward the reference image y0 by eta, with the conditional field
v_t(X_t | y0) = (y0 - X_t) / (1 - t) = (y0 - x) / sigma. In ComfyUI's sigma form, where the sampler
steps with v = (x - D) / sigma, the controlled field v + eta * ((x - y0) / sigma - v) is exactly the
velocity of the blended prediction
    D' = D + eta * (y0 - D)
so the reverse pass is a change of the denoised prediction (`controlled_denoised`; euler then takes the
paper's Euler step, eta 1 lands on y0), applied on sampling steps [start, stop) only: the paper's
eta_t = eta from its starting time s to its stopping time tau, 0 after (its Flux defaults: s = 0, tau
about a quarter of the steps, eta 0.9 - 1), so the later steps follow the edit prompt freely.
"""
from __future__ import annotations

import torch

from ..attention.core import AttentionControlError, Controller, Run
from .inversion import Trajectory

__all__ = ["Trajectory", "flow_inversion_sampler", "step_gammas", "controlled_denoised", "RFGuidanceController"]


def step_gammas(gamma: float, n_steps: int, start: int = 0, end: int | None = None) -> list[float]:
    """Per-step gamma of the controlled inversion: `gamma` on inversion steps [start, end) (counted from
    the image, step 0 = sigma 0 -> s_1), 0 elsewhere; the paper's default is every step."""
    end = n_steps if end is None else end
    return [float(gamma) if start <= k < end else 0.0 for k in range(n_steps)]


def flow_inversion_sampler(record: list, gammas: list[float] | None = None, y1: torch.Tensor | None = None):
    """Sampler function (k-diffusion signature) of rectified-flow inversion; appends (sigma, latent)
    to `record`, ascending from sigma 0. `gammas`: per-step controller guidance (None or all 0: plain
    inversion), `y1`: the target noise of the controlled steps (model space, the latent's shape)."""
    @torch.no_grad()
    def invert(model, x, sigmas, extra_args=None, callback=None, disable=None):
        extra_args = extra_args or {}
        s_in = x.new_ones([x.shape[0]])
        asc = sigmas.flip(0)
        n = len(asc) - 1
        gs = list(gammas) if gammas is not None else [0.0] * n
        if len(gs) != n:
            raise ValueError(f"gammas: {len(gs)} values for {n} steps")
        if any(g != 0.0 for g in gs) and y1 is None:
            raise ValueError("y1: the controlled inversion needs a target noise")
        target = None if y1 is None else y1.to(device=x.device, dtype=x.dtype)
        record.append((float(asc[0]), x.detach().cpu().clone()))
        for i in range(n):
            lo, hi = asc[i], asc[i + 1]
            den = model(x, hi * s_in, **extra_args)
            v = (x - den) / hi
            if gs[i] != 0.0:
                v = v + gs[i] * ((target - x) / (1.0 - lo) - v)
            x = x + (hi - lo) * v
            record.append((float(hi), x.detach().cpu().clone()))
            if callback is not None:
                callback({"x": x, "i": i, "sigma": hi, "sigma_hat": hi, "denoised": den})
        return x
    return invert


def controlled_denoised(den: torch.Tensor, y0: torch.Tensor, eta: float) -> torch.Tensor:
    """RF-Inversion's controlled reverse field as a denoised prediction: D + eta (y0 - D)."""
    return den + eta * (y0 - den)


class RFGuidanceController(Controller):
    """Whole model calls of sampling steps [start, stop): the prediction of every row (source and
    targets) pulled toward the trajectory's image by eta (`controlled_denoised`); other steps pass."""
    name = "RF-Inversion guidance"
    kinds = frozenset()
    wraps_model = True

    def __init__(self, trajectory: Trajectory, eta: float, start: int = 0, stop: int | None = None):
        self.trajectory = trajectory
        self.eta = float(eta)
        self.start = start
        self.stop = stop

    def validate_sites(self, sites) -> None:
        pass

    def wants(self, site) -> bool:
        return False

    def wants_at(self, site, latent_hw) -> bool:
        return False

    def begin_run(self, run: Run) -> None:
        got = tuple(self.trajectory.latents[0].shape[-2:])
        if got != tuple(run.latent_hw):
            raise AttentionControlError(
                f"trajectory: the inversion latent is {got} but the sampled latent is {tuple(run.latent_hw)}; "
                f"sample the inverted latent")

    def apply_model(self, apply, x, sigma, run: Run, cond_or_uncond, options=None):
        out = apply(x)
        step, _ = run.step_of(sigma)
        stop = run.n_steps if self.stop is None else self.stop
        if self.eta == 0.0 or not (self.start <= step < stop):
            return out
        y0 = self.trajectory.latents[0].to(device=out.device, dtype=out.dtype)
        return controlled_denoised(out, y0[:1], self.eta)
