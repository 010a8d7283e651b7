#!/usr/bin/env bash
# Multi-label quality: a small synthetic NUS-WIDE tc21 (tests/bench/nus_synth.py), prepared at 32 px, then stage 1,
# DIHN and the same-budget retrain with the small CNN, printed side by side per variant (network, --augment).
# Needs --work DIR outside the repository. About 5-10 minutes per variant on 2 cores.
#   bash launch/bench_multilabel.sh --work /tmp/dihn-multilabel [--variant current --variant before:crop-flip]
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
setup_all
exec python "$REPO_ROOT/tests/bench/bench_multilabel.py" "$@"
