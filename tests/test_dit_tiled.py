"""Tiled diffusion on DiT models (issue 17): tiny random models of each family on the real ComfyUI
0.3.75 classes. One tile covering the canvas samples bit for bit as without the node; with several
tiles each tile's tokens get the positions they have in the canvas: the first image attention's
queries of a tile (which depend only on the token and its position) equal the whole canvas's
queries at the tile's place, and differ where positions start at 0 as they did before."""
from __future__ import annotations

import logging

import pytest
import torch

from attention_control.attention import dit_tiled_glue as DT
from attention_control.attention import tiled as T
from attention_control.attention import tiled_glue as G
from attention_control.attention.core import AttentionControlError, UnsupportedModelError
from attention_control.attention.dit_router import DitController, attach_dit
from attention_control.nodes.tiled import TiledDiffusion
from ac_dit import TXT, forward, sample, tiny

FAMILIES = DT.TILED_DIT_FAMILIES
PATCH = {"Flux.2": 1}                             # latent pixels per patch side; 2 for the others
PX = {"Flux.2": 16}                               # image pixels per latent pixel; 8 for the others
# canvas (latent H, W), tile (H, W) and overlap in latent pixels: a 2 x 2 grid of tiles with rows at 0 and a
# quarter of the canvas, columns at 0 and a third: every tile but the first is off the origin on some axis
LAYOUT = {"Flux.2": ((8, 12), (6, 8), 4), "Wan": ((8, 12), (6, 8), 4)}
DEFAULT_LAYOUT = ((16, 24), (12, 16), 8)
COND_EXTRA = {
    "Flux": lambda g: {"pooled_output": torch.randn(1, 16, generator=g), "guidance": 3.5},
    "Flux.2": lambda g: {"pooled_output": torch.randn(1, 16, generator=g), "guidance": 3.5},
    "Chroma": lambda g: {"pooled_output": torch.randn(1, 16, generator=g), "guidance": 0.0},
    "SD3": lambda g: {"pooled_output": torch.randn(1, 32, generator=g)},
}
CHANNELS = {"Flux.2": 128}


def canvas_shape(family, hw):
    c = CHANNELS.get(family, 16)
    if family == "Wan":
        return (1, c, 2, *hw)                       # two latent frames: every tile holds both
    if family == "Qwen-Image":
        return (1, c, 1, *hw)
    return (1, c, *hw)


def canvas_inputs(family, hw, seed=5):
    """(x, conds) of one model call on a canvas of latent size hw (conds as in ac_dit.inputs)."""
    t = tiny(family)
    g = torch.Generator().manual_seed(seed)
    return torch.randn(canvas_shape(family, hw), generator=g), t.conds


def conditioning(family, seed=1):
    g = torch.Generator().manual_seed(seed)
    extra = COND_EXTRA.get(family, lambda g: {})
    return ([[torch.randn(1, TXT, 32, generator=g), extra(g)]], [[torch.randn(1, TXT, 32, generator=g), extra(g)]])


def tiled(model, tile, overlap, merge="multidiffusion", batch=1, wrap=False):
    return G.attach_tiled(model, T.TileConfig(tile[0], tile[1], overlap, merge, batch, wrap))


def node(model, tw, th, overlap, merge="mixture", batch=1, wrap=False):
    out = TiledDiffusion.execute(model, tw, th, overlap, merge, batch, wrap, "per tile")
    return (out.result if hasattr(out, "result") else out)[0]


# the first attention call of a model call that has image queries: Lumina 2 / Z-Image refine the text first
FIRST_IMAGE_CALL = {"Lumina 2": 1, "Z-Image": 1}


class FirstImageQueries(DitController):
    """Records, for each model call, the image-token queries of the first attention call that has
    image queries (after RoPE where the family uses it), with the call's tile pieces and rope_options."""
    name = "first image queries"

    def __init__(self, family):
        self.first = FIRST_IMAGE_CALL.get(family, 0)
        self.seen = []

    def attend(self, call):
        if call.site.call_index != self.first:
            return None
        to = call.transformer_options
        assert call.site.stream in ("joint", "image_self", "image_refiner") and call.q_image is not None, call.site
        q = call.split_heads(call.q)[:, :, call.q_image]                     # (rows, heads, n_image, d)
        f, h, w = call.grid
        self.seen.append(dict(q=q.reshape(q.shape[0], q.shape[1], f, h, w, q.shape[-1]).clone(),
                              tile=to.get(G.TILE_KEY), rope=dict(to.get("rope_options") or {}), grid=call.grid,
                              site=call.site))
        return None


def grid_rows(q, piece, patch):
    r0, c0 = piece.rows.start // patch, piece.cols.start // patch
    return q[:, :, :, r0:r0 + piece.rows.size // patch, c0:c0 + piece.cols.size // patch]


# --------------------------------------------------------------------------------------------
# one tile covering the canvas == untiled

@pytest.mark.parametrize("family", FAMILIES)
def test_one_tile_covering_the_canvas_is_bit_identical(family):
    """comfy.sample.sample (cfg 2.5: cond and uncond rows in one call), 2 euler steps: the tiled MODEL
    with one tile (exact fit, and a tile larger than the canvas, which is clamped) equals the plain MODEL."""
    t = tiny(family)
    hw = LAYOUT.get(family, DEFAULT_LAYOUT)[0]
    pos, neg = conditioning(family)
    shape = canvas_shape(family, hw)
    g = torch.Generator().manual_seed(3)
    noise, lat = torch.randn(shape, generator=g), torch.zeros(shape)
    ref = sample(t.patcher, noise, pos, neg, lat)
    assert torch.isfinite(ref).all()
    px = PX.get(family, 8)
    for tw, th, merge in ((hw[1] * px, hw[0] * px, "mixture"), (2048, 2048, "diffcollage")):
        assert torch.equal(sample(node(t.patcher, tw, th, 0, merge, 2), noise, pos, neg, lat), ref), (tw, th)


# --------------------------------------------------------------------------------------------
# several tiles: each tile's tokens at their canvas positions

@pytest.mark.parametrize("family", FAMILIES)
def test_tile_queries_match_the_canvas_at_the_tiles_place(family):
    """4 tiles (2 x 2, tile batch 2). The first image attention's queries depend only on the token,
    the step and the token's position: each tile's must equal the canvas forward's rows at the tile's
    place. An untiled forward of the same crop (positions from the origin, or SD3's centred crop of the
    tile's size: what tiles got before) differs. rope_options families get one tile per call with the
    shift of its offset in patches."""
    t = tiny(family)
    hw, tile, overlap = LAYOUT.get(family, DEFAULT_LAYOUT)
    patch = PATCH.get(family, 2)
    x, conds = canvas_inputs(family, hw)
    full = FirstImageQueries(family)
    forward(attach_dit(t.patcher, full), x, conds)
    assert len(full.seen) == 1
    q_canvas = full.seen[0]["q"]

    rec = FirstImageQueries(family)
    out = forward(attach_dit(tiled(t.patcher, tile, overlap, batch=2), rec), x, conds)
    assert out.shape == x.shape and torch.isfinite(out).all()
    plan = T.plan_tiles(*hw, T.TileConfig(tile[0], tile[1], overlap), patch)
    assert len(plan.pieces) == 4 and {(p.rows.start, p.cols.start) for p in plan.pieces} == {
        (0, 0), (0, hw[1] - tile[1]), (hw[0] - tile[0], 0), (hw[0] - tile[0], hw[1] - tile[1])}
    one_per_call = family in DT.ROPE_OPTION_FAMILIES
    assert len(rec.seen) == (4 if one_per_call else 2)
    seen_pieces = []
    for s in rec.seen:
        pieces = s["tile"]["pieces"]
        assert s["grid"][1:] == (tile[0] // patch, tile[1] // patch)
        assert s["grid"][0] == (2 if family == "Wan" else 1)                   # Wan: all frames in each tile
        if one_per_call:
            assert len(pieces) == 1
            assert s["rope"] == {"shift_y": pieces[0].rows.start // patch, "shift_x": pieces[0].cols.start // patch}
        else:
            assert len(pieces) == 2 and s["rope"] == {}
        for j, p in enumerate(pieces):
            q_tile = s["q"][j:j + 1]
            assert torch.allclose(q_tile, grid_rows(q_canvas, p, patch), atol=2e-5, rtol=1e-5), (family, p)
            seen_pieces.append(p)
    assert sorted(seen_pieces, key=lambda p: (p.rows.start, p.cols.start)) == sorted(
        plan.pieces, key=lambda p: (p.rows.start, p.cols.start))

    # the crops on their own (the positions tiles had before): the queries of tiles off the origin differ
    worst = 0.0
    for p in plan.pieces:
        crop = T.crop(x, p, *hw)
        own = FirstImageQueries(family)
        forward(attach_dit(t.patcher, own), crop, conds)
        worst = max(worst, float((own.seen[0]["q"] - grid_rows(q_canvas, p, patch)).abs().max()))
    assert worst > 1e-2, worst


def test_flux_tile_output_equals_the_model_on_the_crop_with_the_shift_by_hand():
    """Overlap 0, 1 x 2 tiles of 16 x 16 on a 16 x 32 Flux canvas: the merged output of each tile is its
    own model call's. It equals the plain model on the crop with rope_options set by hand (shift_x =
    16 / 2 patches for the right tile), bit for bit; and a rope_options set by another node
    (scale 0.5, shift 3) is composed: the right tile gets shift_x 3 + 8 * 0.5."""
    t = tiny("Flux")
    x, conds = canvas_inputs("Flux", (16, 32))
    for other in (None, dict(scale_x=0.5, shift_x=3.0, scale_y=1.0, shift_y=1.0, scale_t=1.0, shift_t=0.0)):
        base = t.patcher.clone()
        if other is not None:
            base.set_model_rope_options(**other)
        out = forward(tiled(base, (16, 16), 0), x, conds)
        for c0 in (0, 16):
            hand = base.clone()
            sx, sy = (0.0, 0.0) if other is None else (other["shift_x"], other["shift_y"])
            scale = 1.0 if other is None else other["scale_x"]
            hand.set_model_rope_options(scale_x=scale, shift_x=sx + (c0 // 2) * scale, scale_y=1.0, shift_y=sy,
                                        scale_t=1.0, shift_t=0.0)
            want = forward(hand, x[..., c0:c0 + 16], conds)
            assert torch.equal(out[..., c0:c0 + 16], want), (other, c0)
        if other is not None:           # the other node's options are read, not changed
            assert base.model_options["transformer_options"]["rope_options"] == other
    # without its shift the right tile is another output; only just: RoPE is relative, so a uniform shift of a
    # tile's image ids changes only their offsets to the text ids (all 0), and this random model's attention is
    # nearly uniform (output change ~1e-6). The query test above is the one that pins the ids themselves.
    assert not torch.equal(out[..., 16:], forward(t.patcher, x[..., 16:], conds))


def test_wrapped_panorama_continues_positions_across_the_seam():
    """wrap_horizontal on Flux: the tile that crosses the right edge gets contiguous positions from
    its start (RoPE sees relative positions: the left-edge columns follow the right-edge ones)."""
    t = tiny("Flux")
    x, conds = canvas_inputs("Flux", (16, 32))
    rec = FirstImageQueries("Flux")
    forward(attach_dit(tiled(t.patcher, (16, 16), 8, wrap=True), rec), x, conds)
    starts = sorted(s["tile"]["pieces"][0].cols.start for s in rec.seen)
    assert starts == [0, 8, 16, 24]
    seam = next(s for s in rec.seen if s["tile"]["pieces"][0].cols.start == 24)
    assert seam["rope"] == {"shift_y": 0, "shift_x": 12}


def test_sd3_beyond_the_position_grid_keeps_the_tiles_own_embedding(caplog):
    """A canvas wider than SD3's position grid (16 patches here; the untiled model cannot sample it)
    tiles with each tile's own embedding along the width, canvas positions along the height, and
    says so when sampling starts."""
    t = tiny("SD3")
    pos, neg = conditioning("SD3")
    shape = (1, 16, 16, 40)                                     # 8 x 20 patches: wider than 16
    g = torch.Generator().manual_seed(3)
    with caplog.at_level(logging.INFO, logger="attention_control"):
        out = sample(node(t.patcher, 128, 96, 32, "mixture"), torch.randn(shape, generator=g), pos, neg,
                     torch.zeros(shape), steps=1)
    assert torch.isfinite(out).all()
    assert any("along the width the SD3 tiles keep their own position embedding" in r.getMessage()
               for r in caplog.records)
    assert not any("along the height" in r.getMessage() for r in caplog.records)
    assert DT.sd3_axes(t.patcher.model.diffusion_model, (16, 40), 2, False) == (True, False)
    assert DT.sd3_axes(t.patcher.model.diffusion_model, (16, 24), 2, True) == (True, False)


# --------------------------------------------------------------------------------------------
# composition, leaks, errors

def test_router_attached_before_the_tiles_sees_each_tile(caplog):
    """The DiT router attached before the tiled node wraps the whole model call; each tile call still
    gets its own override: the tile's grid, block ids from 0 in every tile (Lumina 2 counts calls),
    and no warning that the router missed a model call."""
    t = tiny("Lumina 2")
    x, conds = canvas_inputs("Lumina 2", (16, 24))

    class Sites(DitController):
        name = "sites"

        def __init__(self):
            self.seen = []

        def attend(self, call):
            self.seen.append((call.site.block_type, call.site.block_index, call.grid))
            return None

    rec = Sites()
    m = tiled(attach_dit(t.patcher, rec), (12, 16), 8)
    with caplog.at_level(logging.WARNING, logger="attention_control"):
        forward(m, x, conds)
    assert not [r for r in caplog.records if "saw no attention call" in r.getMessage()]
    per_call = [("context_refiner", 0), ("noise_refiner", 0), ("layer", 0), ("layer", 1)]
    assert [s[:2] for s in rec.seen] == per_call * 4
    assert {s[2] for s in rec.seen} == {(1, 6, 8)}


@pytest.mark.parametrize("family", ("Flux", "Chroma", "SD3", "Qwen-Image"))
def test_tiled_run_leaves_no_patch_behind(family):
    """After a tiled run a plain sample of the input MODEL is bit-identical to one before it, and
    neither MODEL keeps rope_options, dit replace patches or the run state."""
    t = tiny(family)
    hw, tile, overlap = LAYOUT.get(family, DEFAULT_LAYOUT)
    pos, neg = conditioning(family)
    shape = canvas_shape(family, hw)
    g = torch.Generator().manual_seed(4)
    noise, lat = torch.randn(shape, generator=g), torch.zeros(shape)
    before = sample(t.patcher, noise, pos, neg, lat, steps=1)
    opts_before = repr(t.patcher.model_options)
    px = PX.get(family, 8)
    m = node(t.patcher, tile[1] * px, tile[0] * px, overlap * px, "mixture", 2)
    out = sample(m, noise, pos, neg, lat, steps=1)
    assert not torch.equal(out, before)
    for mp in (t.patcher, m):
        to = mp.model_options.get("transformer_options", {})
        assert "rope_options" not in to and "dit" not in to.get("patches_replace", {}) and G.RUN_KEY not in to
    assert repr(t.patcher.model_options) == opts_before
    assert torch.equal(sample(t.patcher, noise, pos, neg, lat, steps=1), before)


@pytest.mark.parametrize("family,tw,th,overlap,match", [
    ("Flux", 520, 512, 128, r"tile_width: 520 px is not a multiple of 16 \(Flux: the latent is 1/8 of the image and "
                            r"the model's patch is 2 latent pixels.*use 512 or 528"),
    ("Wan", 512, 504, 128, r"tile_height: 504 px is not a multiple of 16 \(Wan.*use 496 or 512"),
    ("SD3", 512, 512, 120, r"overlap: 120 px is not a multiple of 16 \(SD3.*use 112 or 128"),
    ("Flux.2", 512, 520, 128, r"tile_height: 520 px is not a multiple of 16 \(Flux.2: the latent is 1/16 of the "
                              r"image and the model's patch is 1 latent pixel"),
])
def test_patch_multiple_errors_name_the_input(family, tw, th, overlap, match):
    with pytest.raises(AttentionControlError, match=match):
        node(tiny(family).patcher, tw, th, overlap)


def test_flux2_tiles_are_16_px_per_latent_pixel():
    m = node(tiny("Flux.2").patcher, 96, 128, 32)
    w = G.tiled_wrappers(m)
    assert (w.cfg.tile_h, w.cfg.tile_w, w.cfg.overlap) == (8, 6, 2) and w.dit.px == 16 and w.dit.patch == 1


def test_latent_and_config_errors_before_the_first_step():
    t = tiny("Flux")
    pos, neg = conditioning("Flux")
    calls = []
    m = node(t.patcher, 64, 64, 32).clone()
    m.add_wrapper_with_key("apply_model", "count", lambda ex, *a, **k: (calls.append(1), ex(*a, **k))[1])
    with pytest.raises(AttentionControlError, match=r"latent: the canvas width \(136 px\) is not a multiple of 16 px, "
                                                    r"the Flux patch.*use a width of 128 or 144 px"):
        sample(m, torch.randn(1, 16, 16, 17), pos, neg, torch.zeros(1, 16, 16, 17), steps=1)
    assert calls == []
    with pytest.raises(AttentionControlError, match="tile_width: 7 latent pixels is not a multiple of the Flux patch"):
        G.attach_tiled(t.patcher, T.TileConfig(8, 7, 2))
    with pytest.raises(AttentionControlError, match=r"latent: tiled diffusion on Flux needs a latent \(batch, "
                                                    r"channels, height, width\)"):
        G.tiled_wrappers(m).check_canvas((1, 16, 2, 16, 16))


def test_models_that_cannot_be_tiled_are_refused_with_the_families_that_work():
    class Other(torch.nn.Module):
        pass

    class Model:
        diffusion_model = Other()
        model_config = None

    class Patcher:
        model = Model()

    with pytest.raises(UnsupportedModelError) as e:
        node(Patcher(), 512, 512, 128)
    msg = str(e.value)
    assert msg.startswith("model: tiled diffusion cannot give the tiles of") and "Other" in msg
    for fam in ("SD1.x", "SDXL") + FAMILIES:
        assert fam in msg


def test_dit_controlnet_token_residuals_are_cropped_per_tile():
    """A DiT ControlNet residual is one row per image token of the canvas: each tile gets its tokens."""
    B, H, W, patch = 2, 8, 12, 2
    grid = torch.arange(B * (H // 2) * (W // 2) * 3, dtype=torch.float32).reshape(B, H // 2, W // 2, 3)
    tokens = grid.reshape(B, -1, 3)
    plan = T.plan_tiles(H, W, T.TileConfig(4, 8, 2, wrap=True), patch)
    ctrl = {"input": [tokens, None], "output": [torch.ones(B)]}
    got = DT.batch_dit_control(ctrl, list(plan.pieces[:2]), B, (H, W), patch, lambda c: c * 10)
    for j, p in enumerate(plan.pieces[:2]):
        cols = [(p.cols.start // 2 + i) % (W // 2) for i in range(p.cols.size // 2)]
        want = grid[:, p.rows.start // 2:(p.rows.start + p.rows.size) // 2][:, :, cols].reshape(B, -1, 3)
        assert torch.equal(got["input"][0][j * B:(j + 1) * B], want)
    assert got["input"][1] is None and torch.equal(got["output"][0], torch.ones(B) * 10)
    wrapped = [p for p in plan.pieces if p.cols.start + p.cols.size > W]
    assert wrapped                                              # the layout has a tile across the seam
    DT.batch_dit_control(ctrl, wrapped, B, (H, W), patch, lambda c: c)


def test_wrap_starts_stay_on_the_patch_grid():
    for length in (16, 24, 40, 64):
        for tile, overlap in ((8, 4), (12, 6), (10, 2)):
            spans = T.axis_tiles(length, tile, overlap, True, 2)
            assert all(s.start % 2 == 0 for s in spans) and T.coverage(spans, length).min() >= 1
    assert T.axis_tiles(37, 8, 3, True) == T.axis_tiles(37, 8, 3, True, 1)          # UNet layout unchanged
