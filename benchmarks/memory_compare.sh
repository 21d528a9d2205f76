#!/usr/bin/env bash
# Peak RSS against memory_budget for the commits before the "memory as planned" work (issue 25), one after the
# first part, and the working tree, one after the other in one run: benchmarks/results/memory_cpu.csv.
#   bash benchmarks/memory_compare.sh [PYTHON]
set -euo pipefail
PY=${1:-.venv/bin/python}
OUT=benchmarks/results/memory_cpu.csv
rm -f "$OUT"
for rev in 65d5560 ed9799c; do
  dir=$(mktemp -d)
  git worktree add -q --detach "$dir" "$rev"
  PYTHONPATH="$dir" "$PY" benchmarks/memory.py --csv "$OUT" --label "$rev" || true   # the old ones go over
  git worktree remove --force "$dir"
done
"$PY" benchmarks/memory.py --csv "$OUT" --label "working tree ($(git rev-parse --short HEAD))"
