"""The attention router on the real ComfyUI: baseline equality, firing, chaining, lifecycle, errors."""
import pytest
import torch

import ac_models as M
import comfy.model_patcher
import nodes
from attention_control.attention import core
from attention_control.attention.router import (RUN_KEY, ROUTER_KEY, AttentionControlError, RouterPatch,
                                                UnsupportedModelError, attach, discover_sites,
                                                release_projections)


class Counter(core.Controller):
    """Test controller: counts routed calls per (kind, key, step) and passes them on unchanged."""
    name = "counter"

    def __init__(self, kinds=("self", "cross"), layers="all"):
        self.kinds = frozenset(kinds)
        self.selector = core.LayerSelector.parse(layers)
        self.calls = {}
        self.runs = 0
        self.ended = 0

    def begin_run(self, run):
        super().begin_run(run)
        self.runs += 1

    def end_run(self, run, ok):
        self.ended += 1

    def attend(self, q, k, v, call, nxt):
        key = (call.site.kind, call.site.key, call.step)
        self.calls[key] = self.calls.get(key, 0) + 1
        assert call.h * call.w == q.shape[1]
        return nxt(q, k, v)


POS = M.cond(seed=1)
NEG = M.cond(seed=2)


def sample(model, **kw):
    kw.setdefault("steps", 3)
    return M.ksample(model, POS, NEG, M.latent(2, 16, 16), **kw)


@pytest.fixture(scope="module")
def baseline(sd15):
    return sample(sd15)


def test_passthrough_router_is_bit_identical(sd15, baseline):
    c = Counter()
    out = sample(attach(sd15, c))
    assert c.calls, "the router never fired"
    assert torch.equal(out, baseline)


def test_fires_on_every_selected_layer_and_only_there(sd15):
    sites = discover_sites(sd15)
    c = Counter(kinds=("cross",), layers="up,1/2")
    sample(attach(sd15, c), steps=2)
    fired = {(kind, key) for (kind, key, _) in c.calls}
    want = {("cross", s.key) for s in sites if s.kind == "cross" and s.part == "up" and s.ds == 2}
    assert want and fired == want
    steps = sorted({st for (_, _, st) in c.calls})
    assert steps == [0, 1]


def test_map_side_selection_is_resolved_at_the_sampled_size(sd15):
    c = Counter(kinds=("cross",), layers="8")           # 16x16 latent: ds 2 layers have 8x8 maps
    sample(attach(sd15, c), steps=1)
    assert {key for (_, key, _) in c.calls} == {s.key for s in discover_sites(sd15) if s.ds == 2}


def test_selector_matching_nothing_is_an_error(sd15):
    with pytest.raises(AttentionControlError, match="selects no cross-attention layer"):
        attach(sd15, Counter(kinds=("cross",), layers="1/16"))
    c = Counter(kinds=("cross",), layers="5")
    m = attach(sd15, c)
    with pytest.raises(AttentionControlError, match="at a 16x16 latent"):
        sample(m, steps=1)
    assert c.calls == {}, "the error must come before the first step"
    with pytest.raises(AttentionControlError, match="not a layer term"):
        core.LayerSelector.parse("upper")


def test_chains_a_preinstalled_replace_patch(sd15):
    seen = {"n": 0}

    def other_pack(q, k, v, extra):
        seen["n"] += 1
        return comfy.ldm.modules.attention.optimized_attention(q, k, v, extra["n_heads"]) * 0.5

    import comfy.ldm.modules.attention  # noqa: F401
    theirs = sd15.clone()
    theirs.set_model_attn2_replace(other_pack, "output", 3)           # (name, id) key form
    theirs.set_model_attn1_replace(other_pack, "input", 1, 0)         # (name, id, index) key form
    ref = sample(theirs)
    n_ref = seen["n"]
    seen["n"] = 0
    c = Counter()
    ours = attach(theirs, c)
    out = sample(ours)
    assert seen["n"] == n_ref > 0, "the pre-installed patch must still run"
    assert c.calls[("cross", ("output", 3, 0), 0)] > 0
    assert torch.equal(out, ref)


class KeepKV(Counter):
    """Keeps the K and V tensors the host handed to each self-attention call (to look at them after)."""

    def __init__(self):
        super().__init__(kinds=("self",))
        self.kv = []

    def attend(self, q, k, v, call, nxt):
        self.kv.append((k, v, k.numel(), v.numel(), call.site.key))
        return nxt(q, k, v)


def test_self_attention_projections_are_released_after_the_call(sd15, baseline):
    """ComfyUI's replace path keeps K and V referenced until the block returns (through the
    feed-forward peak); the router empties them once the attention is computed, so a patched block
    peaks as the unpatched one. The output stays bit-identical."""
    c = KeepKV()
    out = sample(attach(sd15, c))
    assert torch.equal(out, baseline)
    assert c.kv and all(n_k > 0 and n_v > 0 for _, _, n_k, n_v, _ in c.kv)
    assert all(k.numel() == 0 and v.numel() == 0 for k, v, _, _, _ in c.kv), "K/V still hold their storage"


def test_projections_are_kept_under_another_packs_patch(sd15):
    """With another pack's replace patch below ours, it may keep K/V (e.g. a reference bank): hands off."""
    import comfy.ldm.modules.attention as A
    theirs = sd15.clone()
    theirs.set_model_attn1_replace(lambda q, k, v, extra: A.optimized_attention(q, k, v, extra["n_heads"]),
                                   "input", 1, 0)
    c = KeepKV()
    sample(attach(theirs, c))
    theirs_kept = [k.numel() > 0 and v.numel() > 0 for k, v, _, _, key in c.kv if key == ("input", 1, 0)]
    ours_freed = [k.numel() == 0 and v.numel() == 0 for k, v, _, _, key in c.kv if key != ("input", 1, 0)]
    assert theirs_kept and all(theirs_kept), "the other pack's site must keep its K/V"
    assert ours_freed and all(ours_freed)


def test_release_projections_only_where_nothing_else_can_use_them():
    out = torch.randn(2, 8, 4)
    with torch.no_grad():
        k, v = torch.randn(2, 8, 4), torch.randn(2, 8, 4)
        release_projections(out, k, v)
        assert k.numel() == 0 and v.numel() == 0
        base = torch.randn(4, 8, 4)
        view = base[:2]
        release_projections(out, view)                     # a view of something else: untouched
        assert view.numel() == 64 and base.numel() == 128
        shared = out.view(2, 8, 4)
        release_projections(out, shared)                   # the output's own storage: untouched
        assert shared.numel() == 64
    k = torch.randn(2, 8, 4, requires_grad=True)
    release_projections(out, k)                            # autograd may need it: untouched
    assert k.numel() == 64
    with torch.inference_mode():
        t = torch.randn(2, 8, 4)
    with torch.no_grad():
        release_projections(out, t)                        # an inference tensor outside inference mode
    assert t.numel() == 64


def test_no_state_leaks_and_input_model_untouched(sd15, baseline):
    before = sd15.model_options.get("transformer_options", {}).copy()
    c = Counter()
    m = attach(sd15, c)
    a = sample(m)
    b = sample(m)
    assert torch.equal(a, b)
    assert c.runs == 2 and c.ended == 2
    assert RUN_KEY not in m.model_options["transformer_options"]
    assert sd15.model_options.get("transformer_options", {}) == before
    assert ROUTER_KEY not in sd15.model_options.get("transformer_options", {})
    assert torch.equal(sample(sd15), baseline)


def test_stacking_copies_the_stack_per_branch(sd15):
    c1, c2, c3 = Counter(), Counter(kinds=("cross",)), Counter(kinds=("self",))
    base = attach(sd15, c1)
    branch_a = attach(base, c2)
    branch_b = attach(base, c3)
    assert [type(x) for x in branch_a.model_options["transformer_options"][ROUTER_KEY].controllers] == [Counter, Counter]
    sample(branch_a, steps=1)
    assert c1.calls and c2.calls and not c3.calls
    # the clone shares no mutable router state with its parent
    assert base.model_options["transformer_options"][ROUTER_KEY].controllers == (c1,)
    # the router's patches live in the per-call options only: the MODEL carries none of them
    assert not branch_a.model_options["transformer_options"].get("patches_replace")


def test_a_replace_patch_installed_after_the_router_is_kept_and_routed(sd15):
    """Order does not matter: another pack's patch set on the MODEL after ours (same three-part key,
    and a two-part key) still runs, as our innermost default, and our controllers still see the calls."""
    import comfy.ldm.modules.attention as A
    seen = {"n": 0}

    def other_pack(q, k, v, extra):
        seen["n"] += 1
        return A.optimized_attention(q, k, v, extra["n_heads"]) * 0.5

    theirs = sd15.clone()
    theirs.set_model_attn2_replace(other_pack, "output", 3)
    theirs.set_model_attn1_replace(other_pack, "input", 1, 0)
    ref = sample(theirs)
    n_ref = seen["n"]
    seen["n"] = 0
    c = Counter()
    ours = attach(sd15, c)
    after = ours.clone()
    after.set_model_attn2_replace(other_pack, "output", 3)
    after.set_model_attn1_replace(other_pack, "input", 1, 0)
    out = sample(after)
    assert seen["n"] == n_ref > 0, "the patch installed after the router must still run"
    assert c.calls[("cross", ("output", 3, 0), 0)] > 0 and c.calls[("self", ("input", 1, 0), 0)] > 0
    assert torch.equal(out, ref)
    assert torch.equal(sample(theirs), ref)


def test_call_time_two_part_patches_are_the_default(sd15):
    """Core PAG installs `(block, id)` replace patches inside a copied model_options at call time:
    the router finds them in the call's own options (PAG + router == PAG alone, bit for bit)."""
    from comfy_extras.nodes_pag import PerturbedAttentionGuidance
    pag = PerturbedAttentionGuidance.execute(sd15, 3.0)[0]
    ref = sample(pag)
    assert not torch.equal(ref, sample(sd15)), "PAG must change the output on the tiny model"
    c = Counter(kinds=("self",))
    for m in (attach(pag, c), PerturbedAttentionGuidance.execute(attach(sd15, c), 3.0)[0]):
        assert torch.equal(sample(m), ref)
    assert c.calls[("self", ("middle", 0, 0), 0)] > 0


class Layouts(Counter):
    """Records the row layout the router reports for each self-attention call."""

    def __init__(self):
        super().__init__(kinds=("self",))
        self.layouts = set()

    def handles(self, call):
        return True

    def attend(self, q, k, v, call, nxt):
        self.layouts.add((call.site.ds, call.batch, call.fold, call.kv_fold, q.shape[0], q.shape[1], call.plain))
        return nxt(q, k, v)


def test_hypertile_rows_are_reported_as_folds(sd15):
    """HyperTile folds spatial tiles into the rows: each item has `fold` rows of tokens/fold tokens."""
    from comfy_extras.nodes_hypertile import HyperTile
    ht = HyperTile.execute(sd15, tile_size=64, swap_size=1, max_depth=0, scale_depth=False)[0]
    ref = sample(ht)
    c = Layouts()
    out = sample(attach(ht, c))
    assert torch.equal(out, ref)
    folded = {l for l in c.layouts if l[0] == 1}
    # 16x16 latent, 8x8 tiles: 4 query rows per item (2 chunks x 2 items); keys keep one row per item
    assert folded == {(1, 2, 4, 1, 2 * 2 * 4, 64, False)}, folded
    assert all(l[2] == 1 and l[3] == 1 and l[6] for l in c.layouts if l[0] != 1)


def test_a_spatial_controller_stands_aside_where_the_layout_changed(sd15, caplog):
    from comfy_extras.nodes_hypertile import HyperTile
    ht = HyperTile.execute(sd15, tile_size=64, swap_size=1, max_depth=0, scale_depth=False)[0]
    c = Counter(kinds=("self",))
    with caplog.at_level("WARNING", logger="attention_control"):
        out = sample(attach(ht, c))
    assert torch.equal(out, sample(ht))
    assert {s.ds for s in discover_sites(sd15) for (_, key, _) in c.calls if key == s.key} == {2, 4}
    lines = [r.getMessage() for r in caplog.records if "stands aside" in r.getMessage()]
    assert lines and all("counter" in m and "4 rows per item" in m for m in lines)
    assert len(lines) == len({s.key for s in discover_sites(sd15) if s.kind == "self" and s.ds == 1})


@pytest.mark.parametrize("path", ["ksampler_cfg1", "sampler_custom", "sampler_custom_advanced", "heun"])
def test_all_sampler_paths(sd15, path):
    from comfy_extras import nodes_custom_sampler as ncs
    c = Counter(kinds=("cross",), layers="mid")
    m = attach(sd15, c)
    lat = M.latent(1, 16, 16)
    steps = 3
    if path == "ksampler_cfg1":
        M.ksample(m, POS, NEG, lat, cfg=1.0, steps=steps)
        rows = {k: v for k, v in c.calls.items()}
        assert len(rows) == steps
    elif path == "heun":
        M.ksample(m, POS, NEG, lat, steps=steps, sampler="heun")
        assert sorted({s for (_, _, s) in c.calls}) == [0, 1, 2]
    elif path == "sampler_custom":
        sampler = ncs.KSamplerSelect.execute("euler")[0]
        sigmas = ncs.BasicScheduler.execute(m, "normal", steps, 1.0)[0]
        ncs.SamplerCustom.execute(m, True, 0, 5.0, POS, NEG, sampler, sigmas, lat)
        assert sorted({s for (_, _, s) in c.calls}) == [0, 1, 2]
    else:
        sampler = ncs.KSamplerSelect.execute("euler")[0]
        sigmas = ncs.BasicScheduler.execute(m, "normal", steps, 1.0)[0]
        guider = ncs.CFGGuider.execute(m, POS, NEG, 5.0)[0]
        noise = ncs.RandomNoise.execute(0)[0]
        ncs.SamplerCustomAdvanced.execute(noise, guider, sampler, sigmas, lat)
        assert sorted({s for (_, _, s) in c.calls}) == [0, 1, 2]
    assert c.ended == 1


def test_sdxl_sites_and_sampling(sdxl):
    sites = discover_sites(sdxl)
    assert {s.ds for s in sites} == {2, 4}
    assert max(s.index for s in sites) == 1                   # depth-2 transformers
    c = Counter(kinds=("cross",))
    pos, neg = M.cond(dim=2048, pooled=1280, seed=1), M.cond(dim=2048, pooled=1280, seed=2)
    base = M.ksample(sdxl, pos, neg, M.latent(1, 16, 16), steps=2)
    out = M.ksample(attach(sdxl, c), pos, neg, M.latent(1, 16, 16), steps=2)
    assert torch.equal(base, out)
    assert {key for (_, key, _) in c.calls} == {s.key for s in sites if s.kind == "cross"}


def test_unsupported_family_is_named():
    class FakeDiT(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.diffusion_model = torch.nn.Linear(2, 2)

    class Flux:
        pass

    mod = FakeDiT()
    mod.model_config = Flux()
    mp = comfy.model_patcher.ModelPatcher(mod, torch.device("cpu"), torch.device("cpu"))
    with pytest.raises(UnsupportedModelError, match=r"Flux is not supported yet.*SD1\.x, SD2\.x and SDXL"):
        attach(mp, Counter())


def test_sd2_shaped_model():
    import comfy.supported_models
    cfg = dict(M.SD15_TINY, use_linear_in_transformer=True, context_dim=1024)
    mc = comfy.supported_models.SD20(cfg)
    mc.unet_config["num_head_channels"] = 16
    model = mc.get_model({})
    M._fill_random(model, 99)
    mp = M._patcher(model)
    pos, neg = M.cond(dim=1024, seed=1), M.cond(dim=1024, seed=2)
    base = M.ksample(mp, pos, neg, M.latent(1, 16, 16), steps=2)
    c = Counter()
    assert torch.equal(M.ksample(attach(mp, c), pos, neg, M.latent(1, 16, 16), steps=2), base)
    assert c.calls


def test_block_patches_with_in_place_writes_keep_guidance_gradients_exact():
    """Core FreeU_V2 writes `h[:, :C/2] = h[:, :C/2] * f(h)` in place; inside a guidance pass the
    router runs such patches so that the gradient equals that of the out-of-place formula."""
    from attention_control.attention.router import _OutOfPlace

    def in_place(h, hsp, to):
        s = h.mean(1, keepdim=True)
        h[:, :2] = h[:, :2] * (1.5 * s + 1)
        return h, hsp

    def out_of_place(h, hsp, to):
        s = h.mean(1, keepdim=True)
        return torch.cat([h[:, :2] * (1.5 * s + 1), h[:, 2:]], 1), hsp

    torch.manual_seed(0)
    x = torch.randn(1, 4, 3, 3, dtype=torch.float64, requires_grad=True)
    grads = []
    for patch in (_OutOfPlace(in_place), out_of_place):
        h = x * 2.0
        out, _ = patch(h, None, {})
        grads.append(torch.autograd.grad((out ** 2).sum(), x)[0])
    torch.testing.assert_close(grads[0], grads[1])
    with pytest.raises(RuntimeError, match="inplace"):
        h = x * 2.0
        out, _ = in_place(h, None, {})
        torch.autograd.grad((out ** 2).sum(), x)
