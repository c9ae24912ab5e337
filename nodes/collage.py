"""Nodes: AttnCtl_CollageLayer, AttnCtl_CollageLayers (Collage Diffusion)."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from comfy_api.latest import io

from ..attention.collage import CollageMaskFunction, composite_layers, strength_map
from ..attention.core import AttentionControlError, LayerSelector
from ..attention.regions import PaintedPhrase, PaintWithWordsController
from ..attention.router import attach
from ..attention.tokens import TokenError, flatten_chunks, sequential_positions, word_token_ids
from ..attention.validate import check_finite, check_mask
from .common import CATEGORY, check_widgets, chunks_of, sd_tokenizer, validation_result

MASK_MEANINGS = ["opacity (1 = layer)", "transparency (LoadImage's MASK)"]


def layer_positions(clip, texts: list[str]) -> tuple[str, list[list[int]], int]:
    """The joined prompt (layer texts bottom first, ', '-separated) and each layer's token positions."""
    prompt = ", ".join(t for t in texts if t)
    st = sd_tokenizer(clip)
    bos, eos, pad = getattr(st, "start_token", None), getattr(st, "end_token", None), getattr(st, "pad_token", None)
    flat = flatten_chunks(chunks_of(clip, prompt), bos, eos, pad)
    parts = [word_token_ids(chunks_of(clip, t), bos, eos, pad) if t else [] for t in texts]
    try:
        pos = sequential_positions(flat, parts, texts)
    except TokenError as e:
        raise AttentionControlError(str(e)) from None
    return prompt, pos, flat.length


CollageLayersType = io.Custom("COLLAGE_LAYERS")


@dataclass(frozen=True, eq=False)
class Layer:
    image: torch.Tensor            # (H, W, 3)
    alpha: torch.Tensor            # (H, W) opacity
    prompt: str
    strength: float


class LayerList(tuple):
    """The COLLAGE_LAYERS value: Layer tuple, bottom layer first."""

    def __deepcopy__(self, memo):
        return self


class CollageLayer(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="AttnCtl_CollageLayer",
            display_name="Collage Layer",
            category=f"{CATEGORY}/regions",
            description="Adds one layer (an image with its mask, a text and a noise strength) on top of a collage; "
                        "chain one per layer, bottom first, into Collage Layers. LoadImage of an RGBA PNG gives the "
                        "image and its MASK.",
            inputs=[
                io.Image.Input("image", tooltip="The layer at the canvas size (other sizes are resized to the "
                                                "bottom layer's size)."),
                io.String.Input("prompt", multiline=True, default="",
                                tooltip="What the layer shows (joined with the other layers' texts into the prompt; "
                                        "empty: the layer is only pixels)."),
                io.Float.Input("strength", default=0.6, min=0.0, max=1.0, step=0.01,
                               tooltip="Noise strength: 0 keeps the layer as it is, 1 regenerates it freely; in "
                                       "between trades fidelity for harmony (the layer stays the noised collage "
                                       "while t >= strength x T)."),
                io.Combo.Input("mask_meaning", options=MASK_MEANINGS, default=MASK_MEANINGS[1],
                               tooltip="What the mask is: transparency (LoadImage's MASK of an RGBA PNG) or "
                                       "opacity (1 = the layer is there)."),
                CollageLayersType.Input("layers", optional=True, tooltip="The layers below this one."),
                io.Mask.Input("mask", optional=True, tooltip="The layer's mask; without one the layer is opaque."),
            ],
            outputs=[CollageLayersType.Output(display_name="layers")],
        )

    @classmethod
    def validate_inputs(cls, strength=None, mask_meaning=None):
        return validation_result(cls, locals())

    @classmethod
    def execute(cls, image, prompt, strength, mask_meaning, layers=None, mask=None):
        check_widgets(cls, locals())
        below = tuple(layers or ())
        where = f"layer {len(below) + 1}"
        if not torch.is_tensor(image) or image.ndim != 4 or image.shape[0] != 1:
            n = image.shape[0] if torch.is_tensor(image) and image.ndim == 4 else "?"
            raise AttentionControlError(f"image: {where} got a batch of {n} images; a layer is one image: "
                                        "chain one Collage Layer per image")
        check_finite(f"image ({where})", image, "the image has NaN or infinite pixels; fix the node that makes it")
        if mask_meaning not in MASK_MEANINGS:
            raise AttentionControlError(f"mask_meaning: '{mask_meaning}' is not one of {MASK_MEANINGS}")
        if not 0.0 <= strength <= 1.0:
            raise AttentionControlError(f"strength: {where} has {strength}; a noise strength is in [0, 1]")
        img = image[0, ..., :3].float()
        h, w = (below[0].image.shape[:2] if below else img.shape[:2])
        if tuple(img.shape[:2]) != (h, w):
            img = torch.nn.functional.interpolate(img.movedim(-1, 0)[None], size=(h, w), mode="bilinear",
                                                  align_corners=False)[0].movedim(0, -1)
        if mask is None:
            alpha = torch.ones(h, w)
        else:
            m = check_mask("mask", mask, where)
            if m.shape[0] != 1:
                raise AttentionControlError(f"mask: {where} got a batch of {m.shape[0]} masks; give the layer's one mask")
            if below and mask_meaning == MASK_MEANINGS[1] and float(m.max()) <= 0.0:
                # LoadImage gives an all-zero MASK for an image without alpha (RGB PNG / JPEG): read as
                # transparency, the layer would be opaque everywhere and hide every layer below it
                raise AttentionControlError(
                    f"mask: {where} has no transparent pixel (an all-zero transparency MASK, which is what "
                    "LoadImage gives for an image without an alpha channel), so it would cover the whole canvas "
                    "and hide the layers below; save the layer as an RGBA PNG whose alpha is 0 outside the object, "
                    "or connect a mask of the object (e.g. from a mask editor or Boxes to Mask) with mask_meaning "
                    "'opacity (1 = layer)'; an opaque full-canvas layer belongs at the bottom")
            if tuple(m.shape[-2:]) != (h, w):
                m = torch.nn.functional.interpolate(m[:, None], size=(h, w), mode="bilinear", align_corners=False)[:, 0]
            alpha = 1.0 - m[0] if mask_meaning == MASK_MEANINGS[1] else m[0]
        if float(alpha.max()) <= 0.0:
            raise AttentionControlError(f"mask: {where} is fully transparent; check mask_meaning (LoadImage's MASK is "
                                        "transparency) or remove the layer")
        return io.NodeOutput(LayerList(below + (Layer(img, alpha.clamp(0, 1), prompt.strip(), float(strength)),)))


class CollageLayers(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="AttnCtl_CollageLayers",
            display_name="Collage Layers (Collage Diffusion)",
            category=f"{CATEGORY}/regions",
            description="Collage Diffusion: RGBA layers (bottom first), each with a text and a noise strength, become "
                        "a composite latent with a per-pixel strength map (held as the noised collage until t < s T), "
                        "the joined prompt, and a model whose cross-attention keeps each layer's text on its pixels. "
                        "Sample with KSampler at denoise 1.",
            inputs=[
                io.Model.Input("model", tooltip="The model (cloned; the input stays unpatched)."),
                io.Clip.Input("clip", tooltip="Encodes the joined layer texts."),
                io.Vae.Input("vae", tooltip="Encodes the composite into the LATENT."),
                CollageLayersType.Input("layers", tooltip="The layers from Collage Layer nodes, bottom first."),
                io.Float.Input("attention_positive", default=1.0, min=0.0, max=10.0, step=0.05,
                               tooltip="Cross-attention bias of each layer's text inside its visible mask "
                                       "(0 with attention_negative 0 = no attention control)."),
                io.Float.Input("attention_negative", default=1.0, min=0.0, max=10.0, step=0.05,
                               tooltip="Negative bias of each layer's text outside its visible mask."),
                io.Int.Input("dilate", default=8, min=0, max=256,
                             tooltip="Pixels around layer borders that take the larger neighbouring strength, so "
                                     "seams are regenerated."),
                io.Float.Input("blur", default=8.0, min=0.0, max=256.0, step=0.5,
                               tooltip="Gaussian blur (sigma, pixels) of the strength map."),
            ],
            outputs=[io.Model.Output(display_name="model"), io.Conditioning.Output(display_name="positive"),
                     io.Latent.Output(display_name="latent"), io.Mask.Output(display_name="layer_masks"),
                     io.Image.Output(display_name="composite")],
        )

    @classmethod
    def validate_inputs(cls, attention_positive=None, attention_negative=None, dilate=None, blur=None):
        return validation_result(cls, locals())

    @classmethod
    def execute(cls, model, clip, vae, layers, attention_positive, attention_negative, dilate, blur):
        check_widgets(cls, locals())
        layers = tuple(layers or ())
        if not layers:
            raise AttentionControlError("layers: connect Collage Layer nodes (bottom layer first)")
        texts = [layer.prompt for layer in layers]
        if not any(texts):
            raise AttentionControlError("layers: every layer's prompt is empty; describe at least one layer")
        images = torch.stack([layer.image for layer in layers])
        alphas = torch.stack([layer.alpha for layer in layers])
        comp, visible, uncovered = composite_layers(images, alphas)
        smap = strength_map(visible, uncovered, [layer.strength for layer in layers], dilate, blur)
        for i, t in enumerate(texts):
            if t and float(visible[i].max()) <= 0.0:
                raise AttentionControlError(f"layers: layer {i + 1} ('{t}') is hidden by the layers above it or "
                                            "fully transparent; reorder the layers or fix its mask")
        prompt, positions, prompt_len = layer_positions(clip, texts)
        positive = clip.encode_from_tokens_scheduled(clip.tokenize(prompt))
        m = model.clone()
        ms = m.get_model_object("model_sampling")
        prev = m.model_options.get("denoise_mask_function")
        m.set_model_denoise_mask_function(CollageMaskFunction(ms.timestep, prev))
        phrases = [PaintedPhrase(t, p, visible[i], 1.0) for i, (t, p) in enumerate(zip(texts, positions)) if t and p]
        if attention_positive > 0.0 or attention_negative > 0.0:
            ctrl = PaintWithWordsController(phrases, prompt_len, 0.0, "collage", attention_positive, attention_negative,
                                            LayerSelector.parse("all"))
            m = attach(m, ctrl)
        latent = {"samples": vae.encode(comp[None]), "noise_mask": smap[None].clone()}
        return io.NodeOutput(m, positive, latent, visible, comp[None])


NODES = [CollageLayer, CollageLayers]
