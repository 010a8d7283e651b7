"""Loading prepared data (see `dihn_dist.prepare`): the manifest and labels, every file checked against the
manifest's sizes and fingerprints (`load_prepared`, `verify_prepared`), per-rank batch schedules, and FFCV
loaders for training (random subsets of database positions, swapped in place every outer iteration) and for
encoding the query and database parts.

Distributed training does not use FFCV's `distributed=True`: the trainer draws one subset order per epoch
(the same on every rank), `batch_schedule` gives each rank its share of every global batch, and each rank's
`TrainLoader` loads exactly that share in that order.

FFCV traps handled here: batches reuse buffers (every tensor handed out is freshly allocated by the
normalisation / dtype conversion, so callers may keep it); `num_workers` is always explicit (FFCV's -1 means
every CPU of the host); FFCV itself stays on the CPU (see `pipelines`), and uint8 images travel to the device
with a blocking copy and are normalised there.
"""
from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from ..common.formats import (
    IMAGE_DIGEST_FILES,
    MANIFEST,
    PREPARED_FORMAT,
    PREPARED_FORMAT_VERSION,
    folder_kind,
    is_incremental,
    listed_file_problem,
    prepare_command,
)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
JPEG_EVAL_CROP = 224 / 256   # resize-256-then-centre-crop-224 as a crop of the shorter side
PREPARE_HINT = "python -m dihn_dist.prepare --dataset NAME [--root SRC] --out {path}"


# ----------------------------------------------------------------------------------------------------------
# The prepared folder


@dataclass
class PreparedData:
    root: Path
    manifest: dict
    database_labels: np.ndarray   # (n, L) uint8
    query_labels: np.ndarray      # (q, L) uint8
    num_original: int             # database rows [0, num_original) are original-class items (extended data:
    num_seen: int                 # the previous round's database; see `is_extended`)

    @property
    def num_database(self) -> int:
        return int(self.database_labels.shape[0])

    @property
    def num_query(self) -> int:
        return int(self.query_labels.shape[0])

    @property
    def num_classes(self) -> int:
        return int(self.database_labels.shape[1])

    @property
    def dataset(self) -> str:
        return str(self.manifest["dataset"])

    @property
    def is_extended(self) -> bool:
        """Made with prepare --extends: rows [0, num_original) are the previous round's database (inherited,
        their stored images bit-identical), the rows after are this round's new items, which may include new
        images of old classes (classes < num_seen)."""
        return isinstance(self.manifest.get("extends"), dict)

    @property
    def image_size(self) -> int:
        """The most common longest side of the stored images, in pixels: the trainer's default resolution.
        Raw images: their square side (28 Fashion-MNIST, 32 CIFAR-10). JPEG-stored images: usually --max-side,
        but smaller when most images were (28 px PNGs in an image-list stay 28, not --max-side 256)."""
        return int(self.manifest["image"]["most_common_side"])

    @property
    def max_side(self) -> int:
        """The side images were brought to: the square side of raw images, --max-side for JPEG-stored ones
        (no stored image is larger; see `largest_side` for the largest one actually stored)."""
        image = self.manifest["image"]
        return int(image["height"] if image["storage"] == "raw" else image["max_side"])

    @property
    def largest_side(self) -> int:
        """The longest side of the largest stored image."""
        return int(self.manifest["image"]["largest_side"])

    @property
    def image_storage(self) -> str:
        return str(self.manifest["image"]["storage"])

    def beton(self, part: str) -> Path:
        if part not in ("query", "database"):
            raise ValueError(f"part: expected 'query' or 'database', got {part!r}")
        return self.root / f"{part}.beton"


def hide_discarded_loader_noise() -> None:
    """Discarded FFCV Loaders make numba's dispatcher finalizers raise a harmless KeyError when they are
    garbage-collected (FFCV 1.0.2 with numba). Keep those out of the user's terminal; report everything else."""
    previous = sys.unraisablehook
    if getattr(previous, "hides_loader_noise", False):
        return

    def hook(unraisable):
        frame = unraisable.exc_traceback
        while frame is not None and frame.tb_next is not None:
            frame = frame.tb_next
        from_numba_finalizer = frame is not None and frame.tb_frame.f_code.co_filename.endswith(
            "numba/core/dispatcher.py")
        if not (isinstance(unraisable.exc_value, KeyError) and from_numba_finalizer):
            previous(unraisable)

    hook.hides_loader_noise = True
    sys.unraisablehook = hook


def load_prepared(data_dir, dataset: Optional[str] = None, num_seen: Optional[int] = None,
                  fingerprints: bool = True) -> PreparedData:
    """Read and check a folder written by `python -m dihn_dist.prepare`.

    Every file the manifest lists is checked for its size, and with `fingerprints` (default) for its
    fingerprint too (about 3 MiB read per file: milliseconds even for a 4 GB beton), so a truncated,
    swapped or rewritten file is named here rather than failing inside FFCV. `dataset` and `num_seen`,
    when given (--dataset, --num-seen), must be those it was prepared with."""
    root = Path(data_dir)
    hint = PREPARE_HINT.format(path=root)
    if not root.is_dir():
        raise FileNotFoundError(f"prepared data folder {root} does not exist; make it with: {hint}")
    if folder_kind(root) == "run":
        raise ValueError(f"{root} is a training run folder, not prepared data; pass the prepared data folder "
                         f"(the run's config.json names it as data)")
    manifest_path = root / MANIFEST
    if not manifest_path.is_file():
        raise FileNotFoundError(f"{manifest_path} does not exist ({root} is not a complete preparation); "
                                f"make it with: {hint}")
    manifest = read_manifest(manifest_path, hint)
    check_listed_files(root, manifest, fingerprints)
    database_labels = read_labels(root / "database_labels.npy", manifest["num_database"], manifest["num_classes"],
                                  mapped=True)
    query_labels = read_labels(root / "query_labels.npy", manifest["num_query"], manifest["num_classes"])
    data = PreparedData(root, manifest, database_labels, query_labels,
                        int(manifest["num_original"]), int(manifest["num_seen"]))
    check_database_order(data, manifest_path)
    if dataset and dataset != data.dataset:
        raise ValueError(f"--dataset {dataset}: but --data {root} holds {data.dataset}")
    if num_seen is not None and num_seen != data.num_seen:
        raise ValueError(f"--num-seen {num_seen}: but --data {root} was prepared with num_seen {data.num_seen}; "
                         f"re-run python -m dihn_dist.prepare with --num-seen {num_seen}")
    return data


def verify_prepared(data: PreparedData) -> None:
    """Check every file of the preparation against its manifest entry: size and fingerprint.

    Raises FileNotFoundError for a missing file and ValueError for one whose size or fingerprint differs,
    each on one line naming the file, what differs and the command that rebuilds the preparation."""
    check_listed_files(data.root, data.manifest, fingerprints=True)


def check_listed_files(root: Path, manifest: dict, fingerprints: bool) -> None:
    rebuild = f"re-run {prepare_command(manifest.get('request') or {}, root)} --force"
    for name, entry in manifest["files"].items():
        path = root / name
        if not path.is_file():
            raise FileNotFoundError(f"{path} (listed in {root / MANIFEST}) is missing; {rebuild}")
        problem = listed_file_problem(path, entry, fingerprints)
        if problem is not None:
            raise ValueError(f"{path}: {problem}; {rebuild}")


def read_manifest(path: Path, hint: str) -> dict:
    try:
        manifest = json.loads(path.read_text())
    except ValueError as error:
        raise ValueError(f"{path}: not valid JSON ({error}); rebuild with: {hint} --force") from error
    if not isinstance(manifest, dict) or manifest.get("format") != PREPARED_FORMAT:
        raise ValueError(f"{path}: not a dihn_dist preparation (expected \"format\": \"{PREPARED_FORMAT}\"); make one with: "
                         f"{hint}")
    if manifest.get("format_version") != PREPARED_FORMAT_VERSION:
        raise ValueError(f"{path}: format_version {manifest.get('format_version')}, this dihn_dist reads "
                         f"{PREPARED_FORMAT_VERSION}; rebuild with: {hint} --force")
    missing = [key for key in ("dataset", "num_database", "num_query", "num_classes", "num_original", "num_seen",
                               "image", "files") if key not in manifest]
    if missing:
        raise ValueError(f"{path}: missing keys {missing}; rebuild with: {hint} --force")
    if not isinstance(manifest["files"], dict):
        raise ValueError(f"{path}: \"files\" is not an object; rebuild with: {hint} --force")
    return manifest


def read_labels(path: Path, rows: int, columns: int, mapped: bool = False) -> np.ndarray:
    """mapped: memory-mapped, read-only (the database's: every rank reads the rows it needs, and the page cache
    holds one copy for all of a node's ranks however large the database)."""
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing")
    labels = np.load(path, mmap_mode="r" if mapped else None, allow_pickle=False)
    if labels.dtype != np.uint8 or labels.shape != (rows, columns):
        raise ValueError(f"{path}: expected uint8 labels of shape ({rows}, {columns}) as in the manifest, "
                         f"got {labels.dtype} {labels.shape}")
    return labels


def check_database_order(data: PreparedData, manifest_path: Path) -> None:
    """Rows [0, num_original) carry only classes < num_seen. In a first preparation every row after carries
    a class >= num_seen; in an extended one (prepare --extends) they are this round's items, whatever their
    classes (new images of old classes arrive too)."""
    incremental = is_incremental(data.database_labels, data.num_seen)
    if not data.is_extended and not incremental[data.num_original:].all():
        raise ValueError(f"{manifest_path}: database rows are not original items (labels < {data.num_seen}) "
                         f"followed by incremental ones at num_original={data.num_original}")
    if incremental[:data.num_original].any():
        row = int(np.flatnonzero(incremental[:data.num_original])[0])
        raise ValueError(f"{manifest_path}: database row {row} carries a class >= num_seen {data.num_seen}, but rows "
                         f"[0, num_original={data.num_original}) are the original items (classes < {data.num_seen})")


# ----------------------------------------------------------------------------------------------------------
# One database as a prefix of another (chained rounds: a run's data, then the next round's data)


# What a folder must hold for its database to be compared with another's: a preparation holds these, and a
# run folder keeps copies of them (the trainer copies the data's manifest.json, database_labels.npy and
# database_image_digests.npy into the run folder).
PREFIX_FILES = (MANIFEST, "database_labels.npy", IMAGE_DIGEST_FILES["database"])


@dataclass
class DatabaseRecord:
    """What identifies a database row by row: the stored image of each item (its image digest, see
    `betonwriter.IMAGE_DIGEST_SCHEME`) and its label row."""
    where: str                  # the folder, for messages
    dataset: str
    labels: np.ndarray          # (n, L) uint8
    image_digests: np.ndarray   # (n, 16) uint8


def database_record(source) -> DatabaseRecord:
    """The database of a PreparedData, or of a folder holding PREFIX_FILES (a preparation or a run folder)."""
    if isinstance(source, PreparedData):
        root, manifest, labels = source.root, source.manifest, source.database_labels
    else:
        root = Path(source)
        for name in PREFIX_FILES:
            if not (root / name).is_file():
                raise FileNotFoundError(f"{root / name} is missing; comparing databases needs "
                                        f"{', '.join(PREFIX_FILES)} (a preparation has them; a run folder keeps "
                                        f"copies of its data's)")
        manifest = json.loads((root / MANIFEST).read_text())
        labels = np.load(root / "database_labels.npy", allow_pickle=False)
    path = root / IMAGE_DIGEST_FILES["database"]
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: {root} was prepared before per-item image digests were "
                                f"recorded; rebuild the preparation with --force")
    digests = np.load(path, allow_pickle=False)
    if labels.ndim != 2 or digests.shape != (len(labels), 16):
        raise ValueError(f"{path}: expected ({len(labels)}, 16) image digests (one per database label row of "
                         f"{root}), got {digests.shape}")
    return DatabaseRecord(str(root), str(manifest.get("dataset")), labels, digests)


def database_prefix_problem(old: DatabaseRecord, new: DatabaseRecord) -> Optional[str]:
    """Why `new`'s database does not begin with exactly `old`'s (None when it does): same dataset, at least
    as many rows and label columns, and every old row r has new row r's stored image (equal image digests)
    and its labels: new row r's first L_old columns equal old row r, its other columns are 0."""
    (n_old, width_old), (n_new, width_new) = old.labels.shape, new.labels.shape
    names = f"the old database ({old.where})", f"the new one ({new.where})"
    if old.dataset != new.dataset:
        return f"{names[0]} holds {old.dataset}, {names[1]} holds {new.dataset}"
    if n_new < n_old:
        return f"{names[0]} has {n_old} items, {names[1]} only {n_new}: it cannot begin with the old one"
    if width_new < width_old:
        return f"{names[0]} has {width_old} label columns, {names[1]} only {width_new} (labels only widen)"
    images_differ = (new.image_digests[:n_old] != old.image_digests).any(axis=1)
    labels_differ = ((new.labels[:n_old, :width_old] != old.labels).any(axis=1)
                     | new.labels[:n_old, width_old:].any(axis=1))
    differing = np.flatnonzero(images_differ | labels_differ)
    if not len(differing):
        return None
    row = int(differing[0])
    what = ("its stored image differs" if images_differ[row] else
            f"its labels differ: {old.labels[row].tolist()} in the old, {new.labels[row].tolist()} in the new")
    return (f"database row {row}: {what} ({len(differing)} of the first {n_old} rows differ): {names[1]} does not "
            f"begin with {names[0]}")


def check_database_prefix(old, new) -> None:
    """Raise ValueError (one line) unless `new`'s database begins with exactly `old`'s, row for row.

    `old` and `new`: a PreparedData, or a folder holding PREFIX_FILES (a preparation, or a run folder that
    kept copies of its data's). The trainer's --old-run: check_database_prefix(OLD_RUN_DIR, data)."""
    old_record, new_record = database_record(old), database_record(new)
    problem = database_prefix_problem(old_record, new_record)
    if problem is not None:
        raise ValueError(problem)
