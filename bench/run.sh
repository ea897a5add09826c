#!/usr/bin/env bash
# make bench: every benchmark, each printing its own figures and ratios.
set -euo pipefail
cd "$(dirname "$0")/.."
command -v wrk >/dev/null || bash scripts/sysdeps.sh wrk
.venv/bin/python bench/http_bench.py "$@"
bash bench/pgbench.sh
.venv/bin/python bench/copy_bench.py
.venv/bin/python bench/stream_bench.py
