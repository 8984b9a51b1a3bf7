#!/usr/bin/env python3
"""Markdown tables from the benchmark's JSON lines (for BENCHMARKS.md).

    python3 bench/tables.py bench/results/workload.jsonl

(bench/results/ is written by the commands in BENCHMARKS.md; any file of the
bench's stdout works.) Per backend and N: the median seconds of each phase per implementation
(statements in parentheses), then the same-run ratios: the median of the
per-run ratios, the ratio of the medians, and the ratio of the minimums
(the least noise-sensitive of the three on a shared machine). Then, when
the lines are there: the round-trip floor (lazy time per statement beside
pgbench's) and the load figures (`--concurrency`; several files or runs are
shown side by side, separated by " / ").
"""

import json
import statistics
import sys
from collections import defaultdict

PHASES = ["connect", "schema", "insert", "run_sync_lazy", "run_sync_eager", "verify", "total"]
IMPLS = ["facade", "sync", "diesel-async", "sqlx", "sync-thread", "sync-blocking"]
LOADERS = ["facade", "sync-threads", "diesel-async", "sqlx", "pgbench", "pgbench-pool"]
BACKENDS = ["sqlite", "postgres", "mysql"]


def main(paths):
    secs = defaultdict(list)
    queries = defaultdict(list)
    floors = []
    loads = defaultdict(list)
    goals = defaultdict(list)
    for path in paths:
        for line in open(path):
            rec = json.loads(line)
            if rec.get("summary") == "floor":
                floors.append(rec)
            elif rec.get("summary") == "concurrency":
                loads[(rec["backend"], rec["clients"], rec["impl"])].append(rec)
            elif rec.get("summary") == "concurrency_goal":
                goals[(rec["backend"], rec["clients"], rec["others"])].append(rec)
            if "summary" in rec:
                continue
            key = (rec["backend"], rec["n"], rec["impl"], rec["phase"])
            secs[key].append(rec["seconds"])
            queries[key].append(rec["queries"])
    # `total` without `schema`, run by run: the phases where every
    # implementation sends the same statements (the facade's and sync's
    # schema phase is the program's reset, more statements than the peers').
    for key in list(secs):
        backend, n, impl, phase = key
        if phase == "insert" and (backend, n, impl, "run_sync_lazy") in secs:
            lazy = secs[(backend, n, impl, "run_sync_lazy")]
            secs[(backend, n, impl, "insert+run_sync_lazy")] = [a + b for a, b in zip(secs[key], lazy)]
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
        for num, den in [("facade", "sync"), ("facade", "diesel-async"), ("facade", "sqlx")]:
            for phase in ["run_sync_lazy", "total", "insert+run_sync_lazy"]:
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
    if floors:
        print("\n#### The floor: lazy time per statement / the floor's (pgbench, mysql_floor; same runs)\n")
        print("| backend | N | impl | lazy µs per statement | floor µs per statement | median of run ratios | runs |")
        print("|---|---:|---|---:|---:|---:|---:|")
        for f in floors:
            print(
                f"| {f['backend']} | {f['n']:,} | {f['impl']} | {f['lazy_us_per_statement']:.1f} | "
                f"{f.get('floor_us_per_statement', f.get('pgbench_us_per_statement')):.1f} | {f['median_of_run_ratios']:.3f} | {f['runs']} |"
            )
    if loads:
        print("\n#### Load: units of work per second, p50 / p99 latency (µs), failures\n")
        print("| backend | C | impl | conns | tx/s | p50 µs | p99 µs | max µs | fewest units of one task | failures |")
        print("|---|---:|---|---:|---|---|---|---|---|---|")
        keys = sorted(loads, key=lambda k: (BACKENDS.index(k[0]), k[1], LOADERS.index(k[2]) if k[2] in LOADERS else 99))
        for backend, clients, impl in keys:
            recs = loads[(backend, clients, impl)]
            join = lambda field, fmt: " / ".join(format(r[field], fmt) for r in recs)
            conns = " / ".join(str(r.get("connections", r.get("pool", ""))) for r in recs)
            print(
                f"| {backend} | {clients} | {impl} | {conns} | {join('tps', '.0f')} | {join('p50_us', '.0f')} | "
                f"{join('p99_us', '.0f')} | {join('max_us', '.0f')} | "
                f"{' / '.join(str(r.get('min_units_per_task', '')) for r in recs)} | "
                f"{' / '.join(str(r.get('failures', 0)) for r in recs)} |"
            )
        if goals:
            print("\n#### Load: the facade against the best of the others (same level, same run)\n")
            print("| backend | C | others | facade tx/s ÷ best | best tx/s by | facade p99 ÷ best | best p99 by |")
            print("|---|---:|---|---|---|---|---|")
            for key in sorted(goals, key=lambda k: (BACKENDS.index(k[0]), k[1], k[2])):
                recs = goals[key]
                print(
                    f"| {key[0]} | {key[1]} | {key[2]} | "
                    + " / ".join(f"{r['tps_over_best']:.3f}" for r in recs) + " | "
                    + " / ".join(r["best_tps_impl"] for r in recs) + " | "
                    + " / ".join(f"{r['p99_over_best']:.3f}" for r in recs) + " | "
                    + " / ".join(r["best_p99_impl"] for r in recs) + " |"
                )


if __name__ == "__main__":
    if len(sys.argv) < 2:
        raise SystemExit(f"usage: {sys.argv[0]} FILE.jsonl... (the bench's stdout)")
    main(sys.argv[1:])
