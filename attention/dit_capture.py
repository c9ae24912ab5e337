"""Attention-map capture on DiT models (DAAM on joint attention; issue 17).

On a joint (text + image) attention call the word map of word w at image token i is the attention
probability mass that image query i puts on w's text keys, with the softmax over the FULL key set of
the joint sequence (text and image keys), averaged over heads; on Wan's text cross-attention the keys
are the text alone. Maps are taken on the cond rows only, accumulated as on UNets (running sums at
the model's token grid, optionally one per step), so memory does not grow with steps.

Never materialised: the (text + image)^2 probability matrix. Per query chunk we compute the scores
of the chunk against all keys (chunk x K per head, sized by `chunk_budget`), the row normaliser
(logsumexp over K) and keep only the asked words' columns: exp(s[:, cols] - lse), summed per word.
Any mask the call carries (Flux `attention_mask`, Lumina caption padding) is applied to the scores
as the host's attention applies it (bool: keep where True; float: added).

Video (Wan, frames > 1): one map per latent frame, published as frames x items rows
(`AttentionMaps.frames`).
"""
from __future__ import annotations

import torch

from .capture import AttentionMaps, WordSpec
from .core import AttentionControlError, Run
from .dit_router import DitCall, DitController
from .maps import MapAccumulator, token_columns

__all__ = ["DitCaptureController", "joint_word_maps"]

# elements of one score block (queries x keys x heads x rows) per chunk: 8 M floats = 32 MB
CHUNK_BUDGET = 8 * 1024 * 1024


def _additive(mask: torch.Tensor | None, dtype) -> torch.Tensor | None:
    """The host's mask as an additive score bias broadcastable to (B, H, Nq, Nk)."""
    if mask is None:
        return None
    m = mask
    if m.ndim == 2:
        m = m.unsqueeze(0)
    if m.ndim == 3:
        m = m.unsqueeze(1)
    if m.dtype == torch.bool:
        return torch.zeros(m.shape, dtype=dtype, device=m.device).masked_fill(~m, float("-inf"))
    return m.to(dtype)


def joint_word_maps(q: torch.Tensor, k: torch.Tensor, q_rows: slice, columns: list[list[int]],
                    mask: torch.Tensor | None = None, chunk_budget: int = CHUNK_BUDGET) -> torch.Tensor:
    """Word maps of a (B, H, N, D) attention call: for each query in `q_rows`, the softmax mass over
    all keys of k that falls on each word's columns, mean over heads. float32 (B, W, len(q_rows)).

    Scores are computed in query chunks of at most `chunk_budget` elements (B x H x chunk x K); the
    probability matrix is never formed beyond one chunk's word columns."""
    b, h, _, d = q.shape
    kk = k.shape[2]
    qi = q[:, :, q_rows]
    n = qi.shape[2]
    scale = d ** -0.5
    flat = [c for cols in columns for c in cols]
    owner = torch.tensor([w for w, cols in enumerate(columns) for _ in cols], device=q.device)
    bias = _additive(mask, torch.float32)
    kf = k.float()
    out = torch.zeros(b, len(columns), n, dtype=torch.float32, device=q.device)
    step = max(1, min(n, chunk_budget // max(b * h * kk, 1)))
    for a in range(0, n, step):
        z = min(a + step, n)
        s = torch.matmul(qi[:, :, a:z].float(), kf.transpose(-1, -2)) * scale          # (B, H, c, K)
        if bias is not None:
            rows = slice(q_rows.start + a, q_rows.start + z)
            bb = bias if bias.shape[-2] == 1 else bias[..., rows, :]
            s = s + bb
        lse = torch.logsumexp(s, dim=-1, keepdim=True)
        p = torch.exp(s[..., flat] - lse)                                               # (B, H, c, F)
        pw = torch.zeros(b, h, z - a, len(columns), dtype=torch.float32, device=q.device)
        pw.index_add_(-1, owner, p)
        out[:, :, a:z] = pw.mean(dim=1).transpose(1, 2)
        del s, p, pw
    return out


class DitCaptureController(DitController):
    """Per-word maps of a DiT model's image queries on the word keys (see the module docstring)."""
    name = "capture"
    streams = frozenset({"joint", "text_cross"})

    def __init__(self, words: list[WordSpec], prompt_len: int, handle: AttentionMaps, selector,
                 start: float = 0.0, end: float = 1.0, keep_steps: bool = False, chunk_budget: int = CHUNK_BUDGET):
        if not words:
            raise AttentionControlError("words: give at least one word of the prompt (comma-separated)")
        if not 0.0 <= start < end <= 1.0:
            raise AttentionControlError(
                f"start_percent/end_percent: need 0 <= start < end <= 1, got {start} and {end}")
        self.words = words
        self.prompt_len = int(prompt_len)
        self.handle = handle
        self.selector = selector
        self.start, self.end = start, end
        self.keep_steps = keep_steps
        self.chunk_budget = chunk_budget

    def begin_run(self, run: Run) -> None:
        for name in ("positive", "negative"):
            for c in run.conds.get(name, []) or []:
                ca = c.get("cross_attn") if isinstance(c, dict) else None
                if ca is not None and ca.ndim == 3 and ca.shape[1] % self.prompt_len != 0:
                    raise AttentionControlError(
                        f"prompt: the capture node's prompt has {self.prompt_len} context tokens but the {name} "
                        f"conditioning has {ca.shape[1]}; connect the same prompt text to the capture node and to "
                        "the text encoder that feeds the sampler")
        d = run.data(self)
        d["acc"] = None
        d["fired"] = {}
        d["labels"] = []
        d["frames"] = 1
        d["cols"] = {}

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
            try:
                cols = [call.key_columns(token_columns(w.positions, self.prompt_len, ctx)) for w in self.words]
            except ValueError as e:
                raise AttentionControlError(f"prompt: {e}") from None
            d["cols"][key] = cols
        rows = torch.tensor(call.cond_rows(), device=call.q.device)
        q = call.split_heads(call.q).index_select(0, rows)
        k = call.split_heads(call.k).index_select(0, rows)
        mask = call.mask
        if mask is not None and mask.ndim >= 3 and mask.shape[0] == call.q.shape[0]:
            mask = mask.index_select(0, rows)
        m = joint_word_maps(q, k, call.q_image, cols, mask, self.chunk_budget)         # (C*B, W, N_img)
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
