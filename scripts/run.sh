#!/usr/bin/env bash
# Run a federation under Flower's simulation engine (100 clients by default).
#   bash scripts/run.sh                         # the offline default (SmolLM2-135M + Shakespeare)
#   bash scripts/run.sh conf/smoke.toml         # a conf/*.toml override file, then "k=v" pairs
#   NUM_SUPERNODES=10 bash scripts/run.sh conf/smoke.toml "num-server-rounds=3"
# Each run's results go to a new folder outputs/<run-name>/<run id>/ in this checkout
# (outputs/<run-name>/latest links the newest; the path is printed at the end), unless
# output-dir is given.
set -euo pipefail
cd "$(dirname "$0")/.."
args=(--run-config "output-dir='$PWD/outputs/{run-name}/{run-id}' cache-dir='$PWD/.cache/fedgen'")
for arg in "$@"; do args+=(--run-config "$arg"); done
exec .venv/bin/python scripts/simulate.py --num-supernodes "${NUM_SUPERNODES:-100}" --report-memory \
  "${args[@]}"
