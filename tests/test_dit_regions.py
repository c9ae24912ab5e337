"""Region prompts and paint-with-words on DiT models (issue 17), on tiny random models of the eight
families: the attention mask blocks exactly what the rule says (checked on the float64 probabilities
of the masked call, from the q / k / v / mask the host's attention receives), the host honours it,
outside the window the model follows the base prompt alone, paint-with-words' bias equals the naive
eDiff-I formula on the word columns only, the explicit chunked path equals the fused one, named
errors before sampling, no leak; MultiDiffusion region prompts (whole model calls) on DiT models."""
from __future__ import annotations

import math

import pytest
import torch

from attention_control.attention.core import AttentionControlError, UnsupportedModelError
from attention_control.attention.dit_regions import (DitPaintController, DitRegionController, region_token_masks)
from attention_control.attention.dit_router import get_dit_router
from attention_control.attention.region_prompts import Region, RegionController
from attention_control.attention.regions import PaintedPhrase, mask_at
from attention_control.attention.router import attach
from attention_control.nodes.regions import (PaintWithWords, RegionConditioning, RegionPrompt,
                                             dit_region_conditioning, region_conditioning)
from ac_dit import TXT, sample, tiny

FAMILIES = ("Flux", "Flux.2", "Chroma", "SD3", "Wan", "Qwen-Image", "Lumina 2", "Z-Image")
EXTRAS = {"Flux": lambda g: {"pooled_output": torch.randn(1, 16, generator=g), "guidance": 3.5},
          "Flux.2": lambda g: {"pooled_output": torch.randn(1, 16, generator=g), "guidance": 3.5},
          "Chroma": lambda g: {"pooled_output": torch.randn(1, 16, generator=g)},
          "SD3": lambda g: {"pooled_output": torch.randn(1, 32, generator=g)}}
LENGTHS = {"base": 5, "left": 3, "top right": 4}          # context tokens of each prompt
N_IMG = {"Wan": 32}                                        # image tokens (others: 8 x 8 = 64)
REGISTERS = 0                                              # tiny SD3 has no register tokens


def encoder(family, dim=32, lengths=None):
    """encode(text) -> CONDITIONING: a fixed random context per text (LENGTHS tokens, else 6)."""
    lengths = dict(LENGTHS, **(lengths or {}))

    def encode(text):
        g = torch.Generator().manual_seed(sum(map(ord, text)) + 1)
        return [[torch.randn(1, lengths.get(text, 6), dim, generator=g), EXTRAS.get(family, lambda g: {})(g)]]
    return encode


def masks64():
    left = torch.zeros(64, 64)
    left[:, :32] = 1.0
    top_right = torch.zeros(64, 64)
    top_right[:32, 32:] = 1.0
    return left, top_right


def two_regions():
    left, tr = masks64()
    return (Region("left", left), Region("top right", tr))


class Tap:
    """Another pack's attention override (installed before ours, so ours chains it as the default):
    keeps what the host's attention receives and returns."""

    def __init__(self):
        self.calls = []

    def __deepcopy__(self, memo):           # ModelPatcher.clone() deep-copies model_options
        return self

    def __call__(self, func, *args, **kwargs):
        out = func(*args, **kwargs)
        heads = args[3] if len(args) > 3 else kwargs.get("heads")
        mask = args[4] if len(args) > 4 else kwargs.get("mask")
        to = kwargs.get("transformer_options") or {}
        self.calls.append(dict(q=args[0], k=args[1], v=args[2], heads=heads, mask=mask, out=out,
                               bhnd=kwargs.get("skip_reshape", False), keep=kwargs.get("skip_output_reshape", False),
                               sigma=float(to["sigmas"].flatten()[0]) if "sigmas" in to else None))
        return out


def tapped(patcher):
    m = patcher.clone()
    tap = Tap()
    m.model_options.setdefault("transformer_options", {})["optimized_attention_override"] = tap
    return m, tap


def bhnd(c, t):
    """A tapped tensor as float64 (B, H, N, D) (SD3's v comes as (B, N, H, D))."""
    if not c["bhnd"]:
        t = t.transpose(1, 2) if t.ndim == 4 else t.reshape(t.shape[0], t.shape[1], c["heads"], -1).transpose(1, 2)
    return t.double()


def out_bhnd(c):
    o = c["out"]
    if c["keep"]:
        return o.double()
    return o.reshape(o.shape[0], o.shape[1], c["heads"], -1).transpose(1, 2).double()


def additive(mask, dtype=torch.float64):
    if mask is None:
        return None
    m = mask
    while m.ndim < 4:
        m = m.unsqueeze(0 if m.ndim == 2 else 1)
    if m.dtype == torch.bool:
        return torch.zeros(m.shape, dtype=dtype).masked_fill(~m, float("-inf"))
    return m.to(dtype)


def probs(c):
    q, k = bhnd(c, c["q"]), bhnd(c, c["k"])
    s = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
    a = additive(c["mask"])
    return torch.softmax(s if a is None else s + a, dim=-1)


def check_host_output(c):
    """The host's output of a tapped call equals the float64 naive softmax with its mask."""
    torch.testing.assert_close(out_bhnd(c), probs(c) @ bhnd(c, c["v"]), rtol=1e-4, atol=1e-5)


def ctx_len(family, total):
    return 512 if family == "Flux.2" else total


def classify(family, c, total, text_len=None):
    """Stream of a tapped call from its token counts (text_len: text tokens of a joint sequence where
    registers or padding make it longer than the context), and its query and key counts."""
    nq = c["q"].shape[2] if c["bhnd"] else c["q"].shape[1]
    nk = c["k"].shape[2] if c["bhnd"] else c["k"].shape[1]
    n_img, ctx = N_IMG.get(family, 64), ctx_len(family, total)
    if nq == nk == (text_len or ctx) + n_img:
        return "joint", nq, nk
    if nq == n_img and nk == ctx:
        return "text_cross", nq, nk
    if nq == nk == (text_len or ctx):
        return "text_refiner", nq, nk
    if nq == nk == n_img:
        return "image", nq, nk
    raise AssertionError((family, nq, nk))


def token_classes(family, stream, n, query, lengths, grid, members, text_len=None, registers=0):
    """Per token: ("base",), ("text", j) or ("img", frozenset of regions) (plain python). Text tokens
    are [0, text_len); the context starts after `registers` of them (SD3)."""
    ctx = ctx_len(family, sum(lengths))
    start = ctx - sum(lengths) + registers              # Flux.2 left-pads the context to 512
    text_len = text_len or ctx
    parts = [j for j, n_ in enumerate(lengths) for _ in range(n_)]
    n_img = grid[0] * grid[1] * grid[2]

    def text(i):
        p = i - start
        return ("text", parts[p]) if 0 <= p < len(parts) and parts[p] > 0 else ("base",)

    def img(i):
        return ("img", frozenset(j + 1 for j in range(members.shape[1]) if members[i, j]))

    if stream == "joint":
        return [text(i) if i < text_len else img(i - text_len) for i in range(n)]
    if stream == "text_cross":
        return [img(i) for i in range(n)] if query else [text(i) for i in range(n)]
    assert stream == "text_refiner" and n_img
    return [text(i) for i in range(n)]


def rule(q, k, image_attention="region", regional=True):
    """The mask rule, written out case by case."""
    if not regional:
        if q[0] == "text":
            return k == q
        return k[0] != "text"
    if q[0] == "base":
        return True
    if q[0] == "text":
        return k == q or (k[0] == "img" and q[1] in k[1])
    if k[0] == "base":
        return True
    if k[0] == "text":
        return k[1] in q[1]
    if image_attention == "full":
        return True
    return bool(q[1] & k[1]) or (not q[1] and not k[1])


def expected_allowed(qc, kc, **kw):
    uq, uk = sorted(set(qc)), sorted(set(kc))
    table = torch.tensor([[rule(a, b, **kw) for b in uk] for a in uq])
    iq = torch.tensor([uq.index(c) for c in qc])
    ik = torch.tensor([uk.index(c) for c in kc])
    return table[iq][:, ik]


def run_regions(family, regions=None, image_attention="region", start=0.0, end=1.0, steps=1, cfg=1.0,
                neg_text="negative", tune=None, layers="all", t=None, execution="mask"):
    """Sample with two regions; execution "mask" hands the host the mask (the tests read it), "auto"
    runs one host call per query group where the call has no mask of its own."""
    t = t or tiny(family)
    base, tap = tapped(t.patcher)
    m, pos = dit_region_conditioning(base, encoder(family), regions or two_regions(), "base", image_attention,
                                     start, end, layers)
    get_dit_router(m).controllers[-1].execution = execution
    if tune:
        tune(get_dit_router(m).controllers[-1])
    g = torch.Generator().manual_seed(7)
    noise = torch.randn(t.x.shape, generator=g)
    out = sample(m, noise, pos, encoder(family)(neg_text), torch.zeros_like(t.x), steps=steps, cfg=cfg)
    return out, tap, pos, noise


def grid_of(family):
    return (2, 4, 4) if family == "Wan" else (1, 8, 8)


def check_masks(family, tap, lengths, image_attention="region", regional=True, regions=None, text_len=None,
                registers=0):
    members = region_token_masks(regions or two_regions(), grid_of(family))
    seen = {}
    for c in tap.calls:
        stream, nq, nk = classify(family, c, sum(lengths), text_len)
        seen[stream] = seen.get(stream, 0) + 1
        if stream == "image":
            assert c["mask"] is None                                        # image-only calls: untouched
            continue
        qc = token_classes(family, stream, nq, True, lengths, grid_of(family), members, text_len, registers)
        kc = token_classes(family, stream, nk, False, lengths, grid_of(family), members, text_len, registers)
        allow = expected_allowed(qc, kc, image_attention=image_attention, regional=regional)
        mask = additive(c["mask"])[0, 0]
        assert torch.equal(torch.isinf(mask), ~allow) and torch.equal(mask[allow], torch.zeros(int(allow.sum()),
                                                                                          dtype=mask.dtype))
        p = probs(c)
        assert torch.equal(p > 0, allow.expand_as(p))                       # zero exactly where blocked
        check_host_output(c)
    return seen


MASKED_CALLS = {"Flux": {"joint": 4}, "Flux.2": {"joint": 3}, "Chroma": {"joint": 3}, "SD3": {"joint": 2},
                "Wan": {"text_cross": 2, "image": 2}, "Qwen-Image": {"joint": 2},
                "Lumina 2": {"text_refiner": 1, "image": 1, "joint": 2}}
MASKED_CALLS["Z-Image"] = MASKED_CALLS["Lumina 2"]


@pytest.mark.parametrize("family", FAMILIES)
def test_region_mask_rule_on_the_probabilities(family):
    """Two regions (left half, top-right quadrant) and a background: every joint / text-cross /
    text-refiner call hands the host an additive mask that is -inf exactly where the rule blocks; the
    float64 probabilities of the masked call are zero there and positive elsewhere (region-A image
    queries give region-B tokens zero and the base prompt's tokens positive mass, ...); the host's
    output is that masked softmax."""
    out, tap, pos, _ = run_regions(family)
    assert torch.isfinite(out).all()
    assert pos[0][0].shape[1] == sum(LENGTHS.values())
    assert check_masks(family, tap, list(LENGTHS.values())) == MASKED_CALLS[family]


@pytest.mark.parametrize("family", ["Flux", "Wan", "Lumina 2"])
def test_full_image_attention_and_the_rule_outside_the_window(family):
    _, tap, _, _ = run_regions(family, image_attention="full")
    check_masks(family, tap, list(LENGTHS.values()), image_attention="full")
    _, tap, _, _ = run_regions(family, start=0.0, end=0.0)
    check_masks(family, tap, list(LENGTHS.values()), regional=False)


def test_registers_and_caption_padding_are_base_tokens():
    """SD3's register tokens (before the context) and Z-Image's caption padding (to a multiple of 32
    tokens, after it) attend and are attended like the base prompt's tokens."""
    from ac_dit import Tiny
    _, tap, _, _ = run_regions("SD3", t=Tiny("SD3", register_length=2))
    assert check_masks("SD3", tap, list(LENGTHS.values()), text_len=14, registers=2) == {"joint": 2}
    _, tap, _, _ = run_regions("Z-Image", t=Tiny("Z-Image", pad_tokens_multiple=32))
    assert check_masks("Z-Image", tap, list(LENGTHS.values()), text_len=32) == MASKED_CALLS["Z-Image"]


@pytest.mark.parametrize("family", ["Flux", "Chroma", "SD3", "Wan", "Qwen-Image"])
def test_outside_the_window_the_model_follows_the_base_prompt_alone(family):
    """start = end = 0: nobody but a region's own tokens sees the regions' tokens, so the image
    follows the base prompt as if sampled with it alone (the masked keys add exactly zero; equal up
    to float summation order). Not on Flux.2 (the base prompt's tokens sit at other text positions
    after its left padding to 512), Lumina 2 / Z-Image (the image tokens' RoPE position follows the
    caption length)."""
    out, _, _, noise = run_regions(family, start=0.0, end=0.0, steps=2, execution="auto")
    t = tiny(family)
    ref = sample(t.patcher, noise, encoder(family)("base"), encoder(family)("negative"), torch.zeros_like(t.x),
                 steps=2, cfg=1.0)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)


def test_full_canvas_single_region():
    """One region over the whole canvas. Wan (image -> text only): nothing is blocked, so sampling is
    bit for bit the plain model on the concatenated context. Flux (joint), image_attention full: only
    the region's text queries lose the base prompt's keys; the first joint call's image and base rows
    equal the unmasked attention."""
    full = (Region("left", torch.ones(64, 64)),)
    out, tap, pos, noise = run_regions("Wan", regions=full, steps=2, execution="auto")
    t = tiny("Wan")
    ref = sample(t.patcher, noise, pos, encoder("Wan")("negative"), torch.zeros_like(t.x), steps=2, cfg=1.0)
    assert torch.equal(out, ref) and all(c["mask"] is None for c in tap.calls)

    _, tap, pos, noise = run_regions("Flux", regions=full, image_attention="full")
    plain, ptap = tapped(tiny("Flux").patcher)
    sample(plain, noise, pos, encoder("Flux")("negative"), torch.zeros_like(tiny("Flux").x), steps=1, cfg=1.0)
    first, ref = tap.calls[0], ptap.calls[0]
    blocked = torch.isinf(additive(first["mask"])[0, 0])
    b, r = LENGTHS["base"], LENGTHS["left"]
    want = torch.zeros_like(blocked)
    want[b:b + r, :b] = True
    assert torch.equal(blocked, want)
    keep = [i for i in range(blocked.shape[0]) if not b <= i < b + r]
    torch.testing.assert_close(out_bhnd(first)[:, :, keep], out_bhnd(ref)[:, :, keep], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("family", FAMILIES)
def test_grouped_attention_equals_the_mask(family):
    """The default execution where a call has no mask of its own: one host attention call per query
    class (base tokens, each region's tokens, each region's image tokens, the background) on the
    keys the class may see, no mask: the same sample as the mask handed to the host."""
    masked, mtap, _, _ = run_regions(family)
    grouped, gtap, _, _ = run_regions(family, execution="auto")
    torch.testing.assert_close(grouped, masked, rtol=1e-4, atol=1e-5)
    assert all(c["mask"] is None for c in gtap.calls) and len(gtap.calls) > len(mtap.calls)


@pytest.mark.parametrize("family", ["Flux", "SD3", "Wan", "Lumina 2"])
def test_explicit_chunked_attention_equals_the_fused_mask(family):
    """Over the mask budget the masked rows are computed explicitly in query chunks (never the whole
    matrix): the same sample as the mask handed to the host."""
    fused, _, _, _ = run_regions(family)

    def tune(c):
        c.mask_budget, c.chunk_budget = 0, 500

    chunked, tap, _, _ = run_regions(family, tune=tune)
    assert all(c["mask"] is None for c in tap.calls)                # the host no longer sees our rows' masks
    torch.testing.assert_close(chunked, fused, rtol=1e-4, atol=1e-5)


def _cfg_spy(model, store):
    def fn(args):
        store.append((args["cond_denoised"].clone(), args["uncond_denoised"].clone()))
        return args["uncond_denoised"] + (args["cond_denoised"] - args["uncond_denoised"]) * args["cond_scale"]
    m = model.clone()
    m.set_model_sampler_cfg_function(fn)
    return m


@pytest.mark.parametrize("neg_text", ["negative", "a negative of twelve"])
def test_uncond_rows_keep_the_hosts_attention(neg_text):
    """cfg 2.5 on Flux. A negative of another length runs in its own model call: its prediction is
    bit for bit the unpatched one. One of the same length (12 tokens) is batched with the cond
    chunk: its rows run the host's attention without our mask (one host call for the cond row with the
    mask, one for the uncond row without)."""
    t = tiny("Flux")
    enc = encoder("Flux", lengths={"a negative of twelve": 12})
    g = torch.Generator().manual_seed(7)
    noise = torch.randn(t.x.shape, generator=g)
    plain = []
    concatenated = dit_region_conditioning(t.patcher, enc, two_regions(), "base")[1]
    sample(_cfg_spy(t.patcher, plain), noise, concatenated, enc(neg_text), torch.zeros_like(t.x), steps=1, cfg=2.5)
    for execution in ("mask", "auto"):
        mine = []
        base, tap = tapped(t.patcher)
        m, pos = dit_region_conditioning(base, enc, two_regions(), "base")
        get_dit_router(m).controllers[-1].execution = execution
        sample(_cfg_spy(m, mine), noise, pos, enc(neg_text), torch.zeros_like(t.x), steps=1, cfg=2.5)
        if neg_text == "negative":
            assert torch.equal(mine[0][1], plain[0][1])
        else:
            torch.testing.assert_close(mine[0][1], plain[0][1], rtol=1e-5, atol=1e-6)
        assert not torch.allclose(mine[0][0], plain[0][0])
        if execution == "mask" and neg_text == "negative":
            assert sum(c["mask"] is None for c in tap.calls) == 4 and len(tap.calls) == 8
        elif execution == "mask":
            assert [c["q"].shape[0] for c in tap.calls] == [1] * 8
            assert [c["mask"] is None for c in tap.calls] == [False, True] * 4


def test_chosen_blocks_only_while_the_window_is_open():
    """layers "single": the double blocks attend to the whole concatenated context in the window."""
    _, tap, _, _ = run_regions("Flux", layers="single")
    assert [c["mask"] is None for c in tap.calls] == [True, True, False, False]
    with pytest.raises(AttentionControlError, match="matches no block"):
        run_regions("Flux", layers="joint")


def test_wan_per_frame_masks():
    """A mask batch as one mask per latent frame, or per decoded frame (4 (T - 1) + 1)."""
    a, b = torch.zeros(64, 64), torch.zeros(64, 64)
    a[:, :32] = 1.0
    b[:, 32:] = 1.0
    per_latent = region_token_masks([Region("x", torch.stack([a, b]))], (2, 4, 4))[:, 0].view(2, 4, 4)
    assert per_latent[0, :, :2].all() and not per_latent[0, :, 2:].any()
    assert per_latent[1, :, 2:].all() and not per_latent[1, :, :2].any()
    decoded = torch.stack([a] + [b] * 4)                                   # 5 frames -> 2 latent frames
    assert torch.equal(region_token_masks([Region("x", decoded)], (2, 4, 4))[:, 0].view(2, 4, 4), per_latent)
    moving = (Region("left", torch.stack([a, b])), Region("top right", masks64()[1]))
    _, tap, _, _ = run_regions("Wan", regions=moving)
    check_masks("Wan", tap, list(LENGTHS.values()), regions=moving)


def test_named_errors_before_sampling(sd15):
    left, _ = masks64()
    with pytest.raises(AttentionControlError, match="covers nothing"):
        RegionPrompt.execute("left", 1.0, None, torch.zeros(1, 64, 64))
    nan = left.clone()
    nan[0, 0] = float("nan")
    with pytest.raises(AttentionControlError, match="not finite"):
        RegionPrompt.execute("left", 1.0, None, nan[None])
    with pytest.raises(AttentionControlError, match="not finite"):
        DitRegionController([Region("left", nan)], [5, 3])
    speck = torch.zeros(64, 64)
    speck[0, 0] = 1.0                                                     # far below half a token
    with pytest.raises(AttentionControlError, match=r"region 1 'left' covers no image token of this 8x8"):
        run_regions("Flux", regions=(Region("left", speck),))
    with pytest.raises(AttentionControlError, match="batch of 3 masks, but the video has 2 latent frames"):
        run_regions("Wan", regions=(Region("left", left[None].repeat(3, 1, 1)),))
    with pytest.raises(AttentionControlError, match="per-frame masks are for video models"):
        run_regions("Flux", regions=(Region("left", left[None].repeat(2, 1, 1)),))
    with pytest.raises(AttentionControlError, match="per-frame masks work with the attention-mask method"):
        region_conditioning(tiny("Wan").patcher, encoder("Wan"), (Region("left", left[None].repeat(2, 1, 1)),),
                            "", 0.0)
    t = tiny("Flux")
    m, _ = dit_region_conditioning(t.patcher, encoder("Flux"), two_regions(), "base")
    with pytest.raises(AttentionControlError, match="positive: the sampler's positive conditioning does not come"):
        sample(m, torch.randn(t.x.shape), encoder("Flux")("base"), encoder("Flux")("negative"),
               torch.zeros_like(t.x), steps=1)
    with pytest.raises(AttentionControlError, match="image_attention"):
        DitRegionController(two_regions(), [5, 3, 4], "pixels")
    with pytest.raises(UnsupportedModelError, match="not a supported transformer"):
        attach(sd15, DitRegionController(two_regions(), [5, 3, 4]))
    with pytest.raises(UnsupportedModelError, match="not a supported transformer"):
        attach(sd15, DitPaintController([PaintedPhrase("w", [1], left)], 77))


def test_no_leak():
    t = tiny("Flux")
    g = torch.Generator().manual_seed(3)
    noise = torch.randn(t.x.shape, generator=g)
    enc = encoder("Flux")
    before = sample(t.patcher, noise, enc("base"), enc("negative"), torch.zeros_like(t.x), steps=1)
    m, pos = dit_region_conditioning(t.patcher, enc, two_regions(), "base")
    sample(m, noise, pos, enc("negative"), torch.zeros_like(t.x), steps=1)
    mp = attach(t.patcher, DitPaintController([PaintedPhrase("w", [1], masks64()[0])], 5, weight=0.5))
    sample(mp, noise, enc("base"), enc("negative"), torch.zeros_like(t.x), steps=1)
    assert torch.equal(sample(t.patcher, noise, enc("base"), enc("negative"), torch.zeros_like(t.x), steps=1),
                       before)
    assert get_dit_router(t.patcher) is None


# --------------------------------------------------------------------------------------------
# MultiDiffusion region prompts (whole model calls) on DiT models

def test_multidiffusion_region_prompts_on_dit_models():
    """The UNet method works on any family with masked conditioning: one region over the canvas is
    plain conditioning bit for bit (Flux); one euler step from sigma max at cfg 1 is the per-pixel
    average of the prompts' predictions (Flux); bootstrapping runs on video latents (Wan)."""
    t = tiny("Flux")
    enc = encoder("Flux")
    g = torch.Generator().manual_seed(5)
    noise = torch.randn(t.x.shape, generator=g)
    lat = torch.zeros_like(t.x)
    m, pos = region_conditioning(t.patcher, enc, (Region("left", torch.ones(64, 64)),), "", 0.4)
    assert get_dit_router(m) is None                                     # the UNet router's whole-call wrapper
    assert torch.equal(sample(m, noise, pos, enc("negative"), lat, steps=2),
                       sample(t.patcher, noise, enc("left"), enc("negative"), lat, steps=2))
    left, _ = masks64()
    m, pos = region_conditioning(t.patcher, enc, (Region("left", left),), "base", 0.0)
    out = sample(m, noise, pos, enc("negative"), lat, steps=1, cfg=1.0)
    a = sample(t.patcher, noise, enc("left"), enc("negative"), lat, steps=1, cfg=1.0)
    b = sample(t.patcher, noise, enc("base"), enc("negative"), lat, steps=1, cfg=1.0)
    torch.testing.assert_close(out[..., :8], a[..., :8], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out[..., 8:], b[..., 8:], rtol=1e-4, atol=1e-5)
    w = tiny("Wan")
    m, pos = region_conditioning(w.patcher, encoder("Wan"), (Region("left", left),), "base", 0.5)
    assert isinstance(get_router_controllers(m)[-1], RegionController)
    out = sample(m, torch.randn(w.x.shape, generator=g), pos, encoder("Wan")("negative"), torch.zeros_like(w.x))
    assert torch.isfinite(out).all()


def get_router_controllers(m):
    from attention_control.attention.router import get_router
    return get_router(m).controllers


# --------------------------------------------------------------------------------------------
# nodes

class TinyTextEncoder:
    """A CLIP stand-in for the tiny DiTs: ComfyUI's real CLIP tokenizer, a fixed random embedding
    table of the DiT's context width (77 tokens a prompt), the family's extra conditioning."""

    def __init__(self, family, dim=32):
        import comfy.sd1_clip
        self.tokenizer = comfy.sd1_clip.SD1Tokenizer(embedding_directory=None)
        self.table = torch.randn(49408, dim, generator=torch.Generator().manual_seed(9))
        self.family = family

    def tokenize(self, text):
        return self.tokenizer.tokenize_with_weights(text)

    def encode_from_tokens_scheduled(self, tokens):
        ids = torch.tensor([t[0] for chunk in tokens["l"] for t in chunk])
        g = torch.Generator().manual_seed(int(ids.sum()))
        return [[self.table[ids][None], EXTRAS.get(self.family, lambda g: {})(g)]]


def test_nodes_pick_the_dit_controllers():
    t = tiny("Flux")
    clip = TinyTextEncoder("Flux")
    left, tr = masks64()
    regs = RegionPrompt.execute("a red circle", 1.0, None, left[None]).result[0]
    regs = RegionPrompt.execute("a blue square", 1.0, regs, tr[None]).result[0]
    m, pos = RegionConditioning.execute(t.patcher, clip, regs, "two shapes", 0.4).result
    ctrl = get_dit_router(m).controllers[-1]
    assert isinstance(ctrl, DitRegionController) and ctrl.lengths == (77, 77, 77) and pos[0][0].shape[1] == 231
    g = torch.Generator().manual_seed(2)
    noise = torch.randn(t.x.shape, generator=g)
    neg = clip.encode_from_tokens_scheduled(clip.tokenize(""))
    out = sample(m, noise, pos, neg, torch.zeros_like(t.x), steps=1)
    assert torch.isfinite(out).all() and not torch.equal(out, sample(t.patcher, noise, pos, neg,
                                                                       torch.zeros_like(t.x), steps=1))
    m2, _ = RegionConditioning.execute(t.patcher, clip, regs, "two shapes", 0.4, "random", "multidiffusion").result
    assert isinstance(get_router_controllers(m2)[-1], RegionController)
    with pytest.raises(AttentionControlError, match="start_percent"):
        RegionConditioning.execute(t.patcher, clip, regs, "", 0.4, "random", "attention mask", "region", 0.6, 0.5)
    video = RegionPrompt.execute("a red circle", 1.0, None, left[None].repeat(5, 1, 1), None, True).result[0]
    assert video[0].mask.shape == (5, 64, 64)
    # paint-with-words: '#2' is the second token of the prompt (CLIP: 0 = start token)
    prompt = "a red circle and a blue square"
    pm, ppos = PaintWithWords.execute(t.patcher, clip, prompt, "ediff-i", 0.5, "", 1.0, 1.0, "double", 1.0,
                                      None, left[None], "#2+3").result
    pc = get_dit_router(pm).controllers[-1]
    assert isinstance(pc, DitPaintController) and pc.phrases[0].positions == [2, 3] and pc.prompt_len == 77
    a = sample(pm, noise, ppos, neg, torch.zeros_like(t.x), steps=1)
    assert not torch.equal(a, sample(t.patcher, noise, ppos, neg, torch.zeros_like(t.x), steps=1))
    assert PaintWithWords.validate_inputs(layers="double:0-1, 0.5-1.0") is True


# --------------------------------------------------------------------------------------------
# paint-with-words

def PHRASES():
    """Word 1 painted on the left half (strength 1), words 3-4 on the top-right quadrant (0.5)."""
    return [PaintedPhrase("w1", [1], masks64()[0], 1.0), PaintedPhrase("w2", [3, 4], masks64()[1], 0.5)]


def run_paint(family, mode="ediff-i", weight=0.4, steps=1, cfg=1.0, neg_len=None, tune=None, phrases=None,
              reference=True):
    t = tiny(family)
    base, tap = tapped(t.patcher)
    ctrl = DitPaintController(phrases or PHRASES(), TXT, weight, mode, 1.0, 0.5)
    if tune:
        tune(ctrl)
    m = attach(base, ctrl)
    g = torch.Generator().manual_seed(12)
    ex = EXTRAS.get(family, lambda g: {})
    pos = [[torch.randn(1, TXT, 32, generator=g), ex(g)]]
    neg = [[torch.randn(1, neg_len or 6, 32, generator=g), ex(g)]]
    noise = torch.randn(t.x.shape, generator=g)
    out = sample(m, noise, pos, neg, torch.zeros_like(t.x), steps=steps, cfg=cfg)
    ref = sample(t.patcher, noise, pos, neg, torch.zeros_like(t.x), steps=steps, cfg=cfg) if reference else None
    return out, ref, tap


def naive_bias(family, c, phrases, weight, mode="ediff-i", s_pos=1.0, s_neg=0.5):
    """The UNet formula (regions.paint_logits) on the image-query x word-key scores, float64: the
    additive bias on the scaled logits (R, H, Nq, Nk)."""
    q, k = bhnd(c, c["q"]), bhnd(c, c["k"])
    stream, nq, nk = classify(family, c, TXT)
    n_img = N_IMG.get(family, 64)
    ctx = ctx_len(family, TXT)
    img = slice(ctx, ctx + n_img) if stream == "joint" else slice(0, n_img)
    pad = ctx - TXT
    f, gh, gw = grid_of(family)
    s = q @ k.transpose(-1, -2)
    scale = q.shape[-1] ** -0.5
    bias = torch.zeros(s.shape, dtype=torch.float64)
    sigma = c["sigma"]
    if mode == "ediff-i":
        top = s[:, :, img, :ctx].max()
        for p in phrases:
            m = mask_at(p.mask, gh, gw).double().repeat(f)
            for pos in p.positions:
                bias[:, :, img, pad + pos] += weight * math.log1p(sigma) * top * p.strength * m * scale
    else:
        gs = math.log(math.log(sigma + 1.01) + 1.0)
        for p in phrases:
            m = mask_at(p.mask, gh, gw).double().repeat(f)
            for pos in p.positions:
                col = pad + pos
                top = (s[:, :, img, col] * scale).amax(dim=2, keepdim=True)
                bias[:, :, img, col] = gs * top * p.strength * (s_pos * m - s_neg * (1 - m))
    return bias, stream


@pytest.mark.parametrize("family", FAMILIES)
def test_paint_bias_equals_the_naive_formula_on_the_word_columns_only(family):
    """eDiff-I: the additive mask handed to the host equals w log(1 + sigma) max(QK^T) sum_k s_k M_k
    (times the 1/sqrt(d) scale) at the image queries x the painted words' key columns, zero everywhere
    else; the host's output is the softmax with it."""
    out, ref, tap = run_paint(family)
    assert torch.isfinite(out).all() and not torch.equal(out, ref)
    painted = 0
    for c in tap.calls:
        stream = classify(family, c, TXT)[0]
        if stream not in ("joint", "text_cross"):
            assert c["mask"] is None
            continue
        want, _ = naive_bias(family, c, PHRASES(), 0.4)
        got = additive(c["mask"])
        torch.testing.assert_close(got.expand_as(want), want, rtol=1e-4, atol=1e-6)
        assert torch.equal(got[0, 0] != 0, want[0, 0] != 0) and (want != 0).any()
        check_host_output(c)
        painted += 1
    assert painted == sum(v for s, v in MASKED_CALLS[family].items() if s in ("joint", "text_cross"))


def test_paint_off_cond_rows_and_explicit_path():
    """weight 0 and strength 0 are bit for bit the plain model; at cfg 2.5 with a negative batched
    with the cond row only the cond row is biased; the explicit chunked path (eDiff-I and collage)
    equals the naive float64 formula."""
    out, ref, tap = run_paint("Flux", weight=0.0)
    assert torch.equal(out, ref) and all(c["mask"] is None for c in tap.calls)
    zero = [PaintedPhrase("w1", [1], masks64()[0], 0.0)]
    out, ref, _ = run_paint("Flux", phrases=zero)
    assert torch.equal(out, ref)
    _, _, tap = run_paint("Flux", cfg=2.5, neg_len=TXT, reference=False)
    assert [c["q"].shape[0] for c in tap.calls] == [1] * 8
    assert [c["mask"] is None for c in tap.calls] == [False, True] * 4

    def tune(c):
        c.mask_budget, c.chunk_budget = 0, 300

    for family, mode in (("Flux", "ediff-i"), ("Wan", "ediff-i"), ("Flux", "collage"), ("SD3", "collage")):
        fused, _, ftap = run_paint(family, mode=mode, reference=False)
        chunked, _, ctap = run_paint(family, mode=mode, tune=tune, reference=False)
        torch.testing.assert_close(chunked, fused, rtol=1e-4, atol=1e-5)
        assert all(c["mask"] is None for c in ctap.calls)
        # the host's output with the fused bias is the naive softmax with the naive bias (collage too)
        first = next(c for c in ftap.calls if c["mask"] is not None)
        want, _ = naive_bias(family, first, PHRASES(), 0.4, mode=mode)
        q, k = bhnd(first, first["q"]), bhnd(first, first["k"])
        p = torch.softmax(q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5 + want, dim=-1)
        torch.testing.assert_close(out_bhnd(first), p @ bhnd(first, first["v"]), rtol=1e-4, atol=1e-5)


# --------------------------------------------------------------------------------------------
# with Tiled Diffusion on the DiT

def _tiled(model, width_px):
    from attention_control.nodes.tiled import TiledDiffusion
    return TiledDiffusion.execute(model, width_px, 128, 0, "multidiffusion", 1, False).result[0]


def test_regions_and_paint_under_tiled_diffusion():
    """Region masks and painted masks stay defined on the canvas: one tile covering the canvas is the
    untiled run bit for bit; with two tiles (left / right half of the 8x8 token grid) each tile's
    calls get their crop of the canvas' region tokens and painted masks."""
    t = tiny("Flux")
    enc = encoder("Flux")
    g = torch.Generator().manual_seed(4)
    noise = torch.randn(t.x.shape, generator=g)
    lat = torch.zeros_like(t.x)
    base, tap = tapped(t.patcher)
    m, pos = dit_region_conditioning(base, enc, two_regions(), "base", "region")
    get_dit_router(m).controllers[-1].execution = "mask"
    ref = sample(m, noise, pos, enc("negative"), lat, steps=1, cfg=1.0)
    assert torch.equal(sample(_tiled(m, 128), noise, pos, enc("negative"), lat, steps=1, cfg=1.0), ref)
    tap.calls.clear()
    sample(_tiled(m, 64), noise, pos, enc("negative"), lat, steps=1, cfg=1.0)
    canvas = region_token_masks(two_regions(), (1, 8, 8)).view(8, 8, 2)
    lengths = list(LENGTHS.values())
    assert len(tap.calls) == 8                                        # 2 tiles x 4 blocks, one tile per call
    for n, c in enumerate(tap.calls):
        members = canvas[:, :4] if n < 4 else canvas[:, 4:]
        qc = token_classes("Flux", "joint", 12 + 32, True, lengths, (1, 8, 4), members.reshape(32, 2))
        allow = expected_allowed(qc, qc)
        assert torch.equal(torch.isinf(additive(c["mask"])[0, 0]), ~allow)
        check_host_output(c)

    paint = DitPaintController([PaintedPhrase("w1", [1], masks64()[0], 1.0)], TXT, 0.4)
    pbase, ptap = tapped(t.patcher)
    pm = attach(pbase, paint)
    ppos = [[torch.randn(1, TXT, 32, generator=g), EXTRAS["Flux"](g)]]
    pref = sample(pm, noise, ppos, ppos, lat, steps=1, cfg=1.0)
    assert torch.equal(sample(_tiled(pm, 128), noise, ppos, ppos, lat, steps=1, cfg=1.0), pref)
    ptap.calls.clear()
    sample(_tiled(pm, 64), noise, ppos, ppos, lat, steps=1, cfg=1.0)
    for n, c in enumerate(ptap.calls):
        bias = additive(c["mask"])[0, 0, TXT:, 1]                    # word 1's column at the image queries
        assert (bias != 0).all() if n < 4 else (bias == 0).all()     # the left half is the left tile


# --------------------------------------------------------------------------------------------
# capture stacked with region prompts

STACK_WORDS = ((1,), (3, 4))                   # token positions in the base prompt's 5 context tokens


@pytest.mark.parametrize("family", ["Flux", "Flux.2", "SD3", "Wan"])
@pytest.mark.parametrize("capture_first", [False, True])
def test_capture_maps_what_region_prompts_let_the_model_attend_to(family, capture_first):
    """Capture and region prompts on one MODEL, in either order: the image is the regions-only
    image bit for bit, and the word maps are the float64 masked softmax of the calls the host ran
    (region rule + host mask), the words found in the base prompt's part of the region context, not
    the maps of the unmasked scores."""
    from attention_control.attention.capture import AttentionMaps, WordSpec
    from attention_control.attention.dit_capture import DitCaptureController
    from attention_control.attention.dit_layers import DitLayerSelector

    t = tiny(family)
    ctx = ctx_len(family, LENGTHS["base"])
    pad = ctx - LENGTHS["base"]                                   # Flux.2: positions count its left padding
    words = [WordSpec(f"w{i}", [pad + p for p in ps]) for i, ps in enumerate(STACK_WORDS)]
    handle = AttentionMaps([w.label for w in words])
    cap = DitCaptureController(words, ctx, handle, DitLayerSelector.parse("all"), cond_len=LENGTHS["base"])
    base, tap = tapped(t.patcher)
    if capture_first:
        base = attach(base, cap)
    m, pos = dit_region_conditioning(base, encoder(family), two_regions(), "base", "region", 0.0, 1.0, "all")
    get_dit_router(m).controllers[-1].execution = "mask"
    if not capture_first:
        m = attach(m, cap)
    g = torch.Generator().manual_seed(7)
    noise = torch.randn(t.x.shape, generator=g)
    neg = encoder(family)("negative")
    out = sample(m, noise, pos, neg, torch.zeros_like(t.x), steps=2, cfg=1.0)
    n_calls = len(tap.calls)
    regions_only, pos_only = dit_region_conditioning(tapped(t.patcher)[0], encoder(family), two_regions(), "base",
                                              "region", 0.0, 1.0, "all")
    get_dit_router(regions_only).controllers[-1].execution = "mask"
    assert torch.equal(pos_only[0][0], pos[0][0])
    assert torch.equal(out, sample(regions_only, noise, pos_only, neg, torch.zeros_like(t.x), steps=2, cfg=1.0))

    total = sum(LENGTHS.values())
    start = ctx_len(family, total) - total                        # where the base prompt's tokens are
    cols = [[start + p for p in ps] for ps in STACK_WORDS]
    f, h, w = grid_of(family)
    masked, plain = [], []
    for c in tap.calls[:n_calls]:
        stream, nq, nk = classify(family, c, total)
        if stream not in ("joint", "text_cross"):
            continue
        qi = slice(nq - f * h * w, nq)                             # text first: the image queries last
        q, k = bhnd(c, c["q"]), bhnd(c, c["k"])
        s = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
        for probs_, acc in ((probs(c), masked), (torch.softmax(s, -1), plain)):
            p = probs_[0][:, qi]                                   # (H, N_img, K) of the one cond row
            acc.append(torch.stack([p[..., cc].sum(-1) for cc in cols]).mean(1))     # (W, N_img)
    assert masked, "no call with text keys was tapped"

    def grid_maps(acc):
        m_ = torch.stack(acc).mean(0)
        return m_.view(len(cols), f, h, w).permute(1, 0, 2, 3)

    got = handle.maps.double()
    assert got.shape == (f, len(cols), h, w)
    torch.testing.assert_close(got, grid_maps(masked), rtol=1e-4, atol=1e-6)
    unmasked = grid_maps(plain)
    assert (got - unmasked).abs().max() > 0.05 * unmasked.abs().max()   # the region mask changed the maps
