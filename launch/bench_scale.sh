#!/usr/bin/env bash
# NUS-WIDE tc21 at full size: synthetic data, prepare, 2 outer iterations under torchrun, hash term, rank 0's solo work.
# Needs --work DIR outside the repository (about 6 GB at full size); --small checks everything in minutes.
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
setup_all
exec python "$REPO_ROOT/tests/bench/bench_scale.py" "$@"
