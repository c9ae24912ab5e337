"""The shapes-world DiT (issue 17): the shipped weights load as ComfyUI's own Flux model, stock nodes
sample the captioned colour with it, the training override's word maps equal the explicit joint
softmax (gradients too), and a short training run is deterministic per seed and writes loadable
weights."""
import os

import pytest
import torch

import ac_shapes
import nodes
from attention_control.attention.dit_router import detect_family
from attention_control.shapesworld import comfy_glue, evaluate
from attention_control.shapesworld import train_dit as TD


def test_shipped_weights_load_as_a_comfy_flux_model():
    import comfy.ldm.flux.model
    import comfy.model_base
    model, clip, vae = ac_shapes.load_dit()
    dm = model.model.diffusion_model
    assert type(dm) is comfy.ldm.flux.model.Flux
    assert type(model.model) is comfy.model_base.Flux
    assert detect_family(model) == "Flux"
    assert model.model.model_type == comfy.model_base.ModelType.FLOW
    assert not dm.params.guidance_embed and len(dm.double_blocks) >= 1 and len(dm.single_blocks) >= 1
    assert dm.params.in_channels == 4 and dm.patch_size == 2 and dm.params.context_in_dim == 768
    assert 1_000_000 < sum(p.numel() for p in dm.parameters()) < 10_000_000
    assert os.path.getsize(ac_shapes.DIT_WEIGHTS) < 10_000_000
    assert isinstance(vae, comfy_glue.ShapesWorldVAE) and clip is not ac_shapes.load()[1]


def test_stock_nodes_sample_the_captioned_colour():
    model, clip, vae = ac_shapes.load_dit()
    pos = nodes.CLIPTextEncode().encode(clip, "a red circle")[0]
    neg = nodes.CLIPTextEncode().encode(clip, "")[0]
    assert pos[0][1]["pooled_output"].shape == (1, 768)          # Flux's y (vector_in) via encode_adm
    latent = nodes.EmptyLatentImage().generate(256, 256, 1)[0]
    assert latent["samples"].shape == (1, 4, 32, 32)
    out = nodes.KSampler().sample(model.clone(), 3, ac_shapes.STEPS, ac_shapes.DIT_CFG, "euler", "normal", pos, neg,
                                  latent)[0]
    image = nodes.VAEDecode().decode(vae, out)[0]
    assert image.shape == (1, 256, 256, 3)
    assert evaluate.colour_present(image[0], "red")


def test_training_word_maps_equal_the_explicit_joint_softmax():
    g = torch.Generator().manual_seed(3)
    b, h, n_txt, n_img, d = 2, 4, 77, 256, 32
    q, k, v = (torch.randn(b, h, n_txt + n_img, d, generator=g, dtype=torch.float64, requires_grad=True)
               for _ in range(3))
    cols = torch.tensor([[2, 3, 6, 7], [2, 3, 0, 0]])
    weight = torch.rand(b, n_img, 4, generator=g, dtype=torch.float64)
    w_out = torch.rand(b, n_txt + n_img, h * d, generator=g, dtype=torch.float64)

    def sdpa(q_, k_, v_, heads, mask=None, skip_reshape=False, **kw):
        return torch.nn.functional.scaled_dot_product_attention(q_, k_, v_).transpose(1, 2).reshape(b, -1, heads * d)

    grab = TD.JointAttentionMaps(n_txt)
    grab.columns = cols
    out = grab(sdpa, q, k, v, h, skip_reshape=True)
    got = grab.maps[0]
    ((got * weight).sum() + (out * w_out).sum()).backward()
    grads = [t.grad.clone() for t in (q, k, v)]
    for t in (q, k, v):
        t.grad = None
    # naive: scores over all 333 keys, softmax, image rows, the words' columns, mean over heads
    s = (q @ k.transpose(-1, -2)) / d ** 0.5
    p = torch.softmax(s, -1)[:, :, n_txt:, :]
    want = torch.stack([p[i][..., cols[i]] for i in range(b)]).mean(1)
    want_out = (torch.softmax(s, -1) @ v).transpose(1, 2).reshape(b, -1, h * d)
    ((want * weight).sum() + (want_out * w_out).sum()).backward()
    assert torch.allclose(got, want, atol=1e-10)
    assert torch.allclose(out, want_out, atol=1e-10)
    for gg, t in zip(grads, (q, k, v)):
        assert torch.allclose(gg, t.grad, atol=1e-10)


@pytest.fixture(scope="module")
def emb_cache(tmp_path_factory):
    """A caption-embedding cache with the real key and random contents: the smoke test needs the
    training loop, not the 169 CLIP encodings (about 15 s)."""
    from attention_control.shapesworld import train as T
    path = str(tmp_path_factory.mktemp("dit_emb") / "emb.pt")
    key = T.caption_cache_key()
    g = torch.Generator().manual_seed(0)
    n = len(key["captions"])
    torch.save({"key": key, "table": torch.randn(n, 77, 768, generator=g), "pooled": torch.randn(n, 768, generator=g)},
               path)
    return path


def _train(out, emb_cache, seed):
    import comfy.cli_args
    # the script selects SDPA and its thread count for its own process: restore both for the other tests
    sdpa, threads = comfy.cli_args.args.use_pytorch_cross_attention, torch.get_num_threads()
    try:
        TD.main(["--out", out, "--steps", "2", "--batch", "3", "--warmup", "1", "--threads", "1", "--ckpt-every", "0",
                 "--emb-cache", emb_cache, "--log-every", "1", "--seed", str(seed)])
    finally:
        comfy.cli_args.args.use_pytorch_cross_attention = sdpa
        torch.set_num_threads(threads)
    import safetensors.torch
    return safetensors.torch.load_file(out)


def test_two_training_steps_are_deterministic_and_load_as_flux(tmp_path, emb_cache):
    a = _train(str(tmp_path / "a.safetensors"), emb_cache, seed=5)
    b = _train(str(tmp_path / "b.safetensors"), emb_cache, seed=5)
    c = _train(str(tmp_path / "c.safetensors"), emb_cache, seed=6)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)
    init = comfy_glue.build_dit_model(seed=5).diffusion_model.state_dict()
    assert any(not torch.equal(a[k], init[k].half()) for k in a)            # the steps moved the weights
    meta = comfy_glue.weights_metadata(str(tmp_path / "a.safetensors"))
    assert meta["prediction"] == "flow" and float(meta["shift"]) == comfy_glue.DIT_SHIFT
    model, _clip, _vae = comfy_glue.load_shapes_world_dit(str(tmp_path / "a.safetensors"))
    assert detect_family(model) == "Flux"
