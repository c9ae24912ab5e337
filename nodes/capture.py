"""Nodes: AttnCtl_CaptureAttention, AttnCtl_AttentionHeatmap."""
from __future__ import annotations

import torch
from comfy_api.latest import io

from ..attention import maps as M
from ..attention.capture import AttentionMaps, CaptureController
from ..attention.core import AttentionControlError, LayerSelector
from ..attention.dit_capture import DitCaptureController
from ..attention.dit_layers import DitLayerSelector, check_layer_text
from ..attention.dit_router import is_dit
from .dit_tokens import dit_context, is_dit_clip, prompt_variants
from ..attention.router import attach
from ..attention.tokens import parse_word_list
from .common import CATEGORY, check_widgets, resolve_words, validation_result

AttnMaps = io.Custom("ATTN_MAPS")


class CaptureAttention(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="AttnCtl_CaptureAttention",
            display_name="Capture Attention Maps",
            category=f"{CATEGORY}/capture",
            description="Patches the model so that sampling records per-word cross-attention maps "
                        "(DAAM-style): running sums over the chosen layers, heads and steps, cond rows only. "
                        "On DiT models: the image tokens' attention on the word tokens in joint attention "
                        "(softmax over all text and image keys), one map per latent frame for video.",
            inputs=[
                io.Model.Input("model", tooltip="The model to sample with; it is cloned, the input stays unpatched."),
                io.Clip.Input("clip", tooltip="The CLIP used to encode the prompt; its tokenizer locates the words."),
                io.String.Input("prompt", multiline=True, default="",
                                tooltip="The positive prompt text, exactly as given to CLIPTextEncode."),
                io.String.Input("words", default="",
                                tooltip="Words or phrases of the prompt to capture, comma-separated. Multi-token "
                                        "words sum their tokens. '#5' or '#5+6' gives token indices (0 = start token)."),
                io.String.Input("layers", default="all",
                                tooltip="Layers to average. UNet models: all, down, mid, up, map sides at the "
                                        "sampled size (e.g. 16,32) or downscale factors (1/4). DiT models (Flux, "
                                        "SD3, Qwen-Image, Wan, Lumina 2, Z-Image...): all, double, single, joint, "
                                        "block, layer, ranges such as double:0-9, or depth fractions such as "
                                        "0.5-1.0. Comma-separated."),
                io.Float.Input("start_percent", default=0.0, min=0.0, max=1.0, step=0.01,
                               tooltip="First fraction of the sampling steps to include."),
                io.Float.Input("end_percent", default=1.0, min=0.0, max=1.0, step=0.01,
                               tooltip="Fraction of the steps at which capture stops."),
                io.Boolean.Input("keep_per_step", default=False,
                                 tooltip="Also keep one map per step (memory grows with steps) for the step slider "
                                         "and per-step export."),
            ],
            outputs=[io.Model.Output(display_name="model"), AttnMaps.Output(display_name="attn_maps")],
        )

    @classmethod
    def validate_inputs(cls, words=None, layers=None, start_percent=None, end_percent=None):
        return validation_result(cls, locals(), check_capture_widgets)

    @classmethod
    def execute(cls, model, clip, prompt, words, layers, start_percent, end_percent, keep_per_step):
        check_widgets(cls, locals())
        check_capture_widgets(locals())
        ctrl, handle = capture_controller(model, clip, prompt, words, layers, start_percent, end_percent,
                                          keep_per_step)
        return io.NodeOutput(attach(model, ctrl), handle)


def capture_controller(model, clip, prompt: str, words: str, layers: str, start: float = 0.0, end: float = 1.0,
                       keep_per_step: bool = False):
    """-> (the capture controller for `model`'s family, its ATTN_MAPS handle)."""
    specs, prompt_len = resolve_words(clip, prompt, words)
    handle = AttentionMaps([s.label for s in specs])
    if is_dit(model):
        cond_len = dit_context(clip, prompt).cond_length if is_dit_clip(clip) else prompt_len
        ctrl = DitCaptureController(specs, prompt_len, handle, DitLayerSelector.parse(layers), start, end,
                                    keep_per_step, cond_len=cond_len, variants=prompt_variants(clip, prompt, words))
    else:
        ctrl = CaptureController(specs, prompt_len, handle, LayerSelector.parse(layers), start, end, keep_per_step)
    return ctrl, handle


def check_capture_widgets(values: dict) -> None:
    """The checks that follow from the capture node's widget values alone (validate_inputs)."""
    if values.get("words") is not None and not parse_word_list(values["words"]):
        raise AttentionControlError("words: give at least one word of the prompt (comma-separated)")
    if values.get("layers") is not None:
        check_layer_text(values["layers"])
    a, b = values.get("start_percent"), values.get("end_percent")
    if a is not None and b is not None and not a < b:
        raise AttentionControlError(f"start_percent: {a:g} is not below end_percent {b:g}, so no step would be "
                                    "captured; use start_percent < end_percent")


def video_frame_rows(items: int, latent_frames: int, n_images: int) -> torch.Tensor:
    """Map rows for the decoded frames of `items` videos of `latent_frames` latent frames each.
    Wan-style VAEs decode latent frame 0 to one frame and each later one to the same number of
    frames (4 for Wan 2.1: 4(T-1)+1 frames); another count is spread evenly."""
    per_item = n_images // max(items, 1)
    if per_item * items != n_images or per_item < latent_frames:
        raise ValueError(f"image: {n_images} frames do not split into {items} videos of at least "
                         f"{latent_frames} frames (the captured run had {latent_frames} latent frames per video)")
    rows = []
    for i in range(items):
        for f in range(per_item):
            if latent_frames > 1 and (per_item - 1) % (latent_frames - 1) == 0:
                lf = 0 if f == 0 else 1 + (f - 1) // ((per_item - 1) // (latent_frames - 1))
            else:
                lf = min(f * latent_frames // per_item, latent_frames - 1)
            rows.append(i * latent_frames + lf)
    return torch.tensor(rows, dtype=torch.long)


def _latent_rgb_size(latent, image):
    if image is not None:
        return image.shape[1], image.shape[2]
    s = latent["samples"]
    return s.shape[-2] * 8, s.shape[-1] * 8


VIEWER_SIDE = 64          # the hover data's map side at most (values 0-255, one list per item and word)


def viewer_ui(cls, heat: torch.Tensor, words: list[str], norm: torch.Tensor, steps: list[int]) -> dict:
    """The node's own previews (so the heat-map viewer needs no Save or Preview node downstream) and, for the
    viewer's hover ranking, the aggregate normalised maps (items, words, h, w) as 0-255 values at <= 64 x 64,
    the words and the sampler steps (1-based) of per-step rows."""
    from comfy_api.latest import ui
    m = norm
    h, w = m.shape[-2:]
    scale = min(1.0, VIEWER_SIDE / max(h, w))
    side = (max(1, round(h * scale)), max(1, round(w * scale)))
    small = (M.resize(m.float(), side).clamp(0, 1) * 255).round().to(torch.uint8)
    data = {"words": list(words), "steps": steps, "items": int(m.shape[0]), "h": side[0], "w": side[1],
            "values": small.flatten().tolist()}
    # under the pack's own key: the front end's default image preview would draw them a second time, over
    # the viewer
    return {"attnctl_images": ui.PreviewImage(heat, cls=cls).as_dict()["images"], "attnctl_maps": [data]}


class AttentionHeatmap(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="AttnCtl_AttentionHeatmap",
            display_name="Attention Heat Map",
            category=f"{CATEGORY}/capture",
            description="Turns captured attention maps into heat-map overlays and masks, one per word and "
                        "batch item (order: item 0 word 0, item 0 word 1, ...).",
            inputs=[
                AttnMaps.Input("attn_maps", tooltip="The ATTN_MAPS output of Capture Attention Maps."),
                io.Image.Input("image", optional=True,
                               tooltip="The decoded image of the captured run; the heat maps are drawn over it."),
                io.Latent.Input("latent", optional=True,
                                tooltip="Or the sampled LATENT (heat maps on grey, sized like the decoded image)."),
                io.Float.Input("threshold", default=0.5, min=0.0, max=1.0, step=0.01,
                               tooltip="Masks are the normalised map above this value."),
                io.Float.Input("alpha", default=0.6, min=0.0, max=1.0, step=0.05,
                               tooltip="Opacity of the heat map over the image."),
                io.Boolean.Input("per_step", default=False,
                                 tooltip="Output one heat map per kept step (needs keep_per_step on the capture node) "
                                         "instead of the aggregate."),
            ],
            outputs=[io.Image.Output(display_name="heatmaps"), io.Mask.Output(display_name="masks")],
            is_output_node=True,         # shows its heat maps itself: it runs without a Save / Preview after it
        )

    @classmethod
    def validate_inputs(cls, threshold=None, alpha=None):
        return validation_result(cls, locals())

    @classmethod
    def execute(cls, attn_maps, threshold, alpha, per_step, image=None, latent=None):
        check_widgets(cls, locals())
        if image is None and latent is None:
            raise ValueError("image/latent: connect the decoded IMAGE or the sampled LATENT of the captured run, "
                             "so that this node runs after sampling")
        maps = attn_maps.require()
        if per_step:
            if not attn_maps.step_maps:
                raise ValueError("per_step: no per-step maps were kept; turn on keep_per_step on the capture node")
            frames = [m for _, m in attn_maps.step_maps]
        else:
            frames = [maps]
        H, W = _latent_rgb_size(latent, image)
        b = maps.shape[0]
        n_frames = max(int(getattr(attn_maps, "frames", 1) or 1), 1)
        if image is not None and n_frames > 1 and image.shape[0] not in (1, b):
            # video: maps are (items x latent frames) rows; each decoded frame takes the map of the
            # latent frame it comes from
            idx = video_frame_rows(b // n_frames, n_frames, image.shape[0])
            frames = [f.index_select(0, idx) for f in frames]
            maps = maps.index_select(0, idx)
            b = image.shape[0]
        if image is not None and image.shape[0] not in (1, b):
            raise ValueError(f"image: batch of {image.shape[0]} does not match the {b} captured items"
                             + (f" ({b // n_frames} videos x {n_frames} latent frames)" if n_frames > 1 else ""))
        norm_all = [M.normalize(f) for f in frames]                    # each (B, W, h, w)
        steps = [s + 1 for s, _ in attn_maps.step_maps] if per_step else []
        out_img, out_mask = [], []
        for norm in norm_all:
            for i in range(b):
                base = image[min(i, image.shape[0] - 1)].float() if image is not None \
                    else torch.full((H, W, 3), 0.5)
                for w in range(norm.shape[1]):
                    out_img.append(M.overlay(base[..., :3], norm[i, w], alpha))
                    up = M.resize(norm[i, w][None, None], (H, W))[0, 0]
                    out_mask.append((up > threshold).float())
        heat = torch.stack(out_img).clamp(0, 1)
        return io.NodeOutput(heat, torch.stack(out_mask),
                             ui=viewer_ui(cls, heat, attn_maps.words, M.normalize(maps), steps))


NODES = [CaptureAttention, AttentionHeatmap]
