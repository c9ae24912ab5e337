"""Nodes: AttnCtl_Boxes, AttnCtl_BoxesToMask, AttnCtl_LayoutGuidance."""
from __future__ import annotations

from comfy_api.latest import io

from ..attention.core import AttentionControlError, LayerSelector
from ..attention.layout import BOX_CELLS, DEFAULT_LAYERS, FORWARD_DEFAULT_LAYERS, LayoutController, LayoutObject, boxes_to_masks, parse_boxes
from ..attention.dit_layers import DitLayerSelector, check_layer_text
from ..attention.dit_layout import DEFAULT_DIT_LAYERS, DitLayoutController
from ..attention.dit_router import is_dit
from ..attention.router import attach
from ..attention.tokens import flatten_chunks
from .common import CATEGORY, check_widgets, chunks_of, resolve_words, sd_tokenizer, validation_result
from .dit_tokens import dit_context, is_dit_clip

BoxesType = io.Custom("BOXES")

SPECIAL_TOKENS = ["none", "end", "start+end"]


class Boxes(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="AttnCtl_Boxes",
            display_name="Boxes (phrase layout)",
            category=f"{CATEGORY}/layout",
            description="Named boxes, each bound to a phrase of the prompt, for layout guidance and region nodes.",
            inputs=[
                io.String.Input("boxes", multiline=True, default="red circle: 0.05,0.05,0.5,0.5",
                                tooltip="One box per line as 'phrase: x0,y0,x1,y1' (left, top, right, bottom), or "
                                        "the box editor's JSON [{\"phrase\": ..., \"box\": [x0,y0,x1,y1]}]."),
                io.Combo.Input("units", options=["fraction", "pixels"], default="fraction",
                               tooltip="fraction: coordinates in [0, 1] of the image; pixels: of width x height."),
                io.Int.Input("width", default=512, min=8, max=16384, step=8,
                             tooltip="Image width in pixels (pixel units and the editor's canvas)."),
                io.Int.Input("height", default=512, min=8, max=16384, step=8,
                             tooltip="Image height in pixels (pixel units and the editor's canvas)."),
                io.Image.Input("image", optional=True,
                               tooltip="An image to draw the boxes on (the editor shows it under them); when "
                                       "connected, pixel units are pixels of this image."),
            ],
            outputs=[BoxesType.Output(display_name="boxes")],
        )

    @classmethod
    def validate_inputs(cls, boxes=None, units=None, width=None, height=None):
        def extra(v):
            if None not in (boxes, units, width, height):
                parse_boxes(boxes, units, width, height)
        return validation_result(cls, locals(), extra)

    @classmethod
    def execute(cls, boxes, units, width, height, image=None):
        check_widgets(cls, locals())
        if image is not None:
            height, width = int(image.shape[1]), int(image.shape[2])
        return io.NodeOutput(parse_boxes(boxes, units, width, height))


class BoxesToMask(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="AttnCtl_BoxesToMask",
            display_name="Boxes to Mask",
            category=f"{CATEGORY}/layout",
            description="Rasterises boxes into MASKs (one per box, or their union) for other nodes.",
            inputs=[
                BoxesType.Input("boxes", tooltip="The BOXES output of the Boxes node."),
                io.Int.Input("width", default=512, min=1, max=16384, tooltip="Mask width in pixels."),
                io.Int.Input("height", default=512, min=1, max=16384, tooltip="Mask height in pixels."),
                io.Int.Input("index", default=-1, min=-1, max=255,
                             tooltip="-1: one mask per box (a batch, in box order); -2 is not used; "
                                     "0, 1, ...: only that box."),
                io.Boolean.Input("union", default=False, tooltip="Merge all selected boxes into one mask."),
            ],
            outputs=[io.Mask.Output(display_name="mask")],
        )

    @classmethod
    def execute(cls, boxes, width, height, index, union):
        check_widgets(cls, locals())
        if index >= len(boxes):
            raise AttentionControlError(f"index: {index} but there are only {len(boxes)} boxes (0..{len(boxes) - 1})")
        sel = list(boxes) if index < 0 else [boxes[index]]
        masks = boxes_to_masks(sel, height, width)
        if union:
            masks = masks.amax(0, keepdim=True)
        return io.NodeOutput(masks)


def check_layout_widgets(values: dict) -> None:
    """The checks that follow from Layout Guidance's widget values alone (validate_inputs)."""
    if values.get("prompt") is not None and not values["prompt"].strip():
        raise AttentionControlError("prompt: give the positive prompt that contains the boxes' phrases")
    layers = values.get("layers")
    if layers is not None and layers.strip().lower() not in ("", "auto"):
        check_layer_text(layers)


def _dit_layout(model, clip, prompt, boxes, specs, prompt_len, mode, strength, iterations, energy_threshold,
                guided_steps, forward_strength, layers, special_tokens, box_cells):
    """The DiT controller of the node (issue 18): the same settings; layers in the DiT syntax."""
    if special_tokens != "none":
        raise AttentionControlError(
            "special_tokens: start / end tokens are guided on UNet models only (DiT text encoders have no "
            "start token and pad after the end); set it to none")
    auto = layers.strip().lower() in ("", "auto")
    selector = DitLayerSelector.parse(DEFAULT_DIT_LAYERS if auto else layers, "layers")
    cond_len = dit_context(clip, prompt).cond_length if is_dit_clip(clip) else prompt_len
    objects = [LayoutObject(b, list(s.positions)) for b, s in zip(boxes, specs)]
    return DitLayoutController(objects, prompt_len, selector, cond_len=cond_len, mode=mode, strength=strength,
                               iterations=iterations, threshold=energy_threshold, guided_fraction=guided_steps,
                               forward_strength=forward_strength, cells=box_cells, forward_selector=selector)


def _special_positions(clip, prompt: str, which: str) -> list[int]:
    if which == "none":
        return []
    st = sd_tokenizer(clip)
    flat = flatten_chunks(chunks_of(clip, prompt), getattr(st, "start_token", None), getattr(st, "end_token", None),
                          getattr(st, "pad_token", None))
    content = flat.content_positions()
    end = (content[-1] + 1) if content else 1
    return ([0] if which == "start+end" else []) + [end]


class LayoutGuidance(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="AttnCtl_LayoutGuidance",
            display_name="Layout Guidance (boxes)",
            category=f"{CATEGORY}/layout",
            description="Training-free layout control (Chen et al. 2023): moves each phrase into its box during the "
                        "first steps, by gradient guidance on a cross-attention box energy (backward) and/or by "
                        "biasing the phrase's attention toward its box (forward). Works with every sampler.",
            inputs=[
                io.Model.Input("model", tooltip="The model to sample with; it is cloned, the input stays unpatched."),
                io.Clip.Input("clip", tooltip="The CLIP of the model; its tokenizer finds each box's phrase."),
                io.String.Input("prompt", multiline=True, default="",
                                tooltip="The positive prompt. Sample with this node's conditioning output (or encode "
                                        "exactly this text)."),
                BoxesType.Input("boxes", tooltip="BOXES from the Boxes node; each phrase must occur in the prompt."),
                io.Combo.Input("mode", options=["backward", "forward", "both"], default="backward",
                               tooltip="backward: gradient guidance of the latent (the paper's main method); "
                                       "forward: bias the phrase attention toward its box (no gradients, cheap)."),
                io.Float.Input("strength", default=30.0, min=0.0, max=1000.0, step=1.0,
                               tooltip="Loss scale of backward guidance (paper: 30). 0 turns it off."),
                io.Int.Input("iterations", default=5, min=0, max=50,
                             tooltip="Gradient updates per guided step at most (paper: 5)."),
                io.Float.Input("energy_threshold", default=0.2, min=0.0, max=1.0, step=0.01,
                               tooltip="Stop updating a step once the box energy is below this (paper: 0.2)."),
                io.Float.Input("guided_steps", default=0.2, min=0.0, max=1.0, step=0.01,
                               tooltip="Fraction of the steps that are guided, from the start (paper: 10 of 50)."),
                io.Float.Input("forward_strength", default=1.0, min=0.0, max=1.0, step=0.05,
                               tooltip="Forward mode: how much of each phrase's attention moves to its box window "
                                       "(1.0 on every layer: object in its box 94 % vs 31 % unguided on the shapes "
                                       "world; 0.5 on the paper's layers barely moves it)."),
                io.String.Input("layers", default="auto",
                                tooltip="Cross-attention layers. auto: backward guidance's energy on 'mid, up@1/4' "
                                        "(the paper: the middle block and the first up level with attention; SD1.x: "
                                        "8x8 + three 16x16 maps at 512 px; SDXL: the 32x32 middle and first up level "
                                        "at 1024 px) and forward guidance on every cross-attention layer ('all'). "
                                        "Any other text applies to both. DiT models: auto = every block with text "
                                        "keys; or blocks as 'double', 'single:0-9', '0.5-1.0' (fractions of depth)."),
                io.Combo.Input("special_tokens", options=SPECIAL_TOKENS, default="none",
                               tooltip="Also guide the end token (or start and end tokens), which carry layout "
                                       "information; best with a single box."),
                io.Combo.Input("box_cells", options=list(BOX_CELLS), default="reference", optional=True,
                               tooltip="Which map cells count as inside a box. reference: the authors' binary mask "
                                       "(cells from int(x0*W) to int(x1*W)); fraction: each cell by the share of it "
                                       "the box covers (boxes off the map grid, tiny boxes on 8x8 maps)."),
            ],
            outputs=[io.Model.Output(display_name="model"), io.Conditioning.Output(display_name="positive")],
        )

    @classmethod
    def validate_inputs(cls, prompt=None, mode=None, strength=None, iterations=None, energy_threshold=None,
                        guided_steps=None, forward_strength=None, layers=None, special_tokens=None, box_cells=None):
        return validation_result(cls, locals(), check_layout_widgets)

    @classmethod
    def execute(cls, model, clip, prompt, boxes, mode, strength, iterations, energy_threshold, guided_steps,
                forward_strength, layers, special_tokens, box_cells="reference"):
        check_widgets(cls, locals())
        check_layout_widgets(locals())
        if not boxes:
            raise AttentionControlError("boxes: connect BOXES with at least one box")
        phrases = ",".join(b.phrase.replace(",", " ") for b in boxes)
        # the phrases come from the boxes: a phrase missing from the prompt is the boxes' (or the prompt's) error
        specs, prompt_len = resolve_words(clip, prompt, phrases, input_name="boxes")
        if is_dit(model):
            ctrl = _dit_layout(model, clip, prompt, boxes, specs, prompt_len, mode, strength, iterations,
                               energy_threshold, guided_steps, forward_strength, layers, special_tokens, box_cells)
            positive = clip.encode_from_tokens_scheduled(clip.tokenize(prompt))
            return io.NodeOutput(attach(model, ctrl), positive)
        extra = _special_positions(clip, prompt, special_tokens)
        objects = [LayoutObject(b, list(s.positions) + [p for p in extra if p not in s.positions])
                   for b, s in zip(boxes, specs)]
        auto = layers.strip().lower() in ("", "auto")
        selector = LayerSelector.parse(DEFAULT_LAYERS if auto else layers)
        fselector = LayerSelector.parse(FORWARD_DEFAULT_LAYERS) if auto else selector
        ctrl = LayoutController(objects, prompt_len, selector, mode, strength, iterations, energy_threshold,
                                guided_steps, forward_strength, cells=box_cells, forward_selector=fselector)
        tokens = clip.tokenize(prompt)
        positive = clip.encode_from_tokens_scheduled(tokens)
        return io.NodeOutput(attach(model, ctrl), positive)


NODES = [Boxes, BoxesToMask, LayoutGuidance]
