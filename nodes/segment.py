"""Node: AttnCtl_SegmentWords (word masks of a real image from the model's attention)."""
from __future__ import annotations

import torch
from comfy_api.latest import io

from ..attention import maps as M
from ..attention.capture import AttentionMaps
from ..attention.core import AttentionControlError, LayerSelector
from ..attention.dit_layers import DitLayerSelector, check_layer_text
from ..attention.dit_router import is_dit
from ..attention.router import attach
from ..attention.segment import DitSelfPropagation, PropagatedMaps, SelfPropagation, check_segment_config, word_masks
from ..attention.segment_glue import forward_at, noise_sigma
from ..attention.validate import check_finite
from .capture import AttnMaps, capture_controller, check_capture_widgets, video_frame_rows
from .common import CATEGORY, check_widgets, validation_result

AUTO = "auto"


def segment_maps(model, positive, samples: torch.Tensor, capture, handle: AttentionMaps, sigma: float,
                 n_samples: int, seed: int, refine: int, refine_layers: str = "auto"):
    """-> (raw maps, refined maps, frames): word maps (items x frames, W, h, w) of `samples`, the mean
    over `n_samples` noise draws (seeds seed, seed+1, ...) of one model call each at `sigma` with the
    capture controller `capture` (filling `handle`); refined: those maps propagated `refine` times
    through the self-attention of `refine_layers` in one more call per draw (the same noise)."""
    captured = attach(model, capture)
    total = None
    for j in range(n_samples):
        forward_at(captured, positive, samples, sigma, seed + j)
        m = handle.require()
        total = m.clone() if total is None else total + m
    raw = total / n_samples
    frames = max(int(handle.frames or 1), 1)
    if refine <= 0:
        return raw, raw, frames
    holder = PropagatedMaps()
    auto = (refine_layers or AUTO).strip().lower() == AUTO
    if is_dit(model):
        selector = None if auto else DitLayerSelector.parse(refine_layers, "refine_layers")
        ctrl = DitSelfPropagation(raw, refine, holder, selector, frames=frames)
    else:
        ctrl = SelfPropagation(raw, refine, holder, None if auto else LayerSelector.parse(refine_layers, "refine_layers"))
    refined_model = attach(model, ctrl)
    total = None
    for j in range(n_samples):
        holder.maps = None
        forward_at(refined_model, positive, samples, sigma, seed + j)
        if holder.maps is None:
            raise AttentionControlError(
                f"refine_layers: '{refine_layers}' reached no self-attention call in its own layout: another "
                "patch on the MODEL tiles or merges those layers' tokens (HyperTile, ToMe), or the layers have no "
                "self-attention. Choose other layers (e.g. the next resolution: 32 on SD1.5 at 512 px), connect "
                "the MODEL before that patch, or set refine 0")
        total = holder.maps.clone() if total is None else total + holder.maps
    return raw, total / n_samples, frames


def encode_prompt(clip, prompt: str):
    """CLIPTextEncode's conditioning of `prompt`."""
    return clip.encode_from_tokens_scheduled(clip.tokenize(prompt))


class SegmentWords(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="AttnCtl_SegmentWords",
            display_name="Segment Words (attention)",
            category=f"{CATEGORY}/capture",
            description="Masks of the words of a prompt in a real image, from the model's own attention "
                        "(DAAM on a real image): the image is encoded, noised to noise_level, and one model "
                        "call per noise sample reads each word's cross-attention; the maps are refined by "
                        "propagating them through the model's self-attention (training-free diffusion "
                        "segmentation), then thresholded at the image's size. No sampling: a few model calls.",
            inputs=[
                io.Model.Input("model", tooltip="The model whose attention segments the image (any family the pack "
                                                "supports: SD1.x / SD2.x / SDXL, Flux, SD3, Qwen-Image, Wan ...)."),
                io.Clip.Input("clip", tooltip="Its text encoder: encodes the prompt and locates the words."),
                io.Vae.Input("vae", tooltip="Its VAE: encodes the image."),
                io.Image.Input("image", tooltip="The image(s) to segment (a batch segments each; for video models a "
                                                "batch is the frames of one video)."),
                io.String.Input("prompt", multiline=True, default="",
                                tooltip="A caption of the image that holds the words (e.g. 'a red circle and a blue "
                                        "square')."),
                io.String.Input("words", default="",
                                tooltip="Words or phrases of the prompt, comma-separated: one mask each, in this "
                                        "order. A phrase ('red circle') sums its tokens; '#5' gives a token index."),
                io.Float.Input("noise_level", default=0.1, min=0.0, max=1.0, step=0.01,
                               tooltip="How far along the schedule the image is noised before the model looks "
                                       "at it (as a sampler's denoise: 0 = the clean image, 1 = pure noise)."),
                io.Int.Input("samples", default=1, min=1, max=64,
                             tooltip="Noise draws averaged (one model call each; two with refine)."),
                io.Int.Input("seed", default=0, min=0, max=0xffffffffffffffff, control_after_generate=False,
                             tooltip="Seed of the noise draws."),
                io.Int.Input("refine", default=1, min=0, max=16,
                             tooltip="Self-attention propagation steps (0 = raw cross-attention maps): each "
                                     "pixel takes the map value of the pixels it attends to, so a mask fills "
                                     "its object and stops at its outline."),
                io.Float.Input("threshold", default=0.5, min=0.0, max=1.0, step=0.01,
                               tooltip="A mask keeps the pixels whose min-max normalised map is above this."),
                io.Boolean.Input("soft", default=False,
                                 tooltip="Output the normalised maps (0..1) instead of thresholded masks."),
                io.String.Input("layers", default="all", optional=True,
                                tooltip="Cross-attention layers whose maps are averaged (as Capture Attention "
                                        "Maps' layers: all, down, mid, up, map sides such as 16,32; DiT blocks "
                                        "such as double, single, 0.5-1.0)."),
                io.String.Input("refine_layers", default=AUTO, optional=True,
                                tooltip="Self-attention layers that refine the maps, same syntax. auto: on UNets "
                                        "the layers at the finest resolution (coarser ones blur across objects), "
                                        "on DiTs every block."),
            ],
            outputs=[io.Mask.Output(display_name="masks",
                                    tooltip="One mask per image and word (image 0 word 0, image 0 word 1, ...), "
                                            "at the image's size."),
                     io.Image.Output(display_name="preview", tooltip="The maps as heat maps over the image."),
                     AttnMaps.Output(display_name="attn_maps",
                                     tooltip="The refined maps, for Attention Heat Map and the nodes that take "
                                             "ATTN_MAPS.")],
        )

    @classmethod
    def validate_inputs(cls, words=None, layers=None, refine_layers=None, noise_level=None, samples=None,
                        refine=None, threshold=None, seed=None):
        return validation_result(cls, locals(), _check_segment_widgets)

    @classmethod
    def execute(cls, model, clip, vae, image, prompt, words, noise_level, samples, seed, refine, threshold, soft,
                layers="all", refine_layers=AUTO):
        check_widgets(cls, locals())
        _check_segment_widgets(locals())
        check_finite("image", image, "connect an image without NaN or inf pixels")
        if image.ndim != 4 or image.shape[0] < 1:
            raise AttentionControlError(f"image: need an IMAGE batch (N, H, W, C), got shape {tuple(image.shape)}")
        capture, handle = capture_controller(model, clip, prompt, words, layers or "all")
        positive = encode_prompt(clip, prompt)
        latent = vae.encode(image[..., :3])
        sigma = noise_sigma(model, noise_level)
        raw, refined, frames = segment_maps(model, positive, latent, capture, handle, sigma, int(samples),
                                            int(seed), int(refine), refine_layers or AUTO)
        maps = refined
        n_img = image.shape[0]
        if maps.shape[0] != n_img:
            if frames > 1:
                maps = maps.index_select(0, video_frame_rows(maps.shape[0] // frames, frames, n_img))
            else:
                raise AttentionControlError(
                    f"image: {n_img} images gave {maps.shape[0]} latents; segment images one batch at a time")
        H, W = image.shape[1], image.shape[2]
        masks = word_masks(maps, (H, W), float(threshold), bool(soft))                  # (N, W, H, W)
        norm = M.normalize(maps)
        preview = torch.stack([M.overlay(image[i, ..., :3].float(), norm[i, w], 0.6)
                               for i in range(n_img) for w in range(norm.shape[1])]).clamp(0, 1)
        out = AttentionMaps(handle.words)
        out.publish(refined, [], handle.latent_hw, handle.layers, handle.fired, frames)
        return io.NodeOutput(masks.flatten(0, 1), preview, out)


def _check_segment_widgets(values: dict) -> None:
    check_capture_widgets({"words": values.get("words"), "layers": values.get("layers")})
    if values.get("refine_layers") is not None and values["refine_layers"].strip().lower() != AUTO:
        check_layer_text(values["refine_layers"], "refine_layers")
    nl, s, r, t = (values.get(k) for k in ("noise_level", "samples", "refine", "threshold"))
    if None not in (nl, s, r, t):
        check_segment_config(nl, s, r, t)


NODES = [SegmentWords]
