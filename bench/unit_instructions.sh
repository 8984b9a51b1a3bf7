#!/usr/bin/env bash
# Client instructions per load unit (callgrind): one task (C = 1) running
# the load figures' unit (a parent by key, its children, the UPDATE, in one
# transaction) for 3 s under callgrind, minus the same process run for 0 s,
# divided by the units it ran; every thread of the bench process counted
# (the runtime's, the blocking pool's, the drivers'). BENCHMARKS.md, "Where
# the misses come from".
#
#   bench/unit_instructions.sh [--backend B]... [--impls LIST] [BINARY]
#
# BINARY: a release build of the bench (default target/release/bench). The
# servers come from PG_DATABASE_URL and MYSQL_DATABASE_URL, as for the bench.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
bin="$root/target/release/bench"
backends=()
impls=facade,facade-native,sync,deadpool-diesel,diesel-async,sqlx
while (($#)); do
  case "$1" in
    --backend) backends+=("$2"); shift ;;
    --impls) impls=$2; shift ;;
    *) bin=$1 ;;
  esac
  shift
done
((${#backends[@]})) || backends=(sqlite postgres mysql)
command -v valgrind >/dev/null || { echo "valgrind is needed (apt-get install valgrind)" >&2; exit 2; }
[[ -x $bin ]] || { echo "no $bin: cargo build --release -p runsync-bench" >&2; exit 2; }
work=$(mktemp -d /tmp/rs-units.XXXXXX)
trap 'rm -rf "$work"' EXIT

# "instructions units" of one run of `seconds` seconds.
run() {
  local backend=$1 impl=$2 seconds=$3
  valgrind --tool=callgrind --callgrind-out-file="$work/cg.out" "$bin" --no-workload \
    --concurrency --impls "$impl" --clients 1 --duration "$seconds" --rows 100 --warmup 0 \
    --pgbench "" --backend "$backend" --sqlite-path "$work/units.db" \
    >"$work/out.jsonl" 2>"$work/log" || { cat "$work/log" >&2; exit 1; }
  local ir units
  ir=$(sed -n 's/.*Collected : *//p' "$work/log" | tr -d ,)
  units=$(sed -n 's/.*"summary": "concurrency".*"transactions": \([0-9]*\).*/\1/p' "$work/out.jsonl")
  echo "$ir ${units:-0}"
}

for backend in "${backends[@]}"; do
  for impl in ${impls//,/ }; do
    read -r ir0 _ < <(run "$backend" "$impl" 0)
    read -r ir3 units < <(run "$backend" "$impl" 3)
    if ((units > 0)); then
      echo "$backend $impl: $(((ir3 - ir0) / units)) instructions per unit ($units units)"
    else
      echo "$backend $impl: no units ran" >&2
    fi
  done
done
