"""Cross-attention maps per word (DAAM, Tang et al. 2022: "What the DAAM: Interpreting Stable
Diffusion Using Cross Attention").

Maps are computed only for the tokens asked, only for the rows asked, and accumulated as a running
sum at one fixed resolution, so memory does not grow with the number of steps.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """(B, N, heads*d) -> (B, heads, N, d)."""
    b, n, hd = x.shape
    return x.view(b, n, heads, hd // heads).transpose(1, 2)


def token_columns(positions: list[int], prompt_len: int, key_len: int) -> list[int]:
    """Key columns that carry the prompt positions `positions`.

    ComfyUI pads a positive/negative pair of different lengths to their least common multiple by
    repeating the sequence, so a prompt of `prompt_len` tokens seen with `key_len` keys repeats
    key_len / prompt_len times: the columns fold modulo prompt_len.
    """
    if key_len % prompt_len != 0:
        raise ValueError(
            f"the conditioning has {key_len} tokens, which is not a multiple of the captured prompt's "
            f"{prompt_len}: connect the same prompt to the capture node and to the sampler")
    reps = key_len // prompt_len
    return [p + r * prompt_len for r in range(reps) for p in positions]


def word_maps(q: torch.Tensor, k: torch.Tensor, heads: int, columns: list[list[int]],
              head_chunk: int = 4) -> torch.Tensor:
    """Post-softmax cross-attention mass of each word, averaged over heads.

    q: (B, N, heads*d), k: (B, K, heads*d); columns[w] lists the key columns of word w (summed).
    Returns float32 (B, W, N). The softmax runs over all K keys, chunked over heads so that at most
    `head_chunk` (N x K) score blocks exist at once.
    """
    b, n, _ = q.shape
    kk = k.shape[1]
    qh, kh = split_heads(q, heads), split_heads(k, heads)
    scale = qh.shape[-1] ** -0.5
    n_words = len(columns)
    # selection matrix (K, W): sums each word's columns in one matmul
    sel = torch.zeros(kk, n_words, dtype=torch.float32, device=q.device)
    for w, cols in enumerate(columns):
        sel[cols, w] = 1.0
    out = torch.zeros(b, n_words, n, dtype=torch.float32, device=q.device)
    for h0 in range(0, heads, head_chunk):
        s = torch.matmul(qh[:, h0:h0 + head_chunk].float(), kh[:, h0:h0 + head_chunk].float().transpose(-1, -2)) * scale
        p = s.softmax(dim=-1)                     # (B, h, N, K)
        out += torch.matmul(p, sel).sum(dim=1).transpose(1, 2)  # (B, W, N)
    return out / heads


def to_grid(maps: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """(B, W, N) -> (B, W, h, w)."""
    return maps.reshape(maps.shape[0], maps.shape[1], h, w)


def resize(maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear resize of (B, W, h, w) maps (no-op at the same size)."""
    if tuple(maps.shape[-2:]) == tuple(size):
        return maps
    return F.interpolate(maps, size=size, mode="bilinear", align_corners=False)


class MapAccumulator:
    """Running sum of (B, W, H, W) maps at a fixed resolution, optionally one sum per step."""

    def __init__(self, size: tuple[int, int], keep_steps: bool = False):
        self.size = tuple(size)
        self.keep_steps = keep_steps
        self.total: torch.Tensor | None = None
        self.count = 0
        self.per_step: dict[int, list] = {}

    def add(self, maps: torch.Tensor, step: int) -> None:
        m = resize(maps.float(), self.size)
        if self.total is None:
            self.total = torch.zeros_like(m)
        if self.total.shape[0] != m.shape[0]:
            raise ValueError(f"capture: the batch changed within one run ({self.total.shape[0]} -> {m.shape[0]})")
        self.total += m
        self.count += 1
        if self.keep_steps:
            entry = self.per_step.setdefault(step, [torch.zeros_like(m), 0])
            entry[0] += m
            entry[1] += 1

    def mean(self) -> torch.Tensor | None:
        if self.total is None:
            return None
        return self.total / max(self.count, 1)

    def step_means(self) -> list[tuple[int, torch.Tensor]]:
        return [(s, v[0] / max(v[1], 1)) for s, v in sorted(self.per_step.items())]


def normalize(maps: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Min-max normalise each (h, w) map to [0, 1]."""
    flat = maps.flatten(-2)
    lo = flat.min(dim=-1, keepdim=True).values
    hi = flat.max(dim=-1, keepdim=True).values
    return ((flat - lo) / (hi - lo).clamp_min(eps)).view_as(maps)


def colorize(maps01: torch.Tensor) -> torch.Tensor:
    """A perceptual 'turbo'-like colour ramp for maps in [0, 1]: (..., h, w) -> (..., h, w, 3)."""
    x = maps01.clamp(0, 1)
    # piecewise-linear ramp through dark blue, blue, cyan, yellow, red, dark red
    stops = torch.tensor([[0.19, 0.07, 0.23], [0.16, 0.47, 0.92], [0.10, 0.85, 0.75],
                          [0.85, 0.90, 0.20], [0.95, 0.40, 0.10], [0.48, 0.02, 0.01]],
                         dtype=x.dtype, device=x.device)
    pos = x * (len(stops) - 1)
    i0 = pos.floor().long().clamp(max=len(stops) - 2)
    t = (pos - i0.to(x.dtype)).unsqueeze(-1)
    return stops[i0] * (1 - t) + stops[i0 + 1] * t


def overlay(image: torch.Tensor, maps01: torch.Tensor, alpha: float = 0.5) -> torch.Tensor:
    """image (H, W, 3) in [0, 1], maps01 (h, w) -> heat-map blended over the image (H, W, 3)."""
    m = resize(maps01[None, None], tuple(image.shape[:2]))[0, 0]
    return image * (1 - alpha) + colorize(m) * alpha


def grid_side(n_tokens: int, aspect_hw: tuple[int, int]) -> tuple[int, int]:
    """(h, w) of a flattened layer with n_tokens pixels and the latent's aspect ratio."""
    H, W = aspect_hw
    scale = math.sqrt(H * W / n_tokens)
    h, w = round(H / scale), round(W / scale)
    if h * w != n_tokens:
        raise ValueError(f"cannot infer the layer size of {n_tokens} tokens for a {H}x{W} latent")
    return h, w
