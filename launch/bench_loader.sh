#!/usr/bin/env bash
# Loader benchmark (FFCV vs the reference torchvision pipeline) and Fashion-MNIST prepare throughput.
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
setup_all
cd "$REPO_ROOT"
python tests/bench/bench_loader.py "$@"
