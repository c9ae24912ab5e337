"""Word segmentation of real images (issue 21; report): segment_seconds_per_image, segment_step_time_ratio
and segment_mem_ratio.

Model: bench/layout.py's tiny SD1.5-shaped UNet (four levels, attention at 32x32, 16x16, 8x8 mid), 64x64 latent
(a 512x512 image), two words, the node's defaults (noise_level 0.1, samples 1, refine 1, refine_layers auto:
the 32x32 self-attention layers): one capture call and one propagation call, positive only.
- segment_seconds_per_image: median CPU seconds of one segmentation (one image), on this machine (absolute;
  the ratio below is the portable figure).
- segment_step_time_ratio: that time vs one KSampler step at cfg 5 (cond + uncond rows), ABBA-interleaved.
- segment_mem_ratio: extra peak RSS of one segmentation vs one 1-step KSampler run at cfg 5, above the
  loaded-model baseline, fresh processes (min of 2).
"""
from __future__ import annotations

import json
import statistics
import sys

import torch

from bench import common
from bench.layout import _setup

WORDS = ([2], [3, 4])


def _segmenter(M, model, pos, lat):
    from attention_control.attention.capture import AttentionMaps, CaptureController, WordSpec
    from attention_control.attention.core import LayerSelector
    from attention_control.attention.segment_glue import noise_sigma
    from attention_control.nodes.segment import segment_maps
    sigma = noise_sigma(model, 0.1)

    def run():
        handle = AttentionMaps(["a", "b"])
        cap = CaptureController([WordSpec(str(i), p) for i, p in enumerate(WORDS)], 77, handle,
                                LayerSelector.parse("all"))
        return segment_maps(model, pos, lat["samples"], cap, handle, sigma, 1, 0, 1)
    return run


def time_case(backend, pairs):
    impl, M, model, pos, neg, lat = _setup(backend)
    seg = _segmenter(M, model, pos, lat)
    with torch.inference_mode():
        res = common.interleaved_ratio(lambda: M.ksample(model, pos, neg, lat, steps=1, cfg=5.0), seg, pairs=pairs)
    res["seconds"] = statistics.median(res["b_s"])
    res["attention"] = impl
    return res


def mem_case(backend, which):
    _, M, model, pos, neg, lat = _setup(backend)
    seg = _segmenter(M, model, pos, lat)
    with torch.inference_mode():
        M.ksample(model, pos, neg, lat, steps=1, cfg=5.0)
        seg()
        base = common.reset_peak()
        if which == "plain":
            M.ksample(model, pos, neg, lat, steps=1, cfg=5.0)
        else:
            seg()
    return {"extra_mb": (common.peak_kb() - base) / 1024.0}


SETTINGS = ("tiny SD1.5-shaped UNet (4 levels, attention at 32x32, 16x16, 8x8 mid), 64x64 latent, 2 words, "
            "node defaults (noise 0.1, 1 sample, refine 1 on the 32x32 self-attention)")


def collect(quick=False):
    out = {}
    for backend in common.BACKENDS:
        t = common.run_child("bench.segment", "time", backend, "2" if quick else str(common.PAIRS))
        out[f"segment_seconds_per_image[{backend}]"] = {
            "value": round(t["seconds"], 4), "target": None, "unit": "s",
            "settings": SETTINGS + f", {t['attention']}, median CPU seconds of {t['pairs']} runs, 1 thread"}
        out[f"segment_step_time_ratio[{backend}]"] = common.time_figure(
            t, None, SETTINGS + f", {t['attention']}: one segmentation vs one KSampler step at cfg 5")
        mem = {w: min(common.run_child("bench.segment", "mem", backend, w, env_extra=common.MEM_ENV)["extra_mb"]
                      for _ in range(1 if quick else 2)) for w in ("plain", "segment")}
        out[f"segment_mem_ratio[{backend}]"] = {
            "value": round(mem["segment"] / max(mem["plain"], 1e-6), 4), "target": None, "unit": "x",
            "settings": SETTINGS + f": one segmentation vs one 1-step KSampler run at cfg 5, extra peak RSS "
                                   f"{mem['segment']:.1f} MB / {mem['plain']:.1f} MB, fresh processes"}
    return common.add_worst(out, ["segment_seconds_per_image", "segment_step_time_ratio", "segment_mem_ratio"])


if __name__ == "__main__":
    a = sys.argv[1:]          # time BACKEND PAIRS | mem BACKEND plain|segment
    res = time_case(a[1], int(a[2])) if a[0] == "time" else mem_case(a[1], a[2])
    sys.stdout.write(json.dumps(res) + "\n")
