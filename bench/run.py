"""`make bench`: run every benchmark module, print `BENCH <name> <value> target <target>` lines and
write bench/results.json as {name: {"value", "target", "unit", "settings"}}."""
from __future__ import annotations

import argparse
import importlib
import json
import os
import sys

MODULES = ["bench.capture", "bench.p2p", "bench.layout", "bench.masactrl", "bench.tiled", "bench.regions", "bench.dit_capture", "bench.dit_tiled", "bench.dit_regions", "bench.flow_inversion", "bench.dit_p2p", "bench.dit_masactrl", "bench.dit_layout", "bench.time_edit", "bench.svdiff", "bench.p2pzero", "bench.sketch", "bench.experts", "bench.segment"]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="fewer pairs (smoke run)")
    ap.add_argument("--only", default="", help="comma-separated module names")
    a = ap.parse_args()
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results.json")
    results = {}
    if os.path.exists(path):
        with open(path) as f:
            results = json.load(f)
    mods = [m for m in MODULES if not a.only or m.split(".")[-1] in a.only.split(",")]
    for name in mods:
        figures = importlib.import_module(name).collect(quick=a.quick)
        for k, v in figures.items():
            results[k] = v
            sys.stdout.write(f"BENCH {k} {v['value']} target {v['target']}\n")
            sys.stdout.flush()
        # after each module, so an interrupted run keeps what it measured
        with open(path, "w") as f:
            json.dump(results, f, indent=2, sort_keys=True)
            f.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
