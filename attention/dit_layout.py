"""Layout guidance on DiT models (Chen, Laina, Vedaldi 2023 on joint attention; issue 18).

The UNet controller's energy (attention/layout.py) on a DiT's word maps: for object k (box B_k,
phrase token columns P_k) and a guided call, with A the cond rows' image-query probabilities over
the FULL key set of the call (text and image keys of a joint sequence; text keys of Wan's text
cross-attention),

    E = 1 / (K L) * sum_calls sum_k mean_{i in P_k} mean_heads (1 - sum_{u in B_k} A[u, i] / sum_u A[u, i])^2

on the model's token grid (every frame of a video shares the box). Backward guidance moves the latent
as on UNets (`layout.descend`: x <- x - sigma^2 grad_x(strength * E) while E > threshold) for the
first fraction of the steps, in a positive-only forward that stops after the last guided call
(StopForward), and hands the move to the sampler in denoised form (`layout.guided_prediction`): any
sampler. Gradients flow through the inference-mode weights by reference (`grad.WeightReferences`),
whose norm-input copies keep the blocks' in-place residual writes (Flux, Chroma) out of autograd's
saved tensors.

Memory: only the phrase columns of A are formed, A[u, i] = exp(s[u, i] - lse_u); the row normaliser
lse over all keys is computed in query chunks whose scores are recomputed in the backward
(checkpointed), so a guided call holds one chunk of scores, never the (text + image)^2 matrix.

Forward guidance (no gradients): each phrase column of the cond rows' image queries moves toward a
smooth window over its box, keeping its mass over the image queries,
A'[:, i] = (1 - lam) A[:, i] + lam * g_k * sum_u A[u, i]. Linear in V: output + lam * (g_k (mass_i V_i)
- A[:, i] V_i) summed over the phrase columns; A[:, i] per head comes from one fused attention call
with one-hot values on the phrase columns (no score matrix).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .core import AttentionControlError, Run, StopForward
from .dit_router import DitCall, DitController, host_mask
from .grad import WeightReferences
from .layout import (LayoutConfig, box_cells, box_coverage, box_window, descend, guided_prediction, layer_energy,
                     step_carry)
from .maps import token_columns

__all__ = ["DitLayoutController", "phrase_probs", "DEFAULT_DIT_LAYERS"]

DEFAULT_DIT_LAYERS = "all"
CHUNK_BUDGET = 1024 * 1024          # score elements of one lse chunk (rows x heads x queries x keys): 4 MB


def _bias(mask, q_rows: slice, n_q: int, dtype):
    """The host's mask as an additive bias for the queries `q_rows`, or None."""
    m = host_mask(mask)
    if m is None:
        return None
    if m.shape[-2] == n_q:
        m = m[..., q_rows, :]
    if m.dtype == torch.bool:
        return torch.zeros(m.shape, dtype=dtype, device=m.device).masked_fill(~m, float("-inf"))
    return m.to(dtype)


def _lse(q: torch.Tensor, k: torch.Tensor, bias, scale: float) -> torch.Tensor:
    s = torch.matmul(q * scale, k.transpose(-1, -2))
    if bias is not None:
        s = s + bias
    return torch.logsumexp(s, dim=-1)


def phrase_probs(q: torch.Tensor, k: torch.Tensor, q_rows: slice, cols: list[int], mask=None,
                 chunk_budget: int = CHUNK_BUDGET) -> torch.Tensor:
    """Probabilities (B, H, len(q_rows), len(cols)) of the queries `q_rows` on the key columns `cols`,
    softmax over ALL keys of k (q, k: (B, H, N, D)), differentiable. The normaliser is
    computed in query chunks of at most `chunk_budget` score elements, recomputed in the backward.
    float32 (float64 for float64 inputs)."""
    b, h, n_all, d = q.shape
    kk = k.shape[2]
    scale = d ** -0.5
    dt = torch.promote_types(q.dtype, torch.float32)
    qi = q[:, :, q_rows].to(dt)
    kf = k.to(dt)
    n = qi.shape[2]
    bias = _bias(mask, q_rows, n_all, dt)
    step = max(1, min(n, chunk_budget // max(b * h * kk, 1)))
    parts = []
    for a in range(0, n, step):
        z = min(a + step, n)
        bc = None
        if bias is not None:
            bc = bias[..., a:z, :] if bias.shape[-2] == n else bias
        qc = qi[:, :, a:z]
        if torch.is_grad_enabled() and (qc.requires_grad or kf.requires_grad):
            parts.append(checkpoint(_lse, qc, kf, bc, scale, use_reentrant=False))
        else:
            parts.append(_lse(qc, kf, bc, scale))
    lse = torch.cat(parts, dim=2)                                                # (B, H, N)
    idx = torch.tensor(cols, device=q.device, dtype=torch.long)
    s = torch.matmul(qi, kf.index_select(2, idx).transpose(-1, -2)) * scale      # (B, H, N, P)
    if bias is not None:
        bb = bias.index_select(-1, idx)
        s = s + (bb if bb.shape[-2] == n else bb.expand(-1, -1, n, -1))
    return torch.exp(s - lse[..., None])


def column_probs_fused(call: DitCall, q, k, cols: list[int], mask) -> torch.Tensor:
    """(R, H, N_img, P) probabilities of the image queries on the columns `cols`, from fused
    attention calls with one-hot values (no score matrix; no gradients)."""
    b, h, _, d = q.shape
    kk = k.shape[2]
    qi = q[:, :, call.q_image]
    m = _bias(mask, call.q_image, q.shape[2], q.dtype)
    out = []
    for a in range(0, len(cols), d):
        group = cols[a:a + d]
        ind = torch.zeros(kk, d, dtype=q.dtype, device=q.device)
        for j, c in enumerate(group):
            ind[c, j] = 1.0
        o = F.scaled_dot_product_attention(qi, k, ind.expand(b, h, kk, d), attn_mask=m)
        out.append(o[..., :len(group)])
    return torch.cat(out, dim=-1).float()


class _DitPass:
    """One guidance forward: the energy of the guided calls (with gradients)."""

    def __init__(self, controller, last_call: int):
        self.controller = controller
        self.last_call = last_call
        self.energy = None
        self.layers = 0

    def __deepcopy__(self, memo):
        return self


class DitLayoutController(LayoutConfig, DitController):
    """Backward (gradient) and forward (attention-bias) layout guidance on DiT word maps."""
    name = "layout guidance"
    streams = frozenset({"joint", "text_cross"})
    wraps_guider = True

    def __init__(self, objects, prompt_len: int, selector, cond_len: int | None = None,
                 chunk_budget: int = CHUNK_BUDGET, **kw):
        super().__init__(objects, prompt_len, selector, **kw)
        if self.weights != "reference":
            raise AttentionControlError("weights: DiT layout guidance takes the weights by reference only")
        self.cond_len = int(cond_len or prompt_len)
        self.chunk_budget = int(chunk_budget)

    def _selectors(self):
        return ([self.selector] if self.backward_on or not self.forward_on else []) + \
            ([self.forward_selector] if self.forward_on else [])

    def validate(self, router) -> None:
        router.require_word_positions("layout guidance")
        for sel in self._selectors():
            if sel is not None:
                sel.select(router.blocks, input_name="layers")
        if self.backward_on and not self._scheduled(router, self.selector):
            raise AttentionControlError(
                f"layers: no {'/'.join(sorted(self.streams))} attention call of the {router.family} model is in the "
                "chosen blocks; choose blocks with text keys")

    def _scheduled(self, router, sel) -> list[int]:
        """Call numbers (per forward) of the schedule's calls this selector guides."""
        return [n for n, (bt, bi, st) in enumerate(router.schedule)
                if st in self.streams and (sel is None or sel.matches(bt, bi, router.depth.get((bt, bi))))]

    def wants(self, site) -> bool:
        if site.stream not in self.streams:
            return False
        return any(sel is None or sel.matches(site.block_type, site.block_index, site.depth)
                   for sel in self._selectors())

    def begin_run(self, run: Run) -> None:
        for c in run.conds.get("positive", []) or []:
            ca = c.get("cross_attn") if isinstance(c, dict) else None
            if ca is not None and ca.ndim == 3 and ca.shape[1] % self.cond_len != 0:
                raise AttentionControlError(
                    f"prompt: the layout node's prompt has {self.cond_len} context tokens but the positive "
                    f"conditioning has {ca.shape[1]}; connect the same prompt text to the layout node and to the "
                    "text encoder that feeds the sampler")
        d = run.data(self)
        calls = self._scheduled(run.router, self.selector)
        d["n_calls"] = len(calls)
        d["last"] = max(calls) if calls else -1
        d["n_guided"] = int(round(self.guided_fraction * run.n_steps))
        d["cache"] = {}
        d["energy_log"] = []

    def end_run(self, run: Run, ok: bool) -> None:
        self.last_energy_log = list(run.data(self).get("energy_log", []))

    def _objects(self, d, call: DitCall):
        g = call.geometry
        f, h, w = call.grid
        key = (g.context_len, call.k_text.start, call.site.stream, tuple(call.grid), str(call.q.device))
        got = d["cache"].get(key)
        if got is None:
            cells = box_cells if self.cells == "reference" else box_coverage
            got = []
            for o in self.objects:
                try:
                    cols = call.key_columns(token_columns(o.positions, self.prompt_len, g.context_len))
                except ValueError as e:
                    raise AttentionControlError(f"prompt: {e}") from None
                got.append((cols, cells(o.box, h, w, call.q.device).flatten().repeat(f),
                            box_window(o.box, h, w, call.q.device).flatten().repeat(f) / f))
            d["cache"][key] = got
        return got

    def _located(self, call: DitCall) -> bool:
        if call.q_image is None or call.k_text is None or call.geometry is None:
            call.run.router.warn_once(("layout-geometry", call.site.block, call.site.stream),
                                      "attention_control: layout guidance skips %s: its token layout differs from "
                                      "the model call's inputs (another patch added tokens)", call.site.label())
            return False
        return True

    # -- attention calls
    def attend(self, call: DitCall):
        run = call.run
        if run is None:
            return None
        d = run.data(self)
        if call.step >= d["n_guided"]:
            return None
        state = call.guidance
        if state is not None:
            return self._energy_call(call, d, state)
        if not self.forward_on or not self.forward_selector.matches(call.site.block_type, call.site.block_index,
                                                                   call.site.depth):
            return None
        if not call.cond_chunks() or not self._located(call):
            return None
        return self._forward_call(call, d)

    def _energy_call(self, call: DitCall, d, state: _DitPass):
        if not self.selector.matches(call.site.block_type, call.site.block_index, call.site.depth):
            return None
        if not self._located(call):
            return None
        q, k = call.split_heads(call.q), call.split_heads(call.k)
        objs = self._objects(d, call)
        allcols = [c for cols, _c, _w in objs for c in cols]
        uniq = list(dict.fromkeys(allcols))
        probs = phrase_probs(q, k, call.q_image, uniq, call.mask, self.chunk_budget)   # (R, H, N_img, U)
        local = [([uniq.index(c) for c in cols], cover) for cols, cover, _w in objs]
        e = layer_energy(probs, local)                                                     # (R,)
        e = e.view(-1, call.batch).sum(0)
        state.energy = e if state.energy is None else state.energy + e
        state.layers += 1
        out = call.default()
        if call.site.call_index >= state.last_call:
            raise StopForward()
        return out

    def _forward_call(self, call: DitCall, d):
        rows = call.cond_rows()
        idx = torch.tensor(rows, device=call.q.device)
        q = call.split_heads(call.q).index_select(0, idx)
        k = call.split_heads(call.k).index_select(0, idx)
        v = call.split_heads(call.v).index_select(0, idx)
        mask = call.mask
        if mask is not None and mask.ndim >= 3 and mask.shape[0] == call.q.shape[0] and mask.shape[0] > 1:
            mask = mask.index_select(0, idx)
        objs = self._objects(d, call)
        uniq = list(dict.fromkeys(c for cols, _c, _w in objs for c in cols))
        a = column_probs_fused(call, q, k, uniq, mask)                                   # (R, H, N_img, U)
        vf = v.float()
        delta = None
        for cols, _cover, window in objs:
            j = [uniq.index(c) for c in cols]
            ac = a[..., j]                                                                # (R, H, N, P)
            vp = vf[:, :, cols, :]                                                        # (R, H, P, D)
            mass = ac.sum(2, keepdim=True)                                                # (R, H, 1, P)
            dd = window[None, None, :, None] * torch.matmul(mass, vp) - torch.matmul(ac, vp)
            delta = dd if delta is None else delta + dd
        delta = self.forward_strength * delta
        out = call.default().clone()
        full = torch.zeros((len(rows),) + tuple(q.shape[1:3]) + (v.shape[-1],), dtype=out.dtype, device=out.device)
        full[:, :, call.q_image] = delta.to(out.dtype)
        out.index_add_(0, idx, call.merge_heads(full))
        return out

    # -- whole-step guidance
    def energy_fn(self, run: Run, passes):
        """x -> the (B,) box energy of a positive-only guidance forward at x (differentiable when x
        requires grad; call under torch.enable_grad outside inference mode)."""
        d = run.data(self)
        n_obj_layers = len(self.objects) * max(d["n_calls"], 1)

        def energy_at(xk):
            state = _DitPass(self, d["last"])
            with WeightReferences(norm_input_copies=True):
                passes.cond_pass(xk, state)
            if state.energy is None:
                raise AttentionControlError(
                    "layout guidance: the guided blocks were not reached in the guidance pass (another patch "
                    "changed the model call's tokens)")
            return state.energy / n_obj_layers
        return energy_at

    def guide(self, predict, x, sigma, run: Run, passes):
        d = run.data(self)
        step, sig = run.step_of(sigma)
        if not self.backward_on or step >= d["n_guided"] or d["last"] < 0:
            return predict(x)
        carry = step_carry(run, step)
        xk, log = descend(x, sig, self.iterations, self.strength, self.threshold, self.energy_fn(run, passes))
        d["energy_log"].append((step, log))
        return guided_prediction(predict, x, xk, carry)
