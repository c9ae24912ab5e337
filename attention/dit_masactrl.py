"""MasaCtrl on DiT models (issue 18): mutual self-attention control on joint (text + image) and
image self-attention (Cao et al. 2023, "MasaCtrl: Tuning-Free Mutual Self-Attention Control for
Consistent Image Synthesis and Editing"; the UNet version is `masactrl.py`).

Batch [source, target_1..n] sampled from the same noise. From the start step on, in the blocks from
the start block on, each target's image queries read the SOURCE image tokens' keys and values, in
each CFG half (cond and uncond chunks alike: the source of a chunk is its item 0).

The rule per stream (rows are a target's; s is the source row of the same chunk):
- "image_self" (Wan's self-attention, SD3.5's extra image self-attention): attn(Q_t, K_s, V_s), the
  UNet rule. Wan's text cross-attention is untouched, so the target's prompt still steers it. One
  fused host call on the whole batch with the target rows of K and V rebuilt from the source's.
- "joint" (Flux, Flux.2, Chroma, SD3, Qwen-Image, Lumina 2 / Z-Image, HunyuanVideo, HiDream): the
  target's image queries attend to the joint key set of the TARGET's text keys and the SOURCE's image
  keys, with the matching values, one softmax over that set:
      O_t[img] = softmax(Q_t[img] [K_t[txt]; K_s[img]]^T / sqrt(d)) [V_t[txt]; V_s[img]]
  so the target's prompt still steers (its text keys compete in the same softmax) while appearance
  comes from the source. The target's text-query rows keep their own attention (the host's output on
  the target's own q, k, v), and so do the source rows. Run as ONE host call on the whole batch whose
  target rows carry the rebuilt keys and values (the sequences keep their token order: image key
  columns are the source's), plus one fused call for the target rows' text queries on their own
  keys; never explicit probabilities. Extra work per acting call: the targets' text queries once
  more (1 + text / (text + image) x targets / batch of the host's attention).
- mode "union" (as on UNets): the target's image queries attend to its own keys and the source's
  image keys: [K_t; K_s[img]] (joint) or [K_t; K_s] (image self), one softmax.

A host mask (Flux `attention_mask`, Lumina's caption padding) is carried along: a key column keeps the
mask entry of the row its key comes from.

Positions (RoPE, SD3's absolute embedding) are already in q / k when the override sees them, so the
source's keys carry the source's positions. That is the target's positions exactly when both come
from the same grid, which in one batch they always do (a tiled call's chunks are tiles of the same
canvas window for every item). What is refused: reference-image tokens among the sequence (Kontext /
Qwen-Image edit `reference_latents`: images of their own size and positions, neither the text nor the
generated image) are a named error before the first step; a call whose sequence is not exactly the
text and image tokens the model call's inputs imply (another patch added tokens, HunyuanVideo ByT5 /
vision tokens, HiDream E1's edit image) is stood aside from, logged once per block.

Blocks: `start_block` is a block index over the model's main blocks in forward order (refiners
excluded; Flux: the double blocks, then the single ones), or a depth fraction f in [0, 1) (a block
acts when its centre (k + 0.5) / n >= f, the `DitLayerSelector` rule). Default: fraction 1/3,
measured on the shapes-world DiT (2 double + 4 single blocks; 12 subjects, source and target from
different noise, start step 0.2): from 1/3 on (the single blocks) the target keeps its own layout
(0.3 px from where it lies alone, 4.3 px from the source's object) and takes the source's background
tone (gap 0.010 vs 0.032 alone, closer in 11/12); the blocks past 0.625 transfer it weakly (0.022);
every block copies the source's layout too (0.2 px from the source's object). On Flux dev (19 double
+ 38 single blocks) 1/3 is also where the single blocks start. `start_step`: a step count (>= 1) or a fraction of the steps (< 1),
as on UNets.

Mask guidance with given masks (the paper's foreground / background split; `masks` (n, H, W), item 0
the source's, then the target's, as the UNet node's source_mask / target_mask): each mask is resized to
the token grid as on UNets (`masactrl.resize_user_mask`: nearest, foreground above 0.5; the same mask on
every frame of a video), and a target's image queries attend twice, to its non-image keys with the
source's FOREGROUND image keys and with the source's BACKGROUND image keys, mixed per query by the
target's mask:  M_t * attn(Q_t[img], [K_t[txt]; K_s[fg]]) + (1 - M_t) * attn(Q_t[img], [K_t[txt]; K_s[bg]])
(two fused calls on gathered keys; an empty side attends to all source image keys; a source mask that is
all foreground is the unmasked edit). Masks from word maps are not implemented on DiTs.
"""
from __future__ import annotations

import torch

from .core import AttentionControlError, Run
from .dit_layers import DitLayerSelector, describe_blocks
from .dit_router import DitCall, DitController, DitRouter, host_mask
from .masactrl import resize_user_mask
from .validate import check_finite

__all__ = ["DitMasaCtrlController", "DEFAULT_START_FRACTION", "resolve_start_step"]

DEFAULT_START_FRACTION = 1.0 / 3.0      # measured on the shapes-world DiT (module docstring)
STREAMS = frozenset({"joint", "image_self"})
REFERENCE_KEYS = ("reference_latents", "ref_latents")


def resolve_start_step(start_step: float, n_steps: int) -> int:
    """The first step of a run of `n_steps` at which the control acts: a count (>= 1) or a fraction
    of the steps (< 1); a start at or past the run's steps is an error naming start_step."""
    start = int(round(start_step * n_steps)) if start_step < 1 else int(start_step)
    if start >= n_steps:
        given = f"{start_step:g} of {n_steps} steps" if start_step < 1 else f"{start_step:g}"
        raise AttentionControlError(
            f"start_step: {given} starts at step {start}, but this run has {n_steps} sampling step(s) "
            f"(0..{n_steps - 1}), so MasaCtrl would never act; use a start_step below {n_steps} "
            f"(e.g. {n_steps // 4}), a fraction < 1, or sample more steps")
    return start


def _seq(call: DitCall, sl: slice) -> tuple:
    """An index of q / k / v (the call's layout) that takes the tokens `sl` of every row."""
    return (slice(None),) * (2 if call.site.layout == "bhnd" else 1) + (sl,)


def _seq_dim(call: DitCall) -> int:
    return 2 if call.site.layout == "bhnd" else 1


class DitMasaCtrlController(DitController):
    """MasaCtrl on DiT attention (see the module docstring)."""
    name = "masactrl"
    streams = STREAMS

    def __init__(self, start_step: float = 4, start_block: int | float | None = None, mode: str = "mutual",
                 masks: torch.Tensor | None = None):
        if mode not in ("mutual", "union"):
            raise AttentionControlError(f"mode: '{mode}' is not mutual or union")
        if masks is not None:
            if mode == "union":
                raise AttentionControlError("mode: union does not combine with mask guidance; use mutual with masks")
            if not torch.is_tensor(masks) or masks.ndim != 3:
                raise AttentionControlError("source_mask/target_mask: give masks of shape (n, H, W)")
            check_finite("source_mask/target_mask", masks, "fix the node that makes the mask")
        check_finite("start_step", start_step, "give a step count (>= 1) or a fraction of the steps (< 1)")
        if start_step < 0:
            raise AttentionControlError(f"start_step: {start_step} must be >= 0 (a step count, or a fraction < 1)")
        if start_step >= 1 and float(start_step) != int(start_step):
            raise AttentionControlError(f"start_step: {start_step:g} is neither a step count (a whole number >= 1) "
                                        f"nor a fraction of the steps (< 1)")
        if start_block is None:
            start_block = DEFAULT_START_FRACTION
        if isinstance(start_block, bool) or not isinstance(start_block, (int, float)):
            raise AttentionControlError(f"start_layer: {start_block!r} is neither a block index nor a depth fraction")
        if isinstance(start_block, float):
            check_finite("start_layer", start_block, "give a block index (>= 0) or a depth fraction in [0, 1)")
            if not 0.0 <= start_block < 1.0:
                raise AttentionControlError(
                    f"start_layer: depth fraction {start_block:g} is outside [0, 1); give a fraction such as 0.5, "
                    "or a whole block index")
            self.selector = DitLayerSelector(fractions=((float(start_block), 1.0),), text=f"{start_block:g}-1.0")
        else:
            if start_block < 0:
                raise AttentionControlError(f"start_layer: {start_block} must be >= 0 (or -1 for auto at the node)")
            self.selector = None
        self.start_step = start_step
        self.start_block = start_block
        self.mode = mode
        self.masks = masks
        self._blocks = frozenset()

    # -- selection
    def validate(self, router: DitRouter) -> None:
        main = [b for b in router.blocks if b in router.depth]
        if isinstance(self.start_block, float):
            picked = [b for b in main if self.selector.matches(b[0], b[1], router.depth[b])]
            what = f"depth fraction {self.start_block:g} (block centres (k + 0.5) / {len(main)} >= it)"
        else:
            picked = [b for b in main if router.depth[b][0] >= self.start_block]
            what = f"block index {self.start_block}"
        streams = {s for t, i, s in router.schedule if (t, i) in set(picked)}
        if not picked or not streams & STREAMS:
            raise AttentionControlError(
                f"start_layer: {what} selects no block with self- or joint attention of this {router.family} "
                f"model, which has {len(main)} main blocks ({describe_blocks(main)}, numbered 0..{len(main) - 1} "
                f"in forward order); use a smaller index, or -1 for auto")
        self._blocks = frozenset(picked)

    def wants(self, site) -> bool:
        return site.stream in STREAMS and site.block in self._blocks

    def begin_run(self, run: Run) -> None:
        if run.batch < 2:
            raise AttentionControlError(
                f"latent: MasaCtrl needs a batch of the source and at least one target, got a batch of {run.batch}. "
                "Use the latent and conditioning outputs of the MasaCtrl node (or a batch [source, target] with "
                "shared noise).")
        for name, conds in (run.conds or {}).items():
            for c in conds or []:
                if isinstance(c, dict) and any(c.get(k) is not None for k in REFERENCE_KEYS):
                    raise AttentionControlError(
                        f"{name}: the conditioning carries reference latents (Kontext / edit reference images): "
                        "their tokens have positions of another image, so MasaCtrl on DiTs cannot pair them with the "
                        "source's; remove the ReferenceLatent from the MasaCtrl run")
        d = run.data(self)
        d["start"] = resolve_start_step(self.start_step, run.n_steps)
        d["fired"] = {}
        d["grid_masks"] = {}
        if self.masks is not None:
            m = self.masks
            if m.shape[0] not in (1, 2, run.batch):
                raise AttentionControlError(
                    f"source_mask/target_mask: {m.shape[0]} masks for a batch of {run.batch}; give one mask for the "
                    "source and one for the target(s)")
            if m.shape[0] < run.batch:
                m = torch.cat([m[:1], m[-1:].expand(run.batch - 1, -1, -1)], 0)
            at = resize_user_mask(m, *run.latent_hw)
            for i, name in ((0, "source_mask"), (1, "target_mask")):
                if not bool(at[i].any()):
                    raise AttentionControlError(
                        f"{name}: resized to this {run.latent_hw[0]}x{run.latent_hw[1]} latent the mask covers no "
                        "latent pixel (no value above 0.5); enlarge the painted subject")
            d["masks"] = m.float()

    # -- attention
    def _located(self, call: DitCall) -> bool:
        g = call.geometry
        if g is None or call.q_image is None or call.k_image is None:
            return False
        nq = call.q.shape[_seq_dim(call)]
        nk = call.k.shape[_seq_dim(call)]
        if call.site.stream == "image_self":
            return nq == nk == g.n_image
        return (call.q_text is not None and call.k_text is not None
                and nq == nk == g.text_len + g.n_image and call.v.shape[_seq_dim(call)] == nk)

    def _mask(self, call: DitCall, tgt: torch.Tensor, src: torch.Tensor, q_sel: slice | None):
        """The host mask for the target rows' call: rows of the targets, the query rows `q_sel`, image
        key columns from the source's rows (union: the source's image columns appended)."""
        m = host_mask(call.mask)
        if m is None:
            return ...
        nq = call.q.shape[_seq_dim(call)]
        if q_sel is not None and m.shape[-2] == nq:
            m = m[..., q_sel, :]
        kimg = (slice(None),) * (m.ndim - 1) + (call.k_image,)
        if m.shape[0] == 1:
            mt = ms = m
        else:
            mt, ms = m.index_select(0, tgt), m.index_select(0, src)
        if self.mode == "union":
            mt, ms = torch.broadcast_tensors(mt, ms)
            return torch.cat([mt, ms[kimg]], dim=-1)
        if ms is mt:
            return mt
        out = mt.clone()
        out[kimg] = ms[kimg]
        return out

    def attend(self, call: DitCall):
        run = call.run
        if run is None:
            return None
        d = run.data(self)
        if "start" not in d or call.step < d["start"]:
            return None
        B, n_chunks = call.batch, len(call.cond_or_uncond)
        if B < 2 or call.q.shape[0] != B * n_chunks:
            return None
        if not self._located(call):
            run.router.warn_once(("masactrl-geometry", call.site.block, call.site.stream),
                                 "attention_control: MasaCtrl skips %s: its tokens are not exactly the text and image "
                                 "tokens of the model call's inputs (another patch or a reference image added tokens)",
                                 call.site.label())
            return None
        dev = call.q.device
        tgt = torch.tensor([j * B + i for j in range(n_chunks) for i in range(1, B)], device=dev)
        src = torch.tensor([j * B for j in range(n_chunks) for _ in range(1, B)], device=dev)
        q, k, v = call.q, call.k, call.v
        sd = _seq_dim(call)
        joint = call.site.stream == "joint"
        lab = call.site.block
        d["fired"][lab] = d["fired"].get(lab, 0) + 1

        masks = self._token_masks(call, d) if "masks" in d else None
        if masks is not None:
            return self._masked(call, masks, tgt, src)
        if not joint and self.mode == "mutual":
            # every query of a target row reads the source's keys and values: one call on the batch
            k2, v2 = k.clone(), v.clone()
            k2[tgt] = k.index_select(0, src)
            v2[tgt] = v.index_select(0, src)
            m = host_mask(call.mask)
            if m is None or m.shape[0] == 1:
                m = ...
            else:
                m = m.clone()
                m[tgt] = m.index_select(0, src)
            return call.default(q, k2, v2, mask=m)

        if joint and self.mode == "mutual":
            return self._joint_mutual(call, tgt, src)
        out = call.default()
        img = _seq(call, call.k_image)
        kt, vt = k.index_select(0, tgt), v.index_select(0, tgt)
        ks, vs = k.index_select(0, src)[img], v.index_select(0, src)[img]
        if self.mode == "union":
            k2, v2 = torch.cat([kt, ks], dim=sd), torch.cat([vt, vs], dim=sd)
        else:
            k2, v2 = kt.clone(), vt.clone()
            k2[img], v2[img] = ks, vs
        q_sel = call.q_image if joint else slice(None)
        q2 = q.index_select(0, tgt)[_seq(call, q_sel)]
        o2 = call.default(q2, k2, v2, mask=self._mask(call, tgt, src, q_sel if joint else None))
        if out.ndim == 3:                                    # (B, N, H*D)
            out[tgt, q_sel] = o2.to(out.dtype)
        else:                                                # (B, H, N, D): skip_output_reshape
            out[tgt, :, q_sel] = o2.to(out.dtype)
        return out

    def _joint_mutual(self, call: DitCall, tgt: torch.Tensor, src: torch.Tensor):
        """Joint calls, mutual mode, in one host call on the whole batch whose target rows carry the
        source's image keys and values ([own text ; source image]: right for the targets' image
        queries), plus one call for the targets' text queries on their own keys (they keep their
        own attention): 1 + text / (text + image) x targets / batch of the host's attention."""
        q, k, v = call.q, call.k, call.v
        img = _seq(call, call.k_image)
        kt, vt = k.index_select(0, tgt), v.index_select(0, tgt)
        q_txt = q.index_select(0, tgt)[_seq(call, call.q_text)]
        own = call.default(q_txt, kt, vt, mask=self._own_mask(call, tgt, call.q_text))
        kt[img] = k.index_select(0, src)[img]
        vt[img] = v.index_select(0, src)[img]
        k2, v2 = k.index_copy(0, tgt, kt), v.index_copy(0, tgt, vt)
        del kt, vt
        m = host_mask(call.mask)
        if m is None:
            m = ...
        elif m.shape[0] > 1:
            kimg = (slice(None),) * (m.ndim - 1) + (call.k_image,)
            mt = m.index_select(0, tgt).clone()
            mt[kimg] = m.index_select(0, src)[kimg]
            m = m.index_copy(0, tgt, mt)
        out = call.default(q, k2, v2, mask=m)
        if out.ndim == 3:                                    # (B, N, H*D)
            out[tgt, call.q_text] = own.to(out.dtype)
        else:                                                # (B, H, N, D): skip_output_reshape
            out[tgt, :, call.q_text] = own.to(out.dtype)
        return out

    @staticmethod
    def _own_mask(call: DitCall, tgt: torch.Tensor, q_sel: slice):
        """The host mask of the target rows, for the queries `q_sel`; ... where the call has none."""
        m = host_mask(call.mask)
        if m is None:
            return ...
        nq = call.q.shape[_seq_dim(call)]
        if m.shape[-2] == nq:
            m = m[..., q_sel, :]
        return m if m.shape[0] == 1 else m.index_select(0, tgt)

    # -- mask guidance
    def _token_masks(self, call: DitCall, d) -> torch.Tensor | None:
        """(batch, n_image) masks in {0, 1} at the call's token grid (every frame the same); None where
        the source's mask is all foreground (the unmasked edit)."""
        f, gh, gw = call.grid
        m = d["grid_masks"].get(call.grid)
        if m is None:
            m = resize_user_mask(d["masks"], gh, gw)                      # (batch, gh, gw)
            m = d["grid_masks"][call.grid] = m[:, None].expand(-1, f, -1, -1).reshape(m.shape[0], -1)
        return None if bool((m[0] > 0.5).all()) else m.to(call.q.device)

    def _masked(self, call: DitCall, masks: torch.Tensor, tgt: torch.Tensor, src: torch.Tensor):
        sd = _seq_dim(call)
        nk = call.k.shape[sd]
        dev = call.q.device
        ki = call.k_image
        img = torch.arange(ki.start, ki.stop, device=dev)
        other = torch.cat([torch.arange(0, ki.start, device=dev), torch.arange(ki.stop, nk, device=dev)])
        q_sel = call.q_image
        q2 = call.q.index_select(0, tgt)[_seq(call, q_sel)]
        kt, vt = call.k.index_select(0, tgt), call.v.index_select(0, tgt)
        ks, vs = call.k.index_select(0, src), call.v.index_select(0, src)
        hm = host_mask(call.mask)
        if hm is not None:
            if hm.shape[-2] == call.q.shape[sd]:
                hm = hm[..., q_sel, :]
            mt, ms = (hm, hm) if hm.shape[0] == 1 else (hm.index_select(0, tgt), hm.index_select(0, src))
        fg = masks[0] > 0.5
        parts = []
        for sel in (fg, ~fg):
            cols = img[sel] if bool(sel.any()) else img                # an empty side: every source image key
            k2 = torch.cat([kt.index_select(sd, other), ks.index_select(sd, cols)], dim=sd)
            v2 = torch.cat([vt.index_select(sd, other), vs.index_select(sd, cols)], dim=sd)
            m2 = ...
            if hm is not None:
                a, b = torch.broadcast_tensors(mt, ms)
                m2 = torch.cat([a.index_select(-1, other), b.index_select(-1, cols)], dim=-1)
            parts.append(call.default(q2, k2, v2, mask=m2))
        out = call.default()
        mt_ = masks.index_select(0, torch.remainder(tgt, call.batch)).to(out.dtype)      # (R_t, n_image)
        if out.ndim == 3:
            mix = mt_[:, :, None] * parts[0] + (1 - mt_[:, :, None]) * parts[1]
            out[tgt, q_sel] = mix.to(out.dtype)
        else:
            mix = mt_[:, None, :, None] * parts[0] + (1 - mt_[:, None, :, None]) * parts[1]
            out[tgt, :, q_sel] = mix.to(out.dtype)
        return out
