"""Turn a pytest-benchmark JSON file into Markdown tables of ratios against h2rec.

    python -m pytest benches --benchmark-json=bench.json
    python benches/ratios.py bench.json

In each benchmark group the row whose name contains "h2rec" is the reference: "× h2rec" is
how many times longer the peer took (higher is better for h2rec). Extra figures a benchmark
recorded (reconstruction error, peak memory, ...) are shown beside the time.
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict


def fmt_time(s: float) -> str:
    return f"{s * 1e3:.1f} ms" if s < 1 else f"{s:.2f} s"


def fmt_extra(info: dict) -> str:
    parts = []
    for k, v in sorted(info.items()):
        if isinstance(v, float):
            parts.append(f"{k}={v:.5g}")
        else:
            parts.append(f"{k}={v}")
    return ", ".join(parts)


def tables(data: dict) -> str:
    groups: dict[str, list[dict]] = defaultdict(list)
    for b in data["benchmarks"]:
        groups[b["group"] or b["name"]].append(b)
    out = []
    for group, rows in sorted(groups.items()):
        ref = next((r for r in rows if "h2rec" in r["name"]), None)
        out.append(f"### {group}\n")
        out.append("| implementation | time (min) | × h2rec | figures |")
        out.append("|---|---:|---:|---|")
        for r in sorted(rows, key=lambda r: r["stats"]["min"]):
            t = r["stats"]["min"]
            ratio = f"{t / ref['stats']['min']:.2f}" if ref else "–"
            name = r["name"].split("[")[-1].rstrip("]") if "[" in r["name"] else r["name"]
            out.append(f"| {name} | {fmt_time(t)} | {ratio} | {fmt_extra(r.get('extra_info', {}))} |")
        out.append("")
    return "\n".join(out)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python benches/ratios.py BENCH.json")
    with open(sys.argv[1]) as f:
        print(tables(json.load(f)))
