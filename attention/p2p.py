"""Prompt-to-Prompt (Hertz et al. 2022, "Prompt-to-Prompt Image Editing with Cross Attention
Control"; facts from the paper and google/prompt-to-prompt, code written here).

Batch layout: latent item 0 is the source, items 1..n the targets, all from the same noise. Edits
touch the cond rows only. Every edit is linear in the value matrix, so it runs as ONE fused
attention call over the whole batch with the target rows' queries/keys swapped for the source's
(DESIGN.md section 4); no (HW x HW) or (HW x 77) matrix is built for the edit itself:

    target cross output = attn(Q_src, K_src, X V_tgt) + attn(Q_tgt, K_tgt, diag(y) V_tgt)
    X = Mapper diag(alpha * w * a_t),   y = (1 - alpha) * w * a_t + (1 - a_t)

with Mapper the replace mapper (or the refine gather), alpha the refine alignment mask (1 for
aligned tokens), w the reweight factors and a_t the cross-replace window of step t (per token).
Self-attention injection: target output = attn(Q_src, K_src, V_tgt) during the self window.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .core import AttentionControlError, Controller, LayerSelector, Run, select_sites, sites_or_coarsest
from .maps import token_columns, word_maps

# --------------------------------------------------------------------------------------------
# token alignment


def replace_mapper(src_groups, tgt_groups, length: int = 77) -> torch.Tensor:
    """Word-swap mapper (length x length): M[i, j] = share of source token i that target token j takes.

    Words are compared by their token ids; prompts must have the same number of words. A swapped word
    of one token mapped to three gives 1/3 to each; two source tokens to one target token give two 1.0
    entries in that column. Identity elsewhere, following the target positions after the last swap."""
    if len(src_groups) != len(tgt_groups):
        raise AttentionControlError(
            f"target_prompts: replace needs the same number of words as the source "
            f"({len(src_groups)} vs {len(tgt_groups)}); use mode 'refine' for added or removed words")
    swaps = [(s[1], t[1]) for s, t in zip(src_groups, tgt_groups) if s[2] != t[2]]
    mapper = torch.zeros(length, length)
    i = j = 0
    cur = 0
    while i < length and j < length:
        if cur < len(swaps) and swaps[cur][0][0] == i:
            src_pos, tgt_pos = swaps[cur]
            if len(src_pos) == len(tgt_pos):
                for a, b in zip(src_pos, tgt_pos):
                    mapper[a, b] = 1.0
            else:
                share = 1.0 / len(tgt_pos)
                for b in tgt_pos:
                    for a in src_pos:
                        mapper[a, b] = share
            cur += 1
            i += len(src_pos)
            j += len(tgt_pos)
        elif cur < len(swaps):
            mapper[i, j] = 1.0
            i += 1
            j += 1
        else:
            mapper[j, j] = 1.0
            i += 1
            j += 1
    return mapper


def global_alignment(x: list[int], y: list[int]) -> list[int]:
    """Needleman-Wunsch (match +1, mismatch -1, gap 0): for each token of y the aligned index in x,
    or -1 where y inserts a token.

    Ties are broken as the reference code does (prompt-to-prompt's `seq_aligner.global_align`): each
    cell records its move when it is filled, preferring a gap in x (y's token inserted), then a gap
    in y (x's token dropped), then the diagonal; the traceback follows the recorded moves from the
    last cell, along the borders as well. So where several alignments score the same (repeated or
    hyphen-split tokens) the target token takes the same source column as in the reference."""
    n, m = len(x), len(y)
    INSERT, DELETE, DIAG = 1, 2, 3
    score = [[0] * (m + 1) for _ in range(n + 1)]
    move = [[INSERT] * (m + 1)] + [[DELETE] + [0] * m for _ in range(n)]
    for i in range(1, n + 1):
        for j in range(1, m + 1):
            ins, dele = score[i][j - 1], score[i - 1][j]
            diag = score[i - 1][j - 1] + (1 if x[i - 1] == y[j - 1] else -1)
            best = max(ins, dele, diag)
            score[i][j] = best
            move[i][j] = INSERT if best == ins else (DELETE if best == dele else DIAG)
    out = [-1] * m
    i, j = n, m
    while i > 0 or j > 0:
        mv = move[i][j]
        if mv == DIAG:
            out[j - 1] = i - 1
            i, j = i - 1, j - 1
        elif mv == INSERT:
            j -= 1                                   # y[j-1] inserted: keeps its own column
        else:
            i -= 1                                   # x[i-1] dropped
    return out


def refine_mapper(src_ids: list[int], tgt_ids: list[int], length: int = 77) -> tuple[torch.Tensor, torch.Tensor]:
    """Gather matrix P (length x length, P[src, tgt] = 1) and alignment mask alpha (length,).

    src_ids / tgt_ids: the prompts' token ids from BOS to EOS (no padding). Target token j takes
    source column align[j]; inserted tokens keep their own (alpha 0); positions after the target's
    EOS map to themselves."""
    align = global_alignment(src_ids, tgt_ids)
    P = torch.zeros(length, length)
    alpha = torch.ones(length)
    for j in range(length):
        if j < len(tgt_ids):
            a = align[j]
            if a < 0:
                alpha[j] = 0.0
                P[0, j] = 0.0
            else:
                P[a, j] = 1.0
        else:
            P[min(j, length - 1), j] = 1.0
    return P, alpha


# --------------------------------------------------------------------------------------------
# schedule

def cross_window(n_steps: int, start: float, end: float) -> tuple[int, int]:
    """Step indices [int(start*(S+1)), int(end*(S+1))) as in the reference code (0.8 of 50 -> 40)."""
    return int(start * (n_steps + 1)), int(end * (n_steps + 1))


def self_window(n_steps: int, fraction: float) -> int:
    """Self-attention injection for steps [0, int(S * fraction))."""
    return int(n_steps * fraction)


@dataclass
class TargetEdit:
    """One target prompt's edit, in token space (length L = 77 per chunk)."""
    mapper: torch.Tensor                         # (L, L)
    alpha: torch.Tensor                          # (L,) refine alignment (1 = aligned)
    weights: torch.Tensor                        # (L,) reweight factors (1 = unchanged)
    windows: list = field(default_factory=list)  # [(positions, start, end)] per-word cross windows


REFERENCE_BLEND_SIDE = 16          # the reference blends 16x16 maps (SD1.x at 512 px) with a 3x3 max-pool


@dataclass
class LocalBlendSpec:
    src_positions: list[int]
    tgt_positions: list[list[int]]               # per target
    threshold: float = 0.3
    start: float = 0.0
    # layers whose maps are blended: None = auto, the cross-attention level whose maps are closest to
    # the reference's 16x16 (ties: the finer); a selector picks them by hand (e.g. "1/4", the
    # reference's level at SD1.x 512 px)
    selector: LayerSelector | None = None
    # max-pool kernel of the maps: None = auto, the reference's 3 cells at 16x16 scaled to the blend
    # maps' side (1 at 8x8, 3 at 16x16, 5 at 32x32), so the dilation covers the same image fraction
    pool: int | None = None


def blend_sites(sites, latent_hw, selector: LayerSelector | None = None):
    """Cross-attention sites whose maps local blend sums, at this latent size."""
    if selector is not None:
        return sites_or_coarsest(sites, selector, latent_hw)
    cross = [s for s in sites if s.kind == "cross"]

    def distance(ds):             # |log2(map side / 16)|, ties to the finer level
        return abs(math.log2(max(min(latent_hw) / ds, 1e-6) / REFERENCE_BLEND_SIDE)), ds

    best = min({s.ds for s in cross}, key=distance)
    return [s for s in cross if s.ds == best]


def blend_pool(side: int, pool: int | None = None) -> int:
    """Odd max-pool kernel for blend maps of this side (3 at the reference's 16)."""
    if pool is not None:
        return int(pool)
    return 2 * int(round(side / REFERENCE_BLEND_SIDE)) + 1


class P2PController(Controller):
    """Cross- and self-attention control of Prompt-to-Prompt for [source, target_1..n] batches."""
    name = "prompt_to_prompt"
    kinds = frozenset({"self", "cross"})

    def __init__(self, targets: list[TargetEdit], cross_start: float = 0.0, cross_end: float = 0.8,
                 self_fraction: float = 0.4, self_selector: LayerSelector | None = None,
                 blend: LocalBlendSpec | None = None, prompt_len: int = 77):
        if not targets:
            raise AttentionControlError("target_prompts: give at least one target prompt")
        if not 0.0 <= cross_start <= cross_end <= 1.0:
            raise AttentionControlError(f"cross_replace: need 0 <= start <= end <= 1, got {cross_start}, {cross_end}")
        if not 0.0 <= self_fraction <= 1.0:
            raise AttentionControlError(f"self_replace: need a fraction in [0, 1], got {self_fraction}")
        self.targets = targets
        self.cross_start, self.cross_end = cross_start, cross_end
        self.self_fraction = self_fraction
        self.self_selector = self_selector or LayerSelector.parse("1/4,1/8,1/16")
        self.blend = blend
        self.prompt_len = prompt_len
        self.wraps_model = blend is not None
        self.last_blend_mask = None      # (n+1, 1, H, W) mask of the last step of the last run (inspection)

    # -- static selection: cross everywhere, self where the self selector allows
    def wants(self, site) -> bool:
        if site.kind == "cross":
            return True
        return self.self_selector.static_match(site)

    def wants_at(self, site, latent_hw) -> bool:
        if site.kind == "cross":
            return True
        return self.self_selector.match(site, latent_hw)

    def validate_sites(self, sites) -> None:
        select_sites(sites, LayerSelector(), "cross", input_name="prompt_to_prompt")

    def begin_run(self, run: Run) -> None:
        n = len(self.targets)
        if run.batch != n + 1:
            raise AttentionControlError(
                f"latent: Prompt-to-Prompt needs a latent batch of {n + 1} (source + {n} target(s)), got "
                f"{run.batch}. Use the latent output of the Prompt-to-Prompt node (or a batch of {n + 1} with "
                "shared noise) and its positive/negative conditioning.")
        S = run.n_steps
        L = self.prompt_len
        c0, c1 = cross_window(S, self.cross_start, self.cross_end)
        # a[t, target, token]: cross-replace weight of step t
        a = torch.zeros(S, n, L)
        a[c0:c1] = 1.0
        for ti, tgt in enumerate(self.targets):
            for positions, ws, we in tgt.windows:
                w0, w1 = cross_window(S, ws, we)
                col = torch.zeros(S)
                col[w0:w1] = 1.0
                a[:, ti, positions] = col[:, None]
        alpha = torch.stack([t.alpha for t in self.targets])          # (n, L)
        w = torch.stack([t.weights for t in self.targets])             # (n, L)
        mappers = torch.stack([t.mapper for t in self.targets])        # (n, L, L)
        d = run.data(self)
        d["a"], d["alpha"], d["w"], d["mappers"] = a, alpha, w, mappers
        d["self_steps"] = self_window(S, self.self_fraction)
        d["cache"] = {}
        if self.blend is not None:
            sites = blend_sites(run.router.sites, run.latent_hw, self.blend.selector)
            d["blend_keys"] = {s.key for s in sites}
            ds = min(s.ds for s in sites)
            d["blend_size"] = (run.latent_hw[0] // ds, run.latent_hw[1] // ds)
            d["blend_pool"] = blend_pool(min(d["blend_size"]), self.blend.pool)
            d["blend_sum"] = None
            d["blend_start"] = int(self.blend.start * S)

    # -- per step edit tensors, cached per (step, dtype, device)
    def _edit(self, d, step, dtype, device):
        key = (step, dtype, device)
        hit = d["cache"].get("edit")
        if hit is not None and hit[0] == key:
            return hit[1]
        a = d["a"][step]                                   # (n, L)
        c = d["alpha"] * d["w"] * a
        y = (1 - d["alpha"]) * d["w"] * a + (1 - a)
        X = d["mappers"] * c[:, None, :]                   # Mapper diag(c)
        no_own, no_edit = bool(torch.all(y == 0)), bool(torch.all(c == 0))
        passthrough = no_edit and bool(torch.all(y == 1))     # outside every window: plain attention
        val = (X.to(device=device, dtype=dtype), y.to(device=device, dtype=dtype), no_own, no_edit, passthrough)
        d["cache"]["edit"] = (key, val)
        return val

    def attend(self, q, k, v, call, nxt):
        d = call.run.data(self)
        chunks = call.cond_chunks()
        if not chunks:
            return nxt(q, k, v)
        B = call.batch
        n = B - 1
        if call.site.kind == "self":
            if call.step >= d["self_steps"]:
                return nxt(q, k, v)
            # q, k are this call's own projections (fresh tensors): overwrite the target rows in place
            # (query and key rows of each item: another patch may have folded tiles into the rows)
            for t_, rows in ((q, call.rows), (k, call.kv_rows)):
                t_rows = [r for j in chunks for t in range(n) for r in rows(j, 1 + t)]
                s_rows = [r for j in chunks for _ in range(n) for r in rows(j, 0)]
                t_[t_rows] = t_[s_rows]
            return nxt(q, k, v)
        src = [j * B for j in chunks]
        tgt = [j * B + 1 + t for j in chunks for t in range(n)]
        src_for_tgt = [j * B for j in chunks for _ in range(n)]
        # cross attention
        if self.blend is not None and call.site.key in d["blend_keys"]:
            self._accumulate_blend(q, k, call, d, src, tgt)
        X, y, no_own, no_edit, passthrough = self._edit(d, call.step, v.dtype, v.device)
        if passthrough:
            return nxt(q, k, v)
        L = self.prompt_len
        K = k.shape[1]
        if K % L:
            raise AttentionControlError(f"conditioning: {K} tokens is not a multiple of {L}")
        r = K // L
        v_t = v[tgt].view(len(chunks), n, r, L, -1)                      # (chunks, n, r, L, HD)
        own = None
        if not no_own:      # attn(Q_tgt, K_tgt, diag(y) V_tgt), before the target rows are overwritten
            yv = (v_t * y[None, :, None, :, None]).reshape(len(tgt), K, -1)
            own = call.attention(q[tgt], k[tgt], yv)
        if no_edit:
            out = nxt(q, k, v)
            out[tgt] = 0
        else:
            # q, k, v are this call's own projections: overwrite the target rows in place
            v[tgt] = torch.einsum("tij,ctrjd->ctrid", X, v_t).reshape(len(tgt), K, -1)
            q[tgt] = q[src_for_tgt]
            k[tgt] = k[src_for_tgt]
            out = nxt(q, k, v)
        if own is not None:
            out[tgt] += own
        return out

    def handles(self, call) -> bool:
        """Self-attention injection moves whole rows, so it works on rows folded by another patch
        (HyperTile) and on merged tokens (ToMe: the target takes the source's merged queries);
        cross-attention edits and local blend need the layer's own layout."""
        if call.site.kind == "self":
            return call.kv_fold >= 1
        return call.plain

    # -- local blend
    def _accumulate_blend(self, q, k, call, d, src, tgt):
        """Running sum of the blend words' maps: source row with the source words, each target row
        with its own words (cond chunks averaged), at the finest blend-layer resolution."""
        n = len(self.targets)
        b = self.blend
        maps = []
        for j, s in enumerate(src):
            cols_src = token_columns(b.src_positions, self.prompt_len, k.shape[1])
            maps.append(word_maps(q[s:s + 1], k[s:s + 1], call.site.heads, [cols_src]))
            for t in range(n):
                row = tgt[j * n + t]
                cols = token_columns(b.tgt_positions[t], self.prompt_len, k.shape[1])
                maps.append(word_maps(q[row:row + 1], k[row:row + 1], call.site.heads, [cols]))
        m = torch.cat(maps, 0).view(len(src), n + 1, call.h, call.w).mean(0)   # (n+1, h, w)
        m = F.interpolate(m[None], size=d["blend_size"], mode="bilinear", align_corners=False)[0]
        d["blend_sum"] = m if d["blend_sum"] is None else d["blend_sum"] + m

    def blend_mask(self, d, latent_hw) -> torch.Tensor | None:
        """(n+1, 1, H, W) mask of each item from the running sum of maps (source row first)."""
        s = d.get("blend_sum")
        if s is None:
            return None
        k = d.get("blend_pool", 3)
        m = s[:, None] if k <= 1 else F.max_pool2d(s[:, None], kernel_size=k, stride=1, padding=k // 2)
        m = F.interpolate(m, size=tuple(latent_hw), mode="nearest")
        m = m / m.flatten(1).max(dim=1).values.clamp_min(1e-12)[:, None, None, None]
        return (m > self.blend.threshold).float()

    def apply_model(self, apply, x, sigma, run, cond_or_uncond, options=None):
        d = run.data(self)
        step, _ = run.step_of(sigma)
        if step < d.get("blend_start", 0):
            return apply(x)
        # the input is blended with the maps so far; the output with this step's maps included, so
        # that the first blended step (no maps before its model call) is blended too, as in the
        # reference, which blends x_t after every step from the maps up to that step
        mask = self.blend_mask(d, x.shape[-2:])
        B = run.batch
        chunks = len(cond_or_uncond)

        def mix(t, mask):
            t = t.clone()
            for c in range(chunks):
                s = c * B
                for i in range(B - 1):
                    mm = torch.maximum(mask[0], mask[1 + i]).to(t.dtype)      # mask_src OR mask_tgt
                    t[s + 1 + i] = t[s] + mm * (t[s + 1 + i] - t[s])
            return t

        out = apply(x if mask is None else mix(x, mask))
        mask = self.blend_mask(d, x.shape[-2:])                # maps of this step included
        if mask is None:
            return out
        self.last_blend_mask = mask
        return mix(out, mask)

