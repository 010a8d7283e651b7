#!/usr/bin/env bash
# DDP over gloo on N CPU processes of this machine: launch/train_cpu.sh [N] [dihn_dist.train arguments]
#   launch/train_cpu.sh 2 --data data/fashion-mnist --out runs/cpu2 --resume --arch small-cnn --max-iter 20
# N defaults to $NPROC or 2. --batch-size is the global batch (each process takes its share), and each
# process takes its share of the CPUs for its loader and torch threads: no per-process arithmetic here.
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"; setup_all
cd "$REPO_ROOT"
NPROC="${NPROC:-2}"
if [[ "${1:-}" =~ ^[0-9]+$ ]]; then NPROC="$1"; shift; fi
[ "$NPROC" -gt 0 ] || die "expected a positive number of processes, got $NPROC"
run torchrun --standalone --nproc_per_node "$NPROC" -m dihn_dist.train --device cpu "$@"
