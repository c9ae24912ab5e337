"""TIME (editing implicit assumptions): the closed form, the alignment, the weight patch on real ComfyUI
models (tiny SD1.5 / SDXL, random CLIP-L), strength, LoRA chaining, save / load, named errors, no leak."""
import os

import comfy.model_management
import pytest
import torch

import ac_models as M
from attention_control.attention.core import AttentionControlError, UnsupportedModelError
from attention_control.attention.time_edit import AlignmentError, align_positions, augmented, time_edit
from attention_control.nodes import weight_edits as WE
from attention_control.nodes.weight_edits import EditAssumption, LoadAssumptionEdit, SaveAssumptionEdit

def _plain_sd(model):
    """The model's own weights: the plain patcher loaded first (another test's clone may still be patched into
    the shared model)."""
    comfy.model_management.load_models_gpu([model])
    return model.model.state_dict()



def _random_edit_inputs(n, d, seed=0, same_rows=0):
    g = torch.Generator().manual_seed(seed)
    c = torch.randn(n, d, generator=g, dtype=torch.float64)
    cs = c + 0.5 * torch.randn(n, d, generator=g, dtype=torch.float64)
    cs[:same_rows] = c[:same_rows]
    return c, cs


def _paper_form(w, c, cs, lam):
    """(lambda W + sum v* c^T)(lambda I + sum c c^T)^-1 with v* = W c*, float64."""
    d = c.shape[1]
    mat1 = lam * w + (w @ cs.T) @ c
    mat2 = lam * torch.eye(d, dtype=torch.float64) + c.T @ c
    return mat1 @ torch.linalg.inv(mat2)


@pytest.mark.parametrize("n,d", [(5, 12), (30, 12)])          # low-rank factors, and the d x d matrix form
def test_closed_form_equals_the_papers_formula_and_a_least_squares_solve(n, d):
    c, cs = _random_edit_inputs(n, d, same_rows=2)
    w = torch.randn(7, d, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    lam = 0.1
    edit = time_edit(c, cs, lam)
    assert (edit.down is None) == (n - 2 >= d)
    assert edit.rank == min(n - 2, d)                        # the two unchanged rows drop out exactly
    mine = w + w @ edit.matrix()
    torch.testing.assert_close(mine, _paper_form(w, c, cs, lam), rtol=1e-5, atol=1e-5)
    # ridge regression: minimise |W' C^T - W C*^T|^2 + lambda |W' - W|^2 as one stacked least squares
    a = torch.cat([c, lam ** 0.5 * torch.eye(d, dtype=torch.float64)])
    b = torch.cat([cs @ w.T, lam ** 0.5 * w.T])
    lstsq = torch.linalg.lstsq(a, b).solution.T
    torch.testing.assert_close(mine, lstsq, rtol=1e-5, atol=1e-5)
    # the float32 factors applied the way the patch applies them
    torch.testing.assert_close(w.float() + edit.delta(w.float()), mine.float(), rtol=1e-4, atol=1e-4)


def test_large_lambda_keeps_the_weights_and_small_lambda_reaches_the_targets():
    c, cs = _random_edit_inputs(6, 16)
    w = torch.randn(9, 16, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    sizes = [edit.matrix().norm() for edit in (time_edit(c, cs, lam) for lam in (1.0, 1e2, 1e4, 1e6))]
    assert all(b < a for a, b in zip(sizes, sizes[1:])) and sizes[-1] < 1e-4   # ~ 1 / lambda
    edit = time_edit(c, cs, 1e-6)                            # n < d: the targets are reachable
    moved = c @ (w + w @ edit.matrix()).T
    torch.testing.assert_close(moved, cs @ w.T, rtol=1e-4, atol=1e-4)


def test_identical_prompts_give_an_empty_edit():
    c, _ = _random_edit_inputs(4, 8)
    edit = time_edit(c, c.clone(), 0.1)
    assert edit.rank == 0 and edit.matrix().abs().max() == 0


def test_alignment_follows_the_reference_rule():
    # BOS a circle EOS  ->  BOS a red circle EOS
    assert align_positions([0, 1, 3, 9], [0, 1, 2, 3, 9], 10) == [0, 1, 3, 4, 5, 6, 7, 8, 9, 9]
    # the same prompt maps position to position
    assert align_positions([0, 1, 9], [0, 1, 9], 6) == list(range(6))
    with pytest.raises(AlignmentError) as e:
        align_positions([0, 5, 9], [0, 1, 2, 9], 6)
    assert e.value.position == 1 and e.value.token == 5
    # "an" (7) counts as "a" (1)
    same = lambda x, y: (1 if x == 7 else x) == (1 if y == 7 else y)  # noqa: E731
    assert align_positions([0, 7, 3, 9], [0, 1, 4, 3, 9], 6, same) == [0, 1, 3, 4, 5, 5]


def test_augmented_prompts():
    assert augmented("A pack of roses") == ["A pack of roses", "A photo of a pack of roses",
                                            "An image of a pack of roses", "A picture of a pack of roses"]
    assert augmented("Anna's roses")[1] == "A photo of Anna's roses"


# --------------------------------------------------------------------------------------------
# on ComfyUI models

def _edit(model, clip, src="a circle", dst="a red circle", lam=0.1, augment=True, strength=1.0):
    return EditAssumption.execute(model, clip, src, dst, lam, augment, strength).result


def _weights(patcher, keys):
    """The weights as ComfyUI patches them (comfy.lora.calculate_weight over the clone's patch list)."""
    import comfy.lora
    sd = patcher.model.state_dict()
    return {k: comfy.lora.calculate_weight(patcher.patches[k], sd[k].float().clone(), k) for k in keys}


def _loaded_weights(patcher, keys, plain):
    """The weights of the model as ComfyUI loads it for sampling (load_models_gpu patches the shared model in
    place), then the plain patcher loaded again (which restores them)."""
    comfy.model_management.load_models_gpu([patcher])
    try:
        sd = patcher.model.state_dict()
        return {k: sd[k].detach().clone() for k in keys}
    finally:
        comfy.model_management.load_models_gpu([plain])


def test_node_patches_every_cross_attention_k_and_v_with_the_closed_form(sd15, clip_l):
    m, edit = _edit(sd15, clip_l)
    keys = WE.projection_keys(sd15, 768)
    assert len(keys) == 2 * sum(1 for n, _ in sd15.model.diffusion_model.named_modules() if n.endswith(".attn2"))
    assert set(m.patches) == set(keys)
    base = {k: v.clone() for k, v in _plain_sd(sd15).items() if k in keys}
    patched = _loaded_weights(m, keys, sd15)
    d = edit.matrix()
    for k in keys:
        torch.testing.assert_close(patched[k].double(), base[k].double() + base[k].double() @ d, rtol=1e-5, atol=1e-6)
    # the source tokens' projections move onto the destination tokens' (the edit's purpose)
    c, cs = WE.aligned_embeddings(clip_l, ["a circle"], ["a red circle"], True)
    k = keys[0]
    before = (c.double() @ base[k].double().T - cs.double() @ base[k].double().T).norm()
    after = (c.double() @ patched[k].double().T - cs.double() @ base[k].double().T).norm()
    assert after < 0.1 * before, (float(after), float(before))      # measured 0.052 (lambda 0.1)
    # and the plain model is untouched
    after_sd = _plain_sd(sd15)
    assert all(torch.equal(after_sd[k], base[k]) for k in keys)


def test_strength_zero_is_the_model_and_strength_scales_the_change(sd15, clip_l):
    cond, unc = M.cond(1, seed=3), M.cond(1, seed=4)
    base = M.ksample(sd15, cond, unc, M.latent(1), seed=1, steps=3)
    m0, _ = _edit(sd15, clip_l, strength=0.0)
    assert not m0.patches
    assert torch.equal(M.ksample(m0, cond, unc, M.latent(1), seed=1, steps=3), base)
    m1, edit = _edit(sd15, clip_l, strength=1.0)
    edited = M.ksample(m1, cond, unc, M.latent(1), seed=1, steps=3)
    assert not torch.equal(edited, base)
    # no leak: the plain model samples as before, bit for bit
    assert torch.equal(M.ksample(sd15, cond, unc, M.latent(1), seed=1, steps=3), base)
    keys = WE.projection_keys(sd15, 768)[:2]
    w = {k: v.clone() for k, v in _plain_sd(sd15).items() if k in keys}
    half = _weights(_edit(sd15, clip_l, strength=0.5)[0], keys)
    full = _weights(m1, keys)
    for k in keys:
        torch.testing.assert_close(half[k] - w[k], 0.5 * (full[k] - w[k]), rtol=1e-4, atol=1e-6)


def _lora_patch(weight, seed):
    from comfy.weight_adapter.lora import LoRAAdapter
    g = torch.Generator().manual_seed(seed)
    up = 0.1 * torch.randn(weight.shape[0], 2, generator=g)
    down = 0.1 * torch.randn(2, weight.shape[1], generator=g)
    return LoRAAdapter(set(), (up, down, None, None, None, None)), up @ down


@pytest.mark.parametrize("order", ["lora_first", "edit_first"])
def test_chains_with_a_lora_in_either_order(sd15, clip_l, order):
    keys = WE.projection_keys(sd15, 768)
    w = {k: v.clone() for k, v in _plain_sd(sd15).items() if k in keys}
    loras = {k: _lora_patch(w[k], i) for i, k in enumerate(keys)}
    edit = WE.derive_edit(clip_l, "a circle", "a red circle", 0.1, False)
    if order == "lora_first":
        m = sd15.clone()
        m.add_patches({k: p for k, (p, _) in loras.items()}, 1.0)
        m = WE.apply_edit(m, edit, 1.0)
    else:
        m = WE.apply_edit(sd15, edit, 1.0)
        m.add_patches({k: p for k, (p, _) in loras.items()}, 1.0)
    got = _weights(m, keys)
    d = edit.matrix()
    for k in keys[:6]:
        wk, lk = w[k].double(), loras[k][1].double()
        want = (wk + lk) + (wk + lk) @ d if order == "lora_first" else wk + wk @ d + lk
        torch.testing.assert_close(got[k].double(), want, rtol=1e-5, atol=1e-6)


def test_save_and_load_round_trip_exactly(sd15, sdxl, clip_l, tmp_path, monkeypatch):
    import folder_paths
    monkeypatch.setattr(folder_paths, "output_directory", str(tmp_path))
    monkeypatch.delitem(folder_paths.folder_names_and_paths, WE.FOLDER, raising=False)
    m, edit = _edit(sd15, clip_l)
    SaveAssumptionEdit.execute(edit, "attention_edits/test_edit")
    files = WE.edit_files()
    assert files == ["test_edit_00001_.safetensors"]
    assert os.path.getsize(tmp_path / WE.FOLDER / files[0]) < 2 * 768 * edit.rank * 4 + 4096
    m2, loaded = LoadAssumptionEdit.execute(sd15, files[0], 1.0).result
    assert torch.equal(loaded.up, edit.up) and torch.equal(loaded.down, edit.down)
    assert loaded.meta["destination_prompts"] == ["a red circle"]
    keys = WE.projection_keys(sd15, 768)[:4]
    a, b = _weights(m, keys), _weights(m2, keys)
    assert all(torch.equal(a[k], b[k]) for k in keys)
    # a file that is not an edit, and a damaged one, are named errors
    import safetensors.torch
    safetensors.torch.save_file({"x": torch.zeros(2)}, str(tmp_path / WE.FOLDER / "other.safetensors"))
    with pytest.raises(AttentionControlError, match="edit_name: 'other.safetensors' is not a TIME edit"):
        LoadAssumptionEdit.execute(sd15, "other.safetensors", 1.0)
    tensors, meta = WE.edit_to_tensors(edit)
    tensors["time.up"] = tensors["time.up"].clone()
    tensors["time.up"][0, 0] = float("nan")
    safetensors.torch.save_file(tensors, str(tmp_path / WE.FOLDER / "bad.safetensors"), metadata=meta)
    with pytest.raises(AttentionControlError, match="edit_name: 1 of .* not finite"):
        LoadAssumptionEdit.execute(sd15, "bad.safetensors", 1.0)
    with pytest.raises(AttentionControlError, match="edit_name: the edit was made for 768-wide .* take 2048"):
        LoadAssumptionEdit.execute(sdxl, files[0], 1.0)


def test_sdxl_cross_attention_is_edited_at_its_context_width(sdxl):
    c, cs = _random_edit_inputs(20, 2048, seed=5)
    edit = time_edit(c, cs, 0.1)
    keys = WE.projection_keys(sdxl, 2048)
    assert keys and all(k.endswith(("attn2.to_k.weight", "attn2.to_v.weight")) for k in keys)
    m = WE.apply_edit(sdxl, edit, 1.0)
    w = _plain_sd(sdxl)[keys[-1]].clone()
    got = _weights(m, keys[-1:])[keys[-1]]
    torch.testing.assert_close(got.double(), w.double() + w.double() @ edit.matrix(), rtol=1e-5, atol=1e-5)


def test_named_errors(sd15, sdxl, clip_l):
    with pytest.raises(AttentionControlError, match="clip: gives 768-wide embeddings .* 2048"):
        _edit(sdxl, clip_l)
    with pytest.raises(AttentionControlError, match="destination_prompts line 2: the source's word 'square'"):
        _edit(sd15, clip_l, "a circle\na square", "a red circle\na blue triangle")
    with pytest.raises(AttentionControlError, match="destination_prompts: 1 line"):
        _edit(sd15, clip_l, "a circle\na square", "a red circle")
    assert "destination_prompts: 1 line" in EditAssumption.validate_inputs(
        source_prompts="a\nb", destination_prompts="a c")
    assert "source_prompts: give at least one" in EditAssumption.validate_inputs(
        source_prompts=" \n", destination_prompts="")
    assert EditAssumption.validate_inputs(source_prompts="a circle", destination_prompts="a red circle") is True
    assert "lambda_" in EditAssumption.validate_inputs(lambda_=float("nan"))
    import ac_dit
    with pytest.raises(AttentionControlError, match="clip: gives 768-wide embeddings .* take 32"):
        WE.projection_keys(ac_dit.tiny("Flux").patcher, 768)
    with pytest.raises(UnsupportedModelError, match="model: .*no text-entry projection TIME can edit"):
        WE.projection_keys(ac_dit.tiny("HiDream").patcher, 32)


def test_edit_composes_with_attention_capture(sd15, clip_l):
    """A weight edit and an attention patch of the pack on one MODEL, either order: capture fires and the
    image equals the edited model's without capture, bit for bit."""
    from attention_control.nodes.capture import CaptureAttention

    def capture(model, clip):
        return CaptureAttention.execute(model, clip, "a circle", "circle", "all", 0.0, 1.0, False).result
    pos = [[clip_l.encode_from_tokens(clip_l.tokenize("a circle")), {}]]
    neg = [[clip_l.encode_from_tokens(clip_l.tokenize("")), {}]]
    edited, _ = _edit(sd15, clip_l)
    want = M.ksample(edited, pos, neg, M.latent(1), seed=2, steps=3)
    for order in ("edit_first", "capture_first"):
        if order == "edit_first":
            m, store = capture(edited, clip_l)
        else:
            cap, store = capture(sd15, clip_l)
            m, _ = _edit(cap, clip_l)
        got = M.ksample(m, pos, neg, M.latent(1), seed=2, steps=3)
        assert torch.equal(got, want), order
        assert store.require().abs().sum() > 0, order


def test_batched_prompt_embeddings_equal_single_encodes(clip_l):
    texts = ["a circle", "a photo of a red circle", ""]
    got = WE._embed_all(clip_l, texts)
    for t, e in zip(texts, got):
        torch.testing.assert_close(e, clip_l.encode_from_tokens(clip_l.tokenize(t))[0].float(), rtol=1e-5, atol=1e-5)
