#!/usr/bin/env python3
"""Plot W(N) time against N for each implementation, one panel per backend.

Reads the JSON lines the benchmark prints (by default
bench/results/workload.jsonl and bench/results/n100000-rss.jsonl, which the
commands in BENCHMARKS.md write; other files or globs as arguments), keeps
the per-run phase records (lines without a "summary" key), takes the median
over runs of one phase (`total` by default) for each (backend, impl, N), and
writes bench/time_vs_n.png. Needs matplotlib.

    python3 bench/plot.py                       # the two default files
    python3 bench/plot.py --phase run_sync_lazy out.jsonl --output lazy.png
"""

import argparse
import glob
import json
import os
import statistics
from collections import defaultdict

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
BACKENDS = ["sqlite", "postgres", "mysql"]
IMPLS = ["facade", "sync", "diesel-async"]
STYLE = {
    "facade": dict(marker="o", color="tab:blue"),
    "sync": dict(marker="s", color="tab:green", linestyle="--"),
    "diesel-async": dict(marker="^", color="tab:red", linestyle=":"),
}


def read(paths):
    records = []
    for pattern in paths:
        for path in sorted(glob.glob(pattern)):
            with open(path) as f:
                for line in f:
                    line = line.strip()
                    if not line.startswith("{"):
                        continue
                    rec = json.loads(line)
                    if "summary" in rec or "phase" not in rec:
                        continue
                    records.append(rec)
    return records


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "inputs",
        nargs="*",
        default=[
            os.path.join(HERE, "results", "workload.jsonl"),
            os.path.join(HERE, "results", "n100000-rss.jsonl"),
        ],
    )
    parser.add_argument("--phase", default="total")
    parser.add_argument("--output", default=os.path.join(HERE, "time_vs_n.png"))
    args = parser.parse_args()

    samples = defaultdict(list)  # (backend, impl, n) -> seconds
    for rec in read(args.inputs):
        if rec["phase"] == args.phase:
            samples[(rec["backend"], rec["impl"], rec["n"])].append(rec["seconds"])
    if not samples:
        raise SystemExit(
            f"no '{args.phase}' records in {args.inputs} "
            "(the commands in BENCHMARKS.md write bench/results/)"
        )

    backends = [b for b in BACKENDS if any(k[0] == b for k in samples)]
    fig, axes = plt.subplots(1, len(backends), figsize=(5.2 * len(backends), 4.4), squeeze=False)
    for ax, backend in zip(axes[0], backends):
        for impl in IMPLS:
            ns = sorted(n for (b, i, n) in samples if b == backend and i == impl)
            if not ns:
                continue
            medians = [statistics.median(samples[(backend, impl, n)]) for n in ns]
            runs = sorted({len(samples[(backend, impl, n)]) for n in ns})
            counts = "/".join(str(r) for r in runs)
            ax.plot(ns, medians, label=f"{impl} (runs per N: {counts})", **STYLE.get(impl, {}))
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_title(backend)
        ax.set_xlabel("N (parents)")
        ax.set_ylabel(f"{args.phase} seconds")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.suptitle(f"W(N), phase '{args.phase}': facade vs raw sync Diesel vs diesel-async")
    fig.tight_layout()
    fig.savefig(args.output, dpi=110)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
