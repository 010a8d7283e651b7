"""Multi-label quality: stage 1, DIHN and the same-budget retrain on a small synthetic NUS-WIDE tc21, side by side.

    bash launch/bench_multilabel.sh --work /tmp/dihn-multilabel                      # today's defaults
    bash launch/bench_multilabel.sh --work /tmp/dihn-multilabel --variant current --variant before:crop-flip

The demo (Fashion-MNIST, one label per item, centred mirror-symmetric garments) says nothing about what NUS-WIDE
users train on: several tags per image, content anywhere in the frame, and images that are not mirror images of
themselves. This benchmark is that case at a size 2 cores train in minutes:

1. generate  tests/bench/nus_synth.py at --database rows and --query-per-tag x 21 queries (2 x 2 mosaics of
             tinted Fashion-MNIST items, 1-3 of 21 skewed tags per image; tags 18-20 are the new ones) into
             WORK/source-<database>; skipped when complete.
2. prepare   python -m dihn_dist.prepare --dataset nus-wide-tc21 --max-side --max-side into
             WORK/prepared-<database>-<max-side>; skipped when complete.
3. train     per --variant NETWORK[:AUGMENT], the three stages (original, incremental, retrain) with the
             settings below (the demo's, but --code-length 24 for 21 tags) into WORK/runs/<variant>, resumed
             when interrupted. NETWORK is `current` (the trainer as it is) or `before` (the small CNN before
             commit aa391fa: ReLU, 5x5, pooled to 4x4; tests/bench/networks_before.py, which only this benchmark
             uses); AUGMENT is a --augment value, default: the trainer's own (auto). Arguments after `--` go to
             every training command.
4. table     mAP@ALL of the original codes, DIHN and the retrain per variant, and what --augment ran (config.json).

mAP figures are deterministic from the seed (one process, one thread; the machine's load changes only the time).
A finished variant's run folder is reused as it is: remove WORK/runs/<variant> to measure changed code.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import List, Optional

REPO_ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO_ROOT))  # this checkout's dihn_dist
sys.path.insert(0, str(Path(__file__).resolve().parent))

import nus_synth  # noqa: E402
from benchkit import table  # noqa: E402

NETWORKS = ("current", "before")
TRAIN_SETTINGS = ["--arch", "small-cnn", "--code-length", "24", "--max-iter", "15", "--max-epoch", "2",
                  "--num-samples", "1000", "--batch-size", "64", "--lr", "1e-3", "--num-workers", "1",
                  "--stage", "original,incremental,retrain"]
STAGE_COLUMNS = (("original", "original codes (stage 1)"), ("incremental", "DIHN"),
                 ("retrain", "retrain, same budget"))


def parse_variant(text: str):
    network, _, augment = text.partition(":")
    if network not in NETWORKS:
        raise argparse.ArgumentTypeError(f"expected NETWORK[:AUGMENT] with NETWORK one of {', '.join(NETWORKS)}, "
                                         f"got {text!r}")
    return network, augment or None


def variant_name(network: str, augment: Optional[str]) -> str:
    return f"{network}-{augment or 'default'}"


def run(command: List[str], env: Optional[dict] = None) -> None:
    print("+ " + " ".join(command), flush=True)
    subprocess.run(command, check=True, env={**os.environ, **(env or {})})


def prepare(args) -> Path:
    source = args.work / f"source-{args.database}"
    nus_synth.generate(source, args.database, args.query_per_tag, seed=0, workers=args.workers)
    prepared = args.work / f"prepared-{args.database}-{args.max_side}"
    run([sys.executable, "-m", "dihn_dist.prepare", "--dataset", "nus-wide-tc21", "--root", str(source),
         "--out", str(prepared), "--max-side", str(args.max_side), "--num-workers", str(args.workers)])
    return prepared


def train(args, prepared: Path, network: str, augment: Optional[str], extra: List[str]) -> Path:
    out = args.work / "runs" / variant_name(network, augment)
    entry = ([str(Path(__file__).resolve().parent / "networks_before.py")] if network == "before"
             else ["-m", "dihn_dist.train"])
    command = [sys.executable, *entry, "--data", str(prepared), "--out", str(out), "--resume", *TRAIN_SETTINGS,
               "--seed", str(args.seed)]
    # One thread (and one loader thread): the figures then do not depend on the machine's core count, and a
    # shared machine does not slow the run down by oversubscription.
    run(command + (["--augment", augment] if augment else []) + extra, env={"OMP_NUM_THREADS": "1"})
    return out


def row(name: str, out: Path) -> list:
    metrics = json.loads((out / "metrics.json").read_text())
    config = json.loads((out / "config.json").read_text())
    maps = {r["stage"]: r["map_all"] for r in metrics["rows"]}
    ran = config.get("augment")
    cells = [f"{maps[stage]:.4f}" if stage in maps else "-" for stage, _ in STAGE_COLUMNS]
    gap = (f"{maps['incremental'] - maps['retrain']:+.4f}" if {"incremental", "retrain"} <= set(maps) else "-")
    return [name, ran, *cells, gap]


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, required=True, help="folder for data and runs, outside the repository")
    parser.add_argument("--variant", type=parse_variant, action="append",
                        help="NETWORK[:AUGMENT], repeatable (default: current, the trainer's defaults)")
    parser.add_argument("--database", type=int, default=6000, help="database images (default 6000)")
    parser.add_argument("--query-per-tag", type=int, default=20, help="queries per tag (default 20: 420)")
    parser.add_argument("--max-side", type=int, default=32, help="stored longest side in pixels (default 32)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=2, help="generator and writer processes")
    args = parser.parse_args(argv)
    variants = args.variant or [("current", None)]
    args.work = args.work.resolve()
    if args.work == REPO_ROOT or REPO_ROOT in args.work.parents:
        parser.error(f"--work {args.work}: choose a folder outside the repository")
    prepared = prepare(args)
    rows = [row(variant_name(*v), train(args, prepared, *v, extra)) for v in variants]
    print(f"\nmAP@ALL, {args.database} database images + {21 * args.query_per_tag} queries at {args.max_side} px, "
          f"seed {args.seed} ({' '.join(TRAIN_SETTINGS + extra)}):")
    print(table(["variant", "augment ran", *(title for _, title in STAGE_COLUMNS), "DIHN - retrain"], rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
