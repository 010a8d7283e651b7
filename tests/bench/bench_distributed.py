"""Per-outer-iteration cost of the distributed trainer on CPU, 1 process vs 2 (torchrun, gloo), side by side.

Runs the real trainer (`python -m dihn_dist.train`, stage original) on a Fashion-MNIST subset with the
same global batch, reads the per-iteration phase times it records in metrics.json, and prints them next
to each other. Then measures the code broadcast at NUS-WIDE scale (195,834 x 48 bits) between two gloo
processes: float32 rows against the bit-packed rows the trainer sends.

    bash launch/bench_distributed.sh [--iterations 4] [--samples 2000] [--data DIR]
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as torch_dist
import torch.multiprocessing as mp

PHASES = ("train_s", "gather_s", "dcc_s", "broadcast_s", "eval_s")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def prepare(data: Path) -> Path:
    if not (data / "manifest.json").is_file():
        subprocess.run([sys.executable, "-m", "dihn_dist.prepare", "--dataset", "fashion-mnist", "--out", str(data),
                        "--database-per-class", "1000", "--query-per-class", "100"], check=True)
    return data


def train(processes: int, data: Path, out: Path, args) -> dict:
    train_args = ["-m", "dihn_dist.train", "--data", str(data), "--out", str(out), "--arch", "small-cnn",
                  "--code-length", "12", "--max-iter", str(args.iterations), "--max-epoch", "1",
                  "--num-samples", str(args.samples), "--batch-size", str(args.global_batch), "--lr", "1e-3",
                  "--device", "cpu", "--stage", "original", "--eval-every", "1"]
    env = dict(os.environ)  # each process takes its share of the CPUs by itself
    if processes == 1:
        command = [sys.executable, *train_args]
    else:
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes),
                   "--master_port", str(free_port()), *train_args]
    started = time.perf_counter()
    subprocess.run(command, check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wall = time.perf_counter() - started
    history = json.loads((out / "metrics.json").read_text())["stages"]["original"]["iterations"]
    steady = history[1:]  # the first iteration pays FFCV's pipeline compilation
    means = {phase: float(np.mean([it.get(phase, 0.0) for it in steady])) for phase in PHASES}
    means["broadcast_bytes"] = history[-1]["broadcast_bytes"]
    means["images_per_s"] = float(np.mean([it["images_per_s"] for it in steady]))
    means["wall_s"] = wall
    return means


def _broadcast_worker(rank: int, port: int, rows: int, bits: int, repeats: int, results) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch_dist.init_process_group("gloo", rank=rank, world_size=2)
    from dihn_dist.common.codes import pack_codes
    codes = torch.randint(0, 2, (rows, bits)).float() * 2 - 1
    payloads = {"float32": codes, "packed": pack_codes(codes)}
    for name, payload in payloads.items():
        torch_dist.broadcast(payload, src=0)  # warm the connection
        torch_dist.barrier()
        started = time.perf_counter()
        for _ in range(repeats):
            torch_dist.broadcast(payload, src=0)
        torch_dist.barrier()
        if rank == 0:
            results[name] = ((time.perf_counter() - started) / repeats, payload.numel() * payload.element_size())
    torch_dist.destroy_process_group()


def broadcast_at_nus_scale(rows: int = 195_834, bits: int = 48, repeats: int = 5) -> dict:
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_broadcast_worker, args=(free_port(), rows, bits, repeats, results), nprocs=2, join=True)
        return dict(results)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iterations", type=int, default=4)
    parser.add_argument("--samples", type=int, default=2000)
    parser.add_argument("--global-batch", type=int, default=64)
    parser.add_argument("--data", type=Path, help="prepared Fashion-MNIST folder (default: a 10,000-item subset in a temp dir)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as temp:
        data = prepare(args.data or Path(temp) / "fmnist-10k")
        runs = {n: train(n, data, Path(temp) / f"run{n}", args) for n in (1, 2)}
    print(f"\nPer outer iteration, stage original, {args.samples} samples x 1 epoch, global batch "
          f"{args.global_batch}, mean over iterations 2..{args.iterations} (CPU, gloo):")
    print(f"{'phase':<18}{'1 process':>12}{'2 processes':>14}{'2p / 1p':>10}")
    for key in (*PHASES, "images_per_s", "broadcast_bytes", "wall_s"):
        one, two = runs[1][key], runs[2][key]
        ratio = f"{two / one:10.2f}" if one else f"{'-':>10}"
        print(f"{key:<18}{one:12.3f}{two:14.3f}{ratio}")

    nus = broadcast_at_nus_scale()
    (float_s, float_bytes), (packed_s, packed_bytes) = nus["float32"], nus["packed"]
    print("\nCode broadcast at NUS-WIDE scale (195,834 x 48 bits), 2 gloo processes on this host:")
    print(f"{'payload':<10}{'MB':>10}{'seconds':>10}")
    print(f"{'float32':<10}{float_bytes / 1e6:10.2f}{float_s:10.4f}")
    print(f"{'packed':<10}{packed_bytes / 1e6:10.2f}{packed_s:10.4f}")
    print(f"packed is {float_bytes / packed_bytes:.0f}x smaller and {float_s / packed_s:.1f}x faster to broadcast")


if __name__ == "__main__":
    main()
