"""dit_region_overhead_ratio (issue 17): attention-mask region prompts on a DiT vs plain sampling.

Model: the tiny random Flux-shaped DiT of bench/dit_capture.py (ComfyUI's own Flux class, hidden 128,
4 heads of 32, 2 double and 2 single blocks, patch 2, guidance-distilled: cfg 1, one cond row per
step), a 64x64 latent (1024 image tokens), 10 euler steps. Regions: a base prompt of 128 tokens and
2 regions of 64 tokens each (left half, top-right quadrant; the rest is background), image_attention
"region", masks on every block and step; plain: one prompt of the same 256 tokens. Both sample one
model call per step with the same sequence length.
- dit_region_overhead_ratio: the default execution (calls without a mask of their own): one host
  attention call per query class on the keys that class may see; the masked-out pairs are never
  computed, so it can be faster than plain sampling.
- dit_region_mask_overhead_ratio (report): the same regions with the mask handed to the host's
  attention as an additive mask (the execution for calls that carry a mask, e.g. Flux's
  attention_mask), built once per run and geometry.
"""
from __future__ import annotations

import argparse
import json
import sys

from bench import common
from bench.dit_capture import CFG, DIT_64

LENGTHS = (128, 64, 64)
STEPS = 10


def _setup(execution="auto"):
    import torch
    import ac_dit
    from attention_control.attention.region_prompts import Region
    from attention_control.nodes.regions import dit_region_conditioning
    model = ac_dit.build("Flux", CFG, seed=7)
    g = torch.Generator().manual_seed(1)
    extra = {"pooled_output": torch.randn(1, 16, generator=g), "guidance": 3.5}
    plain = [[torch.randn(1, sum(LENGTHS), 32, generator=g), extra]]
    texts = {"base": LENGTHS[0], "left": LENGTHS[1], "top right": LENGTHS[2]}
    parts = {k: torch.randn(1, n, 32, generator=g) for k, n in texts.items()}
    left, top_right = torch.zeros(64, 64), torch.zeros(64, 64)
    left[:, :32] = 1.0
    top_right[:32, 32:] = 1.0
    regions = (Region("left", left), Region("top right", top_right))
    rm, rpos = dit_region_conditioning(model, lambda text: [[parts[text], dict(extra)]], regions, "base")
    from attention_control.attention.dit_router import get_dit_router
    get_dit_router(rm).controllers[-1].execution = execution
    latent = torch.zeros(1, 16, 64, 64)
    noise = torch.randn(latent.shape, generator=g)
    return ac_dit, model, plain, rm, rpos, latent, noise


def time_case(backend: str, steps: int, pairs: int, execution: str = "auto") -> dict:
    impl = common.setup(backend)
    M, model, plain, rm, rpos, latent, noise = _setup(execution)
    res = common.interleaved_ratio(lambda: M.sample(model, noise, plain, plain, latent, steps=steps, cfg=1.0),
                                   lambda: M.sample(rm, noise, rpos, plain, latent, steps=steps, cfg=1.0), pairs=pairs)
    res["attention"] = impl
    return res


def collect(quick: bool = False) -> dict:
    """dit_region_overhead_ratio per CPU attention backend (each in a fresh process) and the worst."""
    out = {}
    pairs = "2" if quick else str(common.PAIRS)
    for backend in common.BACKENDS:
        for name, execution, target in (("dit_region_overhead_ratio", "auto", 1.15),
                                         ("dit_region_mask_overhead_ratio", "mask", "report")):
            r = common.run_child("bench.dit_regions", backend, str(STEPS), pairs, execution)
            how = ("one host attention call per query class" if execution == "auto" else
                   "the mask handed to the host's attention")
            out[f"{name}[{backend}]"] = common.time_figure(
                r, target, f"{DIT_64}, {STEPS} euler steps, cfg 1, attention={r['attention']}, CPU time: 2 "
                           f"regions (base {LENGTHS[0]} + {LENGTHS[1]} + {LENGTHS[2]} tokens, image_attention region, "
                           f"every block and step; {how}) vs plain sampling of one {sum(LENGTHS)}-token prompt")
    return common.add_worst(out, ["dit_region_overhead_ratio", "dit_region_mask_overhead_ratio"])


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("backend", choices=list(common.BACKENDS))
    ap.add_argument("steps", type=int)
    ap.add_argument("pairs", type=int, nargs="?", default=common.PAIRS)
    ap.add_argument("execution", nargs="?", default="auto", choices=["auto", "mask"])
    a = ap.parse_args()
    sys.stdout.write(json.dumps(time_case(a.backend, a.steps, a.pairs, a.execution)) + "\n")
