"""The small CNN as it was before commit aa391fa (ReLU units, 5x5 convolutions, the second block's grid
averaged down to 4x4), kept for the multi-label benchmark only (`bench_multilabel.py --network before`):
the product ships one small CNN, and this is its baseline, not an option of the trainer.

`use_before()` swaps it in for `dihn_dist.models.networks.SmallCNN` in this process, so that the trainer's
`build_model("small-cnn", ...)` builds it.
"""
from __future__ import annotations

import torch
from torch import nn


class SmallCNNBefore(nn.Module):
    """Two conv blocks and two dense layers (the network of the commit before aa391fa, unchanged)."""

    def __init__(self, code_length: int):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 32, 5, padding=2), nn.ReLU(inplace=True), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 5, padding=2), nn.ReLU(inplace=True), nn.MaxPool2d(2),
            nn.AdaptiveAvgPool2d(4),
        )
        self.hash_layer = nn.Sequential(
            nn.Flatten(), nn.Linear(64 * 4 * 4, 512), nn.ReLU(inplace=True), nn.Linear(512, code_length),
        )

    def forward(self, images):
        return torch.tanh(self.hash_layer(self.features(images)))


def use_before() -> None:
    from dihn_dist.models import networks
    networks.SmallCNN = SmallCNNBefore


if __name__ == "__main__":
    # python tests/bench/networks_before.py TRAIN-ARGS...: the trainer with the network before aa391fa.
    import sys
    use_before()
    from dihn_dist.train import main
    sys.exit(main(sys.argv[1:]))
