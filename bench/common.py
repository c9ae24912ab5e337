"""Measurement helpers shared by the benchmarks (DESIGN.md section 7).

- time ratios: A and B interleaved in one process in ABBA order (A B, B A, A B, ...), PAIRS (12)
  pairs after a warm-up, median of the per-pair ratios of process CPU time, reported with the
  number of pairs and the min-max of the per-pair ratios (time_figure). Why 12: with 3 pairs, three
  reruns of capture_overhead_ratio[sdpa] gave 1.06, 1.04 and 1.14. Measured at one thread while
  other jobs kept the 2-core machine busy (load 2.5-3), the per-pair ratios of that case have an sd
  of 0.04-0.07, so the median of 12 has a standard error of about 1.5-2.5 %; three 16-pair reruns
  still gave 0.99, 1.07 and 1.09 (a quiet machine was not available to measure). More pairs are
  not affordable: at one thread the time cases cost about 220 s a pair for both backends, so 12
  pairs plus the warm-up is about 45 min. On a busy machine reruns can still differ by more than
  +-2 %; the recorded min-max shows how far to trust a figure. On an idle machine too: two reruns
  of `bench.run --only capture` gave 1.044 / 1.012 (subquad) and 0.976 / 1.060 (sdpa), the
  baseline's own run times drifting 3.2-4.2 s within one run. The 50-step layout run (25 s a pair,
  wide margin: 1.8 against 3.0) uses half as many pairs.
- threads: interleaved_ratio pins torch to THREADS (1) thread for the rest of its process (time
  cases only; the memory cases keep torch's default). Measured on the bench's 2-core machine with
  another 2-thread job running, capture time sdpa 20 steps, 6 pairs, two reruns each: 1 thread
  4.4 s CPU a run, per-pair ratios 0.96-1.09 and 0.97-1.07, medians 1.03 and 1.02, 72 s wall;
  torch's default (2 threads) 5-50 s CPU a run (OpenMP workers spin while the other core is
  taken), per-pair ratios 1.01-1.80 and 0.20-2.15, medians 1.13 and 0.69, 136 and 324 s wall.
  BENCH_THREADS=0 keeps torch's default.
- memory: extra peak RSS above the loaded-model baseline, each case in a fresh process; the peak is
  reset through /proc/self/clear_refs (VmHWM) once the model is built, so import-time peaks do not
  count. Child processes run with MEM_ENV: one malloc arena and a fixed mmap threshold of 128 kB,
  so every tensor of 128 kB or more is mapped when allocated and unmapped when freed and the RSS
  peak follows the peak of live tensors. (With glibc's default dynamic threshold, memory freed by
  the warm-up run stays in the heap and the measured run reuses it: the "extra" peak then counts
  only the heap's growth beyond the warm-up, which undercounts the plain baselines most.)
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAIRS = 12
THREADS = int(os.environ.get("BENCH_THREADS", "1"))


def setup(backend: str):
    """Import the real ComfyUI with the chosen CPU attention backend ('subquad' or 'sdpa')."""
    for p in (REPO, os.path.join(REPO, "tests")):
        if p not in sys.path:
            sys.path.append(p)
    from devtools.host import import_pack, setup_comfy
    setup_comfy(pytorch_attention=(backend == "sdpa"))
    import_pack()
    import comfy.ldm.modules.attention as A
    return A.optimized_attention.__name__


def pin_threads(n: int | None = None):
    """torch.set_num_threads(n or THREADS); a no-op when that is 0."""
    n = THREADS if n is None else n
    if n:
        import torch
        torch.set_num_threads(n)


def interleaved_ratio(run_a, run_b, pairs: int = PAIRS, warmup: bool = True) -> dict:
    """Median of per-pair CPU-time ratios B/A (A = baseline), in ABBA order: pair i runs A then B
    when i is even and B then A when i is odd, so a drift (a neighbour's load, allocator or cache
    state) weighs on A and B alike. Returns the median, the number of pairs, the min and max of the
    per-pair ratios and the pair times (a_s[i], b_s[i] belong to pair i). Pins torch to THREADS
    threads first, for the rest of the process (see the module docstring)."""
    pin_threads()
    if warmup:
        run_a()
        run_b()
    ratios, ta, tb = [], [], []
    for i in range(pairs):
        t = {}
        for name, fn in (("a", run_a), ("b", run_b)) if i % 2 == 0 else (("b", run_b), ("a", run_a)):
            t0 = time.process_time()
            fn()
            t[name] = time.process_time() - t0
        ta.append(t["a"])
        tb.append(t["b"])
        ratios.append(t["b"] / t["a"])
    return {"ratio": statistics.median(ratios), "pairs": pairs, "min": min(ratios), "max": max(ratios),
            "a_s": ta, "b_s": tb}


def time_figure(res: dict, target, settings: str, unit: str = "x", shift: float = 0.0) -> dict:
    """A results.json entry for a time ratio measured by interleaved_ratio: the median (plus `shift`,
    e.g. -1 for an overhead fraction) with the number of pairs and the min-max of the per-pair
    ratios (shifted alike) beside it."""
    return {"value": round(res["ratio"] + shift, 4), "target": target, "unit": unit,
            "settings": settings + f", median of {res['pairs']} ABBA-interleaved pairs",
            "pairs": res["pairs"], "min": round(res["min"] + shift, 4), "max": round(res["max"] + shift, 4)}


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(field)


def reset_peak() -> int:
    """Reset the peak RSS to the current RSS; returns the current RSS in kB."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return _status_kb("VmRSS")


def peak_kb() -> int:
    return _status_kb("VmHWM")


def run_child(module: str, *args: str, env_extra: dict | None = None, timeout: int = 1800) -> dict:
    """Run `python -m module args` in a fresh process; it prints one JSON object on its last line."""
    env = dict(os.environ, **(env_extra or {}))
    out = subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, env=env, capture_output=True,
                         text=True, timeout=timeout)
    if out.returncode != 0:
        raise RuntimeError(f"{module} {args} failed:\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


BACKENDS = ("subquad", "sdpa")
MEM_ENV = {"MALLOC_ARENA_MAX": "1", "MALLOC_MMAP_THRESHOLD_": "131072"}


def add_worst(out: dict, names) -> dict:
    """For each figure name, add the worst (largest) of its per-backend entries `name[backend]`
    as `name`, with the per-backend target (the bar applies to each backend) and the worst entry's
    pairs and min-max spread when it has them."""
    for name in names:
        per = [out[f"{name}[{b}]"] for b in BACKENDS if f"{name}[{b}]" in out]
        w = max(per, key=lambda r: r["value"])
        out[name] = {"value": w["value"], "target": per[0]["target"], "unit": per[0]["unit"],
                     "settings": "worst of the two CPU attention backends"}
        out[name].update({k: w[k] for k in ("pairs", "min", "max") if k in w})
    return out


def guided_collect(module: str, name: str, settings: str, time_detail: str, quick: bool = False,
                   mem_target: float = 2.5) -> dict:
    """The two figures of a gradient-guidance bench module on both backends: `{name}_step_time_ratio`
    (report) from its `time` child and `{name}_mem_ratio` from its `mem plain` / `mem guided` children
    (fresh processes, min of 2). `settings` / `time_detail` may name {attention}, {guided_steps},
    {channels} of the time child's result."""
    out = {}
    for backend in BACKENDS:
        t = run_child(module, "time", backend, "-", "2" if quick else str(PAIRS))
        mem = {w: min(run_child(module, "mem", backend, w, env_extra=MEM_ENV)["extra_mb"]
                      for _ in range(1 if quick else 2)) for w in ("plain", "guided")}
        s = settings.format(**t)
        out[f"{name}_step_time_ratio[{backend}]"] = time_figure(t, None, s + ", " + time_detail.format(**t))
        out[f"{name}_mem_ratio[{backend}]"] = {
            "value": round(mem["guided"] / max(mem["plain"], 1e-6), 4), "target": mem_target, "unit": "x",
            "settings": s + f", 1-step guided run vs 1-step plain run: extra peak RSS "
                            f"{mem['guided']:.1f} MB / {mem['plain']:.1f} MB"}
    return add_worst(out, [f"{name}_step_time_ratio", f"{name}_mem_ratio"])


def guided_main(time_case, mem_case) -> None:
    """The child entry point of a guidance bench module: `time BACKEND - [PAIRS]` or `mem BACKEND plain|guided`."""
    import argparse
    ap = argparse.ArgumentParser()
    ap.add_argument("what", choices=["time", "mem"])
    ap.add_argument("backend", choices=list(BACKENDS))
    ap.add_argument("which", choices=["-", "plain", "guided"])
    ap.add_argument("pairs", type=int, nargs="?", default=PAIRS)
    a = ap.parse_args()
    res = time_case(a.backend, a.pairs) if a.what == "time" else mem_case(a.backend, a.which)
    sys.stdout.write(json.dumps(res) + "\n")


def one_step_extra_mb(M, warm_model, model, pos, neg, lat, cfg: float = 5.0) -> dict:
    """Extra peak RSS (MB) of one 1-step KSampler run of `model` after a warm-up run of `warm_model`."""
    import torch
    with torch.inference_mode():
        M.ksample(warm_model, pos, neg, lat, steps=1, cfg=cfg)
        base = reset_peak()
        M.ksample(model, pos, neg, lat, steps=1, cfg=cfg)
    return {"extra_mb": (peak_kb() - base) / 1024.0}
