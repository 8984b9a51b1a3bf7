#!/usr/bin/env bash
# The facade's client instructions per transaction (callgrind), for
# comparing versions of the library: BENCHMARKS.md, "What the changes cost
# per transaction".
#
#   bench/instructions.sh [--metrics] [--runs N] RUNSYNC_DIR [RUNSYNC_DIR ...]
#
# RUNSYNC_DIR is the `runsync/` directory of a checkout (for an older commit:
# `git worktree add /tmp/old <commit>` and pass /tmp/old/runsync). For each,
# bench/src/bin/facade_micro.rs is built as a crate of its own against that
# library (features sqlite-bundled + postgres, plus metrics with --metrics;
# release profile; this repository's Cargo.lock), and run under callgrind at
# 1,000 and 2,000 iterations; the difference over 10,000 transactions is one
# transaction (set-up cancels out). Counted: the async side (the program's
# `figures` future, where the library's futures are polled) and the blocking
# tasks, nothing else (not the runtime's idle threads, whose parking depends
# on timing). Printed apart: glibc's malloc internals, whose cost varies from
# run to run with the heap's state (the number of calls does not); the
# figure to compare is "without malloc internals", the median of N runs.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
features='"sqlite-bundled", "postgres"'
runs=3
dirs=()
while (($#)); do
  case "$1" in
    --metrics) features="$features, \"metrics\"" ;;
    --runs) runs=$2; shift ;;
    *) dirs+=("$(cd "$1" && pwd)") ;;
  esac
  shift
done
((${#dirs[@]})) || { echo "usage: $0 [--metrics] [--runs N] RUNSYNC_DIR..." >&2; exit 2; }
command -v valgrind >/dev/null || { echo "valgrind is needed (apt-get install valgrind)" >&2; exit 2; }

work=$(mktemp -d /tmp/rs-instructions.XXXXXX)
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/src"
cp "$root/bench/src/bin/facade_micro.rs" "$work/src/main.rs"
cp "$root/Cargo.lock" "$work/Cargo.lock"
export CARGO_TARGET_DIR="$work/target"

# Instructions of one run: "total malloc-internals".
count() {
  local out="$work/cg.out"
  valgrind --tool=callgrind --toggle-collect='*figures*' \
    --toggle-collect='*BlockingTask*as*Future*poll*' \
    --callgrind-out-file="$out" "$work/target/release/facade_micro" "$1" >/dev/null 2>&1
  callgrind_annotate --threshold=100 "$out" | awk '
    /PROGRAM TOTALS/ { gsub(",", "", $1); total = $1 }
    /malloc\/malloc\.c|malloc\/arena\.c/ { gsub(",", "", $1); m += $1 }
    END { print total, m + 0 }'
}

for dir in "${dirs[@]}"; do
  cat >"$work/Cargo.toml" <<EOF
[package]
name = "facade_micro"
version = "0.0.0"
edition = "2024"

[dependencies]
diesel-runsync = { path = "$dir", default-features = false, features = [$features] }
diesel = { version = "2.3", default-features = false, features = ["sqlite", "postgres"] }
tokio = { version = "1", features = ["rt-multi-thread", "macros"] }

[workspace]
EOF
  cargo build --release --quiet --manifest-path "$work/Cargo.toml"
  results=()
  for _ in $(seq "$runs"); do
    read -r t1 m1 < <(count 1000)
    read -r t2 m2 < <(count 2000)
    results+=("$(((t2 - m2 - t1 + m1) / 10000)) $(((t2 - t1) / 10000)) $(((m2 - m1) / 10000))")
  done
  median=$(printf '%s\n' "${results[@]}" | sort -n | sed -n "$(((runs + 1) / 2))p")
  read -r without total malloc <<<"$median"
  echo "$dir: $without instructions per transaction without malloc internals" \
    "(median of $runs; total $total, malloc internals $malloc; all runs: $(printf '%s; ' "${results[@]}"))"
done
