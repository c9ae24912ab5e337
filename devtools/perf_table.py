"""Render bench/results.json as the README's performance table (python -m devtools.perf_table)."""
from __future__ import annotations

import json
import os
import re

from devtools.host import REPO

START, END = "<!-- perf:start -->", "<!-- perf:end -->"


def table(results: dict) -> str:
    rows = ["| figure | value | target | measured on |", "| --- | --- | --- | --- |"]
    for name in sorted(results):
        r = results[name]
        rows.append(f"| `{name}` | {r['value']} {r.get('unit', '')} | {r['target'] if r['target'] is not None else 'report'} | {r.get('settings', '')} |")
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
