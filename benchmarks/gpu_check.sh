#!/usr/bin/env bash
# One prepared run for a machine with a CUDA GPU: installs this checkout without touching the
# network (dependencies must already be there), checks CUDA correctness, times the GPU path.
# Results go to $OUT (default ./gpu_out) as JSON. Meant to finish in under 8 minutes.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-./gpu_out}
mkdir -p "$OUT"
python3 -m pip install -q --no-deps --no-build-isolation --no-index --target /tmp/adaptive_loop_site . \
  2>&1 | tail -n 3
export PYTHONPATH=/tmp/adaptive_loop_site${PYTHONPATH:+:$PYTHONPATH}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/gpu.csv" || true
PYTHONUNBUFFERED=1 timeout 450 python3 benchmarks/gpu_check.py --out "$OUT" --budget 420 2>&1 | tee "$OUT/log.txt"
