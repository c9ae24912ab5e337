"""Pix2Pix-Zero: the edit direction against the hand-computed mean difference, the attention gap against a
naive float64 loop, the guidance gradient against a finite difference, guidance 0 = the plain batch bit for
bit, the reference item untouched, no leak, any sampler, named errors, save / load."""
import os

import pytest
import torch

import ac_models as M
from attention_control.attention import pix2pix_zero as PZ
from attention_control.attention.core import AttentionControlError
from attention_control.attention.router import attach, get_router
from attention_control.nodes import pix2pix_zero as N

CAPTION = "a red circle and a blue square"


def _res(out):
    return out.result if hasattr(out, "result") else out


def enc(clip, text):
    return clip.encode_from_tokens(clip.tokenize(text)).float()


@pytest.fixture(scope="module")
def direction(clip_l):
    return _res(N.EditDirectionNode.execute(clip_l, "red circle\nred", "blue circle\nblue", False))[0]


def p2pz(model, clip, direction, guidance=0.15, strength=1.0, frac=1.0, layers="all", size=16):
    return _res(N.Pix2PixZero.execute(model, clip, M.latent(1, size, size), CAPTION, direction, strength, guidance,
                                      frac, layers, ""))


def controller_of(model):
    return [c for c in get_router(model).controllers if isinstance(c, PZ.Pix2PixZeroController)][-1]


def test_direction_is_the_mean_difference_of_the_sentences(clip_l, monkeypatch):
    monkeypatch.setattr(PZ, "TEMPLATES", PZ.TEMPLATES[:5])        # the shipped set is long: 5 of them suffice here
    d = _res(N.EditDirectionNode.execute(clip_l, "cat\nkitten", "dog", True))[0]
    src = [enc(clip_l, t.format(w)) for w in ("cat", "kitten") for t in PZ.TEMPLATES]
    tgt = [enc(clip_l, t.format("dog")) for t in PZ.TEMPLATES]
    want = torch.stack([t[0].double() for t in tgt]).mean(0) - torch.stack([s[0].double() for s in src]).mean(0)
    assert d.cond.shape == (1, 77, 768) and d.info["sentences"] == [2 * len(PZ.TEMPLATES), len(PZ.TEMPLATES)]
    torch.testing.assert_close(d.cond[0].double(), want, rtol=0, atol=1e-6)
    # sentences as given (templates off)
    d2 = _res(N.EditDirectionNode.execute(clip_l, "a photo of a cat", "a photo of a dog", False))[0]
    torch.testing.assert_close(d2.cond, enc(clip_l, "a photo of a dog") - enc(clip_l, "a photo of a cat"))


def test_add_direction(clip_l, direction):
    pos = clip_l.encode_from_tokens_scheduled(clip_l.tokenize(CAPTION))
    out = _res(N.AddEditDirection.execute(pos, direction, 0.5))[0]
    torch.testing.assert_close(out[0][0], pos[0][0] + 0.5 * direction.cond)
    assert out[0][0] is not pos[0][0] and torch.equal(_res(N.AddEditDirection.execute(pos, direction, 0.0))[0][0][0],
                                                      pos[0][0])
    m, positive, _neg, lat = p2pz(M.tiny_sd15(), clip_l, direction, strength=2.0)
    assert positive[0][0].shape[0] == 2 and lat["samples"].shape[0] == 2 and lat["batch_index"] == [0, 0]
    torch.testing.assert_close(positive[0][0][1] - positive[0][0][0], 2.0 * direction.cond[0])


def test_attention_gap_equals_a_naive_loop():
    g = torch.Generator().manual_seed(0)
    items, heads, n, k = 3, 2, 5, 4
    probs = torch.rand(items, heads, n, k, generator=g, dtype=torch.float64).softmax(-1)
    ref = torch.rand(1, heads, n, k, generator=g, dtype=torch.float64).softmax(-1)
    got = PZ.attention_gap(probs, ref, items)
    want = torch.zeros(items, dtype=torch.float64)
    for j in range(items):
        for h in range(heads):
            s = 0.0
            for p in range(n):
                for q in range(k):
                    s += float(probs[j, h, p, q] - ref[0, h, p, q]) ** 2
            want[j] += s / heads
    torch.testing.assert_close(got, want)
    assert PZ.attention_gap(ref, ref, 1)[0] == 0


class _Probe(PZ.Pix2PixZeroController):
    """Checks, at the first guided step, the autograd gradient of the loss along a random direction against a
    central finite difference (float32 model: a step of 1e-3 of the latent's scale)."""
    checked = None

    def guide(self, predict, x, sigma, run, passes):
        if self.checked is None:
            with torch.inference_mode(False), torch.enable_grad():
                x0 = x.detach().clone()
                v = torch.randn(x0.shape, generator=torch.Generator().manual_seed(1), dtype=x0.dtype)
                v[0] = 0
                xk = x0.clone().requires_grad_(True)
                grad, = torch.autograd.grad(self.loss_at(xk, run, passes).sum(), [xk])
                eps = 1e-3 * float(x0.abs().max())
                with torch.no_grad():
                    lp = self.loss_at(x0 + eps * v, run, passes).sum()
                    lm = self.loss_at(x0 - eps * v, run, passes).sum()
            self.checked = (float((grad * v).sum()), float((lp - lm) / (2 * eps)), float(grad[0].abs().max()))
        return super().guide(predict, x, sigma, run, passes)


def test_guidance_gradient_equals_a_finite_difference(clip_l, direction):
    model = M.tiny_sd15(seed=5)
    _m, pos, neg, lat = p2pz(model, clip_l, direction)
    probe = _Probe(0.15)
    m = attach(model, probe)
    M.ksample(m, pos, neg, lat, steps=2)
    analytic, numeric, ref_grad = probe.checked
    assert analytic != 0 and analytic == pytest.approx(numeric, rel=2e-2), probe.checked
    assert ref_grad == 0.0                                  # the reference item is not moved


def test_guidance_zero_is_the_plain_batch_and_the_reference_is_untouched(sd15, clip_l, direction):
    m0, pos, neg, lat = p2pz(sd15, clip_l, direction, guidance=0.0)
    plain = M.ksample(sd15, pos, neg, lat, steps=4)
    assert torch.equal(M.ksample(m0, pos, neg, lat, steps=4), plain)
    m, pos, neg, lat = p2pz(sd15, clip_l, direction, guidance=0.15, frac=0.5)
    out = M.ksample(m, pos, neg, lat, steps=4)
    torch.testing.assert_close(out[0], plain[0], rtol=0, atol=1e-6)     # the reference samples the caption
    assert not torch.allclose(out[1], plain[1], atol=1e-4)              # the edit is guided
    log = controller_of(m).last_loss_log
    assert [s for s, _ in log] == [0, 1] and all(v[0] == 0 and v[1] > 0 for _s, v in log)
    assert torch.equal(M.ksample(sd15, pos, neg, lat, steps=4), plain)  # nothing leaks into the model


@pytest.mark.parametrize("order", ["layout_first", "p2pzero_first"])
def test_composes_with_layout_guidance_in_either_order(sd15, clip_l, direction, order):
    """Two whole-step guidance controllers on one MODEL: each moves the latent (its log filled), the result is
    neither one alone, and the model given to them is untouched."""
    from attention_control.attention.layout import LayoutController
    from attention_control.nodes.layout import Boxes, LayoutGuidance
    boxes = _res(Boxes.execute("red circle: 0,0,0.5,0.5", "fraction", 64, 64))[0]
    lay = lambda m: _res(LayoutGuidance.execute(m, clip_l, CAPTION, boxes, "backward", 30.0, 1, 0.0, 0.5, 0.5,
                                                "auto", "none"))[0]
    pz_alone, pos, neg, lat = p2pz(sd15, clip_l, direction, frac=0.5)
    both = p2pz(lay(sd15), clip_l, direction, frac=0.5)[0] if order == "layout_first" else lay(pz_alone)
    outs = {k: M.ksample(m, pos, neg, lat, steps=2) for k, m in
            (("p2pzero", pz_alone), ("layout", lay(sd15)), ("both", both))}
    ctrls = get_router(both).controllers
    lc = [c for c in ctrls if isinstance(c, LayoutController)][-1]
    assert controller_of(both).last_loss_log and lc.last_energy_log
    assert not torch.allclose(outs["both"], outs["p2pzero"], atol=1e-5)
    assert not torch.allclose(outs["both"], outs["layout"], atol=1e-5)
    assert torch.equal(M.ksample(pz_alone, pos, neg, lat, steps=2), outs["p2pzero"])


@pytest.mark.parametrize("sampler", ["euler_ancestral", "dpmpp_2m", "ddim"])
def test_every_sampler_runs_guided(sd15, clip_l, direction, sampler):
    m, pos, neg, lat = p2pz(sd15, clip_l, direction, frac=0.5)
    out = M.ksample(m, pos, neg, lat, steps=3, sampler=sampler)
    assert torch.isfinite(out).all() and controller_of(m).last_loss_log


def test_sdxl_shaped_model(sdxl, clip_l):
    m = attach(sdxl, PZ.Pix2PixZeroController(0.15, 0.5))
    g = torch.Generator().manual_seed(0)
    pos = [[torch.randn(2, 77, 2048, generator=g), {"pooled_output": torch.randn(2, 1280, generator=g)}]]
    neg = [[torch.zeros(2, 77, 2048), {"pooled_output": torch.zeros(2, 1280)}]]
    lat = dict(M.latent(2, 16, 16), batch_index=[0, 0])
    out = M.ksample(m, pos, neg, lat, steps=2)
    assert torch.isfinite(out).all() and controller_of(m).last_loss_log


def test_named_errors(sd15, clip_l, direction):
    with pytest.raises(AttentionControlError, match="pix2pix-zero: the latent has one item"):
        m = attach(sd15, PZ.Pix2PixZeroController(0.1))
        pos = clip_l.encode_from_tokens_scheduled(clip_l.tokenize(CAPTION))
        M.ksample(m, pos, pos, M.latent(1, 16, 16), steps=2)
    with pytest.raises(AttentionControlError, match="latent: Pix2Pix-Zero takes one latent item"):
        N.Pix2PixZero.execute(sd15, clip_l, M.latent(2, 16, 16), CAPTION, direction, 1.0, 0.1, 1.0, "all", "")
    with pytest.raises(AttentionControlError, match=r"direction: the direction is \(77, 32\)"):
        N.AddEditDirection.execute(clip_l.encode_from_tokens_scheduled(clip_l.tokenize(CAPTION)),
                                   N.EditDirection(torch.zeros(1, 77, 32)), 1.0)
    assert "guidance" in N.Pix2PixZero.validate_inputs(guidance=float("nan"))
    assert "layers: 'sideways'" in N.Pix2PixZero.validate_inputs(layers="sideways")
    assert "caption" in N.Pix2PixZero.validate_inputs(caption="  ")
    assert "source" in N.EditDirectionNode.validate_inputs(source="\n ")
    with pytest.raises(AttentionControlError, match="target: give the target concept"):
        N.build_direction(clip_l, "cat", "", True)
    with pytest.raises(AttentionControlError, match="encodes to 154 tokens"):
        N.build_direction(clip_l, "cat", " ".join(["dog"] * 90), False)


def test_save_and_load_round_trip(direction, tmp_path, monkeypatch):
    import folder_paths
    import safetensors.torch
    monkeypatch.setattr(folder_paths, "output_directory", str(tmp_path))
    monkeypatch.delitem(folder_paths.folder_names_and_paths, N.FOLDER, raising=False)
    N.SaveEditDirection.execute(direction, "edit_directions/test")
    files = N.weight_files.listed(N.FOLDER)
    assert files == ["test_00001_.safetensors"]
    assert os.path.getsize(tmp_path / N.FOLDER / files[0]) < 77 * 768 * 4 + 4096
    got = _res(N.LoadEditDirection.execute(files[0]))[0]
    assert torch.equal(got.cond, direction.cond) and got.info == direction.info
    safetensors.torch.save_file({"x": torch.zeros(2)}, str(tmp_path / N.FOLDER / "other.safetensors"))
    with pytest.raises(AttentionControlError, match="direction_name: 'other.safetensors' is not an edit direction"):
        N.LoadEditDirection.execute("other.safetensors")
