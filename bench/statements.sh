#!/usr/bin/env bash
# Client instructions per lazy statement (callgrind), the program's path
# beside a library user's and beside no facade at all: `facade` (the
# program's `Engine<AnyConnection>`), `facade-native` (`Engine<PgConnection>`
# and the like) and `sync` (Diesel on a raw `AnyConnection`, no engine) run
# the same `greenlet_orm::queries::run_queries`; BENCHMARKS.md, "Issue 18's
# goals" (instructions per statement, facade / sync).
#
#   bench/statements.sh [--backend sqlite|postgres|mysql]... [--native-fn F] [BINARY]
#
# BINARY is a release build of the bench (default: target/release/bench;
# `cargo build --release -p runsync-bench`). The database URLs come from
# PG_DATABASE_URL and MYSQL_DATABASE_URL as for the bench itself. Counted:
# `run_queries` inclusive (the lazy phase: one SELECT of every parent, then
# one SELECT of children per parent, the UPDATE), at N = 1,000 and 2,000
# parents; the difference over 1,000 is one parent's statement, with its
# writes to the sink. Instruction counts repeat from run to run whatever
# else the machine does. A bench built before the program's statements were
# shared (commit 1045cc5 and older) runs facade-native's lazy phase in its
# own function: pass --native-fn 'bench::native_impl::*::lazy' for it.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
bin="$root/target/release/bench"
backends=()
native_fn='greenlet_orm::queries::run_queries'
while (($#)); do
  case "$1" in
    --backend) backends+=("$2"); shift ;;
    --native-fn) native_fn=$2; shift ;;
    *) bin=$1 ;;
  esac
  shift
done
((${#backends[@]})) || backends=(sqlite postgres mysql)
command -v valgrind >/dev/null || { echo "valgrind is needed (apt-get install valgrind)" >&2; exit 2; }
[[ -x $bin ]] || { echo "no $bin: cargo build --release -p runsync-bench" >&2; exit 2; }
work=$(mktemp -d /tmp/rs-statements.XXXXXX)
trap 'rm -rf "$work"' EXIT

# Instructions counted inside run_queries for one run of W(n).
count() {
  local backend=$1 impl=$2 n=$3 fn='greenlet_orm::queries::run_queries'
  [[ $impl == facade-native ]] && fn=$native_fn
  valgrind --tool=callgrind --toggle-collect="$fn" \
    --callgrind-out-file="$work/cg.out" "$bin" --n "$n" --runs 1 --warmup 0 \
    --backend "$backend" --impls "$impl" --no-floor \
    --sqlite-path "$work/statements.db" >/dev/null 2>"$work/log" ||
    { cat "$work/log" >&2; exit 1; }
  sed -n 's/.*I *refs: *//p' "$work/log" | tr -d ,
}

for backend in "${backends[@]}"; do
  declare -A per=()
  for impl in facade facade-native sync; do
    one=$(count "$backend" "$impl" 1000)
    two=$(count "$backend" "$impl" 2000)
    per[$impl]=$(((two - one) / 1000))
  done
  awk -v b="$backend" -v f="${per[facade]}" -v n="${per[facade-native]}" -v s="${per[sync]}" 'BEGIN {
    printf "%s: instructions per lazy statement: facade (AnyConnection) %d, facade-native %d, sync %d; facade / facade-native %.3f, facade / sync %.3f\n", b, f, n, s, f / n, f / s }'
done
