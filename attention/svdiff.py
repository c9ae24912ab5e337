"""SVDiff (Han et al. 2023): spectral shifts. Pure torch.

Each weight W (a conv kernel reshaped to (c_out, c_in k k)) is reparametrised by its SVD, W = U diag(s) V^T,
and only a shift d of the singular values is learned: W_d = U diag(relu(s + scale d)) V^T. This module
writes the change instead of the whole matrix,

    W_d = W + U diag(relu(s + scale d) - s) V^T,

which is W exactly (bit for bit) where d = 0 or scale = 0, since relu(s) = s for singular values; the
gradient with respect to d is the paper's. One shift vector per weight matrix: min(c_out, c_in k k) numbers
(about 1.7 MB for SD1.5's UNet in float32)."""
from __future__ import annotations

import torch


def svd_of(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(U, s, V^T) of the weight as a matrix, float32 (computed in float64 for matrices this pack trains on a
    CPU, float32 on an accelerator)."""
    w = weight.detach().reshape(weight.shape[0], -1)
    dt = torch.float64 if w.device.type == "cpu" else torch.float32
    u, s, vh = torch.linalg.svd(w.to(dt), full_matrices=False)
    return u.float().contiguous(), s.float().contiguous(), vh.float().contiguous()


def spectral_delta(u, s, vh, shift, scale: float = 1.0) -> torch.Tensor:
    """U diag(relu(s + scale d) - s) V^T: the change of the weight (as a matrix)."""
    ds = torch.relu(s + scale * shift) - s
    return (u * ds) @ vh


class SpectralShift(torch.nn.Module):
    """The trainable shift of one weight: a weight wrapper (ModelPatcher.add_weight_wrapper) that returns
    W + U diag(relu(s + d) - s) V^T in the weight's dtype; only `shift` is a parameter."""

    def __init__(self, weight: torch.Tensor, svd=None):
        super().__init__()
        u, s, vh = svd if svd is not None else svd_of(weight)
        self.register_buffer("u", u, persistent=False)
        self.register_buffer("s", s, persistent=False)
        self.register_buffer("vh", vh, persistent=False)
        self.shift = torch.nn.Parameter(torch.zeros_like(s))
        self.shape = tuple(weight.shape)

    def __call__(self, w: torch.Tensor) -> torch.Tensor:
        delta = spectral_delta(self.u.to(w.device), self.s.to(w.device), self.vh.to(w.device),
                               self.shift.to(w.device, torch.float32))
        return (w.float() + delta.reshape(w.shape)).to(w.dtype)

    def passive_memory_usage(self):
        return sum(t.nelement() * t.element_size() for t in (self.u, self.s, self.vh, self.shift))

    def move_to(self, device):
        self.to(device=device)
        return self.passive_memory_usage()
