"""Turn a dataset on disk into FFCV files plus a manifest that fixes the DIHN retrieval protocol.

    python -m dihn_dist.prepare --dataset fashion-mnist --out data/fmnist
    python -m dihn_dist.prepare --dataset cifar-10 --root SRC --out data/cifar10
    python -m dihn_dist.prepare --dataset nus-wide-tc21 --root SRC --out data/nus --max-side 256
    python -m dihn_dist.prepare --dataset image-list --database-list db.txt --query-list q.txt --num-seen 5 --out D

Writes into --out: format.json (the marker {"format": "dihn_dist.prepared", "format_version": 2}),
query.beton, database.beton (fields image, labels, index), query_labels.npy and database_labels.npy (uint8
multi-hot), query_source_index.npy and database_source_index.npy (the source row of each position),
query_item_digests.npy and database_item_digests.npy (uint8 (N, 16): per stored item, the BLAKE2b digest of
its stored image metadata, image bytes and label row, exactly as `dihn_dist.betonwriter.read_back` computes
them: equal rows mean identical stored items), query_image_digests.npy and database_image_digests.npy (the
same without the label row: equal rows mean bit-identical stored images), for image-list
query_item_paths.txt and database_item_paths.txt (each item's image file, absolute, one per line) and
manifest.json (written last). The database holds every original item first (all labels < num_seen), in
source order, then every incremental item (any label >= num_seen), in source order.

Rounds: new classes arrive later, often several times, and their items are added without touching the old
ones. fashion-mnist and cifar-10 take `--classes K` (keep classes 0..K-1 only; num_seen defaults to K, so a
first round is all original items); `--extends OLD_DATA` writes a new preparation whose database begins with
exactly OLD_DATA's items, each stored image copied byte for byte (never decoded or re-encoded) and checked
by its image digest after writing, followed by this round's new items (see `dihn_dist.extend`). Its rows
[0, num_original) are OLD_DATA's database (num_inherited, "extends" in the manifest); its num_seen is the
number of classes OLD_DATA had; "rounds" lists the rows each round added.

The manifest lists every other file of the folder with its size and a fingerprint (sha256 of the size and
about 3 MiB sampled from the file, see `formats.FINGERPRINT_SCHEME`), which `data.load_prepared` checks, and
the stored image sizes ("image": largest_side, most_common_side, smallest_side).

Images: raw datasets are stored at a square side (--resolution); JPEG datasets with their longest side at
most --max-side, resized here (never by FFCV, whose resizer makes a 0 px side of very elongated images). An
image that cannot be read, or whose stored sides would be under MIN_STORED_SIDE px, is a bad image: prepare
stops and names it (file, list line, why), or skips it with --skip-bad and lists it in the manifest.

Safe with folders: prepare writes only into a new or empty folder or over its own preparation (format.json
marks it), never into a run folder or any other non-empty folder, even with --force. Re-running on a
complete preparation with the same options does nothing (quickly); replacing a preparation (other options,
another version, damaged) needs --force, and the message names what would be deleted. Atomic: everything is
written into a hidden temporary folder beside --out and renamed at the end, so an interrupted run never
leaves a folder that looks complete. A writer worker that dies ends the run with an error naming the item
it was on (`dihn_dist.betonwriter`), never a hang.

Errors end with one line and exit code 2 (bad input) or 1 (a failure while writing); --debug adds the
traceback.
"""
from __future__ import annotations

import argparse
import ctypes
import hashlib
import json
import multiprocessing
import os
import shutil
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Set

import numpy as np
from loguru import logger

from . import __version__
from .betonwriter import (IMAGE_DIGEST_SCHEME, ITEM_DIGEST_SCHEME, StoredItems, WorkerTable, WriterWorkerDied,
                          read_back, watched_write)
from .datasets import DATASETS, BadImageError, SourceDataset, SourcePart, first_rows_per_class, open_dataset
from .errors import debug_requested, run_command
from .formats import (FINGERPRINT_SCHEME, FOLDER_MARKER, IMAGE_DIGEST_FILES, ITEM_PATH_FILES, MANIFEST,
                      PREPARED_FORMAT, PREPARED_FORMAT_VERSION, PREPARED_MARKER, PREPARED_V1_FILES, RUN_FORMAT,
                      file_fingerprint, folder_kind, is_incremental, listed_file_problem, prepare_command,
                      read_json_object)

DEFAULT_MAX_SIDE = 256
JPEG_QUALITY = 90
# The smallest stored image side: below it an image carries no usable content (and resizing to a 0 px side
# makes OpenCV abort). Tiny images, and images too elongated to keep this short side once their longest
# side is brought to --max-side, are bad images.
MIN_STORED_SIDE = 4
ITEM_DIGEST_FILES = {"query": "query_item_digests.npy", "database": "database_item_digests.npy"}
PARTS = ("query", "database")
# Every file a preparation of this version holds; a prepared folder holding anything else is not replaced.
PREPARED_FILES = PREPARED_V1_FILES | {FOLDER_MARKER, *ITEM_DIGEST_FILES.values(), *IMAGE_DIGEST_FILES.values(),
                                      *ITEM_PATH_FILES.values()}
# --classes K (the class-rounds protocol: classes 0..K-1 so far) applies to these single-label datasets.
CLASS_ROUND_DATASETS = ("fashion-mnist", "cifar-10")


# ----------------------------------------------------------------------------------------------------------
# Command line


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m dihn_dist.prepare", description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", required=True, choices=DATASETS)
    parser.add_argument("--root", type=Path, help="source folder (fashion-mnist: optional, default "
                        "/usr/share/datasets/fashion-mnist; image-list: folder the listed paths are relative to, "
                        "default each list's own folder)")
    parser.add_argument("--out", type=Path, required=True, help="output folder: new, empty, or a preparation "
                        "(never a run folder or another non-empty folder)")
    parser.add_argument("--extends", type=Path, metavar="OLD_DATA",
                        help="a new round: --out begins with OLD_DATA's database, bit-identical, then this round's "
                             "items (image-list: the items of --database-list; fashion-mnist, cifar-10: the classes "
                             "that --classes adds); options not given are OLD_DATA's")
    parser.add_argument("--classes", type=int, metavar="K", help="fashion-mnist, cifar-10: keep classes 0..K-1 "
                        "only (the class-rounds protocol); with --extends, K must exceed the classes OLD_DATA has")
    parser.add_argument("--num-seen", type=int, help="number of original classes (0..K-1); default: 7 for "
                        "fashion-mnist and cifar-10 (--classes K: K, every item original), 18 for nus-wide-tc21; "
                        "required for image-list; with --extends: OLD_DATA's classes")
    parser.add_argument("--resolution", type=int, help="raw datasets (fashion-mnist, cifar-10): stored side in "
                        f"pixels, at least {MIN_STORED_SIDE} (default: native, 28 / 32)")
    parser.add_argument("--max-side", type=int, help=f"JPEG datasets (nus-wide-tc21, image-list): longest stored "
                        f"side in pixels, at least {MIN_STORED_SIDE} (default {DEFAULT_MAX_SIDE})")
    parser.add_argument("--num-workers", type=int, default=None,
                        help="writer processes (default: the CPUs this process may use)")
    parser.add_argument("--skip-bad", action="store_true",
                        help=f"skip bad images (unreadable, or a stored side under {MIN_STORED_SIDE} px; listed in "
                             f"the manifest) instead of failing")
    parser.add_argument("--force", action="store_true",
                        help="rebuild even if --out is complete; replace a preparation made with other options")
    parser.add_argument("--database-per-class", type=int,
                        help="keep only the first K database items of each class (by first label); default all")
    parser.add_argument("--query-per-class", type=int,
                        help="keep only the first K query items of each class (by first label); default all")
    parser.add_argument("--database-list", type=Path, help="image-list: database list file")
    parser.add_argument("--query-list", type=Path, help="image-list: query list file")
    parser.add_argument("--debug", action="store_true", help="print the traceback of an error too")
    return parser.parse_args(argv)


def available_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:   # not Linux
        return os.cpu_count() or 1


def check_positive(value: Optional[int], flag: str) -> None:
    if value is not None and value < 1:
        raise ValueError(f"{flag}: expected a positive integer, got {value}")


def check_side(value: Optional[int], flag: str) -> None:
    if value is not None and value < MIN_STORED_SIDE:
        raise ValueError(f"{flag}: expected at least {MIN_STORED_SIDE} pixels, got {value}")


def output_request(args: argparse.Namespace) -> Dict[str, object]:
    """The options that decide the output; a complete output made with other options is not reused."""
    def path_or_none(path: Optional[Path]) -> Optional[str]:
        return str(path.resolve()) if path is not None else None
    return {
        "dataset": args.dataset, "extends": path_or_none(args.extends), "classes": args.classes,
        "root": path_or_none(args.root), "num_seen": args.num_seen,
        "resolution": args.resolution, "max_side": args.max_side, "skip_bad": bool(args.skip_bad),
        "database_per_class": args.database_per_class, "query_per_class": args.query_per_class,
        "database_list": path_or_none(args.database_list), "query_list": path_or_none(args.query_list),
    }


# ----------------------------------------------------------------------------------------------------------
# The split: which source rows go where, in which order


@dataclass
class Split:
    query_rows: np.ndarray      # source rows of the query part, in source order
    database_rows: np.ndarray   # source rows of the database: original items, then incremental items
    num_original: int


def classes_between(labels: np.ndarray, first: int, end: int) -> np.ndarray:
    """Rows whose classes all lie below `end`, one of them at least `first`: the items that a class round
    bringing classes first..end-1 adds (first = 0: every item of classes 0..end-1)."""
    return ~is_incremental(labels, end) & is_incremental(labels, first)


def select_rows(part: SourcePart, per_class: Optional[int], excluded: Set[int],
                classes: Optional[tuple] = None) -> np.ndarray:
    """The part's rows, less `excluded`, within the class window (first, end) if given, then the first
    `per_class` of each class; in source order."""
    rows = np.asarray([r for r in part.rows if int(r) not in excluded], dtype=np.int64) if excluded \
        else np.asarray(part.rows, dtype=np.int64)
    if classes is not None:
        rows = rows[classes_between(part.labels[rows], *classes)]
    if per_class is not None and len(rows):
        rows = rows[first_rows_per_class(part.labels[rows], per_class)]
    return rows


def make_split(dataset: SourceDataset, num_seen: int, database_per_class: Optional[int],
               query_per_class: Optional[int], excluded_query: Set[int], excluded_database: Set[int],
               classes: Optional[int] = None) -> Split:
    """The split of a first preparation; `classes` K keeps the items of classes 0..K-1 only."""
    window = (0, classes) if classes is not None else None
    query_rows = select_rows(dataset.query, query_per_class, excluded_query, window)
    database_rows = select_rows(dataset.database, database_per_class, excluded_database, window)
    incremental = is_incremental(dataset.database.labels[database_rows], num_seen)
    ordered = np.concatenate([database_rows[~incremental], database_rows[incremental]])
    split = Split(query_rows, ordered, int((~incremental).sum()))
    check_split_not_empty(dataset, split, num_seen, first_round=classes is not None and num_seen == classes)
    return split


def check_split_not_empty(dataset: SourceDataset, split: Split, num_seen: int, first_round: bool = False) -> None:
    """Every part holds items; except the incremental part of a first class round (--classes K, num_seen K),
    whose items are all original: its new classes come with the next round (--extends)."""
    checks = [(len(split.query_rows), f"the query part ({dataset.query.origin})"),
              (split.num_original, f"the original database part (items with all labels < {num_seen}, "
                                   f"from {dataset.database.origin})")]
    if not first_round:
        checks.append((len(split.database_rows) - split.num_original,
                       f"the incremental database part (items with a label >= {num_seen}, from "
                       f"{dataset.database.origin})"))
    for count, what in checks:
        if count == 0:
            raise ValueError(f"{dataset.name}: {what} is empty; check --num-seen, --classes and the per-class "
                             f"limits")


def resolve_num_seen(dataset: SourceDataset, requested: Optional[int], classes: Optional[int] = None) -> int:
    """--num-seen, or its default: with --classes K, K (every item original: a first class round)."""
    if classes is not None:
        num_seen = requested if requested is not None else classes
        if not 1 <= num_seen <= classes:
            raise ValueError(f"--num-seen: expected 1..{classes} with --classes {classes}, got {num_seen}")
        return num_seen
    num_seen = requested if requested is not None else dataset.default_num_seen
    if num_seen is None:
        raise ValueError(f"--num-seen is required for --dataset {dataset.name} (number of original classes)")
    if not 1 <= num_seen < dataset.num_classes:
        raise ValueError(f"--num-seen: expected 1..{dataset.num_classes - 1} for {dataset.name} "
                         f"({dataset.num_classes} classes), got {num_seen}")
    return num_seen


def check_classes(dataset: SourceDataset, classes: Optional[int]) -> None:
    if classes is not None and classes > dataset.num_classes:
        raise ValueError(f"--classes: expected 1..{dataset.num_classes} for {dataset.name} ({dataset.num_classes} "
                         f"classes), got {classes}")


# ----------------------------------------------------------------------------------------------------------
# Writing one part with FFCV


class WriterItems:
    """What FFCV's writer workers index: (image HxWx3 uint8, labels (L,) uint8, position).

    Images are brought to their stored size here (raw: the square `side`; JPEG: the longest side at most
    `max_side`), so FFCV's own resizer never runs. An image that cannot be read, or would be stored with a
    side under MIN_STORED_SIDE, is bad: it is flagged in shared memory and served as a placeholder; after the
    first bad image (unless skipping) every remaining item is a placeholder so the pass ends quickly, and the
    main process reports the first bad image. Each call records its position in `workers`, so the item a
    dying worker was on can be named."""

    def __init__(self, part: SourcePart, rows: np.ndarray, side: Optional[int], max_side: Optional[int],
                 stop_on_bad: bool, num_workers: int):
        self.images = part.images
        self.rows = rows
        self.labels = part.labels[rows]
        self.side = side
        self.max_side = max_side
        self.stop_on_bad = stop_on_bad
        self.bad = multiprocessing.RawArray(ctypes.c_uint8, max(len(rows), 1))
        self.abort = multiprocessing.RawValue(ctypes.c_uint8, 0)
        self.workers = WorkerTable(num_workers)

    def __len__(self) -> int:
        return len(self.rows)

    def describe(self, position: int) -> str:
        return self.images.describe(int(self.rows[position]))

    def load_image(self, position: int) -> np.ndarray:
        image = self.images.load(int(self.rows[position]))
        if self.side is not None:
            return resize_square(image, self.side)
        return fit_max_side(image, self.max_side, self.describe(position))

    def __getitem__(self, position: int):
        self.workers.record(position)
        return self.item(position)

    def item(self, position: int):
        """(image, labels, position), unrecorded: a part that also serves other items records its own."""
        placeholder = np.zeros((8, 8, 3), dtype=np.uint8)
        if self.abort.value:
            return placeholder, self.labels[position], position
        try:
            image = self.load_image(position)
        except Exception:   # reported by the main process, which re-reads the image for the message
            self.bad[position] = 1
            if self.stop_on_bad:
                self.abort.value = 1
            image = placeholder
        return image, self.labels[position], position

    def bad_positions(self) -> np.ndarray:
        return np.flatnonzero(np.frombuffer(self.bad, dtype=np.uint8)[:len(self.rows)])


def resize_square(image: np.ndarray, side: int) -> np.ndarray:
    if image.shape[:2] == (side, side):
        return image
    import cv2
    shrinking = image.shape[0] > side
    return cv2.resize(image, (side, side), interpolation=cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR)


def stored_shape(height: int, width: int, max_side: int) -> tuple:
    """(height, width) once the longest side is at most max_side (never enlarged), rounded to pixels."""
    scale = min(1.0, max_side / max(height, width))
    return int(height * scale + 0.5), int(width * scale + 0.5)


def fit_max_side(image: np.ndarray, max_side: int, what: str) -> np.ndarray:
    """The image with its longest side at most max_side; BadImageError if a side would be under MIN_STORED_SIDE."""
    height, width = image.shape[:2]
    new_height, new_width = stored_shape(height, width, max_side)
    short = min(new_height, new_width)
    if short < MIN_STORED_SIDE:
        scaled = (new_height, new_width) != (height, width)
        raise BadImageError(f"image {what}: {width} x {height} px: "
                            + (f"at --max-side {max_side} its short side would be {short} px" if scaled
                               else f"its short side is {short} px")
                            + f"; images need both sides >= {MIN_STORED_SIDE} px once the longest is at most "
                              f"--max-side (a tiny image or an extreme aspect ratio)")
    if (new_height, new_width) == (height, width):
        return image
    import cv2
    return cv2.resize(image, (new_width, new_height), interpolation=cv2.INTER_AREA)


def beton_fields(storage: str, num_classes: int, max_side: Optional[int]):
    from ffcv.fields import IntField, NDArrayField, RGBImageField
    # WriterItems already resized every JPEG-stored image to max_side, so FFCV's resizer keeps them as they are.
    image_field = (RGBImageField(write_mode="raw") if storage == "raw"
                   else RGBImageField(write_mode="jpg", max_resolution=max_side, jpeg_quality=JPEG_QUALITY))
    return {"image": image_field, "labels": NDArrayField(np.dtype("uint8"), (num_classes,)), "index": IntField()}


def page_size_for(largest_image_bytes: int) -> int:
    """FFCV needs every sample to fit in one page (a power of two, at least 2 MiB)."""
    size = 1 << 21
    while size < 4 * largest_image_bytes:
        size <<= 1
    return size


def write_beton(path: Path, items: WriterItems, fields, num_workers: int, page_size: int) -> float:
    """Write the items with FFCV's writer, watched: a dying worker raises WriterWorkerDied naming its item."""
    from ffcv.writer import DatasetWriter
    start = time.perf_counter()
    writer = DatasetWriter(str(path), fields, page_size=page_size, num_workers=num_workers)
    try:
        watched_write(writer, items, items.workers, lambda position: f"{path.stem} item {position} of "
                                                                     f"{len(items)}: {items.describe(position)}",
                      path.name, chunksize=max(1, min(100, len(items) // (4 * num_workers) or 1)))
    except WriterWorkerDied as died:   # the temporary folder is removed on the way out: say so
        raise WriterWorkerDied(f"{died}; nothing was written to --out") from died
    return time.perf_counter() - start


def write_part(folder: Path, name: str, dataset: SourceDataset, rows: np.ndarray, args, side, max_side,
               inherited=None) -> np.ndarray:
    """Write <name>.beton for these source rows; returns the rows of bad images (empty if none). With
    `inherited` (an `extend.InheritedPart`), the previous round's stored items come first, copied verbatim."""
    items = new_items = WriterItems(getattr(dataset, name), rows, side, max_side, stop_on_bad=not args.skip_bad,
                                    num_workers=args.num_workers)
    fields = beton_fields(dataset.storage, dataset.num_classes, max_side)
    largest = 3 * (side or max_side) ** 2
    if inherited is not None:
        from .extend import RoundItems, round_fields
        items = RoundItems(inherited, new_items, dataset.num_classes, args.num_workers)
        fields = round_fields(fields)
        largest = max(largest, inherited.largest_image_bytes)
    path = folder / f"{name}.beton"
    logger.info(f"writing {name}.beton: {len(items):,} images with {args.num_workers} worker(s)")
    elapsed = write_beton(path, items, fields, args.num_workers, page_size_for(largest))
    if inherited is not None:
        from .extend import record_image_field_type
        record_image_field_type(path)
    logger.info(f"{name}.beton: {len(items):,} images in {elapsed:.1f} s ({len(items) / max(elapsed, 1e-9):,.0f} "
                f"images/s)")
    bad = new_items.bad_positions()
    if len(bad) and not args.skip_bad:
        raise_first_bad(new_items, bad[0])
    return rows[bad]


def raise_first_bad(items: WriterItems, position: int) -> None:
    try:
        items.load_image(position)
    except Exception as error:
        raise ValueError(f"{error} (pass --skip-bad to skip bad images)") from error
    raise ValueError(f"{items.describe(position)} failed while writing but reads fine now; rerun")


def write_parts_skipping_bad(folder: Path, dataset: SourceDataset, make_split_without, args, side, max_side,
                             inherited: Optional[dict] = None):
    """Write both betons; with --skip-bad, drop bad images and rewrite the part without them.

    `make_split_without(excluded)` gives the source rows to write (.query_rows, .database_rows) without the
    excluded ones; `inherited` ({part: extend.InheritedPart}) puts the previous round's items first."""
    excluded: Dict[str, Set[int]] = {"query": set(), "database": set()}
    while True:
        split = make_split_without(excluded)
        newly_bad = {}
        for name, rows in (("query", split.query_rows), ("database", split.database_rows)):
            bad = write_part(folder, name, dataset, rows, args, side, max_side, (inherited or {}).get(name))
            if len(bad):
                newly_bad[name] = bad
        if not newly_bad:
            return split, excluded
        for name, bad in newly_bad.items():
            logger.warning(f"{name}: skipping {len(bad)} bad image(s), first "
                           f"{getattr(dataset, name).images.describe(int(bad[0]))}; rewriting")
            excluded[name].update(int(r) for r in bad)


def read_back_parts(folder: Path, labels: Dict[str, np.ndarray]) -> Dict[str, StoredItems]:
    """Read every stored item back (checked against the label rows written), save the per-item digests."""
    stored = {}
    for name in PARTS:
        start = time.perf_counter()
        stored[name] = read_back(folder / f"{name}.beton", labels[name])
        np.save(folder / ITEM_DIGEST_FILES[name], stored[name].digests)
        np.save(folder / IMAGE_DIGEST_FILES[name], stored[name].image_digests)
        logger.info(f"{name}.beton: {len(labels[name]):,} items read back and digested in "
                    f"{time.perf_counter() - start:.2f} s")
    return stored


# ----------------------------------------------------------------------------------------------------------
# Manifest


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def file_sha256_or_none(path: Path) -> Optional[str]:
    return sha256_of(path) if path.is_file() else None


def class_counts(labels: np.ndarray) -> Dict[str, object]:
    return {"total": int(len(labels)), "per_class": [int(c) for c in labels.sum(axis=0)]}


def stored_image_sizes(stored: Dict[str, StoredItems]) -> Dict[str, int]:
    """Over query and database: the largest longest side, the most common longest side (ties: the larger)
    and the smallest short side of the stored images, in pixels."""
    heights = np.concatenate([items.heights for items in stored.values()])
    widths = np.concatenate([items.widths for items in stored.values()])
    longest = np.maximum(heights, widths)
    sides, counts = np.unique(longest, return_counts=True)
    return {"largest_side": int(longest.max()), "most_common_side": int(sides[counts == counts.max()].max()),
            "smallest_side": int(np.minimum(heights, widths).min())}


def image_description(dataset: SourceDataset, side: Optional[int], max_side: Optional[int],
                      stored: Dict[str, StoredItems]) -> Dict[str, object]:
    sizes = stored_image_sizes(stored)
    if dataset.storage == "raw":
        native = dataset.database.images.native_size
        return {"storage": "raw", "channels": 3, "height": side, "width": side,
                "source_height": native[0], "source_width": native[1], **sizes}
    return {"storage": "jpeg", "channels": 3, "max_side": max_side, "min_side": MIN_STORED_SIDE,
            "jpeg_quality": JPEG_QUALITY, **sizes}


def listed_files(folder: Path) -> Dict[str, Dict[str, object]]:
    """Every file of the folder (the manifest excepted): its size and fingerprint."""
    return {path.name: {"bytes": path.stat().st_size, "fingerprint": file_fingerprint(path)}
            for path in sorted(folder.iterdir()) if path.name != MANIFEST}


FIRST_ROUND_ORDER = ("database = original items (all labels < num_seen) in source order, then incremental items "
                     "(any label >= num_seen) in source order")


@dataclass
class Contents:
    """What a preparation holds, part by part ("query", "database"), and how its database splits."""
    labels: Dict[str, np.ndarray]         # uint8 (rows, num_classes) multi-hot
    source_index: Dict[str, np.ndarray]   # each position's row in the source of the round that added it
    paths: Optional[Dict[str, List[str]]]   # image-list: each position's image file (absolute)
    num_original: int                     # rows [0, num_original) of the database: original (or inherited) items
    num_seen: int
    classes_so_far: int                   # the classes 0..K-1 its items may carry (see formats.classes_so_far)
    skipped: Dict[str, List[str]]         # this round's bad images, skipped (--skip-bad), described
    order: str                            # the database order, in words
    rounds: List[dict]                    # one entry per round: the rows it added, its classes, its sources
    extends: Optional[dict] = None        # the preparation this one extends (see `extend`)


def source_records(dataset: SourceDataset) -> List[Dict[str, object]]:
    return [{"path": str(path.resolve()), "bytes": path.stat().st_size, "sha256": sha256_of(path)}
            for path in dataset.source_files]


def round_record(database_rows: tuple, query_rows: tuple, classes_so_far: int,
                 sources: List[Dict[str, object]]) -> Dict[str, object]:
    """A round of a preparation: the database and query rows [start, end) it added, the classes 0..K-1 so far,
    the sources it read (its source_index values are rows of these)."""
    return {"database_rows": list(database_rows), "query_rows": list(query_rows), "num_classes_so_far": classes_so_far,
            "sources": sources, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


def item_paths(dataset: SourceDataset, name: str, rows: np.ndarray) -> List[str]:
    images = getattr(dataset, name).images
    return [os.path.abspath(images.path(int(row))) for row in rows]


def first_round_contents(dataset: SourceDataset, split: Split, num_seen: int, excluded: Dict[str, Set[int]],
                         classes: Optional[int]) -> Contents:
    rows = {"query": split.query_rows, "database": split.database_rows}
    classes_so_far = classes if classes is not None else dataset.num_classes
    return Contents(
        labels={name: getattr(dataset, name).labels[rows[name]].astype(np.uint8) for name in PARTS},
        source_index={name: rows[name].astype(np.int64) for name in PARTS},
        paths={name: item_paths(dataset, name, rows[name]) for name in PARTS} if dataset.name == "image-list" else None,
        num_original=split.num_original, num_seen=num_seen, classes_so_far=classes_so_far,
        skipped={name: [getattr(dataset, name).images.describe(r) for r in sorted(excluded[name])] for name in PARTS},
        order=FIRST_ROUND_ORDER,
        rounds=[round_record((0, len(split.database_rows)), (0, len(split.query_rows)), classes_so_far,
                             source_records(dataset))])


def build_manifest(dataset: SourceDataset, contents: Contents, args, side, max_side, stored: Dict[str, StoredItems],
                   files: Dict[str, Dict[str, object]]) -> Dict[str, object]:
    database_labels, query_labels = contents.labels["database"], contents.labels["query"]
    num_original = contents.num_original
    skipped = contents.skipped
    request = output_request(args)
    return {
        "format": PREPARED_FORMAT, "format_version": PREPARED_FORMAT_VERSION, "dihn_dist_version": __version__,
        "dataset": dataset.name,
        "protocol": {**dataset.protocol, "order": contents.order, "classes": args.classes,
                     "database_per_class": args.database_per_class, "query_per_class": args.query_per_class},
        "class_names": dataset.class_names, "num_classes": dataset.num_classes, "num_seen": contents.num_seen,
        "num_classes_so_far": contents.classes_so_far,
        "num_query": int(len(query_labels)), "num_database": int(len(database_labels)),
        "num_original": num_original, "num_incremental": int(len(database_labels) - num_original),
        "num_inherited": num_original if contents.extends is not None else 0,
        "extends": contents.extends,
        "rounds": contents.rounds,
        "counts": {"query": class_counts(query_labels), "database": class_counts(database_labels),
                   "database_original": class_counts(database_labels[:num_original]),
                   "database_incremental": class_counts(database_labels[num_original:])},
        "image": image_description(dataset, side, max_side, stored),
        "skipped_bad": {"query": len(skipped["query"]), "database": len(skipped["database"]), "images": skipped},
        "sources": contents.rounds[-1]["sources"],
        "source_index": {"query": "query_source_index.npy", "database": "database_source_index.npy"},
        "item_digests": {**ITEM_DIGEST_FILES, "scheme": ITEM_DIGEST_SCHEME},
        "image_digests": {**IMAGE_DIGEST_FILES, "scheme": IMAGE_DIGEST_SCHEME},
        "item_paths": dict(ITEM_PATH_FILES) if contents.paths is not None else None,
        "request": request,
        "command": prepare_command(request, args.out.resolve()),
        "files": files,
        "fingerprint": FINGERPRINT_SCHEME,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def save_preparation(folder: Path, dataset: SourceDataset, contents: Contents, args, side, max_side,
                     stored: Dict[str, StoredItems]) -> None:
    """The label, source-index and item-path files, then the manifest (last: it lists every other file)."""
    for name in PARTS:
        np.save(folder / f"{name}_labels.npy", contents.labels[name])
        np.save(folder / f"{name}_source_index.npy", contents.source_index[name])
        if contents.paths is not None:
            (folder / ITEM_PATH_FILES[name]).write_text("".join(path + "\n" for path in contents.paths[name]))
    fsync_folder_files(folder)
    manifest = build_manifest(dataset, contents, args, side, max_side, stored, listed_files(folder))
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")


# ----------------------------------------------------------------------------------------------------------
# What --out holds, and whether prepare may replace it


def size_text(size: int) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:,} bytes" if unit == "bytes" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} GiB"


def contents_text(folder: Path) -> str:
    """'N files, S: a (s), b (s), ...': what deleting the folder deletes."""
    files = sorted((path for path in folder.rglob("*") if path.is_file()), key=lambda path: str(path))
    sizes = [path.stat().st_size for path in files]
    listing = ", ".join(f"{path.relative_to(folder)} ({size_text(size)})" for path, size in zip(files, sizes))
    return f"{len(files)} files, {size_text(sum(sizes))}: {listing}"


def foreign_entries(out: Path) -> List[str]:
    """Entries of a prepared folder that no preparation writes (a preparation is replaced whole)."""
    manifest = read_json_object(out / MANIFEST) or {}
    listed = manifest.get("files") if isinstance(manifest.get("files"), dict) else {}
    known = PREPARED_FILES | set(listed)
    return sorted(entry.name + ("/" if entry.is_dir() else "") for entry in out.iterdir()
                  if entry.name not in known or not entry.is_file())


def preparation_problem(out: Path, request: Dict[str, object]) -> Optional[str]:
    """Why the preparation in `out` is not this very one, complete and intact (None when it is)."""
    manifest = read_json_object(out / MANIFEST)
    if manifest is None or manifest.get("format") != PREPARED_FORMAT:
        return f"without a readable {MANIFEST}"
    version = manifest.get("format_version")
    if version != PREPARED_FORMAT_VERSION:
        return f"made by another dihn_dist version (format_version {version}; this one writes {PREPARED_FORMAT_VERSION})"
    stored = manifest.get("request") if isinstance(manifest.get("request"), dict) else {}
    differences = {key: (stored.get(key), value) for key, value in request.items() if stored.get(key) != value}
    if differences:
        listing = ", ".join(f"{key}: {old!r} -> {new!r}" for key, (old, new) in differences.items())
        return f"made with other options ({listing})"
    extends = manifest.get("extends")
    if isinstance(extends, dict):
        old_manifest = Path(str(extends.get("path"))) / MANIFEST
        if extends.get("manifest_sha256") != file_sha256_or_none(old_manifest):
            return f"that extends {extends.get('path')}, which has changed since (its {MANIFEST} differs)"
    files = manifest.get("files") if isinstance(manifest.get("files"), dict) else {}
    for name, entry in files.items():
        problem = listed_file_problem(out / name, entry)
        if problem is not None:
            return f"that is damaged ({name}: {problem})"
    return None


def refuse_foreign_out(out: Path) -> None:
    """prepare writes only into a new or empty folder or over a preparation: never a run, never anything else."""
    kind = folder_kind(out)
    if kind == "run":
        raise ValueError(f"--out {out} is a training run folder ({FOLDER_MARKER} says {RUN_FORMAT['format']!r}: its "
                         f"checkpoints, codes and models); prepare never writes into a run folder, even with "
                         f"--force: choose another --out for the prepared data")
    if kind == "other" and not out.is_dir():
        raise ValueError(f"--out {out}: exists and is not a folder; choose another --out")
    if kind == "other":
        raise ValueError(f"--out {out}: the folder is not empty and is not a dihn_dist preparation (it has no "
                         f"{FOLDER_MARKER} saying {PREPARED_FORMAT!r}); prepare writes only into a new or empty "
                         f"folder or over its own preparation, even with --force: empty it or choose another --out")
    if kind == "prepared":
        foreign = foreign_entries(out)
        if foreign:
            raise ValueError(f"--out {out} holds a preparation and also {', '.join(foreign)}, which no preparation "
                             f"writes; prepare replaces a preparation whole, so it will not: move "
                             f"{'it' if len(foreign) == 1 else 'them'} out or choose another --out")


def out_is_done(out: Path, args) -> bool:
    """True when `out` already holds this very preparation (nothing to do); False when prepare may write it
    (new, empty, or a preparation --force lets it replace); raises ValueError otherwise."""
    refuse_foreign_out(out)
    if folder_kind(out) != "prepared":
        return False
    problem = preparation_problem(out, output_request(args))
    if problem is None and not args.force:
        manifest = json.loads((out / MANIFEST).read_text())
        logger.info(f"{out} is complete ({manifest['dataset']}, {manifest['num_database']:,} database / "
                    f"{manifest['num_query']:,} query images); nothing to do (--force rebuilds)")
        return True
    if not args.force:
        raise ValueError(f"--out {out} holds a preparation {problem}; pass --force to replace it, which deletes "
                         f"its {contents_text(out)}; or choose another --out")
    logger.warning(f"--force: the preparation in {out} ({problem or 'complete, same options'}) will be replaced "
                   f"once the new one is complete, deleting its {contents_text(out)}")
    return False


# ----------------------------------------------------------------------------------------------------------
# Atomic output folder


def temporary_folder(out: Path) -> Path:
    return out.parent / f".{out.name}.partial-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def remove_stale_partials(out: Path) -> None:
    """Temporary folders of interrupted runs (their process is gone) are removed."""
    for folder in out.parent.glob(f".{out.name}.partial-*"):
        try:
            pid = int(folder.name.rsplit(".partial-", 1)[1].split("-")[0])
            os.kill(pid, 0)
        except ProcessLookupError:
            shutil.rmtree(folder, ignore_errors=True)
        except (ValueError, IndexError, PermissionError):
            continue


def write_marker(folder: Path) -> None:
    (folder / FOLDER_MARKER).write_text(json.dumps(PREPARED_MARKER) + "\n")


def publish(temporary: Path, out: Path) -> None:
    """Rename the finished temporary folder to `out` (replacing an old preparation). `out` is checked again
    first: hours may have passed, and nothing but a preparation (or an empty folder) may be replaced."""
    refuse_foreign_out(out)
    if out.exists():
        old = out.parent / f".{out.name}.old-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        os.replace(out, old)
        os.replace(temporary, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(temporary, out)


def fsync_folder_files(folder: Path) -> None:
    for path in folder.iterdir():
        with open(path, "rb") as handle:
            os.fsync(handle.fileno())


# ----------------------------------------------------------------------------------------------------------


def stored_sizes(dataset: SourceDataset, args) -> tuple:
    """(side of stored raw images or None, max side of stored JPEGs or None); flags checked against storage."""
    if dataset.storage == "raw":
        if args.max_side is not None:
            raise ValueError(f"--max-side applies to JPEG datasets (nus-wide-tc21, image-list); {dataset.name} is "
                             f"stored raw: use --resolution")
        return args.resolution or max(dataset.database.images.native_size), None
    if args.resolution is not None:
        raise ValueError(f"--resolution applies to raw datasets (fashion-mnist, cifar-10); {dataset.name} is "
                         f"stored as JPEG: use --max-side")
    return None, args.max_side or DEFAULT_MAX_SIDE


def check_flags(args) -> None:
    for flag in ("num_seen", "num_workers", "database_per_class", "query_per_class", "classes"):
        check_positive(getattr(args, flag), "--" + flag.replace("_", "-"))
    for flag in ("resolution", "max_side"):
        check_side(getattr(args, flag), "--" + flag.replace("_", "-"))
    if args.classes is not None and args.dataset not in CLASS_ROUND_DATASETS:
        raise ValueError(f"--classes applies to {' and '.join(CLASS_ROUND_DATASETS)} (the class-rounds protocol), "
                         f"not {args.dataset}" + ("; an image-list round lists its own items: --extends OLD_DATA "
                                                   "--database-list NEW_ITEMS" if args.dataset == "image-list" else ""))
    if args.num_workers is None:
        args.num_workers = available_cpus()


def prepare(args: argparse.Namespace) -> Path:
    out: Path = args.out
    check_flags(args)
    old = None
    if args.extends is not None:
        from .extend import open_old_preparation
        old = open_old_preparation(args)   # checks OLD_DATA and --out; fills in the options NEW inherits
    if out_is_done(out, args):
        return out
    dataset = open_dataset(args.dataset, args.root, database_list=args.database_list,
                           query_list=args.query_list, max_side=args.max_side or DEFAULT_MAX_SIDE)
    check_classes(dataset, args.classes)
    side, max_side = stored_sizes(dataset, args)
    if old is None:
        num_seen = resolve_num_seen(dataset, args.num_seen, args.classes)
        make_split(dataset, num_seen, args.database_per_class, args.query_per_class, set(), set(),
                   args.classes)   # fail early
        write = lambda folder: write_all(folder, dataset, num_seen, args, side, max_side)  # noqa: E731
    else:
        from .extend import plan_round, write_round
        plan = plan_round(dataset, old, args)   # fail early: the new items, each checked against OLD's
        write = lambda folder: write_round(folder, dataset, old, plan, args, side, max_side)  # noqa: E731
    write_atomically(out, write)
    logger.info(f"prepared {out}")
    return out


def write_atomically(out: Path, write) -> None:
    """write(folder) into a temporary folder beside `out`, renamed to `out` once complete; removed on any error."""
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_partials(out)
    temporary = temporary_folder(out)
    temporary.mkdir()
    try:
        write_marker(temporary)
        write(temporary)
        publish(temporary, out)
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise


def write_all(folder: Path, dataset: SourceDataset, num_seen: int, args, side, max_side) -> None:
    """A first preparation (no --extends)."""
    start = time.perf_counter()
    split, excluded = write_parts_skipping_bad(
        folder, dataset, lambda excluded: make_split(dataset, num_seen, args.database_per_class, args.query_per_class,
                                                     excluded["query"], excluded["database"], args.classes),
        args, side, max_side)
    contents = first_round_contents(dataset, split, num_seen, excluded, args.classes)
    stored = read_back_parts(folder, contents.labels)
    save_preparation(folder, dataset, contents, args, side, max_side, stored)
    log_written(dataset, contents, time.perf_counter() - start)


def log_written(dataset: SourceDataset, contents: Contents, elapsed: float) -> None:
    num_database, num_query = len(contents.labels["database"]), len(contents.labels["query"])
    kind = "inherited" if contents.extends is not None else "original"
    logger.info(f"{dataset.name}: {num_database:,} database ({contents.num_original:,} {kind}) + {num_query:,} query "
                f"images in {elapsed:.1f} s ({(num_database + num_query) / max(elapsed, 1e-9):,.0f} images/s)")


def main(argv: Optional[Sequence[str]] = None) -> int:
    """The command line: exit 0, or one line on stderr and exit 2 (bad input) / 1 (a failure while writing)."""
    args = parse_args(argv)

    def body() -> int:
        prepare(args)
        return 0

    return run_command(body, debug=args.debug or debug_requested(argv))


if __name__ == "__main__":
    # Run the package's copy of this module, not this __main__ one: dihn_dist.extend imports
    # dihn_dist.prepare, and one copy must serve both.
    from dihn_dist.prepare import main as package_main
    sys.exit(package_main())
