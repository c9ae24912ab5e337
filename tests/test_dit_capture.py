"""Attention-map capture on DiT models (issue 17): the maps equal a naive float64 softmax over the
whole joint sequence, capture never changes the samples, fires only on the chosen blocks, takes
video frames apart, and refuses a prompt of another length before sampling."""
from __future__ import annotations

import pytest
import torch

from attention_control.attention.capture import AttentionMaps, WordSpec
from attention_control.attention.core import AttentionControlError
from attention_control.attention.dit_capture import DitCaptureController, joint_word_maps
from attention_control.attention.dit_layers import DitLayerSelector
from attention_control.attention.dit_router import WORD_POSITION_FAMILIES, DitController
from attention_control.attention.router import attach
from ac_dit import FAMILIES, SAMPLE_CONDS, TXT, sample, tiny

WORDS = [WordSpec("w1", [1]), WordSpec("w2", [3, 4])]


class Keep(DitController):
    """Installed below the capture: keeps q, k and the mask of every call with text keys."""
    name = "keep"
    streams = frozenset({"joint", "text_cross"})

    def __init__(self, selector=None):
        self.selector = selector
        self.calls = []

    def attend(self, call):
        self.calls.append(dict(q=call.split_heads(call.q).double(), k=call.split_heads(call.k).double(),
                               mask=call.mask, rows=call.cond_rows(), qi=call.q_image, cols=call.key_columns,
                               grid=call.grid, step=call.step, block=call.site.block))
        return None


def naive_maps(calls, words, batch):
    """Mean over calls of the float64 full softmax's word mass at the image queries, mean over heads."""
    total = None
    for c in calls:
        q, k = c["q"][c["rows"]], c["k"][c["rows"]]
        s = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
        p = torch.softmax(s, dim=-1)[:, :, c["qi"]]                    # (R, H, N_img, K)
        m = torch.stack([p[..., c["cols"](w.positions)].sum(-1) for w in words], 1).mean(2)   # (R, W, N_img)
        m = m.view(-1, batch, *m.shape[1:]).mean(0)
        f, h, w = c["grid"]
        m = m.view(batch, len(words), f, h, w).permute(0, 2, 1, 3, 4).reshape(batch * f, len(words), h, w)
        total = m if total is None else total + m
    return total / len(calls)


def _conds(family, g, n=1):
    return [[torch.randn(n, TXT, 32, generator=g), SAMPLE_CONDS.get(family, lambda g: {})(g)]]


def _run(family, selector_text="all", steps=2, batch=1, start=0.0, end=1.0, keep_steps=False):
    t = tiny(family)
    g = torch.Generator().manual_seed(21)
    pos, neg = _conds(family, g), _conds(family, g)
    latent = torch.zeros((batch,) + tuple(t.x.shape[1:]))
    noise = torch.randn(latent.shape, generator=g)
    keep = Keep(DitLayerSelector.parse(selector_text))
    handle = AttentionMaps([w.label for w in WORDS])
    cap = DitCaptureController(WORDS, TXT, handle, DitLayerSelector.parse(selector_text), start, end, keep_steps)
    m = attach(attach(t.patcher, keep), cap)
    out = sample(m, noise, pos, neg, latent, steps=steps)
    ref = sample(t.patcher, noise, pos, neg, latent, steps=steps)
    return out, ref, handle, keep


# families sampled with comfy.sample here (SAMPLE_CONDS); the others through one forward below
@pytest.mark.parametrize("family", tuple(SAMPLE_CONDS))
def test_capture_equals_naive_joint_softmax(family):
    """CFG sampling (cond + uncond rows): capture leaves the samples bit for bit, and its maps equal
    the float64 naive softmax over all text and image keys at the cond rows' image queries."""
    out, ref, handle, keep = _run(family)
    assert torch.equal(out, ref)
    f = 2 if family == "Wan" else 1
    assert handle.maps.shape == (f, 2) + tuple(keep.calls[0]["grid"][1:])
    assert handle.frames == f
    torch.testing.assert_close(handle.maps.double(), naive_maps(keep.calls, WORDS, 1), rtol=1e-4, atol=1e-6)
    assert all(c["rows"] == [c["rows"][0]] for c in keep.calls)          # one cond row of two
    assert (handle.maps >= 0).all() and (handle.maps.sum(1) <= 1 + 1e-5).all()


@pytest.mark.parametrize("family", [f for f in FAMILIES if f not in SAMPLE_CONDS and f in WORD_POSITION_FAMILIES])
def test_capture_on_every_family(family):
    """The remaining families (one model call each, no sampler extras): maps equal the naive ones.
    HiDream has no word positions: the capture refuses it by name (tests/test_dit_router.py)."""
    from ac_dit import forward
    from attention_control.attention.core import Run
    from attention_control.attention.dit_router import DIT_RUN_KEY, get_dit_router
    t = tiny(family)
    keep = Keep()
    handle = AttentionMaps([w.label for w in WORDS])
    cap = DitCaptureController(WORDS, TXT, handle, DitLayerSelector.parse("all"))
    m = attach(attach(t.patcher, keep), cap)
    router = get_dit_router(m)
    run = Run(router, t.x.shape, torch.tensor([0.6, 0.0]))
    router.begin_run(run)
    m.model_options["transformer_options"][DIT_RUN_KEY] = run
    out = forward(m, t.x, t.conds)
    router.end_run(run, True)
    assert torch.equal(out, t.baseline)
    torch.testing.assert_close(handle.maps.double(), naive_maps(keep.calls, WORDS, 1), rtol=1e-4, atol=1e-6)


def test_capture_fires_on_the_chosen_blocks_and_steps():
    _, _, handle, keep = _run("Flux", "single", steps=3, start=0.3, end=1.0, keep_steps=True)
    assert handle.layers == ["single:0", "single:1"]
    assert handle.fired == {"single:0": 2, "single:1": 2}                 # steps 1 and 2 of 3
    assert [s for s, _ in handle.step_maps] == [1, 2]
    kept = [c for c in keep.calls if c["step"] >= 1]
    torch.testing.assert_close(handle.maps.double(), naive_maps(kept, WORDS, 1), rtol=1e-4, atol=1e-6)


def test_capture_batch_of_latents():
    """Two latents per chunk: one map per latent, each from its own rows."""
    _, _, handle, keep = _run("Flux", batch=2)
    assert handle.maps.shape[0] == 2
    torch.testing.assert_close(handle.maps.double(), naive_maps(keep.calls, WORDS, 2), rtol=1e-4, atol=1e-6)
    assert not torch.allclose(handle.maps[0], handle.maps[1])


def test_chunked_word_maps_equal_naive_with_masks():
    """Chunks of any size, bool and additive masks (the host's semantics): the naive float64 answer."""
    g = torch.Generator().manual_seed(4)
    q, k = torch.randn(2, 3, 40, 8, generator=g), torch.randn(2, 3, 40, 8, generator=g)
    cols = [[2], [5, 6, 7]] + [[i] for i in range(10, 20)]         # 12 words: two groups of 8 (head dim)
    rows = slice(10, 40)
    keep = torch.rand(2, 40, 40, generator=g) > 0.3
    keep[..., 0] = True
    add = torch.randn(1, 3, 40, 40, generator=g)
    for mask in (None, keep, add):
        s = q.double() @ k.double().transpose(-1, -2) / 8 ** 0.5
        if mask is not None:
            s = s + (torch.zeros(keep.shape, dtype=torch.float64).masked_fill(~mask, float("-inf")).unsqueeze(1)
                     if mask.dtype == torch.bool else mask.double())
        p = torch.softmax(s, -1)[:, :, rows]
        want = torch.stack([p[..., c].sum(-1) for c in cols], 1).mean(2)
        for budget in (1, 2 * 3 * 40 * 7, 10 ** 9):
            got = joint_word_maps(q, k, rows, cols, mask, chunk_budget=budget)
            torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)


def test_prompt_of_another_length_is_refused_before_sampling():
    t = tiny("Flux")
    g = torch.Generator().manual_seed(2)
    pos, neg = _conds("Flux", g), _conds("Flux", g)
    handle = AttentionMaps(["w"])
    cap = DitCaptureController([WordSpec("w", [1])], TXT + 2, handle, DitLayerSelector.parse("all"))
    calls = []

    class Count(DitController):
        def attend(self, call):
            calls.append(1)

    m = attach(attach(t.patcher, Count()), cap)
    with pytest.raises(AttentionControlError, match=r"prompt: the capture node's prompt has 9 context tokens"):
        sample(m, torch.randn(t.x.shape, generator=g), pos, neg, torch.zeros_like(t.x))
    assert calls == []
    with pytest.raises(AttentionControlError, match="matches no block"):
        attach(t.patcher, DitCaptureController(WORDS, TXT, handle, DitLayerSelector.parse("joint")))


def test_video_frames_map_to_decoded_frames():
    from attention_control.nodes.capture import video_frame_rows
    assert video_frame_rows(1, 3, 9).tolist() == [0, 1, 1, 1, 1, 2, 2, 2, 2]
    assert video_frame_rows(2, 2, 10).tolist() == [0, 1, 1, 1, 1, 2, 3, 3, 3, 3]
    with pytest.raises(ValueError, match="image: 7 frames"):
        video_frame_rows(2, 2, 7)


def test_unet_only_controller_on_a_dit_names_the_dit_nodes():
    """A UNet-only technique on a DiT MODEL: a named error that says it is a DiT and which nodes work."""
    from attention_control.attention.core import Controller, UnsupportedModelError

    class UnetOnly(Controller):
        name = "unet only"

    with pytest.raises(UnsupportedModelError, match=r"model: Flux is a transformer \(DiT\) model.*capture"):
        attach(tiny("Flux").patcher, UnetOnly())


def test_capture_node_on_flux_with_its_t5_tokenizer():
    """The capture node on a Flux MODEL with Flux's real CLIP (T5 tokenizer, weights on meta): the
    words' T5 positions in the 256-row context pick the key columns of the maps."""
    from test_dit_tokens import BUILDERS
    from attention_control.nodes.capture import CaptureAttention
    t = tiny("Flux")
    clip = BUILDERS["Flux"](None)
    prompt = "a red circle and a blue square"
    model, handle = CaptureAttention.execute(t.patcher, clip, prompt, "red, blue square", "all", 0.0, 1.0,
                                             False).args
    keep = Keep()
    g = torch.Generator().manual_seed(8)
    pos = [[torch.randn(1, 256, 32, generator=g), SAMPLE_CONDS["Flux"](g)]]
    noise = torch.randn(t.x.shape, generator=g)
    # the Keep recorder goes below the capture: attach it to the node's MODEL's router first
    from attention_control.attention.dit_router import DIT_ROUTER_KEY, DitRouter, get_dit_router
    r = get_dit_router(model)
    m = model.clone()
    m.model_options["transformer_options"][DIT_ROUTER_KEY] = DitRouter(r.family, r.schedule,
                                                                      (keep,) + r.controllers, r.dm)
    sample(m, noise, pos, pos, torch.zeros_like(t.x), steps=2, cfg=1.0)
    words = [WordSpec("red", [2]), WordSpec("blue square", [7, 8])]        # T5: ▁ a ▁red ▁circle ▁and ▁ a ▁blue ▁square
    torch.testing.assert_close(handle.maps.double(), naive_maps(keep.calls, words, 1), rtol=1e-4, atol=1e-6)
    with pytest.raises(AttentionControlError, match=r"prompt: the capture node's prompt has 256 context tokens"):
        sample(model, noise, [[pos[0][0][:, :77], pos[0][1]]], pos, torch.zeros_like(t.x), steps=1, cfg=1.0)
