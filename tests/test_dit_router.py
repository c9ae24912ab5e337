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
                                                    attach_dit, detect_family, get_dit_router)
from devtools.tiny_checkpoint import _fill_random

# DESIGN.md section 8 configs
CONFIGS = {
    "Flux": ("Flux", dict(
        image_model="flux", in_channels=16, out_channels=16, vec_in_dim=16, context_in_dim=32, hidden_size=64,
        mlp_ratio=2.0, num_heads=2, depth=2, depth_single_blocks=2, axes_dim=[8, 12, 12], theta=10000, patch_size=2,
        qkv_bias=True, guidance_embed=True)),
    "Flux.2": ("Flux2", dict(
        image_model="flux2", in_channels=128, out_channels=128, vec_in_dim=None, context_in_dim=32, hidden_size=64,
        mlp_ratio=3.0, num_heads=2, depth=1, depth_single_blocks=2, axes_dim=[8, 8, 8, 8], theta=2000, patch_size=1,
        qkv_bias=False, guidance_embed=True, global_modulation=True, mlp_silu_act=True, ops_bias=False,
        default_ref_method="index", ref_index_scale=10.0)),
    "Chroma": ("Chroma", dict(
        image_model="chroma", in_channels=64, out_channels=64, context_in_dim=32, hidden_size=64, mlp_ratio=2.0,
        num_heads=2, depth=1, depth_single_blocks=2, axes_dim=[8, 12, 12], theta=10000, patch_size=2, qkv_bias=True,
        in_dim=64, out_dim=64, hidden_dim=32, n_layers=1)),
    "SD3": ("SD3", dict(
        in_channels=16, out_channels=16, patch_size=2, depth=2, adm_in_channels=32, pos_embed_scaling_factor=None,
        pos_embed_max_size=16, context_embedder_config={"target": "torch.nn.Linear",
                                                        "params": {"in_features": 32, "out_features": 128}},
        num_patches=256, qk_norm=None)),
    "Wan": ("WAN21_T2V", dict(
        image_model="wan2.1", model_type="t2v", dim=64, ffn_dim=128, num_heads=2, num_layers=2, in_dim=16,
        out_dim=16, text_dim=32, freq_dim=256, patch_size=(1, 2, 2), window_size=(-1, -1), qk_norm=True,
        cross_attn_norm=True, eps=1e-6)),
    "Qwen-Image": ("QwenImage", dict(
        image_model="qwen_image", in_channels=64, out_channels=16, num_layers=2, attention_head_dim=32,
        num_attention_heads=2, joint_attention_dim=32, axes_dims_rope=(8, 12, 12))),
    "Lumina 2": ("Lumina2", dict(
        image_model="lumina2", patch_size=2, in_channels=16, dim=64, n_layers=2, n_refiner_layers=1, n_heads=2,
        n_kv_heads=2, cap_feat_dim=32, qk_norm=True, axes_dims=[8, 12, 12], axes_lens=[300, 64, 64],
        multiple_of=16)),
}
CONFIGS["Z-Image"] = ("ZImage", dict(CONFIGS["Lumina 2"][1], rope_theta=256.0, ffn_dim_multiplier=8 / 3,
                                     z_image_modulation=True, time_scale=1000.0, dim=256, axes_dims=[32, 48, 48]))

TXT = 7    # text tokens of every test context


def _inputs(family: str, g: torch.Generator) -> tuple[torch.Tensor, dict]:
    """(latent x, extra conds as the model's extra_conds would give them) per family."""
    ctx = torch.randn(1, TXT, 32, generator=g)
    if family == "Flux":
        return torch.randn(1, 16, 16, 16, generator=g), dict(c_crossattn=ctx, y=torch.randn(1, 16, generator=g),
                                                            guidance=torch.tensor([3.5]))
    if family == "Flux.2":
        return torch.randn(1, 128, 8, 8, generator=g), dict(c_crossattn=ctx, guidance=torch.tensor([3.5]))
    if family == "Chroma":
        return torch.randn(1, 16, 16, 16, generator=g), dict(c_crossattn=ctx, guidance=torch.tensor([0.0]))
    if family == "SD3":
        return torch.randn(1, 16, 16, 16, generator=g), dict(c_crossattn=ctx, y=torch.randn(1, 32, generator=g))
    if family == "Wan":
        return torch.randn(1, 16, 2, 8, 8, generator=g), dict(c_crossattn=ctx)
    if family == "Qwen-Image":
        return torch.randn(1, 16, 1, 16, 16, generator=g), dict(c_crossattn=ctx)
    return torch.randn(1, 16, 16, 16, generator=g), dict(c_crossattn=ctx, num_tokens=TXT)


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
# (query tokens, key tokens) of each stream in these inputs: 64 image tokens (Wan: 2 frames x 4 x 4)
TOKENS = {"joint": (TXT + 64, TXT + 64), "image_self": (32, 32), "text_cross": (32, TXT),
          "text_refiner": (TXT, TXT), "image_refiner": (64, 64)}
LAYOUT = {"Flux": "bhnd", "Flux.2": "bhnd", "Chroma": "bhnd", "SD3": "bnc", "Wan": "bnc", "Qwen-Image": "bhnd", "Lumina 2": "bhnd",
          "Z-Image": "bhnd"}

FAMILIES = tuple(CONFIGS)


def build(cls_name: str, cfg: dict, seed: int = 1717):
    """A tiny random model of `comfy.supported_models.<cls_name>(cfg)`, float32, in a ModelPatcher."""
    mc = getattr(comfy.supported_models, cls_name)(dict(cfg))
    mc.set_inference_dtype(torch.float32, None)
    model = mc.get_model({})
    _fill_random(model, seed)
    # buffers a checkpoint would fill: SD3's pos_embed is created with torch.empty (uninitialised
    # memory: NaN in some runs); the sampling buffers (model_sampling.sigmas) are computed
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for _, b in sorted(model.diffusion_model.named_buffers(), key=lambda t: t[0]):
            if b.is_floating_point():
                b.copy_(0.1 * torch.randn(b.shape, generator=g))
    model.eval()
    return comfy.model_patcher.ModelPatcher(
        model, load_device=comfy.model_management.get_torch_device(), offload_device=torch.device("cpu"))


class Tiny:
    def __init__(self, family, **config):
        cls_name, cfg = CONFIGS[family]
        self.family = family
        self.patcher = build(cls_name, dict(cfg, **config))
        self.x, self.conds = _inputs(family, torch.Generator().manual_seed(5))
        self.baseline = forward(self.patcher, self.x, self.conds)
        assert torch.isfinite(self.baseline).all()


def forward(patcher, x, conds, sigma=0.6):
    """One model call as the sampler makes it: transformer_options from the MODEL's model_options
    (copied, wrappers merged in as prepare_model_patcher does), the per-call keys of calc_cond_batch,
    then BaseModel.apply_model (APPLY_MODEL wrappers, then the diffusion model's forward)."""
    mo = comfy.model_patcher.create_model_options_clone(patcher.model_options)
    to = mo.setdefault("transformer_options", {})
    comfy.patcher_extension.merge_nested_dicts(to.setdefault("wrappers", {}), patcher.wrappers, copy_dict1=False)
    to = comfy.patcher_extension.merge_nested_dicts({}, to, copy_dict1=False)
    sig = torch.tensor([sigma])
    to["cond_or_uncond"] = [0]
    to["uuids"] = [None]
    to["sigmas"] = sig
    with torch.inference_mode():
        return patcher.model.apply_model(x, sig, transformer_options=to, **conds)


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
        assert site.family == tiny.family and site.ids_from == ids_from
        assert site.heads == 2 and site.layout == LAYOUT[tiny.family]
        nq, nk = TOKENS[site.stream]
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


SAMPLE_CONDS = {   # positive / negative conditioning extras per family for comfy.sample.sample
    "Flux": lambda g: {"pooled_output": torch.randn(1, 16, generator=g), "guidance": 3.5},
    "SD3": lambda g: {"pooled_output": torch.randn(1, 32, generator=g)},
    "Wan": lambda g: {},
    "Lumina 2": lambda g: {},
}


@pytest.mark.parametrize("family", tuple(SAMPLE_CONDS))
def test_sampling_with_cfg(family):
    """A real KSampler run with cfg > 1 (uncond and cond batched in one model call): the router with a
    passing controller leaves the samples bit for bit, and sees each step's calls with the batch
    layout of the call."""
    t = Tiny(family)
    g = torch.Generator().manual_seed(11)
    pos = [[torch.randn(1, TXT, 32, generator=g), SAMPLE_CONDS[family](g)]]
    neg = [[torch.randn(1, TXT, 32, generator=g), SAMPLE_CONDS[family](g)]]
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
