#!/usr/bin/env bash
# The baseline given what it needs: ADSH retrained from scratch on every class (--stage retrain) of the demo's
# data, with the demo's per-iteration settings but a constant learning rate (the demo's decay of 0.9 per
# outer iteration leaves 0.9^40 = 1.5% of it after 40 iterations, so a long run would stop for lack of lr,
# not because the model converged) and up to $MAX_ITER outer iterations, evaluated every $EVAL_EVERY.
# Converged = mAP@ALL gained less than 0.005 over the last 10 outer iterations (python -m dihn_dist.convergence),
# which then prints the curve, the iteration it converged at, its mAP and the training time (evaluation
# passes left out). With a finished demo run (DIHN_DEMO_RUN, default runs/demo) DIHN's row is printed too.
#   bash launch/converged_retrain.sh [extra dihn_dist.train arguments]
# Environment: DIHN_DATA (default data/fashion-mnist), DIHN_OUT (default runs/converged-retrain),
# MAX_ITER (default 80), EVAL_EVERY (default 2), LR_DECAY (default 1.0).
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
setup_all
cd "$REPO_ROOT"
DATA="${DIHN_DATA:-$REPO_ROOT/data/fashion-mnist}"
OUT="${DIHN_OUT:-$REPO_ROOT/runs/converged-retrain}"
DEMO_RUN="${DIHN_DEMO_RUN:-$REPO_ROOT/runs/demo}"
MAX_ITER="${MAX_ITER:-80}"
EVAL_EVERY="${EVAL_EVERY:-2}"
LR_DECAY="${LR_DECAY:-1.0}"
run python -m dihn_dist.prepare --dataset fashion-mnist --out "$DATA"
run python -m dihn_dist.train --data "$DATA" --out "$OUT" --resume \
  --arch small-cnn --code-length 12 --max-iter "$MAX_ITER" --max-epoch 3 --num-samples 2000 --batch-size 64 \
  --lr 1e-3 --lr-decay-original "$LR_DECAY" --eval-every "$EVAL_EVERY" --stage retrain "$@"
COMPARE=()
[ -f "$DEMO_RUN/incremental/result.json" ] && COMPARE=(--compare "$DEMO_RUN")
run python -m dihn_dist.convergence "$OUT" --stage retrain "${COMPARE[@]}"
echo "Run folder: $OUT (plots: python -m dihn_dist.evaluate $OUT)"
