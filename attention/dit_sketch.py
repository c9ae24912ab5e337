"""Sketch-guided text-to-image on DiT models (Voynov et al. 2022; attention/sketch.py for the method).

Features: the value projection of the image tokens of the first attention call with image keys (joint or
image self-attention) of each chosen block, from the DiT router's override slot (no monkeypatching). A value
row is a per-token linear image of the block's normed hidden state, the DiT counterpart of the UNet
features (values as on UNets). The token grid (rows x columns after patching) is resized (bilinear) to the
latent grid, so the predictor's output and the sketch's max-pooled edges live on the latent grid as on UNets. Video models
(Wan, HunyuanVideo): every frame is one item of the predictor (a predictor trained on images applies to
each frame) and every frame follows the sketch.

Default blocks (`auto`): four main blocks spread over the depth (the centre of each quarter), because a
DiT block's value is as wide as the model (3072 on Flux: every block of Flux would give the MLP 175k
inputs); `all`, block types, ranges and depth fractions choose others (attention/dit_layers.py).
"""
from __future__ import annotations

import torch

from .core import AttentionControlError, StopForward
from .dit_layers import DitLayerSelector
from .dit_router import DitCall, DitController
from .sketch import AUTO, FeaturePass, GuidanceMixin, SketchFeatures

STREAMS = frozenset({"joint", "image_self"})
AUTO_BLOCKS = 4


def feature_keys(router, text: str, input_name: str = "layers") -> list[tuple]:
    """(block_type, block_index, stream) of the first image self-attention call of each chosen block, in forward
    order."""
    text = (text or AUTO).strip()
    blocks = list(router.blocks)
    if text.lower() == AUTO:
        main = [b for b in blocks if b in router.depth]
        n = len(main)
        picked = sorted({min(n - 1, int((j + 0.5) * n / AUTO_BLOCKS)) for j in range(AUTO_BLOCKS)}) if n else []
        chosen = {main[i] for i in picked}
    else:
        chosen = set(DitLayerSelector.parse(text, input_name).select(blocks, input_name))
    keys, seen = [], set()
    for bt, bi, st in router.schedule:
        if (bt, bi) in chosen and st in STREAMS and (bt, bi) not in seen:
            seen.add((bt, bi))
            keys.append((bt, bi, st))
    if not keys:
        raise AttentionControlError(
            f"{input_name}: '{text}' chooses no block of the {router.family} model with image self-attention "
            f"(joint or image_self); choose other blocks")
    return keys


class DitSketchFeatures(DitController):
    """Hands the image-token value features of the chosen calls to a FeaturePass (only in guidance passes
    whose state is one of its own: in sampling forwards it acts on nothing)."""
    name = "sketch features"
    streams = STREAMS
    wraps_guider = True

    def __init__(self, layers: str = AUTO):
        self.layers = layers or AUTO
        self.keys: list[tuple] = []
        self.key_set: frozenset = frozenset()

    def validate(self, router) -> None:
        self.keys = feature_keys(router, self.layers)
        self.key_set = frozenset(self.keys)

    def feature_keys(self, model_patcher, latent_hw=None) -> list[tuple]:
        return list(self.keys)

    def wants(self, site) -> bool:
        return (site.block_type, site.block_index, site.stream) in self.key_set

    def attend(self, call: DitCall):
        state = call.guidance
        key = (call.site.block_type, call.site.block_index, call.site.stream)
        if not isinstance(state, FeaturePass) or key not in state.wanted:
            return None
        if call.k_image is None or call.grid is None:
            raise AttentionControlError(
                f"sketch guidance: {call.site.label()} has no image tokens where the model call's inputs put them "
                f"(another patch added tokens); the features cannot be read")
        f, h, w = call.grid
        vv = call.split_heads(call.v)[:, :, call.k_image]                    # (B, H, f h w, D)
        b, nh, _n, d = vv.shape
        feat = vv.permute(0, 1, 3, 2).reshape(b, nh * d, f, h, w).transpose(1, 2).reshape(b * f, nh * d, h, w)
        state.frames = f
        state.add(key, feat)
        if key == state.last_key:
            raise StopForward()
        return None

    weight_references = {"norm_input_copies": True}
    features_at = SketchFeatures.features_at


class DitSketchGuidance(GuidanceMixin, DitSketchFeatures):
    """Sketch guidance on a DiT (attention/sketch.py's SketchGuidance on these features)."""
    name = "sketch guidance"

    def __init__(self, predictor, edges, strength, start: float = 0.0, end: float = 0.5):
        DitSketchFeatures.__init__(self)
        self.init_guidance(predictor, edges, strength, start, end)

    def validate(self, router) -> None:
        have = {(bt, bi, st) for bt, bi, st in router.schedule}
        for blk, bid, stream, ch in self.predictor.sites:
            if (blk, bid, stream) not in have:
                raise AttentionControlError(
                    f"predictor: it was trained on a model with a {ch}-channel {stream} attention in {blk} block "
                    f"{bid}, which this {router.family} model does not have; train the predictor on this model")
        self.keys = self.predictor.keys
        self.key_set = frozenset(self.keys)
