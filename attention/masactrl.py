"""MasaCtrl: mutual self-attention control (Cao et al. 2023, "MasaCtrl: Tuning-Free Mutual
Self-Attention Control for Consistent Image Synthesis and Editing"; reference code TencentARC/MasaCtrl).

Batch [source, target_1..n] sampled from the same noise. From step S on, in the self-attention of
the transformer blocks numbered L and later (blocks counted in forward order over the whole UNet:
SD1.x has 16, L = 10 is the decoder's two finest levels; SDXL has 70), each target's queries
attend to the SOURCE keys and values, in every CFG half:  attn(Q_tgt, K_src, V_src).
That is a row overwrite of K and V before the host's fused attention: no (HW x HW) matrix.

- mode "union": targets attend to the source and to themselves, attn(Q_tgt, [K_src; K_tgt], [V_src; V_tgt]).
- mask guidance: a foreground mask per item (the source's and each target's), either given or
  computed each step from the cross-attention of a chosen word (mean over the mask layers of the
  cond rows, min-max normalised, threshold 0.1). Target queries then attend to the source
  foreground and to the source background separately and the two outputs are mixed by the
  target's mask:  M_t * attn(Q_t, K_src[fg], V_src[fg]) + (1 - M_t) * attn(Q_t, K_src[bg], V_src[bg]).
  Gathering the foreground keys keeps the attention fused (no masked logits matrix).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .core import AttentionControlError, Controller, LayerSelector, Run, Site, select_sites, sites_or_coarsest
from .maps import normalize, token_columns, word_maps
from .validate import check_finite, check_range

SD1_BLOCKS, SDXL_BLOCKS = 16, 70
SD1_START_LAYER, SDXL_START_LAYER = 10, 54


def default_start_layer(sites) -> int:
    """SD1.x: 10 (the paper). SDXL (70 blocks): 54, the middle of the values the authors tried
    (44, 54, 64): half-way through the 32x32 decoder level, so that as with L = 10 in SD1.5 the
    layout-forming coarse blocks are left alone. Other models: the first block of the decoder's
    two finest attention levels."""
    n = len({s.order for s in sites})
    if n == SD1_BLOCKS:
        return SD1_START_LAYER
    if n == SDXL_BLOCKS:
        return SDXL_START_LAYER
    up = [s for s in sites if s.part == "up" and s.kind == "self"]
    if not up:
        return 0
    fine = sorted({s.ds for s in up})[:2]
    return min(s.order for s in up if s.ds in fine)


def resize_user_mask(masks: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """(n, H, W) user masks at a layer's h x w: nearest-neighbour sampling, as the reference
    (`F.interpolate` default mode), then foreground where the sampled value is above 0.5 (binary
    masks are unchanged by the threshold; soft ones are binarised as the reference's `mask == 1` /
    `mask == 0` tests need)."""
    m = F.interpolate(masks[:, None].to(torch.float32), size=(h, w), mode="nearest")[:, 0]
    return (m > 0.5).float()


@dataclass
class MaskSpec:
    """Mask guidance: word positions (source, per target) for automatic masks, or given masks
    (n_items, H, W) in [0, 1] (item 0 = source)."""
    src_positions: list[int] | None = None
    tgt_positions: list[list[int]] | None = None
    masks: torch.Tensor | None = None
    threshold: float = 0.1
    selector: LayerSelector = LayerSelector.parse("1/4")


class MasaCtrlController(Controller):
    name = "masactrl"

    def __init__(self, start_step: float = 4, start_layer: int | None = None, mode: str = "mutual",
                 mask: MaskSpec | None = None, prompt_len: int = 77):
        if mode not in ("mutual", "union"):
            raise AttentionControlError(f"mode: '{mode}' is not mutual or union")
        check_finite("start_step", start_step, "give a step count (>= 1) or a fraction of the steps (< 1)")
        if start_step < 0:
            raise AttentionControlError(f"start_step: {start_step} must be >= 0 (a step count, or a fraction < 1)")
        if mask is not None:
            check_range("mask_threshold", mask.threshold, 0.0, 1.0)
            if mask.masks is not None:
                check_finite("source_mask/target_mask", mask.masks, "fix the node that makes the mask")
        if mode == "union" and mask is not None:
            raise AttentionControlError("mode: union does not combine with mask guidance; use mutual with masks")
        if start_layer is not None and start_layer < 0:
            raise AttentionControlError(f"start_layer: {start_layer} must be >= 0 (or auto)")
        self.start_step = start_step
        self.start_layer = start_layer
        self.mode = mode
        self.mask = mask
        self.prompt_len = prompt_len
        self.auto_mask = mask is not None and mask.masks is None
        self.kinds = frozenset({"self", "cross"}) if self.auto_mask else frozenset({"self"})
        self._layer = start_layer if start_layer is not None else 0
        self.last_masks = None           # (n_items, H, W) masks of the last step (inspection)

    # -- selection
    def validate_sites(self, sites) -> None:
        self._layer = self.start_layer if self.start_layer is not None else default_start_layer(sites)
        n = len({s.order for s in sites})
        if self._layer >= n:
            raise AttentionControlError(
                f"start_layer: {self._layer} but this model has {n} transformer blocks (0..{n - 1})")

    def wants(self, site: Site) -> bool:
        if site.kind == "self":
            return site.order >= self._layer
        return self.auto_mask

    def wants_at(self, site: Site, latent_hw) -> bool:
        return self.wants(site)

    def begin_run(self, run: Run) -> None:
        if run.batch < 2:
            raise AttentionControlError(
                f"latent: MasaCtrl needs a batch of the source and at least one target, got a batch of {run.batch}. "
                "Use the latent and conditioning outputs of the MasaCtrl node (or a batch [source, target] with "
                "shared noise).")
        S = run.n_steps
        d = run.data(self)
        d["start"] = int(round(self.start_step * S)) if self.start_step < 1 else int(self.start_step)
        if d["start"] >= S:
            given = f"{self.start_step:g} of {S} steps" if self.start_step < 1 else f"{self.start_step:g}"
            raise AttentionControlError(
                f"start_step: {given} starts at step {d['start']}, but this run has {S} sampling step(s) "
                f"(0..{S - 1}), so MasaCtrl would never act; use a start_step below {S} (e.g. {max(S // 4, 0)}), "
                "a fraction < 1, or sample more steps")
        d["maps"] = {}
        d["prev"] = None
        if self.mask is not None:
            if self.mask.masks is not None:
                m = self.mask.masks
                if m.shape[0] not in (1, 2, run.batch):
                    raise AttentionControlError(
                        f"source_mask/target_mask: {m.shape[0]} masks for a batch of {run.batch}; give one mask "
                        "for the source and one for the target(s)")
                if m.shape[0] < run.batch:
                    m = torch.cat([m[:1], m[-1:].expand(run.batch - 1, -1, -1)], 0)
                at = resize_user_mask(m, *run.latent_hw)          # as the layers at the latent's size see it
                for i, name in ((0, "source_mask"), (min(1, m.shape[0] - 1), "target_mask")):
                    if not bool(at[i].any()):
                        raise AttentionControlError(
                            f"{name}: resized to this {run.latent_hw[0]}x{run.latent_hw[1]} latent the mask covers "
                            "no latent pixel (no value above 0.5); enlarge the painted subject")
                d["given"] = m.float()
            else:
                n_t = len(self.mask.tgt_positions or [])
                if n_t not in (1, run.batch - 1):
                    raise AttentionControlError(
                        f"mask words: {n_t} target word(s) for {run.batch - 1} target(s)")
                sites = sites_or_coarsest(run.router.sites, self.mask.selector, run.latent_hw)
                d["mask_keys"] = {s.key for s in sites}
        select_sites([s for s in run.router.sites if s.order >= self._layer], LayerSelector(), "self",
                     input_name="start_layer")

    # -- masks
    def _collect(self, q, k, call, d):
        B = call.batch
        cols_src = token_columns(self.mask.src_positions, self.prompt_len, k.shape[1])
        tp = self.mask.tgt_positions
        out = []
        for j in call.cond_chunks():
            row = []
            for i in range(B):
                cols = cols_src if i == 0 else token_columns(tp[min(i - 1, len(tp) - 1)], self.prompt_len, k.shape[1])
                r = j * B + i
                row.append(word_maps(q[r:r + 1], k[r:r + 1], call.site.heads, [cols])[0, 0])
            out.append(torch.stack(row))
        if not out:
            return
        m = torch.stack(out).mean(0).view(B, 1, call.h, call.w)
        cur = d["maps"].get(call.step)
        size = cur[0].shape[-2:] if cur is not None else (call.h, call.w)
        m = F.interpolate(m, size=tuple(size), mode="bilinear", align_corners=False) if tuple(size) != (call.h, call.w) else m
        if cur is None:
            if d["maps"]:
                d["prev"] = next(iter(d["maps"].values()))
            d["maps"] = {call.step: [m, 1]}
        else:
            cur[0] = cur[0] + m
            cur[1] += 1

    def _masks_at(self, call, d) -> torch.Tensor | None:
        """(B, h*w) masks in [0, 1] at this layer's size, or None (no guidance this call)."""
        if "given" in d:
            m = resize_user_mask(d["given"], call.h, call.w)[:, None]
        else:
            cur = d["maps"].get(call.step)
            src = cur if cur is not None else d["prev"]
            if src is None:
                return None
            m = normalize(src[0] / src[1])
            m = (m > self.mask.threshold).float()
            m = F.interpolate(m, size=(call.h, call.w), mode="nearest")
        self.last_masks = m[:, 0]
        return m.flatten(1)

    # -- attention
    def handles(self, call) -> bool:
        """Mutual self-attention without masks copies whole key / value rows: it acts on rows folded
        by another patch (HyperTile) and on merged queries (ToMe). Masks, union and the word maps
        need the layer's own layout."""
        if call.site.kind == "self" and self.mask is None and self.mode == "mutual":
            return call.kv_fold >= 1
        return call.plain

    def attend(self, q, k, v, call, nxt):
        d = call.run.data(self)
        if call.site.kind == "cross":
            if call.site.key in d.get("mask_keys", ()):
                self._collect(q, k, call, d)
            return nxt(q, k, v)
        if call.step < d["start"] or call.site.order < self._layer:
            return nxt(q, k, v)
        B = call.batch
        n_chunks = len(call.cond_or_uncond)
        src = [j * B for j in range(n_chunks) for _ in range(B - 1)]
        tgt = [j * B + i for j in range(n_chunks) for i in range(1, B)]
        masks = self._masks_at(call, d) if self.mask is not None else None
        if masks is not None and bool(torch.all(masks > 0.5)):
            masks = None                                   # all foreground: the unmasked edit
        if masks is None and self.mode == "mutual":
            # this call's own projections: overwrite the target rows in place (fused attention after);
            # a broadcast copy between views of each chunk, so no gathered temporary is built. Rows are
            # (chunk, item, fold): where another patch folded tiles into the rows (HyperTile), each
            # target tile takes the keys / values of the source's same tile.
            for t in (k, v):
                rows = t.unflatten(0, (n_chunks, B, call.kv_fold))
                rows[:, 1:].copy_(rows[:, :1].expand_as(rows[:, 1:]))
            return nxt(q, k, v)
        if masks is None:                                   # union
            kk = torch.cat([k[src], k[tgt]], dim=1)
            vv = torch.cat([v[src], v[tgt]], dim=1)
            t_out = call.attention(q[tgt], kk, vv)
        else:
            t_out = self._masked(q, k, v, call, masks, src, tgt)
        out = nxt(q, k, v)
        out[tgt] = t_out.to(out.dtype)
        return out

    def _masked(self, q, k, v, call, masks, src, tgt):
        B = call.batch
        fg_src = masks[0] > 0.5
        outs = []
        for s, t in zip(src, tgt):
            item = t % B
            parts = []
            for sel in (fg_src, ~fg_src):
                idx = sel.nonzero().flatten()
                if idx.numel() == 0:                        # empty side: attend to every source key
                    parts.append(call.attention(q[t:t + 1], k[s:s + 1], v[s:s + 1]))
                else:
                    parts.append(call.attention(q[t:t + 1], k[s:s + 1, idx], v[s:s + 1, idx]))
            m = masks[item].to(parts[0].dtype)[None, :, None]
            outs.append(parts[0] * m + parts[1] * (1 - m))
        return torch.cat(outs, 0)
