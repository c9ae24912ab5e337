"""Collage Diffusion layers: alpha-over composite and visible masks, the strength map, the per-step
mask schedule, strength 0 keeps the collage exactly, strength 1 without attention control is plain
SDEdit from the composite, errors."""
import pytest
import torch

import ac_models as M
import ac_shapes as S
from attention_control.attention import collage as C
from attention_control.attention.core import AttentionControlError
from attention_control.nodes.collage import CollageLayer, CollageLayers


def _res(out):
    return out.result if hasattr(out, "result") else out


def test_composite_is_alpha_over_bottom_first():
    imgs = torch.stack([torch.full((2, 2, 3), 0.2), torch.full((2, 2, 3), 0.8)])
    a = torch.tensor([[[1.0, 1.0], [0.0, 0.0]], [[0.5, 0.0], [1.0, 0.0]]])
    comp, vis, unc = C.composite_layers(imgs, a)
    # pixel (0,0): top 0.5 over opaque bottom; (0,1): bottom only; (1,0): top only; (1,1): nothing
    assert torch.allclose(comp[0, 0], torch.full((3,), 0.5 * 0.8 + 0.5 * 0.2))
    assert torch.allclose(comp[0, 1], torch.full((3,), 0.2))
    assert torch.allclose(comp[1, 0], torch.full((3,), 0.8))
    assert torch.allclose(comp[1, 1], torch.full((3,), C.GREY))
    assert torch.allclose(vis[0], torch.tensor([[0.5, 1.0], [0.0, 0.0]]))
    assert torch.allclose(vis.sum(0) + unc, torch.ones(2, 2))


def test_strength_map_dilation_and_blur():
    vis = torch.zeros(2, 9, 9)
    vis[0] = 1.0
    vis[0, 3:6, 3:6] = 0.0
    vis[1, 3:6, 3:6] = 1.0
    s = C.strength_map(vis, torch.zeros(9, 9), [1.0, 0.2])
    assert torch.allclose(s[4, 4], torch.tensor(0.2)) and torch.allclose(s[0, 0], torch.tensor(1.0))
    d = C.strength_map(vis, torch.zeros(9, 9), [1.0, 0.2], dilate=1)
    assert torch.allclose(d[4, 4], torch.tensor(0.2)) and torch.allclose(d[3, 3], torch.tensor(1.0))
    b = C.strength_map(vis, torch.zeros(9, 9), [1.0, 0.2], blur=1.0)
    assert 0.2 < float(b[4, 4]) < float(b[3, 3]) < 1.0
    with pytest.raises(AttentionControlError, match="strengths"):
        C.strength_map(vis, torch.zeros(9, 9), [1.0, 1.5])


def test_mask_schedule_frees_a_pixel_once_t_is_below_its_strength():
    s = torch.tensor([0.0, 0.3, 0.7, 1.0])
    assert C.free_mask(s, 999.0).tolist() == [0.0, 0.0, 0.0, 1.0]
    assert C.free_mask(s, 500.0).tolist() == [0.0, 0.0, 1.0, 1.0]
    assert C.free_mask(s, 0.0).tolist() == [0.0, 1.0, 1.0, 1.0]
    calls = []
    prev = lambda sigma, m, extra: calls.append(1) or m * 0.5          # noqa: E731
    f = C.CollageMaskFunction(lambda sig: sig * 100.0, prev)
    assert f(torch.tensor([6.0]), torch.tensor([0.8, 1.6]), {}).tolist() == [0.0, 1.0] and calls == [1]


def disc(size, cx=0.3, cy=0.3, r=0.18):
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    return (((yy - size * cy) ** 2 + (xx - size * cx) ** 2) <= (size * r) ** 2).float()


def layers(strengths=(0.6, 0.6), size=256, prompts=("", "a red circle")):
    """Two layers on the shapes world: a light grey background and a red circle (the disc opaque)."""
    bg = torch.full((1, size, size, 3), 0.9)
    red = torch.zeros(1, size, size, 3)
    red[..., 0], red[..., 1], red[..., 2] = 0.9, 0.1, 0.1
    ls = _res(CollageLayer.execute(bg, prompts[0], strengths[0], "opacity (1 = layer)"))[0]
    return _res(CollageLayer.execute(red, prompts[1], strengths[1], "transparency (LoadImage's MASK)", ls,
                                     1.0 - disc(size)[None]))[0]


def run(strengths, attention=(1.0, 1.0), dilate=0, blur=0.0, seed=3):
    model, clip, vae = S.load()
    out = _res(CollageLayers.execute(model, clip, vae, layers(strengths), attention[0], attention[1], dilate, blur))
    m, pos, lat, masks, comp = out
    neg = S.encode(clip, [""])
    res = M.ksample(m, pos, neg, lat, seed=seed, steps=8, cfg=6.0)
    return res, lat, masks, comp, (model, clip, pos, neg)


def test_strength_zero_keeps_the_collage_exactly():
    res, lat, masks, comp, _ = run((0.0, 0.0))
    # the sampler's last step lands on the held latent up to float rounding (x + (D - x) * -sigma / sigma)
    assert (res - lat["samples"]).abs().max() < 1e-6
    assert masks.shape == (2, 256, 256) and comp.shape == (1, 256, 256, 3)


def test_strength_one_without_attention_control_is_plain_sdedit():
    res, lat, _, _, (model, _clip, pos, neg) = run((1.0, 1.0), attention=(0.0, 0.0))
    plain = M.ksample(model, pos, neg, {"samples": lat["samples"]}, seed=3, steps=8, cfg=6.0)
    assert torch.equal(res, plain)


def test_kept_layer_stays_while_the_rest_is_regenerated():
    res, lat, masks, _, _ = run((1.0, 0.0))
    keep = torch.nn.functional.interpolate(masks[1:2, None], size=res.shape[-2:], mode="area")[0, 0] >= 1.0
    assert (res[..., keep] - lat["samples"][..., keep]).abs().max() < 1e-6
    assert (res[..., ~keep] - lat["samples"][..., ~keep]).abs().max() > 0.1


def test_errors_name_the_input():
    model, clip, vae = S.load()
    img = torch.full((1, 64, 64, 3), 0.5)
    with pytest.raises(AttentionControlError, match="batch of 2 images"):
        CollageLayer.execute(img.repeat(2, 1, 1, 1), "x", 0.5, "opacity (1 = layer)")
    with pytest.raises(AttentionControlError, match="fully transparent"):
        CollageLayer.execute(img, "x", 0.5, "transparency (LoadImage's MASK)", None, torch.ones(1, 64, 64))
    with pytest.raises(AttentionControlError, match="batch of 2 masks"):
        CollageLayer.execute(img, "x", 0.5, "opacity (1 = layer)", None, torch.ones(2, 64, 64))
    with pytest.raises(AttentionControlError, match="strength"):
        CollageLayer.execute(img, "x", 1.5, "opacity (1 = layer)")
    with pytest.raises(AttentionControlError, match="every layer's prompt is empty"):
        CollageLayers.execute(model, clip, vae, layers(prompts=("", "")), 1, 1, 0, 0)
    # an opaque top layer hides the red circle below it
    hidden = _res(CollageLayer.execute(img, "grey wall", 0.5, "opacity (1 = layer)", layers(size=64)))[0]
    with pytest.raises(AttentionControlError, match="layer 2 .* is hidden"):
        CollageLayers.execute(model, clip, vae, hidden, 1, 1, 0, 0)
