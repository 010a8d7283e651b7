#!/usr/bin/env bash
# DDP over NCCL on every GPU of this machine: launch/train_local_gpus.sh [dihn_dist.train arguments]
#   launch/train_local_gpus.sh --data data/cifar10 --out runs/cifar10 --resume --arch alexnet --code-length 12
# NGPUS=2 limits it to the first two GPUs (or set CUDA_VISIBLE_DEVICES). --batch-size is the global batch.
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"; setup_all
cd "$REPO_ROOT"
NGPUS="${NGPUS:-$(python -c 'import torch; print(torch.cuda.device_count())')}"
[ "$NGPUS" -gt 0 ] || die "no CUDA GPU visible to torch (torch.cuda.device_count() is 0): use launch/train_cpu.sh or launch/train_debug.sh"
run torchrun --standalone --nproc_per_node "$NGPUS" -m dihn_dist.train --device cuda "$@"
