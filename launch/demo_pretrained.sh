#!/usr/bin/env bash
# The demo with an ImageNet-pretrained backbone: the same Fashion-MNIST 7+3 split and table as
# launch/demo.sh, with EfficientNet-Lite0 (its weights come installed with the package: nothing downloads)
# fine-tuned at 64 px. The budget (launch/demo_pretrained.yaml) is sized for about 12 minutes on 2 CPU
# cores; on a GPU machine the same command runs on the GPU. Extra arguments go to dihn_dist.train, e.g.
# `--freeze-backbone` (the trunk fixed, only the hash layer trains on features computed once).
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
export DIHN_OUT="${DIHN_OUT:-$here/../runs/demo-pretrained}"
export DIHN_DEMO_CONFIG="$here/demo_pretrained.yaml"
exec bash "$here/demo.sh" "$@"
