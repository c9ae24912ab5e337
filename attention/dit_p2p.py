"""Prompt-to-Prompt on DiT attention (Hertz et al. 2022, "Prompt-to-Prompt Image Editing with Cross
Attention Control"), on the joint (text + image) attention of MM-DiT models and on Wan's text
cross-attention; Video-P2P (Liu et al. 2023) on Wan as the same edit over a video latent. Issue 18.

Batch layout, as on UNets (attention/p2p.py): latent item 0 is the source, items 1..n the targets,
all from the same noise; edits touch the cond rows only (`DitCall.cond_chunks()`; guidance-distilled
models sample with cond chunks alone). Source rows and uncond rows run the host's attention on their
own tensors, in the same host call as the edited target rows (bit for bit what they get without
the controller).

What is edited. In a joint call the queries and keys are [text ; image] (the order is the family's,
`DitGeometry.order`) and one softmax runs over all keys, so an image query's probabilities split
into a text block A (image query x text key) and an image block B (image query x image key), with
A 1 + B 1 = 1 and output A V_text + B V_img. For a target row, with the source's blocks A_s, B_s:

    A' = A_s X + A_t diag(y)          (the UNet P2P cross-attention edit on the text columns)
    B' = B_s  during the self window,  B_t  otherwise
    X = Mapper diag(alpha * w * a),   y = (1 - alpha) * w * a + (1 - a)

Mapper: the replace mapper or the refine gather (attention/p2p.py), alpha the refine alignment,
w the reweight factors, a the cross window of this step per context token (per-word windows
override it). Text columns that are not context tokens (SD3's register tokens, Lumina 2 / Z-Image's
padding to a token multiple) are edited with the identity mapper and the global cross window.
As on UNets nothing is renormalised after the edit (reweight, refine).

Text-query rows (joint calls; also tokens that are neither text nor image, Kontext reference
images) keep the target's own attention: softmax(Q_t K_t^T) V_t over the target's own keys. They
carry the target prompt's text stream forward; only the image tokens take the source's layout.
Wan's text cross-attention has image queries alone (A is the whole row: the UNet formula as it is);
Wan's image self-attention (stream "image_self", also SD3.5's extra self-attention) gets the UNet
self-attention injection attn(Q_s, K_s, V_t) during the self window.

Fused pieces. Every edit is linear in V and both blocks of a row share one normaliser (that of the
softmax that produced them), so a fused attention call attn(Q, K, V~) = P_text V~_text + P_img V~_img
with a transformed V~ yields any mix of one row's two blocks:

    self window on:   O'_img = attn(Q_s, K_s, [X V_t,text ; V_t,img]) + attn(Q_t, K_t, [diag(y) V_t,text ; 0])
    self window off:  O'_img = attn(Q_s, K_s, [X V_t,text ; 0])       + attn(Q_t, K_t, [diag(y) V_t,text ; V_t,img])

(the first term is A_s X V_t,text (+ B_s V_t,img), the second A_t diag(y) V_t,text (+ B_t V_t,img)).
The first runs in the host's call over the whole batch, the target rows' q / k replaced by the
source's and their v by V~ (nothing is added: no extra call; the rows are swapped in the host's
own q / k / v and restored after the call, so the only copies are the target rows'); it is
skipped where X = 0 and the self window is off (the target's image rows are then the second term
alone). The second runs only where y != 0 or the self window is off, on the target rows' image
queries. The target rows'
text queries run as one more call on those queries alone (T x (T + N) scores per head). So the
replace edit inside both windows costs the host's call plus the small text-query call; the
identity edit (target prompt = source, replace) is then the source's own call on the same inputs:
the target rows equal the source rows bit for bit. Where both terms run (refine, reweight, the
self window off), the two fused calls reorder the sum A V = A_text V_text + A_img V_img, so the
target equals the formula within float tolerance (tests/test_dit_p2p.py checks the float64 naive
formula: explicit probabilities, edited, then @ V). No probability matrix is ever formed, except
the word maps of local blend (attention/dit_capture.joint_word_maps: fused, in query chunks).

Local blend: the blend words' maps (joint_word_maps: each row's own image queries on its own blend
words' key columns, softmax over all keys) are summed at the model's token grid over the blend
blocks and steps, per frame on video; the mask is the UNet one (attention/p2p.py: max-pool of
`blend_pool` cells at the grid's side, per item and frame normalised by its maximum, threshold, the
source's OR the target's) and the latent is blended with it by P2PController.apply_model.

Video-P2P on Wan: a 5-D latent [source video, target video] from the same noise; image tokens
cover every frame, so the edit (and the local-blend mask, per frame) applies to every frame.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .core import AttentionControlError, Run
from .dit_capture import joint_word_maps
from .dit_layers import DitLayerSelector
from .dit_router import DitCall, DitController, host_mask
from .p2p import LocalBlendSpec, P2PController, TargetEdit, blend_pool, cross_window, self_window

__all__ = ["DitP2PController"]


def _pick(t: torch.Tensor, ax: int, sl: slice) -> torch.Tensor:
    return t.narrow(ax, sl.start, sl.stop - sl.start)


def _token_matmul(X: torch.Tensor, t: torch.Tensor, ax: int) -> torch.Tensor:
    """X (R, T, T) applied to the tokens of t (R, ..., T on axis ax, ...): out[i] = sum_j X[i, j] t[j]."""
    tt = t.movedim(ax, 1)
    sh = tt.shape
    return torch.bmm(X, tt.reshape(sh[0], sh[1], -1)).reshape(sh).movedim(1, ax)


def _token_scale(y: torch.Tensor, t: torch.Tensor, ax: int) -> torch.Tensor:
    """diag(y) on the tokens of t: y (R, T)."""
    shape = [t.shape[0]] + [t.shape[i] if i == ax else 1 for i in range(1, t.ndim)]
    return t * y.reshape(shape)


class DitP2PController(DitController):
    """Prompt-to-Prompt for [source, target_1..n] batches on DiT models (see the module docstring).

    targets: one TargetEdit per target (mapper (C, C), alpha, weights (C,), per-word windows) over
    the C = `prompt_len` context positions of the prompts (nodes/dit_tokens.py positions).
    selector: blocks whose text columns are edited; self_selector: blocks whose image block is
    injected during the self window (both DitLayerSelector, default all blocks). blend: local
    blend (LocalBlendSpec; its selector, a DitLayerSelector, picks the blocks whose maps are summed:
    default the edit's blocks). cond_len: rows of the positive conditioning the prompts encode to
    (Flux.2 pads the context further inside the model), checked before the first step."""
    name = "prompt_to_prompt"
    streams = frozenset({"joint", "text_cross", "image_self"})

    def __init__(self, targets: list[TargetEdit], prompt_len: int, cross_start: float = 0.0, cross_end: float = 0.8,
                 self_fraction: float = 0.4, selector: DitLayerSelector | None = None,
                 self_selector: DitLayerSelector | None = None, blend: LocalBlendSpec | None = None,
                 cond_len: int | None = None):
        if not targets:
            raise AttentionControlError("target_prompts: give at least one target prompt")
        if not 0.0 <= cross_start <= cross_end <= 1.0:
            raise AttentionControlError(f"cross_replace: need 0 <= start <= end <= 1, got {cross_start}, {cross_end}")
        if not 0.0 <= self_fraction <= 1.0:
            raise AttentionControlError(f"self_replace: need a fraction in [0, 1], got {self_fraction}")
        C = int(prompt_len)
        for i, t in enumerate(targets):
            if tuple(t.mapper.shape) != (C, C) or t.alpha.shape != (C,) or t.weights.shape != (C,):
                raise AttentionControlError(
                    f"target_prompts (line {i + 1}): the edit covers {tuple(t.mapper.shape)} tokens, not the "
                    f"{C} context tokens of the prompt; encode every prompt with the same text encoder")
        if blend is not None and len(blend.tgt_positions) != len(targets):
            raise AttentionControlError("blend_target_words: give the blend words of every target prompt")
        self.targets = targets
        self.prompt_len = C
        self.cond_len = int(cond_len or C)
        self.cross_start, self.cross_end = cross_start, cross_end
        self.self_fraction = self_fraction
        self.selector = selector or DitLayerSelector.parse("all")
        self.self_selector = self_selector or DitLayerSelector.parse("all")
        self.blend = blend
        self.wraps_model = blend is not None
        self.last_blend_mask = None      # mask of the last blended step of the last run (inspection)

    # -- selection
    def _blend_selector(self):
        return (self.blend.selector if self.blend is not None and self.blend.selector is not None
                else self.selector)

    @staticmethod
    def _match(sel, site) -> bool:
        return sel.matches(site.block_type, site.block_index, site.depth)

    def wants(self, site) -> bool:
        if site.stream not in self.streams:
            return False
        if site.stream == "image_self":
            return self._match(self.self_selector, site)
        return (self._match(self.selector, site) or self._match(self.self_selector, site)
                or (self.blend is not None and self._match(self._blend_selector(), site)))

    def validate(self, router) -> None:
        router.require_word_positions("Prompt-to-Prompt")
        self.selector.select(router.blocks, input_name="prompt_to_prompt layers")
        self.self_selector.select(router.blocks, input_name="prompt_to_prompt self layers")
        if self.blend is not None:
            self._blend_selector().select(router.blocks, input_name="local blend layers")

    # -- run
    def begin_run(self, run: Run) -> None:
        n = len(self.targets)
        if run.batch != n + 1:
            raise AttentionControlError(
                f"latent: Prompt-to-Prompt needs a latent batch of {n + 1} (source + {n} target(s)), got "
                f"{run.batch}. Use the latent output of the Prompt-to-Prompt node (or a batch of {n + 1} with "
                "shared noise) and its positive/negative conditioning.")
        for c in run.conds.get("positive", []) or []:
            ca = c.get("cross_attn") if isinstance(c, dict) else None
            if ca is not None and ca.ndim == 3 and ca.shape[1] != self.cond_len:
                raise AttentionControlError(
                    f"positive: the Prompt-to-Prompt prompts encode to {self.cond_len} context tokens but the "
                    f"positive conditioning has {ca.shape[1]}; use the node's positive output")
        S, C = run.n_steps, self.prompt_len
        c0, c1 = cross_window(S, self.cross_start, self.cross_end)
        a = torch.zeros(S, n, C)                 # a[t, target, token]: cross-replace weight of step t
        a[c0:c1] = 1.0
        for ti, tgt in enumerate(self.targets):
            for positions, ws, we in tgt.windows:
                w0, w1 = cross_window(S, ws, we)
                col = torch.zeros(S)
                col[w0:w1] = 1.0
                a[:, ti, positions] = col[:, None]
        a0 = torch.zeros(S)                      # text columns that are not context tokens
        a0[c0:c1] = 1.0
        d = run.data(self)
        d["a"], d["a0"] = a, a0
        d["alpha"] = torch.stack([t.alpha.float() for t in self.targets])
        d["w"] = torch.stack([t.weights.float() for t in self.targets])
        d["mappers"] = torch.stack([t.mapper.float() for t in self.targets])
        d["self_steps"] = self_window(S, self.self_fraction)
        d["cache"] = {}
        d["fired"] = {}
        if self.blend is not None:
            d["blend_sum"] = None
            d["blend_start"] = int(self.blend.start * S)
            d["latent_shape"] = tuple(run.latent_shape)

    def _edit(self, d, step: int, T: int, off: int, dtype, device):
        """(X (n, T, T), y (n, T), no_edit, no_own, all_own) of this step for a call with T text
        columns, context token 0 at column `off`."""
        key = (step, T, off, dtype, device)
        hit = d["cache"].get(key)
        if hit is not None:
            return hit
        C, n = self.prompt_len, len(self.targets)
        if off + C > T:
            raise AttentionControlError(f"positive: a model call has {T} text tokens, fewer than the prompt's {C}")
        a = d["a"][step]
        c = d["alpha"] * d["w"] * a
        yc = (1 - d["alpha"]) * d["w"] * a + (1 - a)
        a0 = float(d["a0"][step])
        X = torch.eye(T).repeat(n, 1, 1) * a0
        y = torch.full((n, T), 1.0 - a0)
        X[:, off:off + C, off:off + C] = d["mappers"] * c[:, None, :]
        y[:, off:off + C] = yc
        val = (X.to(device=device, dtype=dtype), y.to(device=device, dtype=dtype), bool(torch.all(X == 0)),
               bool(torch.all(y == 0)), bool(torch.all(y == 1)))
        if len(d["cache"]) > 8:
            d["cache"].clear()
        d["cache"][key] = val
        return val

    # -- attention
    def attend(self, call: DitCall):
        run = call.run
        if run is None:
            return None
        d = run.data(self)
        if "a" not in d:
            return None
        chunks = call.cond_chunks()
        if not chunks or call.batch != len(self.targets) + 1:
            return None
        site = call.site
        if site.stream == "image_self":
            if call.step >= d["self_steps"] or call.q_image is None:
                return None
            return self._inject_self(call, d, chunks)
        if call.q_image is None or call.k_text is None or (site.stream == "joint" and call.q_text is None):
            run.router.warn_once(("p2p-geometry", site.block),
                                 "attention_control: Prompt-to-Prompt skips %s: its token layout differs from the "
                                 "model call's inputs (another patch added tokens)", site.label())
            return None
        ctx = call.geometry.context_len
        if ctx != self.prompt_len:
            run.router.warn_once(("p2p-context", ctx),
                                 "attention_control: Prompt-to-Prompt skips model calls whose context has %d tokens "
                                 "(its prompts have %d)", ctx, self.prompt_len)
            return None
        if self.blend is not None and self._match(self._blend_selector(), site):
            self._accumulate_blend(call, d, chunks)
        cross_on = self._match(self.selector, site)
        self_on = (site.stream == "joint" and call.step < d["self_steps"] and self._match(self.self_selector, site))
        T = call.k_text.stop - call.k_text.start
        off = call.geometry.word_offset if site.stream == "joint" else 0
        if cross_on:
            X, y, no_edit, no_own, all_own = self._edit(d, call.step, T, off, call.v.dtype, call.v.device)
        else:
            X = y = None
            no_edit, no_own, all_own = True, False, True
        if no_edit and all_own and not self_on:
            return None
        d["fired"][site.block] = d["fired"].get(site.block, 0) + 1
        return self._edited(call, chunks, X, y, no_edit, no_own, all_own, self_on)

    def _rows(self, call, chunks):
        B, n = call.batch, len(self.targets)
        dev = call.q.device
        tgt = torch.tensor([j * B + 1 + i for j in chunks for i in range(n)], device=dev)
        src = torch.tensor([j * B for j in chunks for _ in range(n)], device=dev)
        return tgt, src

    @staticmethod
    def _mask(call, rows=None, swap=None, queries=None):
        """The call's mask for a sub-call: batch rows `rows` (or the target rows swapped for the
        source's: `swap` = (tgt, src)), the queries of `queries`; ... where the call has none."""
        if call.mask is None:
            return ...
        m = host_mask(call.mask)
        nb = call.q.shape[0]
        if m.shape[0] == nb and nb > 1:
            if swap is not None:
                m = m.index_copy(0, swap[0], m.index_select(0, swap[1]))
            if rows is not None:
                m = m.index_select(0, rows)
        nq = call.q.shape[2] if call.site.layout == "bhnd" else call.q.shape[1]
        if queries is not None and m.shape[-2] == nq and nq > 1:
            m = _pick(m, m.ndim - 2, queries)
        return m

    def _inject_self(self, call, d, chunks):
        """Image self-attention (Wan, SD3.5): the targets take attn(Q_src, K_src, V_tgt)."""
        tgt, src = self._rows(call, chunks)
        d["fired"][call.site.block] = d["fired"].get(call.site.block, 0) + 1
        mask = self._mask(call, swap=(tgt, src))
        q, k = call.q, call.k
        if not self._writable(call):
            return call.default(q.index_copy(0, tgt, q.index_select(0, src)),
                                k.index_copy(0, tgt, k.index_select(0, src)), call.v, mask=mask)
        q_t, k_t = q.index_select(0, tgt), k.index_select(0, tgt)
        q.index_copy_(0, tgt, q.index_select(0, src))
        k.index_copy_(0, tgt, k.index_select(0, src))
        try:
            return call.default(q, k, call.v, mask=mask)
        finally:                                              # the host's tensors as they came
            q.index_copy_(0, tgt, q_t)
            k.index_copy_(0, tgt, k_t)

    @staticmethod
    def _writable(call) -> bool:
        """Whether the edit may swap rows of the call's own q / k / v in place (and restore them):
        plain inference tensors that are not one another; else it works on copies."""
        q, k, v = call.q, call.k, call.v
        if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
            return False
        if any(st == 0 and n > 1 for t in (q, k, v) for st, n in zip(t.stride(), t.shape)):
            return False                                      # broadcast (expanded) tensors
        keys = {(t.untyped_storage().data_ptr(), t.storage_offset()) for t in (q, k, v)}
        return len(keys) == 3

    def _edited(self, call, chunks, X, y, no_edit, no_own, all_own, self_on):
        site = call.site
        ax = 2 if site.layout == "bhnd" else 1
        tgt, src = self._rows(call, chunks)
        n_chunks = len(chunks)
        q, k, v = call.q, call.k, call.v
        ts = call.k_text
        joint = site.stream == "joint"
        rows = tgt.tolist()
        contiguous = rows == list(range(rows[0], rows[0] + len(rows)))
        q_t, k_t, v_t = (t.index_select(0, tgt) for t in (q, k, v))     # the target rows (copies)
        text = _pick(v_t, ax, ts)
        edit_piece = not no_edit or self_on
        own_piece = not no_own or (joint and not self_on)
        if edit_piece:
            # attn(Q_src, K_src, [X V_text ; V_img or 0]) in the host's call over the whole batch:
            # the target rows of q / k take the source's, those of v the edited values
            new_text = None if no_edit else _token_matmul(X.repeat(n_chunks, 1, 1), text, ax)
            mask = self._mask(call, swap=(tgt, src))
            if self._writable(call):
                q.index_copy_(0, tgt, q.index_select(0, src))
                k.index_copy_(0, tgt, k.index_select(0, src))
                for i, r in enumerate(rows):                  # v's target rows are V_t: edit them there
                    if not self_on:
                        v[r].zero_()
                    vr = _pick(v[r], ax - 1, ts)
                    if new_text is None:
                        vr.zero_()
                    else:
                        vr.copy_(new_text[i])
                del new_text
                try:
                    out = call.default(q, k, v, mask=mask)
                finally:                                      # the host's tensors as they came
                    q.index_copy_(0, tgt, q_t)
                    k.index_copy_(0, tgt, k_t)
                    v.index_copy_(0, tgt, v_t)
            else:
                v_edit = v_t.clone() if self_on else torch.zeros_like(v_t)
                vr = _pick(v_edit, ax, ts)
                if new_text is None:
                    vr.zero_()
                else:
                    vr.copy_(new_text)
                del new_text
                out = call.default(q.index_copy(0, tgt, q.index_select(0, src)),
                                   k.index_copy(0, tgt, k.index_select(0, src)),
                                   v.index_copy(0, tgt, v_edit), mask=mask)
                del v_edit
            del mask
        else:
            out = call.default()
        oax = 2 if out.ndim == 4 else 1
        qi = call.q_image if joint else slice(0, out.shape[oax])
        o_t = out.narrow(0, rows[0], len(rows)) if contiguous else out.index_select(0, tgt)
        o_img = _pick(o_t, oax, qi)
        if joint and edit_piece:
            # the target rows' other queries (text, Kontext references) keep their own attention
            nq = q.shape[ax]
            rest = [s for s in (slice(0, qi.start), slice(qi.stop, nq)) if s.stop > s.start]
            if len(rest) == 1:
                own_q = call.default(_pick(q_t, ax, rest[0]), k_t, v_t,
                                     mask=self._mask(call, rows=tgt, queries=rest[0]))
                _pick(o_t, oax, rest[0]).copy_(own_q)
            elif rest:
                own_q = call.default(q_t, k_t, v_t, mask=self._mask(call, rows=tgt))
                for s in rest:
                    _pick(o_t, oax, s).copy_(_pick(own_q, oax, s))
        if own_piece:
            # attn(Q_tgt, K_tgt, [diag(y) V_text ; V_img or 0]) on the target rows' image queries
            v_own = v_t                                       # v_t is not needed after this call
            scaled = None if y is None else _token_scale(y.repeat(n_chunks, 1), text, ax)
            if self_on:
                scaled = text.clone() if scaled is None else scaled
                v_own.zero_()
            if scaled is not None:
                text.copy_(scaled)
            del scaled
            q_own = _pick(q_t, ax, qi) if joint else q_t
            own = call.default(q_own, k_t, v_own, mask=self._mask(call, rows=tgt, queries=qi))
            if edit_piece:
                o_img.add_(own)
            else:
                o_img.copy_(own)
        elif not edit_piece:                                  # X = 0 and y = 0: nothing left of A
            o_img.zero_()
        if not contiguous:
            out.index_copy_(0, tgt, o_t)
        return out

    # -- local blend
    def _accumulate_blend(self, call, d, chunks):
        """Running sum of the blend words' maps at the token grid: the source row on the source's
        words, each target row on its own words (cond chunks averaged)."""
        b, B = self.blend, call.batch
        cols = [call.key_columns(b.src_positions)] + [call.key_columns(p) for p in b.tgt_positions]
        rows = call.cond_rows()
        idx = torch.tensor(rows, device=call.q.device)
        q = call.split_heads(call.q).index_select(0, idx)
        k = call.split_heads(call.k).index_select(0, idx)
        mask = call.mask
        if mask is not None and mask.ndim >= 3 and mask.shape[0] == call.q.shape[0]:
            mask = mask.index_select(0, idx)
        qi = call.q_image if call.site.stream == "joint" else slice(0, q.shape[2])
        m = joint_word_maps(q, k, qi, cols, mask)                         # (C*B, B words, N_img)
        m = m.view(len(chunks), B, B, -1).diagonal(dim1=1, dim2=2).mean(0).transpose(0, 1)   # (B, N_img)
        f, gh, gw = call.grid
        m = m.reshape(B, f, gh, gw)
        d["blend_sum"] = m if d["blend_sum"] is None else d["blend_sum"] + m

    def blend_mask(self, d, latent_hw=None) -> torch.Tensor | None:
        """(n+1, 1, H, W) mask per item (image latents) or (n+1, 1, T, H, W) (video latents: per
        frame) from the running sum of maps (source row first)."""
        s = d.get("blend_sum")
        if s is None:
            return None
        B, f, gh, gw = s.shape
        k = blend_pool(min(gh, gw), self.blend.pool)
        m = s[:, None]
        if k > 1:
            m = F.max_pool3d(m, kernel_size=(1, k, k), stride=1, padding=(0, k // 2, k // 2))
        shape = d["latent_shape"]
        video = len(shape) == 5
        m = F.interpolate(m, size=(shape[2] if video else f,) + tuple(shape[-2:]), mode="nearest")
        m = m / m.amax(dim=(-2, -1), keepdim=True).clamp_min(1e-12)
        m = (m > self.blend.threshold).float()
        return m if video else m[:, :, 0]

    apply_model = P2PController.apply_model
