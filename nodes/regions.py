"""Nodes: AttnCtl_PaintWithWords, AttnCtl_RegionPrompt, AttnCtl_RegionConditioning."""
from __future__ import annotations

import torch
from comfy_api.latest import io

from ..attention.core import AttentionControlError, LayerSelector
from ..attention.dit_layers import DitLayerSelector, check_layer_text
from ..attention.dit_regions import (DIT_REGION_KEY, IMAGE_ATTENTION, DitPaintController, DitRegionController)
from ..attention.dit_router import is_dit
from ..attention.layout import boxes_to_masks
from ..attention.region_prompts import (BOOTSTRAP_COLOURS, REGION_KEY, Region, RegionController, Regions, RegionTag,
                                        check_region, linear_rgb_to_latent, region_weights)
from ..attention.regions import PaintedPhrase, PaintWithWordsController
from ..attention.router import attach
from ..attention.tokens import parse_word_list
from ..attention.validate import check_mask
from .common import CATEGORY, check_widgets, resolve_words, validation_result
from .dit_tokens import prompt_variants
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
                        "The collage mode adds Collage Diffusion's inside/outside bias. On DiT models the bias goes "
                        "on the image-query x word-key scores of joint attention (Wan: text cross-attention).",
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
                io.String.Input("layers", default="all",
                                tooltip="Cross-attention layers to paint (see README). DiT models (Flux, SD3, Wan, "
                                        "Qwen-Image, Lumina 2...): all, double, single, joint, block, layer, ranges "
                                        "such as double:0-9, or depth fractions such as 0.5-1.0."),
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
    def validate_inputs(cls, prompt=None, mode=None, weight=None, strengths=None, collage_positive=None,
                        collage_negative=None, layers=None, end_percent=None):
        return validation_result(cls, locals(), check_paint_widgets)

    @classmethod
    def execute(cls, model, clip, prompt, mode, weight, strengths, collage_positive, collage_negative, layers,
                end_percent, boxes=None, masks=None, mask_phrases=""):
        check_widgets(cls, locals())
        check_paint_widgets(locals())
        box_regions, mask_regions = [], []                             # (phrase, mask)
        if boxes is not None:
            bm = boxes_to_masks(list(boxes), 64, 64)
            box_regions = [(b.phrase, bm[i]) for i, b in enumerate(boxes)]
        names = parse_word_list(mask_phrases or "")
        if masks is not None:
            m = check_mask("masks", masks)
            if len(names) != m.shape[0]:
                raise AttentionControlError(
                    f"mask_phrases: {len(names)} phrase(s) for a batch of {m.shape[0]} mask(s); give one phrase per "
                    "mask, comma-separated, in batch order")
            mask_regions = list(zip(names, m))
        elif names:
            raise AttentionControlError("masks: mask_phrases is set but no MASK is connected")
        regions = box_regions + mask_regions
        if not regions:
            raise AttentionControlError("boxes/masks: connect BOXES or MASKs (with mask_phrases) to paint")
        specs, prompt_len = [], 77
        for group, name in ((box_regions, "boxes"), (mask_regions, "mask_phrases")):
            if group:
                got, prompt_len = resolve_words(clip, prompt, ",".join(p.replace(",", " ") for p, _ in group),
                                                input_name=name)
                specs += got
        strength = dict(parse_strengths(strengths))
        unknown = [w for w in strength if w not in {p for p, _ in regions}]
        if unknown:
            raise AttentionControlError(f"strengths: '{unknown[0]}' is not one of the painted phrases")
        phrases = [PaintedPhrase(p, list(s.positions), mk, strength.get(p, 1.0))
                   for (p, mk), s in zip(regions, specs)]
        if is_dit(model):
            variants = prompt_variants(clip, prompt, *(",".join(p.replace(",", " ") for p, _ in group)
                                                       for group in (box_regions, mask_regions) if group))
            ctrl = DitPaintController(phrases, prompt_len, weight, mode, collage_positive, collage_negative,
                                      DitLayerSelector.parse(layers), 0.0, end_percent, variants=variants)
        else:
            ctrl = PaintWithWordsController(phrases, prompt_len, weight, mode, collage_positive, collage_negative,
                                            LayerSelector.parse(layers), 0.0, end_percent)
        positive = clip.encode_from_tokens_scheduled(clip.tokenize(prompt))
        return io.NodeOutput(attach(model, ctrl), positive)


RegionsType = io.Custom("REGIONS")
DIT_METHODS = ("attention mask", "multidiffusion")

STRENGTH_FORM = "'phrase: s' with a finite s >= 0 (e.g. 'sky: 0.3')"


def parse_strengths(text: str) -> list[tuple[str, float]]:
    """'phrase: s' items -> [(phrase, s)], each s finite and >= 0."""
    out = []
    for w, v in _parse_pairs(text or "", "strengths", STRENGTH_FORM):
        f = _float(v, "strengths", w, STRENGTH_FORM)
        if f < 0:
            raise AttentionControlError(f"strengths: '{w}: {v}' is negative; use the form {STRENGTH_FORM}")
        out.append((w, f))
    return out


def check_paint_widgets(values: dict) -> None:
    """The checks that follow from Paint with Words' widget values alone (validate_inputs)."""
    if values.get("prompt") is not None and not values["prompt"].strip():
        raise AttentionControlError("prompt: give the positive prompt that contains the phrases")
    if values.get("strengths") is not None:
        parse_strengths(values["strengths"])
    if values.get("layers") is not None:
        check_layer_text(values["layers"])


def single_mask(mask, input_name: str, where: str, frames: bool = False):
    """A MASK input as one (H, W) mask: a batch of one is taken, a larger batch is an error (with
    `frames`: kept as (F, H, W), one mask per video frame); NaN / inf pixels are an error (they would
    become an empty or a full region)."""
    if mask is None:
        return None
    m = check_mask(input_name, mask, where)
    if frames and m.shape[0] > 1:
        return m
    if m.shape[0] != 1:
        raise AttentionControlError(
            f"{input_name}: {where} got a batch of {m.shape[0]} masks; a region takes one mask: chain one Region "
            "Prompt per mask (or pick one mask of the batch)")
    return m[0]


class RegionPrompt(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="AttnCtl_RegionPrompt",
            display_name="Region Prompt",
            category=f"{CATEGORY}/regions",
            description="Adds a region (prompt + MASK and/or BOXES + strength) to a REGIONS list; chain one per region "
                        "and connect the list to Region Conditioning. With BOXES and an empty prompt, every box becomes "
                        "a region with its phrase as the prompt.",
            inputs=[
                io.String.Input("prompt", multiline=True, default="",
                                tooltip="What the region shows. Empty with BOXES: one region per box, prompted with "
                                        "the box's phrase."),
                io.Float.Input("strength", default=1.0, min=0.0, max=10.0, step=0.05,
                               tooltip="Weight of the region in the per-pixel average where regions overlap "
                                       "(MultiDiffusion's W_i = strength x mask). Unused by the attention-mask method "
                                       "on DiT models."),
                RegionsType.Input("regions", optional=True, tooltip="Regions added so far (chain the nodes)."),
                io.Mask.Input("mask", optional=True,
                              tooltip="The region: one MASK of any size (pixel or latent space, soft or binary); "
                                      "resized to the latent when sampling starts."),
                BoxesType.Input("boxes", optional=True,
                                tooltip="BOXES (the box editor): with a prompt, the region is their union (and the "
                                        "mask's); without, one region per box."),
                io.Boolean.Input("per_frame_masks", default=False, optional=True,
                                 tooltip="Video DiT models (Wan), attention-mask method only: a MASK batch is one mask "
                                         "per frame (one per latent frame, or one per decoded frame), so the region "
                                         "can move. Off: the mask must be a single mask, used for every frame."),
            ],
            outputs=[RegionsType.Output(display_name="regions")],
        )

    @classmethod
    def validate_inputs(cls, strength=None):
        return validation_result(cls, locals())

    @classmethod
    def execute(cls, prompt, strength, regions=None, mask=None, boxes=None, per_frame_masks=False):
        check_widgets(cls, locals())
        where = f"region {len(regions or ()) + 1}"
        m = single_mask(mask, "mask", where, frames=bool(per_frame_masks))
        new = []
        if prompt.strip():
            new.append(check_region(Region(prompt.strip(), m, tuple(boxes or ()), float(strength)), where))
        elif boxes:
            if m is not None:
                raise AttentionControlError(
                    f"prompt: {where} has a mask but no prompt; write the region's prompt (an empty prompt with "
                    "BOXES makes one region per box)")
            for i, b in enumerate(boxes):
                new.append(check_region(Region(b.phrase, None, (b,), float(strength)),
                                        f"region {len(regions or ()) + 1 + i}"))
        else:
            raise AttentionControlError(f"prompt: {where} has no prompt; write what the region should show")
        return io.NodeOutput(Regions(tuple(regions or ()) + tuple(new)))


def _latent_colour_map(model):
    """RGB -> latent in the sampler's space for bootstrapping colours: the least-squares inverse of
    the model's latent preview factors (exact for linear latents such as the shapes world), or the
    latent's mean (zeros) for formats without them."""
    fmt = model.get_model_object("latent_format")
    factors = getattr(fmt, "latent_rgb_factors", None)
    channels = int(getattr(fmt, "latent_channels", 4))
    if factors is None or len(factors) != channels:
        return lambda rgb: torch.zeros(rgb.shape[0], channels)
    bias = getattr(fmt, "latent_rgb_factors_bias", None)
    return lambda rgb: linear_rgb_to_latent(rgb, factors, bias)


def _node_canvas(regions) -> tuple[int, int]:
    """The size at which the conditioning's own masks are stored (the largest region mask; boxes alone:
    512x512). The sampler re-resolves them exactly at the latent size."""
    sizes = [tuple(r.mask.shape) for r in regions if r.mask is not None]
    if not sizes:
        return 512, 512
    return max(h for h, _ in sizes), max(w for _, w in sizes)


class RegionConditioning(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="AttnCtl_RegionConditioning",
            display_name="Region Conditioning (MultiDiffusion)",
            category=f"{CATEGORY}/regions",
            description="MultiDiffusion region-based generation: one prompt per region, the background prompt "
                        "elsewhere, averaged per pixel every step (ComfyUI's masked conditioning), with bootstrapping "
                        "(regions see a random constant-colour background for the first steps). Works with every "
                        "sampler node and with Tiled Diffusion. On DiT models (Flux, SD3, Wan, Qwen-Image, Lumina 2, "
                        "Z-Image...) the default is regional attention masks instead: the regions' prompts are "
                        "appended to the background (base) prompt's tokens and each region's image tokens attend to "
                        "the base prompt and their own region's prompt only (one model call per step).",
            inputs=[
                io.Model.Input("model", tooltip="The model (cloned; the input stays unpatched)."),
                io.Clip.Input("clip", tooltip="Encodes the region and background prompts."),
                RegionsType.Input("regions", tooltip="The REGIONS list from Region Prompt nodes."),
                io.String.Input("background_prompt", multiline=True, default="",
                                tooltip="The prompt of every pixel no region covers (weight 1 - sum of the masks)."),
                io.Float.Input("bootstrap", default=0.4, min=0.0, max=1.0, step=0.01,
                               tooltip="Fraction of the steps with bootstrapping (paper: 20 of 50 = 0.4; 0 = off): "
                                       "outside its mask each region sees a random constant colour noised to the "
                                       "current level, so its object forms inside the mask."),
                io.Combo.Input("bootstrap_colours", options=list(BOOTSTRAP_COLOURS), default="random",
                               tooltip="The constant backgrounds of bootstrapping: random RGB colours (the paper) or "
                                       "random grey levels (for models whose backgrounds a saturated colour would "
                                       "tint)."),
                io.Combo.Input("dit_method", options=list(DIT_METHODS), default="attention mask", optional=True,
                               tooltip="DiT models only. attention mask: one model call with the regions' prompts "
                                       "appended to the background prompt, attention masked per region (background "
                                       "prompt = the base prompt every image token sees; bootstrap unused). "
                                       "multidiffusion: the UNet method (one model call per region, averaged per "
                                       "pixel, with bootstrapping)."),
                io.Combo.Input("image_attention", options=list(IMAGE_ATTENTION), default="full", optional=True,
                               tooltip="DiT attention-mask method only: every image token attends to every image "
                                       "token (full, default: the regions' text masks alone place the objects and "
                                       "the picture stays whole), or image tokens of a region attend only to the "
                                       "image tokens of their region, background tokens to the background (region: "
                                       "Chen et al. 2024's restriction; on the shapes-world DiT it fills each box "
                                       "with its colour and breaks the background)."),
                io.Float.Input("start_percent", default=0.0, min=0.0, max=1.0, step=0.01, optional=True,
                               tooltip="DiT attention-mask method only: first fraction of the steps with the region "
                                       "masks. Outside [start, end) the model sees the background prompt alone."),
                io.Float.Input("end_percent", default=1.0, min=0.0, max=1.0, step=0.01, optional=True,
                               tooltip="DiT attention-mask method only: fraction of the steps at which the region "
                                       "masks stop; later steps see the background prompt alone (Chen et al.: about "
                                       "0.4, with a background prompt that describes the whole image)."),
                io.String.Input("layers", default="all", optional=True,
                                tooltip="DiT attention-mask method only: blocks whose attention is masked (all, "
                                        "double, single, joint, block, layer, double:0-9, 0.5-1.0, comma-separated); "
                                        "the other blocks attend to every prompt while the masks are on."),
            ],
            outputs=[io.Model.Output(display_name="model"), io.Conditioning.Output(display_name="positive")],
        )

    @classmethod
    def validate_inputs(cls, bootstrap=None, bootstrap_colours=None, dit_method=None, image_attention=None,
                        start_percent=None, end_percent=None, layers=None):
        return validation_result(cls, locals(), check_region_widgets)

    @classmethod
    def execute(cls, model, clip, regions, background_prompt, bootstrap, bootstrap_colours="random",
                dit_method="attention mask", image_attention="full", start_percent=0.0, end_percent=1.0,
                layers="all"):
        check_widgets(cls, locals())
        check_region_widgets(locals())

        def encode(text):
            return clip.encode_from_tokens_scheduled(clip.tokenize(text))
        if is_dit(model) and dit_method == "attention mask":
            return io.NodeOutput(*dit_region_conditioning(model, encode, regions, background_prompt, image_attention,
                                                          start_percent, end_percent, layers))
        return io.NodeOutput(*region_conditioning(model, encode, regions, background_prompt, bootstrap,
                                                  bootstrap_colours))


def check_region_widgets(values: dict) -> None:
    """The checks that follow from Region Conditioning's widget values alone (validate_inputs)."""
    a, b = values.get("start_percent"), values.get("end_percent")
    if a is not None and b is not None and a > b:
        raise AttentionControlError(f"start_percent: {a:g} is above end_percent {b:g}; use start_percent <= "
                                    "end_percent")
    if values.get("layers") is not None:
        DitLayerSelector.parse(values["layers"], "layers")


def _one_conditioning(encoded, where: str):
    if not encoded or len(encoded) != 1:
        raise AttentionControlError(
            f"{where}: the text encoder gave {len(encoded or [])} conditioning entries for one prompt (scheduled "
            "text-encoder hooks?); region prompts on DiT models take one entry per prompt")
    ctx, extra = encoded[0][0], encoded[0][1]
    if not torch.is_tensor(ctx) or ctx.ndim != 3 or ctx.shape[1] < 1:
        raise AttentionControlError(f"{where}: the text encoder gave no (batch, tokens, channels) context")
    return ctx, dict(extra)


def dit_region_conditioning(model, encode, regions, base_prompt: str, image_attention: str = "full",
                            start: float = 0.0, end: float = 1.0, layers: str = "all"):
    """(patched model, positive) for attention-mask region prompts on a DiT model: one conditioning
    entry whose context is the base prompt's tokens followed by each region's (the controller knows
    the parts' lengths); the base prompt's other outputs (pooled vector, ...) are kept.
    `encode(text)` -> CONDITIONING."""
    regions = tuple(regions or ())
    if not regions:
        raise AttentionControlError("regions: connect at least one Region Prompt")
    for i, r in enumerate(regions):
        check_region(r, f"regions: region {i + 1}")
    parts = [_one_conditioning(encode(base_prompt), "background_prompt")]
    parts += [_one_conditioning(encode(r.prompt), f"regions: region {i + 1} {r.describe()}")
              for i, r in enumerate(regions)]
    base = parts[0][0]
    for i, (ctx, _) in enumerate(parts[1:]):
        if ctx.shape[0] != base.shape[0] or ctx.shape[2] != base.shape[2]:
            raise AttentionControlError(
                f"regions: region {i + 1} {regions[i].describe()} encodes to a context of shape {tuple(ctx.shape)}, "
                f"the background prompt to {tuple(base.shape)}; batch and width must match (same text encoder, one "
                "prompt each)")
    lengths = [int(c.shape[1]) for c, _ in parts]
    context = torch.cat([c.to(base) for c, _ in parts], dim=1)
    extra = parts[0][1]
    masks = [e.get("attention_mask") for _, e in parts]
    if any(m is not None for m in masks):
        if not all(m is None or (torch.is_tensor(m) and m.ndim == 2 and m.shape[-1] == n)
                   for m, n in zip(masks, lengths)):
            raise AttentionControlError(
                "background_prompt: the conditioning carries an attention mask over the image as well as the text "
                "(e.g. from a style model); region prompts on DiT models need conditioning without it")
        extra["attention_mask"] = torch.cat(
            [m if m is not None else torch.ones(base.shape[0], n, dtype=next(x for x in masks if x is not None).dtype)
             for m, n in zip(masks, lengths)], dim=1)
    ctrl = DitRegionController(regions, lengths, image_attention, start, end,
                               DitLayerSelector.parse(layers or "all", "layers"))
    patched = attach(model, ctrl)
    extra[DIT_REGION_KEY] = ctrl.tag()
    return patched, [[context, extra]]


def region_conditioning(model, encode, regions, background_prompt: str, bootstrap: float, colours: str = "random"):
    """(patched model, positive): one masked, tagged conditioning entry list per region and one for the
    background; `encode(text)` -> CONDITIONING (the CLIP's, or any text encoder's)."""
    regions = tuple(regions or ())
    if not regions:
        raise AttentionControlError("regions: connect at least one Region Prompt")
    for i, r in enumerate(regions):
        check_region(r, f"regions: region {i + 1}")
        if r.mask is not None and r.mask.ndim == 3:
            raise AttentionControlError(
                f"regions: region {i + 1} {r.describe()} has one mask per frame ({r.mask.shape[0]}); per-frame masks "
                "work with the attention-mask method on video DiT models (Wan); give one mask here")
    h, w = _node_canvas(regions)
    masks, bg = region_weights(regions, h, w)
    ms = model.get_model_object("model_sampling")
    ctrl = RegionController(regions, bootstrap, _latent_colour_map(model), ms.noise_scaling, colours=colours)
    positive = []
    for idx, (text, mask, strength) in enumerate([(background_prompt, bg, 1.0)] +
                                                 [(r.prompt, m, r.strength) for r, m in zip(regions, masks)]):
        tag = RegionTag(ctrl.owner, idx, "background" if idx == 0 else text)
        for cond, extra in encode(text):
            positive.append([cond, {**extra, "mask": mask[None].clone(), "set_area_to_bounds": False,
                                    "mask_strength": 1.0, "strength": float(strength), REGION_KEY: tag}])
    return attach(model, ctrl), positive


NODES = [PaintWithWords, RegionPrompt, RegionConditioning]
