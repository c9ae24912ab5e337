"""Prompt-to-Prompt on DiT joint attention and Video-P2P on Wan (issue 18): the fused edit equals a
naive float64 joint-softmax P2P (explicit probabilities, edited, then @ V) on every family that has
word positions; source and uncond rows are the host's bit for bit; the identity edit gives the
source bit for bit; edits change the target only; named errors before sampling; no leak."""
from __future__ import annotations

import pytest
import torch

from attention_control.attention.core import AttentionControlError, Run, UnsupportedModelError
from attention_control.attention.dit_layers import DitLayerSelector
from attention_control.attention.dit_p2p import DitP2PController
from attention_control.attention.dit_router import DIT_RUN_KEY, get_dit_router, host_mask
from attention_control.attention.p2p import LocalBlendSpec, TargetEdit, refine_mapper, replace_mapper
from attention_control.attention.router import attach
from ac_dit import SAMPLE_CONDS, TXT, forward, sample, tiny

SAMPLED = ("Flux", "SD3", "Wan", "Lumina 2")                  # comfy.sample with CFG (cond + uncond rows)
FORWARD_ONLY = ("Qwen-Image", "Flux.2", "Z-Image", "Chroma", "HunyuanVideo", "HunyuanImage 2.1")  # one model call, one cond chunk


def heads4(t, call):
    """An attention output (the default's layout) as (B, H, N, D)."""
    if t.ndim == 4:
        return t
    b, n, _ = t.shape
    return t.reshape(b, n, call.heads, -1).transpose(1, 2)


class Rec(DitP2PController):
    """The controller, recording each call it edits: inputs, its output and the host's plain output;
    it checks that the host's q / k / v are as they came after the edit (rows are swapped in place)."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.log = []

    def attend(self, call):
        q, k, v = (call.split_heads(t).double().clone() for t in (call.q, call.k, call.v))
        out = super().attend(call)
        for name, before in (("q", q), ("k", k), ("v", v)):    # rows swapped in place come back
            assert torch.equal(call.split_heads(getattr(call, name)).double(), before), name
        if out is not None:
            plain = call.default()
            self.log.append(dict(q=q, k=k, v=v, out=heads4(out, call).double(), plain=heads4(plain, call).double(),
                                 mask=call.mask, stream=call.site.stream, step=call.step, block=call.site.block,
                                 qi=call.q_image, qt=call.q_text, kt=call.k_text, cols=call.key_columns,
                                 cond=call.cond_chunks(), uncond=call.uncond_chunks(), batch=call.batch))
        return out


def windows(S, start, end):
    return [int(start * (S + 1)) <= t < int(end * (S + 1)) for t in range(S)]


def naive_target(c, edits, S, cross=(0.0, 0.8), self_fraction=0.4):
    """Float64 P2P on explicit joint-softmax probabilities for the target rows of one call:
    {row: (B, H, N, D) row}. The reference form: A' = a (w (alpha (A_s M) + (1 - alpha) A_t)) + (1 - a) A_t
    on the context columns, B' = B_s in the self window, the target's own text-query rows."""
    q, k, v = c["q"], c["k"], c["v"]
    s = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
    m = host_mask(c["mask"])
    if m is not None:
        s = s + (torch.zeros(m.shape, dtype=torch.float64).masked_fill(~m, float("-inf")) if m.dtype == torch.bool
                 else m.double())
    P = torch.softmax(s, -1)                                         # (B, H, Nq, Nk)
    t, B = c["step"], c["batch"]
    n_k = k.shape[2]
    if c["stream"] == "image_self":
        on = t < int(S * self_fraction)
        return {j * B + 1 + i: (P[j * B] if on else P[j * B + 1 + i]) @ v[j * B + 1 + i]
                for j in c["cond"] for i in range(len(edits))}
    ts = c["kt"]
    ctx = c["cols"](list(range(len(edits[0].alpha))))
    qi = c["qi"] if c["stream"] == "joint" else slice(0, q.shape[2])
    self_on = c["stream"] == "joint" and t < int(S * self_fraction)
    in_cross = windows(S, *cross)[t]
    out = {}
    for j in c["cond"]:
        src = j * B
        for i, e in enumerate(edits):
            r = src + 1 + i
            a = torch.full((len(ctx),), float(in_cross), dtype=torch.float64)
            for pos, ws, we in e.windows:
                a[pos] = float(windows(S, ws, we)[t])
            Ps, Pt = P[src][:, qi], P[r][:, qi]                      # (H, N_img, Nk)
            As, At = Ps[..., ctx], Pt[..., ctx]
            Ar = e.alpha.double() * (As @ e.mapper.double()) + (1 - e.alpha.double()) * At
            A_ctx = a * (e.weights.double() * Ar) + (1 - a) * At
            text_cols = list(range(ts.start, ts.stop))
            extra = [x for x in text_cols if x not in ctx]           # registers / padding: global window
            A_extra = float(in_cross) * Ps[..., extra] + (1 - float(in_cross)) * Pt[..., extra]
            rest = [x for x in range(n_k) if x not in text_cols]
            Bimg = (Ps if self_on else Pt)[..., rest]
            o_img = A_ctx @ v[r][:, ctx] + A_extra @ v[r][:, extra] + Bimg @ v[r][:, rest]
            o = P[r] @ v[r]                                           # text queries: the target's own
            o[:, qi] = o_img
            out[r] = o
    return out


def _edit(C, kind="replace", words=None):
    """A TargetEdit over C context tokens: replace with a swap of 1 token for 2, refine, reweight."""
    if kind == "replace":
        src = [(1, [0], [1]), (2, [1], [2]), (3, [2, 3], [3, 4]), (4, [4], [5])]
        tgt = [(1, [0], [1]), (2, [1, 2], [9, 9]), (3, [3, 4], [3, 4]), (4, [5], [5])]
        mapper = replace_mapper(src, tgt, C)
        alpha = torch.ones(C)
    elif kind == "refine":
        mapper, alpha = refine_mapper([1, 2, 3, 4], [1, 7, 2, 3, 4], C)
    else:
        mapper, alpha = torch.eye(C), torch.ones(C)
    w = torch.ones(C)
    if kind == "reweight":
        w[2] = 3.0
        w[4] = -1.0
    return TargetEdit(mapper, alpha, w, words or [])


def _ctx(family, g, n=2, same=False):
    c = torch.randn(1 if same else n, TXT, 32, generator=g)
    return c.repeat(n, 1, 1) if same else c


def _run_sampled(family, ctrl, steps=3, same=False, cfg=2.5, n=2, seed=3):
    t = tiny(family)
    g = torch.Generator().manual_seed(seed)
    extra = SAMPLE_CONDS[family](g)
    pos = [[_ctx(family, g, n, same), extra]]
    neg = [[torch.randn(1, TXT, 32, generator=g).repeat(n, 1, 1), extra]]
    latent = torch.zeros((n,) + tuple(t.x.shape[1:]))
    noise = torch.randn((1,) + tuple(t.x.shape[1:]), generator=g).repeat(n, *([1] * (t.x.ndim - 1)))
    m = attach(t.patcher, ctrl) if ctrl is not None else t.patcher
    return sample(m, noise, pos, neg, latent, steps=steps, cfg=cfg), (noise, pos, neg, latent)


def _run_forward(family, ctrl, steps=3, same=False, sigma=0.6, t=None):
    """One model call at step 0 of a `steps`-step run on a [source, target] batch (one cond chunk)."""
    t = t or tiny(family)
    g = torch.Generator().manual_seed(9)
    x = t.x.repeat(2, *([1] * (t.x.ndim - 1)))
    conds = dict(t.conds)
    conds = {k_: (v_.repeat(2, *([1] * (v_.ndim - 1))) if torch.is_tensor(v_) and v_.ndim and v_.shape[0] == 1
                  else v_) for k_, v_ in conds.items()}
    conds["c_crossattn"] = _ctx(family, g, 2, same)
    m = attach(t.patcher, ctrl)
    router = get_dit_router(m)
    run = Run(router, x.shape, torch.linspace(sigma, 0.0, steps + 1))
    router.begin_run(run)
    m.model_options["transformer_options"][DIT_RUN_KEY] = run
    out = _forward(m, x, conds, sigma)
    router.end_run(run, True)
    return out, x, conds


def _forward(patcher, x, conds, sigma):
    """ac_dit.forward with one sigma per batch item, as the sampler passes it (Chroma needs it)."""
    import comfy.model_patcher
    import comfy.patcher_extension
    mo = comfy.model_patcher.create_model_options_clone(patcher.model_options)
    to = mo.setdefault("transformer_options", {})
    comfy.patcher_extension.merge_nested_dicts(to.setdefault("wrappers", {}), patcher.wrappers, copy_dict1=False)
    to = comfy.patcher_extension.merge_nested_dicts({}, to, copy_dict1=False)
    sig = torch.full((x.shape[0],), sigma)
    to.update(cond_or_uncond=[0], uuids=[None], sigmas=sig)
    with torch.inference_mode():
        return patcher.model.apply_model(x, sig, transformer_options=to, **conds)


def _check_calls(ctrl, edits, S, cross, self_fraction, streams):
    assert ctrl.log and {c["stream"] for c in ctrl.log} == streams
    for c in ctrl.log:
        want = naive_target(c, edits, S, cross, self_fraction)
        B = c["batch"]
        for r, o in want.items():
            torch.testing.assert_close(c["out"][r], o, rtol=1e-4, atol=1e-5)
        untouched = [j * B for j in c["cond"]] + [j * B + i for j in c["uncond"] for i in range(B)]
        assert torch.equal(c["out"][untouched], c["plain"][untouched])      # the host's own rows, bit for bit


@pytest.mark.parametrize("family", SAMPLED)
def test_fused_equals_naive_joint_softmax(family):
    """CFG sampling, 4 steps: replace (one token swapped for two) with a reweight, cross window 0-0.6
    (steps 0-2 edited), self window 0.25 (step 0): step 0 both, 1-2 text columns alone, 3 passes
    (the host's call untouched). Every edited call equals the float64 naive P2P; source and uncond
    rows are the host's bit for bit."""
    C = TXT
    e = _edit(C, "replace")
    e.weights[5] = 2.0
    ctrl = Rec([e], C, 0.0, 0.6, 0.25)
    _run_sampled(family, ctrl, steps=4)
    streams = {"image_self", "text_cross"} if family == "Wan" else {"joint"}
    _check_calls(ctrl, [e], 4, (0.0, 0.6), 0.25, streams)
    assert {c["step"] for c in ctrl.log} == {0, 1, 2}


@pytest.mark.parametrize("kind,cross,self_fraction,windows_", [
    ("refine", (0.0, 1.0), 0.0, []),
    ("reweight", (0.0, 1.0), 1.0, []),
    ("replace", (0.0, 0.0), 0.5, []),                          # self window alone
    ("replace", (0.0, 0.5), 0.0, [([1, 2], 0.0, 1.0), ([5], 0.0, 0.0)]),   # per-word windows
])
@pytest.mark.parametrize("family", ("Flux", "Wan"))
def test_modes_and_windows_equal_naive(family, kind, cross, self_fraction, windows_):
    C = TXT
    e = _edit(C, kind, windows_)
    ctrl = Rec([e], C, *cross, self_fraction)
    _run_sampled(family, ctrl, steps=3)
    streams = {"joint"} if family == "Flux" else set()
    if family == "Wan":
        if self_fraction > 0:
            streams.add("image_self")
        if cross[1] > 0 or windows_ or kind == "refine":
            streams.add("text_cross")
    _check_calls(ctrl, [e], 3, cross, self_fraction, streams)


@pytest.mark.parametrize("family", FORWARD_ONLY)
def test_other_families_equal_naive(family):
    """Guidance-distilled style call (one cond chunk) on the other joint families: replace +
    reweight inside both windows, and refine with the self window off."""
    C = TXT
    for kind, sf in (("replace", 1.0), ("refine", 0.0)):
        e = _edit(C, kind)
        e.weights[3] = 0.5
        ctrl = Rec([e], C, 0.0, 1.0, sf)
        _run_forward(family, ctrl)
        _check_calls(ctrl, [e], 3, (0.0, 1.0), sf, {"joint"})


def test_sd3_register_tokens_take_the_global_window():
    """SD3 with register tokens (text columns before the context): they are edited with the identity
    mapper and the cross window, the context columns with the mapper (naive formula)."""
    from ac_dit import Tiny
    t = Tiny("SD3", register_length=2)
    e = _edit(TXT, "replace")
    ctrl = Rec([e], TXT, 0.0, 1.0, 0.0)
    _run_forward("SD3", ctrl, t=t)
    assert ctrl.log[0]["kt"] == slice(0, TXT + 2) and ctrl.log[0]["cols"]([0]) == [2]
    _check_calls(ctrl, [e], 3, (0.0, 1.0), 0.0, {"joint"})


@pytest.mark.parametrize("family", SAMPLED + FORWARD_ONLY)
def test_identity_edit_gives_the_source_bit_for_bit(family):
    """Target prompt = source prompt, replace, both windows over every step: the target rows run the
    source's own call on the same inputs, so the target equals the source bit for bit. With the self
    window off the image block comes from a second fused call (the sum A V reordered): equal within
    float tolerance (the exact formula is checked above)."""
    C = TXT
    for sf in (1.0, 0.0):
        ctrl = DitP2PController([_edit(C, "identity")], C, 0.0, 1.0, sf)
        if family in SAMPLED:
            out, _ = _run_sampled(family, ctrl, same=True)
        else:
            out, _, _ = _run_forward(family, ctrl, same=True)
        if sf == 1.0:
            assert torch.equal(out[1], out[0])
        else:
            torch.testing.assert_close(out[1], out[0], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("family", ("Flux", "SD3", "Wan"))
def test_edit_changes_the_target_not_the_source(family):
    e = _edit(TXT, "reweight")
    out, (noise, pos, neg, latent) = _run_sampled(family, DitP2PController([e], TXT, 0.0, 0.8, 0.4))
    plain = sample(tiny(family).patcher, noise, pos, neg, latent, steps=3)
    assert torch.equal(out[0], plain[0])                       # the source is what it is without the edit
    assert not torch.allclose(out[1], plain[1], atol=1e-4)     # the target is edited
    if family == "Wan":                                        # Video-P2P: every frame of the target changes
        assert all(not torch.allclose(out[1][:, f], plain[1][:, f], atol=1e-4) for f in range(out.shape[2]))
        assert all(torch.equal(out[0][:, f], plain[0][:, f]) for f in range(out.shape[2]))


class Blend(DitP2PController):
    """Keeps the blend maps' running sum of the last blended step."""

    def blend_mask(self, d, latent_hw=None):
        if d.get("blend_sum") is not None:
            self.last_sum = d["blend_sum"].clone()
        return super().blend_mask(d, latent_hw)


@pytest.mark.parametrize("family", ("Flux", "Wan"))
def test_local_blend_keeps_the_source_outside_the_mask(family):
    """Local blend on the DiT word maps (per frame on Wan: Video-P2P): the mask is the UNet rule on
    the maps' running sum (pool 1 cell at these 8x8 / 4x4 grids, normalised per item and frame by
    its maximum, threshold), and outside the source's OR the target's mask the target equals the
    source bit for bit. The threshold is the median of the first run's normalised maps (tiny random
    models attend nearly uniformly), so the mask splits the image."""
    e = _edit(TXT, "replace")
    probe = Blend([e], TXT, 0.0, 0.8, 0.4, blend=LocalBlendSpec([1], [[1, 2]], threshold=0.5))
    _run_sampled(family, probe, steps=3)
    s = probe.last_sum
    thr = float((s / s.amax(dim=(-2, -1), keepdim=True)).median())
    ctrl = Blend([e], TXT, 0.0, 0.8, 0.4, blend=LocalBlendSpec([1], [[1, 2]], threshold=thr))
    out, _ = _run_sampled(family, ctrl, steps=3)
    mask = ctrl.last_blend_mask
    s = ctrl.last_sum                                          # (2, frames, gh, gw)
    want = torch.nn.functional.interpolate(s / s.amax(dim=(-2, -1), keepdim=True), size=out.shape[-2:],
                                           mode="nearest") > thr
    if family == "Wan":
        assert mask.shape == (2, 1) + tuple(out.shape[2:])    # one mask per latent frame
        assert torch.equal(mask[:, 0].bool(), want)
    else:
        assert mask.shape == (2, 1) + tuple(out.shape[-2:])
        assert torch.equal(mask[:, 0].bool(), want[:, 0])
    keep = torch.maximum(mask[0], mask[1])                    # where the target may differ
    assert 0 < keep.mean() < 1
    outside = (keep == 0).expand_as(out[1])
    # the model's input and output are blended (as on UNets), not the sampler's own state: where an
    # earlier step's mask let the target differ, the last euler step x + (x - denoised) / sigma * (0 - sigma)
    # lands on the (blended, equal) denoised value up to rounding
    torch.testing.assert_close(out[1][outside], out[0][outside], rtol=0, atol=1e-5)
    assert (out[1][~outside] - out[0][~outside]).abs().max() > 1e-3


def test_named_errors_before_sampling():
    C = TXT
    calls = []

    class Count(DitP2PController):
        def attend(self, call):
            calls.append(1)
            return super().attend(call)

    with pytest.raises(AttentionControlError, match=r"^latent: Prompt-to-Prompt needs a latent batch of 2"):
        _run_sampled("Flux", Count([_edit(C)], C), n=1)
    assert calls == []
    with pytest.raises(AttentionControlError, match=r"^positive: the Prompt-to-Prompt prompts encode to 9 context"):
        _run_sampled("Flux", Count([_edit(C + 2)], C + 2))
    assert calls == []
    with pytest.raises(AttentionControlError, match=r"^target_prompts: replace needs the same number of words"):
        replace_mapper([(1, [0], [1]), (2, [1], [2])], [(1, [0], [1])], C)
    with pytest.raises(AttentionControlError, match=r"^target_prompts \(line 1\): the edit covers"):
        DitP2PController([_edit(C + 1)], C)
    with pytest.raises(UnsupportedModelError, match=r"^model: Prompt-to-Prompt needs the key columns.*HiDream"):
        attach(tiny("HiDream").patcher, DitP2PController([_edit(C)], C))
    from ac_models import tiny_sd15
    with pytest.raises(UnsupportedModelError, match=r"^model: .* is not a supported transformer"):
        attach(tiny_sd15(), DitP2PController([_edit(C)], C))
    with pytest.raises(AttentionControlError, match=r"prompt_to_prompt layers: 'joint' matches no block"):
        attach(tiny("Flux").patcher, DitP2PController([_edit(C)], C, selector=DitLayerSelector.parse("joint")))


def test_layer_selection_and_no_leak():
    """Only the chosen blocks are edited; afterwards the unpatched model samples its baseline."""
    t = tiny("Flux")
    g = torch.Generator().manual_seed(3)
    extra = SAMPLE_CONDS["Flux"](g)
    pos = [[torch.randn(2, TXT, 32, generator=g), extra]]
    noise = torch.randn((1,) + tuple(t.x.shape[1:]), generator=g).repeat(2, 1, 1, 1)
    latent = torch.zeros_like(noise)
    before = sample(t.patcher, noise, pos, pos, latent, steps=2)
    ctrl = Rec([_edit(TXT, "reweight")], TXT, 0.0, 1.0, 1.0, selector=DitLayerSelector.parse("double"),
               self_selector=DitLayerSelector.parse("double:1"))
    edited = sample(attach(t.patcher, ctrl), noise, pos, pos, latent, steps=2)
    assert {c["block"] for c in ctrl.log} == {("double", 0), ("double", 1)}
    assert not torch.equal(edited[1], before[1]) and torch.equal(edited[0], before[0])
    assert torch.equal(sample(t.patcher, noise, pos, pos, latent, steps=2), before)
    assert torch.equal(forward(t.patcher, t.x, t.conds), t.baseline)


# --------------------------------------------------------------------------------------------
# the Prompt-to-Prompt node on DiT models (nodes/dit_p2p.py): words in the model's context

PROMPT = "a red circle and a blue square"


def _node(family, target, mode="replace", reweight="", windows_="", blend=("", "")):
    from test_dit_tokens import BUILDERS
    from attention_control.nodes.p2p import build_p2p
    clip = BUILDERS[family](None)
    m, texts = build_p2p(tiny(family).patcher, clip, PROMPT, target, mode, reweight, 0.8, windows_, 0.4, *blend,
                         0.3, 0.0)
    return get_dit_router(m).controllers[-1], m, texts


def test_node_on_flux_refine_reweight_windows_blend():
    """Flux's T5 context (256 rows: ▁ a ▁red ▁circle ▁and ▁ a ▁blue ▁square): refine aligns the
    target's tokens to the source's, 'big' is inserted (alpha 0); reweight, per-word windows and the
    blend words take the target's positions."""
    ctrl, _, texts = _node("Flux", "a big red circle and a blue square", "refine", "blue: 2", "circle: 0.3",
                           ("red", "red"))
    assert isinstance(ctrl, DitP2PController) and ctrl.prompt_len == 256 and texts[1].startswith("a big")
    e = ctrl.targets[0]
    assert e.alpha[2] == 0 and e.alpha[[0, 1, 3, 4, 9]].tolist() == [1, 1, 1, 1, 1]
    assert e.mapper[2, 3] == 1 and e.mapper[8, 9] == 1 and e.mapper[9, 10] == 1     # red, square, after EOS
    assert e.weights[8] == 2 and (e.weights != 1).sum() == 1
    assert e.windows == [([4], 0.0, 0.3)]
    assert ctrl.blend.src_positions == [2] and ctrl.blend.tgt_positions == [[3]]


def test_node_on_sd3_maps_each_text_encoder_part():
    """SD3's context is a CLIP part (77 rows) then a T5 part: each part is mapped on its own, and a
    word has positions in both."""
    ctrl, _, _ = _node("SD3", "a turquoise circle and a blue square", "replace", "blue: 2")
    e = ctrl.targets[0]
    assert ctrl.prompt_len == 154 and torch.equal(e.mapper, torch.eye(154))    # one-token swaps: identity
    assert (e.weights == 2).nonzero().flatten().tolist() == [6, 84]


def test_node_errors_name_the_input():
    with pytest.raises(AttentionControlError, match=r"^target_prompts \(line 1\): replace needs the same number"):
        _node("Flux", "a red circle")
    with pytest.raises(AttentionControlError, match=r"^reweight: 'green' is not in the prompt"):
        _node("Flux", "a red circle and a blue square", "reweight", "green: 2")
    with pytest.raises(AttentionControlError, match=r"^target_prompts \(line 1\): reweight keeps the source"):
        _node("Flux", "a green circle and a blue square", "reweight", "red: 2")


def test_node_model_samples_the_identity_edit_bit_for_bit():
    """The node's MODEL on Flux (contexts of the T5 length, made here: the CLIP has no weights)."""
    _, m, _ = _node("Flux", PROMPT)
    g = torch.Generator().manual_seed(5)
    extra = SAMPLE_CONDS["Flux"](g)
    pos = [[torch.randn(1, 256, 32, generator=g).repeat(2, 1, 1), extra]]
    neg = [[torch.randn(1, 256, 32, generator=g).repeat(2, 1, 1), extra]]
    t = tiny("Flux")
    noise = torch.randn((1,) + tuple(t.x.shape[1:]), generator=g).repeat(2, 1, 1, 1)
    out = sample(m, noise, pos, neg, torch.zeros_like(noise), steps=2)
    torch.testing.assert_close(out[1], out[0], rtol=1e-4, atol=1e-4)   # self window 0.4 of 2 steps: off
    ctrl = DitP2PController([_edit(256, "identity")], 256, 0.0, 1.0, 1.0)
    out = sample(attach(t.patcher, ctrl), noise, pos, neg, torch.zeros_like(noise), steps=2)
    assert torch.equal(out[1], out[0])


def test_flux2_prompts_of_unequal_token_counts_are_refused():
    """Flux.2 left-pads each prompt to 512 rows inside the model: prompts of equal token count map
    (the context is 512 rows), unequal counts would shift one prompt against the other and are
    refused with the token counts named."""
    ctrl, _, _ = _node("Flux.2", "a green circle and a blue square")
    assert ctrl.prompt_len == 512
    with pytest.raises(AttentionControlError, match=r"^target_prompts \(line 1\): the prompt has \d+ tokens and the "
                                                    r"source \d+; Flux.2 pads"):
        _node("Flux.2", "a big red circle and a blue square", "refine")
