"""dit_capture_overhead_ratio, dit_capture_memory_growth_mb, dit_capture_vs_naive_mem_ratio (issue 17).

Model: a tiny random Flux-shaped DiT on ComfyUI's own Flux class (hidden 128, 4 heads of 32, 2 double
and 2 single blocks, patch 2, guidance-distilled: cfg 1, one cond row per step, as Flux dev samples),
a 64x64 latent (1024 image tokens) and a 256-token context (T5's padded length); capture of 2 words
(one of two tokens) on every block.
"""
from __future__ import annotations

import argparse
import json
import sys

from bench import common

CFG = dict(image_model="flux", in_channels=16, out_channels=16, vec_in_dim=16, context_in_dim=32, hidden_size=128,
           mlp_ratio=2.0, num_heads=4, depth=2, depth_single_blocks=2, axes_dim=[8, 12, 12], theta=10000,
           patch_size=2, qkv_bias=True, guidance_embed=True)
CTX = 256
WORDS = ((2,), (5, 6))
# the bench DiT, as the figures' settings describe it
DIT = "tiny Flux-shaped DiT (hidden 128, 4 heads, 2 double + 2 single blocks)"
DIT_64 = f"{DIT}, 64x64 latent (1024 image tokens)"
DIT_CTX = f"{DIT_64}, {CTX}-token context"


def child_main(time_case, mem_case=None, default_mem: str = "") -> None:
    """The command line of a DiT bench child: `time|mem BACKEND STEPS [EXTRA]`, EXTRA the pairs of a
    time case or the variant of a memory case; writes the case's result as one JSON line."""
    ap = argparse.ArgumentParser()
    ap.add_argument("what", choices=["time", "mem"] if mem_case is not None else ["time"])
    ap.add_argument("backend", choices=list(common.BACKENDS))
    ap.add_argument("steps", type=int)
    ap.add_argument("extra", nargs="?", default="")
    a = ap.parse_args()
    if a.what == "time":
        res = time_case(a.backend, a.steps, int(a.extra or common.PAIRS))
    else:
        res = mem_case(a.backend, a.steps, a.extra or default_mem)
    sys.stdout.write(json.dumps(res) + "\n")


def _model_and_conds():
    import torch
    import ac_dit
    model = ac_dit.build("Flux", CFG, seed=7)
    g = torch.Generator().manual_seed(1)
    pos = [[torch.randn(1, CTX, 32, generator=g), {"pooled_output": torch.randn(1, 16, generator=g),
                                                    "guidance": 3.5}]]
    latent = torch.zeros(1, 16, 64, 64)
    noise = torch.randn(latent.shape, generator=g)
    return ac_dit, model, pos, latent, noise


def _capture(model, naive=False):
    from attention_control.attention.capture import AttentionMaps, WordSpec
    from attention_control.attention.dit_capture import DitCaptureController
    from attention_control.attention.dit_layers import DitLayerSelector
    from attention_control.attention.router import attach
    specs = [WordSpec(f"w{i}", list(p)) for i, p in enumerate(WORDS)]
    handle = AttentionMaps([s.label for s in specs])
    cls = _naive_class() if naive else DitCaptureController
    return attach(model, cls(specs, CTX, handle, DitLayerSelector.parse("all"))), handle


def _naive_class():
    """The capture with the joint probabilities materialised (the baseline of the memory figure)."""
    import torch
    from attention_control.attention import dit_capture as D

    class NaiveCapture(D.DitCaptureController):
        pass

    def naive_maps(q, k, q_rows, columns, mask=None, chunk_budget=None, allow=None):
        s = torch.matmul(q.float(), k.float().transpose(-1, -2)) * q.shape[-1] ** -0.5   # (B, H, N, K)
        p = s.softmax(-1)[:, :, q_rows]
        return torch.stack([p[..., c].sum(-1) for c in columns], 1).mean(2)

    NaiveCapture.maps_fn = staticmethod(naive_maps)
    return NaiveCapture


def _sample(M, model, pos, latent, noise, steps):
    return M.sample(model, noise, pos, pos, latent, steps=steps, cfg=1.0)


def time_case(backend: str, steps: int, pairs: int) -> dict:
    impl = common.setup(backend)
    M, model, pos, latent, noise = _model_and_conds()
    cap, handle = _capture(model)
    res = common.interleaved_ratio(lambda: _sample(M, model, pos, latent, noise, steps),
                                   lambda: _sample(M, cap, pos, latent, noise, steps), pairs=pairs)
    assert handle.maps is not None
    res["attention"] = impl
    return res


def mem_case(backend: str, steps: int, which: str) -> dict:
    common.setup(backend)
    common.pin_threads()
    M, model, pos, latent, noise = _model_and_conds()
    m, handle = (model, None) if which == "plain" else _capture(model, naive=(which == "naive"))
    _sample(M, m, pos, latent, noise, 1)               # load and warm the allocator on the same shapes
    base = common.reset_peak()
    _sample(M, m, pos, latent, noise, steps)
    return {"extra_mb": (common.peak_kb() - base) / 1024.0}


def collect(quick: bool = False) -> dict:
    """All figures of this module, each case in fresh processes, both attention backends."""
    steps = 10
    out = {}
    env = common.MEM_ENV
    reps = 1 if quick else 2
    for backend in common.BACKENDS:
        r = common.run_child("bench.dit_capture", "time", backend, str(steps), "2" if quick else str(common.PAIRS))
        out[f"dit_capture_overhead_ratio[{backend}]"] = common.time_figure(
            r, 1.10, f"{DIT_CTX}, {steps} euler steps, cfg 1, 2 words all blocks, "
                     f"attention={r['attention']}, CPU time")

        def mem(which, n):
            return min(common.run_child("bench.dit_capture", "mem", backend, str(n), which, env_extra=env)["extra_mb"]
                       for _ in range(reps))
        m20, m100 = mem("capture", 20), mem("capture", 100)
        out[f"dit_capture_memory_growth_mb[{backend}]"] = {
            "value": round(m100 - m20, 2), "target": 5.0, "unit": "MB",
            "settings": f"extra peak RSS after 100 steps ({m100:.1f} MB) minus after 20 ({m20:.1f} MB), fresh "
                        f"processes, min of {reps}, {env}"}
        plain, naive, m4 = mem("plain", 4), mem("naive", 4), mem("capture", 4)
        if naive - plain >= 2.0:
            out[f"dit_capture_vs_naive_mem_ratio[{backend}]"] = {
                "value": round(max(m4 - plain, 0.0) / (naive - plain), 3), "target": 0.5, "unit": "x",
                "settings": f"extra peak RSS above plain sampling ({plain:.1f} MB), 4 steps: capture {m4 - plain:.1f} "
                            f"MB vs materialising the joint probabilities {naive - plain:.1f} MB, fresh processes, "
                            f"min of {reps}"}
        else:
            # the backend's own attention working set (sub-quadratic at this size: whole score blocks)
            # is as large as the materialised matrix, so neither capture adds to the peak
            out[f"dit_capture_peak_mb_above_plain[{backend}]"] = {
                "value": round(m4 - plain, 2), "target": None, "unit": "MB",
                "settings": f"capture {m4 - plain:.1f} MB and materialising {naive - plain:.1f} MB above plain "
                            f"sampling's extra peak ({plain:.1f} MB, the backend's own working set), 4 steps, "
                            f"fresh processes, min of {reps}: the ratio is not resolvable here"}
    return common.add_worst(out, ["dit_capture_overhead_ratio", "dit_capture_memory_growth_mb",
                                  "dit_capture_vs_naive_mem_ratio"])


if __name__ == "__main__":
    child_main(time_case, mem_case, "capture")
