#!/usr/bin/env bash
# One process (CPU, or the first GPU), --debug: anomaly detection, verbose logs, small defaults
# (2 outer iterations, 1 epoch, 200 samples). launch/train_debug.sh [dihn_dist.train arguments]
#   launch/train_debug.sh --data data/fashion-mnist --out runs/debug --arch small-cnn
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"; setup_all
cd "$REPO_ROOT"
run python -m dihn_dist.train --debug "$@"
