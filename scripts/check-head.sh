#!/usr/bin/env bash
# Lint, format and type checks on a clean checkout of HEAD, with this tree's virtualenv: what CI
# will see, without the uncommitted work of the moment.
set -u
top=$(git rev-parse --show-toplevel)
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
git clone -q "$top" "$tmp/c"
cd "$tmp/c" || exit 2
rc=0
"$top/.venv/bin/ruff" check src tests bench || rc=1
"$top/.venv/bin/ruff" format --check src tests bench || rc=1
MYPYPATH=src "$top/.venv/bin/mypy" --no-incremental || rc=1
exit $rc
