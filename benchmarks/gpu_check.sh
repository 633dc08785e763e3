#!/usr/bin/env bash
# The GPU check, run on any GPU machine: copy this repo there, run `bash benchmarks/gpu_check.sh` from its root,
# and read ${OUT:-/tmp/gpu_check}/gpu_check.log. What it checks, its options (--prepare, --cpu-dry-run) and its
# knobs: `bash benchmarks/gpu_check.sh --help`, or the docstring of benchmarks/gpu_check.py, which it runs with
# $PYTHON (default: this repo's .venv/bin/python if there, else python3), everything teed into that log.
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PYTHON=${PYTHON:-$([[ -x $REPO/.venv/bin/python ]] && echo "$REPO/.venv/bin/python" || echo python3)}
LOG_DIR=${OUT:-/tmp/gpu_check}
mkdir -p "$LOG_DIR"
"$PYTHON" -u "$REPO/benchmarks/gpu_check.py" "$@" 2>&1 | tee "$LOG_DIR/gpu_check.log"
