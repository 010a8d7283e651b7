"""Command line and config file of `python -m dihn_dist.train`.

Flag names and defaults of the reference CLI are kept (--batch-size 64, --lr 1e-4, --code-length 12,
--max-iter 50, --max-epoch 3, --num-seen 7, --num-samples 2000, --gamma 200, --mu 50, --topk all).
A --config file (JSON or YAML) supplies defaults; flags given on the command line override it.
"""
from __future__ import annotations

import argparse
import json
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import List, Optional

from .augment import AUGMENTATIONS
from .models import ARCHITECTURES

from .formats import STAGES


@dataclass
class Config:
    data: Optional[str] = None  # default: data/<dataset>, data/fashion-mnist without --dataset
    dataset: Optional[str] = None
    root: Optional[str] = None
    out: str = "runs/dihn"
    batch_size: int = 64
    lr: float = 1e-4
    weight_decay: float = 1e-5
    code_length: int = 12
    max_iter: int = 50
    max_epoch: int = 3
    num_seen: Optional[int] = None
    num_samples: int = 2000
    num_workers: Optional[int] = None
    topk: Optional[int] = None
    gamma: float = 200.0
    mu: float = 50.0
    lr_decay_original: float = 0.9
    lr_decay_incremental: float = 0.91
    soft_similarity: bool = True
    seed: int = 0
    device: str = "auto"
    arch: str = "alexnet"
    pretrained: str = "none"
    resolution: Optional[int] = None
    augment: str = "crop-flip"
    stage: List[str] = field(default_factory=lambda: ["original", "incremental"])
    old_run: Optional[str] = None
    eval_every: int = 0
    precision_k: int = 1000
    resume: bool = False
    debug: bool = False

    def to_json(self) -> dict:
        return asdict(self)


# Fields that must not change when a run is resumed: they decide what the run computes.
RESUME_INVARIANTS = ("data", "batch_size", "lr", "weight_decay", "code_length", "max_iter", "max_epoch",
                     "num_samples", "gamma", "mu", "lr_decay_original", "lr_decay_incremental",
                     "soft_similarity", "seed", "arch", "pretrained", "resolution", "augment", "old_run")


def parse_stages(text: str) -> List[str]:
    stages = []
    for name in text.split(","):
        name = name.strip()
        expanded = ["original", "incremental"] if name == "all" else [name]
        for stage in expanded:
            if stage not in STAGES:
                raise argparse.ArgumentTypeError(
                    f"expected a comma-separated list of {', '.join(STAGES)} or all, got {text!r}")
            if stage not in stages:
                stages.append(stage)
    return stages


def _topk(text: str) -> Optional[int]:
    value = int(text)
    return None if value <= 0 else value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m dihn_dist.train",
        description="Deep Incremental Hashing: stage 1 learns codes of the original classes (ADSH); stage 2 "
                    "adds the incremental classes with the original codes frozen (DIHN). Run it plainly for "
                    "one process (CPU or one GPU), or under torchrun for DDP.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    a = p.add_argument
    a("--config", help="JSON or YAML file of defaults (keys are flag names with - or _); flags override it")
    a("--data", help="prepared dataset folder (python -m dihn_dist.prepare writes it); "
                     "default: data/<--dataset>, or data/fashion-mnist")
    a("--dataset", help="dataset name; checked against the prepared manifest")
    a("--root", help="source dataset folder (reference CLI); used to say how to prepare --data")
    a("--out", help="run folder: config, metrics, codes, model weights, logs, TensorBoard, checkpoints")
    a("--batch-size", type=int, help="images per process and step (global batch = this x processes)")
    a("--lr", type=float, help="Adam learning rate")
    a("--weight-decay", type=float, help="Adam weight decay")
    a("--code-length", type=int, help="bits per code")
    a("--max-iter", type=int, help="outer iterations per stage (sample, train, update codes)")
    a("--max-epoch", type=int, help="epochs over each sampled subset")
    a("--num-seen", type=int, help="number of original classes; must equal the prepared data's")
    a("--num-samples", type=int, help="database items sampled per outer iteration")
    a("--num-workers", type=int, help="FFCV loader threads per process (default: CPUs of this process)")
    a("--topk", type=_topk, help="mAP over the top k of the ranking; <= 0 means the whole database")
    a("--gamma", type=float, help="weight of the quantization term")
    a("--mu", type=float, help="weight of the bit-balance term (stage 2)")
    a("--lr-decay-original", type=float, help="exponential lr decay per outer iteration, stage 1 and retrain")
    a("--lr-decay-incremental", type=float, help="exponential lr decay per outer iteration, stage 2")
    a("--hard-similarity", dest="soft_similarity", action="store_const", const=False,
      help="use the hard +-1 similarity instead of the soft form S*(1+r)-r")
    a("--seed", type=int, help="seed of subsets, augmentation, initial codes and weights")
    a("--device", help="auto, cpu or cuda[:index] (under torchrun: cuda = cuda:LOCAL_RANK)")
    a("--arch", choices=ARCHITECTURES, help="network: alexnet (reference), resnet50, small-cnn (CPU, small images)")
    a("--pretrained", help="local torchvision state dict for alexnet/resnet50, or none (nothing is downloaded)")
    a("--resolution", type=int, help="training/eval image side (default: 224, or 32 for small-cnn)")
    a("--augment", choices=AUGMENTATIONS, help="training augmentation (seeded, applied on the device)")
    a("--stage", type=parse_stages, help="original, incremental, retrain, all (= original,incremental) "
                                         "or a comma-separated list; retrain = ADSH from scratch on everything")
    a("--old-run", help="run folder whose stage-1 codes and model start stage 2 (instead of training stage 1)")
    a("--eval-every", type=int, help="evaluate every N outer iterations (0: only at the end of a stage)")
    a("--precision-k", type=int, help="k of precision@k in the evaluation")
    a("--resume", action="store_const", const=True,
      help="continue the run in --out from its last complete outer iteration (start it if there is none)")
    a("--debug", action="store_const", const=True,
      help="anomaly detection, verbose logs, and small defaults (2 iterations, 1 epoch, 200 samples)")
    p.set_defaults(**{f.name: None for f in fields(Config)})
    return p


DEBUG_DEFAULTS = {"max_iter": 2, "max_epoch": 1, "num_samples": 200}


def load_config_file(path: str) -> dict:
    file = Path(path)
    if not file.is_file():
        raise ValueError(f"--config {path}: no such file")
    text = file.read_text()
    try:
        if file.suffix in (".yaml", ".yml"):
            import yaml
            values = yaml.safe_load(text) or {}
        else:
            values = json.loads(text)
    except Exception as error:
        raise ValueError(f"--config {path}: cannot parse ({error})") from error
    if not isinstance(values, dict):
        raise ValueError(f"--config {path}: expected a mapping of flag names to values")
    known = {f.name for f in fields(Config)}
    normalised = {}
    for key, value in values.items():
        name = key.replace("-", "_")
        if name not in known:
            raise ValueError(f"--config {path}: unknown key {key!r}")
        normalised[name] = parse_stages(value) if name == "stage" and isinstance(value, str) else value
    return normalised


def parse_config(argv=None) -> Config:
    args = build_parser().parse_args(argv)
    given = {k: v for k, v in vars(args).items() if v is not None and k != "config"}
    values = load_config_file(args.config) if args.config else {}
    if given.get("debug") or values.get("debug"):
        values = {**DEBUG_DEFAULTS, **values}
    values.update(given)
    config = Config(**values)
    if config.data is None:
        config.data = f"data/{config.dataset or 'fashion-mnist'}"
    validate(config)
    return config


def validate(config: Config) -> None:
    positive = ("batch_size", "code_length", "max_iter", "max_epoch", "num_samples", "precision_k")
    for name in positive:
        if getattr(config, name) <= 0:
            raise ValueError(f"--{name.replace('_', '-')}: expected a positive number, got {getattr(config, name)}")
    for name in ("lr", "gamma", "lr_decay_original", "lr_decay_incremental"):
        if getattr(config, name) <= 0:
            raise ValueError(f"--{name.replace('_', '-')}: expected a positive value, got {getattr(config, name)}")
    if config.mu < 0 or config.weight_decay < 0 or config.eval_every < 0:
        raise ValueError("--mu, --weight-decay and --eval-every must not be negative")
    if config.num_workers is not None and config.num_workers < 0:
        raise ValueError(f"--num-workers: expected 0 or more threads, got {config.num_workers}")
    if config.old_run and "original" in config.stage:
        raise ValueError("--old-run supplies stage 1: use it with --stage incremental (or retrain), not original")


def default_num_workers() -> int:
    # The CPUs this process may use (Slurm and taskset limits), not every CPU of the host.
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)
