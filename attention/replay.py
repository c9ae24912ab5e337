"""Source-branch replay for real-image edits (the option of MasaCtrl's and null-text inversion's
real-image pipelines): at every step the source item of an edit batch [source, target...] is put
back on its DDIM-inversion trajectory, so the targets attend to the keys and values of the real
image's own trajectory rather than to a drifting reconstruction.

The sampler owns the latent, so the replay acts on model calls: the source rows of the model input
at step i are the trajectory latent at sigma_i, and the source rows of the denoised output are
    D' = (x_traj(sigma_{i+1}) - r * x) / (1 - r),   r = sigma_{i+1} / sigma_i
for which a deterministic first-order step from the sampler's x (Euler, DDIM) lands exactly on the
trajectory's next latent (the last step, sigma = 0, returns the encoded image itself). Other samplers
get the same rows as a denoised prediction; model calls between schedule points are left alone.
"""
from __future__ import annotations

from .core import AttentionControlError, Controller, Run


class ReplayController(Controller):
    name = "source replay"
    kinds = frozenset()
    wraps_model = True

    def __init__(self, trajectory):
        self.trajectory = trajectory

    def validate_sites(self, sites) -> None:
        pass

    def wants(self, site) -> bool:
        return False

    def wants_at(self, site, latent_hw) -> bool:
        return False

    def begin_run(self, run: Run) -> None:
        tr = self.trajectory
        missing = [s for s in run.sigmas if tr.index_of(s) is None]
        if missing:
            raise AttentionControlError(
                f"trajectory: the sampler's schedule does not match the inversion ({tr.steps} steps, scheduler "
                f"'{tr.scheduler}'); sample with the same steps and scheduler as the DDIM inversion node "
                f"(sigma {missing[0]:.4g} is not on the trajectory)")
        if tuple(tr.latents[0].shape[-2:]) != tuple(run.latent_hw):
            raise AttentionControlError(
                f"trajectory: the inversion latent is {tuple(tr.latents[0].shape[-2:])} but the sampled latent is "
                f"{tuple(run.latent_hw)}; sample the inverted latent")
        self._sched = run.sigmas

    def apply_model(self, apply, x, sigma, run: Run, cond_or_uncond, options=None):
        step, sig = run.step_of(sigma)
        s_i, s_next = run.sigmas[step], run.sigmas[step + 1]
        if abs(sig - s_i) > 1e-4 * s_i:
            return apply(x)                        # a between-points evaluation: left alone
        tr = self.trajectory
        cur = tr.at(s_i)
        nxt = tr.at(s_next) if s_next > 0 else tr.latents[0]
        B = run.batch
        rows = [j * B for j in range(len(cond_or_uncond))]
        src = cur[:1].to(device=x.device, dtype=x.dtype)
        x_in = x.clone()
        x_in[rows] = src
        out = apply(x_in)
        r = s_next / s_i
        target = nxt[:1].to(device=out.device, dtype=out.dtype)
        out = out.clone()
        out[rows] = (target - r * x[rows].to(out.dtype)) / (1.0 - r)
        return out
