#!/usr/bin/env bash
# pgbench -S (simple, extended, prepared) and TPC-B through sqlproxy's wire door, PgBouncer
# (transaction and session pools) and direct PostgreSQL, interleaved; prints TPS and the ratios
# sqlproxy / PgBouncer and sqlproxy / direct. Options: --seconds, --rounds, --clients, --py-spy DIR
# (see bench/pgbench_bench.py --help). Starts and stops every server it uses.
set -euo pipefail
cd "$(dirname "$0")/.."
command -v pgbouncer >/dev/null || [ -x /usr/sbin/pgbouncer ] || bash scripts/sysdeps.sh pgbouncer
exec .venv/bin/python bench/pgbench_bench.py "$@"
