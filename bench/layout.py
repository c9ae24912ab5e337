"""layout_iter_time_ratio, layout_iter_mem_ratio, layout_run_time_ratio (issue 4).

Model: a tiny random SD1.5-shaped UNet with four levels (channel_mult 1,2,2,2; attention at 1/2,
1/4 and the 1/8 middle block, none at full resolution), 64x64 latent, one prompt, cfg 7, euler.
Its weights are made inference tensors, as ComfyUI's loaders leave them when a workflow runs, so
the way backward guidance gets gradients through them is part of what is measured (default:
weight references, no copy; layout_iter_mem_ratio_copy reports the copy alternative).
Guidance: one box over the left half for tokens 2-3, the default layers (mid, up@1/4).

- iter time: (guided run - plain run) / plain run, with every step guided by exactly one
  iteration (threshold 0): the cost of one iteration relative to one CFG step.
- iter mem: extra peak RSS of a 1-step run with one iteration vs a 1-step plain run (fresh
  processes, above the loaded-model baseline).
- run time: 50 steps with the paper's schedule (strength 30, at most 5 iterations while E > 0.2,
  first 10 steps) vs 50 plain steps.
"""
from __future__ import annotations

import argparse
import json
import sys

import torch

from bench import common

CFG = dict(channel_mult=[1, 2, 2, 2], num_res_blocks=[1, 1, 1, 1], transformer_depth=[0, 1, 1, 0],
           transformer_depth_output=[0, 0, 1, 1, 1, 1, 0, 0])


def _setup(backend):
    impl = common.setup(backend)
    import ac_models as M
    model = M.tiny_sd15(**CFG)
    dm = model.model.diffusion_model
    with torch.inference_mode():
        dm.load_state_dict({k: v.clone() for k, v in dm.state_dict().items()}, assign=True)
    g = torch.Generator().manual_seed(5)
    pos = [[torch.randn(1, 77, 768, generator=g), {}]]
    neg = [[torch.zeros(1, 77, 768), {}]]
    lat = {"samples": torch.zeros(1, 4, 64, 64)}
    return impl, M, model, pos, neg, lat


def guided_model(model, iterations, threshold, fraction):
    from attention_control.attention import layout as L
    from attention_control.attention.core import LayerSelector
    from attention_control.attention.router import attach
    box = L.Box("x", 0.0, 0.0, 0.5, 1.0)
    ctrl = L.LayoutController([L.LayoutObject(box, [2, 3])], 77, LayerSelector.parse(L.DEFAULT_LAYERS),
                              "backward", 30.0, iterations, threshold, fraction)
    return attach(model, ctrl), ctrl


def time_case(backend, which, pairs):
    impl, M, model, pos, neg, lat = _setup(backend)
    if which == "iter":
        steps, (gm, ctrl) = 4, guided_model(model, 1, 0.0, 1.0)
    else:
        steps, (gm, ctrl) = 50, guided_model(model, 5, 0.2, 0.2)
    with torch.inference_mode():
        res = common.interleaved_ratio(lambda: M.ksample(model, pos, neg, lat, steps=steps, cfg=7.0),
                                       lambda: M.ksample(gm, pos, neg, lat, steps=steps, cfg=7.0), pairs=pairs)
    res["attention"] = impl
    res["iterations"] = sum(len(it) for _, it in ctrl.last_energy_log)
    return res


def mem_case(backend, which):
    _, M, model, pos, neg, lat = _setup(backend)
    gm, ctrl = guided_model(model, 1, 0.0, 1.0)
    if which == "guided_copy":
        ctrl.weights = "copy"
    m = model if which == "plain" else gm
    with torch.inference_mode():
        M.ksample(model, pos, neg, lat, steps=1, cfg=7.0)
        base = common.reset_peak()
        M.ksample(m, pos, neg, lat, steps=1, cfg=7.0)
    return {"extra_mb": (common.peak_kb() - base) / 1024.0}


def collect(quick=False):
    out = {}
    env = common.MEM_ENV
    pairs = "2" if quick else str(common.PAIRS)
    for backend in ("subquad", "sdpa"):
        it = common.run_child("bench.layout", "time", backend, "iter", pairs)
        # 50 steps: half the pairs (25 s a pair; see bench/common.py)
        rt = common.run_child("bench.layout", "time", backend, "run", "2" if quick else str(common.PAIRS // 2))
        mem = {w: min(common.run_child("bench.layout", "mem", backend, w, env_extra=env)["extra_mb"]
                      for _ in range(1 if quick else 2)) for w in ("plain", "guided", "guided_copy")}
        settings = (f"tiny SD1.5-shaped UNet (4 levels, attention at 32x32, 16x16, 8x8 mid), 64x64 latent, "
                    f"inference-tensor weights, attention={it['attention']}")
        mem_ratio = mem["guided"] / max(mem["plain"], 1e-6)
        # (1 CFG step + 1 iteration) / (1 CFG step) - 1
        out[f"layout_iter_time_ratio[{backend}]"] = common.time_figure(
            it, 2.0, settings + ", one guidance iteration (forward to the last guided layer + backward, cond row) "
                                "vs one CFG step, 4 steps each guided once, CPU time", shift=-1.0)
        out[f"layout_iter_mem_ratio[{backend}]"] = {
            "value": round(mem_ratio, 4), "target": 2.5, "unit": "x",
            "settings": settings + f", 1-step run with one iteration vs 1-step plain run: extra peak RSS "
                                   f"{mem['guided']:.1f} MB / {mem['plain']:.1f} MB"}
        out[f"layout_iter_mem_ratio_copy[{backend}]"] = {
            "value": round(mem["guided_copy"] / max(mem["plain"], 1e-6), 4), "target": None, "unit": "x",
            "settings": settings + f", as layout_iter_mem_ratio with weights=copy (temporary copy of the guided "
                                   f"blocks instead of weight references): {mem['guided_copy']:.1f} MB"}
        out[f"layout_run_time_ratio[{backend}]"] = common.time_figure(
            rt, 3.0, settings + f", 50 euler steps, strength 30, <= 5 iterations while E > 0.2 in the first 10 "
                                f"steps ({rt['iterations']} iterations done), CPU time")
    return common.add_worst(out, ['layout_iter_time_ratio', 'layout_iter_mem_ratio', 'layout_run_time_ratio'])


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("what", choices=["time", "mem"])
    ap.add_argument("backend", choices=["subquad", "sdpa"])
    ap.add_argument("which", choices=["iter", "run", "plain", "guided", "guided_copy"])
    ap.add_argument("pairs", type=int, nargs="?", default=common.PAIRS)
    a = ap.parse_args()
    res = time_case(a.backend, a.which, a.pairs) if a.what == "time" else mem_case(a.backend, a.which)
    sys.stdout.write(json.dumps(res) + "\n")
