"""Attention-map capture on DiT models (DAAM on joint attention; issue 17).

On a joint (text + image) attention call the word map of word w at image token i is the attention
probability mass that image query i puts on w's text keys, with the softmax over the FULL key set of
the joint sequence (text and image keys), averaged over heads; on Wan's text cross-attention the keys
are the text alone. Maps are taken on the cond rows only, accumulated as on UNets (running sums at
the model's token grid, optionally one per step), so memory does not grow with steps.

Never materialised: the (text + image)^2 probability matrix. A word's mass is the attention output
for a value matrix that is 1 on the word's key columns (see `joint_word_maps`): one fused attention
call (torch SDPA: the softmax normaliser is computed tile by tile inside the kernel) on the cond
rows' image queries gives all words at once. Any mask the call carries (Flux `attention_mask`,
Lumina caption padding) is applied as the host's attention applies it (bool: keep where True;
float: added to the scores).

Under region prompts (stacked in either order) the maps are what the model attends to: the
region rule's mask (`DitCall.controller_allow`) is applied with the host's, and the words are looked
up in the base prompt's part of the region conditioning's context.

Lumina 2's two encode nodes (CLIPTextEncode, CLIPTextEncodeLumina2 with a system prompt before the
prompt) give contexts of different lengths for the same prompt text: the controller takes the
words' positions in each (`variants`, attention/dit_regions.py `PromptVariant`) and uses, per model
call, those of the context length it sees; a positive that fits none is refused before sampling.

Video (Wan, HunyuanVideo, frames > 1): one map per latent frame, published as frames x items rows
(`AttentionMaps.frames`).

Families without word positions (HiDream: `DitRouter.word_positions_supported`) are refused with a
named error before the first step.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .capture import AttentionMaps, WordSpec, check_capture_config
from .core import AttentionControlError, Run
from .dit_regions import DIT_REGION_KEY, DitRegionTag, check_prompt_length, context_starts, variant_of
from .dit_router import DitCall, DitController, host_mask
from .maps import MapAccumulator, token_columns

__all__ = ["DitCaptureController", "joint_word_maps"]

# score elements (rows x heads x queries x keys) per attention call, were a backend to form them: 64 M
CHUNK_BUDGET = 64 * 1024 * 1024


def _query_mask(mask: torch.Tensor | None, q_rows: slice, n_q: int,
                allow: torch.Tensor | None = None) -> torch.Tensor | None:
    """The host's mask (bool: keep where True; float: added to the scores), broadcastable to
    (B, H, Nq, Nk) as the host broadcasts it, restricted to the query rows `q_rows`, and the other
    controllers' `allow` ((B, 1, len(q_rows), Nk) bool) on top."""
    m = host_mask(mask)
    if m is not None:
        if m.shape[-2] == n_q:
            m = m[..., q_rows, :]
        m = m if m.dtype == torch.bool else m.float()
    if allow is None:
        return m
    if m is None:
        return allow
    if m.dtype == torch.bool:
        return m & allow
    return m.expand(torch.broadcast_shapes(m.shape, allow.shape)).masked_fill(~allow, float("-inf"))


def joint_word_maps(q: torch.Tensor, k: torch.Tensor, q_rows: slice, columns: list[list[int]],
                    mask: torch.Tensor | None = None, chunk_budget: int = CHUNK_BUDGET,
                    allow: torch.Tensor | None = None) -> torch.Tensor:
    """Word maps of a (B, H, N, D) attention call: for each query in `q_rows`, the softmax mass over
    all keys of k that falls on each word's columns, mean over heads. float32 (B, W, len(q_rows)).

    The mass of word w is the attention output for a value matrix that is 1 on w's key columns and 0
    elsewhere, so one fused attention call (flash / memory-efficient SDPA: the scores exist one tile
    at a time) gives every word at once. The indicator values are padded to the head dimension D
    (the fused kernels need equal q / v widths; with fewer columns torch falls back to the math path,
    which forms the score matrix), D words per call. Queries go in chunks of at most `chunk_budget`
    score elements (B x H x chunk x K), a bound for backends without a fused kernel. `allow`: bool
    (B, 1, len(q_rows), K), the keys other controllers let each query see (False: masked out)."""
    b, h, n_all, d = q.shape
    kk = k.shape[2]
    qi = q[:, :, q_rows].float()
    n = qi.shape[2]
    kf = k.float()
    bias = _query_mask(mask, q_rows, n_all, allow)
    out = torch.zeros(b, len(columns), n, dtype=torch.float32, device=q.device)
    step = max(1, min(n, chunk_budget // max(b * h * kk, 1)))
    for w0 in range(0, len(columns), d):
        group = columns[w0:w0 + d]
        ind = torch.zeros(kk, d, dtype=torch.float32, device=q.device)
        for j, cols in enumerate(group):
            ind[cols, j] = 1.0
        v = ind.expand(b, h, kk, d)
        for a in range(0, n, step):
            z = min(a + step, n)
            m = None
            if bias is not None:
                m = bias[..., a:z, :] if bias.shape[-2] == n else bias
            o = F.scaled_dot_product_attention(qi[:, :, a:z], kf, v, attn_mask=m)      # (B, H, c, D)
            out[:, w0:w0 + len(group), a:z] = o[..., :len(group)].mean(dim=1).transpose(1, 2)
    return out


class DitCaptureController(DitController):
    """Per-word maps of a DiT model's image queries on the word keys (see the module docstring)."""
    name = "capture"
    streams = frozenset({"joint", "text_cross"})
    observer = True
    maps_fn = staticmethod(joint_word_maps)

    def __init__(self, words: list[WordSpec], prompt_len: int, handle: AttentionMaps, selector,
                 start: float = 0.0, end: float = 1.0, keep_steps: bool = False, chunk_budget: int = CHUNK_BUDGET,
                 cond_len: int | None = None, variants=()):
        check_capture_config(words, start, end)
        self.words = words
        self.prompt_len = int(prompt_len)
        self.handle = handle
        self.selector = selector
        self.start, self.end = start, end
        self.keep_steps = keep_steps
        self.chunk_budget = chunk_budget
        # rows of the CONDITIONING the prompt encodes to, where the model pads it further itself
        # (Flux.2 left-pads to 512 rows in extra_conds): the check before sampling uses these
        self.cond_len = int(cond_len or prompt_len)
        # other encodings of the prompt (PromptVariant: Lumina 2's system prompts), picked by context length
        self.variants = tuple(v for v in variants if len(v.positions) == len(self.words))

    def begin_run(self, run: Run) -> None:
        require = getattr(run.router, "require_word_positions", None)
        if require is not None:                 # HiDream: word maps need word key columns (a named error)
            require("the capture node")
        region_total = None
        # the positive only: maps are read on the cond rows (a negative prompt of any length is fine)
        for name in ("positive",):
            for c in run.conds.get(name, []) or []:
                ca = c.get("cross_attn") if isinstance(c, dict) else None
                tag = c.get(DIT_REGION_KEY) if isinstance(c, dict) else None
                if isinstance(tag, DitRegionTag):
                    # a Region Conditioning's context: the base prompt, then the regions' prompts
                    if tag.lengths[0] != self.cond_len:
                        raise AttentionControlError(
                            f"prompt: the capture node's prompt has {self.cond_len} context tokens but the base "
                            f"prompt of the Region Conditioning that feeds the sampler's {name} has "
                            f"{tag.lengths[0]}; connect the base prompt text to the capture node")
                    region_total = sum(tag.lengths)
                    continue
                if ca is not None and ca.ndim == 3:
                    check_prompt_length("the capture node", self.cond_len, self.variants, ca.shape[1],
                                        "connect the same prompt text to the capture node and to the text encoder "
                                        "that feeds the sampler", name)
        d = run.data(self)
        d["acc"] = None
        d["fired"] = {}
        d["labels"] = []
        d["frames"] = 1
        d["cols"] = {}
        d["region_total"] = region_total

    def _columns(self, call: DitCall, d, ctx: int) -> list[list[int]]:
        """Key columns of each word in a call whose context has `ctx` tokens."""
        total = d["region_total"]
        if total is not None:
            starts = context_starts(call.site.family, ctx, total)
            if starts is None:
                raise AttentionControlError(
                    f"prompt: a model call's context has {ctx} tokens, which cannot hold the region conditioning's "
                    f"{total}; connect the Region Conditioning output to the sampler directly")
            pad = self.prompt_len - self.cond_len          # Flux.2: positions count the model's left padding
            return [call.key_columns([s + p - pad for s in starts for p in w.positions]) for w in self.words]
        variant = variant_of(self.variants, self.prompt_len, ctx)
        if variant is not None:             # the positive came from another encoding of the prompt
            return [call.key_columns(list(p)) for p in variant.positions]
        try:
            return [call.key_columns(token_columns(w.positions, self.prompt_len, ctx)) for w in self.words]
        except ValueError as e:
            raise AttentionControlError(f"prompt: {e}") from None

    def attend(self, call: DitCall):
        run = call.run
        if run is None:
            return None
        d = run.data(self)
        n = run.n_steps
        if not (self.start * n <= call.step < self.end * n):
            return None
        chunks = call.cond_chunks()
        if not chunks or call.q_image is None or call.k_text is None:
            if call.q_image is None or call.k_text is None:
                run.router.warn_once(("capture-geometry", call.site.block),
                                     "attention_control: capture skips %s: its token layout differs from the model "
                                     "call's inputs (another patch added tokens)", call.site.label())
            return None
        ctx = call.geometry.context_len
        key = (ctx, call.k_text.start, call.site.stream)
        cols = d["cols"].get(key)
        if cols is None:
            cols = d["cols"][key] = self._columns(call, d, ctx)
        cond_rows = call.cond_rows()
        rows = torch.tensor(cond_rows, device=call.q.device)
        q = call.split_heads(call.q).index_select(0, rows)
        k = call.split_heads(call.k).index_select(0, rows)
        mask = call.mask
        if mask is not None and mask.ndim >= 3 and mask.shape[0] == call.q.shape[0]:
            mask = mask.index_select(0, rows)
        allow = call.controller_allow(cond_rows, call.q_image)     # region prompts' rule, where stacked
        m = self.maps_fn(q, k, call.q_image, cols, mask, self.chunk_budget, allow)  # (C*B, W, N_img)
        m = m.view(len(chunks), call.batch, *m.shape[1:]).mean(0)                      # (B, W, N_img)
        f, gh, gw = call.grid
        m = m.view(call.batch, len(cols), f, gh, gw).permute(0, 2, 1, 3, 4).reshape(call.batch * f, len(cols),
                                                                                     gh, gw)
        if d["acc"] is None:
            d["acc"] = MapAccumulator((gh, gw), keep_steps=self.keep_steps)
            d["frames"] = f
        d["acc"].add(m, call.step)
        lab = f"{call.site.block_type}:{call.site.block_index}"
        if lab not in d["fired"]:
            d["labels"].append(lab)
        d["fired"][lab] = d["fired"].get(lab, 0) + 1
        return None

    def end_run(self, run: Run, ok: bool) -> None:
        d = run.data(self)
        acc = d.get("acc")
        if not ok:
            return
        if acc is None:                       # a run that captured nothing: require() explains
            self.handle.publish(None, [], run.latent_hw, [], {})
            return
        self.handle.publish(acc.mean(), acc.step_means(), run.latent_hw, d["labels"], d["fired"], d["frames"])
