#!/usr/bin/env python3
"""Markdown tables from the benchmark's JSON lines (for BENCHMARKS.md).

    python3 bench/tables.py bench/results/workload.jsonl

(bench/results/ is written by the commands in BENCHMARKS.md; any file of the
bench's stdout works.) Per backend and N: the median seconds of each phase per implementation
(statements in parentheses), then the same-run ratios: the median of the
per-run ratios, the ratio of the medians, and the ratio of the minimums
(the least noise-sensitive of the three on a shared machine).
"""

import json
import statistics
import sys
from collections import defaultdict

PHASES = ["connect", "schema", "insert", "run_sync_lazy", "run_sync_eager", "verify", "total"]
IMPLS = ["facade", "sync", "diesel-async", "sync-thread", "sync-blocking"]
BACKENDS = ["sqlite", "postgres", "mysql"]


def main(paths):
    secs = defaultdict(list)
    queries = defaultdict(list)
    for path in paths:
        for line in open(path):
            rec = json.loads(line)
            if "summary" in rec:
                continue
            key = (rec["backend"], rec["n"], rec["impl"], rec["phase"])
            secs[key].append(rec["seconds"])
            queries[key].append(rec["queries"])
    combos = sorted({(k[0], k[1]) for k in secs}, key=lambda c: (BACKENDS.index(c[0]), c[1]))
    for backend, n in combos:
        impls = [i for i in IMPLS if (backend, n, i, "total") in secs]
        runs = len(secs[(backend, n, impls[0], "total")])
        print(f"\n#### {backend}, N = {n:,} ({runs} runs): median seconds (statements)\n")
        print("| impl | " + " | ".join(PHASES) + " |")
        print("|---|" + "---:|" * len(PHASES))
        for impl in impls:
            cells = []
            for phase in PHASES:
                s = secs[(backend, n, impl, phase)]
                q = int(statistics.median(queries[(backend, n, impl, phase)]))
                cells.append(f"{statistics.median(s):.4f} ({q})" if phase != "connect" else f"{statistics.median(s):.4f}")
            print(f"| {impl} | " + " | ".join(cells) + " |")
        rows = []
        for num, den in [("facade", "sync"), ("facade", "diesel-async")]:
            for phase in ["run_sync_lazy", "total"]:
                a = secs.get((backend, n, num, phase))
                b = secs.get((backend, n, den, phase))
                if not a or not b:
                    continue
                per_run = [x / y for x, y in zip(a, b)]
                rows.append(
                    f"| {num}/{den} | {phase} | {statistics.median(per_run):.3f} | "
                    f"{statistics.median(a) / statistics.median(b):.3f} | {min(a) / min(b):.3f} | "
                    f"{min(per_run):.2f} – {max(per_run):.2f} |"
                )
        if rows:
            print("\n| ratio | phase | median of run ratios | ratio of medians | ratio of minimums | run ratios range |")
            print("|---|---|---:|---:|---:|---|")
            print("\n".join(rows))


if __name__ == "__main__":
    if len(sys.argv) < 2:
        raise SystemExit(f"usage: {sys.argv[0]} FILE.jsonl... (the bench's stdout)")
    main(sys.argv[1:])
