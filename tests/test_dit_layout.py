"""Layout guidance on DiT models (issue 18): the chunked, checkpointed phrase probabilities and their
gradients equal a naive float64 joint softmax; backward guidance fires, lowers the box energy, and its
gradient equals a finite difference of the energy of the guidance forward; inference-mode weights
(as ComfyUI loads them) give the same guidance; forward guidance's output equals the naive column
blend written out; off is the baseline bit for bit; any sampler; named errors; no leak."""
from __future__ import annotations

import functools

import pytest
import torch

from attention_control.attention.core import AttentionControlError, UnsupportedModelError
from attention_control.attention.dit_layers import DitLayerSelector
from attention_control.attention.dit_layout import DitLayoutController, phrase_probs
from attention_control.attention.dit_router import DitController, get_dit_router
from attention_control.attention.layout import Box, LayoutObject, box_window
from attention_control.attention.router import attach
from ac_dit import CONFIGS, SAMPLE_CONDS, TXT, build, sample, tiny

FAMS = tuple(SAMPLE_CONDS)          # Flux, SD3, Wan, Lumina 2: sampled with comfy.sample here
OBJECTS = [LayoutObject(Box("w1", 0.0, 0.0, 0.5, 0.5), [1]), LayoutObject(Box("w2", 0.5, 0.25, 1.0, 1.0), [3, 4])]


def _conds(family, g, n=TXT):
    return [[torch.randn(1, n, 32, generator=g), SAMPLE_CONDS[family](g)]]


def _setup(family, seed=3):
    g = torch.Generator().manual_seed(seed)
    pos, neg = _conds(family, g), _conds(family, g)
    t = tiny(family)
    noise = torch.randn(t.x.shape, generator=g)
    return t, pos, neg, noise, torch.zeros_like(t.x)


def _ctrl(mode="backward", layers="all", **kw):
    kw.setdefault("guided_fraction", 1.0)
    return DitLayoutController(OBJECTS, TXT, DitLayerSelector.parse(layers), mode=mode, **kw)


def _run(model, family, steps=2, cfg=2.0, sampler="euler", seed=3):
    t, pos, neg, noise, latent = _setup(family, seed)
    return sample(model, noise, pos, neg, latent, steps=steps, cfg=cfg, sampler=sampler)


@functools.lru_cache(maxsize=None)
def inference_weights(family, dtype=torch.float32):
    """The tiny model with every parameter and buffer an inference tensor, as ComfyUI loads models
    (float64: for finite differences of the random models' small energy gradients)."""
    cls_name, cfg = CONFIGS[family]
    m = build(cls_name, dict(cfg))
    dm = m.model.diffusion_model
    dm.to(dtype)
    dm.dtype = dtype
    with torch.inference_mode():
        for mod in m.model.modules():
            for store in (mod._parameters, mod._buffers):
                for name, p in list(store.items()):
                    if p is not None:
                        c = p.detach().clone()
                        store[name] = torch.nn.Parameter(c, requires_grad=False) if store is mod._parameters else c
    assert next(m.model.diffusion_model.parameters()).is_inference()
    return m


# --------------------------------------------------------------------------------------------
# the energy's probabilities

@pytest.mark.parametrize("mask_kind", [None, "bool", "float"])
def test_phrase_probs_and_their_gradient_equal_the_naive_softmax(mask_kind):
    g = torch.Generator().manual_seed(0)
    b, h, n, d, kk = 2, 3, 30, 8, 37
    q = torch.randn(b, h, n, d, generator=g, dtype=torch.float64)
    k = torch.randn(b, h, kk, d, generator=g, dtype=torch.float64)
    mask = None
    if mask_kind == "bool":
        mask = torch.ones(b, 1, 1, kk, dtype=torch.bool)
        mask[1, ..., 5:9] = False                             # padding keys of item 1
    elif mask_kind == "float":
        mask = torch.randn(b, 1, n, kk, generator=g)
    rows, cols = slice(7, n), [2, 3, 20]
    qf, kf = q.float().requires_grad_(True), k.float().requires_grad_(True)
    got = phrase_probs(qf, kf, rows, cols, mask, chunk_budget=b * h * kk * 4)        # chunks of 4 queries
    q64, k64 = q.clone().requires_grad_(True), k.clone().requires_grad_(True)
    s = q64 @ k64.transpose(-1, -2) / d ** 0.5
    if mask is not None:
        s = s + (torch.zeros(mask.shape, dtype=torch.float64).masked_fill(~mask, float("-inf"))
                 if mask.dtype == torch.bool else mask.double())
    want = torch.softmax(s, -1)[:, :, rows][..., cols]
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-7)
    w = torch.randn(want.shape, generator=g, dtype=torch.float64)
    (got * w.float()).sum().backward()
    (want * w).sum().backward()
    torch.testing.assert_close(qf.grad.double(), q64.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(kf.grad.double(), k64.grad, rtol=1e-4, atol=1e-6)


# --------------------------------------------------------------------------------------------
# backward guidance

@pytest.mark.parametrize("family", FAMS)
def test_off_is_the_baseline_bit_for_bit(family):
    t = tiny(family)
    ref = _run(t.patcher, family)
    for kw in (dict(strength=0.0), dict(iterations=0), dict(guided_fraction=0.0)):
        assert torch.equal(_run(attach(t.patcher, _ctrl(**kw)), family), ref), kw


@pytest.mark.parametrize("family", FAMS)
def test_backward_guidance_fires_and_lowers_the_energy(family):
    t = tiny(family)
    # the random tiny models attend almost uniformly (energy gradients ~1e-5): a large loss scale
    # makes the descent visible; the direction is what test_guidance_gradient_... checks
    ctrl = _ctrl(strength=3e5, iterations=3, threshold=0.0, guided_fraction=0.5)
    m = attach(t.patcher, ctrl)
    out = _run(m, family, steps=2)
    ref = _run(t.patcher, family, steps=2)
    assert torch.isfinite(out).all() and not torch.equal(out, ref)
    log = ctrl.last_energy_log
    assert [s for s, _ in log] == [0]                                  # guided: the first half of 2 steps
    energies = [e[0] for e in log[0][1]]
    assert len(energies) == 3 and energies[-1] < energies[0], energies
    assert torch.equal(_run(t.patcher, family, steps=2), ref)          # no leak


class _FiniteDifference(DitLayoutController):
    """Computes, at the first guided step, the energy's gradient and a central finite difference
    of the energy along a random direction, then samples unguided."""

    def guide(self, predict, x, sigma, run, passes):
        if not hasattr(self, "fd"):
            energy = self.energy_fn(run, passes)
            g = torch.Generator().manual_seed(4)
            x = x.double()
            u = torch.randn(x.shape, generator=g, dtype=torch.float64)
            u = u / u.norm()
            with torch.inference_mode(False), torch.enable_grad():
                xk = x.detach().clone().requires_grad_(True)
                grad, = torch.autograd.grad(energy(xk).sum(), [xk])
                eps = 1e-2                     # Flux's rotary embedding runs in float32 inside the model
                xp, xm = (x.detach().clone() + eps * u), (x.detach().clone() - eps * u)
                fd = (energy(xp).sum() - energy(xm).sum()) / (2 * eps)
            self.fd = (float((grad * u).sum()), float(fd))
        return predict(x)


@pytest.mark.parametrize("family", ["Flux", "SD3"])
def test_guidance_gradient_equals_a_finite_difference(family):
    """On float64 copies of the tiny models with inference-tensor weights (ComfyUI's loading)."""
    ctrl = _FiniteDifference(OBJECTS, TXT, DitLayerSelector.parse("all"), guided_fraction=1.0)
    m = attach(inference_weights(family, torch.float64), ctrl)
    _run(m, family, steps=1)
    analytic, fd = ctrl.fd
    assert abs(analytic) > 1e-12
    assert abs(analytic - fd) <= 5e-3 * abs(analytic), ctrl.fd


def test_inference_mode_weights_give_the_same_guidance():
    """Flux (whose blocks write their residual stream in place) with inference-tensor weights, as
    ComfyUI loads it: the guided sample equals the one with ordinary weights."""
    plain = build(*CONFIGS["Flux"][0:1], dict(CONFIGS["Flux"][1]))
    a = _run(attach(plain, _ctrl(iterations=2, threshold=0.0, guided_fraction=0.5)), "Flux")
    b = _run(attach(inference_weights("Flux"), _ctrl(iterations=2, threshold=0.0, guided_fraction=0.5)), "Flux")
    assert not torch.equal(a, _run(plain, "Flux"))
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("sampler", ["dpmpp_2m", "heun"])
def test_any_sampler(sampler):
    t = tiny("Flux")
    out = _run(attach(t.patcher, _ctrl(iterations=2)), "Flux", steps=3, sampler=sampler)
    assert torch.isfinite(out).all() and not torch.equal(out, _run(t.patcher, "Flux", steps=3, sampler=sampler))


# --------------------------------------------------------------------------------------------
# forward guidance

class _Outer(DitController):
    """Runs the layout controller inside and keeps, per call it acted on, the call's tensors and the
    output it returned."""
    name = "outer"

    def __init__(self, inner):
        self.inner = inner
        self.selector = None
        self.streams = inner.streams
        self.calls = []

    def validate(self, router):
        self.inner.validate(router)

    def begin_run(self, run):
        self.inner.begin_run(run)

    def end_run(self, run, ok):
        self.inner.end_run(run, ok)

    def attend(self, call):
        out = self.inner.attend(call)
        if out is not None:
            self.calls.append(dict(q=call.split_heads(call.q).double(), k=call.split_heads(call.k).double(),
                                   v=call.split_heads(call.v).double(), mask=call.mask, rows=call.cond_rows(),
                                   qi=call.q_image, cols=call.key_columns, grid=call.grid,
                                   out=out, bhnd=call._kwargs.get("skip_output_reshape", False), heads=call.heads))
        return out


@pytest.mark.parametrize("family", FAMS)
def test_forward_guidance_equals_the_naive_column_blend(family):
    lam = 0.7
    inner = _ctrl(mode="forward", forward_strength=lam)
    outer = _Outer(inner)
    t = tiny(family)
    out = _run(attach(t.patcher, outer), family, steps=2)
    assert outer.calls and torch.isfinite(out).all()
    assert not torch.equal(out, _run(t.patcher, family, steps=2))
    for c in outer.calls:
        q, k, v = c["q"], c["k"], c["v"]
        s = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
        if c["mask"] is not None:
            m = c["mask"]
            s = s + (torch.zeros(m.shape, dtype=torch.float64).masked_fill(~m, float("-inf"))
                     if m.dtype == torch.bool else m.double())
        a = torch.softmax(s, -1)                                        # (B, H, N, K)
        f, h, w = c["grid"]
        a2 = a.clone()
        for o in OBJECTS:
            window = box_window(o.box, h, w).double().flatten().repeat(f) / f
            for col in c["cols"](o.positions):
                colv = a[:, :, c["qi"], col]                                # (B, H, N_img)
                a2[:, :, c["qi"], col] = (1 - lam) * colv + lam * window * colv.sum(-1, keepdim=True)
        want = a2 @ v                                                       # (B, H, N, D)
        o_ = c["out"]
        got = o_.double() if c["bhnd"] else o_.reshape(o_.shape[0], o_.shape[1], c["heads"], -1).transpose(1, 2).double()
        rows = c["rows"]
        torch.testing.assert_close(got[rows], want[rows], rtol=1e-4, atol=1e-5)


# --------------------------------------------------------------------------------------------
# errors

def test_named_errors_before_sampling():
    t, pos, neg, noise, latent = _setup("Flux")
    with pytest.raises(AttentionControlError, match="^layers"):
        attach(t.patcher, _ctrl(layers="double:7-9"))
    g = torch.Generator().manual_seed(1)
    other = [[torch.randn(1, TXT + 3, 32, generator=g), SAMPLE_CONDS["Flux"](g)]]
    m = attach(t.patcher, _ctrl())
    with pytest.raises(AttentionControlError, match="^prompt: the layout node's prompt has 7 context tokens"):
        sample(m, noise, other, neg, latent, steps=1)
    with pytest.raises(AttentionControlError, match="^weights"):
        _ctrl(weights="copy")
    with pytest.raises(UnsupportedModelError, match="HiDream"):
        attach(tiny("HiDream").patcher, _ctrl())


def test_the_layout_node_on_a_dit():
    from attention_control.nodes.layout import Boxes, LayoutGuidance
    from test_dit_regions import TinyTextEncoder
    t = tiny("Flux")
    clip = TinyTextEncoder("Flux")
    boxes = Boxes.execute("red circle: 0,0,0.5,0.5\nblue square: 0.5,0.5,1,1", "fraction", 512, 512).result[0]
    prompt = "a red circle and a blue square"
    assert LayoutGuidance.validate_inputs(prompt=prompt, layers="double:0-1, 0.5-1.0") is True
    m, pos = LayoutGuidance.execute(t.patcher, clip, prompt, boxes, "both", 30.0, 2, 0.2, 0.5, 0.5, "auto",
                                    "none").result
    ctrl = get_dit_router(m).controllers[-1]
    assert isinstance(ctrl, DitLayoutController) and ctrl.prompt_len == 77
    assert [o.positions for o in ctrl.objects] == [[2, 3], [6, 7]]              # CLIP: 0 is the start token
    g = torch.Generator().manual_seed(2)
    noise = torch.randn(t.x.shape, generator=g)
    neg = clip.encode_from_tokens_scheduled(clip.tokenize(""))
    out = sample(m, noise, pos, neg, torch.zeros_like(t.x), steps=2)
    assert torch.isfinite(out).all() and not torch.equal(out, sample(t.patcher, noise, pos, neg,
                                                                       torch.zeros_like(t.x), steps=2))
    with pytest.raises(AttentionControlError, match="^special_tokens"):
        LayoutGuidance.execute(t.patcher, clip, prompt, boxes, "backward", 30.0, 2, 0.2, 0.5, 0.5, "auto", "end")
