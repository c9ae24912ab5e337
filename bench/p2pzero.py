"""p2pzero_step_time_ratio, p2pzero_mem_ratio (issue 20).

Model: the tiny random SD1.5-shaped UNet of bench/layout.py (four levels, attention at 32x32, 16x16 and
the 8x8 middle block), 64x64 latent, inference-tensor weights, cfg 5, euler. The batch is what the
Pix2Pix-Zero node builds: [reference, edit] from one noise, the caption and the caption plus a direction.
Guidance: the controller on every cross-attention layer (the node's default), every step guided.

- step time: a guided step (one positive-only forward of both items through every cross layer with
  gradients, its backward, then the CFG step at the moved latent) vs a plain CFG step of the same batch.
- mem: extra peak RSS of a 1-step guided run vs a 1-step plain run (fresh processes, above the
  loaded-model baseline).
"""
from __future__ import annotations


import torch

from bench import common
from bench.layout import _setup


def _batch(pos, neg, lat):
    g = torch.Generator().manual_seed(9)
    emb = pos[0][0]
    pos2 = [[torch.cat([emb, emb + 0.3 * torch.randn(emb.shape, generator=g)]), {}]]
    neg2 = [[neg[0][0].repeat(2, 1, 1), {}]]
    lat2 = {"samples": lat["samples"].repeat(2, 1, 1, 1), "batch_index": [0, 0]}
    return pos2, neg2, lat2


def guided_model(model):
    from attention_control.attention.pix2pix_zero import GUIDANCE_GENERATED, Pix2PixZeroController
    from attention_control.attention.router import attach
    ctrl = Pix2PixZeroController(GUIDANCE_GENERATED, 1.0)
    return attach(model, ctrl), ctrl


def time_case(backend, pairs):
    impl, M, model, pos, neg, lat = _setup(backend)
    pos, neg, lat = _batch(pos, neg, lat)
    gm, ctrl = guided_model(model)
    with torch.inference_mode():
        res = common.interleaved_ratio(lambda: M.ksample(model, pos, neg, lat, steps=4, cfg=5.0),
                                       lambda: M.ksample(gm, pos, neg, lat, steps=4, cfg=5.0), pairs=pairs)
    res["attention"] = impl
    res["guided_steps"] = len(ctrl.last_loss_log)
    return res


def mem_case(backend, which):
    _, M, model, pos, neg, lat = _setup(backend)
    pos, neg, lat = _batch(pos, neg, lat)
    gm, _ctrl = guided_model(model)
    return common.one_step_extra_mb(M, model, model if which == "plain" else gm, pos, neg, lat)


def collect(quick=False):
    return common.guided_collect(
        "bench.p2pzero", "p2pzero",
        "tiny SD1.5-shaped UNet (4 levels, attention at 32x32, 16x16, 8x8 mid), 64x64 latent, batch "
        "[reference, edit], inference-tensor weights, attention={attention}",
        "guided step (positive-only forward of both items through every cross layer + backward, then the CFG "
        "step) vs plain CFG step, 4 steps all guided ({guided_steps} guided), CPU time", quick)


if __name__ == "__main__":
    common.guided_main(time_case, mem_case)
