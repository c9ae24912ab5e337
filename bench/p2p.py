"""p2p_time_ratio, p2p_peak_mem_ratio, p2p_vs_naive_mem_ratio (issue 3).

Model: the tiny random SD1.5-shaped UNet of bench/capture.py (attention at 32x32 and 16x16 at a
64x64 latent), euler, 20 steps, cfg 7; batch [source, target] from shared noise; a word swap with
cross 0.8 and self 0.4. The baseline samples the same batch and conditioning without control.
The naive implementation materialises every attention matrix (as the reference code's attention
processor does) and edits the maps explicitly.
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
    ctx = torch.randn(2, 77, 768, generator=g)
    pos, neg = [[ctx, {}]], [[torch.zeros(2, 77, 768), {}]]
    lat = {"samples": torch.zeros(2, 4, 64, 64), "batch_index": [0, 0]}
    return impl, M, model, pos, neg, lat


def _edit():
    from attention_control.attention import p2p
    mapper = torch.eye(77)
    return [p2p.TargetEdit(mapper, torch.ones(77), torch.ones(77))]


def fused_model(model):
    from attention_control.attention import p2p
    from attention_control.attention.router import attach
    return attach(model, p2p.P2PController(_edit(), 0.0, 0.8, 0.4))


def naive_model(model):
    """Same edit, materialising softmax(QK^T) for every row and layer (bench-only reference)."""
    from attention_control.attention import p2p
    from attention_control.attention.core import Controller, LayerSelector
    from attention_control.attention.router import attach

    class Naive(Controller):
        name = "naive_p2p"
        kinds = frozenset({"self", "cross"})
        selector = LayerSelector()

        def begin_run(self, run):
            d = run.data(self)
            S = run.n_steps
            d["c1"] = p2p.cross_window(S, 0.0, 0.8)[1]
            d["s1"] = p2p.self_window(S, 0.4)

        def attend(self, q, k, v, call, nxt):
            d = call.run.data(self)
            h = call.site.heads
            b, n, hd = q.shape
            dh = hd // h
            sp = lambda x: x.view(x.shape[0], -1, h, dh).transpose(1, 2)
            P = torch.softmax(sp(q) @ sp(k).transpose(-1, -2) * dh ** -0.5, dim=-1)      # materialised
            B = call.batch
            for j in call.cond_chunks():
                s, t = j * B, j * B + 1
                if call.site.kind == "self" and call.step < d["s1"] and call.h * call.w <= (call.run.latent_hw[0] // 4) * (call.run.latent_hw[1] // 4):
                    P[t] = P[s]
                elif call.site.kind == "cross" and call.step < d["c1"]:
                    P[t] = P[s] @ torch.eye(k.shape[1])
            return (P @ sp(v)).transpose(1, 2).reshape(b, n, hd)

    return attach(model, Naive())


def time_case(backend, steps, pairs):
    impl, M, model, pos, neg, lat = _setup(backend)
    edit = fused_model(model)
    res = common.interleaved_ratio(lambda: M.ksample(model, pos, neg, lat, steps=steps, cfg=7.0),
                                   lambda: M.ksample(edit, pos, neg, lat, steps=steps, cfg=7.0), pairs=pairs)
    res["attention"] = impl
    return res


def mem_case(backend, which, steps):
    _, M, model, pos, neg, lat = _setup(backend)
    m = {"plain": lambda x: x, "fused": fused_model, "naive": naive_model}[which](model)
    M.ksample(m, pos, neg, lat, steps=1, cfg=7.0)
    base = common.reset_peak()
    M.ksample(m, pos, neg, lat, steps=steps, cfg=7.0)
    return {"extra_mb": (common.peak_kb() - base) / 1024.0}


def collect(quick=False):
    out = {}
    steps = 20
    env = common.MEM_ENV
    for backend in ("subquad", "sdpa"):
        r = common.run_child("bench.p2p", "time", backend, "plain", str(steps), "2" if quick else str(common.PAIRS))
        mem = {w: min(common.run_child("bench.p2p", "mem", backend, w, "4", env_extra=env)["extra_mb"]
                      for _ in range(1 if quick else 2)) for w in ("plain", "fused", "naive")}
        settings = (f"tiny SD1.5-shaped UNet (attention at 32x32 and 16x16), 64x64 latent, batch [source, target], "
                    f"attention={r['attention']}")
        out[f"p2p_time_ratio[{backend}]"] = common.time_figure(r, 1.15, settings + f", {steps} euler steps, CPU time")
        mr = mem["fused"] / max(mem["plain"], 1e-6)
        nr = mem["fused"] / max(mem["naive"], 1e-6)
        out[f"p2p_peak_mem_ratio[{backend}]"] = {
            "value": round(mr, 4), "target": 1.10, "unit": "x",
            "settings": settings + f", extra peak RSS fused {mem['fused']:.1f} MB / plain {mem['plain']:.1f} MB"}
        out[f"p2p_vs_naive_mem_ratio[{backend}]"] = {
            "value": round(nr, 4), "target": 0.5, "unit": "x",
            "settings": settings + f", extra peak RSS fused {mem['fused']:.1f} MB / naive {mem['naive']:.1f} MB"}
    return common.add_worst(out, ['p2p_time_ratio', 'p2p_peak_mem_ratio', 'p2p_vs_naive_mem_ratio'])


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("what", choices=["time", "mem"])
    ap.add_argument("backend", choices=["subquad", "sdpa"])
    ap.add_argument("which", choices=["plain", "fused", "naive"])
    ap.add_argument("steps", type=int)
    ap.add_argument("pairs", type=int, nargs="?", default=common.PAIRS)
    a = ap.parse_args()
    res = time_case(a.backend, a.steps, a.pairs) if a.what == "time" else mem_case(a.backend, a.which, a.steps)
    sys.stdout.write(json.dumps(res) + "\n")
