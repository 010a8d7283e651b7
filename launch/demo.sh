#!/usr/bin/env bash
# The main job on the embedded default dataset (Fashion-MNIST, 7 original + 3 incremental classes):
# set-up, prepare the FFCV files once, then stage 1 (ADSH), stage 2 (DIHN) and the ADSH-retrained
# baseline at DIHN's budget (20 outer iterations each), and print the comparison table. Every stage is
# evaluated every 2 outer iterations, so `python -m dihn_dist.evaluate $OUT` draws the mAP curves. Settings
# are sized for a 2-core CPU (about 10 minutes); on a GPU machine the same command runs on the GPU. Extra
# arguments go to dihn_dist.train. The retrain given as many iterations as it needs: launch/converged_retrain.sh.
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
setup_all
cd "$REPO_ROOT"
DATA="${DIHN_DATA:-$REPO_ROOT/data/fashion-mnist}"
OUT="${DIHN_OUT:-$REPO_ROOT/runs/demo}"
CONFIG="${DIHN_DEMO_CONFIG:-$REPO_ROOT/launch/demo.yaml}"
run python -m dihn_dist.prepare --dataset fashion-mnist --out "$DATA"
# The settings are in launch/demo.yaml (launch/demo_pretrained.sh: demo_pretrained.yaml); flags given
# here (and in "$@") override the file.
run python -m dihn_dist.train --config "$CONFIG" --data "$DATA" --out "$OUT" --resume "$@"
echo "Run folder: $OUT (metrics.json, codes, models, logs; TensorBoard: tensorboard --logdir $OUT)"
