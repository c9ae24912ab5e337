"""Issue 15, no silent failure on bad input: every bad number, mask and widget value is a named error
(the message starts with, or names, the input), raised in validate_inputs where it follows from
widget values alone, else in execute or at sampling start, before the first model call."""
import pytest
import torch

import ac_models as M
from attention_control.attention.core import AttentionControlError
from attention_control.attention.layout import LayoutController
from attention_control.attention.validate import check_finite, check_mask, check_range
from attention_control.nodes import all_nodes
from attention_control.nodes.capture import AttentionHeatmap, CaptureAttention
from attention_control.nodes.collage import CollageLayer, CollageLayers
from attention_control.nodes.inversion import DDIMInversion, NullTextInversion
from attention_control.nodes.layout import Boxes, LayoutGuidance
from attention_control.nodes.masactrl import MasaCtrl
from attention_control.nodes.p2p import PromptToPrompt
from attention_control.nodes.regions import PaintWithWords, RegionConditioning, RegionPrompt
from attention_control.nodes.tiled import TiledDiffusion
from comfy_api.latest import io

NAN, INF = float("nan"), float("inf")
SRC, TGT = "a red circle on the left", "a red circle on the right"


def _res(out):
    return out.result if hasattr(out, "result") else out


def _named(excinfo_or_msg, name):
    msg = excinfo_or_msg if isinstance(excinfo_or_msg, str) else str(excinfo_or_msg.value)
    assert msg.startswith(f"{name}") or f"{name}:" in msg, f"{name!r} not named in: {msg}"
    return msg


# ---------------------------------------------------------------- the shared checks (pure torch)

def test_check_finite_and_range_name_the_input():
    assert check_finite("w", 1.5) == 1.5
    for bad in (NAN, INF, -INF):
        with pytest.raises(AttentionControlError, match=r"^w: .* not a finite number"):
            check_finite("w", bad)
    with pytest.raises(AttentionControlError, match=r"^w: 'abc' is not a number"):
        check_finite("w", "abc")
    t = torch.ones(4)
    t[1] = NAN
    t[2] = INF
    with pytest.raises(AttentionControlError, match=r"^m: 2 of 4 values are not finite \(1 NaN, 1 infinite\)"):
        check_finite("m", t)
    assert check_range("x", 0.5, 0.0, 1.0) == 0.5
    with pytest.raises(AttentionControlError, match=r"^x: 2 is above the maximum 1; use a value in \[0, 1\]"):
        check_range("x", 2.0, 0.0, 1.0)
    with pytest.raises(AttentionControlError, match=r"^x: -1 is below the minimum 0"):
        check_range("x", -1.0, 0.0, None)
    with pytest.raises(AttentionControlError, match=r"^x: nan is not a finite number"):
        check_range("x", NAN, 0.0, 1.0)


def test_check_mask():
    assert check_mask("m", None) is None
    assert check_mask("m", torch.ones(8, 8)).shape == (1, 8, 8)
    bad = torch.ones(1, 8, 8)
    bad[0, 3, 3] = NAN
    with pytest.raises(AttentionControlError, match=r"^m: layer 2: 1 of 64 values are not finite"):
        check_mask("m", bad, "layer 2")
    with pytest.raises(AttentionControlError, match=r"^m: got a batch of 3 masks where one mask is expected"):
        check_mask("m", torch.ones(3, 8, 8), single=True)
    with pytest.raises(AttentionControlError, match=r"^m: mask 2 of the batch covers nothing"):
        check_mask("m", torch.stack([torch.ones(8, 8), torch.zeros(8, 8)]), nonempty=True)
    with pytest.raises(AttentionControlError, match=r"^m: expected a MASK"):
        check_mask("m", torch.ones(8))


# ---------------------------------------------------------------- validate_inputs: every float widget

def _float_widgets():
    out = []
    for cls in all_nodes():
        for inp in cls.define_schema().inputs or []:
            if isinstance(inp, io.Float.Input):
                out.append((cls, inp))
    return out


FLOATS = _float_widgets()


@pytest.mark.parametrize("cls,inp", FLOATS, ids=[f"{c.define_schema().node_id}.{i.id}" for c, i in FLOATS])
@pytest.mark.parametrize("value", [NAN, INF, -INF, "range"])
def test_every_float_widget_is_checked_in_validate_inputs(cls, inp, value):
    """ComfyUI skips its own range check for the inputs a validate_inputs names and passes NaN through
    its range checks: the node's validate_inputs must refuse NaN, inf and out-of-range values."""
    if value == "range":
        value = (inp.max + 1.0) if inp.max is not None else (inp.min - 1.0)
    r = cls.validate_inputs(**{inp.id: value})
    assert r is not True, f"{cls.define_schema().node_id}.{inp.id} = {value} passed validation"
    _named(r, inp.id)
    assert cls.validate_inputs(**{inp.id: inp.default}) is True


def test_linked_inputs_arrive_as_none_and_pass():
    """A widget converted to a linked input reaches validate_inputs as None: nothing to check yet."""
    for cls, inp in FLOATS:
        assert cls.validate_inputs(**{inp.id: None}) is True


WIDGET_CASES = [
    # (node, widget values, the input the message must name)
    (PromptToPrompt, {"reweight": "red 3"}, "reweight"),
    (PromptToPrompt, {"reweight": "red: nan"}, "reweight"),
    (PromptToPrompt, {"reweight": "red: x"}, "reweight"),
    (PromptToPrompt, {"word_windows": "circle: 0.2-x"}, "word_windows"),
    (PromptToPrompt, {"word_windows": "circle: 0.8-0.2"}, "word_windows"),
    (PromptToPrompt, {"word_windows": "circle: inf"}, "word_windows"),
    (PromptToPrompt, {"mode": "swap"}, "mode"),
    (PromptToPrompt, {"mode": "replace", "target_prompts": "  "}, "target_prompts"),
    (MasaCtrl, {"start_step": 4.5}, "start_step"),
    (MasaCtrl, {"start_step": -1.0}, "start_step"),
    (MasaCtrl, {"target_prompts": ""}, "target_prompts"),
    (MasaCtrl, {"mode": "union", "mask_source_word": "circle"}, "mode"),
    (MasaCtrl, {"start_layer": -2}, "start_layer"),
    (Boxes, {"boxes": "cat: 0.1,0.2,1.5,0.8", "units": "fraction", "width": 512, "height": 512}, "boxes"),
    (Boxes, {"boxes": "cat 0.1,0.2,0.5,0.8", "units": "fraction", "width": 512, "height": 512}, "boxes"),
    (Boxes, {"boxes": "cat: nan,0.2,0.5,0.8", "units": "fraction", "width": 512, "height": 512}, "boxes"),
    (LayoutGuidance, {"layers": "sideways"}, "layers"),
    (LayoutGuidance, {"prompt": " "}, "prompt"),
    (LayoutGuidance, {"iterations": 99}, "iterations"),
    (CaptureAttention, {"layers": "up@1/x"}, "layers"),
    (CaptureAttention, {"words": " , "}, "words"),
    (CaptureAttention, {"start_percent": 0.6, "end_percent": 0.4}, "start_percent"),
    (PaintWithWords, {"strengths": "sky: nan"}, "strengths"),
    (PaintWithWords, {"strengths": "sky: -1"}, "strengths"),
    (PaintWithWords, {"strengths": "sky"}, "strengths"),
    (PaintWithWords, {"layers": "everything"}, "layers"),
    (PaintWithWords, {"mode": "ediff"}, "mode"),
    (RegionConditioning, {"bootstrap_colours": "pink"}, "bootstrap_colours"),
    (CollageLayer, {"mask_meaning": "alpha"}, "mask_meaning"),
    (CollageLayers, {"dilate": 1000}, "dilate"),
    (TiledDiffusion, {"tile_width": 60, "tile_height": 64, "overlap": 16, "merge": "multidiffusion",
                      "tile_batch_size": 1}, "tile_width"),
    (TiledDiffusion, {"tile_width": 64, "tile_height": 64, "overlap": 64, "merge": "multidiffusion",
                      "tile_batch_size": 1}, "overlap"),
    (TiledDiffusion, {"tile_width": 64, "tile_height": 64, "overlap": 16, "merge": "average",
                      "tile_batch_size": 1}, "merge"),
    (NullTextInversion, {"scheduler": "nope"}, "scheduler"),
]


@pytest.mark.parametrize("cls,values,name", WIDGET_CASES,
                         ids=[f"{c.define_schema().node_id}-{n}-{i}" for i, (c, _, n) in enumerate(WIDGET_CASES)])
def test_widget_errors_are_raised_in_validate_inputs(cls, values, name):
    r = cls.validate_inputs(**values)
    assert r is not True, f"{values} passed validation"
    _named(r, name)


def test_valid_widgets_pass_validate_inputs():
    assert PromptToPrompt.validate_inputs(reweight="red: 3, blue: -1", word_windows="circle: 0.2-0.6; red: 0.5",
                                          mode="replace", target_prompts="a blue circle") is True
    assert MasaCtrl.validate_inputs(start_step=0.25, target_prompts="x", mode="mutual") is True
    assert Boxes.validate_inputs(boxes="cat: 0.1,0.2,0.5,0.8", units="fraction", width=512, height=512) is True
    assert LayoutGuidance.validate_inputs(layers="auto", prompt="a cat") is True
    assert TiledDiffusion.validate_inputs(tile_width=64, tile_height=64, overlap=16, merge="mixture",
                                          tile_batch_size=1, wrap_horizontal=False) is True


# ---------------------------------------------------------------- execute / sampling start

def p2p(model, clip, latent=None, reweight="", windows="", cross=0.8):
    return _res(PromptToPrompt.execute(model, clip, latent or M.latent(1, 16, 16), "a red circle", "a blue circle",
                                       "replace", reweight, cross, windows, 0.4, "", "", 0.3, 0.0, ""))


def masactrl(model, clip, latent=None, start=1.0, sm=None, tm=None, thr=0.1):
    return _res(MasaCtrl.execute(model, clip, latent or M.latent(1, 16, 16), SRC, TGT, "", start, -1, "mutual", "",
                                 "", thr, sm, tm))


def test_p2p_refuses_a_batch_latent_and_bad_numbers(sd15, clip_l):
    with pytest.raises(AttentionControlError) as e:
        p2p(sd15, clip_l, latent=M.latent(2, 16, 16))
    assert "one latent item" in _named(e, "latent") and "batch of 2" in str(e.value)
    with pytest.raises(AttentionControlError) as e:
        p2p(sd15, clip_l, reweight="red: nan")
    _named(e, "reweight")
    with pytest.raises(AttentionControlError) as e:
        p2p(sd15, clip_l, windows="circle: 0.2-x")
    msg = _named(e, "word_windows")
    assert "word: start-end" in msg and "is not a number" not in msg
    with pytest.raises(AttentionControlError) as e:
        p2p(sd15, clip_l, cross=NAN)
    _named(e, "cross_replace")
    lat = M.latent(1, 16, 16)
    lat["samples"][0, 0, 0, 0] = NAN
    with pytest.raises(AttentionControlError) as e:
        p2p(sd15, clip_l, latent=lat)
    _named(e, "latent")


def test_masactrl_refuses_batch_latent_masks_and_start_past_the_end(sd15, clip_l):
    with pytest.raises(AttentionControlError) as e:
        masactrl(sd15, clip_l, latent=M.latent(2, 16, 16))
    assert "one latent item" in _named(e, "latent")
    with pytest.raises(AttentionControlError) as e:
        masactrl(sd15, clip_l, sm=torch.ones(3, 16, 16))
    assert "batch of 3" in _named(e, "source_mask")
    with pytest.raises(AttentionControlError) as e:
        masactrl(sd15, clip_l, sm=torch.ones(1, 16, 16), tm=torch.zeros(1, 16, 16))
    assert "covers nothing" in _named(e, "target_mask")
    nan_mask = torch.ones(1, 16, 16)
    nan_mask[0, :8] = NAN                        # would threshold to a half-empty mask
    with pytest.raises(AttentionControlError) as e:
        masactrl(sd15, clip_l, sm=nan_mask)
    assert "not finite" in _named(e, "source_mask")
    with pytest.raises(AttentionControlError) as e:
        masactrl(sd15, clip_l, thr=NAN)
    _named(e, "mask_threshold")
    with pytest.raises(AttentionControlError) as e:
        masactrl(sd15, clip_l, start=NAN)
    _named(e, "start_step")


@pytest.mark.parametrize("start", [4.0, 9.0, 0.99])
def test_masactrl_start_step_at_or_past_the_steps_is_an_error_at_sampling_start(sd15, clip_l, start):
    m, pos, neg, lat = masactrl(sd15, clip_l, start=start)
    calls = []
    m = m.clone()
    m.set_model_unet_function_wrapper(lambda f, a: (calls.append(1), f(a["input"], a["timestep"], **a["c"]))[1])
    with pytest.raises(AttentionControlError) as e:
        M.ksample(m, pos, neg, lat, steps=4)
    assert "4 sampling step" in _named(e, "start_step")
    assert calls == [], "the error must come before the first model call"
    m2, pos, neg, lat = masactrl(sd15, clip_l, start=3.0)
    assert torch.isfinite(M.ksample(m2, pos, neg, lat, steps=4)).all()


def test_masactrl_mask_that_covers_no_latent_pixel_is_an_error_at_sampling_start(sd15, clip_l):
    sm = torch.zeros(1, 64, 64)
    sm[0, 1, 1] = 1.0                          # one pixel: gone at the 16x16 latent
    m, pos, neg, lat = masactrl(sd15, clip_l, sm=sm)
    with pytest.raises(AttentionControlError) as e:
        M.ksample(m, pos, neg, lat, steps=2)
    assert "covers no latent pixel" in _named(e, "source_mask")


def test_layout_guidance_nan_strength_and_phrase_errors_are_named(sd15, clip_l):
    from attention_control.nodes.layout import Boxes as BoxesNode
    bx = _res(BoxesNode.execute("red circle: 0,0,0.5,0.5", "fraction", 512, 512))[0]
    args = dict(model=sd15, clip=clip_l, prompt="a red circle", boxes=bx, mode="backward", strength=30.0,
                iterations=2, energy_threshold=0.2, guided_steps=0.5, forward_strength=0.5, layers="auto",
                special_tokens="none")
    for name, bad in (("strength", NAN), ("energy_threshold", INF), ("forward_strength", NAN),
                      ("guided_steps", NAN)):
        with pytest.raises(AttentionControlError) as e:
            LayoutGuidance.execute(**dict(args, **{name: bad}))
        _named(e, name)
    with pytest.raises(AttentionControlError, match="^strength"):       # the controller itself
        LayoutController([object()], 77, None, strength=NAN)
    other = _res(BoxesNode.execute("green triangle: 0,0,0.5,0.5", "fraction", 512, 512))[0]
    with pytest.raises(AttentionControlError) as e:
        LayoutGuidance.execute(**dict(args, boxes=other))
    msg = _named(e, "boxes")
    assert not msg.startswith("words") and "'green triangle' is not in the prompt" in msg


def test_paint_with_words_nan_weight_masks_and_strengths(sd15, clip_l):
    def paint(weight=0.5, masks=None, names="", strengths="", prompt="a red circle and a blue square"):
        return _res(PaintWithWords.execute(sd15, clip_l, prompt, "ediff-i", weight, strengths, 1.0, 1.0, "all",
                                           1.0, None, masks, names))
    with pytest.raises(AttentionControlError) as e:
        paint(weight=NAN, masks=torch.ones(1, 8, 8), names="red circle")
    _named(e, "weight")
    bad = torch.ones(1, 8, 8)
    bad[0, 0, 0] = NAN
    with pytest.raises(AttentionControlError) as e:
        paint(masks=bad, names="red circle")
    assert "not finite" in _named(e, "masks")
    with pytest.raises(AttentionControlError) as e:
        paint(masks=torch.ones(3, 8, 8), names="red circle")
    _named(e, "mask_phrases")
    with pytest.raises(AttentionControlError) as e:
        paint(masks=torch.ones(1, 8, 8), names="red circle", strengths="red circle: inf")
    _named(e, "strengths")
    with pytest.raises(AttentionControlError) as e:
        paint(masks=torch.ones(1, 8, 8), names="green triangle")
    assert not str(e.value).startswith("words")
    _named(e, "mask_phrases")


def test_region_prompt_bad_strength_and_masks(sd15, clip_l):
    for bad in (NAN, INF, -1.0):
        with pytest.raises(AttentionControlError) as e:
            RegionPrompt.execute("a red circle", bad, None, torch.ones(1, 8, 8))
        _named(e, "strength")
    nan_mask = torch.ones(1, 8, 8)
    nan_mask[0, 0] = NAN
    with pytest.raises(AttentionControlError) as e:
        RegionPrompt.execute("a red circle", 1.0, None, nan_mask)
    assert "not finite" in _named(e, "mask")
    with pytest.raises(AttentionControlError) as e:
        RegionPrompt.execute("a red circle", 1.0, None, torch.ones(3, 8, 8))
    assert "batch of 3" in _named(e, "mask")
    regions = _res(RegionPrompt.execute("a red circle", 1.0, None, torch.ones(1, 8, 8)))[0]
    with pytest.raises(AttentionControlError) as e:
        RegionConditioning.execute(sd15, clip_l, regions, "", NAN)
    _named(e, "bootstrap")


def test_collage_layer_from_an_rgb_image_is_refused_with_how_to_give_alpha():
    img = torch.full((1, 64, 64, 3), 0.5)
    rgb_mask = torch.zeros(1, 64, 64)                  # LoadImage's MASK of an image without alpha
    meaning = "transparency (LoadImage's MASK)"
    bottom = _res(CollageLayer.execute(img, "", 0.8, meaning, None, rgb_mask))[0]    # an opaque bottom is fine
    assert float(bottom[0].alpha.min()) == 1.0
    with pytest.raises(AttentionControlError) as e:
        CollageLayer.execute(img, "a red circle", 0.5, meaning, bottom, rgb_mask)
    msg = _named(e, "mask")
    assert "layer 2" in msg and "RGBA PNG" in msg and "opacity" in msg
    nan_mask = torch.zeros(1, 64, 64)
    nan_mask[0, :4] = NAN
    with pytest.raises(AttentionControlError) as e:
        CollageLayer.execute(img, "a red circle", 0.5, meaning, bottom, nan_mask)
    assert "not finite" in _named(e, "mask")
    bad_img = img.clone()
    bad_img[0, 0, 0, 0] = INF
    with pytest.raises(AttentionControlError) as e:
        CollageLayer.execute(bad_img, "a red circle", 0.5, meaning)
    _named(e, "image")
    with pytest.raises(AttentionControlError) as e:
        CollageLayer.execute(img, "a red circle", NAN, meaning)
    _named(e, "strength")
    with pytest.raises(AttentionControlError) as e:
        CollageLayers.execute(None, None, None, bottom, NAN, 1.0, 8, 8.0)
    _named(e, "attention_positive")


def test_heatmap_threshold_and_capture_at_denoise_0(sd15, clip_l):
    m, handle = _res(CaptureAttention.execute(sd15, clip_l, "a red circle", "red", "all", 0.0, 1.0, False))
    pos = clip_l.encode_from_tokens_scheduled(clip_l.tokenize("a red circle"))
    neg = clip_l.encode_from_tokens_scheduled(clip_l.tokenize(""))
    M.ksample(m, pos, neg, M.latent(1, 16, 16), steps=2, denoise=0.0)
    with pytest.raises(AttentionControlError) as e:
        AttentionHeatmap.execute(handle, 0.5, 0.6, False, image=torch.rand(1, 128, 128, 3))
    msg = _named(e, "attn_maps")
    assert "no sampling step ran" in msg and "denoise" in msg
    with pytest.raises(AttentionControlError) as e:
        AttentionHeatmap.execute(handle, NAN, 0.6, False, image=torch.rand(1, 128, 128, 3))
    _named(e, "threshold")


def test_null_text_inversion_at_cfg_1_is_plain_ddim_inversion(sd15, caplog):
    pos, neg = M.cond(seed=1), M.cond(seed=2)
    g = torch.Generator().manual_seed(3)
    lat = {"samples": torch.randn(1, 4, 16, 16, generator=g) * 0.5}
    with caplog.at_level("INFO", logger="attention_control.inversion"):
        inv, traj, out_neg = _res(NullTextInversion.execute(sd15, pos, neg, lat, 3, "normal", 1.0, 2))
    assert "nothing to optimise" in caplog.text
    ref, ref_traj = _res(DDIMInversion.execute(sd15, pos, lat, 3, "normal"))
    assert torch.equal(inv["samples"], ref["samples"]) and torch.isfinite(inv["samples"]).all()
    assert len(traj.latents) == len(ref_traj.latents) and out_neg is neg
    with pytest.raises(AttentionControlError) as e:
        NullTextInversion.execute(sd15, pos, neg, lat, 3, "normal", NAN, 2)
    _named(e, "cfg")
    bad = {"samples": lat["samples"].clone()}
    bad["samples"][0, 0, 0, 0] = NAN
    with pytest.raises(AttentionControlError) as e:
        DDIMInversion.execute(sd15, pos, bad, 3, "normal")
    _named(e, "latent")


def test_message_forms_follow_the_house_style():
    """"<input>: <what is wrong>; <the fix>" for the shared checks."""
    r = PromptToPrompt.validate_inputs(cross_replace=NAN)
    assert r.startswith("cross_replace: nan is not a finite number; give a finite number")
