#!/usr/bin/env bash
# Train the checkpoints of BENCHMARKS.md's "Model families" tables with one shared budget:
# 5 epochs (2,345 steps), batch 128, AdamW lr 3e-3 with the one-cycle schedule, random shifts of
# 2 px, tol 1e-4, JFB. Architecture knobs are per family: the conv families share the operator
# of checkpoints/mnist-fpn (32 channels, γ = 0.8); linf is dense (width 128) with μ∞(A) ≤ 0.5 and
# the Lipschitz regulariser at 1e-3. Each bundled config.json records the command that made it
# (some ran on an H100, some on a CPU: see --device there; the runs are otherwise identical).
#
#   bench/train_families.sh OUT_DIR [DATA_ROOT] [DEVICE]
#
# Runs in parallel; each run's JSON summary goes to OUT_DIR/logs/<name>.json. FPN_TRAIN overrides
# the trainer command (default: fpn-train); RUN_TIMEOUT (seconds) bounds each run (its best
# checkpoint so far stays). Sweeps behind the chosen options are in BENCHMARKS.md.
set -euo pipefail
out=${1:?usage: bench/train_families.sh OUT_DIR [DATA_ROOT] [DEVICE]}
data=${2:-../shared/data}
device=${3:-auto}
train=${FPN_TRAIN:-fpn-train}
logs=$out/logs
mkdir -p "$logs"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}

common=(--epochs 5 --batch-size 128 --lr 3e-3 --augment-shift 2 --gamma 0.8 --tol 1e-4
        --backprop jfb --device "$device" --json)
skip=(--family skip-deq --option skip_variant=skip --option skip_weight=0.01)
linf=(--family linf --arch mlp --width 128 --gamma 0.5 --option lipschitz_weight=0.001)

run() {  # run NAME DATASET ARGS...
  local name=$1 dataset=$2
  shift 2
  timeout "${RUN_TIMEOUT:-0}" $train --dataset "$dataset" --data-dir "$data/$dataset" \
    "${common[@]}" --name "$name" --out "$out/$name" "$@" >"$logs/$name.json" 2>"$logs/$name.err" &
}

run mnist-fpn-5ep mnist --family fpn
run mnist-skip-deq mnist "${skip[@]}"
run mnist-skip-reg mnist --family skip-deq --option skip_variant=skip-reg --option skip_weight=0.01
run mnist-cdeq mnist --family cdeq
run mnist-opteq mnist --family opteq
run mnist-linf mnist "${linf[@]}"
run fashion-mnist-fpn fashion-mnist --family fpn
run fashion-mnist-skip-deq fashion-mnist "${skip[@]}"
run fashion-mnist-linf fashion-mnist "${linf[@]}"
wait
