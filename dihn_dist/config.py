"""Command line and config file of `python -m dihn_dist.train`.

Flag names and defaults of the reference CLI are kept (--batch-size 64, --lr 1e-4, --code-length 12,
--max-iter 50, --max-epoch 3, --num-seen 7, --num-samples 2000, --gamma 200, --mu 50, --topk all).
--batch-size is the global batch: under torchrun each process takes its share, so the same command
follows the same trajectory on 1 or N processes. A --config file (JSON or YAML) supplies defaults; flags
given on the command line override it. Every value is checked by type and range before anything runs.
"""
from __future__ import annotations

import argparse
import json
import typing
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Dict, List, Optional

from .augment import AUGMENTATIONS, resolve as resolve_augment
from .dist import context as process_context, cpu_share
from .formats import STAGES
from .models import ARCHITECTURES, PRECISIONS, SWITCHES


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
    augment: str = "auto"  # resolved from --arch by parse_config (augment.resolve)
    stage: List[str] = field(default_factory=lambda: ["original", "incremental"])
    old_run: Optional[str] = None
    old_stage: Optional[str] = None
    old_codes: Optional[str] = None
    eval_every: int = 0
    precision_k: int = 1000
    collective_timeout: float = 1800.0
    precision: str = "auto"
    channels_last: str = "auto"
    compile: bool = False
    deterministic: bool = False
    resume: bool = False
    debug: bool = False

    def to_json(self) -> dict:
        return asdict(self)

    @property
    def loader_threads(self) -> int:
        """FFCV loader threads of this process: --num-workers, else its share of the node's CPUs."""
        return self.num_workers or cpu_share(process_context().local_world_size)


# Fields that must not change when a run is resumed: they decide what the run computes. (The data is
# checked by its manifest and fingerprints, not by its path, so a moved data folder can still resume.)
RESUME_INVARIANTS = ("batch_size", "lr", "weight_decay", "code_length", "max_iter", "max_epoch",
                     "num_samples", "gamma", "mu", "lr_decay_original", "lr_decay_incremental",
                     "soft_similarity", "seed", "arch", "pretrained", "resolution", "augment", "old_run",
                     "old_stage", "old_codes", "precision")

DEBUG_DEFAULTS = {"max_iter": 2, "max_epoch": 1, "num_samples": 200}


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


# ----------------------------------------------------------------------------------------------------
# Parsing values (shared by the command line and config files)

def parse_stages(value: Any) -> List[str]:
    """"original,incremental", "all" (= original,incremental) or a list of names -> the stage list."""
    names = value.split(",") if isinstance(value, str) else value
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise ValueError(f"expected a comma-separated list or a list of stage names, got {value!r}")
    stages: List[str] = []
    for name in (n.strip() for n in names):
        for stage in (["original", "incremental"] if name == "all" else [name]):
            if stage not in STAGES:
                raise ValueError(f"unknown stage {stage!r}: expected {', '.join(STAGES)} or all")
            if stage not in stages:
                stages.append(stage)
    if not stages:
        raise ValueError("expected at least one stage")
    return sorted(stages, key=STAGES.index)


def _stages_argument(text: str) -> List[str]:
    try:
        return parse_stages(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _topk(text: str) -> Optional[int]:
    value = int(text)
    return None if value <= 0 else value


_TYPE_NAMES = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}


def coerce(key: str, value: Any, hint) -> Any:
    """A config-file value checked against the field's type; the error names the key and the type."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Union:  # Optional[X]
        if value is None:
            return None
        hint = next(a for a in args if a is not type(None))
    if key == "stage":
        try:
            return parse_stages(value)
        except ValueError as error:
            raise ValueError(f"key 'stage': {error}") from None
    expected = _TYPE_NAMES[hint]
    if hint is bool:
        if isinstance(value, bool):
            return value
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            # YAML 1.1 reads 1e-3 (no dot) as a string; a string that is a plain number means that number.
            try:
                return float(value)
            except ValueError:
                pass
    elif isinstance(value, str):
        return value
    raise ValueError(f"key {key!r}: expected {expected}, got {type(value).__name__} {value!r}")


def load_config_file(path: str) -> Dict[str, Any]:
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"--config {path}: no such file")
    text = file.read_text()
    try:
        if file.suffix in (".yaml", ".yml"):
            import yaml
            values = yaml.safe_load(text) or {}
        else:
            values = json.loads(text)
    except Exception as error:
        raise ValueError(f"--config {path}: cannot parse ({' '.join(str(error).split())})") from error
    if not isinstance(values, dict):
        raise ValueError(f"--config {path}: expected a mapping of flag names to values")
    hints = typing.get_type_hints(Config)
    checked = {}
    for key, value in values.items():
        name = str(key).replace("-", "_")
        if name not in hints:
            raise ValueError(f"--config {path}: unknown key {key!r}")
        try:
            checked[name] = coerce(name, value, hints[name])
        except ValueError as error:
            raise ValueError(f"--config {path}: {error}") from None
    return checked


# ----------------------------------------------------------------------------------------------------
# The command line

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
    a("--batch-size", type=int, help="global batch: images per step over all processes (each process takes "
                                     "its share), so 1 or N processes follow the same trajectory")
    a("--lr", type=float, help="Adam learning rate")
    a("--weight-decay", type=float, help="Adam weight decay")
    a("--code-length", type=int, help="bits per code")
    a("--max-iter", type=int, help="outer iterations per stage (sample, train, update codes)")
    a("--max-epoch", type=int, help="epochs over each sampled subset")
    a("--num-seen", type=int, help="number of original classes; must equal the prepared data's")
    a("--num-samples", type=int, help="database items sampled per outer iteration")
    a("--num-workers", type=int, help="FFCV loader threads per process (default: this process's share of the "
                                      "CPUs it may use: CPUs / processes on the node)")
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
    a("--pretrained", help="local torchvision state dict for alexnet/resnet50, or none (nothing is downloaded; "
                           "without it the backbone is untrained)")
    a("--resolution", type=int, help="training/eval image side (default: 224 for alexnet/resnet50; for small-cnn "
                                     "the prepared images' most common side)")
    a("--augment", choices=AUGMENTATIONS, help="training augmentation (seeded, applied on the device); auto = "
                                                "flip for small-cnn (tiny images), crop-flip otherwise")
    a("--stage", type=_stages_argument, help="original, incremental, retrain, all (= original,incremental) or a "
                                             "comma-separated list; retrain = ADSH from scratch on everything")
    a("--old-run", help="a finished run whose codes are B_old for stage 2 (a previous round: its database must be "
                        "the beginning of --data's, e.g. --data prepared with --extends its data)")
    a("--old-stage", choices=("original", "incremental", "retrain"),
      help="which stage of --old-run gives B_old (default: incremental if it finished, else original)")
    a("--old-codes", help="B_old from elsewhere: a .npy of int8 +-1 codes, or of packed bits (numpy.packbits rows, "
                          "with --code-length), one row per inherited database row of --data, in its order")
    a("--eval-every", type=int, help="evaluate every N outer iterations (0: only at the end of a stage)")
    a("--precision-k", type=int, help="k of precision@k in the evaluation")
    a("--collective-timeout", type=float, help="seconds a rank waits in a collective (e.g. for rank 0's code "
                                               "update or checkpoint) before the job fails")
    a("--precision", choices=PRECISIONS, help="autocast precision of the network: auto = bf16 on a GPU that "
                                              "supports it, fp32 elsewhere; fp16 uses a gradient scaler. Losses, "
                                              "codes and mAP stay float32/float64")
    a("--channels-last", choices=SWITCHES, help="NHWC memory format for the CNN (auto: on for CUDA)")
    a("--compile", action="store_const", const=True, help="torch.compile the network (minutes of compilation, "
                                                          "then faster steps on a GPU)")
    a("--deterministic", action="store_const", const=True,
      help="deterministic GPU kernels and no TF32: a GPU run repeats exactly from its seed (slower). CPU runs "
           "are deterministic anyway")
    a("--resume", action="store_const", const=True,
      help="continue the run in --out from its last complete outer iteration (start it if there is none); "
           "on a finished run, adds the stages it lacks")
    a("--debug", action="store_const", const=True,
      help="anomaly detection, verbose logs, tracebacks, and small defaults (2 iterations, 1 epoch, 200 samples)")
    p.set_defaults(**{f.name: None for f in fields(Config)})
    return p


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
    if config.topk is not None and config.topk <= 0:
        config.topk = None
    config.augment = resolve_augment(config.augment, config.arch)
    validate(config)
    return config


def validate(config: Config) -> None:
    for name in ("batch_size", "code_length", "max_iter", "max_epoch", "num_samples", "precision_k"):
        if getattr(config, name) <= 0:
            raise ValueError(f"{flag(name)}: expected a positive number, got {getattr(config, name)}")
    for name in ("lr", "gamma", "lr_decay_original", "lr_decay_incremental", "collective_timeout"):
        if not getattr(config, name) > 0:
            raise ValueError(f"{flag(name)}: expected a positive value, got {getattr(config, name)}")
    for name in ("mu", "weight_decay", "eval_every"):
        if getattr(config, name) < 0:
            raise ValueError(f"{flag(name)}: expected 0 or more, got {getattr(config, name)}")
    for name in ("num_workers", "resolution", "num_seen"):
        if getattr(config, name) is not None and getattr(config, name) < 1:
            raise ValueError(f"{flag(name)}: expected a positive number, got {getattr(config, name)}")
    if config.arch not in ARCHITECTURES:
        raise ValueError(f"--arch: expected one of {', '.join(ARCHITECTURES)}, got {config.arch!r}")
    for name, choices in (("precision", PRECISIONS), ("channels_last", SWITCHES)):
        if getattr(config, name) not in choices:
            raise ValueError(f"{flag(name)}: expected one of {', '.join(choices)}, got {getattr(config, name)!r}")
    if config.augment not in AUGMENTATIONS:
        raise ValueError(f"--augment: expected one of {', '.join(AUGMENTATIONS)}, got {config.augment!r}")
    for name in ("old_run", "old_codes"):
        if getattr(config, name) and "original" in config.stage:
            raise ValueError(f"{flag(name)} supplies B_old: use it with --stage incremental (or retrain), not original")
    if config.old_run and config.old_codes:
        raise ValueError("--old-run and --old-codes both supply B_old: pass one of them")
    if config.old_stage and not config.old_run:
        raise ValueError("--old-stage chooses the stage of --old-run: pass --old-run too")
