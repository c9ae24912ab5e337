"""TIME, editing implicit assumptions (Orgad et al. 2023): the closed-form edit of the text-side
projections (K and V of every cross-attention), as exact low-rank factors. Pure torch.

For a projection W (out x d) and source / destination token embeddings c_i, c*_i (d, all positions of
every prompt pair and template), the paper's edit is the ridge regression

    W' = argmin sum_i |W' c_i - W c*_i|^2 + lambda |W' - W|_F^2
       = (lambda W + sum_i W c*_i c_i^T) (lambda I + sum_i c_i c_i^T)^-1.

Since every target v*_i = W c*_i is W applied to the destination embedding, W factors out on the left:
W' = W M with M = (lambda I + C* C^T) B^-1, B = lambda I + C C^T, and

    M - I = (C* - C) C^T B^-1 = sum_i delta_i (B^-1 c_i)^T,   delta_i = c*_i - c_i.

So one edit holds for every projection fed by the same text embeddings (all K and V of the model,
whatever their output width), and it is exactly low rank: `up` (d x r) has the columns delta_i,
`down` (r x d) the rows (B^-1 c_i)^T, r the number of positions whose embedding the destination
changes (a causal text encoder leaves the positions before the first added word bit for bit equal,
and those drop out exactly). W' = W + W up down; a strength s gives W + s W up down (s = 1 the
paper's edit, s = 0 the model). Where r >= d the factors are replaced by D = up down itself (one
d x d factor; `down` is None), the cheaper exact form."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

TEMPLATES = ("A photo of ", "An image of ", "A picture of ")     # the paper's augmentation, plus the pair itself


def augmented(prompt: str) -> list[str]:
    """The prompt and its three templated variants ("A photo of a circle" for "A circle" / "a circle")."""
    p = prompt.strip()
    first = p.split(" ", 1)[0]
    lowered = p[0].lower() + p[1:] if first in ("A", "An") else p
    return [p] + [t + lowered for t in TEMPLATES]


class AlignmentError(ValueError):
    def __init__(self, position: int, token):
        super().__init__(f"source token {position} ({token}) is not found in the destination after the tokens "
                         f"before it")
        self.position = position
        self.token = token


def align_positions(src_ids: list, dst_ids: list, length: int = 77, same=None) -> list[int]:
    """For each of the `length` source positions, the destination position whose embedding is its target
    (the reference implementation's alignment): the source tokens (start .. end, no padding) are found in
    order in the destination, each after the previous match; the positions after the source's end token
    follow on from the position after the destination's matched end token; past the last position they
    take the last one. `same(a, b)` says whether two ids count as the same token (default ==; the caller
    folds "an" into "a"). Raises AlignmentError naming the first source token not found."""
    same = same or (lambda a, b: a == b)
    out, j = [], 0
    for i, t in enumerate(src_ids):
        while j < len(dst_ids) and not same(dst_ids[j], t):
            j += 1
        if j >= len(dst_ids):
            raise AlignmentError(i, t)
        out.append(j)
        j += 1
    while len(out) < length:
        out.append(min(j, length - 1))
        j += 1
    return out[:length]


@dataclass
class TimeEdit:
    """An edit of the projections fed by `context_dim`-wide text embeddings: W' = W + s W up down
    (`down` None: W' = W + s W up, up being the d x d matrix M - I). Float32 factors on the CPU."""
    context_dim: int
    up: torch.Tensor
    down: torch.Tensor | None
    meta: dict = field(default_factory=dict)

    @property
    def rank(self) -> int:
        return self.up.shape[1] if self.down is not None else self.context_dim

    def delta(self, weight: torch.Tensor) -> torch.Tensor:
        """W up down (the change at strength 1), in the weight's dtype and device."""
        up = self.up.to(weight.device, weight.dtype)
        if self.down is None:
            return weight @ up
        return (weight @ up) @ self.down.to(weight.device, weight.dtype)

    def matrix(self) -> torch.Tensor:
        """M - I (d x d), float64 (for tests and inspection)."""
        up = self.up.double()
        return up if self.down is None else up @ self.down.double()


def time_edit(sources: torch.Tensor, destinations: torch.Tensor, lam: float = 0.1, meta: dict | None = None
              ) -> TimeEdit:
    """The closed form from aligned embeddings: `sources` c_i and `destinations` c*_i, (N, d) each (rows are
    positions of all pairs and templates). Computed in float64; the factors are stored in float32."""
    if sources.shape != destinations.shape or sources.dim() != 2:
        raise ValueError(f"time_edit: sources {tuple(sources.shape)} and destinations {tuple(destinations.shape)} "
                         f"must both be (N, d)")
    if not lam > 0:
        raise ValueError(f"time_edit: lambda must be > 0, got {lam}")
    c = sources.detach().double().cpu()
    delta = destinations.detach().double().cpu() - c
    keep = delta.abs().amax(dim=1) > 0
    d = c.shape[1]
    b = torch.eye(d, dtype=torch.float64).mul_(lam).addmm_(c.T, c)          # lambda I + C C^T  (d x d)
    cols = c[keep]                                                          # (r, d)
    binv_c = torch.linalg.solve(b, cols.T)                                  # (d, r): B^-1 c_i
    up, down = delta[keep].T, binv_c.T                                      # (d, r), (r, d)
    meta = dict(meta or {})
    if up.shape[1] >= d:
        return TimeEdit(d, (up @ down).float().contiguous(), None, meta)
    return TimeEdit(d, up.float().contiguous(), down.float().contiguous(), meta)
