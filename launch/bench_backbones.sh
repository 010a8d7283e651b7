#!/usr/bin/env bash
# Backbones on the demo split (small CNN; EfficientNet-Lite0 from scratch, pretrained fine-tuned, pretrained
# frozen): mAP of the three stages, train time, images/s, and the trainer's images/s against the bare
# network's. Needs --work DIR outside the repository; about 45 minutes on 2 idle cores for everything.
#   bash launch/bench_backbones.sh --work /tmp/dihn-backbones [--part quality|throughput] [--variant NAME]
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
setup_all
exec python "$REPO_ROOT/tests/bench/bench_backbones.py" "$@"
