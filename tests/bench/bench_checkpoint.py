"""What a checkpoint costs the training loop: the state's size, the synchronous write (torch.save + fsync +
rename, what every rank used to wait for) and the host copy that a background write costs the loop instead.

    python tests/bench/bench_checkpoint.py [--arch small-cnn alexnet] [--dir DIR] [--repeat 3]

Measures the model + Adam state (weights and both moments) of each architecture after one optimizer step,
the shape of the trainer's checkpoint; the codes (n x c int8) and history are small next to it.
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from benchkit import best_of

from dihn_dist.models.networks import build_model
from dihn_dist.training.runfolder import atomic_torch_save, host_copy


def state_of(arch: str, code_length: int = 48) -> dict:
    model = build_model(arch, code_length)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()
    return {"model": model.state_dict(), "optimizer": optimizer.state_dict()}


def nbytes(state) -> int:
    if isinstance(state, torch.Tensor):
        return state.numel() * state.element_size()
    if isinstance(state, dict):
        return sum(nbytes(v) for v in state.values())
    if isinstance(state, (list, tuple)):
        return sum(nbytes(v) for v in state)
    return 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", nargs="+", default=["small-cnn", "alexnet"])
    parser.add_argument("--dir", type=Path, help="where to write (default: a temporary folder)")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.dir) as folder:
        print(f"{'arch':<10} {'state MB':>9} {'sync write s':>13} {'host copy s':>12}")
        for arch in args.arch:
            state = state_of(arch)
            path = Path(folder) / f"{arch}.pt"
            write = best_of(args.repeat, lambda: atomic_torch_save(path, state))
            copy = best_of(args.repeat, lambda: host_copy(state))
            print(f"{arch:<10} {nbytes(state) / 1e6:9.1f} {write:13.3f} {copy:12.3f}", flush=True)


if __name__ == "__main__":
    main()
