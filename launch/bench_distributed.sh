#!/usr/bin/env bash
# Per-iteration phase times, 1 vs 2 CPU processes, and the code broadcast at NUS-WIDE scale.
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
setup_all
exec python "$REPO_ROOT/tests/bench/bench_distributed.py" "$@"
