#!/usr/bin/env bash
# The cross-lab recipe search of README "Cells from other labs", as it ran on one H200 (torch 2.11):
# candidates of the cpu preset on half of pbc_dev, all at once on the GPU, each evaluated on crosslab_dev.
#   python -m benchmarks.half_split --data ../shared/data/pbc_dev --out DATA_DIR   # (then copy the _half folder)
#   bash benchmarks/device/tune_gpu.sh DATA_DIR/pbc_dev_half ../shared/data/crosslab_dev [1|2|3|4]
# Round 1: augmentation and input normalisation; round 2: the nucleus-centred crop (both on the cpu preset);
# round 3: the crosslab preset against MixStyle, heavier low resolution and more grayscale, three seeds each
# (12 runs at once, evaluated with the 8-view TTA, per-class recall); round 4: the crosslab preset against 48 px,
# 48 px with the paper's larger mobilevit_xs (about 2x the compute of xxs at 64 px: inside the cpu budget) and
# 48 px for 120 epochs, three seeds each; round 5 (what is left of a 15-minute loan): mobilevit_s at 48 px and
# mobilevit_xs at 40 px, two seeds each, 4 runs at once; round 6: the crosslab preset (mobilevit_xs, 48 px) against
# two training-only regularisers, mixup (alpha 0.2) and stochastic depth (0.1), four seeds each, 12 runs at once.
# Tables: runs/gpu/tune_gpu*.md.
# EXTRA is appended to every candidate's flags (a dry run on CPU: EXTRA="--device cpu --epochs 1
# --max-steps-per-epoch 2"); PARALLEL overrides rounds 3 and 4's 12.
set -euo pipefail
DATA=${1:?training folder}; EVAL=${2:?other lab folder}; ROUND=${3:-1}; EXTRA=${EXTRA:-}
C="--device cuda --workers 2 --plots false --threads 1"
if [[ $ROUND == 6 ]]; then
  args=()
  for s in 0 1 2 3; do
    R="--compile off --seed $s $EXTRA"
    args+=(--candidate "base_s$s:$C $R"
           --candidate "mixup_s$s:--mixup 0.2 $C $R"
           --candidate "droppath_s$s:--drop-path 0.1 $C $R")
  done
  python3 -m benchmarks.tune_cpu_preset --data "$DATA" --eval-data "$EVAL" --out runs/gpu --name tune_gpu6 \
    --base-preset crosslab --tta dihedral8 --parallel "${PARALLEL:-12}" "${args[@]}"
elif [[ $ROUND == 5 ]]; then
  args=()
  for s in 0 1; do
    R="--compile off --seed $s $EXTRA"
    args+=(--candidate "s48_s$s:--arch mobilevit_s --image-size 48 $C $R"
           --candidate "xs40_s$s:--arch mobilevit_xs --image-size 40 $C $R")
  done
  python3 -m benchmarks.tune_cpu_preset --data "$DATA" --eval-data "$EVAL" --out runs/gpu --name tune_gpu5 \
    --base-preset crosslab --tta dihedral8 --parallel "${PARALLEL:-4}" "${args[@]}"
elif [[ $ROUND == 4 ]]; then
  args=()
  for s in 0 1 2; do
    R="--compile off --seed $s $EXTRA"
    args+=(--candidate "base_s$s:$C $R"
           --candidate "px48_s$s:--image-size 48 $C $R"
           --candidate "xs48_s$s:--arch mobilevit_xs --image-size 48 $C $R"
           --candidate "px48e120_s$s:--image-size 48 --epochs 120 --warmup-epochs 18 $C $R")
  done
  python3 -m benchmarks.tune_cpu_preset --data "$DATA" --eval-data "$EVAL" --out runs/gpu --name tune_gpu4 \
    --base-preset crosslab --tta dihedral8 --parallel "${PARALLEL:-12}" "${args[@]}"
elif [[ $ROUND == 3 ]]; then
  args=()
  for s in 0 1 2; do
    R="--compile off --seed $s $EXTRA"
    args+=(--candidate "base_s$s:$C $R"
           --candidate "mixstyle_s$s:--mixstyle 0.5 $C $R"
           --candidate "lowres_s$s:--augment robust_soft_lowres $C $R"
           --candidate "gray_s$s:--augment robust_soft_gray $C $R")
  done
  python3 -m benchmarks.tune_cpu_preset --data "$DATA" --eval-data "$EVAL" --out runs/gpu --name tune_gpu3 \
    --base-preset crosslab --tta dihedral8 --parallel "${PARALLEL:-12}" "${args[@]}"
elif [[ $ROUND == 1 ]]; then
  python3 -m benchmarks.tune_cpu_preset --data "$DATA" --eval-data "$EVAL" --out runs/gpu --name tune_gpu --parallel 10 \
    --candidate "base:--augment dihedral $C" \
    --candidate "dih_od:--augment dihedral --input-norm od_instance $C" \
    --candidate "rob_in:--augment robust $C" \
    --candidate "rob_od:--augment robust --input-norm od_instance $C" \
    --candidate "rob_rgb:--augment robust --input-norm rgb_instance $C" \
    --candidate "rob_od_ls:--augment robust --input-norm od_instance --label-smoothing 0.1 $C" \
    --candidate "rob_od_e60:--augment robust --input-norm od_instance --epochs 60 --warmup-epochs 18 $C" \
    --candidate "mild_od:--augment robust_mild --input-norm od_instance $C" \
    --candidate "strong_od:--augment robust_strong --input-norm od_instance $C" \
    --candidate "strong_rgb:--augment robust_strong --input-norm rgb_instance $C"
else
  python3 -m benchmarks.tune_cpu_preset --data "$DATA" --eval-data "$EVAL" --out runs/gpu --name tune_gpu2 --parallel 8 \
    --candidate "c_dih_od:--crop cell --augment dihedral --input-norm od_instance $C" \
    --candidate "c_dih_in:--crop cell --augment dihedral $C" \
    --candidate "c_rc_od:--crop cell --augment robust_cell --input-norm od_instance $C" \
    --candidate "c_rc_in:--crop cell --augment robust_cell $C" \
    --candidate "c_mild_od:--crop cell --augment robust_mild --input-norm od_instance $C" \
    --candidate "c_rc_od_f45:--crop cell --cell-fill 0.45 --augment robust_cell --input-norm od_instance $C" \
    --candidate "c_rcg_od:--crop cell --augment robust_cell_gray --input-norm od_instance $C" \
    --candidate "c_rc_od_ls:--crop cell --augment robust_cell --input-norm od_instance --label-smoothing 0.1 $C"
fi
