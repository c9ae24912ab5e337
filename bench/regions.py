"""pww_overhead_ratio, regions{1,2,4}_time_ratio (issue 7).

Model: the tiny random SD1.5-shaped UNet of bench/p2p.py (attention at 32x32, 16x16 and the middle,
64x64 latent), euler, 20 steps, cfg 7, batch 1; random 77x768 conditioning (the text encoder is not
part of the measurement).
- paint-with-words: two phrases painted on two boxes (left / right half), eDiff-I mode, weight 0.1,
  every cross-attention layer, vs plain sampling of the same prompt.
- region conditioning: N vertical strips covering the canvas (so the background entry is dropped)
  with bootstrapping 0.4, vs plain sampling of one prompt. MultiDiffusion evaluates the model once
  per region: N region rows + the negative row against 2 rows, and during bootstrapping each region
  its own CFG pair (2 N rows), so the ratio grows about as 0.4 * N + 0.6 * (N + 1) / 2.
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
    pos = [[torch.randn(1, 77, 768, generator=g), {}]]
    neg = [[torch.zeros(1, 77, 768), {}]]
    lat = {"samples": torch.zeros(1, 4, 64, 64)}
    return impl, M, model, pos, neg, lat


def pww_model(model):
    from attention_control.attention.core import LayerSelector
    from attention_control.attention.regions import PaintedPhrase, PaintWithWordsController
    from attention_control.attention.router import attach
    left = torch.zeros(64, 64)
    left[:, :32] = 1.0
    phrases = [PaintedPhrase("a", [2, 3], left, 1.0), PaintedPhrase("b", [6, 7], 1.0 - left, 1.0)]
    return attach(model, PaintWithWordsController(phrases, 77, 0.1, "ediff-i", selector=LayerSelector.parse("all")))


def regions_model(model, n):
    from attention_control.attention.region_prompts import Region
    from attention_control.nodes.regions import region_conditioning
    regions = []
    for i in range(n):
        m = torch.zeros(64, 64)
        m[:, i * 64 // n:(i + 1) * 64 // n] = 1.0
        regions.append(Region(f"region {i}", m))
    g = torch.Generator().manual_seed(11)
    return region_conditioning(model, lambda text: [[torch.randn(1, 77, 768, generator=g), {}]], regions, "", 0.4)


def time_case(backend, which, steps, pairs):
    impl, M, model, pos, neg, lat = _setup(backend)
    if which == "pww":
        m, mpos = pww_model(model), pos
    else:
        m, mpos = regions_model(model, int(which[len("regions"):]))
    res = common.interleaved_ratio(lambda: M.ksample(model, pos, neg, lat, steps=steps, cfg=7.0),
                                   lambda: M.ksample(m, mpos, neg, lat, steps=steps, cfg=7.0), pairs=pairs)
    res["attention"] = impl
    return res


def collect(quick=False):
    out = {}
    steps = 20
    pairs = "2" if quick else str(common.PAIRS)
    for backend in common.BACKENDS:
        settings = None
        for which in ("pww", "regions1", "regions2", "regions4"):
            t = common.run_child("bench.regions", backend, which, str(steps), pairs)
            settings = (f"tiny SD1.5-shaped UNet (attention at 32x32, 16x16, mid), 64x64 latent, "
                        f"attention={t['attention']}, batch 1, {steps} euler steps, cfg 7, CPU time")
            if which == "pww":
                out[f"pww_overhead_ratio[{backend}]"] = common.time_figure(
                    t, 1.10, settings + ", paint-with-words (eDiff-I, 2 phrases on 2 boxes, every cross-attention "
                                        "layer) vs plain sampling")
            else:
                n = int(which[len("regions"):])
                out[f"regions{n}_time_ratio[{backend}]"] = common.time_figure(
                    t, "report", settings + f", {n} region(s) covering the canvas, bootstrap 0.4, vs plain sampling "
                                            f"({n} region rows + the negative vs 2 rows; {2 * n} rows in the bootstrap steps)")
    return common.add_worst(out, ["pww_overhead_ratio"])


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("backend", choices=list(common.BACKENDS))
    ap.add_argument("which", choices=["pww", "regions1", "regions2", "regions4"])
    ap.add_argument("steps", type=int)
    ap.add_argument("pairs", type=int, nargs="?", default=common.PAIRS)
    a = ap.parse_args()
    sys.stdout.write(json.dumps(time_case(a.backend, a.which, a.steps, a.pairs)) + "\n")
