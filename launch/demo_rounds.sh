#!/usr/bin/env bash
# Classes arriving over time, on the embedded default dataset: Fashion-MNIST in four rounds of
# 4 + 2 + 2 + 2 classes. Round 1 trains the original codes (stage original: ADSH on classes 0-3); each later
# round prepares its data with --extends (the previous round's database, row for row, then the new classes'
# items), trains DIHN chained from the previous round's run (--old-run: its codes stay frozen, bit for bit)
# and the ADSH baseline retrained from scratch on every class so far. At the end the rounds report
# (python -m dihn_dist.evaluate RUN_1 ... RUN_4) prints mAP per round and forgetting.
#
# Settings: the demo's (launch/demo.sh: 12 bits, small CNN from scratch, lr 1e-3, batch 64, 3 epochs x
# 2,000 samples per outer iteration) with 15 outer iterations per stage instead of 20, so that the seven
# stages (round 1: original; rounds 2-4: incremental + retrain) fit in 15 minutes on an idle 2-core CPU:
# measured 12 min 42 s (80-87 s of training a stage; the README has the table). On a CPU shared with other
# jobs it takes several times longer. Extra arguments go to every
# dihn_dist.train command (e.g. --max-iter 20, or --device cuda).
#
# Idempotent like demo.sh: a finished preparation is not written again, and every train command uses
# --resume, so running it again continues an interrupted round or only prints the report.
#   DIHN_DATA  folder of the four preparations (default: data/fashion-mnist-rounds/round1..round4)
#   DIHN_OUT   folder of the four runs and the report (default: runs/demo-rounds/round1..round4, rounds-report)
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
setup_all
cd "$REPO_ROOT"
DATA="${DIHN_DATA:-$REPO_ROOT/data/fashion-mnist-rounds}"
OUT="${DIHN_OUT:-$REPO_ROOT/runs/demo-rounds}"
CLASSES_SO_FAR=(4 6 8 10)   # classes 0..K-1 after each round: 4, then +2, +2, +2
TRAIN_SETTINGS=(--arch small-cnn --code-length 12 --max-iter 15 --max-epoch 3 --num-samples 2000
                --batch-size 64 --lr 1e-3)

runs=()
for index in "${!CLASSES_SO_FAR[@]}"; do
  round=$((index + 1))
  data="$DATA/round$round"
  run="$OUT/round$round"
  if [ "$round" = 1 ]; then
    run python -m dihn_dist.prepare --dataset fashion-mnist --classes "${CLASSES_SO_FAR[$index]}" --out "$data"
    run python -m dihn_dist.train --data "$data" --out "$run" --resume "${TRAIN_SETTINGS[@]}" \
      --stage original "$@"
  else
    run python -m dihn_dist.prepare --dataset fashion-mnist --extends "$DATA/round$index" \
      --classes "${CLASSES_SO_FAR[$index]}" --out "$data"
    run python -m dihn_dist.train --data "$data" --out "$run" --resume "${TRAIN_SETTINGS[@]}" \
      --stage incremental,retrain --old-run "$OUT/round$index" "$@"
  fi
  runs+=("$run")
done
run python -m dihn_dist.evaluate "${runs[@]}" --out "$OUT/rounds-report"
echo "Run folders: ${runs[*]} (metrics.json, codes, models, logs); rounds report: $OUT/rounds-report"
