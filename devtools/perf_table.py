"""Render bench/results.json as the README's performance table (python -m devtools.perf_table)."""
from __future__ import annotations

import json
import os
import re

from devtools.host import REPO

START, END = "<!-- perf:start -->", "<!-- perf:end -->"


def value_cell(r: dict) -> str:
    """The value with its unit; for a time ratio, the min-max of the per-pair ratios and the number
    of pairs beside it ("1.04 x (1.01-1.07, 8 pairs)"). Entries without a spread render as before."""
    cell = f"{r['value']} {r.get('unit', '')}"
    if r.get("min") is not None and r.get("max") is not None:
        pairs = f", {r['pairs']} pairs" if r.get("pairs") else ""
        cell += f" ({r['min']:.2f}-{r['max']:.2f}{pairs})"
    return cell


def table(results: dict) -> str:
    rows = ["| figure | value | target | measured on |", "| --- | --- | --- | --- |"]
    for name in sorted(results):
        r = results[name]
        rows.append(f"| `{name}` | {value_cell(r)} | {r['target'] if r['target'] is not None else 'report'} | {r.get('settings', '')} |")
    return "\n".join(rows)


def main():
    with open(os.path.join(REPO, "bench", "results.json")) as f:
        results = json.load(f)
    path = os.path.join(REPO, "README.md")
    with open(path) as f:
        readme = f.read()
    block = f"{START}\n{table(results)}\n{END}"
    if START in readme:
        readme = re.sub(re.escape(START) + ".*?" + re.escape(END), lambda _: block, readme, flags=re.S)
    else:
        readme = readme.replace("PERF_TABLE", block)
    with open(path, "w") as f:
        f.write(readme)


if __name__ == "__main__":
    main()
