"""Nodes: AttnCtl_EditDirection, AttnCtl_SaveEditDirection, AttnCtl_LoadEditDirection,
AttnCtl_AddEditDirection and AttnCtl_Pix2PixZero (Parmar et al. 2023; attention/pix2pix_zero.py)."""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field

import torch
from comfy_api.latest import io

from ..attention.core import AttentionControlError, LayerSelector
from ..attention.pix2pix_zero import GUIDANCE_REAL, Pix2PixZeroController, add_direction, edit_direction, sentences
from ..attention.router import attach
from ..attention.validate import check_finite
from . import weight_files
from .common import CATEGORY, check_widgets, validation_result
from .p2p import check_edit_latent, edit_batch
from .weight_edits import prompt_lines

log = logging.getLogger("attention_control.pix2pix_zero")

DirectionType = io.Custom("ATTNCTL_EDIT_DIRECTION")
FOLDER = "edit_directions"
FORMAT = "attention_control.edit_direction/1"


@dataclass
class EditDirection:
    """mean(target embeddings) - mean(source embeddings), (1, tokens, width) float32, and what it was built
    from."""
    cond: torch.Tensor
    info: dict = field(default_factory=dict)

    def __deepcopy__(self, memo):
        return self


def _encode(clip, text: str) -> torch.Tensor:
    cond = clip.encode_from_tokens(clip.tokenize(text))
    return cond.float().cpu()


def build_direction(clip, source: str, target: str, templates: bool) -> EditDirection:
    src, tgt = prompt_lines(source), prompt_lines(target)
    if not src:
        raise AttentionControlError("source: give the source concept (a word such as 'cat', or sentences, one "
                                    "per line)")
    if not tgt:
        raise AttentionControlError("target: give the target concept (a word such as 'dog', or sentences, one "
                                    "per line)")
    s_sent, t_sent = sentences(src, templates), sentences(tgt, templates)
    lens = {}
    embs = {}
    for role, texts in (("source", s_sent), ("target", t_sent)):
        embs[role] = [_encode(clip, t) for t in texts]
        for t, e in zip(texts, embs[role]):
            lens.setdefault(tuple(e.shape[1:]), (role, t))
    if len(lens) != 1:
        (s1, (r1, t1)), (s2, (r2, t2)) = list(lens.items())[:2]
        raise AttentionControlError(f"{r2}: '{t2}' encodes to {s2[0]} tokens, '{t1}' ({r1}) to {s1[0]}; keep every "
                                    f"sentence under 75 tokens")
    d = edit_direction(embs["source"], embs["target"])
    return EditDirection(d, {"source": src, "target": tgt, "templates": bool(templates),
                             "sentences": [len(s_sent), len(t_sent)]})


class EditDirectionNode(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="AttnCtl_EditDirection",
            display_name="Edit Direction (Pix2Pix-Zero)",
            category=f"{CATEGORY}/editing",
            description="Pix2Pix-Zero's edit direction: the mean text embedding of sentences about the target "
                        "concept minus that of sentences about the source concept (the whole token sequence). "
                        "Add it to a caption (Add Edit Direction) or edit with it (Pix2Pix-Zero).",
            inputs=[
                io.Clip.Input("clip", tooltip="The CLIP of the model you edit with."),
                io.String.Input("source", multiline=True, default="cat",
                                tooltip="The source concept: words or short phrases (templates on) or whole "
                                        "sentences (templates off), one per line."),
                io.String.Input("target", multiline=True, default="dog",
                                tooltip="The target concept, the same way."),
                io.Boolean.Input("templates", default=True,
                                 tooltip="Put each line into the shipped sentence templates ('a photo of a {}', "
                                         "'a {} in the garden', ... 24 of them); off: each line is a sentence."),
            ],
            outputs=[DirectionType.Output(display_name="direction")],
        )

    @classmethod
    def validate_inputs(cls, source=None, target=None, templates=None):
        def extra(v):
            for name in ("source", "target"):
                if v.get(name) is not None and not prompt_lines(v[name]):
                    raise AttentionControlError(f"{name}: give at least one word or sentence")
        return validation_result(cls, locals(), extra)

    @classmethod
    def execute(cls, clip, source, target, templates):
        check_widgets(cls, locals())
        return io.NodeOutput(build_direction(clip, source, target, templates))


def save_direction(direction: EditDirection, path: str) -> None:
    import safetensors.torch
    safetensors.torch.save_file({"direction": direction.cond.contiguous()}, path,
                                metadata={"format": FORMAT, "info": json.dumps(direction.info)})


def load_direction(path: str, name: str) -> EditDirection:
    import safetensors
    with safetensors.safe_open(path, framework="pt", device="cpu") as f:
        meta = f.metadata() or {}
        keys = list(f.keys())
        t = f.get_tensor("direction") if "direction" in keys else None
    if meta.get("format") != FORMAT or t is None or t.dim() != 3:
        raise AttentionControlError(f"direction_name: '{name}' is not an edit direction saved by Save Edit Direction")
    check_finite("direction_name", t, f"'{name}' is damaged; save the direction again")
    try:
        info = json.loads(meta.get("info") or "{}")
    except ValueError:
        info = {}
    return EditDirection(t.float(), info)


class SaveEditDirection(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="AttnCtl_SaveEditDirection",
            display_name="Save Edit Direction (Pix2Pix-Zero)",
            category=f"{CATEGORY}/editing",
            description="Writes an edit direction to output/edit_directions/ (safetensors); Load Edit Direction "
                        "lists it.",
            inputs=[DirectionType.Input("direction", tooltip="From Edit Direction."),
                    io.String.Input("filename_prefix", default="edit_directions/direction",
                                    tooltip="Path under the output folder, without the extension.")],
            outputs=[],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, direction, filename_prefix):
        path = weight_files.save_path(filename_prefix, "edit_directions/direction")
        save_direction(direction, path)
        log.info("edit direction saved: %s", path)
        return io.NodeOutput()


class LoadEditDirection(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="AttnCtl_LoadEditDirection",
            display_name="Load Edit Direction (Pix2Pix-Zero)",
            category=f"{CATEGORY}/editing",
            description="Loads an edit direction saved by Save Edit Direction.",
            inputs=[io.Combo.Input("direction_name", options=weight_files.listed(FOLDER),
                                   tooltip="A file from models/edit_directions/ or output/edit_directions/.")],
            outputs=[DirectionType.Output(display_name="direction")],
        )

    @classmethod
    def execute(cls, direction_name):
        path = weight_files.find(FOLDER, direction_name, "direction_name")
        return io.NodeOutput(load_direction(path, direction_name))


class AddEditDirection(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="AttnCtl_AddEditDirection",
            display_name="Add Edit Direction (Pix2Pix-Zero)",
            category=f"{CATEGORY}/editing",
            description="Adds strength x an edit direction to every embedding of a conditioning (the edit without "
                        "cross-attention guidance: the image's structure may change; Pix2Pix-Zero keeps it).",
            inputs=[io.Conditioning.Input("conditioning", tooltip="The caption to move (CLIPTextEncode)."),
                    DirectionType.Input("direction", tooltip="From Edit Direction or Load Edit Direction."),
                    io.Float.Input("strength", default=1.0, min=-10.0, max=10.0, step=0.05,
                                   tooltip="Multiple of the direction added; 0: the conditioning unchanged.")],
            outputs=[io.Conditioning.Output(display_name="conditioning")],
        )

    @classmethod
    def validate_inputs(cls, strength=None):
        return validation_result(cls, locals())

    @classmethod
    def execute(cls, conditioning, direction, strength):
        check_widgets(cls, locals())
        if not conditioning:
            raise AttentionControlError("conditioning: connect a conditioning (CLIPTextEncode)")
        return io.NodeOutput(add_direction(conditioning, direction.cond, float(strength)))


def build_pix2pix_zero(model, clip, latent, caption: str, direction: EditDirection, strength: float,
                       guidance: float, guided_steps: float, layers: str, negative_prompt: str):
    check_edit_latent(latent, "Pix2Pix-Zero")
    if not (caption or "").strip():
        raise AttentionControlError("caption: describe the image (the reference item samples it; the edit adds "
                                    "the direction to it)")
    selector = LayerSelector.parse(layers or "all", "layers")
    ctrl = Pix2PixZeroController(guidance, guided_steps, selector)
    positive, negative, lat = edit_batch(clip, latent, [caption, caption], negative_prompt)
    positive = add_direction(positive, direction.cond, float(strength), rows=[1])
    return attach(model, ctrl), positive, negative, lat


class Pix2PixZero(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="AttnCtl_Pix2PixZero",
            display_name="Pix2Pix-Zero",
            category=f"{CATEGORY}/editing",
            description="Pix2Pix-Zero (Parmar et al. 2023): a [reference, edit] batch from one noise; the edit is "
                        "the caption plus the edit direction, and before each guided step its latent takes a "
                        "gradient step that keeps its cross-attention maps on the reference's, so the image keeps "
                        "its structure and only the concept changes. Sample with the outputs (any sampler). For a "
                        "real image: DDIM Inversion -> this node -> Replay Source.",
            inputs=[
                io.Model.Input("model", tooltip="A UNet model (SD1.x / SD2.x / SDXL)."),
                io.Clip.Input("clip", tooltip="Its CLIP: encodes the caption and the negative."),
                io.Latent.Input("latent", tooltip="One latent: empty (a generated image) or inverted (a real one)."),
                io.String.Input("caption", multiline=True, default="a photo of a cat",
                                tooltip="What the image shows (the reference item samples it)."),
                DirectionType.Input("direction", tooltip="From Edit Direction or Load Edit Direction."),
                io.Float.Input("strength", default=1.0, min=-10.0, max=10.0, step=0.05,
                               tooltip="Multiple of the direction added to the caption for the edit item."),
                io.Float.Input("guidance", default=GUIDANCE_REAL, min=0.0, max=10.0, step=0.01,
                               tooltip="Cross-attention guidance step (paper: 0.1 for real images, 0.15 for "
                                       "generated ones); 0: the direction alone."),
                io.Float.Input("guided_steps", default=1.0, min=0.0, max=1.0, step=0.05,
                               tooltip="Fraction of the steps, from the start, that are guided (paper: all)."),
                io.String.Input("layers", default="all",
                                tooltip="Cross-attention layers whose maps are kept (paper: all)."),
                io.String.Input("negative_prompt", default="",
                                tooltip="The negative of both items. Real (inverted) images: the caption, as the "
                                        "paper (the reference item then reconstructs at any CFG and CFG amplifies "
                                        "only the direction); generated images: empty or a usual negative."),
            ],
            outputs=[io.Model.Output(display_name="model"), io.Conditioning.Output(display_name="positive"),
                     io.Conditioning.Output(display_name="negative"), io.Latent.Output(display_name="latent")],
        )

    @classmethod
    def validate_inputs(cls, caption=None, strength=None, guidance=None, guided_steps=None, layers=None):
        def extra(v):
            if v.get("caption") is not None and not v["caption"].strip():
                raise AttentionControlError("caption: describe the image")
            if v.get("layers") is not None:
                LayerSelector.parse(v["layers"] or "all", "layers")
        return validation_result(cls, locals(), extra)

    @classmethod
    def execute(cls, model, clip, latent, caption, direction, strength, guidance, guided_steps, layers,
                negative_prompt):
        check_widgets(cls, locals())
        return io.NodeOutput(*build_pix2pix_zero(model, clip, latent, caption, direction, strength, guidance,
                                                 guided_steps, layers, negative_prompt))


NODES = [EditDirectionNode, SaveEditDirection, LoadEditDirection, AddEditDirection, Pix2PixZero]
