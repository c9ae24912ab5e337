"""Nodes: AttnCtl_PaintWithWords."""
from __future__ import annotations

from comfy_api.latest import io

from ..attention.core import AttentionControlError, LayerSelector
from ..attention.layout import boxes_to_masks
from ..attention.regions import PaintedPhrase, PaintWithWordsController
from ..attention.router import attach
from ..attention.tokens import parse_word_list
from .common import CATEGORY, resolve_words
from .layout import BoxesType
from .p2p import _float, _parse_pairs


class PaintWithWords(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="AttnCtl_PaintWithWords",
            display_name="Paint with Words",
            category=f"{CATEGORY}/regions",
            description="eDiff-I paint-with-words: phrases of the prompt are painted onto regions (boxes or masks) "
                        "by biasing their cross-attention logits there (cond rows only, masks resized per layer). "
                        "The collage mode adds Collage Diffusion's inside/outside bias.",
            inputs=[
                io.Model.Input("model", tooltip="The model (cloned; the input stays unpatched)."),
                io.Clip.Input("clip", tooltip="The CLIP of the model: encodes the prompt, finds the phrases."),
                io.String.Input("prompt", multiline=True, default="",
                                tooltip="The positive prompt; sample with this node's conditioning output."),
                io.Combo.Input("mode", options=["ediff-i", "collage"], default="ediff-i",
                               tooltip="ediff-i: + w log(1+sigma) max(QK^T) inside the region; collage: + inside, "
                                       "- outside, scaled by each painted token's own maximum."),
                io.Float.Input("weight", default=0.1, min=0.0, max=10.0, step=0.01,
                               tooltip="eDiff-I weight w (paper: 0.1; 0 = off, bit-identical)."),
                io.String.Input("strengths", default="",
                                tooltip="Per-phrase strength 'phrase: s' (default 1.0; 0.2-0.4 suits sky/ground)."),
                io.Float.Input("collage_positive", default=1.0, min=0.0, max=10.0, step=0.05,
                               tooltip="Collage mode: bias inside the region."),
                io.Float.Input("collage_negative", default=1.0, min=0.0, max=10.0, step=0.05,
                               tooltip="Collage mode: negative bias outside the region."),
                io.String.Input("layers", default="all", tooltip="Cross-attention layers to paint (see README)."),
                io.Float.Input("end_percent", default=1.0, min=0.0, max=1.0, step=0.01,
                               tooltip="Fraction of the steps during which the painting acts."),
                BoxesType.Input("boxes", optional=True, tooltip="BOXES: each box paints its phrase."),
                io.Mask.Input("masks", optional=True,
                              tooltip="MASKs (a batch, any size, pixel or latent space), one per phrase of "
                                      "mask_phrases."),
                io.String.Input("mask_phrases", default="", optional=True,
                                tooltip="Phrases of the masks, comma-separated, in mask-batch order."),
            ],
            outputs=[io.Model.Output(display_name="model"), io.Conditioning.Output(display_name="positive")],
        )

    @classmethod
    def validate_inputs(cls, **kwargs):
        return True

    @classmethod
    def execute(cls, model, clip, prompt, mode, weight, strengths, collage_positive, collage_negative, layers,
                end_percent, boxes=None, masks=None, mask_phrases=""):
        regions = []                                                   # (phrase, mask)
        if boxes is not None:
            bm = boxes_to_masks(list(boxes), 64, 64)
            regions += [(b.phrase, bm[i]) for i, b in enumerate(boxes)]
        names = parse_word_list(mask_phrases or "")
        if masks is not None:
            m = masks.reshape(-1, *masks.shape[-2:])
            if len(names) != m.shape[0]:
                raise AttentionControlError(
                    f"mask_phrases: {len(names)} phrase(s) for a batch of {m.shape[0]} mask(s); give one phrase per "
                    "mask, comma-separated, in batch order")
            regions += list(zip(names, m.float()))
        elif names:
            raise AttentionControlError("masks: mask_phrases is set but no MASK is connected")
        if not regions:
            raise AttentionControlError("boxes/masks: connect BOXES or MASKs (with mask_phrases) to paint")
        if not prompt.strip():
            raise AttentionControlError("prompt: give the positive prompt that contains the phrases")
        specs, prompt_len = resolve_words(clip, prompt, ",".join(p.replace(",", " ") for p, _ in regions))
        strength = {w: _float(v, "strengths", w) for w, v in _parse_pairs(strengths, "strengths", "phrase: s")}
        unknown = [w for w in strength if w not in {p for p, _ in regions}]
        if unknown:
            raise AttentionControlError(f"strengths: '{unknown[0]}' is not one of the painted phrases")
        phrases = [PaintedPhrase(p, list(s.positions), mk, strength.get(p, 1.0))
                   for (p, mk), s in zip(regions, specs)]
        ctrl = PaintWithWordsController(phrases, prompt_len, weight, mode, collage_positive, collage_negative,
                                        LayerSelector.parse(layers), 0.0, end_percent)
        positive = clip.encode_from_tokens_scheduled(clip.tokenize(prompt))
        return io.NodeOutput(attach(model, ctrl), positive)


NODES = [PaintWithWords]
