#!/usr/bin/env bash
# One prepared GPU check for issue 8 (runs in well under 10 minutes on one modern GPU):
# WRN-16-4 throughput (fp32 / bf16 / bf16 + channels_last), ghost norm's cost over batch
# norm, packed vs unpacked runs per minute at small B. Results: $OUT/gpu.json (or ./gpu.json).
#   bash benchmarks/gpu.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
if [ -x .venv/bin/python ]; then PY=.venv/bin/python; fi
if ! "$PY" -c "import sgdnoise" 2>/dev/null; then
  "$PY" -m pip install -q torch==2.14.1 torchvision==0.29.1 && "$PY" -m pip install -q -e .
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
OUT_DIR=${OUT:-.}
timeout 540 "$PY" benchmarks/gpu_bench.py --device cuda --out "$OUT_DIR/gpu.json"
