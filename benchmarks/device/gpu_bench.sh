#!/usr/bin/env bash
# Issue 12 on a lent GPU machine (torch 2.11, timm, numpy; no torchsampler, no network), from the repository root.
# The job carries half of pbc_dev and the torchsampler wheel (both git-ignored: name them in the device run's
# carry list: .gpu_data/pbc_half and .whl; make them with `python -m benchmarks.half_split --data
# ../shared/data/pbc_dev --out runs/data` and `pip download torchsampler==0.1.2 --no-deps -d .whl`):
#   bash benchmarks/device/gpu_bench.sh speed     # < 8 min: model step eager vs compiled (batch 128, 256) and
#                                                 #   3 epochs of the paper preset end to end -> $OUT/gpu_train.md
#   bash benchmarks/device/gpu_bench.sh augment   # < 9 min: paper with `cells` vs `dihedral` (40 epochs each) and the
#                                                 #   cpu preset, test/val accuracy on one split -> $OUT/gpu_augment.md
# One part per device call (each call may run 10 minutes). DATA, OUT (default runs/gpu_bench), WORKERS, EPOCHS,
# AUG_EPOCHS override the defaults; BENCH_ARGS is appended to the benchmark's flags (a dry run on CPU:
# BENCH_ARGS="--device cpu --arch mobilevit_xxs --image-size 64 --batches 4 --steps 2 --max-steps-per-epoch 2"
# for speed; BENCH_ARGS="--device cpu" TRAIN_ARGS="--image-size 64 --epochs 1 --max-steps-per-epoch 1" for augment,
# whose TRAIN_ARGS go to every candidate's python -m train).
# Not measured yet: no GPU was lent to the session that wrote it.
set -uo pipefail
PART=${1:?speed or augment}
DATA=${DATA:-.gpu_data/pbc_half}
OUT=${OUT:-runs/gpu_bench}
WORKERS=${WORKERS:-8}
BENCH_ARGS=${BENCH_ARGS:-}
RUNS=runs/gpu_bench/runs
mkdir -p "$OUT" "$RUNS"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,compute_cap,driver_version --format=csv | tee "$OUT/nvidia_smi.csv"
python3 -c "import torch, timm; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'timm', timm.__version__)" \
  | tee "$OUT/versions.txt"
rc=0
case $PART in
  speed)
    timeout "${SPEED_TIMEOUT:-470}" python3 -m benchmarks.gpu_train --data "$DATA" --workers "$WORKERS" \
      --epochs "${EPOCHS:-3}" --batches 128 256 --runs-dir "$RUNS" --out "$OUT" $BENCH_ARGS > "$OUT/gpu_train.log" 2>&1 \
      || rc=$?
    cp "$RUNS"/e2e_paper/{train.log,metrics.csv,config.yaml} "$OUT/" 2>/dev/null
    ;;
  augment)
    E=${AUG_EPOCHS:-40}
    timeout "${AUG_TIMEOUT:-540}" python3 -m benchmarks.gpu_train --mode augment --data "$DATA" --workers "$WORKERS" \
      --candidate "paper_cells:--preset paper --augment cells --epochs $E" \
      --candidate "paper_dihedral:--preset paper --augment dihedral --epochs $E" \
      --candidate "cpu:--preset cpu" --train-args="${TRAIN_ARGS:-}" --runs-dir "$RUNS" --out "$OUT" $BENCH_ARGS \
      > "$OUT/gpu_augment.log" 2>&1 \
      || rc=$?
    for d in "$RUNS"/aug_*/; do cp "$d/metrics.csv" "$OUT/$(basename "$d")_metrics.csv" 2>/dev/null; done
    ;;
  *) echo "unknown part $PART: speed or augment" >&2; exit 2 ;;
esac
tail -5 "$OUT"/gpu_*.log
cat "$OUT"/gpu_*.md 2>/dev/null
exit $rc
