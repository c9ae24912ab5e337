"""TIME (issue 19), report-only figures:

- time_edit_seconds: Edit Assumption's derivation of one edit (one prompt pair with the paper's three templates:
  8 CLIP-L encodes, the alignment, the float64 solve) on ComfyUI's full-size SD1 CLIP-L (random weights), CPU,
  median of 5.
- time_edit_solve_seconds: the closed form alone (the float64 solve from aligned embeddings), median of 5.
- time_edit_patch_seconds[sd15|sdxl]: computing the patched weights of every cross-attention K and V of a
  full-size SD1.5 (32 weights, 768 wide) / SDXL (140 weights, 2048 wide) with an edit of the same rank, which is
  what ComfyUI does once when it loads the edited model; median of 3.
- time_edit_file_bytes: the saved edit of the first figure.
"""
from __future__ import annotations

import json
import os
import statistics
import sys
import tempfile
import time

from bench import common

SD15_OUT = [320] * 5 + [640] * 5 + [1280] * 6                    # the 16 attn2 blocks of SD1.5 by width
SDXL_OUT = [640] * 10 + [1280] * 60                             # the 70 of SDXL


def _median(fn, n):
    ts = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def child() -> dict:
    common.setup("sdpa")
    common.pin_threads()
    import torch
    import ac_models
    from attention_control.attention.time_edit import time_edit
    from attention_control.nodes import weight_edits as WE
    clip = ac_models.random_clip_l()
    src, dst = "a pack of roses", "a pack of blue roses"
    WE.derive_edit(clip, src, dst, 0.1, True)                     # warm-up
    derive = _median(lambda: WE.derive_edit(clip, src, dst, 0.1, True), 5)
    edit = WE.derive_edit(clip, src, dst, 0.1, True)
    c, cs = WE.aligned_embeddings(clip, [src], [dst], True)
    solve = _median(lambda: time_edit(c, cs, 0.1), 5)
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "edit.safetensors")
        WE.save_edit(edit, path)
        size = os.path.getsize(path)
    out = {"derive": derive, "solve": solve, "rank": edit.rank, "bytes": size, "threads": torch.get_num_threads()}
    g = torch.Generator().manual_seed(0)
    for name, width, outs in (("sd15", 768, SD15_OUT), ("sdxl", 2048, SDXL_OUT)):
        n = edit.rank
        e = time_edit(torch.randn(n, width, generator=g, dtype=torch.float64),
                      torch.randn(n, width, generator=g, dtype=torch.float64), 0.1)
        patch = WE.AssumptionEditPatch(e)
        weights = [torch.randn(o, width, generator=g) * 0.02 for o in outs for _ in (0, 1)]

        def apply_all():
            for w in weights:
                patch.calculate_weight(w.clone(), "k", 1.0, 1.0, None, lambda a: a)

        apply_all()
        out[f"patch_{name}"] = _median(apply_all, 3)
        out[f"weights_{name}"] = len(weights)
    return out


def collect(quick: bool = False) -> dict:
    r = common.run_child("bench.time_edit", "child")
    base = (f"one pair + 3 templates ('a pack of roses' -> 'a pack of blue roses'), rank {r['rank']}, "
            f"{r['threads']} CPU thread(s)")
    return {
        "time_edit_seconds": {"value": round(r["derive"], 4), "target": None, "unit": "s",
                              "settings": f"Edit Assumption derivation on full-size SD1 CLIP-L (random weights), "
                                          f"{base}, median of 5"},
        "time_edit_solve_seconds": {"value": round(r["solve"], 4), "target": None, "unit": "s",
                                    "settings": f"the float64 closed form alone, width 768, {base}, median of 5"},
        "time_edit_patch_seconds[sd15]": {"value": round(r["patch_sd15"], 4), "target": None, "unit": "s",
                                          "settings": f"patched weights of all {r['weights_sd15']} SD1.5 cross-"
                                                      f"attention K / V (768 wide), rank {r['rank']}, median of 3"},
        "time_edit_patch_seconds[sdxl]": {"value": round(r["patch_sdxl"], 4), "target": None, "unit": "s",
                                          "settings": f"patched weights of all {r['weights_sdxl']} SDXL cross-"
                                                      f"attention K / V (2048 wide), rank {r['rank']}, median of 3"},
        "time_edit_file_bytes": {"value": r["bytes"], "target": None, "unit": "bytes",
                                 "settings": f"the saved edit of time_edit_seconds (float32 factors), {base}"},
    }


if __name__ == "__main__":
    if sys.argv[1:] == ["child"]:
        sys.stdout.write(json.dumps(child()) + "\n")
