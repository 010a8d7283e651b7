"""Backbones on the demo split, side by side: quality, speed, and how close the trainer comes to its network.

    bash launch/bench_backbones.sh --work /tmp/dihn-backbones                 # both parts
    bash launch/bench_backbones.sh --work /tmp/dihn-backbones --part quality  # or --part throughput

quality     The three stages (original, DIHN, retrain at DIHN's budget) of each variant on Fashion-MNIST 7+3,
            into WORK/runs/<variant> (resumed when interrupted, reused when finished: remove the folder to
            measure changed code):
              small-cnn          launch/demo.yaml (the demo: 28 px, from scratch)
              lite0-scratch      launch/demo_pretrained.yaml with --pretrained none
              lite0-pretrained   launch/demo_pretrained.yaml (ImageNet weights, fine-tuned: the pretrained demo)
              lite0-frozen       launch/demo_pretrained.yaml with --freeze-backbone
            Printed: mAP@ALL per stage, train seconds per outer iteration, training images/s, the frozen
            trunk's one feature pass, and the variant's wall time (measured when it ran, kept beside its folder).
throughput  The trainer's images/s against the bare network's, at the same resolution, batch, threads and
            optimizer: small-cnn at 28 px and lite0 pretrained at the pretrained demo's resolution. The
            trainer runs stage 1 for --throughput-iters outer iterations of the config's samples (fresh each
            time); its rates are the fastest and the median of the iterations after the first (train_s:
            the epochs over the sample, loader, augmentation, loss and steps included). The bare network is a loop of
            forward, a mean-square loss, backward and Adam step on one random batch held in memory, the
            best of three runs.
            Then Lite0's forward pass alone (eval mode) at batches 32, 64 and 256: what sets the
            batch of query encoding and frozen features on a CPU (inference_batch_size).

mAP figures are deterministic from the seed; times depend on the machine: run it on an idle one.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import List, Optional

REPO_ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO_ROOT))  # this checkout's dihn_dist
sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchkit import table  # noqa: E402

DEMO = REPO_ROOT / "launch" / "demo.yaml"
PRETRAINED = REPO_ROOT / "launch" / "demo_pretrained.yaml"
VARIANTS = {
    "small-cnn": [f"--config={DEMO}"],
    "lite0-scratch": [f"--config={PRETRAINED}", "--pretrained", "none"],
    "lite0-pretrained": [f"--config={PRETRAINED}"],
    "lite0-frozen": [f"--config={PRETRAINED}", "--freeze-backbone"],
}
STAGES = ("original", "incremental", "retrain")


def run(command: List[str]) -> float:
    """Runs a command (printed first); returns its wall seconds."""
    print("+ " + " ".join(command), flush=True)
    started = time.perf_counter()
    subprocess.run(command, check=True)
    return time.perf_counter() - started


def prepare(work: Path) -> Path:
    data = work / "fashion-mnist"
    run([sys.executable, "-m", "dihn_dist.prepare", "--dataset", "fashion-mnist", "--out", str(data)])
    return data


def train_variant(work: Path, data: Path, name: str, seed: int) -> Path:
    out = work / "runs" / name
    wall = out.with_name(name + ".wall_s")
    if not (out / "metrics.json").exists() or not wall.exists():
        seconds = run([sys.executable, "-m", "dihn_dist.train", *VARIANTS[name], "--data", str(data),
                       "--out", str(out), "--resume", "--seed", str(seed)])
        if wall.exists():  # a resumed run: the earlier part's seconds count too
            seconds += float(wall.read_text())
        wall.write_text(f"{seconds:.1f}")
    return out


def quality_row(name: str, out: Path) -> list:
    metrics = json.loads((out / "metrics.json").read_text())
    maps = {row["stage"]: row["map_all"] for row in metrics["rows"]}
    stages = [metrics["stages"][s] for s in STAGES if s in metrics["stages"]]
    iterations = [it for stage in stages for it in stage["iterations"]]
    train_s = sum(it["train_s"] for it in iterations)
    images = sum(it["train_s"] * it["images_per_s"] for it in iterations)
    features_s = sum(stage.get("trunk_features_s", 0.0) for stage in stages)
    wall = float(out.with_name(name + ".wall_s").read_text())
    # B_old as DIHN ended it against the codes stage 1 wrote (checksums over the same rows)
    kept = metrics["stages"].get("incremental", {}).get("frozen_checksum_after")
    same = "-" if kept is None else "yes" if kept == metrics["stages"]["original"]["codes_checksum"] else "NO"
    return [name, *(f"{maps[s]:.4f}" if s in maps else "-" for s in STAGES), same,
            f"{train_s / len(iterations):.2f}", f"{images / train_s:.0f}",
            f"{features_s:.0f}" if features_s else "-", f"{wall / 60:.1f}"]


def trainer_rate(work: Path, data: Path, config: Path, iterations: int, seed: int) -> dict:
    out = work / "throughput" / config.stem
    shutil.rmtree(out, ignore_errors=True)
    run([sys.executable, "-m", "dihn_dist.train", f"--config={config}", "--data", str(data), "--out", str(out),
         "--stage", "original", "--max-iter", str(iterations), "--eval-every", "0", "--seed", str(seed)])
    metrics = json.loads((out / "metrics.json").read_text())
    history = metrics["stages"]["original"]["iterations"]
    saved = json.loads((out / "config.json").read_text())
    rates = [it["images_per_s"] for it in history[1:]]
    return {"best": max(rates), "median": statistics.median(rates),
            "arch": saved["arch"], "batch_size": saved["batch_size"],
            "resolution": int(metrics["stages"]["original"]["resolution"])}


BARE = """
import sys, time, torch
from dihn_dist.distributed.machine import cpu_share
from dihn_dist.models.networks import build_model
mode, arch, side, batch, steps = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
torch.set_num_threads(cpu_share(1))
# The random batch and mean-square loss push values into the denormal range, which x86 computes slowly and
# the trainer's data and loss do not: Lite0 at 64 px ran 122 images/s here without this, 131 with it.
torch.set_flush_denormal(True)
torch.manual_seed(0)
network = build_model(arch, 12, "auto").train(mode == "train")  # installed weights where there are some
optimizer = torch.optim.Adam(network.parameters(), lr=1e-3)
images = torch.randn(batch, 3, side, side)
def step():
    if mode == "forward":
        with torch.no_grad():
            network(images)
        return
    loss = network(images).square().mean()
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
for _ in range(3):
    step()
rates = []
for _ in range(3):  # the best of three runs: the network's own limit, the least disturbed by the machine
    started = time.perf_counter()
    for _ in range(steps):
        step()
    rates.append(steps * batch / (time.perf_counter() - started))
print(max(rates))
"""


def bare_rate(arch: str, side: int, batch: int, steps: int, mode: str = "train") -> float:
    """images/s of the bare network: a training step (mode train) or a forward pass in eval mode (forward)."""
    command = [sys.executable, "-c", BARE, mode, arch, str(side), str(batch), str(steps)]
    print(f"+ bare {arch} {side} px, batch {batch}, {steps} {mode} steps", flush=True)
    done = subprocess.run(command, check=True, capture_output=True, text=True, cwd=REPO_ROOT,
                          env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})
    return float(done.stdout.strip().splitlines()[-1])


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, required=True, help="folder for data and runs, outside the repository")
    parser.add_argument("--part", choices=("quality", "throughput", "both"), default="both")
    parser.add_argument("--variant", action="append", choices=list(VARIANTS),
                        help="quality variants, repeatable (default: all four)")
    parser.add_argument("--throughput-iters", type=int, default=6,
                        help="outer iterations of each trainer throughput run (default 6; the first is dropped)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    args.work = args.work.resolve()
    if args.work == REPO_ROOT or REPO_ROOT in args.work.parents:
        parser.error(f"--work {args.work}: choose a folder outside the repository")
    data = prepare(args.work)
    if args.part in ("quality", "both"):
        names = args.variant or list(VARIANTS)
        rows = [quality_row(name, train_variant(args.work, data, name, args.seed)) for name in names]
        print(f"\nFashion-MNIST 7+3, seed {args.seed}: mAP@ALL of each stage; train time and images/s over "
              f"every outer iteration of the three stages")
        print(table(["variant", "original codes", "DIHN", "retrain, same budget", "B_old bit-identical",
                     "train s / outer iteration",
                     "images/s", "trunk features s", "whole run, min"], rows))
    if args.part in ("throughput", "both"):
        rows = []
        for config in (DEMO, PRETRAINED):
            trainer = trainer_rate(args.work, data, config, args.throughput_iters, args.seed)
            steps = 40 if trainer["arch"] == "small-cnn" else 10
            bare = bare_rate(trainer["arch"], trainer["resolution"], trainer["batch_size"], steps)
            rows.append([trainer["arch"], f"{trainer['resolution']} px", trainer["batch_size"],
                         f"{trainer['best']:.0f}", f"{trainer['median']:.0f}", f"{bare:.0f}",
                         f"{trainer['best'] / bare:.2f}", f"{trainer['median'] / bare:.2f}"])
        print("\nTraining images/s: the trainer (stage 1, its fastest and its median outer iteration after the "
              "first) against the bare network's forward + backward + Adam step (the fastest of three runs), "
              "one process")
        print(table(["network", "resolution", "batch", "trainer, fastest", "trainer, median", "bare network",
                     "ratio, fastest", "ratio, median"], rows))
        # Why a CPU encodes (and computes frozen features) in batches of 32: inference_batch_size.
        side = trainer["resolution"]
        rates = {batch: bare_rate(trainer["arch"], side, batch, 4096 // batch // max(1, side // 32) ** 2, "forward")
                 for batch in (32, 64, 256)}
        print(f"\nForward only, eval mode, {trainer['arch']} at {side} px: images/s by batch")
        print(table(["batch", "images/s", "against batch 256"],
                    [[batch, f"{rate:.0f}", f"{rate / rates[256]:.2f}"] for batch, rate in rates.items()]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
