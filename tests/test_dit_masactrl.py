"""MasaCtrl on DiT models (issue 18): the target rows equal a naive float64 formula (target image queries
against [target text keys; source image keys], softmax over that set; Wan: the source's self-attention
keys), the source rows and everything before the start step / below the start block equal plain
sampling of the same batch bit for bit, an identity edit reproduces the source, the target's prompt
still acts, given masks split foreground / background as the float64 formula, named errors before
sampling, nothing left behind."""
from __future__ import annotations

import math

import pytest
import torch

import comfy.sample

from attention_control.attention.core import AttentionControlError
from attention_control.attention.dit_masactrl import DEFAULT_START_FRACTION, DitMasaCtrlController
from attention_control.attention.dit_router import DitController, get_dit_router, host_mask
from attention_control.attention.router import attach
from attention_control.nodes.masactrl import MasaCtrl
from ac_dit import LLAMA, LLAMA_LAYERS, TXT, tiny

EXTRAS = {
    "Flux": lambda g: {"pooled_output": torch.randn(1, 16, generator=g), "guidance": 3.5},
    "Flux.2": lambda g: {"pooled_output": torch.randn(1, 16, generator=g), "guidance": 3.5},
    "Chroma": lambda g: {"pooled_output": torch.randn(1, 16, generator=g)},
    "SD3": lambda g: {"pooled_output": torch.randn(1, 32, generator=g)},
    "Wan": lambda g: {},
    "Qwen-Image": lambda g: {},
    "Lumina 2": lambda g: {},
    "Z-Image": lambda g: {},
    "HunyuanVideo": lambda g: {"pooled_output": torch.randn(1, 16, generator=g)},
    "HiDream": lambda g: {"pooled_output": torch.randn(1, 32, generator=g),
                          "conditioning_llama3": torch.randn(1, LLAMA_LAYERS, LLAMA, 32, generator=g)},
}
# Flux.2 runs Flux's class and attention calls (global modulation aside) with its context padded to 512
# tokens in the model: the slowest family here, covered by Flux; the node and error tests use Flux
FAMILIES = tuple(f for f in EXTRAS if f != "Flux.2")


def _cond(family, ctxs, g):
    """CONDITIONING of a batch: one context per item (the rows of `ctxs`), the family's extras repeated."""
    ex = {k: (v.repeat(ctxs.shape[0], *([1] * (v.ndim - 1))) if torch.is_tensor(v) else v)
          for k, v in EXTRAS[family](g).items()}
    return [[ctxs, ex]]


def edit(family, same=False, n_targets=1, seed=21):
    """(positive, negative, latent, noise) of an edit batch [source, targets] with one shared noise."""
    t = tiny(family)
    g = torch.Generator().manual_seed(seed)
    src = torch.randn(1, TXT, 32, generator=g)
    tg = [src if same else torch.randn(1, TXT, 32, generator=g) for _ in range(n_targets)]
    pos = _cond(family, torch.cat([src] + tg), g)
    neg = _cond(family, torch.randn(1, TXT, 32, generator=g).repeat(1 + n_targets, 1, 1), g)
    n = 1 + n_targets
    latent = torch.zeros((n,) + tuple(t.x.shape[1:]))
    noise = torch.randn((1,) + tuple(t.x.shape[1:]), generator=g).repeat(n, *([1] * (t.x.ndim - 1)))
    return pos, neg, latent, noise


def run(model, pos, neg, latent, noise, steps=3, cfg=2.5):
    """Sampling with the x0 prediction of every step kept."""
    x0 = []
    with torch.inference_mode():
        out = comfy.sample.sample(model, noise, steps, cfg, "euler", "simple", pos, neg, latent, disable_pbar=True,
                                  seed=11, callback=lambda i, d, x, n: x0.append(d.clone()))
    return out, x0


def bhnd(call, t):
    return call.split_heads(t).double()


class Rec(DitMasaCtrlController):
    """The controller under test, keeping each call it acts on: inputs, its output, the host's default."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.log = []

    def attend(self, call):
        out = super().attend(call)
        if out is not None:
            o = out if out.ndim == 4 else out.view(out.shape[0], out.shape[1], call.heads, -1).transpose(1, 2)
            self.log.append(dict(q=bhnd(call, call.q), k=bhnd(call, call.k), v=bhnd(call, call.v), mask=call.mask,
                                 out=o.double(), same_as_default=torch.equal(out, call.default()), B=call.batch,
                                 chunks=len(call.cond_or_uncond), qi=call.q_image, ki=call.k_image,
                                 stream=call.site.stream, step=call.step, depth=call.site.depth))
        return out


class KeepQ(DitController):
    """On top of the stack: keeps every main block call's q (step 0) and passes."""
    name = "keep"

    def __init__(self):
        self.calls = []

    def attend(self, call):
        if call.step == 0 and call.site.depth is not None:
            self.calls.append((call.site.depth[0], call.site.stream, call.q.clone()))
        return None


def _bias(mask, rows, nq, nk):
    """The host's mask of `rows` as an additive float64 bias (R, 1 or H, nq, nk)."""
    m = host_mask(mask)
    if m is None:
        return torch.zeros(len(rows), 1, nq, nk, dtype=torch.float64)
    m = m[rows] if m.shape[0] > 1 else m.expand(len(rows), *m.shape[1:])
    if m.dtype == torch.bool:
        m = torch.zeros(m.shape, dtype=torch.float64).masked_fill(~m, float("-inf"))
    return m.double().expand(len(rows), m.shape[1], nq, nk)


def naive_target(c, t, s, union):
    """Float64 MasaCtrl output of target row t (source row s) as the module docstring writes it."""
    q, k, v = c["q"], c["k"], c["v"]
    nq, nk, d = q.shape[2], k.shape[2], q.shape[3]
    bt, bs = _bias(c["mask"], [t], nq, nk)[0], _bias(c["mask"], [s], nq, nk)[0]
    ki, qi = c["ki"], c["qi"]

    def attn(qq, kk, vv, bias):
        return torch.softmax(qq @ kk.transpose(-1, -2) / math.sqrt(d) + bias, dim=-1) @ vv

    own = attn(q[t], k[t], v[t], bt)                                       # the target's own attention
    if union:
        kk, vv = torch.cat([k[t], k[s][:, ki]], 1), torch.cat([v[t], v[s][:, ki]], 1)
        bias = torch.cat([bt, bs[..., ki]], -1)
    else:
        kk, vv, bias = k[t].clone(), v[t].clone(), bt.clone()
        kk[:, ki], vv[:, ki], bias = k[s][:, ki], v[s][:, ki], bias.expand(bs.shape).clone()
        bias[..., ki] = bs[..., ki]
    out = own.clone()
    out[:, qi] = attn(q[t][:, qi], kk, vv, bias[..., qi, :])
    return out


def check_calls(rec, union=False):
    assert rec.log, "MasaCtrl never acted"
    for c in rec.log:
        B, R = c["B"], c["q"].shape[0]
        for j in range(c["chunks"]):
            s = j * B
            for i in range(1, B):
                t = s + i
                torch.testing.assert_close(c["out"][t], naive_target(c, t, s, union), rtol=1e-4, atol=2e-5)
        srcs = [j * B for j in range(c["chunks"])]
        assert R == B * c["chunks"] and len(srcs) >= 1


@pytest.mark.parametrize("family", FAMILIES)
def test_edit_batch(family):
    """CFG sampling (cond + uncond chunks) of [source, target = source prompt, two other targets], start
    step 1, every block: every acting call's target rows equal the float64 formula (text-query rows: own
    attention; image queries: target text + source image keys; Wan: the source's self-attention keys);
    step 0's prediction equals plain sampling of the same batch bit for bit, the source rows do at every
    step. The identity target reproduces the source; MasaCtrl does not copy the source: the other
    targets differ from it and from each other (their text keys / cross-attention still act)."""
    pos, neg, latent, noise = edit(family, n_targets=3)
    pos[0][0][1] = pos[0][0][0]                                        # target 1: the source's prompt
    rec = Rec(start_step=1, start_block=0)
    out, x0 = run(attach(tiny(family).patcher, rec), pos, neg, latent, noise, steps=2)
    ref, x0_ref = run(tiny(family).patcher, pos, neg, latent, noise, steps=2)
    check_calls(rec)
    assert {c["step"] for c in rec.log} == {1}
    assert all(c["chunks"] == 2 and c["B"] == 4 for c in rec.log)   # cond and uncond halves
    assert not any(c["same_as_default"] for c in rec.log)            # the target rows changed
    assert torch.equal(x0[0], x0_ref[0])                              # before the start step
    for a, b in zip(x0, x0_ref):
        assert torch.equal(a[0], b[0])                                # the source, every step
    assert torch.equal(out[0], ref[0]) and not torch.equal(out[2:], ref[2:])
    assert {c["stream"] for c in rec.log} == ({"image_self"} if family == "Wan" else {"joint"})
    # identity: measured bit for bit on every family here (the target's image queries see keys and
    # values equal to its own, its inputs equal the source's at every block); asserted within 1e-6 of
    # the sample's scale in case a backend rounds the smaller target-row call differently
    scale = float(out.abs().max())
    assert float((out[1] - out[0]).abs().max()) <= 1e-6 * scale
    for a, b in ((2, 0), (3, 0), (2, 3)):
        assert float((out[a] - out[b]).abs().max()) > 1e-4 * scale, (a, b)


@pytest.mark.parametrize("family", ["Flux", "Wan"])
def test_union_mode_equals_naive(family):
    pos, neg, latent, noise = edit(family, n_targets=2)
    rec = Rec(start_step=0, start_block=0, mode="union")
    out, _ = run(attach(tiny(family).patcher, rec), pos, neg, latent, noise, steps=2)
    ref, _ = run(tiny(family).patcher, pos, neg, latent, noise, steps=2)
    check_calls(rec, union=True)
    assert all(c["B"] == 3 for c in rec.log)
    assert torch.equal(out[0], ref[0]) and not torch.equal(out[1:], ref[1:])


@pytest.mark.parametrize("mode", ["mutual", "union"])
def test_host_mask_is_carried(mode):
    """Flux with an `attention_mask` (an additive bias per item, as StyleModelApply's): the target's image
    key columns take the source row's mask entries (union: appended), the naive formula applies the same."""
    pos, neg, latent, noise = edit("Flux")
    g = torch.Generator().manual_seed(4)
    n = TXT + 64
    for c in (pos, neg):
        c[0][1]["attention_mask"] = -2.0 * torch.rand(2, n, n, generator=g)
        c[0][1]["attention_mask_img_shape"] = (8, 8)
    rec = Rec(start_step=0, start_block=0, mode=mode)
    out, _ = run(attach(tiny("Flux").patcher, rec), pos, neg, latent, noise, steps=1)
    ref, _ = run(tiny("Flux").patcher, pos, neg, latent, noise, steps=1)
    assert all(c["mask"] is not None and c["mask"].shape[0] == c["q"].shape[0] for c in rec.log)
    check_calls(rec, union=mode == "union")
    assert torch.equal(out[0], ref[0]) and not torch.equal(out[1], ref[1])


def naive_masked(c, t, s, m_src, m_tgt):
    """Float64 mask-guided target output: image queries attend to [target non-image keys; source
    foreground image keys] and [...; source background image keys], mixed per query by the target mask."""
    q, k, v = c["q"], c["k"], c["v"]
    nq, nk, d = q.shape[2], k.shape[2], q.shape[3]
    bt, bs = _bias(c["mask"], [t], nq, nk)[0], _bias(c["mask"], [s], nq, nk)[0]
    ki, qi = c["ki"], c["qi"]
    img = torch.arange(ki.start, ki.stop)
    other = torch.tensor([j for j in range(nk) if not ki.start <= j < ki.stop], dtype=torch.long)
    out = torch.softmax(q[t] @ k[t].transpose(-1, -2) / math.sqrt(d) + bt, -1) @ v[t]
    parts = []
    for sel in (m_src, ~m_src):
        cols = img[sel] if sel.any() else img
        kk, vv = torch.cat([k[t][:, other], k[s][:, cols]], 1), torch.cat([v[t][:, other], v[s][:, cols]], 1)
        bias = torch.cat([bt.expand(bs.shape)[..., other], bs.expand(bt.shape)[..., cols]], -1)[..., qi, :]
        parts.append(torch.softmax(q[t][:, qi] @ kk.transpose(-1, -2) / math.sqrt(d) + bias, -1) @ vv)
    w = m_tgt.double()[None, :, None]
    out[:, qi] = w * parts[0] + (1 - w) * parts[1]
    return out


@pytest.mark.parametrize("family", ["Flux", "SD3", "Wan"])
def test_mask_guided_equals_naive(family):
    """Given masks (source: left half, target: top half): the target's image queries take the source's
    foreground keys where the target mask is on, its background keys elsewhere (float64 formula)."""
    src_m, tgt_m = torch.zeros(64, 64), torch.zeros(64, 64)
    src_m[:, :32] = 1.0
    tgt_m[:32] = 1.0
    pos, neg, latent, noise = edit(family)
    rec = Rec(start_step=0, start_block=0, masks=torch.stack([src_m, tgt_m]))
    out, _ = run(attach(tiny(family).patcher, rec), pos, neg, latent, noise, steps=1)
    ref, _ = run(tiny(family).patcher, pos, neg, latent, noise, steps=1)
    assert rec.log and torch.equal(out[0], ref[0]) and not torch.equal(out[1], ref[1])
    f, gh, gw = (2, 4, 4) if family == "Wan" else (1, 8, 8)
    at = torch.nn.functional.interpolate(torch.stack([src_m, tgt_m])[:, None], size=(gh, gw), mode="nearest")[:, 0]
    ms, mt = [(a > 0.5).flatten().repeat(f) for a in at]
    assert 0 < int(ms.sum()) < ms.numel()
    for c in rec.log:
        B = c["B"]
        for j in range(c["chunks"]):
            torch.testing.assert_close(c["out"][j * B + 1], naive_masked(c, j * B + 1, j * B, ms, mt), rtol=1e-4,
                                       atol=2e-5)


@pytest.mark.parametrize("family,start", [("Flux", 2), ("SD3", 1), ("Wan", 1)])
def test_blocks_below_the_start_block_are_untouched(family, start):
    """start_step 0, start block k: at step 0 the inputs (q) of every block up to k equal plain
    sampling's bit for bit; the first block after it sees changed target rows; only blocks >= k act."""
    pos, neg, latent, noise = edit(family)
    rec = Rec(start_step=0, start_block=start)
    keep, keep_ref = KeepQ(), KeepQ()
    run(attach(attach(tiny(family).patcher, rec), keep), pos, neg, latent, noise, steps=2)
    run(attach(tiny(family).patcher, keep_ref), pos, neg, latent, noise, steps=2)
    check_calls(rec)
    assert {c["depth"][0] for c in rec.log} == set(range(start, rec.log[0]["depth"][1]))
    assert len(keep.calls) == len(keep_ref.calls) > 0
    for (k, st, q), (k2, _, q_ref) in zip(keep.calls, keep_ref.calls):
        assert k == k2
        if k < start or (k == start and st in ("joint", "image_self")):      # the acting call's own inputs
            assert torch.equal(q, q_ref), (k, st)
        elif k == start:                                                   # Wan's cross-attention after it
            assert torch.equal(q[0::2], q_ref[0::2]) and not torch.equal(q[1::2], q_ref[1::2])
        elif k == start + 1 and st != "text_cross":
            assert torch.equal(q[0::2], q_ref[0::2]) and not torch.equal(q[1::2], q_ref[1::2])


def test_default_start_block_is_a_depth_fraction():
    rec = Rec(start_step=0)
    attach(tiny("Flux").patcher, rec)
    assert rec.start_block == DEFAULT_START_FRACTION
    # 2 double + 2 single blocks: centres 0.125, 0.375, 0.625, 0.875 -> from the second double block
    assert rec._blocks == {("double", 1), ("single", 0), ("single", 1)}
    rec = Rec(start_step=0, start_block=0.6)
    attach(tiny("Flux").patcher, rec)
    assert rec._blocks == {("single", 0), ("single", 1)}


def test_named_errors_before_sampling():
    t = tiny("Flux")
    pos, neg, latent, noise = edit("Flux")
    calls = []

    class Count(DitController):
        def attend(self, call):
            calls.append(1)

    # a batch of 1
    g = torch.Generator().manual_seed(1)
    m = attach(attach(t.patcher, Count()), DitMasaCtrlController(1, 0))
    with pytest.raises(AttentionControlError, match=r"^latent: MasaCtrl needs a batch of the source and at least"):
        run(m, _cond("Flux", torch.randn(1, TXT, 32, generator=g), g),
            _cond("Flux", torch.randn(1, TXT, 32, generator=g), g), latent[:1], noise[:1])
    # start_step past the run
    m = attach(attach(t.patcher, Count()), DitMasaCtrlController(3, 0))
    with pytest.raises(AttentionControlError, match=r"^start_step: 3 starts at step 3, but this run has 3 sampling"):
        run(m, pos, neg, latent, noise, steps=3)
    m = attach(attach(t.patcher, Count()), DitMasaCtrlController(0.99, 0))
    with pytest.raises(AttentionControlError, match=r"^start_step: 0.99 of 2 steps starts at step 2"):
        run(m, pos, neg, latent, noise, steps=2)
    # reference latents (Kontext-style tokens of another image)
    pos_ref = [[pos[0][0], dict(pos[0][1], reference_latents=[torch.zeros(1, 16, 8, 8)])]]
    m = attach(attach(t.patcher, Count()), DitMasaCtrlController(0, 0))
    with pytest.raises(AttentionControlError, match=r"^positive: the conditioning carries reference latents"):
        run(m, noise=noise, pos=pos_ref, neg=neg, latent=latent)
    # block choices that match nothing: at attach, with the model's blocks listed
    with pytest.raises(AttentionControlError, match=r"^start_layer: block index 4 selects no block .* 4 main "
                                                    r"blocks \(double:0-1, single:0-1, numbered 0..3"):
        attach(t.patcher, DitMasaCtrlController(1, 4))
    with pytest.raises(AttentionControlError, match=r"^start_layer: depth fraction 0.9 "):
        attach(t.patcher, DitMasaCtrlController(1, 0.9))
    for bad, msg in ((-1, "^start_layer: -1 must be >= 0"), (1.5, r"^start_layer: depth fraction 1.5 is outside")):
        with pytest.raises(AttentionControlError, match=msg):
            DitMasaCtrlController(1, bad)
    with pytest.raises(AttentionControlError, match="^mode: 'swap' is not mutual or union"):
        DitMasaCtrlController(1, 0, "swap")
    with pytest.raises(AttentionControlError, match="^start_step: 2.5 is neither a step count"):
        DitMasaCtrlController(2.5, 0)
    with pytest.raises(AttentionControlError, match="^mode: union does not combine with mask guidance"):
        DitMasaCtrlController(1, 0, "union", torch.ones(2, 8, 8))
    empty = torch.zeros(2, 64, 64)
    empty[0, :8, :8] = 1.0
    m = attach(attach(t.patcher, Count()), DitMasaCtrlController(0, 0, masks=empty))
    with pytest.raises(AttentionControlError, match=r"^target_mask: resized to this 16x16 latent the mask covers no"):
        run(m, pos, neg, latent, noise, steps=1)
    m = attach(attach(t.patcher, Count()), DitMasaCtrlController(0, 0, masks=torch.ones(3, 8, 8)))
    with pytest.raises(AttentionControlError, match=r"^source_mask/target_mask: 3 masks for a batch of 2"):
        run(m, pos, neg, latent, noise, steps=1)
    assert not calls                       # every run above raised before the first model call


def test_stands_aside_where_the_sequence_has_other_tokens(caplog):
    """Calls whose sequence is more than the text and image tokens (here Kontext-style reference-latent
    tokens, let through by skipping the pre-sampling refusal) are left to the host, logged once per block."""

    class NoRefusal(Rec):
        def begin_run(self, run):
            conds, run.conds = run.conds, {}
            try:
                super().begin_run(run)
            finally:
                run.conds = conds

    pos, neg, latent, noise = edit("Flux")
    pos = [[pos[0][0], dict(pos[0][1], reference_latents=[torch.randn(1, 16, 8, 8)])]]
    rec = NoRefusal(start_step=0, start_block=0)
    with caplog.at_level("WARNING", logger="attention_control"):
        out, _ = run(attach(tiny("Flux").patcher, rec), pos, neg, latent, noise, steps=1)
    ref, _ = run(tiny("Flux").patcher, pos, neg, latent, noise, steps=1)
    # the uncond calls (no refs) acted, on rows equal in source and target (shared negative and noise)
    assert torch.equal(out, ref)
    assert [c for c in rec.log if c["q"].shape[2] == TXT + 64]
    assert not [c for c in rec.log if c["q"].shape[2] > TXT + 64]
    assert any("MasaCtrl skips Flux" in r.getMessage() for r in caplog.records)


def test_no_leak():
    """The input model stays unpatched; a run leaves no per-run state on the controller or the router;
    two runs give the same samples."""
    t = tiny("Flux")
    pos, neg, latent, noise = edit("Flux")
    ctrl = DitMasaCtrlController(1, 0)
    m = attach(t.patcher, ctrl)
    a, _ = run(m, pos, neg, latent, noise, steps=2)
    b, _ = run(m, pos, neg, latent, noise, steps=2)
    assert torch.equal(a, b)
    assert get_dit_router(t.patcher) is None
    assert not any(torch.is_tensor(v) for v in vars(ctrl).values())
    to = m.model_options["transformer_options"]
    assert not any(k.endswith("_run") for k in to)
    ref, _ = run(t.patcher, pos, neg, latent, noise, steps=2)
    assert torch.equal(a[0], ref[0]) and not torch.equal(a[1], ref[1])


class TinyClip:
    """A CLIP stand-in for the tiny DiTs: ComfyUI's real CLIP-L tokenizer, a fixed random embedding table
    of the DiT's context width, the family's pooled output."""

    def __init__(self, family):
        import comfy.sd1_clip
        self.tokenizer = comfy.sd1_clip.SD1Tokenizer(embedding_directory=None)
        self.table = torch.randn(49408, 32, generator=torch.Generator().manual_seed(9))
        self.family = family

    def tokenize(self, text):
        return self.tokenizer.tokenize_with_weights(text)

    def encode_from_tokens(self, tokens, return_pooled=False):
        ids = torch.tensor([t[0] for chunk in tokens["l"] for t in chunk])
        g = torch.Generator().manual_seed(int(ids.sum()))
        pooled = EXTRAS[self.family](g).get("pooled_output")
        return (self.table[ids][None], pooled) if return_pooled else self.table[ids][None]


@pytest.mark.parametrize("family", ["Flux", "Wan"])
def test_node_builds_the_dit_controller(family):
    t = tiny(family)
    clip = TinyClip(family)
    lat = {"samples": torch.zeros((1,) + tuple(t.x.shape[1:]))}
    m, pos, neg, latent = MasaCtrl.execute(t.patcher, clip, lat, "a cat", "a cat sitting", "", 1.0, -1, "mutual",
                                           "", "", 0.1).result
    ctrl = get_dit_router(m).controllers[-1]
    assert isinstance(ctrl, DitMasaCtrlController) and ctrl.start_block == DEFAULT_START_FRACTION
    assert latent["samples"].shape[0] == 2 and pos[0][0].shape[0] == 2
    m2 = MasaCtrl.execute(t.patcher, clip, lat, "a cat", "a cat sitting", "", 1.0, 1, "union", "", "", 0.1).result[0]
    ctrl2 = get_dit_router(m2).controllers[-1]
    assert ctrl2.start_block == 1 and ctrl2.mode == "union"
    if family == "Flux":
        for p in (pos, neg):
            p[0][1]["guidance"] = 3.5
    noise = torch.randn(latent["samples"].shape, generator=torch.Generator().manual_seed(3))
    noise = noise[:1].expand_as(noise).contiguous()
    out, _ = run(m2, pos, neg, latent["samples"], noise, steps=2)
    ref, _ = run(t.patcher, pos, neg, latent["samples"], noise, steps=2)
    assert torch.equal(out[0], ref[0]) and not torch.equal(out[1], ref[1])
    with pytest.raises(AttentionControlError, match="^mask_source_word: masks from word maps are not available"):
        MasaCtrl.execute(t.patcher, clip, lat, "a cat", "a dog", "", 1.0, -1, "mutual", "cat", "", 0.1)
    sm = torch.zeros(1, 64, 64)
    sm[:, :, :32] = 1.0
    m3 = MasaCtrl.execute(t.patcher, clip, lat, "a cat", "a dog", "", 1.0, -1, "mutual", "", "", 0.1, sm).result[0]
    ctrl3 = get_dit_router(m3).controllers[-1]
    assert ctrl3.masks.shape == (2, 64, 64) and torch.equal(ctrl3.masks[1], sm[0])
