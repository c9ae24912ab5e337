"""TIME on DiT families: the edit of each family's text-entry projection (Flux / Flux.2 / Chroma txt_in, SD3
context_embedder, Wan text_embedding.0, Qwen-Image txt_in after txt_norm, Lumina 2 / Z-Image cap_embedder after
its RMSNorm, HunyuanVideo's token refiner input and pooled projections), the row alignment on each family's own
tokenizer, sampling, no leak, named errors; and the shapes-world DiT (Flux class, SD CLIP) end to end."""
import comfy.lora
import comfy.sd1_clip
import pytest
import torch

import ac_dit
import ac_models as M
from attention_control.attention.core import AttentionControlError
from attention_control.nodes import weight_edits as WE
from test_dit_tokens import _id_rows_forward, clips, spm_models  # noqa: F401  (fixtures)

FAMILIES = ["Flux", "Flux.2", "Chroma", "SD3", "Wan", "Qwen-Image", "Lumina 2", "Z-Image", "HunyuanVideo"]
ENTRY = {"Flux": ["txt_in"], "Flux.2": ["txt_in"], "Chroma": ["txt_in"], "SD3": ["context_embedder"],
         "Wan": ["text_embedding.0"], "Qwen-Image": ["txt_in"], "Lumina 2": ["cap_embedder.1"],
         "Z-Image": ["cap_embedder.1"], "HunyuanVideo": ["txt_in.input_embedder", "txt_in.c_embedder.in_layer"]}
NORM = {"Qwen-Image": "txt_norm", "Lumina 2": "cap_embedder.0", "Z-Image": "cap_embedder.0"}


def _rows(n=10, d=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    c = torch.randn(1, n, d, generator=g)[0]
    return c, c + 0.7 * torch.randn(n, d, generator=g)


@pytest.mark.parametrize("family", FAMILIES)
def test_text_entry_projection_maps_the_source_rows_onto_the_destinations(family):
    model = ac_dit.tiny(family).patcher
    keys, norm = WE.edit_targets(model, 32)
    assert keys == [f"diffusion_model.{n}.weight" for n in ENTRY[family]]
    dm = model.model.diffusion_model
    assert (norm is dm.get_submodule(NORM[family])) if family in NORM else norm is None
    c, cs = _rows()
    edit = WE.fit_edit(model, c, cs, 1e-6, {})
    assert edit.meta["input"] == ("normed" if family in NORM else "raw")
    m = WE.apply_edit(model, edit, 1.0)
    sd = model.model.state_dict()
    with torch.no_grad():
        x, xs = (norm(v) if norm is not None else v for v in (c, cs))
    for k in keys:
        w = sd[k].float()
        w2 = comfy.lora.calculate_weight(m.patches[k], w.clone(), k)
        # the projection of every source row lands on the (unedited) projection of its destination row
        torch.testing.assert_close(x @ w2.T, xs @ w.T, rtol=1e-3, atol=1e-3)
    assert not WE.apply_edit(model, edit, 0.0).patches


SAMPLED = ["Flux", "SD3", "Wan", "Lumina 2"]


@pytest.mark.parametrize("family", SAMPLED)
def test_edited_dit_samples_differently_and_the_plain_model_is_unchanged(family):
    tiny = ac_dit.tiny(family)
    g = torch.Generator().manual_seed(3)
    x, conds = ac_dit.inputs(family, g)
    extra = ac_dit.SAMPLE_CONDS[family](g)
    pos = [[conds["c_crossattn"], dict(extra)]]
    neg = [[torch.randn(conds["c_crossattn"].shape, generator=g), dict(extra)]]
    noise = torch.randn(x.shape, generator=g)
    lat = torch.zeros_like(x)
    base = ac_dit.sample(tiny.patcher, noise, pos, neg, lat)
    c, cs = _rows(seed=5)
    m = WE.apply_edit(tiny.patcher, WE.fit_edit(tiny.patcher, c, cs, 0.1, {}), 1.0)
    edited = ac_dit.sample(m, noise, pos, neg, lat)
    assert not torch.equal(edited, base)
    assert torch.equal(ac_dit.sample(tiny.patcher, noise, pos, neg, lat), base)


ALIGN_FAMILIES = ["Flux", "Chroma", "SD3", "Qwen-Image", "Z-Image", "Wan", "Lumina 2", "Flux.2"]


@pytest.mark.parametrize("family", ALIGN_FAMILIES)
def test_rows_align_on_the_familys_own_tokenizer(clips, monkeypatch, family):  # noqa: F811
    """Encoders that write each row's token id (test_dit_tokens' stand-in): every source prompt token's row
    gets the destination row of the same token, the added word's row is never a target, and the rows after
    the prompt follow on after the destination's prompt."""
    from attention_control.nodes.dit_tokens import dit_context
    clip = clips(family)
    monkeypatch.setattr(comfy.sd1_clip.SDClipModel, "forward", _id_rows_forward)
    # the stand-in encoder has meta weights: encode without loading it (the rows come from the forward above)
    monkeypatch.setattr(clip, "encode_from_tokens",
                        lambda toks, **kw: clip.cond_stage_model.encode_token_weights(toks)[0])
    src, dst = "a circle", "a red circle"
    c, cs = WE.dit_aligned_embeddings(clip, [src], [dst], False)
    sctx, dctx = dit_context(clip, src), dit_context(clip, dst)
    assert c.shape[0] == sctx.cond_length
    pad = sctx.length - sctx.cond_length
    ids, aligned = c[:, 0].long(), cs[:, 0].long()
    for part in sctx.parts:
        for pos, _shown in part.tokens:                  # the prompt's tokens keep their token
            assert aligned[pos - pad] == ids[pos - pad], (family, pos)
    dcond = clip.encode_from_tokens(clip.tokenize(dst))[0]
    red_rows = {p - (dctx.length - dctx.cond_length) for part in dctx.parts for p, s in part.tokens if "red" in s}
    assert red_rows
    rows = WE.dit_align_rows(sctx, dctx)
    assert not red_rows & set(rows), (family, rows)
    assert torch.equal(cs, dcond.float()[rows])
    with pytest.raises(AttentionControlError, match="destination_prompts line 1: the source's token .*square"):
        WE.dit_aligned_embeddings(clip, ["a square"], ["a red circle"], False)


def test_shapes_world_dit_edit_end_to_end():
    """The shapes-world DiT (ComfyUI's Flux class with an SD CLIP): the node edits txt_in from the CLIP's
    aligned embeddings, the edited model samples differently, strength 0 and the plain model after are the
    plain model bit for bit."""
    import ac_shapes as S
    from attention_control.nodes.weight_edits import EditAssumption
    model, clip, _ = S.load_dit()
    m, edit = EditAssumption.execute(model, clip, "a circle", "a red circle", 0.1, True, 1.0).result
    assert list(m.patches) == ["diffusion_model.txt_in.weight"] and edit.meta["input"] == "raw"
    c, cs = WE.aligned_embeddings(clip, ["a circle"], ["a red circle"], True)
    w = model.model.state_dict()["diffusion_model.txt_in.weight"].float()
    w2 = comfy.lora.calculate_weight(m.patches["diffusion_model.txt_in.weight"], w.clone(), "txt_in")
    before, after = (c @ w.T - cs @ w.T).norm(), (c @ w2.T - cs @ w.T).norm()
    assert after < 0.1 * before, (float(after), float(before))
    pos, neg = S.encode(clip, ["a circle"]), S.encode(clip, [""])
    lat = M.latent(1, 32, 32)
    base = S.sample(model, pos, neg, lat, seed=1, steps=3, cfg=S.DIT_CFG)
    assert not torch.equal(S.sample(m, pos, neg, lat, seed=1, steps=3, cfg=S.DIT_CFG), base)
    m0, _ = EditAssumption.execute(model, clip, "a circle", "a red circle", 0.1, True, 0.0).result
    assert torch.equal(S.sample(m0, pos, neg, lat, seed=1, steps=3, cfg=S.DIT_CFG), base)
    assert torch.equal(S.sample(model, pos, neg, lat, seed=1, steps=3, cfg=S.DIT_CFG), base)


def test_an_edit_fitted_to_raw_rows_is_refused_by_a_normalising_model():
    c, cs = _rows()
    raw = WE.fit_edit(ac_dit.tiny("Flux").patcher, c, cs, 0.1, {})
    with pytest.raises(AttentionControlError, match="edit_name: this edit was fitted to raw text embeddings"):
        WE.apply_edit(ac_dit.tiny("Qwen-Image").patcher, raw, 1.0, "edit_name")
