"""Nodes: AttnCtl_ShapesWorldLoader and AttnCtl_ShapesWorldDiTLoader (the small trained "shapes world"
models shipped with the pack: a UNet and a Flux-class DiT)."""
from __future__ import annotations

import os

from comfy_api.latest import io

from .common import CATEGORY

def OUTPUTS():
    return [io.Model.Output(display_name="MODEL"), io.Clip.Output(display_name="CLIP"),
            io.Vae.Output(display_name="VAE")]


def _load(loader, file: str, make_target: str):
    """(MODEL, CLIP, VAE) from the shipped weights file, or a named error saying how to build it."""
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "shapesworld", "weights", file)
    if not os.path.exists(path):
        raise FileNotFoundError(f"shapes world weights not found at {path}: run `make {make_target}`")
    return io.NodeOutput(*loader(path))


class ShapesWorldLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="AttnCtl_ShapesWorldLoader",
            display_name="Shapes World Loader (demo model)",
            category=f"{CATEGORY}/debug",
            description="Loads the tiny text-to-image model trained on synthetic shapes (circles, squares, "
                        "triangles in red, green, blue, yellow) that ships with the pack. It runs on CPU in "
                        "seconds and is used by the demo and the semantic tests. Use it with the stock "
                        "CLIPTextEncode, KSampler, EmptyLatentImage (256x256 -> 32x32 latent) and VAEDecode.",
            inputs=[],
            outputs=OUTPUTS(),
        )

    @classmethod
    def execute(cls):
        from ..shapesworld.comfy_glue import load_shapes_world
        return _load(load_shapes_world, "shapes_world.safetensors", "shapes-model")


class ShapesWorldDiTLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="AttnCtl_ShapesWorldDiTLoader",
            display_name="Shapes World DiT Loader (test model)",
            category=f"{CATEGORY}/debug",
            description="Loads the tiny Flux-class transformer (DiT) trained on the same synthetic shapes as the "
                        "Shapes World Loader's UNet: ComfyUI's own Flux model (joint attention in double and single "
                        "blocks, RoPE, rectified flow, no guidance embedding, so ordinary CFG). It runs on CPU in "
                        "seconds and is used by the semantic tests of the DiT attention techniques. Use it with the "
                        "stock CLIPTextEncode, KSampler, EmptyLatentImage (256x256 -> 32x32 latent) and VAEDecode.",
            inputs=[],
            outputs=OUTPUTS(),
        )

    @classmethod
    def execute(cls):
        from ..shapesworld.comfy_glue import load_shapes_world_dit
        return _load(load_shapes_world_dit, "shapes_world_dit.safetensors", "shapes-model-dit")


NODES = [ShapesWorldLoader, ShapesWorldDiTLoader]
