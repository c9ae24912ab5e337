"""Shapes-world training pieces: the token-grounding loss against a naive loop, the caption token
positions on the real tokenizer, and a two-step training run that writes loadable weights."""
import os

import numpy as np
import torch

from attention_control.shapesworld import train as T


def test_grounding_loss_equals_a_naive_loop():
    g = torch.Generator().manual_seed(0)
    b = 3
    maps = [torch.softmax(torch.randn(b, n, 77, generator=g), -1) for n in (256, 64, 1024)]
    cols = torch.randint(1, 10, (b, 2, 2), generator=g)
    valid = torch.tensor([[1.0, 1.0], [1.0, 0.0], [0.0, 0.0]])
    masks = (torch.rand(b, 2, 32, 32, generator=g) > 0.7).float()
    got = T.grounding_loss(maps, cols, valid, masks)
    per_layer = []
    for p in maps:
        side = int(p.shape[1] ** 0.5)
        terms = []
        for i in range(b):
            for k in range(2):
                if not valid[i, k]:
                    continue
                m = torch.nn.functional.adaptive_avg_pool2d(masks[i, k][None, None], (side, side)).flatten()
                for w in range(2):
                    a = p[i, :, cols[i, k, w]]
                    terms.append((1.0 - float((a * m).sum() / a.sum())) ** 2 / 2)
        per_layer.append(sum(terms) / 3)            # 3 valid objects; the two words averaged
    assert abs(float(got) - sum(per_layer) / len(per_layer)) < 1e-5


def test_caption_positions_on_the_real_tokenizer():
    pos = T.caption_positions(["a red circle and a blue square", "a green triangle on the left", "a red circle"])
    assert pos["a red circle and a blue square"] == [(2, 3), (6, 7)]
    assert pos["a green triangle on the left"] == [(2, 3)]
    assert pos["a red circle"] == [(2, 3)]


def test_grounding_targets_skip_empty_captions():
    from attention_control.shapesworld import data
    rng = np.random.default_rng([1, 2])
    _imgs, caps, objs = data.sample_batch(rng, 4)
    pos = T.caption_positions(caps)
    cols, valid, masks = T.grounding_targets(objs, caps, pos, np.array([1, 0, 1, 1]))
    assert valid[1].sum() == 0
    for i in (0, 2, 3):
        assert valid[i].sum() == len(objs[i])
        assert torch.equal(masks[i, 0].bool(), torch.from_numpy(objs[i][0]["mask"]))


def test_two_training_steps_write_loadable_v_weights(tmp_path):
    import comfy.cli_args
    out = str(tmp_path / "w.safetensors")
    # the script selects SDPA and its thread count for its own process: restore both for the other tests
    sdpa, threads = comfy.cli_args.args.use_pytorch_cross_attention, torch.get_num_threads()
    try:
        T.main(["--out", out, "--steps", "2", "--batch", "4", "--warmup", "1", "--threads", "1", "--ckpt-every", "0",
                "--emb-cache", str(tmp_path / "emb.pt"), "--log-every", "1"])
    finally:
        comfy.cli_args.args.use_pytorch_cross_attention = sdpa
        torch.set_num_threads(threads)
    from attention_control.shapesworld import comfy_glue
    assert comfy_glue.weights_prediction(out) == "v"
    model, _clip, _vae = comfy_glue.load_shapes_world(out)
    assert os.path.getsize(out) < 5_000_000
    assert model.model.model_type.name == "V_PREDICTION"
