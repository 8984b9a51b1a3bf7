#!/usr/bin/env bash
# Builds the MySQL/MariaDB round-trip floor (bench/floor/mysql_floor.c: the
# lazy phase's child SELECT on the C client library alone, what pgbench is
# for PostgreSQL) and prints the binary's path, for `bench --mysql-floor`:
#   ./target/release/bench --n 10000 --runs 3 --backend mysql \
#     --mysql-floor "$(bench/mysql_floor.sh)"
# Needs gcc and mysql_config (default-libmysqlclient-dev: the library
# Diesel's MysqlConnection links).
set -euo pipefail
cd "$(dirname "$0")/.."
out="${CARGO_TARGET_DIR:-target}/mysql_floor"
mkdir -p "$(dirname "$out")"
# shellcheck disable=SC2046 # mysql_config prints several flags
gcc -O2 -Wall -Wextra -Werror -o "$out" bench/floor/mysql_floor.c $(mysql_config --cflags --libs)
# Beside it, the two forms of the program's parent batch (BENCHMARKS.md,
# "W(10,000) on MySQL"): MYSQL_PWD=... mysql_batch_forms <host> <port> <user> <database> <reps>
# shellcheck disable=SC2046
gcc -O2 -Wall -Wextra -Werror -o "$(dirname "$out")/mysql_batch_forms" bench/floor/mysql_batch_forms.c \
  $(mysql_config --cflags --libs)
echo "$out"
