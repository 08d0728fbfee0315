#!/usr/bin/env bash
# One prepared run for a machine with a CUDA GPU: installs this checkout without touching the
# network (dependencies must already be there), checks CUDA correctness, times the GPU path.
# Results go to $OUT (default ./gpu_out) as JSON. Meant to finish in under 8 minutes;
# BUDGET (seconds, default 420) lets a longer lease run more of the sections; arguments
# are passed on to gpu_check.py (e.g. --only host_syncs,monitor_smdm).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-./gpu_out}
BUDGET=${BUDGET:-420}
mkdir -p "$OUT"
SITE=/tmp/adaptive_loop_site
rm -rf "$SITE"  # pip --target keeps what an earlier run left there
if python3 -m pip install -q --no-deps --no-build-isolation --no-index --target "$SITE" . \
    2>&1 | tail -n 3 && [ -f "$SITE/adaptive_loop/policies/base.py" ]; then
  export PYTHONPATH=$SITE${PYTHONPATH:+:$PYTHONPATH}
else  # no build backend there: the package also imports from the checkout itself
  echo "install failed; running from the checkout"
  export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
fi
unset ADAPTIVE_LOOP_COMPILER  # the GPU figures are inductor's
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/gpu.csv" || true
PYTHONUNBUFFERED=1 timeout --preserve-status -k 20 $((BUDGET + 30)) python3 benchmarks/gpu_check.py --out "$OUT" \
  --budget "$BUDGET" "$@" 2>&1 | tee "$OUT/log.txt"
