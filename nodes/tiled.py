"""Node: AttnCtl_TiledDiffusion (MultiDiffusion / Mixture of Diffusers / DiffCollage)."""
from __future__ import annotations

from comfy_api.latest import io

from ..attention.core import AttentionControlError
from ..attention.dit_tiled_glue import TILED_DIT_FAMILIES, tiling_of
from ..attention.tiled import MODES, TileConfig
from ..attention.tiled_glue import SIZE_CONDS, attach_tiled
from .common import CATEGORY, check_widgets, validation_result

PX = 8          # pixels per latent pixel (SD1.x / SDXL VAEs; most DiT VAEs)
DIT_TEXT = ", ".join(TILED_DIT_FAMILIES)


def _latent_px(name: str, value: int, px: int = PX, patch: int = 1, family: str | None = None) -> int:
    step = px * patch
    if value % step:
        lo = value - value % step
        why = (f"the latent is 1/{px} of the image" if patch == 1 and family is None else
               f"{family}: the latent is 1/{px} of the image and the model's patch is {patch} latent "
               f"pixel{'s' if patch > 1 else ''}, so tiles must start and end on its {step} px grid")
        raise AttentionControlError(f"{name}: {value} px is not a multiple of {step} ({why}); use {lo or step} or "
                                    f"{lo + step}")
    return value // px


def _config(tile_width, tile_height, overlap, merge, tile_batch_size, wrap_horizontal, tiling=None) -> TileConfig:
    """The checked tile configuration of the node's widget values (pixels -> latent pixels); `tiling`:
    the model's DitTiling (None: a UNet, or the model is not known yet)."""
    px, patch, fam = (tiling.px, tiling.patch, tiling.family) if tiling is not None else (PX, 1, None)
    cfg = TileConfig(_latent_px("tile_height", tile_height, px, patch, fam),
                     _latent_px("tile_width", tile_width, px, patch, fam),
                     _latent_px("overlap", overlap, px, patch, fam), merge, int(tile_batch_size), bool(wrap_horizontal))
    return cfg.validate(scale=px)


class TiledDiffusion(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="AttnCtl_TiledDiffusion",
            display_name="Tiled Diffusion (MultiDiffusion)",
            category=f"{CATEGORY}/sampling",
            description="Samples a latent of any size (panoramas, large canvases) as overlapping tiles that are "
                        "denoised separately and merged every step: MultiDiffusion (average), Mixture of Diffusers "
                        "(Gaussian weights) or DiffCollage (tiles minus overlaps). Works with every sampler node, on "
                        f"UNet models (SD1.x, SD2.x, SDXL) and on the DiT families {DIT_TEXT}, whose tiles get "
                        "the positions they have in the canvas (RoPE shift or position-embedding window).",
            inputs=[
                io.Model.Input("model", tooltip="The model to sample with; it is cloned, the input stays unpatched. "
                                                "UNets (SD1.x, SD2.x, SDXL) or a DiT: " + DIT_TEXT + " (Wan: every "
                                                "frame in each tile). On a DiT each tile gets its canvas positions: "
                                                "Flux, Flux.2, Wan, Lumina 2, Z-Image through rope_options (added to "
                                                "one another node set; one tile per model call), Chroma and "
                                                "Qwen-Image through the RoPE table of each block, SD3 through its "
                                                "position-embedding window. Other models are refused."),
                io.Int.Input("tile_width", default=512, min=8, max=16384, step=8,
                             tooltip="Tile width in pixels (the size the model was trained at, e.g. 512 for SD1.5, "
                                     "1024 for SDXL and most DiTs). Clamped to the canvas when the canvas is "
                                     "narrower. On a DiT a multiple of 16 px (8 px per latent pixel x patch 2; "
                                     "Flux.2: 16 px x patch 1)."),
                io.Int.Input("tile_height", default=512, min=8, max=16384, step=8,
                             tooltip="Tile height in pixels. Clamped to the canvas when the canvas is lower."),
                io.Int.Input("overlap", default=128, min=0, max=16384, step=8,
                             tooltip="Overlap of neighbouring tiles in pixels; must be smaller than the tile. More "
                                     "overlap blends better and costs more tiles (DiffCollage: half a tile). On a "
                                     "DiT a multiple of 16 px, like the tile."),
                io.Combo.Input("merge", options=list(MODES), default="mixture",
                               tooltip="mixture (default, seamless): Gaussian tile weights (sigma 0.1 x tile), "
                                       "normalised per pixel, so tile borders leave no trace; multidiffusion: the "
                                       "paper's per-pixel average of the tiles' denoised predictions (exact; can leave "
                                       "bands where neighbouring tiles disagree); "
                                       "diffcollage: sum of the tiles minus the overlaps evaluated by the model."),
                io.Int.Input("tile_batch_size", default=1, min=1, max=64,
                             tooltip="Tiles per model call: larger is faster and uses more memory (1 uses the "
                                     "least memory). Flux, Flux.2, Wan, Lumina 2 and Z-Image take one tile per "
                                     "call (one RoPE shift per call)."),
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
        tiling = tiling_of(model)                   # a model that cannot be tiled is refused here, before sampling
        if tiling is not None:                      # a DiT: its pixels per latent pixel and patch grid
            cfg = _config(tile_width, tile_height, overlap, merge, tile_batch_size, wrap_horizontal, tiling)
        return io.NodeOutput(attach_tiled(model, cfg, sdxl_size_cond))


NODES = [TiledDiffusion]
