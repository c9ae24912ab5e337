"""masactrl_time_ratio, masactrl_peak_mem_ratio, inversion_step_time_ratio (issue 5).

Model: the tiny random SD1.5-shaped UNet of bench/p2p.py (attention at 32x32, 16x16 and the
middle, 64x64 latent), euler, 20 steps, cfg 7, batch [source, target] from shared noise.
MasaCtrl: start step 4/50 of the steps, start layer auto (the decoder's two finest attention
levels), mutual mode. Baseline: the same batch and conditioning without control.
Inversion: 20 DDIM inversion steps (CFG 1, batch 1) vs 20 euler sampling steps at CFG 1.
"""
from __future__ import annotations

import argparse
import json
import sys

import torch

from bench import common


def _setup(backend):
    impl = common.setup(backend)
    import ac_models as M
    model = M.tiny_sd15(transformer_depth=[0, 1, 1], transformer_depth_output=[0, 0, 1, 1, 1, 1])
    g = torch.Generator().manual_seed(5)
    pos = [[torch.randn(2, 77, 768, generator=g), {}]]
    neg = [[torch.zeros(2, 77, 768), {}]]
    lat = {"samples": torch.zeros(2, 4, 64, 64), "batch_index": [0, 0]}
    return impl, M, model, pos, neg, lat


def masa_model(model):
    from attention_control.attention.masactrl import MasaCtrlController
    from attention_control.attention.router import attach
    return attach(model, MasaCtrlController(start_step=4 / 50))


def time_case(backend, which, steps, pairs):
    impl, M, model, pos, neg, lat = _setup(backend)
    if which == "masactrl":
        m = masa_model(model)
        res = common.interleaved_ratio(lambda: M.ksample(model, pos, neg, lat, steps=steps, cfg=7.0),
                                       lambda: M.ksample(m, pos, neg, lat, steps=steps, cfg=7.0), pairs=pairs)
    else:
        import nodes
        from attention_control.attention.inversion_glue import ddim_invert
        one_pos, one_neg = [[pos[0][0][:1], {}]], [[neg[0][0][:1], {}]]
        img = {"samples": torch.randn(1, 4, 64, 64, generator=torch.Generator().manual_seed(1)) * 0.5}

        def sample():
            nodes.common_ksampler(model, 0, steps, 1.0, "euler", "normal", one_pos, one_neg, img, disable_noise=True)

        res = common.interleaved_ratio(sample, lambda: ddim_invert(model, one_pos, img, steps, "normal"), pairs=pairs)
    res["attention"] = impl
    return res


def mem_case(backend, which, steps):
    _, M, model, pos, neg, lat = _setup(backend)
    m = model if which == "plain" else masa_model(model)
    M.ksample(m, pos, neg, lat, steps=1, cfg=7.0)
    base = common.reset_peak()
    M.ksample(m, pos, neg, lat, steps=steps, cfg=7.0)
    return {"extra_mb": (common.peak_kb() - base) / 1024.0}


def collect(quick=False):
    out = {}
    steps = 20
    env = common.MEM_ENV
    pairs = "2" if quick else str(common.PAIRS)
    for backend in ("subquad", "sdpa"):
        t = common.run_child("bench.masactrl", "time", backend, "masactrl", str(steps), pairs)
        inv = common.run_child("bench.masactrl", "time", backend, "inversion", str(steps), pairs)
        mem = {w: min(common.run_child("bench.masactrl", "mem", backend, w, "4", env_extra=env)["extra_mb"]
                      for _ in range(1 if quick else 2)) for w in ("plain", "masactrl")}
        settings = (f"tiny SD1.5-shaped UNet (attention at 32x32, 16x16, mid), 64x64 latent, "
                    f"attention={t['attention']}")
        mr = mem["masactrl"] / max(mem["plain"], 1e-6)
        out[f"masactrl_time_ratio[{backend}]"] = common.time_figure(
            t, 1.05, settings + f", batch [source, target], {steps} euler steps, cfg 7, CPU time")
        out[f"masactrl_peak_mem_ratio[{backend}]"] = {
            "value": round(mr, 4), "target": 1.05, "unit": "x",
            "settings": settings + f", extra peak RSS {mem['masactrl']:.1f} MB / plain {mem['plain']:.1f} MB"}
        out[f"inversion_step_time_ratio[{backend}]"] = common.time_figure(
            inv, 1.1, settings + f", batch 1, {steps} DDIM inversion steps vs {steps} euler steps at cfg 1, CPU time")
    return common.add_worst(out, ['masactrl_time_ratio', 'masactrl_peak_mem_ratio', 'inversion_step_time_ratio'])


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("what", choices=["time", "mem"])
    ap.add_argument("backend", choices=["subquad", "sdpa"])
    ap.add_argument("which", choices=["masactrl", "inversion", "plain"])
    ap.add_argument("steps", type=int)
    ap.add_argument("pairs", type=int, nargs="?", default=common.PAIRS)
    a = ap.parse_args()
    res = time_case(a.backend, a.which, a.steps, a.pairs) if a.what == "time" else mem_case(a.backend, a.which, a.steps)
    sys.stdout.write(json.dumps(res) + "\n")
