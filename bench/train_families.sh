#!/usr/bin/env bash
# Train the model families of BENCHMARKS.md's "Model families" table with one shared budget:
# 5 epochs, batch 128, AdamW lr 3e-3 (one-cycle), random shifts of 2 px, γ = 0.8, tol 1e-4,
# each family's default backprop mode. The bundled checkpoints checkpoints/{mnist,fashion-mnist}-*
# were made by this script on one H100 (all runs at once), and their config.json records each
# command. Runs in parallel; each run's JSON summary goes to $LOGS/<name>.json.
#
#   bench/train_families.sh OUT_DIR [DATA_ROOT] [DEVICE]
#
# FPN_TRAIN overrides the trainer command (default: fpn-train); RUN_TIMEOUT (seconds) bounds each
# run (its best checkpoint so far stays).
set -euo pipefail
out=${1:?usage: bench/train_families.sh OUT_DIR [DATA_ROOT] [DEVICE]}
data=${2:-../shared/data}
device=${3:-auto}
train=${FPN_TRAIN:-fpn-train}
logs=$out/logs
mkdir -p "$logs"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}

common=(--epochs 5 --batch-size 128 --lr 3e-3 --augment-shift 2 --gamma 0.8 --tol 1e-4
        --device "$device" --json)

run() {  # run NAME DATASET ARGS...
  local name=$1 dataset=$2
  shift 2
  timeout "${RUN_TIMEOUT:-0}" $train --dataset "$dataset" --data-dir "$data/$dataset" "${common[@]}" --name "$name" \
    --out "$out/$name" "$@" >"$logs/$name.json" 2>"$logs/$name.err" &
}

run mnist-fpn-5ep mnist --family fpn
run mnist-skip-deq mnist --family skip-deq --option skip_variant=skip --option skip_weight=0.05
run mnist-skip-deq-w0.01 mnist --family skip-deq --option skip_variant=skip --option skip_weight=0.01
run mnist-skip-deq-w0.2 mnist --family skip-deq --option skip_variant=skip --option skip_weight=0.2
run mnist-skip-reg mnist --family skip-deq --option skip_variant=skip-reg --option skip_weight=0.05
run mnist-cdeq mnist --family cdeq
run mnist-opteq mnist --family opteq
run mnist-linf mnist --family linf --arch mlp --width 128 --option lipschitz_weight=0.001
run mnist-linf-l0 mnist --family linf --arch mlp --width 128 --option lipschitz_weight=0
run mnist-linf-l0.01 mnist --family linf --arch mlp --width 128 --option lipschitz_weight=0.01
run fashion-mnist-fpn fashion-mnist --family fpn
run fashion-mnist-skip-deq fashion-mnist --family skip-deq --option skip_variant=skip --option skip_weight=0.05
run fashion-mnist-skip-deq-w0.2 fashion-mnist --family skip-deq --option skip_variant=skip --option skip_weight=0.2
run fashion-mnist-linf fashion-mnist --family linf --arch mlp --width 128 --option lipschitz_weight=0.001
wait
