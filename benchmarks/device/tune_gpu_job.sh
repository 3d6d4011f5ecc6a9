#!/usr/bin/env bash
# One device call for a round of tune_gpu.sh: `bash benchmarks/device/tune_gpu_job.sh [ROUND]` (default 4; run from
# the repository root; carry .gpu_data and .whl, made as in tune_gpu.sh's header: the half of pbc_dev, a copy of
# crosslab_dev, the torchsampler wheel). Packs the table and each run's metrics, logs, evaluation reports and
# logits into $OUT/tune_gpu<ROUND>.tgz every 20 s, so a call cut short still returns what finished (one archive:
# a device call returns only a few files). ONE_RUN=SECONDS then trains one `paper` run alone for up to that long
# (10 epochs of half of pbc_dev, eager, bf16) with nvidia-smi sampled every second: one run's use of the card,
# $OUT/one_run/{gpu_util.csv,metrics.csv,train.log}.
set -uo pipefail
ROUND=${1:-4}
OUT=${OUT:-runs/gpu_out}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/nvidia_smi.csv"
python3 -c "import torch, timm; print('torch', torch.__version__, 'timm', timm.__version__, 'cpus', __import__('os').cpu_count())" \
  > "$OUT/versions.txt"
nvidia-smi --query-gpu=timestamp,utilization.gpu,memory.used --format=csv -l 10 > "$OUT/gpu_util.csv" &
smi=$!
collect() {
  tar czf "$OUT/tune_gpu$ROUND.tgz.tmp" --ignore-failed-read runs/gpu/tune_gpu$ROUND.* runs/gpu/tune_*/{metrics.csv,train.log,tune_stdout.log} \
    runs/gpu/tune_*/eval/*.json runs/gpu/tune_*/eval/*.npz 2>/dev/null \
    && mv "$OUT/tune_gpu$ROUND.tgz.tmp" "$OUT/tune_gpu$ROUND.tgz"
}
( while sleep 20; do collect; done ) &
loop=$!
timeout "${TUNE_TIMEOUT:-520}" bash benchmarks/device/tune_gpu.sh .gpu_data/pbc_dev_half .gpu_data/crosslab_dev "$ROUND" \
  > "$OUT/tune.log" 2>&1
rc=$?
kill $loop $smi 2>/dev/null
collect
if [[ ${ONE_RUN:-0} -gt 0 ]]; then
  mkdir -p "$OUT/one_run"
  nvidia-smi --query-gpu=timestamp,utilization.gpu,memory.used --format=csv -lms 1000 > "$OUT/one_run/gpu_util.csv" &
  smi=$!
  timeout "$ONE_RUN" python3 -m train --data .gpu_data/pbc_dev_half --preset paper --epochs 10 --warmup-epochs 1 \
    --compile off --device cuda --workers 8 --plots false --run-dir runs/gpu/one_run > "$OUT/one_run/stdout.log" 2>&1
  kill $smi 2>/dev/null
  cp runs/gpu/one_run/{metrics.csv,train.log} "$OUT/one_run/" 2>/dev/null
fi
tail -c 3000 "$OUT/tune.log"
exit $rc
