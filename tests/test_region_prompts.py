"""Region prompts (MultiDiffusion regions with bootstrapping): a full region equals plain
conditioning, the per-pixel average is MultiDiffusion's closed form, bootstrapping replaces only
outside the mask and only during the bootstrap steps, composition with tiled sampling, errors, SDXL."""
import pytest
import torch

import ac_models as M
from attention_control.attention import region_prompts as RP
from attention_control.attention.core import AttentionControlError, Controller
from attention_control.attention.layout import Box
from attention_control.attention.router import attach
from attention_control.nodes.layout import Boxes
from attention_control.nodes.regions import RegionConditioning, RegionPrompt, region_conditioning
from attention_control.nodes.tiled import TiledDiffusion


def _res(out):
    return out.result if hasattr(out, "result") else out


def region(prompt, mask=None, boxes=None, strength=1.0, regions=None):
    return _res(RegionPrompt.execute(prompt, strength, regions, mask, boxes))[0]


def half(h=64, w=64, left=True):
    m = torch.zeros(h, w)
    if left:
        m[:, : w // 2] = 1.0
    else:
        m[:, w // 2:] = 1.0
    return m


def encode(clip, text):
    return clip.encode_from_tokens_scheduled(clip.tokenize(text))


class Spy(Controller):
    """Records the model input of every call (after the controllers above it)."""
    name = "spy"
    kinds = frozenset()
    wraps_model = True

    def __init__(self):
        self.calls = []

    def apply_model(self, apply, x, sigma, run, cond_or_uncond, options=None):
        step, _ = run.step_of(sigma)
        self.calls.append({"step": step, "x": x.clone(), "uuids": list((options or {}).get("uuids") or []),
                           "sigma": sigma.clone()})
        return apply(x)


def test_single_region_covering_the_image_equals_plain_conditioning(sd15, clip_l):
    regs = region("a red circle", mask=torch.ones(64, 64))
    m, pos = _res(RegionConditioning.execute(sd15, clip_l, regs, "", 0.4))
    neg = encode(clip_l, "")
    ref = M.ksample(sd15, encode(clip_l, "a red circle"), neg, M.latent(1, 16, 16), seed=3, steps=3)
    out = M.ksample(m, pos, neg, M.latent(1, 16, 16), seed=3, steps=3)
    assert torch.equal(out, ref)


def test_regions_are_the_per_pixel_average_of_their_prompts(sd15, clip_l):
    """One euler step from sigma_max returns the denoised prediction: uncovered pixels get the
    background prompt's, a region's pixels its own prompt's, an overlap the strength-weighted mean."""
    left = torch.zeros(16, 16)
    left[:, :8] = 1.0
    mid = torch.zeros(16, 16)
    mid[:, 4:12] = 1.0
    regs = region("a red circle", mask=left, strength=1.0)
    regs = region("a blue square", mask=mid, strength=3.0, regions=regs)
    m, pos = _res(RegionConditioning.execute(sd15, clip_l, regs, "grey wall", 0.0))
    neg = encode(clip_l, "")
    lat = M.latent(1, 16, 16)
    out = M.ksample(m, pos, neg, lat, seed=5, steps=1, cfg=1.0)
    a = M.ksample(sd15, encode(clip_l, "a red circle"), neg, lat, seed=5, steps=1, cfg=1.0)
    b = M.ksample(sd15, encode(clip_l, "a blue square"), neg, lat, seed=5, steps=1, cfg=1.0)
    g = M.ksample(sd15, encode(clip_l, "grey wall"), neg, lat, seed=5, steps=1, cfg=1.0)
    tol = dict(rtol=1e-4, atol=1e-4)
    assert torch.allclose(out[..., 12:], g[..., 12:], **tol)                   # covered by no region
    assert torch.allclose(out[..., :4], a[..., :4], **tol)                     # region 1 only
    assert torch.allclose(out[..., 8:12], b[..., 8:12], **tol)                 # region 2 only
    assert torch.allclose(out[..., 4:8], (a[..., 4:8] + 3.0 * b[..., 4:8]) / 4.0, **tol)   # overlap
    assert torch.isfinite(out).all() and out.abs().amax() > 0


def test_background_weight_and_overlaps():
    regs = (RP.Region("a", None, (Box("a", 0.0, 0.0, 0.5, 1.0),)), RP.Region("b", None, (Box("b", 0.25, 0.0, 0.75, 1.0),)))
    masks, bg = RP.region_weights(regs, 4, 4)
    assert torch.equal(masks[0][:, :2], torch.ones(4, 2)) and masks[0][:, 2:].abs().max() == 0
    assert torch.equal(bg[:, 3], torch.ones(4)) and bg[:, :3].abs().max() == 0   # 1 - sum, clamped at 0
    # soft masks: the background takes what the regions leave
    soft = (RP.Region("a", torch.full((8, 8), 0.25)),)
    _, bg = RP.region_weights(soft, 4, 4)
    assert torch.allclose(bg, torch.full((4, 4), 0.75))


class StepSpy(Controller):
    """Records the sampler's latent of every step (outermost guider wrapper)."""
    name = "step spy"
    kinds = frozenset()
    wraps_guider = True

    def __init__(self):
        self.x = {}

    def guide(self, predict, x, sigma, run, passes):
        self.x.setdefault(run.step_of(sigma)[0], x.clone())
        return predict(x)


def _spied(sd15, clip_l, bootstrap, mask, steps=4, background="grey wall", colours="random"):
    inner, outer = Spy(), StepSpy()
    base = attach(sd15, inner)
    regs = region("a red circle", mask=mask)
    m, pos = _res(RegionConditioning.execute(base, clip_l, regs, background, bootstrap, colours))
    m = attach(m, outer)
    out = M.ksample(m, pos, encode(clip_l, ""), M.latent(1, 16, 16), seed=9, steps=steps)
    return inner, outer, pos, out


def _bootstrapped_calls(inner, outer):
    """Model calls whose input is not the sampler's latent of their step."""
    return [c for c in inner.calls if not torch.equal(c["x"], outer.x[c["step"]].expand_as(c["x"]))]


def test_bootstrapping_replaces_only_outside_the_mask_and_only_in_the_bootstrap_steps(sd15, clip_l):
    mask = half(16, 16)
    inner, outer, pos, _ = _spied(sd15, clip_l, 0.5, mask)
    assert sorted(outer.x) == [0, 1, 2, 3]
    boot = _bootstrapped_calls(inner, outer)
    assert {c["step"] for c in boot} == {0, 1}                                    # 0.5 of 4 steps
    keep = mask.bool()[None, None].expand(2, 4, 16, 16)
    for c in boot:
        # the region's prompt and the negative (its own CFG pair), both at the bootstrapped latent
        assert len(c["uuids"]) == 2
        xs = outer.x[c["step"]].expand(2, 4, 16, 16)
        assert torch.equal(c["x"][keep], xs[keep])                                # inside the mask: untouched
        assert not torch.equal(c["x"][~keep], xs[~keep])
    # the background entry and every call after the bootstrap steps see the sampler's latent
    assert any(c["step"] < 2 and torch.equal(c["x"], outer.x[c["step"]].expand_as(c["x"])) for c in inner.calls)


@pytest.mark.parametrize("colours", ["random", "grey"])
def test_bootstrap_background_is_a_noised_constant_colour(sd15, clip_l, colours):
    mask = half(16, 16)
    inner, outer, _, _ = _spied(sd15, clip_l, 0.25, mask, steps=4, colours=colours)
    c = _bootstrapped_calls(inner, outer)[0]
    sigma = float(c["sigma"][0])
    x = c["x"][0]
    # x = colour + sigma * noise outside the mask; the run's noise is the sampler's (seed 9)
    import comfy.sample
    noise = comfy.sample.prepare_noise(torch.zeros(1, 4, 16, 16), 9)[0]
    colour = (x - sigma * noise)[:, :, 8:]
    spread = (colour - colour.mean(dim=(1, 2), keepdim=True)).abs().max()
    assert spread < 1e-3 * sigma
    if colours == "grey":
        # SD1.5's latent preview map takes the colour back to equal R, G and B
        import comfy.latent_formats
        f = comfy.latent_formats.SD15()
        bias = torch.tensor(f.latent_rgb_factors_bias or [0.0] * 3)
        rgb = colour.mean(dim=(1, 2)) @ torch.tensor(f.latent_rgb_factors) + bias
        assert float(rgb.max() - rgb.min()) < 1e-4


def test_bootstrap_step_is_multidiffusions_average_of_per_region_cfg(sd15, clip_l):
    """One bootstrapped euler step from sigma_max returns the prediction: inside the region the
    region's CFG (its prompt and the negative) at its bootstrapped latent, outside the background's
    CFG at the real latent (the paper's per-region guidance, averaged by the masks)."""
    mask = half(16, 16)
    inner, outer, _, out = _spied(sd15, clip_l, 1.0, mask, steps=1)
    boot = _bootstrapped_calls(inner, outer)
    assert len(boot) == 1
    sigma = float(boot[0]["sigma"][0])
    region_pred = _one_step(sd15, encode(clip_l, "a red circle"), encode(clip_l, ""), boot[0]["x"][:1], sigma)
    bg_pred = _one_step(sd15, encode(clip_l, "grey wall"), encode(clip_l, ""), outer.x[0], sigma)
    ref = torch.where(mask.bool()[None, None], region_pred, bg_pred)
    err = (out - ref).abs().max() / ref.abs().max()
    assert err < 1e-4, float(err)


def _one_step(model, pos, neg, x, sigma, cfg=5.0):
    """The host's own CFG step (CFGGuider, euler, sigma -> 0) from the model-space latent x: its
    denoised prediction, as the sampler returns it (process_latent_out)."""
    import comfy.samplers
    g = comfy.samplers.CFGGuider(model)
    g.set_conds(pos, neg)
    g.set_cfg(cfg)
    lat = model.model.process_latent_out(x.clone())
    return g.sample(torch.zeros_like(x), lat, comfy.samplers.sampler_object("euler"), torch.tensor([sigma, 0.0]),
                    seed=0)


def test_bootstrap_zero_is_the_hosts_masked_conditioning(sd15, clip_l):
    """bootstrap 0: the model patch does nothing; the conditioning alone (on the unpatched model)
    gives the same image: MultiDiffusion regions are ComfyUI's masked conditioning."""
    mask = torch.zeros(16, 16)
    mask[4:12, 4:12] = 1.0
    m, pos = _res(RegionConditioning.execute(sd15, clip_l, region("a red circle", mask=mask), "grey wall", 0.0))
    neg = encode(clip_l, "")
    a = M.ksample(m, pos, neg, M.latent(1, 16, 16), seed=2, steps=3)
    b = M.ksample(sd15, pos, neg, M.latent(1, 16, 16), seed=2, steps=3)
    assert torch.equal(a, b)
    m2, pos2 = _res(RegionConditioning.execute(sd15, clip_l, region("a red circle", mask=mask), "grey wall", 0.5))
    c = M.ksample(m2, pos2, neg, M.latent(1, 16, 16), seed=2, steps=3)
    assert not torch.equal(a, c)


def test_masks_in_pixel_and_latent_space_agree(sd15, clip_l):
    big = torch.zeros(128, 128)
    big[:, :64] = 1.0
    small = torch.zeros(16, 16)
    small[:, :8] = 1.0
    neg = encode(clip_l, "")
    outs = []
    for mk in (big, small):
        m, pos = _res(RegionConditioning.execute(sd15, clip_l, region("a red circle", mask=mk), "grey wall", 0.5))
        outs.append(M.ksample(m, pos, neg, M.latent(1, 16, 16), seed=4, steps=2))
    assert torch.equal(outs[0], outs[1])


def test_boxes_make_one_region_per_phrase(sd15, clip_l):
    bx = _res(Boxes.execute("red circle: 0,0,0.5,1\nblue square: 0.5,0,1,1", "fraction", 128, 128))[0]
    regs = region("", boxes=bx)
    assert [r.prompt for r in regs] == ["red circle", "blue square"]
    m, pos = _res(RegionConditioning.execute(sd15, clip_l, regs, "", 0.4))
    out = M.ksample(m, pos, encode(clip_l, ""), M.latent(1, 16, 16), seed=1, steps=2)
    assert torch.isfinite(out).all()


def test_patches_do_not_leak(sd15, clip_l):
    pos0, neg = encode(clip_l, "a red circle"), encode(clip_l, "")
    before = M.ksample(sd15, pos0, neg, M.latent(1, 16, 16), seed=6, steps=2)
    m, pos = _res(RegionConditioning.execute(sd15, clip_l, region("a red circle", mask=half()), "grey", 0.5))
    M.ksample(m, pos, neg, M.latent(1, 16, 16), seed=6, steps=2)
    after = M.ksample(sd15, pos0, neg, M.latent(1, 16, 16), seed=6, steps=2)
    assert torch.equal(before, after)
    # the node's conditioning is not changed by a run (the run works on its own copies)
    assert pos[1][1]["mask"].shape == (1, 64, 64)


@pytest.mark.parametrize("order", ["tiled first", "regions first"])
def test_one_tile_covering_the_canvas_equals_regions_alone(sd15, clip_l, order):
    mask = half(16, 16)
    regs = region("a red circle", mask=mask)
    neg = encode(clip_l, "")

    def tiled(model):
        return _res(TiledDiffusion.execute(model, 128, 128, 0, "multidiffusion", 1, False))[0]

    m, pos = _res(RegionConditioning.execute(sd15, clip_l, regs, "grey wall", 0.5))
    ref = M.ksample(m, pos, neg, M.latent(1, 16, 16), seed=8, steps=3)
    if order == "tiled first":
        mt, post = _res(RegionConditioning.execute(tiled(sd15), clip_l, regs, "grey wall", 0.5))
    else:
        mt, post = tiled(m), pos
    out = M.ksample(mt, post, neg, M.latent(1, 16, 16), seed=8, steps=3)
    assert torch.equal(out, ref)


@pytest.mark.parametrize("order", ["tiled first", "regions first"])
def test_regions_on_a_tiled_canvas_bootstrap_per_tile(sd15, clip_l, order):
    """Regions on a 16x32 canvas sampled as two 16x16 tiles: the region's rows change only outside
    its mask, in tile coordinates too."""
    mask = torch.zeros(16, 32)
    mask[:, 4:12] = 1.0
    inner = Spy()
    base = attach(sd15, inner)

    def tiled(model):
        return _res(TiledDiffusion.execute(model, 128, 128, 0, "multidiffusion", 1, False))[0]

    regs = region("a red circle", mask=mask)
    if order == "tiled first":
        m, pos = _res(RegionConditioning.execute(tiled(base), clip_l, regs, "grey wall", 0.5))
    else:
        m, pos = _res(RegionConditioning.execute(base, clip_l, regs, "grey wall", 0.5))
        m = tiled(m)
    out = M.ksample(m, pos, encode(clip_l, ""), M.latent(1, 16, 32), seed=8, steps=2)
    assert torch.isfinite(out).all()
    assert all(c["x"].shape[-1] in (16, 32) for c in inner.calls) and inner.calls


def test_errors_name_the_input(sd15, clip_l):
    with pytest.raises(AttentionControlError, match="covers nothing"):
        region("a red circle", mask=torch.zeros(64, 64))
    with pytest.raises(AttentionControlError, match="batch of 2 masks"):
        region("a red circle", mask=torch.ones(2, 64, 64))
    with pytest.raises(AttentionControlError, match="prompt"):
        region("", mask=torch.ones(64, 64))
    with pytest.raises(AttentionControlError, match="MASK or BOXES"):
        region("a red circle")
    with pytest.raises(AttentionControlError, match="bootstrap"):
        RegionConditioning.execute(sd15, clip_l, region("a", mask=half()), "", 1.5)
    with pytest.raises(AttentionControlError, match="bootstrap_colours"):
        RegionConditioning.execute(sd15, clip_l, region("a", mask=half()), "", 0.4, "pink")
    # a sampler fed another positive: error before the first step, the server's model untouched
    m, _ = _res(RegionConditioning.execute(sd15, clip_l, region("a red circle", mask=half()), "", 0.4))
    with pytest.raises(AttentionControlError, match="positive"):
        M.ksample(m, encode(clip_l, "a red circle"), encode(clip_l, ""), M.latent(1, 16, 16), steps=1)


def test_sdxl_shaped_model(sdxl):
    def enc(text):
        return M.cond(1, seed=len(text), dim=2048, pooled=1280)

    regs = region("a red circle", mask=half(16, 16))
    m, pos = region_conditioning(sdxl, enc, regs, "grey wall", 0.5)
    neg = M.cond(1, seed=99, dim=2048, pooled=1280)
    out = M.ksample(m, pos, neg, M.latent(1, 16, 16), steps=2)
    plain = M.ksample(sdxl, enc("a red circle"), neg, M.latent(1, 16, 16), steps=2)
    assert torch.isfinite(out).all() and not torch.equal(out, plain)
