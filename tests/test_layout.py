"""Layout guidance: boxes, the box energy against a naive loop, gradient guidance inside ComfyUI's
inference-mode sampling (model untouched afterwards), forward guidance, errors, SDXL."""
import pytest
import torch

import ac_models as M
from attention_control.attention import layout as L
from attention_control.attention.core import AttentionControlError, LayerSelector
from attention_control.attention.router import attach
from attention_control.nodes.layout import Boxes, BoxesToMask, LayoutGuidance

PROMPT = "a red circle and a photorealistic blue square"


def _res(out):
    return out.result if hasattr(out, "result") else out


def boxes(text, units="fraction", w=512, h=512):
    return _res(Boxes.execute(text, units, w, h))[0]


def guided(model, clip, box_text, prompt=PROMPT, mode="backward", strength=30.0, iterations=5, thr=0.2,
           frac=0.5, fwd=0.5, layers="auto", special="none"):
    m, pos = _res(LayoutGuidance.execute(model, clip, prompt, boxes(box_text), mode, strength, iterations, thr,
                                         frac, fwd, layers, special))
    return m, pos


def controller_of(model):
    from attention_control.attention.router import get_router
    return [c for c in get_router(model).controllers if isinstance(c, L.LayoutController)][-1]


# ---------------------------------------------------------------- boxes

def test_boxes_text_json_pixels_agree():
    a = boxes("red circle: 0.1,0.2,0.5,0.8\nblue square: 0.5, 0.5, 1, 1")
    b = boxes('[{"phrase": "red circle", "box": [0.1, 0.2, 0.5, 0.8]}, {"phrase": "blue square", "box": [0.5,0.5,1,1]}]')
    c = boxes("red circle: 64,128,320,512\nblue square: 320,320,640,640", "pixels", 640, 640)
    assert [x.phrase for x in a] == ["red circle", "blue square"]
    for x, y, z in zip(a, b, c):
        assert x.as_list() == y.as_list()
        assert x.as_list() == pytest.approx([v for v in z.as_list()])


@pytest.mark.parametrize("text,units,match", [
    ("cat: 0.1,0.2,1.5,0.8", "fraction", "outside the image"),
    ("cat: 10,10,600,100", "pixels", "outside the 512x512 image"),
    ("cat: 0.5,0.2,0.5,0.8", "fraction", "empty"),
    ("cat: 0.6,0.2,0.5,0.8", "fraction", "empty"),
    (": 0.1,0.2,0.5,0.8", "fraction", "no phrase"),
    ("cat 0.1,0.2,0.5,0.8", "fraction", "phrase: x0,y0,x1,y1"),
    ("cat: 0.1,0.2,0.5", "fraction", "4 numbers"),
    ("", "fraction", "no box"),
    ("[{\"phrase\": \"cat\"}]", "fraction", "JSON item 1"),
])
def test_bad_boxes_are_named(text, units, match):
    with pytest.raises(AttentionControlError, match=match):
        boxes(text, units)


def test_box_coverage_is_exact_area():
    b = L.Box("x", 0.1, 0.25, 0.5, 1.0)
    cov = L.box_coverage(b, 8, 8)
    assert cov.sum().item() == pytest.approx(0.4 * 0.75 * 64)
    assert cov[0, 0] == 0 and cov[2, 1] == pytest.approx(1.0) and cov[2, 0] == pytest.approx(0.2)
    win = L.box_window(b, 8, 8)
    assert win.sum().item() == pytest.approx(1.0)
    assert win[4, 2] > 10 * win[4, 7]


def test_box_cells_follow_the_reference_rule():
    """silent-chen/layout-guidance: mask[int(y0 H):int(y1 H), int(x0 W):int(x1 W)] = 1. Hand case on an
    8x8 map: x 0.1..0.5 -> columns int(0.8)=0 .. int(4.0)=4 (0-3), y 0.3..0.7 -> rows int(2.4)=2 ..
    int(5.6)=5 (2-4): the low edge's partial cell is in, the high edge's partial cell is out."""
    b = L.Box("x", 0.1, 0.3, 0.5, 0.7)
    m = L.box_cells(b, 8, 8)
    want = torch.zeros(8, 8)
    want[2:5, 0:4] = 1
    assert torch.equal(m, want)
    # the energy then differs from the fractional rule by a few per cent on such a box
    torch.manual_seed(3)
    probs = torch.rand(1, 2, 64, 5).softmax(-1)
    e_ref = L.layer_energy(probs, [([1, 2], m.flatten())])
    e_frac = L.layer_energy(probs, [([1, 2], L.box_coverage(b, 8, 8).flatten())])
    assert not torch.allclose(e_ref, e_frac)
    with pytest.raises(AttentionControlError, match="box_cells: 'exact'"):
        L.LayoutController([L.LayoutObject(b, [1])], 77, LayerSelector.parse(L.DEFAULT_LAYERS), cells="exact")


def test_boxes_to_mask():
    bx = boxes("a: 0,0,0.5,0.5\nb: 0.5,0.5,1,1")
    masks = _res(BoxesToMask.execute(bx, 8, 4, -1, False))[0]
    assert masks.shape == (2, 4, 8)
    assert masks[0, :2, :4].eq(1).all() and masks[0].sum() == 8
    union = _res(BoxesToMask.execute(bx, 8, 4, -1, True))[0]
    assert union.shape == (1, 4, 8) and union.sum() == 16
    one = _res(BoxesToMask.execute(bx, 8, 4, 1, False))[0]
    assert torch.equal(one[0], masks[1])
    with pytest.raises(AttentionControlError, match="index: 2"):
        BoxesToMask.execute(bx, 8, 4, 2, False)


# ---------------------------------------------------------------- energy vs naive

def test_energy_equals_naive_loop():
    g = torch.Generator().manual_seed(0)
    heads, d, h, w, K = 4, 8, 6, 5, 77
    q = torch.randn(2, h * w, heads * d, generator=g)
    k = torch.randn(2, K, heads * d, generator=g)
    objs = [([3, 4], L.box_coverage(L.Box("a", 0.1, 0.2, 0.6, 0.9), h, w).flatten()),
            ([7], L.box_coverage(L.Box("b", 0.5, 0.0, 1.0, 0.5), h, w).flatten())]
    got = L.layer_energy(L.cross_probs(q, k, heads), objs)
    for b in range(2):
        total = 0.0
        for cols, cover in objs:
            acc = 0.0
            for i in cols:
                per_head = []
                for hh in range(heads):
                    qs = q[b, :, hh * d:(hh + 1) * d]
                    ks = k[b, :, hh * d:(hh + 1) * d]
                    a = torch.softmax(qs @ ks.T / d ** 0.5, dim=-1)[:, i]
                    per_head.append((1 - (a * cover).sum() / a.sum()) ** 2)
                acc += sum(per_head) / heads
            total += acc / len(cols)
        assert got[b].item() == pytest.approx(float(total), rel=1e-5)


def test_forward_delta_equals_naive_reweighted_attention():
    g = torch.Generator().manual_seed(1)
    B, heads, N, K, d = 2, 3, 20, 77, 4
    probs = torch.softmax(torch.randn(B, heads, N, K, generator=g), -1)
    vh = torch.randn(B, heads, K, d, generator=g)
    win = torch.rand(N, generator=g)
    win = win / win.sum()
    cols, lam = [5, 6], 0.3
    a2 = probs.clone()
    for i in cols:
        a2[..., i] = (1 - lam) * probs[..., i] + lam * win * probs[..., i].sum(-1, keepdim=True)
    naive = a2 @ vh - probs @ vh
    assert torch.allclose(L.forward_delta(probs, vh, [(cols, win)], lam), naive, atol=1e-6)
    # column mass is kept
    assert torch.allclose(a2.sum(2), probs.sum(2), atol=1e-6)


# ---------------------------------------------------------------- sampling

@pytest.fixture(scope="module")
def base(sd15, clip_l):
    pos = clip_l.encode_from_tokens_scheduled(clip_l.tokenize(PROMPT))
    neg = clip_l.encode_from_tokens_scheduled(clip_l.tokenize(""))
    out = M.ksample(sd15, pos, neg, M.latent(1, 16, 16), steps=4)
    return pos, neg, out


def test_strength_zero_is_bit_identical(sd15, clip_l, base):
    pos, neg, ref = base
    m, pos2 = guided(sd15, clip_l, "red circle: 0,0,0.5,0.5", strength=0.0)
    assert torch.equal(pos2[0][0], pos[0][0])
    assert torch.equal(M.ksample(m, pos2, neg, M.latent(1, 16, 16), steps=4), ref)
    m, _ = guided(sd15, clip_l, "red circle: 0,0,0.5,0.5", mode="forward", fwd=0.0)
    assert torch.equal(M.ksample(m, pos, neg, M.latent(1, 16, 16), steps=4), ref)


def test_one_iteration_lowers_the_energy(sd15, clip_l, base):
    pos, neg, ref = base
    m, _ = guided(sd15, clip_l, "red circle: 0,0,0.5,0.5\nblue square: 0.5,0.5,1,1", strength=30.0,
                  iterations=2, thr=0.0, frac=0.5)
    out = M.ksample(m, pos, neg, M.latent(1, 16, 16), steps=4)
    assert not torch.equal(out, ref)
    log = controller_of(m).last_energy_log
    assert [s for s, _ in log] == [0, 1]                  # guided steps: first half of 4
    for _step, iters in log:
        assert len(iters) == 2 and iters[1][0] < iters[0][0]


def _weights_inference(model):
    """Make the model's weights inference tensors, as ComfyUI's loaders do inside execution."""
    dm = model.model.diffusion_model
    with torch.inference_mode():
        sd = {k: v.clone() for k, v in dm.state_dict().items()}
        dm.load_state_dict(sd, assign=True)
    return dm


@pytest.mark.parametrize("weights", ["reference", "copy"])
def test_guided_run_leaves_the_model_untouched(clip_l, weights):
    model = M.tiny_sd15(seed=99)
    dm = _weights_inference(model)
    assert all(p.is_inference() for p in dm.parameters())
    pos = clip_l.encode_from_tokens_scheduled(clip_l.tokenize(PROMPT))
    neg = clip_l.encode_from_tokens_scheduled(clip_l.tokenize(""))
    before = {n: (p, p.clone()) for n, p in dm.named_parameters()}
    ref = M.ksample(model, pos, neg, M.latent(1, 16, 16), steps=3)
    m, _ = guided(model, clip_l, "red circle: 0,0,0.5,0.5", strength=30.0, iterations=2, thr=0.0, frac=0.67)
    ctrl = controller_of(m)
    ctrl.weights = weights
    with torch.inference_mode():
        out = M.ksample(m, pos, neg, M.latent(1, 16, 16), steps=3)
    assert not torch.equal(out, ref)
    assert len(ctrl.last_energy_log) == 2
    assert ctrl.last_energy_log[0][1][1][0] < ctrl.last_energy_log[0][1][0][0]
    n_bytes = sum(p.numel() * p.element_size() for p in dm.parameters())
    if weights == "copy":                       # the blocks up to the last guided layer were copied
        assert 0.3 * n_bytes < ctrl.last_weight_bytes < n_bytes
    else:
        assert ctrl.last_weight_bytes == 0
    for n, p in dm.named_parameters():
        assert p is before[n][0] and torch.equal(p, before[n][1]) and p.is_inference(), n
    assert not any(isinstance(c, L.LayoutController) for c in getattr(
        model.model_options.get("transformer_options", {}).get("attention_control_router"), "controllers", ()))
    assert torch.equal(M.ksample(model, pos, neg, M.latent(1, 16, 16), steps=3), ref)


def test_weight_references_give_the_same_gradient_as_copies(clip_l):
    model = M.tiny_sd15(seed=98)
    _weights_inference(model)
    pos = clip_l.encode_from_tokens_scheduled(clip_l.tokenize(PROMPT))
    neg = clip_l.encode_from_tokens_scheduled(clip_l.tokenize(""))
    outs, logs = [], []
    for weights in ("reference", "copy"):
        m, _ = guided(model, clip_l, "red circle: 0,0,0.5,0.5\nblue square: 0.5,0,1,1", strength=30.0,
                      iterations=3, thr=0.0, frac=0.5)
        controller_of(m).weights = weights
        with torch.inference_mode():
            outs.append(M.ksample(m, pos, neg, M.latent(1, 16, 16), steps=4))
        logs.append(controller_of(m).last_energy_log)
    assert torch.allclose(outs[0], outs[1], atol=1e-4, rtol=1e-4)
    for (s0, it0), (s1, it1) in zip(*logs):
        assert s0 == s1 and [e[0] for e in it0] == pytest.approx([e[0] for e in it1], rel=1e-5)


@pytest.mark.parametrize("sampler", ["euler", "euler_ancestral", "dpmpp_2m", "dpmpp_sde", "ddim", "uni_pc"])
def test_every_sampler_runs_guided(sd15, clip_l, base, sampler):
    pos, neg, _ = base
    ref = M.ksample(sd15, pos, neg, M.latent(1, 16, 16), steps=4, sampler=sampler)
    m, _ = guided(sd15, clip_l, "blue square: 0.5,0.5,1,1", strength=30.0, iterations=1, thr=0.0, frac=0.5)
    out = M.ksample(m, pos, neg, M.latent(1, 16, 16), steps=4, sampler=sampler)
    assert torch.isfinite(out).all() and not torch.equal(out, ref)
    assert controller_of(m).last_energy_log


def test_forward_guidance_changes_output_without_gradients(sd15, clip_l, base):
    pos, neg, ref = base
    m, _ = guided(sd15, clip_l, "red circle: 0,0,0.5,0.5", mode="forward", fwd=0.8)
    out = M.ksample(m, pos, neg, M.latent(1, 16, 16), steps=4)
    assert not torch.equal(out, ref)
    assert controller_of(m).last_energy_log == []


def test_multi_token_phrases_and_special_tokens(sd15, clip_l):
    m, _ = guided(sd15, clip_l, "red circle: 0,0,0.5,0.5\nphotorealistic blue square: 0.5,0.5,1,1",
                  special="start+end")
    objs = controller_of(m).objects
    assert objs[0].positions[:2] == [2, 3]
    n = len(objs[1].positions) - 2
    assert n >= 4 and objs[1].positions[-2:] == [0, objs[1].positions[-3] + 1]


def test_phrase_not_in_prompt_is_named(sd15, clip_l):
    with pytest.raises(AttentionControlError, match="'green triangle' is not in the prompt"):
        guided(sd15, clip_l, "green triangle: 0,0,0.5,0.5")


def test_mismatched_prompt_is_named_before_sampling(sd15, clip_l, base):
    _pos, neg, _ = base
    m, _ = guided(sd15, clip_l, "red circle: 0,0,0.5,0.5")
    other = clip_l.encode_from_tokens_scheduled(clip_l.tokenize("word " * 80))
    with pytest.raises(AttentionControlError, match="prompt: the layout node's prompt has 77 tokens"):
        M.ksample(m, other, neg, M.latent(1, 16, 16), steps=2)


def test_sdxl_shaped_model(sdxl):
    bx = boxes("x: 0,0,0.5,1")
    ctrl = L.LayoutController([L.LayoutObject(bx[0], [1, 2])], 77, LayerSelector.parse(L.DEFAULT_LAYERS),
                              strength=30.0, iterations=2, threshold=0.0, guided_fraction=0.5)
    m = attach(sdxl, ctrl)
    pos = M.cond(1, seed=1, dim=2048, pooled=1280)
    neg = M.cond(1, seed=2, dim=2048, pooled=1280)
    ref = M.ksample(sdxl, pos, neg, M.latent(1, 16, 16), steps=2)
    out = M.ksample(m, pos, neg, M.latent(1, 16, 16), steps=2)
    assert torch.isfinite(out).all() and not torch.equal(out, ref)
    step, iters = ctrl.last_energy_log[0]
    assert step == 0 and iters[1][0] < iters[0][0]
