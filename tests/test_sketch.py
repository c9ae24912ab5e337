"""Sketch-guided text-to-image (Voynov et al. 2022): predictor shapes on SD1.5- and SDXL-shaped UNets, training
lowers the loss (deterministic per seed), the guidance gradient against a central finite difference, strength 0
= the plain model bit for bit, nothing left behind after a run, the denoised hand-over, named errors, save / load
exact."""
import functools
import os

import pytest
import torch

import ac_dit
import ac_models as M
from attention_control.attention import sketch as SK
from attention_control.attention.core import AttentionControlError
from attention_control.attention.router import attach, get_router
from attention_control.nodes import sketch as N


def _res(out):
    return out.result if hasattr(out, "result") else out


def _data(n=4, size=16, seed=0):
    """n latents (n, 4, size, size) and edge maps at the latent size of random boxes."""
    g = torch.Generator().manual_seed(seed)
    imgs = torch.full((n, 3, size, size), 0.9)
    for i in range(n):
        y0, x0 = (int(v) for v in torch.randint(1, size // 2, (2,), generator=g))
        s = int(torch.randint(size // 4, size // 2, (1,), generator=g))
        imgs[i, :, y0:y0 + s, x0:x0 + s] = torch.rand(3, 1, 1, generator=g) * 0.5
    lat = torch.cat([imgs * 2 - 1, torch.zeros(n, 1, size, size)], 1)
    return lat, SK.sobel_edges(imgs)


def _train(model, cond, steps=6, seed=0, layers="all", n=4):
    lat, edges = _data(n)
    with torch.inference_mode():
        return N.train_predictor(model, lat, edges, cond, steps, 3e-3, 2, seed, layers)


@pytest.fixture(scope="module")
def trained(sd15):
    return _train(sd15, M.cond())


def _sketch(size=16 * 8, batch=1):
    img = torch.ones(batch, size, size, 3)
    img[:, size // 4:3 * size // 4, size // 4] = 0.0           # dark lines on white
    img[:, size // 4, size // 4:3 * size // 4] = 0.0
    return img


def test_predictor_forward_shapes_on_sd15_and_sdxl(trained, sd15, sdxl):
    p, _ = trained
    sites = get_router(attach(sd15, SK.SketchFeatures())).sites
    assert p.keys == [s.key for s in sites if s.kind == "self"]           # depth-1 transformers: every one
    assert [c for *_k, c in p.sites] == [s.heads * s.dim_head for s in sites if s.kind == "self"]
    assert p.in_channels == sum(s[3] for s in p.sites)
    out = p(torch.randn(3, p.in_channels, 5, 7), torch.tensor([0.5, 2.0, 14.0]))
    assert out.shape == (3, 1, 5, 7)
    # SDXL shape: no attention at full resolution, depth-2 transformers -> the first block of each
    g = torch.Generator().manual_seed(0)
    cond = [[torch.randn(1, 77, 2048, generator=g), {"pooled_output": torch.randn(1, 1280, generator=g)}]]
    px, losses = _train(sdxl, cond, steps=2)
    sites = get_router(attach(sdxl, SK.SketchFeatures())).sites
    want = [s.key for s in sites if s.kind == "self" and s.index == 0]
    assert px.keys == sorted(want, key=lambda k: [s.key for s in sites].index(k))
    assert all(s[3] in (64, 128) for s in px.sites) and len(losses) == 2
    assert px(torch.randn(1, px.in_channels, 16, 16), torch.tensor([1.0])).shape == (1, 1, 16, 16)


def test_training_lowers_the_loss_and_is_deterministic(sd15):
    p1, l1 = _train(sd15, M.cond(), steps=16, seed=3)
    p2, l2 = _train(sd15, M.cond(), steps=16, seed=3)
    assert l1 == l2 and all(torch.equal(a, b) for a, b in zip(p1.state_dict().values(), p2.state_dict().values()))
    assert sum(l1[-4:]) / 4 < 0.6 * sum(l1[:4]) / 4, l1


def test_per_image_captions_stack_into_one_forward(sd15):
    cond = M.cond(batch=4, seed=2)
    conds, which = N._per_image(cond, 4)
    assert which == [0, 1, 2, 3] and all(c[0].shape == (1, 77, 768) for c in conds)
    _p, losses = _train(sd15, cond, steps=2)
    assert len(losses) == 2
    with pytest.raises(AttentionControlError, match="positive: 3 conditionings for 4 images"):
        N._per_image(M.cond() * 3, 4)


def test_sobel_and_sketch_edges():
    img = torch.zeros(1, 3, 8, 8)
    img[..., 4:] = 1.0
    e = SK.sobel_edges(img)
    assert e.shape == (1, 1, 8, 8) and float(e.max()) == 1.0
    assert torch.equal(e[0, 0, :, 3] > 0.5, torch.ones(8, dtype=torch.bool)) and float(e[0, 0, :, :2].max()) == 0.0
    sk = _sketch(16).permute(0, 3, 1, 2)
    auto, dark = SK.sketch_edges(sk), SK.sketch_edges(sk, "dark on light")
    assert torch.equal(auto, dark) and float(auto.max()) == 1.0 and float(auto.mean()) < 0.2
    assert torch.equal(SK.sketch_edges(1 - sk), auto)
    lat = SK.edges_to_latent(auto, (2, 2))
    assert lat.shape == (1, 1, 2, 2) and torch.equal(lat, F_max(auto, 8))


def F_max(x, k):
    return torch.nn.functional.max_pool2d(x, k)


def _probe(cls, p, edges, strength=1.6):
    """A guidance controller of `cls` that checks, at the first guided step: the chunked gradient
    (loss_and_grad: predictor by pixel chunks, maps resized per chunk) against autograd of the whole formula
    (loss_at), and that gradient against a central finite difference of the loss along v = g/|g| + r/|r| (r
    random; float32 model, step 1e-3 of the latent's scale). A wrong direction of g gives a mismatch."""
    class Probe(cls):
        checked = None

        def guide(self, predict, x, sigma, run, passes):
            if self.checked is None:
                d = run.data(self)
                _step, sig = run.step_of(sigma)
                self.grad_chunk = 7                     # many uneven chunks
                loss, grad = self.loss_and_grad(x, sig, run, passes, d)
                with torch.inference_mode(False), torch.enable_grad():
                    x0 = x.detach().clone()
                    xk = x0.clone().requires_grad_(True)
                    ref_loss = self.loss_at(xk, sig, run, passes, d)
                    ref, = torch.autograd.grad(ref_loss.sum(), [xk])
                    r = torch.randn(x0.shape, generator=torch.Generator().manual_seed(1), dtype=x0.dtype)
                    v = ref / ref.norm() + r / r.norm()
                    eps = 1e-3 * float(x0.abs().max())
                    with torch.no_grad():
                        lp = self.loss_at(x0 + eps * v, sig, run, passes, d).sum()
                        lm = self.loss_at(x0 - eps * v, sig, run, passes, d).sum()
                self.checked = (loss, ref_loss.detach(), grad, ref, float((ref * v).sum()),
                                float((lp - lm) / (2 * eps)))
            return super().guide(predict, x, sigma, run, passes)
    return Probe(p, edges, strength, 0.0, 1.0)


def _check_probe(probe):
    loss, ref_loss, grad, ref, analytic, numeric = probe.checked
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad, ref, rtol=1e-4, atol=1e-7)
    # the LGP is piecewise linear (ReLU): the central difference may cross a few kinks, hence 5 %
    assert analytic > 0 and analytic == pytest.approx(numeric, rel=5e-2), (analytic, numeric)


def test_guidance_gradient_equals_a_finite_difference(trained):
    p, _ = trained
    model = M.tiny_sd15(seed=5)
    probe = _probe(SK.SketchGuidance, p, SK.sketch_edges(_sketch().permute(0, 3, 1, 2)))
    M.ksample(attach(model, probe), M.cond(), M.cond(seed=1), M.latent(1, 16, 16), steps=2)
    _check_probe(probe)


def test_guided_denoised_is_the_papers_move():
    """A first-order step from x with D' lands at x_{t-1} - alpha ||x_t - x_{t-1}|| / ||g|| g."""
    g = torch.Generator().manual_seed(0)
    x, den, grad = (torch.randn(2, 4, 3, 3, generator=g) for _ in range(3))
    s, s_next, alpha = 3.0, 2.0, 0.7
    euler = lambda d: x + (s_next - s) / s * (x - d)
    want = euler(den) - alpha * (euler(den) - x).flatten(1).norm(dim=1)[:, None, None, None] * \
        grad / grad.flatten(1).norm(dim=1)[:, None, None, None]
    torch.testing.assert_close(euler(SK.guided_denoised(den, x, grad, alpha)), want)
    assert torch.equal(SK.guided_denoised(den, x, torch.zeros_like(grad), alpha), den)


def test_strength_zero_is_the_plain_model_and_nothing_leaks(sd15, trained):
    p, _ = trained
    pos, neg, lat = M.cond(), M.cond(seed=1), M.latent(2, 16, 16)
    plain = M.ksample(sd15, pos, neg, lat, steps=4)
    with torch.inference_mode():
        m0 = _res(N.SketchGuidance.execute(sd15, p, _sketch(), 0.0, 0.0, 0.5, "auto"))[0]
        m = _res(N.SketchGuidance.execute(sd15, p, _sketch(), 1.6, 0.0, 0.5, "auto"))[0]
    assert torch.equal(M.ksample(m0, pos, neg, lat, steps=4), plain)
    out = M.ksample(m, pos, neg, lat, steps=4)
    assert torch.isfinite(out).all() and not torch.allclose(out, plain, atol=1e-4)
    ctrl = [c for c in get_router(m).controllers if isinstance(c, SK.SketchGuidance)][-1]
    assert [s for s, _ in ctrl.last_loss_log] == [0, 1] and all(len(v) == 2 for _s, v in ctrl.last_loss_log)
    assert torch.equal(M.ksample(sd15, pos, neg, lat, steps=4), plain)       # nothing left on the model
    # composes with a core block patch (FreeU) and another sampler
    import comfy_extras.nodes_freelunch as fl
    fm = fl.FreeU_V2().patch(m, 1.1, 1.2, 0.9, 0.2)[0]
    assert torch.isfinite(M.ksample(fm, pos, neg, lat, steps=3, sampler="dpmpp_2m")).all()


def test_named_errors(sd15, trained):
    p, _ = trained
    ex = lambda sk, **kw: N.build_guidance(kw.get("model", sd15), p, sk, kw.get("strength", 1.6), 0.0, 0.5)
    with pytest.raises(AttentionControlError, match="sketch: image 0 of the batch has no lines"):
        ex(torch.ones(1, 128, 128, 3))
    bad = _sketch()
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(AttentionControlError, match="sketch: 1 of .* values are not finite"):
        ex(bad)
    with pytest.raises(AttentionControlError, match="sketch: the image is 100x100 px, which does not fit the 16x16"):
        M.ksample(ex(_sketch(100)), M.cond(), M.cond(), M.latent(1, 16, 16), steps=2)
    with pytest.raises(AttentionControlError, match="sketch: 2 sketches for a latent batch of 3"):
        M.ksample(ex(_sketch(batch=2)), M.cond(), M.cond(), M.latent(3, 16, 16), steps=2)
    with pytest.raises(AttentionControlError, match="predictor: it was trained on a model with"):
        ex(_sketch(), model=M.tiny_sd15(model_channels=64))
    assert "end: 0.2 is before start 0.5" in N.SketchGuidance.validate_inputs(start=0.5, end=0.2)
    assert "strength" in N.SketchGuidance.validate_inputs(strength=float("nan"))
    assert "layers: 'sideways'" in N.TrainSketchPredictor.validate_inputs(layers="sideways")
    assert N.TrainSketchPredictor.validate_inputs(layers="double:0-1") is True       # DiT syntax passes too
    assert N.TrainSketchPredictor.validate_inputs(layers="auto") is True
    with pytest.raises(AttentionControlError, match="predictor: it was trained on a UNet model and this is a DiT"):
        ex(_sketch(), model=ac_dit.tiny("Flux").patcher)


def test_save_and_load_round_trip(trained, tmp_path, monkeypatch):
    import folder_paths
    import safetensors.torch
    p, _ = trained
    monkeypatch.setattr(folder_paths, "output_directory", str(tmp_path))
    monkeypatch.delitem(folder_paths.folder_names_and_paths, N.FOLDER, raising=False)
    N.SaveSketchPredictor.execute(p, "sketch_predictors/test")
    files = N.weight_files.listed(N.FOLDER)
    assert files == ["test_00001_.safetensors"]
    got = _res(N.LoadSketchPredictor.execute(files[0]))[0]
    assert got.sites == p.sites and got.config() == p.config()
    assert all(torch.equal(a, b) for a, b in zip(got.state_dict().values(), p.state_dict().values()))
    f = torch.randn(2, p.in_channels, 4, 4)
    assert torch.equal(got(f, torch.tensor([1.0, 3.0])), p.eval()(f, torch.tensor([1.0, 3.0])))
    safetensors.torch.save_file({"x": torch.zeros(2)}, str(tmp_path / N.FOLDER / "other.safetensors"))
    with pytest.raises(AttentionControlError, match="predictor_name: 'other.safetensors' is not a sketch edge"):
        N.LoadSketchPredictor.execute("other.safetensors")


# --------------------------------------------------------------------------------------------
# DiT models

from attention_control.attention import dit_sketch as DS            # noqa: E402
from attention_control.attention.dit_router import DIT_GUIDE_KEY, get_dit_router   # noqa: E402

SAMPLED = tuple(ac_dit.SAMPLE_CONDS)          # Flux, SD3, Wan, Lumina 2: through ComfyUI's sampler here


def _dit_conds(family, n=1, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [[torch.randn(n, ac_dit.TXT, 32, generator=g), ac_dit.SAMPLE_CONDS[family](g)]]


def _dit_latent(family, n=1, frames=1):
    shape = ac_dit.tiny(family).x.shape
    return torch.zeros((n, shape[1], frames, *shape[-2:]) if len(shape) == 5 else (n, *shape[1:]))


def _dit_data(family, n=4, seed=0):
    lat = _dit_latent(family, n)
    _l, edges = _data(n, size=lat.shape[-1], seed=seed)
    g = torch.Generator().manual_seed(seed)
    return torch.randn(lat.shape, generator=g), edges


@functools.lru_cache(maxsize=None)
def _dit_trained(family):
    lat, edges = _dit_data(family)
    with torch.inference_mode():
        return N.train_predictor(ac_dit.tiny(family).patcher, lat, edges, _dit_conds(family), 12, 3e-3, 2, 0)


@pytest.mark.parametrize("family", ac_dit.FAMILIES)
def test_dit_features_of_every_family(family):
    """Every DiT family: `auto` picks up to four blocks' first image-query call; one forward hands their
    image-token queries, resized to the latent grid, to the feature pass and stops after the last."""
    t = ac_dit.tiny(family)
    ctrl = DS.DitSketchFeatures()
    m = attach(t.patcher, ctrl)
    router = get_dit_router(m)
    main = [b for b in router.blocks if b in router.depth]
    assert 1 <= len(ctrl.keys) == min(4, len(main)) and all(k[2] in DS.STREAMS for k in ctrl.keys)
    order = [(bt, bi, st) for bt, bi, st in router.schedule]
    assert ctrl.keys == sorted(ctrl.keys, key=order.index)
    state = SK.FeaturePass(ctrl, ctrl.keys, t.x.shape[-2:])
    m.model_options["transformer_options"][DIT_GUIDE_KEY] = state
    with pytest.raises(SK.StopForward):
        ac_dit.forward(m, t.x, t.conds)
    frames = t.x.shape[2] if t.x.dim() == 5 else 1
    f = state.features(1)
    assert f.shape == (frames, sum(state.channels()), *t.x.shape[-2:]) and torch.isfinite(f).all()
    assert len(set(state.channels())) == 1 and state.channels()[0] % 2 == 0     # heads x head width


def test_dit_layer_choice_and_errors():
    flux = ac_dit.tiny("Flux").patcher
    assert attach(flux, DS.DitSketchFeatures("double")) is not None
    c = DS.DitSketchFeatures("single:1")
    attach(flux, c)
    assert c.keys == [("single", 1, "joint")]
    with pytest.raises(AttentionControlError, match="layers: 'joint' matches no block of this model"):
        attach(flux, DS.DitSketchFeatures("joint"))


@pytest.mark.parametrize("family", SAMPLED)
def test_dit_training_lowers_the_loss_and_guides(family):
    """Training through ComfyUI's sampler on each sampled family lowers the loss; the trained predictor guides a
    run (finite, not the plain result; strength 0 = the plain model bit for bit; nothing left behind)."""
    p, losses = _dit_trained(family)
    assert [tuple(s[:3]) for s in p.sites] == attach_keys(family)
    assert sum(losses[-3:]) / 3 < 0.8 * sum(losses[:3]) / 3, losses
    t = ac_dit.tiny(family)
    pos, neg, lat = _dit_conds(family, seed=1), _dit_conds(family, seed=2), _dit_latent(family)
    noise = torch.randn(lat.shape, generator=torch.Generator().manual_seed(4))
    size = lat.shape[-1] * 8
    plain = ac_dit.sample(t.patcher, noise, pos, neg, lat, steps=3)
    with torch.inference_mode():
        m0 = _res(N.SketchGuidance.execute(t.patcher, p, _sketch(size), 0.0, 0.0, 1.0, "auto"))[0]
        m = _res(N.SketchGuidance.execute(t.patcher, p, _sketch(size), 4.0, 0.0, 1.0, "auto"))[0]
    assert torch.equal(ac_dit.sample(m0, noise, pos, neg, lat, steps=3), plain)
    out = ac_dit.sample(m, noise, pos, neg, lat, steps=3)
    assert torch.isfinite(out).all() and not torch.allclose(out, plain, atol=1e-5)
    ctrl = [c for c in get_dit_router(m).controllers if isinstance(c, DS.DitSketchGuidance)][-1]
    assert [s for s, _ in ctrl.last_loss_log] == [0, 1, 2]
    assert torch.equal(ac_dit.sample(t.patcher, noise, pos, neg, lat, steps=3), plain)


def attach_keys(family):
    c = DS.DitSketchFeatures()
    attach(ac_dit.tiny(family).patcher, c)
    return c.keys


@pytest.mark.parametrize("family", ["Flux", "Wan"])
def test_dit_guidance_gradient_chunked_and_finite_difference(family):
    """Flux, and Wan on a 2-frame video (each frame one predictor item, both following the sketch)."""
    p, _ = _dit_trained(family)
    t = ac_dit.tiny(family)
    frames = 2 if family == "Wan" else 1
    lat = _dit_latent(family, frames=frames)
    edges = SK.sketch_edges(_sketch(lat.shape[-1] * 8).permute(0, 3, 1, 2))
    probe = _probe(DS.DitSketchGuidance, p, edges)
    noise = torch.randn(lat.shape, generator=torch.Generator().manual_seed(4))
    ac_dit.sample(attach(t.patcher, probe), noise, _dit_conds(family, seed=1), _dit_conds(family, seed=2), lat,
                  steps=2)
    _check_probe(probe)


def test_chunked_predictor_gradient_equals_autograd(trained):
    """EdgePredictor.loss_grad (pixel chunks, each map resized per chunk) = autograd of the whole formula on maps
    of several resolutions."""
    p, _ = trained
    g = torch.Generator().manual_seed(0)
    c1 = p.in_channels // 2
    maps = [torch.randn(2, c1, 6, 6, generator=g), torch.randn(2, p.in_channels - c1, 3, 3, generator=g)]
    sig = torch.tensor([0.7, 3.0])
    target = (torch.rand(2, 1, 12, 12, generator=g) > 0.8).float()
    leaves = [m.clone().requires_grad_(True) for m in maps]
    ref = ((p.eval()(SK.upsampled(leaves, (12, 12)), sig) - target) ** 2).flatten(1).sum(1)
    gref = torch.autograd.grad(ref.sum(), leaves)
    loss, grads = p.loss_grad(maps, (12, 12), sig, target, chunk=11)
    torch.testing.assert_close(loss, ref.detach())
    for a, b in zip(grads, gref):
        torch.testing.assert_close(a, b)


def test_dit_predictor_on_a_unet_is_refused(sd15):
    p, _ = _dit_trained("Flux")
    with pytest.raises(AttentionControlError, match="predictor: it was trained on a DiT model and this is a UNet"):
        N.build_guidance(sd15, p, _sketch(), 1.6, 0.0, 0.5)
    with pytest.raises(AttentionControlError, match="predictor: it was trained on a model with a .* which this SD3"):
        N.build_guidance(ac_dit.tiny("SD3").patcher, p, _sketch(), 1.6, 0.0, 0.5)
