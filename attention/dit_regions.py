"""Region prompts and paint-with-words on DiT models (issue 17).

Region prompts by attention masks: Chen et al. 2024, "Training-free Regional Prompting for Diffusion
Transformers" (arXiv 2411.02395; reference code instantx-research/Regional-Prompting-FLUX). Each
region's prompt is encoded on its own and its tokens are appended to the context after the base
prompt's (`DitRegionTag.lengths`: base, region 1, ..., region n), so the model call's context is
longer; the attention of the calls that see that context is masked:

- image tokens of region i attend to the base prompt's tokens and to region i's tokens only (a token
  in several regions to all of theirs; a token in no region, the background, to the base alone);
- region i's tokens attend to themselves and to region i's image tokens;
- the base prompt's tokens (and other tokens: SD3 registers, caption padding, reference-image
  tokens) attend to everything;
- image to image: `image_attention="region"` (default, as Chen et al.): a region's image tokens
  attend to the image tokens of their own region(s), background tokens to the background; "full":
  every image token to every image token.
On Wan (text cross-attention: image queries, text keys) the same rule restricted to image -> text.
On Lumina 2 / Z-Image the text-only refiner calls get the text -> text part of the rule (region
tokens see their own region's tokens; the base prompt sees all). Image-only calls (Wan's and SD3.5's
image self-attention, Lumina's image refiner) are not masked.

Window and blocks. Inside [start, end) of the steps, the chosen blocks are masked and the others
attend to the whole (concatenated) context, as Chen et al.'s blocks without mask injection. Outside
the window every masked-kind call hides the region tokens (image and base tokens do not see them;
region tokens see only their own): the model then follows the base prompt alone, as Chen et al.
after their mask-injection steps. MultiDiffusion's bootstrapping (per-region latents) has no
counterpart here: there is one latent.

Paint-with-words: Balaji et al. 2022 (eDiff-I), Collage Diffusion (Sarukkai et al. 2023), the formula
of the UNet implementation (`regions.paint_logits`) on the image-query x word-key scores: eDiff-I adds
`w log(1 + sigma) max(Q K^T) sum_k s_k M_k [column in P_k]` to the unscaled scores, the maximum taken
over the cond rows' image-query x text-key scores (the DiT counterpart of the UNet's cross-attention
score tensor), before the 1/sqrt(d) scale and the softmax over all keys (text and image).

Execution. Region masks, on calls that carry no mask of their own (`execution="auto"`): the queries
fall into a few classes (base tokens, each region's tokens, the image tokens of each set of regions,
the background) whose members may all see the same keys; each class runs the host's attention once
on its queries and its allowed keys only, no mask (exactly the masked softmax; the masked-out pairs
are never computed, so no (text + image)^2 mask exists). Otherwise (a call with its own mask, more
than MAX_GROUPS classes, `execution="mask"`) and for paint-with-words: the bias goes to the host's
attention as an additive float mask (`DitCall.default(..., mask=...)`, added to the call's own),
built once per run and geometry for regions, where the materialised mask stays under `mask_budget`
elements (counting the copy per row and head that ComfyUI's sub-quadratic, split and basic
attention make of a broadcast mask, which the region mask is pre-expanded to avoid); else the
attention of the rows concerned is computed explicitly in query chunks (scores of one chunk
against all keys, at most `CHUNK_BUDGET` elements at a time).
Only the rows whose context carries the regions (cond rows for paint-with-words) are changed; the
other rows (uncond chunks, other conditioning entries) run the host's attention as before.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .core import AttentionControlError, Run
from .dit_router import DitCall, DitController, host_mask, model_call_geometry
from .layout import box_coverage
from .regions import PaintedPhrase, check_paint_config, mask_at
from .tiled import TILE_KEY, Span
from .validate import check_finite, check_range

__all__ = ["DIT_REGION_KEY", "DitRegionTag", "DitRegionController", "DitPaintController", "IMAGE_ATTENTION",
           "region_token_masks", "allowed_block", "query_groups", "biased_attention", "grouped_attention",
           "host_additive", "context_starts", "MAX_REGIONS", "PromptVariant", "variant_of", "check_prompt_length"]

# key of the region conditioning entry (a DitRegionTag)
DIT_REGION_KEY = "attention_control_dit_regions"
IMAGE_ATTENTION = ("region", "full")
MAX_REGIONS = 62                     # regions are bits of an int64 code
# elements of a bias / mask materialised for the host's attention (64 M: 256 MB in float32)
MASK_BUDGET = 64 * 1024 * 1024
# elements of one score block (rows x heads x query chunk x keys) in the explicit path
CHUNK_BUDGET = 8 * 1024 * 1024
THRESHOLD = 0.5                      # token-grid coverage from which an image token is in a region
MAX_GROUPS = 16                      # query classes of the grouped execution (more: the mask)
# ComfyUI attention functions that copy a mask once per head (reshape of an expanded mask)
_COPIES_MASK_PER_HEAD = frozenset({"attention_basic", "attention_sub_quad", "attention_split"})


@dataclass(frozen=True)
class DitRegionTag:
    """Marks the conditioning entry whose context is the base prompt followed by the regions'
    prompts: `lengths` are their context token counts, in that order."""
    owner: int
    lengths: tuple


# --------------------------------------------------------------------------------------------
# region masks at the token grid

def _describe(region) -> str:
    return region.describe() if hasattr(region, "describe") else repr(getattr(region, "prompt", region))


def region_token_masks(regions, grid: tuple, threshold: float = THRESHOLD) -> torch.Tensor:
    """(frames * rows * columns, G) bool: which image tokens each region covers at a token grid.

    A region's mask (H, W) of any size is resized to the grid (area average when shrinking, bilinear
    when growing; boxes by exact area coverage; their union with the mask by maximum) and taken
    where it reaches `threshold`. Video (frames > 1): one mask for all frames, or one per latent
    frame, or one per decoded frame (4 (frames - 1) + 1 for Wan's VAE: latent frame t takes the mean
    of frames 4t-3 .. 4t). Raises for a region that covers no token, and for a mask batch that fits
    none of those counts."""
    f, gh, gw = (int(v) for v in grid)
    out = []
    for i, r in enumerate(regions):
        where = f"regions: region {i + 1} {_describe(r)}"
        cov = torch.zeros(f, gh, gw)
        m = getattr(r, "mask", None)
        if m is not None:
            m = m.float()
            m = m[None] if m.ndim == 2 else m
            n = m.shape[0]
            per = torch.stack([mask_at(m[j], gh, gw).reshape(gh, gw) for j in range(n)]).clamp(0.0, 1.0)
            if n == 1:
                per = per.expand(f, gh, gw)
            elif f == 1:
                raise AttentionControlError(
                    f"{where}: has a batch of {n} masks, but this model samples single images; per-frame masks "
                    "are for video models (Wan): give one mask")
            elif n == 4 * (f - 1) + 1 and n != f:
                per = torch.stack([per[0]] + [per[4 * t - 3:4 * t + 1].mean(0) for t in range(1, f)])
            elif n != f:
                raise AttentionControlError(
                    f"{where}: has a batch of {n} masks, but the video has {f} latent frames ({4 * (f - 1) + 1} "
                    f"decoded frames); give one mask, {f} (one per latent frame) or {4 * (f - 1) + 1} (one per frame)")
            cov = torch.maximum(cov, per)
        for b in getattr(r, "boxes", ()) or ():
            cov = torch.maximum(cov, box_coverage(b, gh, gw)[None])
        on = cov >= threshold
        if not bool(on.any()):
            raise AttentionControlError(
                f"{where} covers no image token of this {gh}x{gw} token grid (coverage below {threshold:g} "
                "everywhere); enlarge its mask or box, or sample a larger image")
        out.append(on.reshape(-1))
    return torch.stack(out, 1)


# --------------------------------------------------------------------------------------------
# token classes of one sequence and the mask rule

@dataclass(frozen=True)
class Tokens:
    """Per token of a query or key sequence: `text` the region bit of a region's prompt token (region
    j: 1 << (j - 1); 0 for base prompt tokens and every other non-image token), `image` whether it is
    an image token, `member` the region bits of an image token (0: background)."""
    text: torch.Tensor     # (N,) int64
    image: torch.Tensor    # (N,) bool
    member: torch.Tensor   # (N,) int64


def _bits(member: torch.Tensor) -> torch.Tensor:
    """(N, G) bool -> (N,) int64 region bits."""
    w = 2 ** torch.arange(member.shape[1], dtype=torch.int64, device=member.device)
    return (member.to(torch.int64) * w).sum(1)


def crop_to_tile(t: torch.Tensor, piece, tile_grid: tuple, canvas_hw: tuple) -> torch.Tensor:
    """A per-image-token tensor of the canvas, (f * hc * wc, ...) at the canvas' token grid, cropped
    to a Tiled Diffusion piece (a crop of the latent on the patch grid; columns may wrap around):
    (f * gh * gw, ...) in the tile's token order. hc, wc: the canvas (H, W) over the patch, which is
    the piece's size over the tile's token grid."""
    f, gh, gw = (int(v) for v in tile_grid)
    patch = max(piece.rows.size // gh, 1)
    hc, wc = -(-int(canvas_hw[0]) // patch), -(-int(canvas_hw[1]) // patch)
    c = t.reshape((f, hc, wc) + tuple(t.shape[1:]))
    r0 = piece.rows.start // patch
    parts = [c[:, r0:r0 + gh, a:a + n] for a, _, n in Span(piece.cols.start // patch, gw).parts(wc)]
    return torch.cat(parts, dim=2).reshape((f * gh * gw,) + tuple(t.shape[1:]))


def canvas_grid(piece, tile_grid: tuple, canvas_hw: tuple) -> tuple:
    """The token grid of the whole canvas of a tiled model call."""
    f, gh, _ = (int(v) for v in tile_grid)
    patch = max(piece.rows.size // gh, 1)
    return (f, -(-int(canvas_hw[0]) // patch), -(-int(canvas_hw[1]) // patch))


def _tile_of_chunks(call: DitCall):
    """(pieces, chunks per piece, canvas (H, W)) of a tiled model call (Tiled Diffusion stacks its
    pieces' rows, piece-major), or ([None], all chunks, None)."""
    tile = call.transformer_options.get(TILE_KEY)
    pieces = list(tile["pieces"]) if isinstance(tile, dict) and tile.get("pieces") else [None]
    return pieces, max(len(call.cond_or_uncond) // len(pieces), 1), (tile["canvas"] if pieces[0] is not None
                                                                        else None)


def sequence_tokens(n: int, starts: list[int], part_bits: torch.Tensor, image: slice | None,
                    member_bits: torch.Tensor | None, device) -> Tokens:
    """Token classes of a sequence of n tokens: a copy of the region conditioning's context (whose
    token c carries `part_bits[c]`) starts at each sequence position of `starts`; every other
    non-image token (SD3's registers, caption or Flux.2 padding, reference images) is base-like."""
    t = torch.zeros(n, dtype=torch.int64, device=device)
    img = torch.zeros(n, dtype=torch.bool, device=device)
    mem = torch.zeros(n, dtype=torch.int64, device=device)
    bits = part_bits.to(device)
    for a in starts:
        b = min(a + bits.numel(), n)
        if b > a:
            t[a:b] = bits[:b - a]
    if image is not None and member_bits is not None:
        img[image] = True
        mem[image] = member_bits.to(device)
    return Tokens(t, img, mem)


def allowed_block(q: Tokens, k: Tokens, a: int, b: int, image_attention: str = "region",
                  regional: bool = True) -> torch.Tensor:
    """(b - a, K) bool: which keys the queries a..b-1 may attend to (see the module docstring).
    `regional` False: the rule outside the window (nobody but a region's own tokens sees them)."""
    qt, qm, qi = q.text[a:b], q.member[a:b], q.image[a:b]
    kt, km, ki = k.text, k.member, k.image
    k_region_text = kt != 0
    rt = qt != 0
    if not regional:
        allow = (~k_region_text)[None, :].expand(b - a, -1).clone()
        if bool(rt.any()):
            allow[rt] = kt[None, :] == qt[rt][:, None]
        return allow
    allow = torch.ones(b - a, kt.numel(), dtype=torch.bool, device=kt.device)
    if bool(rt.any()):
        code = qt[rt][:, None]
        allow[rt] = (kt[None, :] == code) | ((km[None, :] & code) != 0)
    if bool(qi.any()):
        code = qm[qi][:, None]
        k_free = ~ki & ~k_region_text
        ok = k_free[None, :] | ((kt[None, :] & code) != 0)
        if image_attention == "full":
            ok = ok | ki[None, :]
        else:
            same = (km[None, :] & code) != 0
            background = (code == 0) & (ki & (km == 0))[None, :]
            ok = ok | (ki[None, :] & (same | background))
        allow[qi] = ok
    return allow


# --------------------------------------------------------------------------------------------
# attention with an additive bias on some rows

def host_additive(mask: torch.Tensor | None, dtype) -> torch.Tensor | None:
    """A mask as the host's attention reads it, as an additive score bias (Bm, Hm, Nq or 1, Nk)."""
    m = host_mask(mask)
    if m is None:
        return None
    if m.dtype == torch.bool:
        return torch.zeros(m.shape, dtype=dtype, device=m.device).masked_fill(~m, float("-inf"))
    return m.to(dtype)


def _rows_of_mask(mask, idx: torch.Tensor, batch: int):
    """The host mask for the rows `idx` (a per-row mask is selected; a shared one kept)."""
    if mask is None or mask.ndim < 3 or mask.shape[0] != batch or batch == 1:
        return mask
    return mask.index_select(0, idx.to(mask.device))


def _seq_len(call: DitCall, t: torch.Tensor) -> int:
    return int(t.shape[2] if call.site.layout == "bhnd" else t.shape[1])


def _on_rows(call: DitCall, rows: list[int], mine_fn):
    """The call's output with the batch rows `rows` from `mine_fn(q, k, v, host_mask)` (those rows'
    tensors and mask) and the other rows from the host's attention, unchanged."""
    return _on_row_sets(call, [(rows, mine_fn)])


def _on_row_sets(call: DitCall, sets):
    """The call's output with each (rows, mine_fn) of `sets` computing its rows (see `_on_rows`) and
    the rows of no set running the host's attention unchanged."""
    q, k, v = call.q, call.k, call.v
    batch = int(q.shape[0])
    if len(sets) == 1 and len(sets[0][0]) == batch:
        return sets[0][1](q, k, v, call.mask)
    dev = q.device
    taken = {r for rows, _ in sets for r in rows}
    rest = [i for i in range(batch) if i not in taken]
    parts = []
    for rows, fn in sets:
        idx = torch.tensor(rows, device=dev, dtype=torch.long)
        parts.append((idx, fn(q.index_select(0, idx), k.index_select(0, idx), v.index_select(0, idx),
                              _rows_of_mask(call.mask, idx, batch))))
    if rest:
        idx = torch.tensor(rest, device=dev, dtype=torch.long)
        parts.append((idx, call.default(q.index_select(0, idx), k.index_select(0, idx), v.index_select(0, idx),
                                        mask=_rows_of_mask(call.mask, idx, batch))))
    first = parts[0][1]
    out = first.new_empty((batch,) + tuple(first.shape[1:]))
    for idx, o in parts:
        out.index_copy_(0, idx, o.to(out.dtype))
    return out


def biased_attention(call: DitCall, rows: list[int], block, fused: bool, chunk_budget: int = CHUNK_BUDGET):
    """The call's attention output with an additive bias on the scaled scores of the batch rows
    `rows`: `block(a, b)` gives the bias of queries a..b-1, broadcastable to (R, H, b - a, Nk), or None
    for none. fused: the whole bias (block(0, Nq)) goes to the host's attention as its mask (plus the
    call's own); else the rows' attention is computed in query chunks, scores of one chunk against
    all keys at a time. The other rows run the host's attention unchanged."""
    return _on_rows(call, rows, _biased(call, block, fused, chunk_budget))


def _biased(call: DitCall, block, fused: bool, chunk_budget: int):
    def mine(q, k, v, host):
        if fused:
            bias = block(0, _seq_len(call, q))
            h = host_additive(host, q.dtype)
            mask = host if bias is None else (bias if h is None else h + bias)
            return call.default(q, k, v, mask=mask)
        qh, kh, vh = (call.split_heads(t).float() for t in (q, k, v))
        r, heads, nq, d = qh.shape
        nk = kh.shape[2]
        hf = host_additive(host, torch.float32)
        kt = kh.transpose(-1, -2)
        o = torch.empty(r, heads, nq, vh.shape[-1], dtype=torch.float32, device=q.device)
        step = max(1, min(nq, chunk_budget // max(r * heads * nk, 1)))
        for a in range(0, nq, step):
            b = min(a + step, nq)
            sc = torch.matmul(qh[:, :, a:b], kt) * (d ** -0.5)
            bb = block(a, b)
            if bb is not None:
                sc = sc + bb
            if hf is not None:
                sc = sc + (hf if hf.shape[-2] == 1 else hf[..., a:b, :])
            o[:, :, a:b] = torch.matmul(torch.softmax(sc, dim=-1), vh)
            del sc
        return call.merge_heads(o.to(q.dtype))

    return mine


def grouped_attention(call: DitCall, rows: list[int], groups) -> torch.Tensor:
    """The call's attention with the rows `rows` attending, for each group (query indices, key
    indices), from those queries to those keys only: one host attention call per group on the
    gathered tokens, no mask (exactly the masked softmax of a mask that allows each group its keys).
    The other rows run the host's attention unchanged."""
    return _on_rows(call, rows, _grouped(call, groups))


def _grouped(call: DitCall, groups):
    tok = 2 if call.site.layout == "bhnd" else 1          # SD3's (B, N, H, D) v has its tokens at 1 too
    out_dim = 2 if call._kwargs.get("skip_output_reshape", False) else 1

    def mine(q, k, v, host):
        out = None
        for qi, ki in groups:
            o = call.default(q.index_select(tok, qi), k.index_select(tok, ki), v.index_select(tok, ki), mask=None)
            if out is None:
                shape = list(o.shape)
                shape[out_dim] = _seq_len(call, q)
                out = o.new_empty(shape)
            out.index_copy_(out_dim, qi, o)
        return out

    return mine


def query_groups(q: Tokens, k: Tokens, image_attention: str, regional: bool, max_groups: int):
    """The queries grouped by token class (all queries of a class attend to the same keys): a list
    of (query indices, allowed key indices); None when there are more than `max_groups` classes; []
    when no query is blocked from any key."""
    cls = torch.stack([q.text, q.member, q.image.to(torch.int64)], 1)
    uniq, inverse = torch.unique(cls, dim=0, return_inverse=True)
    if uniq.shape[0] > max_groups:
        return None
    groups, blocked = [], False
    for c in range(uniq.shape[0]):
        qi = (inverse == c).nonzero().flatten()
        r = int(qi[0])
        allow = allowed_block(q, k, r, r + 1, image_attention, regional)[0]
        blocked = blocked or not bool(allow.all())
        groups.append((qi, allow.nonzero().flatten()))
    return groups if blocked else []


def _copies_mask_per_head(call: DitCall) -> bool:
    """Whether the host's attention of this call is one that copies a broadcast mask once per row and
    head (ComfyUI's sub-quadratic, split and basic attention reshape the expanded mask)."""
    return call._override.prev is None and getattr(call._func, "__name__", "") in _COPIES_MASK_PER_HEAD


def _fits(call: DitCall, nq: int, nk: int, bias_rows: int, bias_heads: int, rows: int, budget: int) -> bool:
    """Whether a bias materialised for the host stays under `budget` elements (counting the per-row,
    per-head copy of the hosts that make one)."""
    per_head = _copies_mask_per_head(call)
    n = nq * nk * (rows * max(int(call.heads or 1), 1) if per_head else bias_rows * bias_heads)
    return n <= budget


# Flux.2's extra_conds left-pads a context shorter than this with zero tokens (ComfyUI 0.3.75
# model_base.Flux2): the prompt's tokens then sit at the end of the model's context
FLUX2_CONTEXT = 512


def context_starts(family: str, context_len: int, own_len: int) -> list[int] | None:
    """Where copies of a conditioning context of `own_len` tokens start in a model call's context of
    `context_len` tokens: [0] for the same length, one start per repetition where the host repeated
    it (UNet-style padding to a common multiple), [pad] after Flux.2's left padding; None if the
    context cannot hold it."""
    if context_len == own_len:
        return [0]
    if family == "Flux.2" and context_len == FLUX2_CONTEXT and own_len < FLUX2_CONTEXT:
        return [FLUX2_CONTEXT - own_len]
    if context_len % own_len == 0:
        return list(range(0, context_len, own_len))
    return None


@dataclass(frozen=True)
class PromptVariant:
    """Another encoding of a controller's prompt that the sampler's conditioning may come from:
    Lumina 2's CLIPTextEncodeLumina2 puts a system prompt and "<Prompt Start>" before the prompt
    (nodes/dit_tokens.py `prompt_variants`). `length`: its context tokens; `positions`: each word's
    (phrase's) context positions in it, in the controller's order."""
    label: str
    length: int
    positions: tuple


def variant_of(variants, own_len: int, context_len: int):
    """The variant a model call's context of `context_len` tokens comes from, or None for the
    controller's own encoding (`own_len` tokens, repeated or padded as `context_starts` says): an
    exact length match decides, the own encoding first."""
    if context_len == own_len:
        return None
    return next((v for v in variants if v.length == context_len), None)


def check_prompt_length(what: str, own_len: int, variants, length: int, fix: str, name: str = "positive") -> None:
    """A conditioning of `length` context tokens must hold `what`'s prompt (its own encoding of
    `own_len` tokens, possibly repeated, or one of its `variants`): else the named error, ending
    with `fix` (and the variants' encoders, where there are any)."""
    if length % own_len == 0 or any(v.length == length for v in variants):
        return
    others = "".join(f", {v.length} as {v.label}" for v in variants)
    if variants:
        fix += " (CLIPTextEncode, or " + " / ".join(v.label for v in variants) + ")"
    raise AttentionControlError(
        f"prompt: {what}'s prompt has {own_len} context tokens{others}, but the {name} conditioning has {length}; {fix}")


def _in_window(run: Run, step: int, start: float, end: float, first_step: bool = False) -> bool:
    """Whether a step is in [start, end) of the run's steps; `first_step`: step 0 is in even at end 0
    (the UNet paint-with-words window)."""
    n = run.n_steps
    return start * n <= step < (max(end * n, 1e-9) if first_step else end * n)


def _slice_key(s):
    return None if s is None else (s.start, s.stop)


def _stand_aside(call: DitCall, what: str) -> None:
    call.run.router.warn_once((what, "geometry", call.site.block, call.site.stream),
                              "attention_control: %s skips %s: its token layout differs from the model call's "
                              "inputs (another patch added tokens)", what, call.site.label())


def _require_word_positions(router, what: str) -> None:
    req = getattr(router, "require_word_positions", None)
    if req is not None:
        req(what)


# --------------------------------------------------------------------------------------------
# region prompts

class DitRegionController(DitController):
    """Attention-mask region prompts on a DiT model (see the module docstring). `regions`: objects
    with `mask` ((H, W), or (F, H, W) per frame) and/or `boxes`, and `describe()`; `lengths`: the
    context token counts of the base prompt and of each region's prompt, as the node concatenated
    them."""
    name = "region prompts"
    streams = frozenset({"joint", "text_cross", "text_refiner"})

    def __init__(self, regions, lengths, image_attention: str = "region", start: float = 0.0, end: float = 1.0,
                 selector=None, threshold: float = THRESHOLD, mask_budget: int = MASK_BUDGET,
                 chunk_budget: int = CHUNK_BUDGET, execution: str = "auto"):
        regions = tuple(regions or ())
        if not regions:
            raise AttentionControlError("regions: connect at least one Region Prompt")
        if len(regions) > MAX_REGIONS:
            raise AttentionControlError(f"regions: {len(regions)} regions; at most {MAX_REGIONS} on DiT models")
        lengths = tuple(int(n) for n in lengths)
        if len(lengths) != len(regions) + 1 or min(lengths) < 1:
            raise AttentionControlError(
                f"regions: {len(lengths)} context parts for {len(regions)} regions; the conditioning needs the base "
                "prompt's tokens and then each region's")
        if image_attention not in IMAGE_ATTENTION:
            raise AttentionControlError(
                f"image_attention: '{image_attention}' is not one of {', '.join(IMAGE_ATTENTION)}")
        check_range("start_percent", start, 0.0, 1.0)
        check_range("end_percent", end, 0.0, 1.0)
        if start > end:
            raise AttentionControlError(f"start_percent: {start:g} is above end_percent {end:g}; use start <= end")
        check_range("threshold", threshold, 0.0, 1.0)
        for i, r in enumerate(regions):
            if getattr(r, "mask", None) is not None:
                check_finite(f"regions: the mask of region {i + 1} {_describe(r)}", r.mask,
                             "fix the node that makes the mask")
        self.regions = regions
        self.lengths = lengths
        self.total = sum(lengths)
        self.image_attention = image_attention
        self.start, self.end = float(start), float(end)
        self.selector = selector
        self.threshold = float(threshold)
        self.mask_budget = int(mask_budget)
        self.chunk_budget = int(chunk_budget)
        if execution not in ("auto", "mask"):
            raise AttentionControlError(f"execution: '{execution}' is not auto or mask")
        self.execution = execution
        self.owner = id(self)
        self.part_bits = torch.cat([torch.full((n,), 0 if j == 0 else 1 << (j - 1), dtype=torch.int64)
                                    for j, n in enumerate(lengths)])

    def validate(self, router) -> None:
        _require_word_positions(router, "region prompts")
        super().validate(router)

    def wants(self, site) -> bool:
        # every call of a masked kind: outside the window and at unchosen blocks the controller
        # decides itself (see attend)
        return site.stream in self.streams

    def tag(self) -> DitRegionTag:
        return DitRegionTag(self.owner, self.lengths)

    def _ours(self, c) -> bool:
        t = c.get(DIT_REGION_KEY) if isinstance(c, dict) else None
        return isinstance(t, DitRegionTag) and t.owner == self.owner

    def begin_run(self, run: Run) -> None:
        conds = run.conds or {}
        positive = [c for c in conds.get("positive", []) or [] if self._ours(c)]
        if not positive:
            raise AttentionControlError(
                "positive: the sampler's positive conditioning does not come from this Region Conditioning node; "
                "connect its positive output (its context holds the regions' prompts) to the sampler")
        mine = [c for entries in conds.values() for c in (entries or []) if self._ours(c)]
        for c in mine:
            ca = c.get("cross_attn")
            if torch.is_tensor(ca) and ca.ndim == 3 and ca.shape[1] != self.total:
                raise AttentionControlError(
                    f"positive: the region conditioning's context has {ca.shape[1]} tokens, not the {self.total} "
                    f"({' + '.join(map(str, self.lengths))}) of its base and region prompts; another node changed it "
                    "(connect the Region Conditioning output to the sampler directly)")
        d = run.data(self)
        d["uuids"] = {c.get("uuid") for c in mine} - {None}
        d["members"] = {}
        d["masks"] = {}
        d["tokens"] = {}
        router = run.router
        g = model_call_geometry(router.family, router.dm, torch.empty(run.latent_shape, device="meta"),
                                torch.empty((1, self.total, 1), device="meta"))
        if g is not None:
            self._members(d, g.grid)           # errors (empty regions, frame counts) before the first step

    def _members(self, d, grid) -> torch.Tensor:
        got = d["members"].get(tuple(grid))
        if got is None:
            got = _bits(region_token_masks(self.regions, grid, self.threshold))
            d["members"][tuple(grid)] = got
        return got

    def _chunks(self, call: DitCall, d) -> list[int]:
        uuids = call.transformer_options.get("uuids")
        chunks = range(len(call.cond_or_uncond))
        if d["uuids"] and uuids and len(uuids) == len(call.cond_or_uncond) and any(u is not None for u in uuids):
            return [j for j in chunks if uuids[j] in d["uuids"]]          # the chunks of our conditioning
        return [j for j in chunks if call.cond_or_uncond[j] == 0]         # no entry ids: the cond chunks

    def _tile_members(self, d, grid, canvas, piece) -> torch.Tensor:
        """Inside a tiled model call: the region bits of the tile's image tokens, cropped from the
        canvas' token grid (tiles sit on the patch grid)."""
        key = ("tile", tuple(grid), piece, tuple(canvas))
        got = d["members"].get(key)
        if got is None:
            full = self._members(d, canvas_grid(piece, grid, canvas))
            got = d["members"][key] = crop_to_tile(full, piece, grid, canvas)
        return got

    def _run_layout(self, call: DitCall):
        """(the run's data, `_layout(call)`), or None where the call is not the controller's."""
        run = call.run
        if run is None:
            return None
        d = run.data(self)
        if "uuids" not in d:
            return None
        lay = self._layout(call, d)
        return None if lay is None else (d, lay)

    def attend(self, call: DitCall):
        got = self._run_layout(call)
        if got is None:
            return None
        d, (regional, starts, need_image, pieces, per_piece, canvas, chunks, key0, nq, nk) = got
        by_piece: dict = {}
        for j in chunks:
            by_piece.setdefault(min(j // per_piece, len(pieces) - 1), []).extend(range(call.chunk(j).start,
                                                                                       call.chunk(j).stop))
        sets = []
        for i, rows in by_piece.items():
            piece = pieces[i]
            fn = self._rows_fn(call, d, key0 + (piece,), rows, regional, starts, need_image, nq, nk,
                               piece=piece, canvas=canvas)
            if fn is not None:
                sets.append((rows, fn))
        if not sets:
            return None                                   # nothing blocked in this call: the host's own attention
        return _on_row_sets(call, sets)

    def _tokens(self, call, d, key, starts, need_image, nq, nk, piece=None, canvas=None):
        """The token classes (queries, keys) of a call's sequences, cached per geometry and crop."""
        tok = d["tokens"].get(key)
        if tok is None:
            g = call.geometry
            stream = call.site.stream
            members = None
            if need_image:
                members = self._members(d, g.grid) if piece is None else self._tile_members(d, g.grid, canvas, piece)
            off = g.word_offset if stream == "joint" else 0
            bits, dev = self.part_bits, call.q.device
            q_starts = [] if stream == "text_cross" else [call.q_text.start + off + s for s in starts]
            qt = sequence_tokens(nq, q_starts, bits, call.q_image, members, dev)
            kt = sequence_tokens(nk, [call.k_text.start + off + s for s in starts], bits, call.k_image, members, dev)
            tok = d["tokens"][key] = (qt, kt)
        return tok

    def _layout(self, call: DitCall, d):
        """What this call's rows need, or None where the controller leaves the call to the host:
        (regional, starts, need_image, pieces, per_piece, canvas, chunks, key0, nq, nk)."""
        chunks = self._chunks(call, d)
        if not chunks:
            return None
        run = call.run
        regional = _in_window(run, call.step, self.start, self.end)
        if regional and self.selector is not None and not self.selector.matches(
                call.site.block_type, call.site.block_index, call.site.depth):
            return None                                   # an unchosen block: the whole context
        g = call.geometry
        stream = call.site.stream
        need_image = stream in ("joint", "text_cross")
        if g is None or call.k_text is None or (need_image and call.q_image is None) or (
                stream != "text_cross" and call.q_text is None):
            _stand_aside(call, self.name)
            return None
        starts = context_starts(call.site.family, g.context_len, self.total)
        if starts is None:
            raise AttentionControlError(
                f"positive: a model call's context has {g.context_len} tokens, which cannot hold the region "
                f"conditioning's {self.total}; connect the Region Conditioning output to the sampler directly")
        # the rows by image crop: one set, or one per tile of a tiled model call (Tiled Diffusion)
        pieces, per_piece, canvas = _tile_of_chunks(call)
        nq, nk = _seq_len(call, call.q), _seq_len(call, call.k)
        key0 = (stream, nq, nk, _slice_key(call.q_text), _slice_key(call.q_image), _slice_key(call.k_text),
                _slice_key(call.k_image), g.context_len, g.word_offset, tuple(g.grid), regional, str(call.q.device))
        return regional, starts, need_image, pieces, per_piece, canvas, chunks, key0, nq, nk

    def allowed_keys(self, call: DitCall, rows: list[int], queries: slice | None = None):
        """The region rule as a bool (len(rows), 1, Nq, Nk) (the queries in `queries` only, when
        given) for the batch rows `rows` (capture reads it to map what the model attends to)."""
        got = self._run_layout(call)
        if got is None:
            return None
        d, (regional, starts, need_image, pieces, per_piece, canvas, chunks, key0, nq, nk) = got
        piece_of = {}
        for j in chunks:
            for r in range(call.chunk(j).start, call.chunk(j).stop):
                piece_of[r] = min(j // per_piece, len(pieces) - 1)
        if not any(r in piece_of for r in rows):
            return None
        a, b = (0, nq) if queries is None else (queries.start, queries.stop)
        out = torch.ones(len(rows), 1, b - a, nk, dtype=torch.bool, device=call.q.device)
        for i, r in enumerate(rows):
            if r not in piece_of:
                continue
            piece = pieces[piece_of[r]]
            akey = key0 + (piece, "allow", a, b)
            allow = d["masks"].get(akey)
            if allow is None:
                qt, kt = self._tokens(call, d, key0 + (piece,), starts, need_image, nq, nk, piece=piece, canvas=canvas)
                allow = d["masks"][akey] = allowed_block(qt, kt, a, b, self.image_attention, regional)
            out[i, 0] = allow
        return None if bool(out.all()) else out

    def _rows_fn(self, call, d, key, rows, regional, starts, need_image, nq, nk, piece=None, canvas=None):
        """What computes the rows of one image crop: None when nothing is blocked there."""
        qt, kt = self._tokens(call, d, key, starts, need_image, nq, nk, piece=piece, canvas=canvas)
        if call.mask is None and self.execution == "auto":
            gkey = key + ("groups",)
            if gkey not in d["masks"]:
                d["masks"][gkey] = query_groups(qt, kt, self.image_attention, regional, MAX_GROUPS)
            groups = d["masks"][gkey]
            if groups == []:
                return None
            if groups is not None:
                return _grouped(call, groups)
        heads = max(int(call.heads or 1), 1)
        fused = _fits(call, nq, nk, 1, 1, len(rows), self.mask_budget)
        per_head = fused and _copies_mask_per_head(call)
        mkey = key + (call.q.dtype, fused, (len(rows), heads) if per_head else None)
        if mkey not in d["masks"]:
            if fused:
                # the whole mask, once per run and geometry, in the layout the host reads without a copy
                allow = allowed_block(qt, kt, 0, nq, self.image_attention, regional)
                entry = None
                if not bool(allow.all()):
                    entry = torch.zeros(allow.shape, dtype=call.q.dtype, device=allow.device)
                    entry = entry.masked_fill_(~allow, float("-inf"))[None, None]
                    if per_head:
                        entry = entry.expand(len(rows), heads, nq, nk).contiguous()
                del allow
            else:
                step = max(1, self.chunk_budget // max(nk, 1))
                entry = any(not bool(allowed_block(qt, kt, a, min(a + step, nq), self.image_attention,
                                                   regional).all()) for a in range(0, nq, step))
            d["masks"][mkey] = entry
        entry = d["masks"][mkey]
        if entry is None or entry is False:
            return None

        def block(a, b):
            if fused:
                return entry
            allow = allowed_block(qt, kt, a, b, self.image_attention, regional)
            if bool(allow.all()):
                return None
            return torch.zeros(allow.shape, device=allow.device).masked_fill_(~allow, float("-inf"))[None, None]

        return _biased(call, block, fused, self.chunk_budget)

    def end_run(self, run: Run, ok: bool) -> None:
        run.data(self).clear()


# --------------------------------------------------------------------------------------------
# paint-with-words

class DitPaintController(DitController):
    """Paint-with-words on a DiT model's image-query x word-key scores (see the module docstring);
    the inputs are those of the UNet `PaintWithWordsController`."""
    name = "paint with words"
    streams = frozenset({"joint", "text_cross"})

    def __init__(self, phrases: list[PaintedPhrase], prompt_len: int, weight: float = 0.1, mode: str = "ediff-i",
                 s_pos: float = 1.0, s_neg: float = 1.0, selector=None, start: float = 0.0, end: float = 1.0,
                 mask_budget: int = MASK_BUDGET, chunk_budget: int = CHUNK_BUDGET, variants=()):
        check_paint_config(phrases, mode, start, end, weight, s_pos, s_neg)
        self.phrases = list(phrases)
        self.prompt_len = int(prompt_len)
        # other encodings of the prompt (PromptVariant: Lumina 2's system prompts), picked by context length
        self.variants = tuple(v for v in variants if len(v.positions) == len(self.phrases))
        self.weight = float(weight)
        self.mode = mode
        self.s_pos, self.s_neg = float(s_pos), float(s_neg)
        self.selector = selector
        self.start, self.end = float(start), float(end)
        self.mask_budget = int(mask_budget)
        self.chunk_budget = int(chunk_budget)
        self.off = (self.weight == 0.0 if mode == "ediff-i" else (self.s_pos == 0.0 and self.s_neg == 0.0)) or \
            all(p.strength == 0.0 for p in phrases)

    def validate(self, router) -> None:
        _require_word_positions(router, "paint-with-words")
        super().validate(router)

    def begin_run(self, run: Run) -> None:
        for c in (run.conds or {}).get("positive", []) or []:
            ca = c.get("cross_attn") if isinstance(c, dict) else None
            if torch.is_tensor(ca) and ca.ndim == 3:
                check_prompt_length("the paint-with-words node", self.prompt_len, self.variants, ca.shape[1],
                                    "use the node's conditioning output, or encode the same prompt text")
        d = run.data(self)
        d["cols"] = {}
        d["maps"] = {}

    def _row_maps(self, d, call: DitCall, rows: list[int]):
        """The painted columns and strengths, and per cond row the (n_image, U) eDiff-I weight map and
        collage mask of its image crop: (R, n_image, U) each, or (1, n_image, U) outside a tiled call."""
        pieces, per_piece, canvas = _tile_of_chunks(call)
        if pieces[0] is None:
            cols, wmap, cmask, cstr = self._columns(d, call, call.geometry.grid)
            return cols, wmap[None], cmask[None], cstr
        grid = call.geometry.grid
        piece_of = [min((r // call.batch) // per_piece, len(pieces) - 1) for r in rows]
        key = ("tiles", tuple(pieces[i] for i in piece_of), tuple(canvas), tuple(grid))
        got = d["maps"].get(key)
        if got is None:
            cols, wmap, cmask, cstr = self._columns(d, call, canvas_grid(pieces[0], grid, canvas))
            crop = {i: (crop_to_tile(wmap, pieces[i], grid, canvas), crop_to_tile(cmask, pieces[i], grid, canvas))
                    for i in set(piece_of)}
            got = (cols, torch.stack([crop[i][0] for i in piece_of]), torch.stack([crop[i][1] for i in piece_of]),
                   cstr)
            d["maps"][key] = got
        return got

    def _columns(self, d, call: DitCall, grid):
        """Unique painted key columns; per column the eDiff-I weight map sum_k s_k M_k (n_image, U) and
        the collage (strength, mask) of the last phrase painting it, at a token grid."""
        g = call.geometry
        key = (g.context_len, call.k_text.start, call.site.stream, tuple(grid))
        got = d["cols"].get(key)
        if got is None:
            f, gh, gw = grid
            cols, wmap, cmask, cstr = [], {}, {}, {}
            variant = variant_of(self.variants, self.prompt_len, g.context_len)
            starts = [0] if variant is not None else context_starts(call.site.family, g.context_len, self.prompt_len)
            if starts is None:
                raise AttentionControlError(
                    f"prompt: the conditioning has {g.context_len} tokens, which cannot hold the paint-with-words "
                    f"prompt's {self.prompt_len}; connect the node's positive output to the sampler, or encode the "
                    "same prompt text")
            for i, p in enumerate(self.phrases):
                where = p.positions if variant is None else variant.positions[i]
                pc = call.key_columns([a + int(pos) for a in starts for pos in where])
                m = mask_at(p.mask.float(), gh, gw).repeat(f)                 # frames share the mask
                for c in pc:
                    if c not in wmap:
                        cols.append(c)
                        wmap[c] = torch.zeros_like(m)
                    wmap[c] = wmap[c] + p.strength * m
                    cmask[c], cstr[c] = m, p.strength
            dev = call.q.device
            got = (torch.tensor(cols, device=dev), torch.stack([wmap[c] for c in cols], 1).to(dev),
                   torch.stack([cmask[c] for c in cols], 1).to(dev),
                   torch.tensor([cstr[c] for c in cols], device=dev, dtype=torch.float32))
            d["cols"][key] = got
        return got

    def _first_pass(self, qi, kt, cols, scale):
        """Max of the unscaled image-query x text-key scores (all rows and heads), and per (row, head,
        painted column) the max over image queries of the scaled scores; in query chunks."""
        r, h, n, _ = qi.shape
        step = max(1, min(n, self.chunk_budget // max(r * h * kt.shape[2], 1)))
        top_all = None
        top_col = None
        kT = kt.transpose(-1, -2)
        for a in range(0, n, step):
            s = torch.matmul(qi[:, :, a:a + step], kT)                          # (R, H, c, T) unscaled
            m = s.amax()
            top_all = m if top_all is None else torch.maximum(top_all, m)
            if self.mode == "collage":
                c = (s[..., cols] * scale).amax(dim=2)                          # (R, H, U)
                top_col = c if top_col is None else torch.maximum(top_col, c)
        return top_all, top_col

    def attend(self, call: DitCall):
        run = call.run
        if run is None or self.off:
            return None
        d = run.data(self)
        if "cols" not in d or not _in_window(run, call.step, self.start, self.end, first_step=True):
            return None
        rows = call.cond_rows()
        if not rows:
            return None
        if call.geometry is None or call.q_image is None or call.k_text is None:
            _stand_aside(call, self.name)
            return None
        cols, wmap, cmask, cstr = self._row_maps(d, call, rows)                 # maps (1 or R, N_img, U)
        idx = torch.tensor(rows, device=call.q.device)
        qh = call.split_heads(call.q.index_select(0, idx)).float()
        kh = call.split_heads(call.k.index_select(0, idx)).float()
        r, heads, nq, dh = qh.shape
        nk = kh.shape[2]
        scale = dh ** -0.5
        qi = qh[:, :, call.q_image]
        kt = kh[:, :, call.k_text]
        local = cols - call.k_text.start                                         # columns within the text keys
        top_all, top_col = self._first_pass(qi, kt, local, scale)
        sigma = max(float(call.sigma if call.sigma is not None else 0.0), 0.0)
        q0, q1 = call.q_image.start, call.q_image.stop
        if self.mode == "ediff-i":
            values = (self.weight * math.log1p(sigma)) * top_all * wmap * scale  # on the scaled logits
            values = values[:, None]                                            # (1 or R, 1, N_img, U)
            bias_rows, bias_heads = values.shape[0], 1
        else:
            gs = math.log(math.log(sigma + 1.01) + 1.0)
            sign = self.s_pos * cmask - self.s_neg * (1.0 - cmask)              # (1 or R, N_img, U)
            values = gs * top_col[:, :, None, :] * cstr * sign[:, None]          # (R, H, N_img, U)
            bias_rows, bias_heads = r, heads
        fused = _fits(call, nq, nk, bias_rows, bias_heads, len(rows), self.mask_budget)
        dt = call.q.dtype if fused else torch.float32

        def block(a, b):
            lo, hi = max(a, q0), min(b, q1)
            if lo >= hi:
                return None
            out = torch.zeros(values.shape[0], values.shape[1], b - a, nk, dtype=dt, device=call.q.device)
            out[:, :, lo - a:hi - a, cols] = values[:, :, lo - q0:hi - q0].to(dt)
            return out

        return biased_attention(call, rows, block, fused, self.chunk_budget)

    def end_run(self, run: Run, ok: bool) -> None:
        run.data(self).clear()
