"""Node: AttnCtl_TiledDiffusion (MultiDiffusion / Mixture of Diffusers / DiffCollage)."""
from __future__ import annotations

from comfy_api.latest import io

from ..attention.core import AttentionControlError
from ..attention.tiled import MODES, TileConfig
from ..attention.tiled_glue import SIZE_CONDS, attach_tiled
from .common import CATEGORY, check_widgets, validation_result

PX = 8          # pixels per latent pixel (SD1.x / SDXL VAEs)


def _latent_px(name: str, value: int) -> int:
    if value % PX:
        lo = value - value % PX
        raise AttentionControlError(f"{name}: {value} px is not a multiple of {PX} (the latent is 1/{PX} of the image); "
                                    f"use {lo or PX} or {lo + PX}")
    return value // PX


def _config(tile_width, tile_height, overlap, merge, tile_batch_size, wrap_horizontal) -> TileConfig:
    """The checked tile configuration of the node's widget values (pixels -> latent pixels)."""
    cfg = TileConfig(_latent_px("tile_height", tile_height), _latent_px("tile_width", tile_width),
                     _latent_px("overlap", overlap), merge, int(tile_batch_size), bool(wrap_horizontal))
    return cfg.validate(scale=PX)


class TiledDiffusion(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="AttnCtl_TiledDiffusion",
            display_name="Tiled Diffusion (MultiDiffusion)",
            category=f"{CATEGORY}/sampling",
            description="Samples a latent of any size (panoramas, large canvases) as overlapping tiles that are "
                        "denoised separately and merged every step: MultiDiffusion (average), Mixture of Diffusers "
                        "(Gaussian weights) or DiffCollage (tiles minus overlaps). Works with every sampler node.",
            inputs=[
                io.Model.Input("model", tooltip="The model to sample with; it is cloned, the input stays unpatched."),
                io.Int.Input("tile_width", default=512, min=8, max=16384, step=8,
                             tooltip="Tile width in pixels (the size the model was trained at, e.g. 512 for SD1.5, "
                                     "1024 for SDXL). Clamped to the canvas when the canvas is narrower."),
                io.Int.Input("tile_height", default=512, min=8, max=16384, step=8,
                             tooltip="Tile height in pixels. Clamped to the canvas when the canvas is lower."),
                io.Int.Input("overlap", default=128, min=0, max=16384, step=8,
                             tooltip="Overlap of neighbouring tiles in pixels; must be smaller than the tile. More "
                                     "overlap blends better and costs more tiles (DiffCollage: half a tile)."),
                io.Combo.Input("merge", options=list(MODES), default="mixture",
                               tooltip="mixture (default, seamless): Gaussian tile weights (sigma 0.1 x tile), "
                                       "normalised per pixel, so tile borders leave no trace; multidiffusion: the "
                                       "paper's per-pixel average of the tiles' denoised predictions (exact; can leave "
                                       "bands where neighbouring tiles disagree); "
                                       "diffcollage: sum of the tiles minus the overlaps evaluated by the model."),
                io.Int.Input("tile_batch_size", default=1, min=1, max=64,
                             tooltip="Tiles per model call: larger is faster and uses more memory (1 uses the "
                                     "least memory)."),
                io.Boolean.Input("wrap_horizontal", default=False,
                                 tooltip="Seamless 360 panorama: tiles crossing the right edge continue at the "
                                         "left edge, so the left and right borders join."),
                io.Combo.Input("sdxl_size_cond", options=list(SIZE_CONDS), default=SIZE_CONDS[0],
                               tooltip="SDXL only: 'per tile' conditions each tile as a crop of the canvas (crop = "
                                       "the tile's offset, target size = the tile); 'as given' keeps the prompt's "
                                       "size conditioning for every tile."),
            ],
            outputs=[io.Model.Output(display_name="model")],
        )

    @classmethod
    def validate_inputs(cls, tile_width=None, tile_height=None, overlap=None, merge=None, tile_batch_size=None,
                        wrap_horizontal=None):
        def extra(v):
            if None not in (tile_width, tile_height, overlap, merge, tile_batch_size):
                _config(tile_width, tile_height, overlap, merge, tile_batch_size, bool(wrap_horizontal))
        return validation_result(cls, locals(), extra)

    @classmethod
    def execute(cls, model, tile_width, tile_height, overlap, merge, tile_batch_size, wrap_horizontal,
                sdxl_size_cond="per tile"):
        cfg = _config(tile_width, tile_height, overlap, merge, tile_batch_size, wrap_horizontal)
        check_widgets(cls, locals())
        return io.NodeOutput(attach_tiled(model, cfg, sdxl_size_cond))


NODES = [TiledDiffusion]
