#!/usr/bin/env bash
# GPU self-check (about 5-8 minutes on one GPU; more GPUs add the 1-vs-N and GPU-context checks): the CUDA
# tests, training throughput at 224 px for fp32 / bf16 / channels-last / compile, DCC and mAP@5000 at
# NUS-WIDE size on the GPU against the CPU, bf16 against fp32, host syncs per outer iteration. Prints a
# table; exits 1 on any mismatch (docs/distributed.md#what-the-gpu-check-verifies).
#   bash launch/gpu_check.sh [--workdir DIR] [--skip-compile]
#   bash launch/gpu_check.sh --device cpu --plan-only    # every trainer command of it, --check-only (CPU)
#   bash launch/gpu_check.sh --device cpu --quick        # the whole script at toy sizes (CPU)
# On a CUDA machine install the matching torch first (DIHN_CONSTRAINTS, see the README).
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"; setup_all
cd "$REPO_ROOT"
run python tests/bench/gpu_check.py "$@"
