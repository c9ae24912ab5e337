"""Prompt-to-Prompt: fused edits equal the naive materialised formulas, mappers on the real
tokenizer, identity edits, source untouched, local blend, batches, SDXL, errors."""
import pytest
import torch

import ac_models as M
import nodes
from attention_control.attention import p2p
from attention_control.attention.core import AttentionControlError
from attention_control.nodes.p2p import PromptToPrompt, SharedNoise, _Prompt


def run_node(model, clip, src, tgts, mode="replace", reweight="", cross=0.8, windows="", self_r=0.4,
             bsrc="", btgt="", thr=0.3, bstart=0.0, neg="", latent=None):
    latent = latent or M.latent(1, 16, 16)
    out = PromptToPrompt.execute(model, clip, latent, src, tgts, mode, reweight, cross, windows, self_r,
                                 bsrc, btgt, thr, bstart, neg)
    return out.result if hasattr(out, "result") else out


# ---------------------------------------------------------------- mappers on the real tokenizer

def test_replace_mapper_hand_computed(clip_l):
    s = _Prompt(clip_l, "a red circle", "source")
    t = _Prompt(clip_l, "a blue circle", "target")
    m = p2p.replace_mapper(s.groups, t.groups, 77)
    assert torch.equal(m, torch.eye(77))          # one token -> one token at the same place
    # one token -> several: "a cat" -> "a photorealistic" (photorealistic is several tokens)
    s2 = _Prompt(clip_l, "a cat sits", "source")
    t2 = _Prompt(clip_l, "a photorealistic sits", "target")
    n = len(t2.groups[1][1])
    assert n >= 2
    m2 = p2p.replace_mapper(s2.groups, t2.groups, 77)
    assert torch.allclose(m2[2, 2:2 + n], torch.full((n,), 1.0 / n))
    # after the last swap the reference code continues the diagonal at the target positions
    # (mapper[j, j] = 1), so "sits" (target 2+n) reads source column 2+n, not the source's "sits"
    assert m2[2 + n, 2 + n] == 1.0 and m2[3, 2 + n] == 0.0
    assert m2[0, 0] == 1.0 and m2[1, 1] == 1.0
    # several -> one: two 1.0 entries in the column
    m3 = p2p.replace_mapper(t2.groups, s2.groups, 77)
    assert torch.equal(m3[2:2 + n, 2], torch.ones(n))
    with pytest.raises(AttentionControlError, match="same number of words.*refine"):
        p2p.replace_mapper(s.groups, _Prompt(clip_l, "a big red circle", "t").groups)


def test_words_of_weighted_prompts(clip_l):
    p = _Prompt(clip_l, "a (red:1.2) circle, (big square:0.8)", "source")
    assert [g[1] for g in p.groups] == [[1], [2], [3, 4], [5], [6]]       # "circle," is circle + comma
    assert p.positions("big square", "words") == [5, 6]


def test_refine_alignment_hand_computed(clip_l):
    s = _Prompt(clip_l, "a circle", "source")
    t = _Prompt(clip_l, "a red circle", "target")
    P, alpha = p2p.refine_mapper(s.ids_to_eos(), t.ids_to_eos(), 77)
    # target: BOS a red circle EOS -> source BOS a (inserted) circle EOS
    assert [int(P[:, j].argmax()) for j in (0, 1, 3, 4)] == [0, 1, 2, 3]
    assert alpha[2] == 0 and alpha[[0, 1, 3, 4]].eq(1).all()
    assert P[:, 10].argmax() == 10                 # padding maps to itself


def test_alignment_prefers_matches():
    assert p2p.global_alignment([1, 2, 3], [1, 9, 2, 3]) == [0, -1, 1, 2]
    assert p2p.global_alignment([1, 2, 3], [1, 3]) == [0, 2]


def test_alignment_ties_follow_the_reference_order():
    """seq_aligner.global_align records each cell's move at fill time, preferring left (insertion),
    then up (deletion), then the diagonal. Hand-computed: x = [7], y = [7, 7]: cell (1, 2) ties
    left (1) with diag (0 + 1), left wins, so y's SECOND token is the insertion."""
    assert p2p.global_alignment([7], [7, 7]) == [0, -1]
    assert p2p.global_alignment([], [4, 5]) == [-1, -1]
    assert p2p.global_alignment([4, 5], []) == []


def test_refine_alignment_of_hyphenated_words(clip_l):
    """'a black-and-white photo of a cat' -> 'a full-color photo of a cat'. Source tokens:
    BOS a black - and - white photo of a cat EOS (0..11); target: BOS a full - color photo of a cat
    EOS. The target's hyphen could take either source hyphen (3 or 5) at the same score; traced by
    hand through the reference's recorded moves it takes the first (3)."""
    s = _Prompt(clip_l, "a black-and-white photo of a cat", "source")
    t = _Prompt(clip_l, "a full-color photo of a cat", "target")
    assert len(s.ids_to_eos()) == 12 and len(t.ids_to_eos()) == 10
    assert p2p.global_alignment(s.ids_to_eos(), t.ids_to_eos()) == [0, 1, -1, 3, -1, 7, 8, 9, 10, 11]
    P, alpha = p2p.refine_mapper(s.ids_to_eos(), t.ids_to_eos(), 77)
    assert int(P[:, 3].argmax()) == 3 and alpha[2] == 0 and alpha[4] == 0


# ---------------------------------------------------------------- fused == naive

class _Call:
    def __init__(self, kind, step, B, cou=(1, 0), heads=2, h=4, w=4):
        from attention_control.attention.core import Site
        self.site = Site(kind, ("middle", 0), 0, 0, "mid", 4, heads, 8)
        self.step = step
        self.batch = B
        self.cond_or_uncond = list(cou)
        self.h, self.w = h, w
        self.attention = lambda q, k, v: sdpa(q, k, v, heads)

    def cond_chunks(self):
        return [j for j, c in enumerate(self.cond_or_uncond) if c == 0]

    def rows(self, j, i):
        return [j * self.batch + i]

    kv_rows = rows


def sdpa(q, k, v, heads):
    b, n, hd = q.shape
    d = hd // heads
    sp = lambda x: x.view(b, -1, heads, d).transpose(1, 2)
    return torch.nn.functional.scaled_dot_product_attention(sp(q), sp(k), sp(v)).transpose(1, 2).reshape(b, n, hd)


def naive_probs(q, k, heads):
    b, n, hd = q.shape
    d = hd // heads
    sp = lambda x: x.view(b, -1, heads, d).transpose(1, 2)
    return torch.softmax(sp(q).double() @ sp(k).double().transpose(-1, -2) / d ** 0.5, dim=-1)   # (b, h, N, K)


def apply_probs(p, v, heads):
    b = v.shape[0]
    d = v.shape[-1] // heads
    vv = v.double().view(b, -1, heads, d).transpose(1, 2)
    return (p @ vv).transpose(1, 2).reshape(b, p.shape[2], -1)


class _Run:
    def __init__(self, ctrl, n_steps, batch):
        self.n_steps, self.batch, self.latent_hw = n_steps, batch, (16, 16)
        self.scratch = {}

        class R:
            sites = ()
        self.router = R()

    def data(self, c):
        return self.scratch.setdefault(id(c), {})


@pytest.mark.parametrize("kind", ["replace", "refine_reweight"])
def test_cross_edit_equals_naive_materialised_formula(kind):
    torch.manual_seed(0)
    L, heads, B = 77, 2, 3
    n = B - 1
    if kind == "replace":
        mappers = [torch.eye(L)[torch.randperm(L)] for _ in range(n)]
        alphas = [torch.ones(L) for _ in range(n)]
    else:
        mappers, alphas = [], []
        for _ in range(n):
            P, a = p2p.refine_mapper([1, 2, 3, 4, 5], [1, 2, 9, 3, 4, 5], L)
            mappers.append(P)
            alphas.append(a)
    weights = [torch.ones(L) for _ in range(n)]
    if kind != "replace":
        weights[0][3] = 4.0
        weights[1][2] = -1.0
    windows = [[([4], 0.0, 0.3)], []]
    ctrl = p2p.P2PController([p2p.TargetEdit(mappers[i], alphas[i], weights[i], windows[i]) for i in range(n)],
                             0.0, 0.8, 0.4)
    S = 10
    run = _Run(ctrl, S, B)
    ctrl.begin_run.__func__  # noqa
    # begin_run without site validation (no router sites in this pure test)
    d = run.data(ctrl)
    a = torch.zeros(S, n, L)
    c0, c1 = p2p.cross_window(S, 0.0, 0.8)
    a[c0:c1] = 1
    a[:, 0, 4] = 0
    a[0:p2p.cross_window(S, 0.0, 0.3)[1], 0, 4] = 1
    d.update(a=a, alpha=torch.stack(alphas), w=torch.stack(weights), mappers=torch.stack(mappers),
             self_steps=p2p.self_window(S, 0.4), cache={})
    N = 16
    q = torch.randn(2 * B, N, 16)
    k = torch.randn(2 * B, L, 16)
    v = torch.randn(2 * B, L, 16)
    for step in (1, 5, 9):
        call = _Call("cross", step, B)
        call.run = run
        out = ctrl.attend(q.clone(), k.clone(), v.clone(), call, lambda q_, k_, v_: sdpa(q_, k_, v_, heads))
        # naive: materialise the maps of the cond chunk (rows B..2B-1)
        P = naive_probs(q, k, heads)
        ref = apply_probs(P, v, heads)
        src = B
        for t in range(n):
            row = B + 1 + t
            at = a[step, t]
            edit = (P[src] @ mappers[t].double()) * alphas[t].double() + P[row] * (1 - alphas[t].double())
            edit = edit * weights[t].double()
            new = edit * at.double() + P[row] * (1 - at.double())
            ref[row] = apply_probs(new[None], v[row:row + 1], heads)[0]
        torch.testing.assert_close(out.double(), ref, rtol=1e-4, atol=1e-5)
        assert torch.equal(out[:B], sdpa(q, k, v, heads)[:B])             # uncond rows untouched
        torch.testing.assert_close(out[B], sdpa(q, k, v, heads)[B])        # source row untouched


def test_self_injection_equals_naive():
    torch.manual_seed(1)
    heads, B, N = 2, 2, 16
    ctrl = p2p.P2PController([p2p.TargetEdit(torch.eye(77), torch.ones(77), torch.ones(77))], 0.0, 0.8, 0.5)
    run = _Run(ctrl, 10, B)
    run.data(ctrl).update(self_steps=5, cache={})
    q, k, v = torch.randn(2 * B, N, 16), torch.randn(2 * B, N, 16), torch.randn(2 * B, N, 16)
    call = _Call("self", 2, B)
    call.run = run
    out = ctrl.attend(q.clone(), k.clone(), v.clone(), call, lambda q_, k_, v_: sdpa(q_, k_, v_, heads))
    P = naive_probs(q, k, heads)
    ref = apply_probs(P, v, heads)
    ref[3] = apply_probs(P[2:3], v[3:4], heads)[0]       # target takes the source map
    torch.testing.assert_close(out.double(), ref, rtol=1e-4, atol=1e-5)
    call.step = 5
    assert torch.equal(ctrl.attend(q, k, v, call, lambda q_, k_, v_: sdpa(q_, k_, v_, heads)), sdpa(q, k, v, heads))


# ---------------------------------------------------------------- on the real ComfyUI

@pytest.fixture(scope="module")
def src_alone(sd15, clip_l):
    pos = nodes.CLIPTextEncode().encode(clip_l, "a red circle and a blue square")[0]
    neg = nodes.CLIPTextEncode().encode(clip_l, "")[0]
    return M.ksample(sd15, pos, neg, M.latent(1, 16, 16), steps=4, seed=3)


def test_identity_edit_and_source_item_untouched(sd15, clip_l, src_alone):
    prompt = "a red circle and a blue square"
    m, pos, neg, lat = run_node(sd15, clip_l, prompt, prompt)
    out = M.ksample(m, pos, neg, lat, steps=4, seed=3)
    assert out.shape[0] == 2
    assert torch.equal(out[0], out[1]), "target == source must give a bit-identical image"
    # the source item is bit-identical to the same batch sampled without any control ...
    m2, pos2, neg2, lat2 = run_node(sd15, clip_l, prompt, "a green circle and a blue square")
    edited = M.ksample(m2, pos2, neg2, lat2, steps=4, seed=3)
    plain = M.ksample(sd15, pos2, neg2, lat2, steps=4, seed=3)
    assert torch.equal(edited[0], plain[0]) and not torch.equal(edited[1], plain[1])
    # ... and equals sampling the source alone up to the batch-size dependence of CPU kernels
    scale = src_alone.abs().max()
    assert (out[0:1] - src_alone).abs().max() <= 1e-5 * scale


def test_reweight_by_one_is_a_no_op_and_edits_change_the_target(sd15, clip_l):
    prompt = "a red circle and a blue square"
    m0, pos, neg, lat = run_node(sd15, clip_l, prompt, "", mode="reweight", reweight="", self_r=0.0)
    base = M.ksample(m0, pos, neg, lat, steps=4, seed=3)
    m1, pos, neg, lat = run_node(sd15, clip_l, prompt, "", mode="reweight", reweight="red: 1", self_r=0.0)
    assert torch.equal(M.ksample(m1, pos, neg, lat, steps=4, seed=3), base)
    m2, pos, neg, lat = run_node(sd15, clip_l, prompt, "", mode="reweight", reweight="red: 5, blue: -1", self_r=0.0)
    out = M.ksample(m2, pos, neg, lat, steps=4, seed=3)
    assert torch.equal(out[0], base[0]) and not torch.allclose(out[1], base[1])
    m3, pos, neg, lat = run_node(sd15, clip_l, prompt, "a green circle and a blue square")
    out3 = M.ksample(m3, pos, neg, lat, steps=4, seed=3)
    assert torch.equal(out3[0], base[0]) and not torch.allclose(out3[1], out3[0])


def test_three_targets_refine_and_samplers(sd15, clip_l):
    from comfy_extras import nodes_custom_sampler as ncs
    m, pos, neg, lat = run_node(sd15, clip_l, "a circle", "a red circle\na big circle\na circle and a square",
                                mode="refine", reweight="circle: 2")
    assert pos[0][0].shape[0] == 4 and lat["samples"].shape[0] == 4
    for sampler in ("euler", "euler_ancestral", "dpmpp_2m", "dpmpp_sde", "ddim", "uni_pc"):
        out = M.ksample(m, pos, neg, lat, steps=3, seed=1, sampler=sampler)
        assert torch.isfinite(out).all() and out.shape[0] == 4, sampler
    # SamplerCustomAdvanced with the shared-noise NOISE node gives the same as KSampler's shared noise
    noise = SharedNoise.execute(1)
    noise = noise.result[0] if hasattr(noise, "result") else noise[0]
    guider = ncs.CFGGuider.execute(m, pos, neg, 5.0)[0]
    sig = ncs.BasicScheduler.execute(m, "normal", 3, 1.0)[0]
    smp = ncs.KSamplerSelect.execute("euler")[0]
    lat_plain = {"samples": lat["samples"]}
    out_adv = ncs.SamplerCustomAdvanced.execute(noise, guider, smp, sig, lat_plain)[0]["samples"]
    assert torch.equal(out_adv[0], out_adv[0]) and out_adv.shape[0] == 4


def test_local_blend_keeps_outside_the_mask(sd15, clip_l):
    """Random weights give flat maps, so the two ends of the threshold are tested exactly here; the
    partial masks of a trained model are tested on the shapes world."""
    from attention_control.attention.router import get_router
    src, tgt = "a red circle and a blue square", "a green circle and a blue square"
    m0, pos, neg, lat = run_node(sd15, clip_l, src, tgt)
    plain_edit = M.ksample(m0, pos, neg, lat, steps=4, seed=3)
    # threshold 1: the mask is empty, the whole target is blended back to the source
    m1, pos, neg, lat = run_node(sd15, clip_l, src, tgt, bsrc="red", btgt="green", thr=1.0)
    out = M.ksample(m1, pos, neg, lat, steps=4, seed=3)
    assert get_router(m1).controllers[-1].last_blend_mask.sum() == 0
    assert torch.equal(out[1], out[0])
    # threshold 0: the mask covers everything, the edit is the plain Prompt-to-Prompt edit
    m2, pos, neg, lat = run_node(sd15, clip_l, src, tgt, bsrc="red", btgt="green", thr=0.0)
    out2 = M.ksample(m2, pos, neg, lat, steps=4, seed=3)
    assert get_router(m2).controllers[-1].last_blend_mask.min() == 1
    torch.testing.assert_close(out2, plain_edit, rtol=1e-4, atol=1e-4 * float(plain_edit.abs().max()))


def test_sdxl_shaped_model(sdxl, clip_l):
    # conditioning built by hand at SDXL width; the edit tensors follow the key length
    prompt_t = "a red circle"
    from attention_control.nodes.p2p import build_p2p
    m, texts = build_p2p(sdxl, clip_l, prompt_t, "a blue circle", "replace", "", 0.8, "", 0.4, "", "", 0.3, 0.0)
    g = torch.Generator().manual_seed(0)
    ctx = torch.randn(2, 77, 2048, generator=g)
    pos = [[ctx, {"pooled_output": torch.zeros(2, 1280)}]]
    neg = [[torch.zeros_like(ctx), {"pooled_output": torch.zeros(2, 1280)}]]
    lat = {"samples": torch.zeros(2, 4, 16, 16), "batch_index": [0, 0]}
    out = M.ksample(m, pos, neg, lat, steps=2)
    assert out.shape[0] == 2 and torch.isfinite(out).all()


def test_errors_are_named(sd15, clip_l):
    with pytest.raises(AttentionControlError, match="same number of words"):
        run_node(sd15, clip_l, "a red circle", "a big red circle")
    with pytest.raises(AttentionControlError, match="reweight: 'giraffe' is not in the prompt"):
        run_node(sd15, clip_l, "a red circle", "a blue circle", reweight="giraffe: 2")
    with pytest.raises(AttentionControlError, match="blend_source_words"):
        run_node(sd15, clip_l, "a red circle", "a blue circle", bsrc="zebra")
    with pytest.raises(AttentionControlError, match="give one target prompt"):
        run_node(sd15, clip_l, "a red circle", "   ")
    m, pos, neg, lat = run_node(sd15, clip_l, "a red circle", "a blue circle")
    with pytest.raises(AttentionControlError, match="latent batch of 2"):
        M.ksample(m, pos, neg, M.latent(3, 16, 16), steps=1)


def test_stacks_with_capture_on_one_model(sd15, clip_l):
    from attention_control.nodes.capture import CaptureAttention
    src, tgt = "a red circle and a blue square", "a green circle and a blue square"
    cap = CaptureAttention.execute(sd15, clip_l, src, "circle, square", "all", 0.0, 1.0, False)
    cap_model, handle = cap.result if hasattr(cap, "result") else cap
    m, pos, neg, lat = run_node(cap_model, clip_l, src, tgt)
    both = M.ksample(m, pos, neg, lat, steps=3, seed=2)
    m_only, pos, neg, lat = run_node(sd15, clip_l, src, tgt)
    only = M.ksample(m_only, pos, neg, lat, steps=3, seed=2)
    assert torch.equal(both, only), "capture must not change what the edit produces"
    assert handle.maps.shape[:2] == (2, 2)


def test_local_blend_level_and_pool_follow_the_latent_size(sd15, sdxl):
    """The reference blends 16x16 maps with a 3x3 max-pool (SD1.x, 64x64 latent). Auto picks the
    level closest to 16x16 and scales the pool, so the mask covers the same image fraction."""
    from attention_control.attention.router import discover_sites
    sites = discover_sites(sd15)                   # tiny SD1.5: cross-attention at 1/1, 1/2, 1/4
    at = lambda hw: {s.ds for s in p2p.blend_sites(sites, hw)}
    assert at((64, 64)) == {4} and p2p.blend_pool(64 // 4) == 3     # SD1.5 512 px: the reference
    assert at((32, 32)) == {2} and p2p.blend_pool(32 // 2) == 3     # small latent: 16x16 maps, not 8x8
    assert at((128, 128)) == {4} and p2p.blend_pool(32) == 5        # 32x32 maps: a 5x5 pool
    assert p2p.blend_pool(8) == 1 and p2p.blend_pool(8, pool=3) == 3
    assert {s.ds for s in p2p.blend_sites(sites, (32, 32), p2p.LayerSelector.parse("1/4"))} == {4}
    xl = discover_sites(sdxl)                      # SDXL at 1024 px: 64x64 and 32x32 maps -> 32x32
    assert {s.ds for s in p2p.blend_sites(xl, (128, 128))} == {4}


def test_self_injection_layers_at_sd15_512px_are_the_references():
    """The reference gates self-attention injection by query count (<= 16 x 16 maps). At SD1.5 512 px
    (64x64 latent; attention at 1/1, 1/2, 1/4 and the 1/8 middle block) the default gate, by fraction
    of the latent (1/4 and coarser), picks exactly those layers; it keeps picking the same relative
    layers at other sizes (SDXL 1024 px: its 32x32 layers, where a literal 256-query gate picks none)."""
    from attention_control.attention.core import Site
    sd15 = [Site("self", (blk, i), 0, o, part, ds, 8, 40) for o, (blk, i, part, ds) in enumerate(
        [("input", 1, "down", 1), ("input", 2, "down", 1), ("input", 4, "down", 2), ("input", 5, "down", 2),
         ("input", 7, "down", 4), ("input", 8, "down", 4), ("middle", 0, "mid", 8),
         ("output", 3, "up", 4), ("output", 4, "up", 4), ("output", 5, "up", 4), ("output", 6, "up", 2),
         ("output", 7, "up", 2), ("output", 8, "up", 2), ("output", 9, "up", 1), ("output", 10, "up", 1),
         ("output", 11, "up", 1)])]
    ctrl = p2p.P2PController([p2p.TargetEdit(torch.eye(77), torch.ones(77), torch.ones(77))])
    ours = {s.block for s in sd15 if ctrl.wants_at(s, (64, 64))}
    reference = {s.block for s in sd15 if (64 // s.ds) ** 2 <= 16 ** 2}
    assert ours == reference == {("input", 7), ("input", 8), ("middle", 0), ("output", 3), ("output", 4),
                                 ("output", 5)}
    sdxl = [Site("self", ("input", 4), 0, 0, "down", 2, 10, 64), Site("self", ("input", 7), 0, 1, "down", 4, 20, 64)]
    assert {s.ds for s in sdxl if ctrl.wants_at(s, (128, 128))} == {4}
    assert not [s for s in sdxl if (128 // s.ds) ** 2 <= 16 ** 2]
