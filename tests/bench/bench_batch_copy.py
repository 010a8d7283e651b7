"""What the host side of one training step's copy to the device costs, measured on the CPU.

    python tests/bench/bench_batch_copy.py [--batch-size 64] [--resolution 224] [--repeat 50]

On CUDA a step's images leave FFCV's reused buffer through a fresh staging buffer (pinned there), copied
to the device without blocking the host (data/loader.py `Normaliser.to_device`): the host pays one memcpy
of the uint8 batch. Before, each step made three blocking host-to-device copies (images, labels, database
positions), each a host wait for the device's queue; the labels and positions are now kept on the host
(two small host copies). Measured here: the staging memcpy (ordinary memory; pinned memory is no slower
to write) and the host-side label/position conversions, next to FFCV's decode time per batch
(docs/performance.md).
"""
from __future__ import annotations

import argparse

import torch
from benchkit import best_of


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--resolution", type=int, default=224)
    parser.add_argument("--labels", type=int, default=21)
    parser.add_argument("--repeat", type=int, default=50)
    args = parser.parse_args()
    b, r = args.batch_size, args.resolution
    images = torch.randint(0, 255, (b, 3, r, r), dtype=torch.uint8)
    labels = torch.randint(0, 2, (b, args.labels), dtype=torch.uint8)
    index = torch.arange(b, dtype=torch.int64).reshape(b, 1)

    def stage():
        staged = torch.empty(images.shape, dtype=images.dtype)
        staged.copy_(images)

    def host_side():
        labels.to(torch.float32, copy=True)
        index.reshape(-1).to(torch.int64, copy=True)

    staging, rest = best_of(args.repeat, stage), best_of(args.repeat, host_side)
    print(f"batch {b} x 3 x {r} x {r} uint8 ({images.numel() / 1e6:.1f} MB): staging memcpy {staging * 1e3:.2f} ms, "
          f"labels + positions on the host {rest * 1e3:.3f} ms per step")


if __name__ == "__main__":
    main()
