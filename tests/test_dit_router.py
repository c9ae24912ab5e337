"""DiT half of the attention router (issue 17, router foundation): tiny random DiT models of each
family on the real ComfyUI 0.3.75 classes, one forward each through `BaseModel.apply_model` with
transformer_options built as the sampler builds them (calc_cond_batch / prepare_model_patcher)."""
from __future__ import annotations

import logging

import pytest
import torch

import comfy.model_management
import comfy.model_patcher
import comfy.patcher_extension
import comfy.sample
import comfy.supported_models

from attention_control.attention.core import AttentionControlError, UnsupportedModelError
from attention_control.attention.dit_router import (DIT_ROUTER_KEY, DitController, DitOverride, SUPPORTED_DIT_FAMILIES,
                                                    WORD_POSITION_FAMILIES, attach_dit, detect_family,
                                                    get_dit_router)
from ac_dit import CONFIGS, FAMILIES, LLAMA, LLAMA_LAYERS, SAMPLE_CONDS, TXT, Tiny, build, forward, sample

# (block_type, block_index, stream) of each call, in order, and where the ids come from
EXPECTED = {
    "Flux": ([("double", 0, "joint"), ("double", 1, "joint"), ("single", 0, "joint"), ("single", 1, "joint")],
             "options"),
    "Flux.2": ([("double", 0, "joint"), ("single", 0, "joint"), ("single", 1, "joint")], "options"),
    "Chroma": ([("double", 0, "joint"), ("single", 0, "joint"), ("single", 1, "joint")], "options"),
    "SD3": ([("joint", 0, "joint"), ("joint", 1, "joint")], "counter"),
    "Wan": ([("block", 0, "image_self"), ("block", 0, "text_cross"), ("block", 1, "image_self"),
             ("block", 1, "text_cross")], "counter"),
    "Qwen-Image": ([("double", 0, "joint"), ("double", 1, "joint")], "options"),
    "Lumina 2": ([("context_refiner", 0, "text_refiner"), ("noise_refiner", 0, "image_refiner"),
                  ("layer", 0, "joint"), ("layer", 1, "joint")], "counter"),
}
EXPECTED["Z-Image"] = EXPECTED["Lumina 2"]
# HunyuanVideo: the text token refiner's two self-attentions over the context come first (block ids from
# the call counter: the forward sets none before its blocks), then the double and single blocks
EXPECTED["HunyuanVideo"] = ([("context_refiner", 0, "text_refiner"), ("context_refiner", 1, "text_refiner"),
                             ("double", 0, "joint"), ("single", 0, "joint"), ("single", 1, "joint")], "options")
EXPECTED["HunyuanVideo 1.5"] = EXPECTED["HunyuanImage 2.1"] = EXPECTED["HunyuanVideo"]
EXPECTED["HiDream"] = ([("double", 0, "joint"), ("single", 0, "joint"), ("single", 1, "joint")], "counter")
REFINERS = ("context_refiner", "noise_refiner")          # ids always from the counter
assert set(EXPECTED) == set(FAMILIES)
# image token grid of these inputs: 8 x 8 (Wan, HunyuanVideo, HunyuanVideo 1.5: 2 frames x 4 x 4)
GRID = {f: (2, 4, 4) if f in ("Wan", "HunyuanVideo", "HunyuanVideo 1.5") else (1, 8, 8) for f in FAMILIES}
IMAGE_FIRST = ("HunyuanVideo", "HunyuanVideo 1.5", "HunyuanImage 2.1", "HiDream")
# text tokens of a joint sequence: the context; HiDream: T5 context + the last Llama layer + the block's layer
TEXT = {f: TXT + 2 * LLAMA if f == "HiDream" else TXT for f in FAMILIES}
LAYOUT = {"Flux": "bhnd", "Flux.2": "bhnd", "Chroma": "bhnd", "SD3": "bnc", "Wan": "bnc", "Qwen-Image": "bhnd", "Lumina 2": "bhnd",
          "Z-Image": "bhnd", "HunyuanVideo": "bhnd", "HunyuanVideo 1.5": "bhnd", "HunyuanImage 2.1": "bhnd",
          "HiDream": "bnc"}
# extras of positive / negative conditioning for comfy.sample per family (SAMPLE_CONDS plus families the
# capture tests do not sample)
CFG_CONDS = dict(SAMPLE_CONDS, **{
    "HunyuanVideo": lambda g: {"pooled_output": torch.randn(1, 16, generator=g)},
    "HiDream": lambda g: {"pooled_output": torch.randn(1, 32, generator=g),
                          "conditioning_llama3": torch.randn(1, LLAMA_LAYERS, LLAMA, 32, generator=g)},
})


def n_image(family):
    f, h, w = GRID[family]
    return f * h * w


def tokens(family, stream):
    """(query tokens, key tokens) of a stream's calls in these inputs."""
    n = n_image(family)
    return {"joint": (TEXT[family] + n, TEXT[family] + n), "image_self": (n, n), "text_cross": (n, TXT),
            "text_refiner": (TXT, TXT), "image_refiner": (n, n)}[stream]


@pytest.fixture(scope="module", params=FAMILIES)
def tiny(request):
    return Tiny(request.param)


class Recorder(DitController):
    """Records the site and q/k/v shapes of each call; never acts."""
    name = "recorder"

    def __init__(self):
        self.seen = []

    def attend(self, call):
        self.seen.append((call.site, tuple(call.q.shape), tuple(call.k.shape), call.cond_or_uncond))
        return None


class Naive(DitController):
    """Computes attention itself in float64 from the call's tensors (layout helpers) where it can."""
    name = "naive"

    def __init__(self):
        self.acted = 0

    def attend(self, call):
        if call.mask is not None:
            return None
        q, k, v = (call.split_heads(t).double() for t in (call.q, call.k, call.v))
        p = torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1)
        self.acted += 1
        return call.merge_heads(p @ v).to(call.q.dtype)


class Scale(DitController):
    """Takes the calls of one block type and returns twice the default."""
    name = "scale"

    def __init__(self, block_type):
        self.block_type = block_type

    def wants(self, site):
        return site.block_type == self.block_type

    def attend(self, call):
        return call.default() * 2.0


def foreign_override(counter: list, prev=None, scale=0.5):
    """Another pack's override: halves the attention output and counts its calls; chains `prev`."""
    def ov(func, *args, **kwargs):
        counter.append(1)
        out = prev(func, *args, **kwargs) if prev is not None else func(*args, **kwargs)
        return out * scale
    return ov


def with_foreign(patcher, counter, scale=0.5):
    """Clone with a foreign override in model_options (chaining whatever was there at node time)."""
    m = patcher.clone()
    to = m.model_options.setdefault("transformer_options", {})
    to["optimized_attention_override"] = foreign_override(counter, to.get("optimized_attention_override"), scale)
    return m


# --------------------------------------------------------------------------------------------

def test_family_detected(tiny):
    assert detect_family(tiny.patcher) == tiny.family
    assert get_dit_router(attach_dit(tiny.patcher)).family == tiny.family
    assert get_dit_router(tiny.patcher) is None          # the input MODEL is untouched


def test_router_alone_is_bit_exact(tiny):
    """Installed, no controller, and with a controller that passes on every call: the unpatched output."""
    assert torch.equal(forward(attach_dit(tiny.patcher), tiny.x, tiny.conds), tiny.baseline)
    rec = Recorder()
    assert torch.equal(forward(attach_dit(tiny.patcher, rec), tiny.x, tiny.conds), tiny.baseline)
    assert rec.seen


def test_sites_per_family(tiny):
    """Every attention call of one forward reaches the controller, with its family's block ids,
    stream, heads, layout and token counts; the counter restarts at each model call."""
    rec = Recorder()
    m = attach_dit(tiny.patcher, rec)
    forward(m, tiny.x, tiny.conds)
    forward(m, tiny.x, tiny.conds)
    blocks, ids_from = EXPECTED[tiny.family]
    n = len(blocks)
    assert len(rec.seen) == 2 * n
    assert [s.call_index for s, *_ in rec.seen] == list(range(n)) * 2
    for i, (site, qs, ks, cou) in enumerate(rec.seen):
        assert (site.block_type, site.block_index, site.stream) == blocks[i % n], (i, site)
        assert site.family == tiny.family
        assert site.ids_from == ("counter" if site.block_type in REFINERS else ids_from), site
        assert site.heads == 2 and site.layout == LAYOUT[tiny.family]
        nq, nk = tokens(tiny.family, site.stream)
        tok_dim = 2 if site.layout == "bhnd" else 1
        assert (qs[tok_dim], ks[tok_dim]) == (nq, nk), (site, qs, ks)
        assert cou == [0]


def test_controller_output_is_used(tiny):
    """A controller's output replaces the call's attention: a float64 naive attention from the layout
    helpers matches the host's, and doubling one block type changes the output."""
    naive = Naive()
    out = forward(attach_dit(tiny.patcher, naive), tiny.x, tiny.conds)
    assert naive.acted == len(EXPECTED[tiny.family][0])
    torch.testing.assert_close(out, tiny.baseline, rtol=1e-4, atol=1e-4)
    btype = EXPECTED[tiny.family][0][-1][0]
    assert not torch.equal(forward(attach_dit(tiny.patcher, Scale(btype)), tiny.x, tiny.conds), tiny.baseline)


def test_default_on_other_tensors(tiny):
    """call.default(v=...) runs the default attention on the tensors given: attention is linear in v,
    so doubling v on one block type gives the same output as doubling that block's attention."""
    btype = EXPECTED[tiny.family][0][-1][0]

    class DoubleV(Scale):
        def attend(self, call):
            return call.default(v=call.v * 2.0)

    torch.testing.assert_close(forward(attach_dit(tiny.patcher, DoubleV(btype)), tiny.x, tiny.conds),
                               forward(attach_dit(tiny.patcher, Scale(btype)), tiny.x, tiny.conds))


def test_last_added_controller_is_asked_first(tiny):
    """Stacking: the controller added last answers first; a passing one hands the call on."""
    btype = EXPECTED[tiny.family][0][0][0]
    rec = Recorder()
    m = attach_dit(attach_dit(tiny.patcher, Scale(btype)), rec)
    assert len(get_dit_router(m).controllers) == 2
    doubled = forward(attach_dit(tiny.patcher, Scale(btype)), tiny.x, tiny.conds)
    assert torch.equal(forward(m, tiny.x, tiny.conds), doubled)
    assert len(rec.seen) == len(EXPECTED[tiny.family][0])     # the recorder (on top) saw every call


@pytest.mark.parametrize("order", ["foreign_first", "router_first"])
def test_foreign_override_keeps_running(tiny, order):
    """Another pack's override in model_options, set before or after attach_dit (chaining the slot's
    value at node time, as a well-behaved pack does): it runs on every call inside ours and its effect
    is kept bit for bit, while our controller still sees every call."""
    n = len(EXPECTED[tiny.family][0])
    alone = []
    ref = forward(with_foreign(tiny.patcher, alone), tiny.x, tiny.conds)
    assert len(alone) == n and not torch.equal(ref, tiny.baseline)
    counter, rec = [], Recorder()
    if order == "foreign_first":
        m = attach_dit(with_foreign(tiny.patcher, counter), rec)
    else:
        m = with_foreign(attach_dit(tiny.patcher, rec), counter)
    out = forward(m, tiny.x, tiny.conds)
    assert len(counter) == n and len(rec.seen) == n
    assert torch.equal(out, ref)


def test_foreign_override_replacing_slot_after_us(tiny):
    """A pack that overwrites the slot in model_options after attach_dit (no chaining) does not remove
    ours: ours lives only in each model call's options, so both run."""
    counter, rec = [], Recorder()
    m = attach_dit(tiny.patcher, rec).clone()
    m.model_options["transformer_options"]["optimized_attention_override"] = foreign_override(counter)
    forward(m, tiny.x, tiny.conds)
    n = len(EXPECTED[tiny.family][0])
    assert len(counter) == n and len(rec.seen) == n


@pytest.mark.parametrize("order", ["wrapper_after_us", "wrapper_before_us"])
def test_per_call_override_from_a_wrapper(tiny, order):
    """A pack that sets the slot per model call from an APPLY_MODEL wrapper, chaining the value it
    finds. Added after attach_dit its wrapper runs inside ours and wraps our override; added before,
    it runs outside and ours wraps its override. Either way both run and its effect is kept."""
    n = len(EXPECTED[tiny.family][0])
    counter, rec, found = [], Recorder(), []

    def wrapper(executor, x, t, c_concat=None, c_crossattn=None, control=None, transformer_options={}, **kw):
        to = dict(transformer_options)
        found.append(to.get("optimized_attention_override"))
        to["optimized_attention_override"] = foreign_override(counter, found[-1])
        return executor(x, t, c_concat, c_crossattn, control, to, **kw)

    def add_wrapper(m):
        m = m.clone()
        m.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, "other_pack", wrapper)
        return m

    if order == "wrapper_after_us":
        m = add_wrapper(attach_dit(tiny.patcher, rec))
    else:
        m = attach_dit(add_wrapper(tiny.patcher), rec)
    out = forward(m, tiny.x, tiny.conds)
    ref = forward(with_foreign(tiny.patcher, []), tiny.x, tiny.conds)
    assert isinstance(found[0], DitOverride) == (order == "wrapper_after_us")
    assert len(counter) == n and len(rec.seen) == n
    assert torch.equal(out, ref)


def test_router_in_model_options_is_shared_not_copied(tiny):
    rec = Recorder()
    m = attach_dit(tiny.patcher, rec)
    c = m.clone()
    assert c.model_options["transformer_options"][DIT_ROUTER_KEY] is m.model_options["transformer_options"][DIT_ROUTER_KEY]
    assert get_dit_router(c).controllers[0] is rec
    assert "optimized_attention_override" not in c.model_options["transformer_options"]


def test_unsupported_model_named_error(sd15):
    with pytest.raises(UnsupportedModelError) as e:
        attach_dit(sd15, Recorder())
    msg = str(e.value)
    assert isinstance(e.value, AttentionControlError)
    assert "UNetModel" in msg and "SD15" in msg
    for fam in SUPPORTED_DIT_FAMILIES:
        assert fam in msg


def test_overwriting_override_inside_ours_is_logged(tiny, caplog):
    """A pack that overwrites the slot per model call inside ours (no chaining) silences our
    controllers for that call; the router says so once."""
    counter, rec = [], Recorder()

    def wrapper(executor, x, t, c_concat=None, c_crossattn=None, control=None, transformer_options={}, **kw):
        to = dict(transformer_options)
        to["optimized_attention_override"] = foreign_override(counter)
        return executor(x, t, c_concat, c_crossattn, control, to, **kw)

    m = attach_dit(tiny.patcher, rec)
    m.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, "other_pack", wrapper)
    with caplog.at_level(logging.WARNING, logger="attention_control"):
        forward(m, tiny.x, tiny.conds)
        forward(m, tiny.x, tiny.conds)
    assert rec.seen == [] and len(counter) == 2 * len(EXPECTED[tiny.family][0])
    assert sum("saw no attention call" in r.getMessage() for r in caplog.records) == 1


def test_sd35_image_self_attention_in_schedule():
    """SD3.5 medium (MMDiT-X) blocks add an image-only self-attention after the joint one."""
    t = Tiny("SD3", x_block_self_attn_layers=[0])
    rec = Recorder()
    assert torch.equal(forward(attach_dit(t.patcher, rec), t.x, t.conds), t.baseline)
    assert [(s.block_type, s.block_index, s.stream) for s, *_ in rec.seen] == [
        ("joint", 0, "joint"), ("joint", 0, "image_self"), ("joint", 1, "joint")]
    assert [q[1] for _, q, *_ in rec.seen] == [TXT + 64, 64, TXT + 64]


def test_stale_block_ids_in_options_do_not_name_counted_calls(tiny):
    """Block ids a caller left in transformer_options (here in the MODEL's options, so every model
    call's copy starts with them): calls the forward makes before it sets its own ids (HunyuanVideo's
    token refiner) still get their ids from the counter, in the first model call and the next."""
    m = attach_dit(tiny.patcher, Recorder()).clone()
    m.model_options["transformer_options"].update(block_type="single", block_index=7)
    rec = get_dit_router(m).controllers[0]
    for _ in range(2):
        assert torch.equal(forward(m, tiny.x, tiny.conds), tiny.baseline)
    blocks = EXPECTED[tiny.family][0]
    assert [(s.block_type, s.block_index, s.stream) for s, *_ in rec.seen] == blocks * 2


@pytest.mark.parametrize("family", tuple(CFG_CONDS))
def test_sampling_with_cfg(family):
    """A real KSampler run with cfg > 1 (uncond and cond batched in one model call): the router with a
    passing controller leaves the samples bit for bit, and sees each step's calls with the batch
    layout of the call."""
    t = Tiny(family)
    g = torch.Generator().manual_seed(11)
    pos = [[torch.randn(1, TXT, 32, generator=g), CFG_CONDS[family](g)]]
    neg = [[torch.randn(1, TXT, 32, generator=g), CFG_CONDS[family](g)]]
    latent = torch.zeros_like(t.x)
    noise = torch.randn(t.x.shape, generator=g)

    def sample(m):
        with torch.inference_mode():
            return comfy.sample.sample(m, noise, 2, 2.5, "euler", "simple", pos, neg, latent, disable_pbar=True,
                                       seed=11)

    ref = sample(t.patcher)
    assert torch.isfinite(ref).all()
    rec = Recorder()
    assert torch.equal(sample(attach_dit(t.patcher, rec)), ref)
    blocks = EXPECTED[family][0]
    assert len(rec.seen) == 2 * len(blocks)
    for i, (site, qs, ks, cou) in enumerate(rec.seen):
        assert (site.block_type, site.block_index, site.stream) == blocks[i % len(blocks)]
        assert sorted(cou) == [0, 1] and qs[0] == 2


def test_wan_i2v_clip_image_cross_in_schedule():
    """Wan 2.1 i2v blocks attend to the 257 CLIP image tokens, then to the text, after self-attention."""
    patcher = build("WAN21_I2V", dict(CONFIGS["Wan"][1], model_type="i2v", in_dim=36))
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 16, 2, 8, 8, generator=g)
    conds = dict(c_crossattn=torch.randn(1, TXT, 32, generator=g), c_concat=torch.randn(1, 20, 2, 8, 8, generator=g),
                 clip_fea=torch.randn(1, 257, 1280, generator=g))
    rec = Recorder()
    assert detect_family(patcher) == "Wan"
    assert torch.equal(forward(attach_dit(patcher, rec), x, conds), forward(patcher, x, conds))
    assert [(s.block_type, s.block_index, s.stream, k[1]) for s, _, k, _ in rec.seen] == [
        (b, i, st, n) for i in range(2)
        for b, st, n in (("block", "image_self", 32), ("block", "clip_image_cross", 257), ("block", "text_cross", TXT))]


# --------------------------------------------------------------------------------------------
# where the tokens are, the batch layout, the sampling run

class Where(DitController):
    """Records each call's token slices, grid, batch layout, step and sigma, and its keys."""
    name = "where"

    def __init__(self, **kw):
        self.seen = []
        self.runs = []
        for k, v in kw.items():
            setattr(self, k, v)

    def begin_run(self, run):
        self.runs.append(["begin", run.n_steps, run.latent_shape])

    def end_run(self, run, ok):
        self.runs.append(["end", ok])

    def attend(self, call):
        cols = None               # key columns of context positions 0 and 3, where the call has word keys
        st = call.site.stream
        if call.k_text is not None and st != "text_refiner" and call.site.family in WORD_POSITION_FAMILIES:
            cols = call.key_columns([0, 3])
        self.seen.append(dict(site=call.site, q_text=call.q_text, q_image=call.q_image, k_text=call.k_text,
                              k_image=call.k_image, grid=call.grid, batch=call.batch, cou=call.cond_or_uncond,
                              step=call.step, sigma=call.sigma, run=call.run, k=call.split_heads(call.k).clone(),
                              cols=cols))
        return None


def test_token_slices_per_family(tiny):
    """Joint sequences: text tokens first, then the image tokens of the latent's grid (image first,
    then text, in HunyuanVideo and HiDream); image-only and text-only streams hold one kind; Wan's
    cross-attention keys are the text; key_columns maps context positions into the text slice."""
    w = Where()
    m = attach_dit(tiny.patcher, w)
    forward(m, tiny.x, tiny.conds)
    n_img, n_txt = n_image(tiny.family), TEXT[tiny.family]
    words = get_dit_router(m).word_positions_supported
    assert words == (tiny.family != "HiDream") and words == (tiny.family in WORD_POSITION_FAMILIES)
    for s in w.seen:
        st = s["site"].stream
        assert s["grid"] == GRID[tiny.family] and s["batch"] == 1
        if st == "joint":
            if tiny.family in IMAGE_FIRST:
                text, image = slice(n_img, n_img + n_txt), slice(0, n_img)
            else:
                text, image = slice(0, n_txt), slice(n_txt, n_txt + n_img)
            assert (s["q_text"], s["q_image"], s["k_text"], s["k_image"]) == (text, image, text, image)
            assert s["cols"] == ([text.start, text.start + 3] if words else None)
        elif st in ("image_self", "image_refiner"):
            assert (s["q_text"], s["q_image"], s["k_text"], s["k_image"]) == (None, slice(0, n_img), None,
                                                                            slice(0, n_img))
        elif st == "text_cross":
            assert (s["q_text"], s["q_image"], s["k_text"], s["k_image"]) == (None, slice(0, n_img),
                                                                            slice(0, TXT), None)
            assert s["cols"] == [0, 3]
        else:
            assert st == "text_refiner" and (s["q_text"], s["q_image"]) == (slice(0, TXT), None)


def test_text_slice_holds_the_text(tiny):
    """In the first joint block (or Wan's first cross-attention) the text keys depend on the context
    only: another latent changes the image keys and leaves the text keys bit for bit."""
    first = {}
    for x in (tiny.x, tiny.x + 1.0):
        w = Where()
        forward(attach_dit(tiny.patcher, w), x, tiny.conds)
        s = next(s for s in w.seen if s["site"].stream in ("joint", "text_cross"))
        first.setdefault("k", []).append((s["k"][:, :, s["k_text"]], s["k"][:, :, s["k_image"]]
                                          if s["k_image"] is not None else None))
    (t0, i0), (t1, i1) = first["k"]
    assert torch.equal(t0, t1)
    if i0 is not None:
        assert not torch.equal(i0, i1)


def test_padded_and_registered_text():
    """Z-Image pads the caption to a multiple of 32 tokens (real checkpoints' config) and SD3 may put
    register tokens before the context: the slices follow, and key_columns maps context positions."""
    t = Tiny("Z-Image", pad_tokens_multiple=32)
    w = Where()
    assert torch.equal(forward(attach_dit(t.patcher, w), t.x, t.conds), t.baseline)
    joint = [s for s in w.seen if s["site"].stream == "joint"]
    assert joint and all((s["q_text"], s["q_image"]) == (slice(0, 32), slice(32, 96)) for s in joint)

    class Cols(Where):
        def attend(self, call):
            self.seen.append(call.key_columns([0, 3]))

    t = Tiny("SD3", register_length=2)
    c = Cols()
    forward(attach_dit(t.patcher, c), t.x, t.conds)
    assert c.seen == [[2, 5], [2, 5]]


def test_reference_image_tokens_are_not_the_image():
    """Flux Kontext appends the reference latents' tokens after the image: the image slice stays the
    sampled latent's grid."""
    t = Tiny("Flux")
    w = Where()
    forward(attach_dit(t.patcher, w), t.x, dict(t.conds, ref_latents=[torch.randn(1, 16, 8, 8)]))
    assert all(s["q_image"] == slice(TXT, TXT + 64) and s["k_image"] == slice(TXT, TXT + 64) for s in w.seen)


def test_sampling_run_lifecycle():
    """Inside a sampling run each call knows its step and sigma and the batch layout (cond and
    uncond chunks, two latents per chunk); begin_run / end_run frame the run; no run leaks out."""
    t = Tiny("Flux")
    g = torch.Generator().manual_seed(3)
    pos = [[torch.randn(1, TXT, 32, generator=g), SAMPLE_CONDS["Flux"](g)]]
    neg = [[torch.randn(1, TXT, 32, generator=g), SAMPLE_CONDS["Flux"](g)]]
    latent = torch.zeros(2, 16, 16, 16)
    noise = torch.randn(latent.shape, generator=g)
    w = Where()
    m = attach_dit(t.patcher, w)
    ref = sample(t.patcher, noise, pos, neg, latent, steps=3)
    assert torch.equal(sample(m, noise, pos, neg, latent, steps=3), ref)
    assert w.runs == [["begin", 3, (2, 16, 16, 16)], ["end", True]]
    per_call = len(EXPECTED["Flux"][0])
    assert len(w.seen) == 3 * per_call
    assert [s["step"] for s in w.seen] == [i for i in range(3) for _ in range(per_call)]
    sig = [s["sigma"] for s in w.seen[::per_call]]
    assert sig[0] > sig[1] > sig[2] > 0
    assert all(s["batch"] == 2 and sorted(s["cou"]) == [0, 1] and s["run"] is not None for s in w.seen)
    w.seen.clear()
    forward(m, t.x, t.conds)                      # a model call outside any run
    assert w.seen and all(s["run"] is None and s["step"] == 0 for s in w.seen)


def test_layer_selection_on_controllers():
    """A controller's DitLayerSelector picks its blocks (depth fractions over the main blocks); a
    choice that matches nothing fails at attach time, listing the model's blocks."""
    from attention_control.attention.dit_layers import DitLayerSelector
    t = Tiny("Flux")
    for text, want in (("single", [("single", 0), ("single", 1)]), ("double:1", [("double", 1)]),
                       ("0.5-1.0", [("single", 0), ("single", 1)]), ("all", None)):
        w = Where(selector=DitLayerSelector.parse(text))
        forward(attach_dit(t.patcher, w), t.x, t.conds)
        got = [s["site"].block for s in w.seen]
        assert got == (want or [(b, i) for b, i, _ in EXPECTED["Flux"][0]]), text
    with pytest.raises(AttentionControlError, match=r"double:0-1, single:0-1"):
        attach_dit(t.patcher, Where(selector=DitLayerSelector.parse("double:5-9")))
    z = Tiny("Lumina 2")
    w = Where(selector=DitLayerSelector.parse("refiner"))
    forward(attach_dit(z.patcher, w), z.x, z.conds)
    assert [s["site"].stream for s in w.seen] == ["text_refiner", "image_refiner"]


# --------------------------------------------------------------------------------------------
# image-first families: HunyuanVideo (v1, 1.5, HunyuanImage 2.1) and HiDream

def test_hunyuan_extra_text_tokens_leave_only_the_image_located():
    """HunyuanVideo 1.5's vision states (clip_fea) join the text of the joint sequence: its image
    slice stays, its text slice is withheld (the context no longer spans the text); the refiner,
    which runs on the context alone, keeps its text. A reference latent (ref_latent) goes before the
    image: that model call has no geometry. A config of another class on 1.5 weights (cond-type
    embeddings) is still named HunyuanVideo 1.5."""
    t = Tiny("HunyuanVideo 1.5")
    conds = dict(t.conds, clip_fea=torch.randn(1, 3, 16, generator=torch.Generator().manual_seed(2)))
    w = Where()
    out = forward(attach_dit(t.patcher, w), t.x, conds)
    assert torch.equal(out, forward(t.patcher, t.x, conds))
    joint = [s for s in w.seen if s["site"].stream == "joint"]
    assert len(joint) == 3 and all(s["q_image"] == slice(0, 32) and s["q_text"] is None and s["k_text"] is None
                                   for s in joint)
    assert all(s["q_text"] == slice(0, TXT) for s in w.seen if s["site"].stream == "text_refiner")

    t = Tiny("HunyuanVideo")
    w = Where()
    forward(attach_dit(t.patcher, w), t.x, dict(t.conds, ref_latent=torch.randn(1, 16, 1, 8, 8)))
    assert w.seen and all(s["grid"] is None and s["q_image"] is None and s["k_text"] is None for s in w.seen)

    other = build("HunyuanVideo", CONFIGS["HunyuanVideo 1.5"][1])
    assert detect_family(other) == "HunyuanVideo 1.5"


def test_hidream_text_is_t5_then_llama():
    """HiDream's text slice: the T5 context first (its keys depend on the context, not on the Llama
    states), then the Llama layers' tokens. HiDream E1's edit image (image_cond) widens the image
    rows: that model call has no geometry."""
    t = Tiny("HiDream")
    keys = []
    g = torch.Generator().manual_seed(8)
    for llama in (t.conds["encoder_hidden_states_llama3"], torch.randn(1, LLAMA_LAYERS, LLAMA, 32, generator=g)):
        w = Where()
        forward(attach_dit(t.patcher, w), t.x, dict(t.conds, encoder_hidden_states_llama3=llama))
        s = w.seen[0]
        assert s["k_text"] == slice(64, 64 + TXT + 2 * LLAMA)
        keys.append(s["k"][:, :, s["k_text"]])
    assert torch.equal(keys[0][:, :, :TXT], keys[1][:, :, :TXT])
    assert not torch.equal(keys[0][:, :, TXT:], keys[1][:, :, TXT:])
    w = Where()
    forward(attach_dit(t.patcher, w), t.x, dict(t.conds, image_cond=torch.randn(1, 16, 16, 16)))
    assert w.seen and all(s["grid"] is None and s["q_image"] is None for s in w.seen)


def test_hidream_word_positions_are_refused_by_name():
    """HiDream has no word positions: key_columns and the capture controller's begin_run raise a
    named error that says why and lists the families that have them."""
    from attention_control.attention.capture import AttentionMaps, WordSpec
    from attention_control.attention.core import Run
    from attention_control.attention.dit_capture import DitCaptureController
    from attention_control.attention.dit_layers import DitLayerSelector
    t = Tiny("HiDream")

    class Cols(DitController):
        def attend(self, call):
            call.key_columns([0])

    with pytest.raises(UnsupportedModelError, match="HiDream has none: every block's text keys are the T5"):
        forward(attach_dit(t.patcher, Cols()), t.x, t.conds)
    cap = DitCaptureController([WordSpec("w", [1])], TXT, AttentionMaps(["w"]), DitLayerSelector.parse("all"))
    router = get_dit_router(attach_dit(t.patcher, cap))
    assert not router.word_positions_supported
    with pytest.raises(UnsupportedModelError) as e:
        router.begin_run(Run(router, t.x.shape, torch.tensor([0.6, 0.0])))
    msg = str(e.value)
    assert msg.startswith("model: the capture node needs the key columns of the prompt's words, and HiDream")
    assert "HiDream" not in WORD_POSITION_FAMILIES
    assert all(f in msg for f in WORD_POSITION_FAMILIES)
