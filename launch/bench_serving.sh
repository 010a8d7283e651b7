#!/usr/bin/env bash
# Serving benchmark: top-100 at 193,734 x 48 bits, our exact ranking vs FAISS flat/IVF/HNSW, and an index grown over rounds.
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
setup_all
exec python "$REPO_ROOT/tests/bench/bench_serving.py" "$@"
