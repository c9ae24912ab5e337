"""capture_overhead_ratio and capture_memory_growth_mb (issue 2).

Model: a tiny random SD1.5-shaped UNet (32 channels, 8 heads, attention at latent/2 and /4 and in
the middle: 32x32, 16x16 and 16x16 maps at a 64x64 latent), euler, cfg 7, random 77-token
conditioning; capture of 2 words (one of two tokens) on all layers.
"""
from __future__ import annotations

import argparse
import json
import sys

from bench import common


def _model_and_conds():
    import ac_models as M
    import torch
    torch.manual_seed(0)
    model = M.tiny_sd15(transformer_depth=[0, 1, 1], transformer_depth_output=[0, 0, 1, 1, 1, 1])
    pos, neg = M.cond(seed=1), M.cond(seed=2)
    return M, model, pos, neg


def _capture(model, words=((2,), (5, 6))):
    from attention_control.attention.capture import AttentionMaps, CaptureController, WordSpec
    from attention_control.attention.core import LayerSelector
    from attention_control.attention.router import attach
    specs = [WordSpec(f"w{i}", list(p)) for i, p in enumerate(words)]
    handle = AttentionMaps([s.label for s in specs])
    return attach(model, CaptureController(specs, 77, handle, LayerSelector.parse("all"))), handle


def time_case(backend: str, steps: int, pairs: int) -> dict:
    impl = common.setup(backend)
    M, model, pos, neg = _model_and_conds()
    cap, handle = _capture(model)
    lat = M.latent(1, 64, 64)
    res = common.interleaved_ratio(lambda: M.ksample(model, pos, neg, lat, steps=steps, cfg=7.0),
                                   lambda: M.ksample(cap, pos, neg, lat, steps=steps, cfg=7.0), pairs=pairs)
    assert handle.maps is not None
    res["attention"] = impl
    return res


def mem_case(backend: str, steps: int) -> dict:
    common.setup(backend)
    M, model, pos, neg = _model_and_conds()
    cap, handle = _capture(model)
    lat = M.latent(1, 64, 64)
    M.ksample(cap, pos, neg, lat, steps=1, cfg=7.0)   # load and warm the allocator on the same shapes
    base = common.reset_peak()
    M.ksample(cap, pos, neg, lat, steps=steps, cfg=7.0)
    return {"extra_mb": (common.peak_kb() - base) / 1024.0}


def collect(quick: bool = False) -> dict:
    """All figures of this module, each case in fresh processes, both attention backends."""
    steps = 20
    out = {}
    for backend in ("subquad", "sdpa"):
        r = common.run_child("bench.capture", "time", backend, str(steps), "2" if quick else str(common.PAIRS))
        out[f"capture_overhead_ratio[{backend}]"] = common.time_figure(
            r, 1.10, f"tiny SD1.5-shaped UNet (attention at 32x32 and 16x16), 64x64 latent, {steps} euler steps, "
                     f"2 words all layers, attention={r['attention']}, CPU time")
        env = common.MEM_ENV
        reps = 1 if quick else 2
        m20 = min(common.run_child("bench.capture", "mem", backend, "20", env_extra=env)["extra_mb"]
                  for _ in range(reps))
        m100 = min(common.run_child("bench.capture", "mem", backend, "100", env_extra=env)["extra_mb"]
                   for _ in range(reps))
        out[f"capture_memory_growth_mb[{backend}]"] = {
            "value": round(m100 - m20, 2), "target": 5.0, "unit": "MB",
            "settings": f"extra peak RSS after 100 steps ({m100:.1f} MB) minus after 20 ({m20:.1f} MB), fresh processes, "
                        f"min of {reps}, MALLOC_ARENA_MAX=1, MALLOC_MMAP_THRESHOLD_=131072"}
    return common.add_worst(out, ["capture_overhead_ratio", "capture_memory_growth_mb"])


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("what", choices=["time", "mem"])
    ap.add_argument("backend", choices=["subquad", "sdpa"])
    ap.add_argument("steps", type=int)
    ap.add_argument("pairs", type=int, nargs="?", default=common.PAIRS)
    a = ap.parse_args()
    res = time_case(a.backend, a.steps, a.pairs) if a.what == "time" else mem_case(a.backend, a.steps)
    sys.stdout.write(json.dumps(res) + "\n")
