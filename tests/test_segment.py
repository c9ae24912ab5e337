"""Word segmentation of real images (issue 21): the fused propagation equals the naive float64
formula, the refinement reads the self-attention the model computes (UNet and DiT families, video
frames), segmentation leaves the model untouched, and bad inputs get named errors. The measured
effect on the shapes world is in tests/test_semantic_shapes.py."""
from __future__ import annotations

import pytest
import torch

import ac_models as M
import nodes
from attention_control.attention.capture import AttentionMaps, CaptureController, WordSpec
from attention_control.attention.core import AttentionControlError, Controller, LayerSelector
from attention_control.attention.dit_capture import DitCaptureController
from attention_control.attention.dit_layers import DitLayerSelector
from attention_control.attention.dit_router import DitController
from attention_control.attention.maps import split_heads
from attention_control.attention.segment import head_mean_apply, propagate, word_masks
from attention_control.attention.segment_glue import noise_sigma
from attention_control.nodes.segment import SegmentWords, segment_maps
from attention_control.shapesworld.comfy_glue import ShapesWorldVAE

PROMPT = "a red circle and a blue photorealistic square"


def _naive_s(q, k):
    """float64 head-mean attention matrix (B, N, K)."""
    q, k = q.double(), k.double()
    return torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1).mean(1)


def test_head_mean_apply_equals_naive_in_chunks_and_groups():
    g = torch.Generator().manual_seed(3)
    q, k = torch.randn(2, 3, 50, 4, generator=g), torch.randn(2, 3, 40, 4, generator=g)
    vals = torch.rand(2, 40, 9, generator=g)           # 9 columns > head width 4: three groups
    ref = (_naive_s(q, k) @ vals.double()).transpose(1, 2)
    for budget in (1, 7 * 2 * 3 * 40, 10 ** 9):
        torch.testing.assert_close(head_mean_apply(q, k, vals, budget).double(), ref, rtol=1e-5, atol=1e-6)


def test_propagate_is_the_power_of_the_head_mean_matrix():
    g = torch.Generator().manual_seed(4)
    q, k = torch.randn(1, 2, 30, 8, generator=g), torch.randn(1, 2, 30, 8, generator=g)
    m = torch.rand(1, 3, 30, generator=g)
    s = _naive_s(q, k)[0]
    ref = m[0].double().T
    for _ in range(3):
        ref = s @ ref
    torch.testing.assert_close(propagate(q, k, m, 3, chunk_budget=100)[0].double(), ref.T, rtol=1e-5, atol=1e-7)
    assert torch.equal(propagate(q, k, m, 0), m)


def test_word_masks_threshold_and_soft():
    m = torch.tensor([[[[0.0, 1.0], [2.0, 4.0]]]])
    soft = word_masks(m, (2, 2), 0.5, True)
    torch.testing.assert_close(soft, torch.tensor([[[[0.0, 0.25], [0.5, 1.0]]]]))
    assert torch.equal(word_masks(m, (2, 2), 0.4, False), torch.tensor([[[[0.0, 0.0], [1.0, 1.0]]]]))
    assert word_masks(m, (8, 6), 0.5, False).shape == (1, 1, 8, 6)


class KeepSelf(Controller):
    """Below the propagation: keeps q, k of the self-attention calls of the given sites."""
    name = "keep self"
    kinds = frozenset({"self"})

    def __init__(self):
        self.calls = []

    def attend(self, q, k, v, call, nxt):
        rows = call.cond_rows()
        self.calls.append(dict(q=split_heads(q[rows], call.site.heads), k=split_heads(k[rows], call.site.heads),
                               ds=call.site.ds, hw=(call.h, call.w)))
        return nxt(q, k, v)


def _unet_setup(clip_l):
    import comfy.sample
    model = M.tiny_sd15()
    pos = nodes.CLIPTextEncode().encode(clip_l, PROMPT)[0]
    from attention_control.nodes.common import resolve_words
    specs, plen = resolve_words(clip_l, PROMPT, "circle, square")
    lat = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(8))
    return model, pos, specs, plen, lat, comfy.sample


def test_unet_refinement_equals_the_naive_propagation_of_the_finest_layers(clip_l):
    """refine 2, auto layers: the refined maps are the mean over the finest self-attention layers of
    (head-mean S)^2 applied to the captured maps (float64 reference from the q, k the model computed)."""
    from attention_control.attention.router import attach
    model, pos, specs, plen, lat, _ = _unet_setup(clip_l)
    handle = AttentionMaps([s.label for s in specs])
    cap = CaptureController(specs, plen, handle, LayerSelector.parse("all"))
    keep = KeepSelf()
    raw, refined, frames = segment_maps(attach(model, keep), pos, lat, cap, handle, 0.5, 1, 0, 2)
    assert frames == 1 and raw.shape == refined.shape == (1, 2, 16, 16)
    finest = min(c["ds"] for c in keep.calls)
    # the capture pass and the refinement pass each saw every self-attention call once
    second = keep.calls[len(keep.calls) // 2:]
    ref = torch.zeros(1, 2, 16, 16, dtype=torch.float64)
    used = [c for c in second if c["ds"] == finest]
    assert used and len(used) < len(second)           # the coarser layers are left out
    for c in used:
        h, w = c["hw"]
        m = torch.nn.functional.interpolate(raw, size=(h, w), mode="bilinear", align_corners=False)
        m = m.flatten(2).double()[0].T                                    # (N, W)
        s = _naive_s(c["q"], c["k"])[0]
        ref += (s @ (s @ m)).T.reshape(1, 2, h, w)
    torch.testing.assert_close(refined.double(), ref / len(used), rtol=1e-4, atol=1e-7)
    assert not torch.allclose(refined, raw)


def test_segment_node_leaves_the_model_as_it_was(clip_l):
    """Masks per word at the image's size; a plain KSampler on the same MODEL afterwards gives the
    same latent bit for bit; refine 0 gives the raw maps."""
    model = M.tiny_sd15()
    pos = nodes.CLIPTextEncode().encode(clip_l, PROMPT)[0]
    neg = nodes.CLIPTextEncode().encode(clip_l, "")[0]
    lat = M.latent(1, 16, 16)
    before = M.ksample(model, pos, neg, lat, seed=3)
    image = torch.rand(2, 128, 128, 3, generator=torch.Generator().manual_seed(2))
    out = SegmentWords.execute(model, clip_l, ShapesWorldVAE(), image, PROMPT, "red circle, square", 0.3, 2, 5, 1,
                               0.5, False)
    masks, preview, maps = out.args if hasattr(out, "args") else out
    assert masks.shape == (4, 128, 128) and set(masks.unique().tolist()) <= {0.0, 1.0}
    assert preview.shape == (4, 128, 128, 3)
    assert maps.maps.shape == (2, 2, 16, 16) and maps.words == ["red circle", "square"]
    assert torch.equal(M.ksample(model, pos, neg, lat, seed=3), before)
    soft0 = SegmentWords.execute(model, clip_l, ShapesWorldVAE(), image, PROMPT, "square", 0.3, 1, 5, 0, 0.5,
                                 True).args[2]
    handle = AttentionMaps(["square"])
    from attention_control.nodes.common import resolve_words
    specs, plen = resolve_words(clip_l, PROMPT, "square")
    cap = CaptureController(specs, plen, handle, LayerSelector.parse("all"))
    raw, _, _ = segment_maps(model, pos, ShapesWorldVAE().encode(image), cap, handle,
                             noise_sigma(model, 0.3), 1, 5, 0)
    assert torch.equal(soft0.maps, raw)


def test_noise_level_follows_the_schedule(clip_l):
    model = M.tiny_sd15()
    ms = model.get_model_object("model_sampling")
    assert noise_sigma(model, 1.0) == pytest.approx(float(ms.sigma_max), rel=1e-4)
    assert noise_sigma(model, 0.0) == 0.0
    assert 0.0 < noise_sigma(model, 0.2) < noise_sigma(model, 0.5) < float(ms.sigma_max)


class KeepImage(DitController):
    """Below the propagation on a DiT: keeps the image queries / keys of every self-attention call."""
    name = "keep image"
    streams = frozenset({"joint", "image_self"})

    def __init__(self):
        self.calls = []

    def attend(self, call):
        if call.q_image is None or call.run is None:
            return None
        rows = call.cond_rows()
        self.calls.append(dict(q=call.split_heads(call.q)[rows][:, :, call.q_image],
                               k=call.split_heads(call.k)[rows][:, :, call.k_image], grid=call.grid))
        return None


@pytest.mark.parametrize("family", ["Flux", "SD3", "Wan", "Lumina 2"])
def test_dit_refinement_equals_the_naive_propagation(family):
    """Every image self-attention (joint: the image-query x image-key part) of the refinement pass,
    float64 reference; Wan on a 2-frame video: one map per latent frame, propagated across frames."""
    from ac_dit import SAMPLE_CONDS, TXT, tiny
    from attention_control.attention.router import attach
    t = tiny(family)
    g = torch.Generator().manual_seed(21)
    pos = [[torch.randn(1, TXT, 32, generator=g), SAMPLE_CONDS[family](g)]]
    lat = torch.randn((1,) + tuple(t.x.shape[1:]), generator=g)
    words = [WordSpec("w1", [1]), WordSpec("w2", [3, 4])]
    handle = AttentionMaps(["w1", "w2"])
    cap = DitCaptureController(words, TXT, handle, DitLayerSelector.parse("all"))
    keep = KeepImage()
    raw, refined, frames = segment_maps(attach(t.patcher, keep), pos, lat, cap, handle, 0.6, 1, 0, 1)
    f = 2 if family == "Wan" else 1
    assert frames == f and raw.shape[:2] == (f, 2) and refined.shape == raw.shape
    second = keep.calls[len(keep.calls) // 2:]
    ref = 0
    for c in second:
        ff, gh, gw = c["grid"]
        m = raw.double().view(1, ff, 2, gh, gw).permute(0, 2, 1, 3, 4).reshape(2, ff * gh * gw).T
        o = (_naive_s(c["q"], c["k"])[0] @ m).T.reshape(2, ff, gh, gw).permute(1, 0, 2, 3)
        ref = ref + o
    torch.testing.assert_close(refined.double(), ref / len(second), rtol=1e-4, atol=1e-7)
    assert not torch.allclose(refined, raw)


def test_segment_errors_name_the_input(clip_l):
    model = M.tiny_sd15()
    vae = ShapesWorldVAE()
    image = torch.rand(1, 64, 64, 3)
    with pytest.raises(AttentionControlError, match="words"):
        SegmentWords.execute(model, clip_l, vae, image, PROMPT, "giraffe", 0.1, 1, 0, 1, 0.5, False)
    bad = image.clone()
    bad[0, 3, 3, 0] = float("nan")
    with pytest.raises(ValueError, match="image"):
        SegmentWords.execute(model, clip_l, vae, bad, PROMPT, "circle", 0.1, 1, 0, 1, 0.5, False)
    with pytest.raises(AttentionControlError, match="refine_layers"):
        SegmentWords.execute(model, clip_l, vae, image, PROMPT, "circle", 0.1, 1, 0, 1, 0.5, False, "all", "4096")
    assert "refine_layers" in SegmentWords.validate_inputs(refine_layers="nowhere")
    assert "words" in SegmentWords.validate_inputs(words=" , ")
    assert "noise_level" in SegmentWords.validate_inputs(noise_level=float("nan"))
    assert SegmentWords.validate_inputs(refine_layers="auto", words="circle", noise_level=0.1) is True


def test_segment_refuses_families_without_word_positions():
    from ac_dit import TXT, tiny
    from attention_control.attention.router import attach
    t = tiny("HiDream")
    handle = AttentionMaps(["w1"])
    cap = DitCaptureController([WordSpec("w1", [1])], TXT, handle, DitLayerSelector.parse("all"))
    with pytest.raises(AttentionControlError, match="HiDream"):
        segment_maps(t.patcher, [[torch.zeros(1, TXT, 32), {}]], torch.zeros((1,) + tuple(t.x.shape[1:])), cap,
                     handle, 0.5, 1, 0, 1)


def test_segment_composes_with_other_patches_on_the_model(clip_l):
    """FreeU, PAG (a self-attention replace), LoRA-style weight patches and another attention override of
    the pack (capture) on the MODEL: segmentation runs through them (the maps differ from the plain model's
    where the patch changes the forward) and leaves them working. ToMe merges the finest layers' queries:
    auto refinement there is a named error, other layers and refine 0 work."""
    from comfy_extras import nodes_freelunch, nodes_pag, nodes_tomesd
    from attention_control.nodes.capture import CaptureAttention
    res = lambda out: out.args if hasattr(out, "args") else out
    base = M.tiny_sd15()
    image = torch.rand(1, 128, 128, 3, generator=torch.Generator().manual_seed(2))
    vae = ShapesWorldVAE()

    def seg(model, refine=1, refine_layers="auto"):
        return res(SegmentWords.execute(model, clip_l, vae, image, PROMPT, "circle, square", 0.3, 1, 5, refine,
                                        0.5, True, "all", refine_layers))[2].maps

    plain = seg(base)
    freeu = nodes_freelunch.FreeU_V2().patch(base, 1.3, 1.4, 0.9, 0.2)[0]
    assert not torch.allclose(seg(freeu), plain)
    pag = res(nodes_pag.PerturbedAttentionGuidance.execute(base, 3.0))[0]
    torch.testing.assert_close(seg(pag), plain)          # PAG acts on the uncond-free perturbed pass only
    lora = base.clone()
    dm = lora.model.diffusion_model
    key = next(k for k, _ in dm.named_parameters() if k.endswith("attn1.to_q.weight"))
    w = dict(dm.named_parameters())[key]
    lora.add_patches({f"diffusion_model.{key}": (0.5 * torch.randn_like(w),)}, 1.0)
    assert not torch.allclose(seg(lora), plain)
    cap, handle = res(CaptureAttention.execute(base, clip_l, PROMPT, "red", "all", 0.0, 1.0, False))
    torch.testing.assert_close(seg(cap), plain)
    pos = nodes.CLIPTextEncode().encode(clip_l, PROMPT)[0]
    neg = nodes.CLIPTextEncode().encode(clip_l, "")[0]
    M.ksample(cap, pos, neg, M.latent(1, 16, 16), steps=2)
    # the other override still works: it saw the segmentation's two model calls and then the sampler's run
    assert handle.runs == 3 and handle.maps is not None and handle.fired
    tome = res(nodes_tomesd.TomePatchModel.execute(base, 0.5))[0]
    with pytest.raises(AttentionControlError, match="refine_layers.*ToMe"):
        seg(tome)
    assert torch.isfinite(seg(tome, refine_layers="8")).all()
    assert torch.isfinite(seg(tome, refine=0)).all()
