#!/usr/bin/env bash
# Hashing-core benchmark: DCC and mAP against the reference formulations (same inputs, outputs asserted equal).
source "$(dirname "$0")/common.sh"; setup_all; python "$REPO_ROOT/tests/bench/bench_core.py" "$@"
