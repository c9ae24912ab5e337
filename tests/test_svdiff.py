"""SVDiff (spectral shifts) on the real ComfyUI with the tiny random SD1.5: the reparametrisation, training
(only the shifts move, the loss falls, deterministic per seed), the weight patch (scale, LoRA chaining, no
leak), save / load, named errors."""
import os

import comfy.lora
import comfy.model_management
import pytest
import torch

import ac_models as M
from attention_control.attention.core import AttentionControlError
from attention_control.attention.router import discover_sites
from attention_control.attention.svdiff import SpectralShift, spectral_delta, svd_of
from attention_control.nodes import svdiff as SV

def _plain_sd(model):
    """The model's own weights: the plain patcher loaded first (another test's clone may still be patched into
    the shared model)."""
    comfy.model_management.load_models_gpu([model])
    return model.model.state_dict()



def test_zero_shifts_reproduce_the_weight_and_the_reparametrisation_is_the_papers():
    g = torch.Generator().manual_seed(0)
    for shape in [(12, 7), (6, 4, 3, 3)]:
        w = torch.randn(shape, generator=g)
        mod = SpectralShift(w)
        assert torch.equal(mod(w), w)                                # d = 0: bit for bit
        u, s, vh = (t.double() for t in svd_of(w))
        mat = w.double().reshape(shape[0], -1)
        torch.testing.assert_close(u @ torch.diag(s) @ vh, mat, rtol=1e-6, atol=1e-6)
        d = torch.randn(s.shape, generator=g)
        with torch.no_grad():
            mod.shift.copy_(d)
        want = u @ torch.diag(torch.relu(s + d.double())) @ vh       # the paper's U diag(relu(s + d)) V^T
        torch.testing.assert_close(mod(w).double().reshape(mat.shape), want, rtol=1e-4, atol=1e-4)
        # the load-time patch computes the same weight, and the scale sits inside the relu
        patch = SV.SpectralShiftPatch(d)
        got = patch.calculate_weight(w.clone(), f"k{len(shape)}", 1.0, 1.0, None, lambda a: a)
        torch.testing.assert_close(got, mod(w), rtol=1e-5, atol=1e-5)
        half = patch.calculate_weight(w.clone(), f"k{len(shape)}", 0.5, 1.0, None, lambda a: a)
        torch.testing.assert_close(half.double().reshape(mat.shape),
                                   u @ torch.diag(torch.relu(s + 0.5 * d.double())) @ vh, rtol=1e-4, atol=1e-4)
        assert torch.equal(patch.calculate_weight(w.clone(), "k", 0.0, 1.0, None, lambda a: a), w)


def test_gradient_reaches_only_the_shift():
    w = torch.randn(5, 4, generator=torch.Generator().manual_seed(1), requires_grad=False)
    mod = SpectralShift(w)
    x = torch.randn(3, 4)
    (x @ mod(w).T).square().sum().backward()
    assert [n for n, p in mod.named_parameters()] == ["shift"] and mod.shift.grad is not None
    assert float(mod.shift.grad.abs().sum()) > 0 and w.grad is None


@pytest.fixture(scope="module")
def data(clip_l):
    g = torch.Generator().manual_seed(3)
    lat = torch.randn(4, 4, 16, 16, generator=g) * 0.5
    pos = [[clip_l.encode_from_tokens(clip_l.tokenize("a photo of sks")), {}]]
    return lat, pos


def _train(model, data, steps=12, lr=0.01, seed=0):
    lat, pos = data
    with torch.inference_mode():
        return SV.TrainSpectralShifts.execute(model, {"samples": lat}, pos, steps, lr, 2, seed).result


def _eval_loss(m, lat, ctx):
    """x0-prediction MSE of the loaded model at three fixed noise levels and fixed noise."""
    comfy.model_management.load_models_gpu([m])
    ms = m.model.model_sampling
    g = torch.Generator().manual_seed(9)
    total = 0.0
    with torch.inference_mode():
        for pct in (0.3, 0.5, 0.7):
            sig = torch.full((lat.shape[0],), float(ms.percent_to_sigma(pct)))
            eps = torch.randn(lat.shape, generator=g)
            xt = ms.noise_scaling(sig, eps, lat, False)
            den = m.model.apply_model(xt, sig, c_crossattn=ctx.expand(lat.shape[0], -1, -1))
            total += float(torch.nn.functional.mse_loss(den, lat))
    return total / 3


@pytest.fixture(scope="module")
def trained(sd15, data):
    before = {k: v.clone() for k, v in _plain_sd(sd15).items()}
    out = _train(sd15, data)
    return before, out


def test_training_moves_only_the_shifts_and_lowers_the_loss(sd15, data, trained):
    before, (m, shifts, loss_map) = trained
    after = _plain_sd(sd15)
    assert all(torch.equal(before[k], after[k]) for k in before)            # the model's weights never move
    targets = SV.shift_targets(sd15)
    assert set(shifts) == set(targets) and all(float(v.abs().sum()) > 0 for v in shifts.values())
    assert all(v.numel() == min(targets[k].shape[0], targets[k][0].numel()) for k, v in shifts.items())
    assert len(loss_map["loss"]) == 12
    lat, pos = data
    ctx = pos[0][0]
    plain, tuned = _eval_loss(sd15, lat, ctx), _eval_loss(m, lat, ctx)
    assert tuned < 0.95 * plain, (tuned, plain)          # measured 0.91 after 12 steps


def test_training_is_deterministic_per_seed(sd15, data, trained):
    _before, (_m, shifts, _l) = trained
    _m2, again, _l2 = _train(sd15, data)
    assert all(torch.equal(shifts[k], again[k]) for k in shifts)
    _m3, other, _l3 = _train(sd15, data, seed=1)
    assert any(not torch.equal(shifts[k], other[k]) for k in shifts)


def test_scale_zero_and_no_leak(sd15, data, trained):
    _before, (m, shifts, _l) = trained
    cond, unc = M.cond(1, seed=3), M.cond(1, seed=4)
    base = M.ksample(sd15, cond, unc, M.latent(1), seed=1, steps=3)
    assert not SV.apply_shifts(sd15, shifts, 0.0).patches
    assert torch.equal(M.ksample(SV.apply_shifts(sd15, shifts, 0.0), cond, unc, M.latent(1), seed=1, steps=3), base)
    assert not torch.equal(M.ksample(m, cond, unc, M.latent(1), seed=1, steps=3), base)
    assert torch.equal(M.ksample(sd15, cond, unc, M.latent(1), seed=1, steps=3), base)


def _lora(weight, seed):
    from comfy.weight_adapter.lora import LoRAAdapter
    g = torch.Generator().manual_seed(seed)
    up = 0.05 * torch.randn(weight.shape[0], 2, generator=g)
    down = 0.05 * torch.randn(2, weight[0].numel(), generator=g)
    return LoRAAdapter(set(), (up, down, None, None, None, None)), (up @ down).reshape(weight.shape)


@pytest.mark.parametrize("order", ["lora_first", "shifts_first"])
def test_chains_with_a_lora(sd15, trained, order):
    _before, (_m, shifts, _l) = trained
    names = sorted(shifts)[:4]
    sd = _plain_sd(sd15)
    loras = {n: _lora(sd[f"{n}.weight"], i) for i, n in enumerate(names)}
    sub = {n: shifts[n] for n in names}
    if order == "lora_first":
        m = sd15.clone()
        m.add_patches({f"{n}.weight": p for n, (p, _) in loras.items()}, 1.0)
        m = SV.apply_shifts(m, sub, 1.0)
    else:
        m = SV.apply_shifts(sd15, sub, 1.0)
        m.add_patches({f"{n}.weight": p for n, (p, _) in loras.items()}, 1.0)
    for n in names:
        k = f"{n}.weight"
        w, lw = sd[k].float(), loras[n][1]
        got = comfy.lora.calculate_weight(m.patches[k], w.clone(), k)
        first = w + lw if order == "lora_first" else w
        u, s, vh = svd_of(first)
        want = first + spectral_delta(u, s, vh, shifts[n]).reshape(w.shape)
        if order == "shifts_first":
            want = want + lw
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_save_and_load_round_trip(sd15, trained, tmp_path, monkeypatch):
    import folder_paths
    import safetensors.torch
    _before, (m, shifts, _l) = trained
    monkeypatch.setattr(folder_paths, "output_directory", str(tmp_path))
    monkeypatch.delitem(folder_paths.folder_names_and_paths, SV.FOLDER, raising=False)
    SV.SaveSpectralShifts.execute(shifts, "spectral_shifts/test")
    files = SV.shift_files()
    assert files == ["test_00001_.safetensors"]
    path = tmp_path / SV.FOLDER / files[0]
    assert os.path.getsize(path) < 4 * sum(v.numel() for v in shifts.values()) + 200 * len(shifts) + 4096
    m2, loaded = SV.LoadSpectralShifts.execute(sd15, files[0], 1.0).result
    assert set(loaded) == set(shifts) and all(torch.equal(loaded[k], shifts[k]) for k in shifts)
    sd = _plain_sd(sd15)
    for k in sorted(m.patches)[:6]:
        a = comfy.lora.calculate_weight(m.patches[k], sd[k].float().clone(), k)
        b = comfy.lora.calculate_weight(m2.patches[k], sd[k].float().clone(), k)
        assert torch.equal(a, b)
    # Apply Spectral Shifts with the loaded shifts patches the same; scale 0 adds no patch
    m3 = SV.ApplySpectralShifts.execute(sd15, loaded, 1.0).result[0]
    assert set(m3.patches) == set(m2.patches)
    for k in sorted(m.patches)[:6]:
        c = comfy.lora.calculate_weight(m3.patches[k], sd[k].float().clone(), k)
        assert torch.equal(c, comfy.lora.calculate_weight(m2.patches[k], sd[k].float().clone(), k))
    assert not SV.ApplySpectralShifts.execute(sd15, loaded, 0.0).result[0].patches
    with pytest.raises(AttentionControlError, match="shifts: connect the shifts output"):
        SV.ApplySpectralShifts.execute(sd15, {}, 1.0)
    # named errors: not a shift file, a damaged file, shifts of another model
    safetensors.torch.save_file({"x": torch.zeros(2)}, str(tmp_path / SV.FOLDER / "other.safetensors"))
    with pytest.raises(AttentionControlError, match="shifts_name: 'other.safetensors' is not a spectral-shift file"):
        SV.LoadSpectralShifts.execute(sd15, "other.safetensors", 1.0)
    bad = dict(shifts)
    k0 = sorted(bad)[0]
    bad[k0] = bad[k0].clone()
    bad[k0][0] = float("inf")
    SV.save_shifts(bad, str(tmp_path / SV.FOLDER / "bad.safetensors"))
    with pytest.raises(AttentionControlError, match="shifts_name: 1 of .* not finite"):
        SV.LoadSpectralShifts.execute(sd15, "bad.safetensors", 1.0)
    with pytest.raises(AttentionControlError,
                       match="shifts_name: the shifts name 'diffusion_model.nope', which this model does not have"):
        SV.apply_shifts(sd15, {"diffusion_model.nope": torch.zeros(3)}, 1.0, "shifts_name")
    with pytest.raises(AttentionControlError, match=f"shifts_name: '{k0}' has 2 shifts"):
        SV.apply_shifts(sd15, {k0: torch.zeros(2)}, 1.0, "shifts_name")


def test_train_named_errors(sd15, data):
    lat, pos = data
    with pytest.raises(AttentionControlError, match="positive: 2 conditionings for 4 latents"):
        SV.TrainSpectralShifts.execute(sd15, {"samples": lat}, pos * 2, 1, 0.01, 1, 0)
    bad = lat.clone()
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(AttentionControlError, match="latents: 1 of"):
        SV.TrainSpectralShifts.execute(sd15, {"samples": bad}, pos, 1, 0.01, 1, 0)
    assert "learning_rate" in SV.TrainSpectralShifts.validate_inputs(learning_rate=float("nan"))


def test_train_refuses_an_empty_batch(sd15, data):
    _lat, pos = data
    for bad in ({"samples": torch.zeros(0, 4, 16, 16)}, {}):
        with pytest.raises(AttentionControlError, match="latents: give at least one image"):
            SV.TrainSpectralShifts.execute(sd15, bad, pos, 1, 0.01, 1, 0)


# --------------------------------------------------------------------------------------------
# Cut-Mix-Unmix

@pytest.fixture(scope="module")
def second(clip_l):
    g = torch.Generator().manual_seed(4)
    return torch.randn(3, 4, 16, 16, generator=g) * 0.5, [[clip_l.encode_from_tokens(clip_l.tokenize("a photo of zwx")), {}]]


def _cut_mix(clip, second, prompt="a sks dog and a zwx cat", fraction=1.0, weight=1.0):
    lb, pb = second
    return SV.CutMixUnmix.execute(clip, {"samples": lb}, pb, prompt, "sks", "zwx", fraction, weight).result[0]


def test_cut_mix_joins_halves_and_swaps_the_sides_of_the_caption(clip_l, second):
    a, b = torch.zeros(4, 6, 7), torch.ones(4, 6, 7)
    m = SV._cut_mix(a, b, True)
    assert torch.equal(m[..., :3], a[..., :3]) and torch.equal(m[..., 3:], b[..., 3:])
    assert torch.equal(SV._cut_mix(a, b, False)[..., :3], b[..., :3])
    cm = _cut_mix(clip_l, second, "a sks dog on the Left and a zwx cat on the right")
    assert [m[3] for m in cm.mixes] == [True, False]
    assert SV._swap_sides("a sks dog on the Left and a zwx cat on the right") == \
        "a sks dog on the Right and a zwx cat on the left"
    (_c0, n0, obj0, _), (_c1, _n1, obj1, _) = cm.mixes
    assert n0 == 77 and [o[1].x0 for o in obj0] == [0.0, 0.5] and [o[1].x0 for o in obj1] == [0.5, 0.0]
    assert obj0[0][0] == [2] and obj0[1][0] == obj1[1][0] and len(obj0[1][0]) >= 1
    assert len(_cut_mix(clip_l, second).mixes) == 1                    # no sides named: word_a on the left only


def _sites_patch(model, fn):
    """A clone with `fn` as ComfyUI's attn2 replace patch at every cross-attention site."""
    m = model.clone()
    for s in discover_sites(model):
        if s.kind == "cross":
            m.set_model_attn2_replace(fn, s.block[0], s.block[1], s.index)
    return m


def test_unmix_term_equals_the_naive_share_on_every_cross_layer(sd15, clip_l, data, second):
    """One training step with mixes only: the reported unmix term equals the float64 mean over cross layers,
    heads, token positions and both words of (1 - attention share on the word's own half)^2."""
    import comfy.ldm.modules.attention as A
    lat, pos = data
    cm = _cut_mix(clip_l, second)
    (_c, plen, objects, _a_left), = cm.mixes
    naive = []

    def patch(q, k, v, extra):
        heads = extra["n_heads"]
        with torch.no_grad():
            h, w = extra["activations_shape"][-2:]
            qh = q.double().reshape(q.shape[0], q.shape[1], heads, -1).transpose(1, 2)
            kh = k.double().reshape(k.shape[0], k.shape[1], heads, -1).transpose(1, 2)
            p = (qh @ kh.transpose(-1, -2) * qh.shape[-1] ** -0.5).softmax(-1)          # (B, H, N, 77)
            cols = torch.arange(w, dtype=torch.float64) + 0.5
            for positions, box in objects:
                half = ((cols >= box.x0 * w) & (cols < box.x1 * w)).double().repeat(h)   # (N,)
                a = p[..., positions]
                share = (a * half[None, None, :, None]).sum(2) / a.sum(2)
                naive.append(float(((1 - share) ** 2).mean()))
        return A.optimized_attention(q, k, v, heads)

    m = _sites_patch(sd15, patch)
    with torch.inference_mode():
        _m, _s, lm = SV.TrainSpectralShifts.execute(m, {"samples": lat}, pos, 1, 1e-6, 2, 0, cm).result
    n_cross = sum(1 for s in discover_sites(sd15) if s.kind == "cross")
    assert len(naive) == 2 * n_cross                       # every cross layer, both words
    assert lm["unmix"] and lm["unmix"][0] == pytest.approx(sum(naive) / len(naive), rel=1e-4)


def test_each_model_call_sees_one_caption(sd15, clip_l, data, second):
    """ComfyUI applies every conditioning of a list to every item: the trainer runs one call per caption,
    so that images, the second subject and the mixes each get their own."""
    lat, pos = data
    calls = []

    def wrapper(apply, args):
        calls.append((args["input"].shape[0], args["c"]["c_crossattn"].clone()))
        return apply(args["input"], args["timestep"], **args["c"])

    m = sd15.clone()
    m.set_model_unet_function_wrapper(wrapper)
    cm = _cut_mix(clip_l, second, fraction=0.5)
    with torch.inference_mode():
        SV.TrainSpectralShifts.execute(m, {"samples": lat}, pos, 6, 1e-6, 4, 0, cm)
    assert sum(n for n, _ in calls) == 6 * 4
    caps = [cm.mixes[0][0][0], pos[0][0], second[1][0][0]]
    seen = set()
    for n, ctx in calls:
        assert ctx.shape[0] == n and all(torch.equal(ctx[i], ctx[0]) for i in range(n))
        seen.add(next(j for j, c in enumerate(caps) if torch.allclose(ctx[0], c[0].to(ctx), atol=1e-5)))
    assert seen == {0, 1, 2}                                 # mixes, the first subject and the second were drawn


def test_cut_mix_named_errors(sd15, clip_l, data, second):
    lat, pos = data
    lb, pb = second
    run = SV.CutMixUnmix.execute
    with pytest.raises(AttentionControlError, match="word_a: 'sks' is not in the prompt"):
        run(clip_l, {"samples": lb}, pb, "a dog and a zwx cat", "sks", "zwx", 0.5, 1.0)
    with pytest.raises(AttentionControlError, match="word_b: it is the same word as word_a"):
        run(clip_l, {"samples": lb}, pb, "a sks dog", "sks", "SKS", 0.5, 1.0)
    with pytest.raises(AttentionControlError, match="latents_b: give at least one image"):
        run(clip_l, {"samples": lb[:0]}, pb, "a sks dog and a zwx cat", "sks", "zwx", 0.5, 1.0)
    with pytest.raises(AttentionControlError, match="unmix_weight"):
        run(clip_l, {"samples": lb}, pb, "a sks dog and a zwx cat", "sks", "zwx", 0.5, float("nan"))
    assert "word_a" in SV.CutMixUnmix.validate_inputs(word_a="sks, dog")
    assert "mix_fraction" in SV.CutMixUnmix.validate_inputs(mix_fraction=1.5)
    assert SV.CutMixUnmix.validate_inputs(mix_prompt="a sks and a zwx", word_a="sks", word_b="zwx") is True
    small = {"samples": torch.zeros(2, 4, 8, 8)}
    cm = SV.CutMixUnmix.execute(clip_l, small, pb, "a sks dog and a zwx cat", "sks", "zwx", 0.5, 1.0).result[0]
    with pytest.raises(AttentionControlError, match=r"latents_b: the second subject's latents are \(4, 8, 8\)"):
        SV.TrainSpectralShifts.execute(sd15, {"samples": lat}, pos, 1, 0.01, 1, 0, cm)


@pytest.mark.parametrize("family", ["Flux", "SD3", "Wan"])
def test_cut_mix_unmix_trains_a_dit(family):
    """SVDiff trains DiTs (Flux's in-place residual writes included). On DiTs the unmix term reads the image-query x text-key probabilities (Flux: joint attention; Wan:
    cross-attention); the trainer runs, and the term is a share in (0, 1)."""
    from ac_dit import SAMPLE_CONDS, TXT, tiny
    from attention_control.attention.unmix import LEFT, RIGHT
    t = tiny(family)
    g = torch.Generator().manual_seed(2)
    shape = (2,) + tuple(t.x.shape[1:])
    la, lb = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
    def cond():
        return [[torch.randn(1, TXT, 32, generator=g), SAMPLE_CONDS[family](g)]]
    objects = [([1], LEFT), ([3, 4], RIGHT)]
    cm = SV.CutMix(lb, cond(), [(cond()[0], TXT, objects, True)], 1.0, 1.0)
    with torch.inference_mode():
        _m, shifts, lm = SV.TrainSpectralShifts.execute(t.patcher, {"samples": la}, cond(), 2, 0.01, 2, 0, cm).result
    assert len(lm["unmix"]) == 2 and all(0.0 < u < 1.0 for u in lm["unmix"]), lm
    assert any(float(v.abs().sum()) > 0 for v in shifts.values())
