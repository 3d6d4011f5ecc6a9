#!/usr/bin/env bash
# One device call for round 3 of tune_gpu.sh (from the repository root; carry .gpu_data and .whl, made as in
# tune_gpu.sh's header: the half of pbc_dev, a copy of crosslab_dev, the torchsampler wheel). Copies the table and
# each run's metrics into $OUT every 20 s, so a call cut short still returns what finished.
set -uo pipefail
OUT=${OUT:-runs/gpu_out}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/nvidia_smi.csv"
python3 -c "import torch, timm; print('torch', torch.__version__, 'timm', timm.__version__, 'cpus', __import__('os').cpu_count())" \
  > "$OUT/versions.txt"
nvidia-smi --query-gpu=timestamp,utilization.gpu,memory.used --format=csv -l 10 > "$OUT/gpu_util.csv" &
smi=$!
collect() {
  cp runs/gpu/tune_gpu3.* "$OUT/" 2>/dev/null
  for d in runs/gpu/tune_*/; do
    n=$(basename "$d"); cp "$d/metrics.csv" "$OUT/${n}_metrics.csv" 2>/dev/null; tail -3 "$d/tune_stdout.log" > "$OUT/${n}_tail.log" 2>/dev/null
  done
}
( while sleep 20; do collect; done ) &
loop=$!
timeout "${TUNE_TIMEOUT:-520}" bash benchmarks/device/tune_gpu.sh .gpu_data/pbc_dev_half .gpu_data/crosslab_dev 3 \
  > "$OUT/tune.log" 2>&1
rc=$?
kill $loop $smi 2>/dev/null
collect
cp runs/gpu/tune_base_s0/train.log "$OUT/base_s0_train.log" 2>/dev/null
tail -c 3000 "$OUT/tune.log"
exit $rc
