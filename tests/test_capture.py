"""Attention-map capture: equality with a naive softmax(QK^T) reference, token lookup and folding,
SDXL shapes, the heat-map node, and that capture never changes the sampled image."""
import pytest
import torch
import torch.nn.functional as F

import ac_models as M
import nodes
from attention_control.attention.core import AttentionControlError
from attention_control.attention.router import discover_sites
from attention_control.nodes.capture import AttentionHeatmap, CaptureAttention

PROMPT = "a red circle and a blue photorealistic square"


@pytest.fixture(scope="module")
def conds(clip_l):
    pos = nodes.CLIPTextEncode().encode(clip_l, PROMPT)[0]
    neg = nodes.CLIPTextEncode().encode(clip_l, "")[0]
    return pos, neg


def capture(model, clip, words, layers="all", start=0.0, end=1.0, keep=False, prompt=PROMPT):
    out = CaptureAttention.execute(model, clip, prompt, words, layers, start, end, keep)
    return out.result if hasattr(out, "result") else out


class Recorder:
    """A pre-installed attn2 replace patch that records what it sees (the independent reference)."""

    def __init__(self):
        self.calls = []

    def __deepcopy__(self, memo):        # ModelPatcher.clone() deep-copies model_options
        return self

    def __call__(self, q, k, v, extra):
        self.calls.append(dict(q=q.clone(), k=k.clone(), heads=extra["n_heads"], shape=extra["activations_shape"],
                               cou=list(extra["cond_or_uncond"]), sigma=float(extra["sigmas"][0])))
        import comfy.ldm.modules.attention as A
        return A.optimized_attention(q, k, v, extra["n_heads"])


def naive_maps(calls, columns, size, batch, sigmas_kept):
    total, count = None, 0
    for c in calls:
        if c["sigma"] not in sigmas_kept:
            continue
        j = c["cou"].index(0)
        q, k = c["q"][j * batch:(j + 1) * batch], c["k"][j * batch:(j + 1) * batch]
        h = c["heads"]
        d = q.shape[-1] // h
        acc = 0
        for i in range(h):
            s = q[..., i * d:(i + 1) * d] @ k[..., i * d:(i + 1) * d].transpose(1, 2) / d ** 0.5
            p = torch.softmax(s.double(), dim=-1)
            acc = acc + torch.stack([p[..., cols].sum(-1) for cols in columns], dim=1)
        m = (acc / h).float().reshape(batch, len(columns), c["shape"][2], c["shape"][3])
        m = F.interpolate(m, size=size, mode="bilinear", align_corners=False)
        total = m if total is None else total + m
        count += 1
    return total / count


def test_maps_equal_naive_reference_and_image_unchanged(sd15, clip_l, conds):
    pos, neg = conds
    rec = Recorder()
    base = sd15.clone()
    for s in discover_sites(sd15):
        if s.kind == "cross":
            base.set_model_attn2_replace(rec, s.block[0], s.block[1], s.index)
    lat = M.latent(2, 16, 16)
    plain = M.ksample(base, pos, neg, lat, steps=4)
    rec.calls.clear()
    model, handle = capture(base, clip_l, "red, square, blue photorealistic", start=0.25, end=1.0)
    img = M.ksample(model, pos, neg, lat, steps=4)
    assert torch.equal(img, plain), "capture must not change the sampled image"
    sig = sorted({c["sigma"] for c in rec.calls}, reverse=True)
    assert len(sig) == 4
    # token positions from the real CLIP tokenizer: BOS=0, a=1, red=2, circle=3, and=4, a=5, blue=6,
    # photorealistic=7..(multi-token), square=last
    from attention_control.nodes.common import resolve_words
    specs, plen = resolve_words(clip_l, PROMPT, "red, square, blue photorealistic")
    assert plen == 77 and specs[0].positions == [2] and specs[1].label == "square"
    assert len(specs[2].positions) >= 2 and specs[2].positions[0] == 6
    ref = naive_maps(rec.calls, [s.positions for s in specs], (16, 16), 2, set(sig[1:]))
    assert handle.maps.shape == (2, 3, 16, 16)
    torch.testing.assert_close(handle.maps, ref, rtol=1e-4, atol=1e-6)
    assert set(handle.fired) == {("cross", s.key) for s in discover_sites(sd15) if s.kind == "cross"}


def test_second_run_gives_same_maps_and_memory_does_not_keep_steps(sd15, clip_l, conds):
    pos, neg = conds
    model, handle = capture(sd15, clip_l, "circle", layers="up")
    M.ksample(model, pos, neg, M.latent(1, 16, 16), steps=3)
    first = handle.maps.clone()
    assert handle.step_maps == []
    M.ksample(model, pos, neg, M.latent(1, 16, 16), steps=3)
    assert torch.equal(first, handle.maps) and handle.runs == 2
    model2, handle2 = capture(sd15, clip_l, "circle", layers="up", keep=True)
    M.ksample(model2, pos, neg, M.latent(1, 16, 16), steps=3)
    assert [s for s, _ in handle2.step_maps] == [0, 1, 2]
    torch.testing.assert_close(torch.stack([m for _, m in handle2.step_maps]).mean(0), handle2.maps)


def test_columns_fold_when_negative_is_longer(sd15, clip_l, conds):
    pos, neg = conds
    long_neg = nodes.CLIPTextEncode().encode(clip_l, " ".join(["blurry"] * 100))[0]
    assert long_neg[0][0].shape[1] == 154
    lat = M.latent(1, 16, 16)
    m1, h1 = capture(sd15, clip_l, "red, square", layers="mid")
    M.ksample(m1, pos, neg, lat, steps=2, cfg=1.0)
    m2, h2 = capture(sd15, clip_l, "red, square", layers="mid", keep=True)
    M.ksample(m2, pos, long_neg, lat, steps=2)       # positive padded to 154 by repetition
    m3, h3 = capture(sd15, clip_l, "red, square", layers="mid", keep=True)
    M.ksample(m3, pos, neg, lat, steps=2)
    # step 0 sees the same x_T: the folded 154-column maps equal the 77-column ones
    torch.testing.assert_close(h2.step_maps[0][1], h3.step_maps[0][1], rtol=1e-4, atol=1e-6)
    assert not torch.allclose(h2.step_maps[0][1][:, 0], h2.step_maps[0][1][:, 1])
    assert h1.maps.shape == h2.maps.shape


def test_long_prompt_positions_are_global(clip_l):
    from attention_control.nodes.common import resolve_words
    prompt = " ".join(["word"] * 80) + " zebra"
    specs, plen = resolve_words(clip_l, prompt, "zebra")
    assert plen == 154 and specs[0].positions[0] > 77


def test_word_errors_name_the_prompt_tokens(sd15, clip_l):
    with pytest.raises(AttentionControlError, match=r"'giraffe' is not in the prompt.*2:red"):
        capture(sd15, clip_l, "giraffe")
    with pytest.raises(AttentionControlError, match="at least one word"):
        capture(sd15, clip_l, " , ")
    with pytest.raises(AttentionControlError, match="token index 99"):
        capture(sd15, clip_l, "#99")
    with pytest.raises(AttentionControlError, match="selects no cross-attention layer"):
        capture(sd15, clip_l, "red", layers="1/32")


def test_weighted_prompt_syntax_and_index_words(sd15, clip_l):
    from attention_control.nodes.common import resolve_words
    specs, _ = resolve_words(clip_l, "a (red:1.3) circle", "red, #3")
    assert specs[0].positions == [2] and specs[1].positions == [3]


def test_prompt_mismatch_is_reported_before_sampling(sd15, clip_l, conds):
    pos, neg = conds
    long_prompt = " ".join(["word"] * 80) + " red"
    model, handle = capture(sd15, clip_l, "red", prompt=long_prompt)       # 154-token prompt
    with pytest.raises(AttentionControlError, match="same prompt"):
        M.ksample(model, pos, neg, M.latent(1, 16, 16), steps=1)


def test_sdxl_capture_shapes(sdxl, clip_l):
    # SDXL-shaped model: attention only at 1/2 and 1/4; maps accumulate at the finest, latent/2
    ctx = torch.randn(1, 77, 2048, generator=torch.Generator().manual_seed(3))
    pooled = {"pooled_output": torch.zeros(1, 1280)}
    pos, neg = [[ctx, pooled]], [[torch.zeros_like(ctx), pooled]]
    model, handle = capture(sdxl, clip_l, "red, circle")
    M.ksample(model, pos, neg, M.latent(2, 16, 16), steps=2)
    assert handle.maps.shape == (2, 2, 8, 8)
    assert len({k for k in handle.fired}) == sum(1 for s in discover_sites(sdxl) if s.kind == "cross")


def test_heatmap_node(sd15, clip_l, conds):
    pos, neg = conds
    model, handle = capture(sd15, clip_l, "red, circle", keep=True)
    lat = M.ksample(model, pos, neg, M.latent(2, 16, 16), steps=3)
    image = torch.rand(2, 128, 128, 3)
    res = AttentionHeatmap.execute(handle, 0.5, 0.6, False, image=image)
    imgs, masks = res.result if hasattr(res, "result") else res
    assert imgs.shape == (4, 128, 128, 3) and masks.shape == (4, 128, 128)
    assert 0 < masks.mean() < 1
    res = AttentionHeatmap.execute(handle, 0.5, 0.6, True, latent={"samples": lat})
    imgs, masks = res.result if hasattr(res, "result") else res
    assert imgs.shape == (3 * 4, 128, 128, 3)
    with pytest.raises(ValueError, match="connect the decoded IMAGE"):
        AttentionHeatmap.execute(handle, 0.5, 0.6, False)
    _, empty = capture(sd15, clip_l, "red")
    with pytest.raises(AttentionControlError, match="no maps were captured"):
        AttentionHeatmap.execute(empty, 0.5, 0.6, False, image=image)
