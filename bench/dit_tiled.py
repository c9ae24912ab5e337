"""dit_tiled_overhead_ratio (issue 17): tiled diffusion on a DiT with one tile covering the canvas vs
plain sampling.

Model: the tiny random Flux-shaped DiT of bench/dit_capture.py (ComfyUI's own Flux class, hidden 128,
4 heads of 32, 2 double and 2 single blocks, patch 2, guidance-distilled: cfg 1, one cond row per
step), a 64x64 latent (1024 image tokens), a 256-token context. The tiled MODEL has one 64x64 tile
(512 px, overlap 0, mixture): the same model evaluations as plain sampling (bit for bit the same
samples), so the ratio is what the wrapper costs: planning (cached per run), the crop, the weight and
the merge of one canvas-sized tensor per step. A several-tile run costs its tiles' model calls on
top, which is the method, not overhead.
"""
from __future__ import annotations

import argparse
import json
import sys

from bench import common
from bench.dit_capture import CFG, CTX, DIT

STEPS = 6
LATENT = 64


def _setup():
    import torch
    import ac_dit
    from attention_control.attention.tiled import TileConfig
    from attention_control.attention.tiled_glue import attach_tiled
    model = ac_dit.build("Flux", CFG, seed=7)
    g = torch.Generator().manual_seed(1)
    pos = [[torch.randn(1, CTX, 32, generator=g), {"pooled_output": torch.randn(1, 16, generator=g),
                                                    "guidance": 3.5}]]
    latent = torch.zeros(1, 16, LATENT, LATENT)
    noise = torch.randn(latent.shape, generator=g)
    tiled = attach_tiled(model, TileConfig(LATENT, LATENT, 0, "mixture", 1))
    return ac_dit, model, tiled, pos, latent, noise


def time_case(backend: str, pairs: int) -> dict:
    impl = common.setup(backend)
    M, model, tiled, pos, latent, noise = _setup()

    def run(m):
        return lambda: M.sample(m, noise, pos, pos, latent, steps=STEPS, cfg=1.0)

    import torch
    same = torch.equal(run(model)(), run(tiled)())
    res = common.interleaved_ratio(run(model), run(tiled), pairs=pairs)
    res["attention"] = impl
    res["bit_identical"] = bool(same)
    return res


def collect(quick: bool = False) -> dict:
    """The figure on both CPU attention backends, each in a fresh process."""
    out = {}
    for backend in common.BACKENDS:
        r = common.run_child("bench.dit_tiled", "time", backend, "2" if quick else str(common.PAIRS))
        out[f"dit_tiled_overhead_ratio[{backend}]"] = common.time_figure(
            r, 1.05, f"{DIT}, {LATENT}x{LATENT} "
                     f"latent (1024 image tokens), {CTX}-token context, {STEPS} euler steps, cfg 1: tiled with one "
                     f"{LATENT}x{LATENT} tile covering the canvas (samples bit-identical: {r['bit_identical']}) vs "
                     f"plain sampling, attention={r['attention']}, CPU time")
    return common.add_worst(out, ["dit_tiled_overhead_ratio"])


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("what", choices=["time"])
    ap.add_argument("backend", choices=list(common.BACKENDS))
    ap.add_argument("pairs", type=int, nargs="?", default=common.PAIRS)
    a = ap.parse_args()
    sys.stdout.write(json.dumps(time_case(a.backend, a.pairs)) + "\n")
