"""Paint-with-words (Balaji et al. 2022, "eDiff-I: Text-to-Image Diffusion Models with an Ensemble
of Expert Denoisers"; reference implementation cloneofsimo/paint-with-words-sd) and the
cross-attention control of Collage Diffusion (Sarukkai et al. 2023).

On the cond rows of the chosen cross-attention layers, for each painted phrase k (token columns
P_k, mask M_k resized to the layer, strength s_k):
- eDiff-I:  scores = Q K^T + w * log(1 + sigma) * max(Q K^T) * sum_k s_k M_k [col in P_k],
            then the usual 1/sqrt(d) scale and softmax (max over the whole score tensor of the call);
- collage:  logits += g(sigma) * max_u(logit[:, i]) * (s_pos M_k - s_neg (1 - M_k)) for i in P_k,
            g(sigma) = ln(ln(sigma + 1.01) + 1), on the scaled logits.
Cross-attention probabilities (HW x 77) are cheap: they are computed explicitly for the cond rows
only; the uncond rows keep the host's fused attention.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .core import AttentionControlError, Controller, LayerSelector, Run, require_prompt_length, select_sites
from .maps import split_heads, token_columns
from .tiled import TILE_KEY, canvas_level, crop_per_piece
from .validate import check_finite, check_range


@dataclass
class PaintedPhrase:
    label: str
    positions: list[int]
    mask: torch.Tensor              # (H, W) in [0, 1], any size
    strength: float = 1.0


def mask_at(mask: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """(H, W) mask -> (h*w,) at a layer's size (area average when shrinking, bilinear otherwise)."""
    m = mask[None, None].float()
    if m.shape[-2] >= h and m.shape[-1] >= w:
        m = F.adaptive_avg_pool2d(m, (h, w))
    else:
        m = F.interpolate(m, size=(h, w), mode="bilinear", align_corners=False)
    return m.flatten()


def paint_logits(scores: torch.Tensor, scale: float, sigma: float, bias: torch.Tensor, cols: list[int],
                 cmask: torch.Tensor, strength: torch.Tensor, mode: str, weight: float, s_pos: float,
                 s_neg: float) -> torch.Tensor:
    """Scaled, painted logits from unscaled scores (R, h, N, K)."""
    if mode == "ediff-i":
        return (scores + (weight * math.log1p(sigma)) * scores.max() * bias) * scale
    logits = scores * scale
    g = math.log(math.log(sigma + 1.01) + 1.0)
    sub = logits[..., cols]                                                   # (R, h, N, P)
    top = sub.amax(dim=2, keepdim=True)
    logits[..., cols] = sub + g * top * strength * (s_pos * cmask - s_neg * (1.0 - cmask))
    return logits


def merge_rows(q, k, v, nxt, rows: torch.Tensor, out_rows: torch.Tensor) -> torch.Tensor:
    """The call's output with `rows` taken from `out_rows` and the others from `nxt`. When `nxt`
    is the host's bare attention, it only computes the other rows."""
    if getattr(nxt, "bare", False):
        keep = torch.ones(q.shape[0], dtype=torch.bool, device=q.device)
        keep[rows] = False
        out = out_rows.new_empty(q.shape[0], q.shape[1], out_rows.shape[-1])
        if bool(keep.any()):
            other = keep.nonzero().flatten()
            out.index_copy_(0, other, nxt(q.index_select(0, other), k.index_select(0, other),
                                          v.index_select(0, other)).to(out.dtype))
        out.index_copy_(0, rows, out_rows)
        return out
    out = nxt(q, k, v).clone()           # q, k, v are not read after nxt
    out.index_copy_(0, rows, out_rows.to(out.dtype))
    return out


def check_paint_config(phrases, mode, start, end, weight, s_pos, s_neg) -> None:
    """The checks of a paint-with-words configuration (UNet and DiT controllers): named errors."""
    if not phrases:
        raise AttentionControlError("phrases: paint at least one phrase of the prompt")
    if mode not in ("ediff-i", "collage"):
        raise AttentionControlError(f"mode: '{mode}' is not ediff-i or collage")
    if not 0.0 <= start <= end <= 1.0:                      # False for NaN too
        raise AttentionControlError(f"start/end: need 0 <= start <= end <= 1, got {start}, {end}")
    check_range("weight", weight, 0.0, None, "use a weight >= 0 (paper: 0.1; 0 = off)")
    check_range("collage_positive", s_pos, 0.0, None)
    check_range("collage_negative", s_neg, 0.0, None)
    for p in phrases:
        check_finite(f"masks: the mask of '{p.label}'", p.mask, "fix the node that makes the mask")
        check_range(f"strengths: '{p.label}'", p.strength, 0.0, None)
        if float(p.mask.max()) <= 0.0:
            raise AttentionControlError(
                f"masks: the mask of '{p.label}' covers nothing; paint the region or remove the phrase")


class PaintWithWordsController(Controller):
    name = "paint with words"
    kinds = frozenset({"cross"})

    def __init__(self, phrases: list[PaintedPhrase], prompt_len: int, weight: float = 0.1, mode: str = "ediff-i",
                 s_pos: float = 1.0, s_neg: float = 1.0, selector: LayerSelector | None = None,
                 start: float = 0.0, end: float = 1.0):
        check_paint_config(phrases, mode, start, end, weight, s_pos, s_neg)
        self.phrases = phrases
        self.prompt_len = prompt_len
        self.weight = float(weight)
        self.mode = mode
        self.s_pos, self.s_neg = float(s_pos), float(s_neg)
        self.selector = selector or LayerSelector()
        self.start, self.end = start, end
        self.off = (self.weight == 0.0 if mode == "ediff-i" else (self.s_pos == 0.0 and self.s_neg == 0.0)) or \
            all(p.strength == 0.0 for p in phrases)

    def begin_run(self, run: Run) -> None:
        sites = select_sites(run.router.sites, self.selector, "cross", run.latent_hw, input_name="layers")
        require_prompt_length(run, self.prompt_len, "paint-with-words")
        d = run.data(self)
        d["keys"] = {s.key for s in sites}
        d["cache"] = {}

    def _bias(self, d, h, w, key_len, device):
        """(N, K) sum of strength * mask over each phrase's columns, the painted columns, their
        (N, P) masks and (P,) strengths."""
        key = (h, w, key_len, device)
        got = d["cache"].get(key)
        if got is None:
            bias = torch.zeros(h * w, key_len, device=device)
            cols_all, masks, strengths = [], [], []
            for p in self.phrases:
                cols = token_columns(p.positions, self.prompt_len, key_len)
                m = mask_at(p.mask, h, w).to(device)
                bias[:, cols] += p.strength * m[:, None]
                cols_all += cols
                masks += [m] * len(cols)
                strengths += [p.strength] * len(cols)
            got = (bias, cols_all, torch.stack(masks, 1), torch.tensor(strengths, device=device))
            d["cache"][key] = got
        return got

    def _tiled_bias(self, d, call, key_len, device):
        """Inside a tiled model call (Tiled Diffusion): the bias and masks of each cond row, cropped
        from the canvas-level ones for the row's tile: ((R, 1, N, K) bias, cols, (R, 1, N, P) masks,
        strengths)."""
        tile = call.extra.get(TILE_KEY)
        pieces, (H, W) = tuple(tile["pieces"]), tile["canvas"]
        hc, wc = canvas_level(H, W, call.site.ds)
        key = ("tiles", pieces, hc, wc, key_len, device)
        got = d["cache"].get(key)
        if got is None:
            bias, cols, cmask, strength = self._bias(d, hc, wc, key_len, device)
            per = lambda t: crop_per_piece(t.T.reshape(-1, hc, wc), pieces, H, W).flatten(2).transpose(1, 2)  # noqa: E731
            got = (per(bias), cols, per(cmask), strength)          # (pieces, N, K), (pieces, N, P)
            d["cache"][key] = got
        bias_p, cols, cmask_p, strength = got
        per_chunk = max(len(call.cond_or_uncond) // len(pieces), 1)
        piece_of_row = torch.tensor([j // per_chunk for j in call.cond_chunks() for _ in range(call.batch)],
                                    device=device)
        return bias_p[piece_of_row][:, None], cols, cmask_p[piece_of_row][:, None], strength

    def attend(self, q, k, v, call, nxt):
        d = call.run.data(self)
        n = call.run.n_steps
        if self.off or call.site.key not in d["keys"] or not (self.start * n <= call.step < max(self.end * n, 1e-9)):
            return nxt(q, k, v)
        if not call.cond_chunks():
            return nxt(q, k, v)
        rows = call.cond_rows().to(q.device)
        heads = call.site.heads
        qh = split_heads(q.index_select(0, rows), heads).float()
        kh = split_heads(k.index_select(0, rows), heads).float()
        vh = split_heads(v.index_select(0, rows), heads)
        scale = qh.shape[-1] ** -0.5
        scores = torch.matmul(qh, kh.transpose(-1, -2))                       # (R, h, N, K) unscaled
        if call.extra.get(TILE_KEY):
            bias, cols, cmask, strength = self._tiled_bias(d, call, k.shape[1], q.device)
        else:
            bias, cols, cmask, strength = self._bias(d, call.h, call.w, k.shape[1], q.device)
        logits = paint_logits(scores, scale, max(float(call.sigma), 0.0), bias, cols, cmask, strength, self.mode,
                              self.weight, self.s_pos, self.s_neg)
        out_rows = torch.matmul(logits.softmax(-1).to(vh.dtype), vh)
        out_rows = out_rows.transpose(1, 2).reshape(rows.numel(), q.shape[1], -1)
        return merge_rows(q, k, v, nxt, rows, out_rows)
