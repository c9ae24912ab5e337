"""Paint-with-words: off is bit-identical, the bias lands on the painted tokens and pixels only,
collage variant signs, masks of any size, errors, SDXL."""
import math

import pytest
import torch

import ac_models as M
from attention_control.attention import regions as R
from attention_control.attention.core import AttentionControlError
from attention_control.nodes.layout import Boxes
from attention_control.nodes.regions import PaintWithWords

PROMPT = "a red circle and a blue square"


def _res(out):
    return out.result if hasattr(out, "result") else out


def paint(model, clip, boxes_text="red circle: 0,0,0.5,1", mode="ediff-i", weight=0.1, strengths="", masks=None,
          names="", prompt=PROMPT):
    bx = _res(Boxes.execute(boxes_text, "fraction", 64, 64))[0] if boxes_text else None
    return _res(PaintWithWords.execute(model, clip, prompt, mode, weight, strengths, 1.0, 1.0, "all", 1.0,
                                       bx, masks, names))


def test_ediff_bias_is_on_painted_tokens_and_pixels_only():
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(2, 3, 16, 77, generator=g)
    mask = torch.zeros(4, 4)
    mask[:, :2] = 1.0                                           # left half of a 4x4 layer
    m = R.mask_at(mask, 4, 4)
    bias = torch.zeros(16, 77)
    bias[:, [2, 3]] = 0.5 * m[:, None]
    sigma, scale = 3.0, 0.25
    got = R.paint_logits(scores.clone(), scale, sigma, bias, [2, 3], m[:, None].repeat(1, 2), torch.full((2,), 0.5),
                         "ediff-i", 0.1, 1.0, 1.0)
    delta = got - scores * scale
    expect = 0.1 * math.log1p(sigma) * float(scores.max()) * 0.5 * scale
    assert torch.allclose(delta[..., [2, 3]][:, :, m > 0], torch.full_like(delta[..., [2, 3]][:, :, m > 0], expect))
    assert delta[..., [2, 3]][:, :, m == 0].abs().max() == 0
    others = [c for c in range(77) if c not in (2, 3)]
    assert delta[..., others].abs().max() == 0


def test_collage_bias_signs():
    g = torch.Generator().manual_seed(1)
    scores = torch.randn(1, 2, 16, 77, generator=g).abs() + 0.1   # positive maxima
    m = torch.zeros(16)
    m[:8] = 1.0
    got = R.paint_logits(scores.clone(), 1.0, 2.0, torch.zeros(16, 77), [5], m[:, None], torch.ones(1), "collage",
                         0.1, 1.0, 1.0)
    delta = got - scores
    assert (delta[..., 5][..., :8] > 0).all() and (delta[..., 5][..., 8:] < 0).all()
    assert delta[..., [c for c in range(77) if c != 5]].abs().max() == 0


def test_mask_of_any_size_is_resized():
    big = torch.zeros(512, 512)
    big[:, :256] = 1
    small = torch.zeros(8, 8)
    small[:, :4] = 1
    for mk in (big, small):
        m = R.mask_at(mk, 4, 4).view(4, 4)
        assert torch.equal(m[:, :2], torch.ones(4, 2)) and torch.equal(m[:, 2:], torch.zeros(4, 2))
    assert R.mask_at(small, 16, 16).view(16, 16)[:, :7].min() > 0.99


@pytest.fixture(scope="module")
def base(sd15, clip_l):
    pos = clip_l.encode_from_tokens_scheduled(clip_l.tokenize(PROMPT))
    neg = clip_l.encode_from_tokens_scheduled(clip_l.tokenize(""))
    return pos, neg, M.ksample(sd15, pos, neg, M.latent(1, 16, 16), steps=3)


def test_weight_zero_is_bit_identical_and_painting_changes_the_image(sd15, clip_l, base):
    pos, neg, ref = base
    m0, pos0 = paint(sd15, clip_l, weight=0.0)
    assert torch.equal(M.ksample(m0, pos0, neg, M.latent(1, 16, 16), steps=3), ref)
    m1, pos1 = paint(sd15, clip_l, weight=0.5)
    out = M.ksample(m1, pos1, neg, M.latent(1, 16, 16), steps=3)
    assert not torch.equal(out, ref)
    m2, _ = paint(sd15, clip_l, mode="collage")
    assert not torch.equal(M.ksample(m2, pos1, neg, M.latent(1, 16, 16), steps=3), ref)
    m3, _ = paint(sd15, clip_l, weight=0.5, strengths="red circle: 0")
    assert torch.equal(M.ksample(m3, pos1, neg, M.latent(1, 16, 16), steps=3), ref)


def test_masks_with_phrases(sd15, clip_l, base):
    pos, neg, ref = base
    masks = torch.zeros(2, 128, 128)
    masks[0, :, :64] = 1
    masks[1, :, 64:] = 1
    m, p = paint(sd15, clip_l, boxes_text="", masks=masks, names="red circle, blue square", weight=0.5)
    ctrl = [c for c in m.model_options["transformer_options"]["attention_control_router"].controllers][-1]
    assert [ph.positions for ph in ctrl.phrases] == [[2, 3], [6, 7]]
    assert not torch.equal(M.ksample(m, p, neg, M.latent(1, 16, 16), steps=3), ref)


def test_errors(sd15, clip_l):
    with pytest.raises(AttentionControlError, match="'green triangle' is not in the prompt"):
        paint(sd15, clip_l, boxes_text="green triangle: 0,0,0.5,0.5")
    with pytest.raises(AttentionControlError, match="mask_phrases: 1 phrase.*batch of 2"):
        paint(sd15, clip_l, boxes_text="", masks=torch.ones(2, 8, 8), names="red circle")
    with pytest.raises(AttentionControlError, match="the mask of 'red circle' covers nothing"):
        paint(sd15, clip_l, boxes_text="", masks=torch.zeros(1, 8, 8), names="red circle")
    with pytest.raises(AttentionControlError, match="connect BOXES or MASKs"):
        paint(sd15, clip_l, boxes_text="")
    with pytest.raises(AttentionControlError, match="strengths: 'sky'"):
        paint(sd15, clip_l, strengths="sky: 0.3")


def test_sdxl_shaped_model(sdxl):
    from attention_control.attention.core import LayerSelector
    from attention_control.attention.router import attach
    mask = torch.zeros(16, 16)
    mask[:, :8] = 1
    ctrl = R.PaintWithWordsController([R.PaintedPhrase("x", [1, 2], mask, 1.0)], 77, 0.5)
    m = attach(sdxl, ctrl)
    pos, neg = M.cond(1, seed=1, dim=2048, pooled=1280), M.cond(1, seed=2, dim=2048, pooled=1280)
    ref = M.ksample(sdxl, pos, neg, M.latent(1, 16, 16), steps=2)
    out = M.ksample(m, pos, neg, M.latent(1, 16, 16), steps=2)
    assert torch.isfinite(out).all() and not torch.equal(out, ref)


def test_merge_rows_hands_the_bare_host_only_the_other_rows():
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(4, 6, 8, generator=g) for _ in range(3))
    seen = []

    def host(q_, k_, v_):
        seen.append(q_.shape[0])
        return torch.softmax(q_ @ k_.transpose(1, 2), -1) @ v_

    class Bare:
        bare = True

        def __call__(self, q_, k_, v_):
            return host(q_, k_, v_)

    rows = torch.tensor([2, 3])
    mine = torch.randn(2, 6, 8, generator=g)
    full = R.merge_rows(q, k, v, host, rows, mine)
    part = R.merge_rows(q, k, v, Bare(), rows, mine)
    assert seen == [4, 2]
    assert torch.allclose(full, part, atol=1e-6) and torch.equal(part[2:], mine)


def test_paint_on_a_tiled_canvas_crops_the_mask_per_tile():
    from types import SimpleNamespace
    from attention_control.attention import tiled as T
    mask = torch.zeros(8, 16)
    mask[:, :5] = 1.0                                              # left part of an 8x16 canvas
    ctrl = R.PaintWithWordsController([R.PaintedPhrase("x", [2], mask, 1.0)], 77, 0.1)
    plan = T.plan_tiles(8, 16, T.TileConfig(8, 8, 0))
    call = SimpleNamespace(extra={T.TILE_KEY: {"pieces": list(plan.pieces), "canvas": (8, 16)}},
                           site=SimpleNamespace(ds=1), cond_or_uncond=[1, 0, 1, 0], batch=1,
                           cond_chunks=lambda: [1, 3])
    d = {"cache": {}}
    bias, cols, cmask, _s = ctrl._tiled_bias(d, call, 77, torch.device("cpu"))
    full, _c, _m, _s2 = ctrl._bias(d, 8, 16, 77, torch.device("cpu"))
    full = full[:, 2].reshape(8, 16)
    assert bias.shape == (2, 1, 64, 77) and cols == [2]
    assert torch.equal(bias[0, 0, :, 2].reshape(8, 8), full[:, :8])
    assert torch.equal(bias[1, 0, :, 2].reshape(8, 8), full[:, 8:])
    assert bias[1].abs().max() == 0                                  # the right tile has no painted pixel
    # a layer at half resolution: the canvas level is 4x8, each tile's crop 4x4
    call.site = SimpleNamespace(ds=2)
    bias2 = ctrl._tiled_bias(d, call, 77, torch.device("cpu"))[0]
    full2 = ctrl._bias(d, 4, 8, 77, torch.device("cpu"))[0][:, 2].reshape(4, 8)
    assert bias2.shape == (2, 1, 16, 77)
    assert torch.equal(bias2[0, 0, :, 2].reshape(4, 4), full2[:, :4])
    assert torch.equal(bias2[1, 0, :, 2].reshape(4, 4), full2[:, 4:])


def test_paint_with_one_tile_covering_the_canvas_equals_untiled(sd15, clip_l):
    from attention_control.nodes.tiled import TiledDiffusion
    m = paint(sd15, clip_l, weight=0.5)[0]
    pos, neg = clip_l.encode_from_tokens_scheduled(clip_l.tokenize(PROMPT)), M.cond(1, seed=2)
    ref = M.ksample(m, pos, neg, M.latent(1, 16, 16), steps=2)
    mt = _res(TiledDiffusion.execute(m, 128, 128, 0, "multidiffusion", 1, False))[0]
    assert torch.equal(M.ksample(mt, pos, neg, M.latent(1, 16, 16), steps=2), ref)
    # two tiles: painting still acts (the canvas mask is cropped per tile)
    mt2 = _res(TiledDiffusion.execute(m, 64, 128, 0, "multidiffusion", 1, False))[0]
    plain2 = _res(TiledDiffusion.execute(sd15, 64, 128, 0, "multidiffusion", 1, False))[0]
    a = M.ksample(mt2, pos, neg, M.latent(1, 16, 16), steps=2)
    b = M.ksample(plain2, pos, neg, M.latent(1, 16, 16), steps=2)
    assert torch.isfinite(a).all() and not torch.equal(a, b)
