"""SVDiff's unmix regularisation (Han et al. 2023, Cut-Mix-Unmix) as router controllers.

A Cut-Mix training sample joins one subject's image on the left with another's on the right and
captions it with both rare tokens ("a sks square on the left and a zwx circle on the right"). The
unmix term keeps each token's cross-attention on its own half: for token t with its half m_t, per
layer, head and token position i

    u = (1 - sum_p m_t(p) A[p, i] / sum_p A[p, i])^2,

the squared share of the token's attention mass on the other subject's half, averaged over the
layers, heads, positions and both tokens. The paper states it as an MSE of the maps on the
non-corresponding region; the mass share is the same penalty made independent of how much
attention a token gets, so one weight fits every family (it is layout guidance's energy with the
halves as boxes; `layout.layer_energy`).

The controllers act only in the training forwards of mixed samples, where the trainer sets
`UnmixPlan.current`; everywhere else they pass. Probabilities are formed for the tokens' columns
only (the normaliser in chunks, `dit_layout.phrase_probs`), with gradients; the attention output is
the host's own."""
from __future__ import annotations

import torch

from .core import Controller
from .dit_layout import phrase_probs
from .dit_router import DitController
from .layout import Box, box_cells, layer_energy
from .maps import split_heads, token_columns

LEFT = Box("left", 0.0, 0.0, 0.5, 1.0)
RIGHT = Box("right", 0.5, 0.0, 1.0, 1.0)


class UnmixPlan:
    """Shared by the trainer and the controllers: `current` = (prompt length, [(token positions, Box),
    ...]) during the forward of a group of mixed samples, else None; the calls add their energies."""

    def __init__(self):
        self.current = None
        self.total = None            # sum over calls of the per-row energies (a 0-d tensor with grad)
        self.terms = 0               # rows x layers x objects summed into `total`

    def __deepcopy__(self, memo):
        return self

    def start(self, prompt_len: int, objects: list) -> None:
        self.current = (prompt_len, objects)
        self.total, self.terms = None, 0

    def stop(self):
        """-> the mean unmix term of the forward since `start` (None when no layer was reached)."""
        self.current = None
        if self.total is None or self.terms == 0:
            return None
        return self.total / self.terms

    def add(self, probs: torch.Tensor, objects: list) -> None:
        """probs (R, H, N, P) of the objects' columns (local indices), objects [(indices, cover (N,))]."""
        e = layer_energy(probs, objects)                       # (R,) summed over objects
        s = e.sum()
        self.total = s if self.total is None else self.total + s
        self.terms += e.numel() * len(objects)


class _Layout:
    """Per (objects, prompt length, key length, grid, device): the unique key columns of the tokens and,
    per object, (indices into them, its half as a (N,) cover); cached, as every layer of a resolution
    asks the same (`tag`: what else the columns depend on, a DiT call's text offset and stream)."""

    def __init__(self):
        self._cache = {}

    def __call__(self, objects, prompt_len: int, key_len: int, grid: tuple, device, offset=None, tag=None):
        key = (tuple((tuple(p), b) for p, b in objects), prompt_len, key_len, grid, str(device), tag)
        hit = self._cache.get(key)
        if hit is None:
            f, h, w = grid
            cols = []
            for pos, _box in objects:
                c = token_columns(pos, prompt_len, key_len)
                cols.append(c if offset is None else offset(c))
            uniq = list(dict.fromkeys(x for c in cols for x in c))
            local = [([uniq.index(c) for c in cc], box_cells(box, h, w, device).flatten().repeat(f))
                     for cc, (_p, box) in zip(cols, objects)]
            hit = self._cache[key] = (uniq, local)
        return hit


class UnmixController(Controller):
    """UNet: every cross-attention layer."""
    name = "unmix regularisation"
    kinds = frozenset({"cross"})

    def __init__(self, plan: UnmixPlan):
        self.plan = plan
        self.layout = _Layout()

    def wants(self, site) -> bool:
        return site.kind == "cross"

    def wants_at(self, site, latent_hw) -> bool:
        return site.kind == "cross"

    def attend(self, q, k, v, call, nxt):
        cur = self.plan.current
        if cur is None or not torch.is_grad_enabled() or not call.plain:
            return nxt(q, k, v)
        prompt_len, objects = cur
        uniq, local = self.layout(objects, prompt_len, k.shape[1], (1, call.h, call.w), q.device)
        heads = call.site.heads
        probs = phrase_probs(split_heads(q, heads), split_heads(k, heads), slice(None), uniq)   # (R, H, N, U)
        self.plan.add(probs, local)
        return nxt(q, k, v)


class DitUnmixController(DitController):
    """DiTs: the image-query x text-key probabilities of every attention call that has both."""
    name = "unmix regularisation"
    observer = True

    def __init__(self, plan: UnmixPlan):
        self.plan = plan
        self.layout = _Layout()

    def attend(self, call):
        cur = self.plan.current
        if cur is None or not torch.is_grad_enabled() or call.q_image is None or call.k_text is None \
                or call.geometry is None:
            return None
        prompt_len, objects = cur
        uniq, local = self.layout(objects, prompt_len, call.geometry.context_len, tuple(call.grid), call.q.device,
                                  call.key_columns, (call.k_text.start, call.site.stream))
        q, k = call.split_heads(call.q), call.split_heads(call.k)
        probs = phrase_probs(q, k, call.q_image, uniq, call.mask)                              # (R, H, N_img, U)
        self.plan.add(probs, local)
        return None
