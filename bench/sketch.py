"""sketch_guidance_step_time_ratio, sketch_guidance_mem_ratio (issue 20, sketch-guided text-to-image).

Model: the tiny random SD1.5-shaped UNet of bench/layout.py (four levels, attention at 32x32, 16x16 and
the 8x8 middle block), 64x64 latent, one prompt, inference-tensor weights, cfg 5, euler. The edge predictor
has the paper's widths (512 / 256 / 128 / 64) on every self-attention layer (the node's default `all`), random
weights in eval mode (its cost does not depend on its training); the sketch is a square outline at the latent
size. Every step guided.

- step time: a guided step (the CFG step, then one positive-only forward to the last feature layer with
  gradients, the predictor and the backward) vs a plain CFG step.
- mem: extra peak RSS of a 1-step guided run vs a 1-step plain run (fresh processes, above the loaded-model
  baseline).
"""
from __future__ import annotations


import torch

from bench import common
from bench.layout import _setup


def guided_model(model):
    from attention_control.attention import sketch as SK
    from attention_control.attention.router import attach, get_router
    sites = get_router(attach(model, SK.SketchFeatures())).sites
    keys = [s.key for s in SK.feature_sites(sites, SK.SketchFeatures().selector)]
    torch.manual_seed(0)
    lgp = SK.EdgePredictor(SK.site_table(sites, keys)).eval()
    edges = torch.zeros(1, 1, 64, 64)
    edges[..., 16:48, 16] = edges[..., 16:48, 47] = edges[..., 16, 16:48] = edges[..., 47, 16:48] = 1.0
    ctrl = SK.SketchGuidance(lgp, edges, SK.DEFAULT_STRENGTH, 0.0, 1.0)
    return attach(model, ctrl), ctrl


def time_case(backend, pairs):
    impl, M, model, pos, neg, lat = _setup(backend)
    gm, ctrl = guided_model(model)
    with torch.inference_mode():
        res = common.interleaved_ratio(lambda: M.ksample(model, pos, neg, lat, steps=4, cfg=5.0),
                                       lambda: M.ksample(gm, pos, neg, lat, steps=4, cfg=5.0), pairs=pairs)
    res["attention"] = impl
    res["guided_steps"] = len(ctrl.last_loss_log)
    res["channels"] = ctrl.predictor.in_channels
    return res


def mem_case(backend, which):
    _, M, model, pos, neg, lat = _setup(backend)
    gm, _ctrl = guided_model(model)
    return common.one_step_extra_mb(M, model, model if which == "plain" else gm, pos, neg, lat)


def collect(quick=False):
    return common.guided_collect(
        "bench.sketch", "sketch_guidance",
        "tiny SD1.5-shaped UNet (4 levels, attention at 32x32, 16x16, 8x8 mid), 64x64 latent, inference-tensor "
        "weights, edge predictor 512/256/128/64 on {channels} feature channels (every self-attention layer), "
        "attention={attention}",
        "guided step (CFG step + positive-only forward to the last feature layer + predictor by 512-pixel "
        "chunks + backward) vs plain CFG step, 4 steps all guided ({guided_steps} guided), CPU time", quick)


if __name__ == "__main__":
    common.guided_main(time_case, mem_case)
