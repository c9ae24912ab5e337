"""Collage Diffusion (Sarukkai, Li, Shvets, Fatahalian, Bo 2023, "Collage Diffusion"): a layered
collage (RGBA layers, each with a text and a noise strength) is harmonised into one image while
each layer keeps as much of itself as its strength asks.

- Composite: layers are stacked bottom to top with alpha-over; a layer's *visible* mask is its
  alpha times the transparency of everything above it. Pixels no layer covers are mid grey.
- Per-layer noise strength s_i (the harmonisation-fidelity knob): a pixel of layer i stays the
  noised collage while t >= s_i T and is generated freely once t < s_i T (s = 1: generated from the
  start like text-to-image; s = 0: kept). The strength map is sum_i visible_i s_i (+ 1 where no
  layer is), with layer borders given the larger neighbouring strength (max filter of `dilate`
  pixels, so seams are regenerated) and a Gaussian blur of `blur` pixels.
  In ComfyUI this is a denoise mask (the LATENT's noise_mask = the strength map) and a
  `denoise_mask_function` that makes it binary per step: mask = [s > t(sigma) / 1000]. The host's
  sampler then holds masked-out pixels at the noised collage (input) and the collage (output).
- Cross-attention control: each layer's text tokens get Collage Diffusion's inside/outside bias on
  its visible mask (`regions.PaintWithWordsController` in collage mode).
Pure torch.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .core import AttentionControlError

GREY = 0.5


def composite_layers(images: torch.Tensor, alphas: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """images (L, H, W, 3) in [0, 1], alphas (L, H, W) opacity in [0, 1], bottom layer first ->
    (composite (H, W, 3), visible masks (L, H, W), uncovered (H, W)); visible + uncovered sum to 1."""
    if images.ndim != 4 or images.shape[-1] < 3:
        raise AttentionControlError(f"images: expected an IMAGE batch (layers, H, W, 3), got {tuple(images.shape)}")
    if alphas.shape != images.shape[:3]:
        raise AttentionControlError(
            f"masks: {alphas.shape[0]} mask(s) of {tuple(alphas.shape[1:])} for {images.shape[0]} layer image(s) of "
            f"{tuple(images.shape[1:3])}; give one mask per layer at the image size")
    a = alphas.float().clamp(0.0, 1.0)
    rgb = images[..., :3].float()
    L = a.shape[0]
    visible = torch.empty_like(a)
    above = torch.ones_like(a[0])                      # transparency of everything above layer i
    for i in range(L - 1, -1, -1):
        visible[i] = a[i] * above
        above = above * (1.0 - a[i])
    comp = (visible[..., None] * rgb).sum(0) + above[..., None] * GREY
    return comp, visible, above


def strength_map(visible: torch.Tensor, uncovered: torch.Tensor, strengths, dilate: int = 0,
                 blur: float = 0.0) -> torch.Tensor:
    """(H, W) per-pixel noise strength: sum_i visible_i s_i + uncovered, then a max filter of
    `dilate` px (borders take the larger strength) and a Gaussian blur of sigma `blur` px."""
    s = torch.as_tensor(strengths, dtype=torch.float32)
    if s.ndim != 1 or s.shape[0] != visible.shape[0]:
        raise AttentionControlError(f"strengths: {s.numel()} value(s) for {visible.shape[0]} layer(s)")
    if (s < 0).any() or (s > 1).any():
        raise AttentionControlError(f"strengths: each noise strength must be in [0, 1], got {s.tolist()}")
    m = (visible * s[:, None, None]).sum(0) + uncovered
    m = m[None, None]
    if dilate > 0:
        m = F.max_pool2d(m, 2 * dilate + 1, stride=1, padding=dilate)
    if blur > 0:
        r = max(1, int(math.ceil(3 * blur)))
        x = torch.arange(-r, r + 1, dtype=torch.float32)
        k = torch.exp(-0.5 * (x / blur) ** 2)
        k = k / k.sum()
        m = F.pad(m, (r, r, r, r), mode="replicate")
        m = F.conv2d(m, k.view(1, 1, 1, -1))
        m = F.conv2d(m, k.view(1, 1, -1, 1))
    return m[0, 0].clamp(0.0, 1.0)


def free_mask(strength: torch.Tensor, timestep: float, total: float = 1000.0) -> torch.Tensor:
    """Collage Diffusion's schedule: 1 where the pixel is generated at this timestep (t < s T),
    0 where it still is the noised collage."""
    return (strength * total > float(timestep)).to(strength.dtype)


class CollageMaskFunction:
    """A ComfyUI `denoise_mask_function(sigma, denoise_mask, extra_options)`: the LATENT's noise mask
    (the strength map, resized by the host) made binary by the timestep of the step, composed with
    an earlier function of that slot (applied first)."""

    def __init__(self, timestep_of, previous=None):
        self.timestep_of = timestep_of          # sigma tensor -> timestep tensor (the model's own)
        self.previous = previous

    def __deepcopy__(self, memo):
        return self

    def __call__(self, sigma, denoise_mask, extra_options=None):
        if self.previous is not None:
            denoise_mask = self.previous(sigma, denoise_mask, extra_options)
        t = float(self.timestep_of(sigma.reshape(-1)[:1].float()).reshape(-1)[0])
        return free_mask(denoise_mask, t)
