#!/usr/bin/env bash
# Run a federation under Flower's simulation engine (100 clients by default).
#   bash scripts/run.sh                         # the offline default (SmolLM2-135M + Shakespeare)
#   bash scripts/run.sh conf/smoke.toml         # a conf/*.toml override file, then "k=v" pairs
#   NUM_SUPERNODES=10 bash scripts/run.sh conf/smoke.toml "num-server-rounds=3"
# Results go to outputs/<conf name>/ in this checkout unless output-dir is given.
set -euo pipefail
cd "$(dirname "$0")/.."
name=default
for arg in "$@"; do [[ "$arg" == *.toml ]] && name=$(basename "$arg" .toml); done
args=(--run-config "output-dir='$PWD/outputs/$name' cache-dir='$PWD/.cache/fedgen'")
for arg in "$@"; do args+=(--run-config "$arg"); done
exec .venv/bin/python scripts/simulate.py --num-supernodes "${NUM_SUPERNODES:-100}" --report-memory \
  "${args[@]}"
