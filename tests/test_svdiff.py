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
