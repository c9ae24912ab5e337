"""experts_peak_mem_ratio (issue 21, eDiff-I's expert denoisers; report).

Model: two tiny random SD1.5-shaped UNets of bench/layout.py's shape (four levels, attention at 32x32, 16x16,
8x8 mid; the second from another seed), 64x64 latent, one prompt, inference-tensor weights, cfg 5, euler, 2
steps with the switch at 0.5 (one step per expert). The figure: extra peak RSS of the run through Expert
Denoisers vs the same run on the first model alone, above the baseline with both models loaded (fresh
processes). On CPU "loading" moves nothing: the figure is what the switch itself costs (the second expert's
conditioning pass and patcher state), not the VRAM of two checkpoints, which ComfyUI's model management
governs on a GPU.
"""
from __future__ import annotations

import json
import sys

import torch

from bench import common
from bench.layout import CFG, _setup


def mem_case(backend, which):
    _, M, model, pos, neg, lat = _setup(backend)
    other = M.tiny_sd15(seed=4321, **CFG)
    dm = other.model.diffusion_model
    with torch.inference_mode():
        dm.load_state_dict({k: v.clone() for k, v in dm.state_dict().items()}, assign=True)
    from attention_control.nodes.experts import experts_model
    m = model if which == "plain" else experts_model(model, [other], [0.5])[0]
    with torch.inference_mode():
        M.ksample(model, pos, neg, lat, steps=2, cfg=5.0)
        M.ksample(other, pos, neg, lat, steps=2, cfg=5.0)
        base = common.reset_peak()
        M.ksample(m, pos, neg, lat, steps=2, cfg=5.0)
    return {"extra_mb": (common.peak_kb() - base) / 1024.0}


def collect(quick=False):
    out = {}
    for backend in common.BACKENDS:
        mem = {w: min(common.run_child("bench.experts", "mem", backend, w, env_extra=common.MEM_ENV)["extra_mb"]
                      for _ in range(1 if quick else 2)) for w in ("plain", "experts")}
        out[f"experts_peak_mem_ratio[{backend}]"] = {
            "value": round(mem["experts"] / max(mem["plain"], 1e-6), 4), "target": None, "unit": "x",
            "settings": f"two tiny SD1.5-shaped UNets (4 levels, attention at 32x32, 16x16, 8x8 mid), 64x64 latent, "
                        f"cfg 5, euler, 2 steps, switch 0.5 (one step each), both loaded; extra peak RSS "
                        f"{mem['experts']:.1f} MB (experts) / {mem['plain']:.1f} MB (the first model alone), fresh "
                        f"processes, min of {1 if quick else 2}"}
    return common.add_worst(out, ["experts_peak_mem_ratio"])


if __name__ == "__main__":
    a = sys.argv[1:]          # mem BACKEND plain|experts
    sys.stdout.write(json.dumps(mem_case(a[1], a[2])) + "\n")
