"""Median over several ``run.py`` JSON files, as the Markdown tables of RESULTS.md.

Usage::

    python benchmarks/summarise.py results1.json results2.json results3.json

Step times and ratios are the median over the runs of each run's own median (the
ratios are formed inside each run first, so drift between runs cancels); peak
memory and throughput are medians too.  Each run's ratios are listed as well.
"""

from __future__ import annotations

import json
import statistics
import sys

ROUTES = (
    ("jsae", "(a) ours, JSAE step"),
    ("jsae_train", "(a) ours, via `train()`"),
    ("pair", "(b) ours, l1 = 0 pair"),
    ("authors", "(c) authors' route"),
    ("authors_pair", "(c0) authors' l1 = 0 pair"),
)


def _median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def _fmt(value, spec):
    return "–" if value is None else format(value, spec)


def summarise(paths):
    runs = []
    for path in paths:
        with open(path) as f:
            runs.append(json.load(f))
    out = []
    for name in runs[0]["configs"]:
        configs = [r["configs"][name] for r in runs if name in r["configs"]]
        if "skipped" in configs[0]:
            out.append(f"### {name}\n\nskipped: {configs[0]['skipped']}\n")
            continue
        shape = configs[0]["shape"]
        out.append(f"### {name} ({', '.join(f'{k}={v}' for k, v in shape.items())}) on {configs[0]['device']}, "
                   f"median of {len(configs)} run(s)\n")
        out.append("| route | ms / step | CPU ms / step | peak MiB | × (c) | × (b) |")
        out.append("|---|---:|---:|---:|---:|---:|")
        for key, label in ROUTES:
            rows = [c["steps"][key] for c in configs if key in c["steps"]]
            if not rows:
                continue
            ms = _median([r["ms"] for r in rows])
            cpu = _median([r.get("cpu_ms") for r in rows])
            peak = _median([r.get("peak_mb") for r in rows])
            vs_c = _median([c["steps"][key]["ms"] / c["steps"]["authors"]["ms"] for c in configs if key in c["steps"]])
            vs_b = _median([c["steps"][key]["ms"] / c["steps"]["pair"]["ms"] for c in configs if key in c["steps"]])
            out.append(f"| {label} | {_fmt(ms, '.0f')} | {_fmt(cpu, '.0f')} | {_fmt(peak, '.0f')} | "
                       f"{_fmt(vs_c, '.2f')} | {_fmt(vs_b, '.2f')} |")
        naive = [c["naive"] for c in configs if "naive" in c and "ms_per_token" in c["naive"]]
        if naive:
            per_token = _median([n["ms_per_token"] for n in naive])
            out.append(f"| (d) naive dense autograd | {per_token * shape['batch']:.0f} (extrapolated: "
                       f"{per_token:.0f} ms per token × {shape['batch']}) | | | "
                       f"{per_token * shape['batch'] / _median([c['steps']['authors']['ms'] for c in configs]):.0f} | |")
        out.append("")
        keys = list(configs[0]["ratios"])
        out.append("| ratio | " + " | ".join(f"run {i + 1}" for i in range(len(configs))) + " | median |")
        out.append("|---|" + "---:|" * (len(configs) + 1))
        for key in keys:
            values = [c["ratios"].get(key) for c in configs]
            out.append(f"| {key} | " + " | ".join(_fmt(v, ".3f") for v in values) + f" | {_fmt(_median(values), '.3f')} |")
        out.append("")
        inference = [c.get("inference") for c in configs if c.get("inference")]
        if inference:
            out.append("| inference | n_samples | tokens / s | peak MiB | peak bytes per stored entry |")
            out.append("|---|---:|---:|---:|---:|")
            keys = sorted({(row["method"], row["n_samples"]) for inf in inference for row in inf})
            for method, size in keys:
                rows = [row for inf in inference for row in inf if (row["method"], row["n_samples"]) == (method, size)]
                row = rows[0]
                out.append(f"| `{row['method']}(X)` | {row['n_samples']} | "
                           f"{_median([r['tokens_per_s'] for r in rows]):.0f} | "
                           f"{_fmt(_median([r.get('peak_mb') for r in rows]), '.0f')} | "
                           f"{_fmt(_median([r.get('bytes_per_entry') for r in rows]), '.1f')} |")
            out.append("")
    loads = [(r["machine"].get("load_average_at_start"), r["machine"].get("load_average_at_end")) for r in runs]
    out.append("Load average (1, 5, 15 min) at start → end of each run: " + "; ".join(
        f"{tuple(round(x, 1) for x in a) if a else '?'} → {tuple(round(x, 1) for x in b) if b else '?'}"
        for a, b in loads))
    return "\n".join(out)


if __name__ == "__main__":
    print(summarise(sys.argv[1:]))
