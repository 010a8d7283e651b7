"""Turn a dataset on disk into FFCV files plus a manifest that fixes the DIHN retrieval protocol.

    python -m dihn_dist.prepare --dataset fashion-mnist --out data/fmnist
    python -m dihn_dist.prepare --dataset cifar-10 --root SRC --out data/cifar10
    python -m dihn_dist.prepare --dataset nus-wide-tc21 --root SRC --out data/nus --max-side 256
    python -m dihn_dist.prepare --dataset image-list --database-list db.txt --query-list q.txt --num-seen 5 --out D

Writes into --out: query.beton, database.beton (fields image, labels, index), query_labels.npy and
database_labels.npy (uint8 multi-hot), query_source_index.npy and database_source_index.npy (the source row of
each position) and manifest.json (written last). The database holds every original item first (all labels
< num_seen), in source order, then every incremental item (any label >= num_seen), in source order.

Atomic: everything is written into a hidden temporary folder beside --out and renamed at the end, so an
interrupted run never leaves a folder that looks complete. Re-running on a complete output with the same
options does nothing (quickly); --force rebuilds it.
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
from typing import Dict, Optional, Sequence, Set

import numpy as np
from loguru import logger

from . import __version__
from .datasets import DATASETS, SourceDataset, SourcePart, first_rows_per_class, open_dataset
from .formats import MANIFEST, PREPARED_FORMAT, PREPARED_FORMAT_VERSION, is_incremental

DEFAULT_MAX_SIDE = 256
JPEG_QUALITY = 90


# ----------------------------------------------------------------------------------------------------------
# Command line


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m dihn_dist.prepare", description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", required=True, choices=DATASETS)
    parser.add_argument("--root", type=Path, help="source folder (fashion-mnist: optional, default "
                        "/usr/share/datasets/fashion-mnist; image-list: folder the listed paths are relative to, "
                        "default each list's own folder)")
    parser.add_argument("--out", type=Path, required=True, help="output folder")
    parser.add_argument("--num-seen", type=int, help="number of original classes (0..K-1); default: 7 for "
                        "fashion-mnist and cifar-10, 18 for nus-wide-tc21; required for image-list")
    parser.add_argument("--resolution", type=int, help="raw datasets (fashion-mnist, cifar-10): stored side in "
                        "pixels (default: native, 28 / 32)")
    parser.add_argument("--max-side", type=int, help=f"JPEG datasets (nus-wide-tc21, image-list): longest stored "
                        f"side in pixels (default {DEFAULT_MAX_SIDE})")
    parser.add_argument("--num-workers", type=int, default=None,
                        help="writer processes (default: the CPUs this process may use)")
    parser.add_argument("--skip-bad", action="store_true",
                        help="skip unreadable images (listed in the manifest) instead of failing")
    parser.add_argument("--force", action="store_true", help="rebuild even if --out is complete")
    parser.add_argument("--database-per-class", type=int,
                        help="keep only the first K database items of each class (by first label); default all")
    parser.add_argument("--query-per-class", type=int,
                        help="keep only the first K query items of each class (by first label); default all")
    parser.add_argument("--database-list", type=Path, help="image-list: database list file")
    parser.add_argument("--query-list", type=Path, help="image-list: query list file")
    return parser.parse_args(argv)


def available_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:   # not Linux
        return os.cpu_count() or 1


def check_positive(value: Optional[int], flag: str) -> None:
    if value is not None and value < 1:
        raise ValueError(f"{flag}: expected a positive integer, got {value}")


def output_request(args: argparse.Namespace) -> Dict[str, object]:
    """The options that decide the output; a complete output made with other options is not reused."""
    def path_or_none(path: Optional[Path]) -> Optional[str]:
        return str(path.resolve()) if path is not None else None
    return {
        "dataset": args.dataset, "root": path_or_none(args.root), "num_seen": args.num_seen,
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


def select_rows(part: SourcePart, per_class: Optional[int], excluded: Set[int]) -> np.ndarray:
    rows = np.asarray([r for r in part.rows if int(r) not in excluded], dtype=np.int64) if excluded \
        else np.asarray(part.rows, dtype=np.int64)
    if per_class is not None and len(rows):
        rows = rows[first_rows_per_class(part.labels[rows], per_class)]
    return rows


def make_split(dataset: SourceDataset, num_seen: int, database_per_class: Optional[int],
               query_per_class: Optional[int], excluded_query: Set[int], excluded_database: Set[int]) -> Split:
    query_rows = select_rows(dataset.query, query_per_class, excluded_query)
    database_rows = select_rows(dataset.database, database_per_class, excluded_database)
    incremental = is_incremental(dataset.database.labels[database_rows], num_seen)
    ordered = np.concatenate([database_rows[~incremental], database_rows[incremental]])
    split = Split(query_rows, ordered, int((~incremental).sum()))
    check_split_not_empty(dataset, split, num_seen)
    return split


def check_split_not_empty(dataset: SourceDataset, split: Split, num_seen: int) -> None:
    checks = [(len(split.query_rows), f"the query part ({dataset.query.origin})"),
              (split.num_original, f"the original database part (items with all labels < {num_seen}, "
                                   f"from {dataset.database.origin})"),
              (len(split.database_rows) - split.num_original,
               f"the incremental database part (items with a label >= {num_seen}, from {dataset.database.origin})")]
    for count, what in checks:
        if count == 0:
            raise ValueError(f"{dataset.name}: {what} is empty; check --num-seen and the per-class limits")


def resolve_num_seen(dataset: SourceDataset, requested: Optional[int]) -> int:
    num_seen = requested if requested is not None else dataset.default_num_seen
    if num_seen is None:
        raise ValueError(f"--num-seen is required for --dataset {dataset.name} (number of original classes)")
    if not 1 <= num_seen < dataset.num_classes:
        raise ValueError(f"--num-seen: expected 1..{dataset.num_classes - 1} for {dataset.name} "
                         f"({dataset.num_classes} classes), got {num_seen}")
    return num_seen


# ----------------------------------------------------------------------------------------------------------
# Writing one part with FFCV


class WriterItems:
    """What FFCV's writer workers index: (image HxWx3 uint8, labels (L,) uint8, position).

    A worker that raises leaves FFCV's writer waiting forever, so failures are caught here and flagged in
    shared memory; after the first failure (unless skipping) the remaining items are served as placeholders so
    the pass ends quickly, and the main process reports the first bad image."""

    def __init__(self, part: SourcePart, rows: np.ndarray, side: Optional[int], stop_on_bad: bool):
        self.images = part.images
        self.rows = rows
        self.labels = part.labels[rows]
        self.side = side
        self.stop_on_bad = stop_on_bad
        self.bad = multiprocessing.RawArray(ctypes.c_uint8, max(len(rows), 1))
        self.abort = multiprocessing.RawValue(ctypes.c_uint8, 0)

    def __len__(self) -> int:
        return len(self.rows)

    def load_image(self, position: int) -> np.ndarray:
        image = self.images.load(int(self.rows[position]))
        if self.side is not None and image.shape[:2] != (self.side, self.side):
            import cv2
            shrinking = image.shape[0] > self.side
            image = cv2.resize(image, (self.side, self.side),
                               interpolation=cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR)
        return image

    def __getitem__(self, position: int):
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


def beton_fields(storage: str, num_classes: int, max_side: Optional[int]):
    from ffcv.fields import IntField, NDArrayField, RGBImageField
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
    from ffcv.writer import DatasetWriter
    start = time.perf_counter()
    writer = DatasetWriter(str(path), fields, page_size=page_size, num_workers=num_workers)
    writer.from_indexed_dataset(items, chunksize=max(1, min(100, len(items) // (4 * num_workers) or 1)))
    return time.perf_counter() - start


def write_part(folder: Path, name: str, dataset: SourceDataset, rows: np.ndarray, args, side, max_side) -> np.ndarray:
    """Write <name>.beton for these source rows; returns the rows that could not be read (empty if none)."""
    items = WriterItems(getattr(dataset, name), rows, side, stop_on_bad=not args.skip_bad)
    largest = 3 * (side or max_side) ** 2
    logger.info(f"writing {name}.beton: {len(rows):,} images with {args.num_workers} worker(s)")
    elapsed = write_beton(folder / f"{name}.beton", items, beton_fields(dataset.storage, dataset.num_classes,
                                                                        max_side), args.num_workers,
                          page_size_for(largest))
    logger.info(f"{name}.beton: {len(rows):,} images in {elapsed:.1f} s ({len(rows) / max(elapsed, 1e-9):,.0f} images/s)")
    bad = items.bad_positions()
    if len(bad) and not args.skip_bad:
        raise_first_bad(items, bad[0])
    return rows[bad]


def raise_first_bad(items: WriterItems, position: int) -> None:
    try:
        items.load_image(position)
    except Exception as error:
        raise ValueError(f"{error} (pass --skip-bad to skip unreadable images)") from error
    raise ValueError(f"{items.images.describe(int(items.rows[position]))} failed while writing but reads fine "
                     f"now; rerun")


def write_parts_skipping_bad(folder: Path, dataset: SourceDataset, num_seen: int, args, side, max_side):
    """Write both betons; with --skip-bad, drop unreadable images and rewrite the part without them."""
    excluded: Dict[str, Set[int]] = {"query": set(), "database": set()}
    while True:
        split = make_split(dataset, num_seen, args.database_per_class, args.query_per_class,
                           excluded["query"], excluded["database"])
        newly_bad = {}
        for name, rows in (("query", split.query_rows), ("database", split.database_rows)):
            bad = write_part(folder, name, dataset, rows, args, side, max_side)
            if len(bad):
                newly_bad[name] = bad
        if not newly_bad:
            return split, excluded
        for name, bad in newly_bad.items():
            logger.warning(f"{name}: skipping {len(bad)} unreadable image(s), first "
                           f"{getattr(dataset, name).images.describe(int(bad[0]))}; rewriting")
            excluded[name].update(int(r) for r in bad)


# ----------------------------------------------------------------------------------------------------------
# Manifest


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def class_counts(labels: np.ndarray) -> Dict[str, object]:
    return {"total": int(len(labels)), "per_class": [int(c) for c in labels.sum(axis=0)]}


def image_description(dataset: SourceDataset, side: Optional[int], max_side: Optional[int]) -> Dict[str, object]:
    if dataset.storage == "raw":
        native = dataset.database.images.native_size
        return {"storage": "raw", "channels": 3, "height": side, "width": side,
                "source_height": native[0], "source_width": native[1]}
    return {"storage": "jpeg", "channels": 3, "max_side": max_side, "jpeg_quality": JPEG_QUALITY}


def build_manifest(dataset: SourceDataset, split: Split, num_seen: int, excluded: Dict[str, Set[int]],
                   args, side, max_side, files: Dict[str, int]) -> Dict[str, object]:
    database_labels = dataset.database.labels[split.database_rows]
    query_labels = dataset.query.labels[split.query_rows]
    skipped = {name: [getattr(dataset, name).images.describe(r) for r in sorted(rows)]
               for name, rows in excluded.items()}
    return {
        "format": PREPARED_FORMAT, "format_version": PREPARED_FORMAT_VERSION, "dihn_dist_version": __version__,
        "dataset": dataset.name,
        "protocol": {**dataset.protocol,
                     "order": "database = original items (all labels < num_seen) in source order, "
                              "then incremental items (any label >= num_seen) in source order",
                     "database_per_class": args.database_per_class, "query_per_class": args.query_per_class},
        "class_names": dataset.class_names, "num_classes": dataset.num_classes, "num_seen": num_seen,
        "num_query": int(len(split.query_rows)), "num_database": int(len(split.database_rows)),
        "num_original": split.num_original,
        "num_incremental": int(len(split.database_rows) - split.num_original),
        "counts": {"query": class_counts(query_labels), "database": class_counts(database_labels),
                   "database_original": class_counts(database_labels[:split.num_original]),
                   "database_incremental": class_counts(database_labels[split.num_original:])},
        "image": image_description(dataset, side, max_side),
        "skipped_bad": {"query": len(skipped["query"]), "database": len(skipped["database"]), "images": skipped},
        "sources": [{"path": str(path.resolve()), "bytes": path.stat().st_size, "sha256": sha256_of(path)}
                    for path in dataset.source_files],
        "source_index": {"query": "query_source_index.npy", "database": "database_source_index.npy"},
        "request": output_request(args),
        "files": files,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


# ----------------------------------------------------------------------------------------------------------
# Atomic output folder


def read_complete_manifest(out: Path) -> Optional[Dict[str, object]]:
    """The manifest of a complete preparation in `out`, else None (missing, foreign or files missing)."""
    try:
        manifest = json.loads((out / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(manifest, dict) or manifest.get("format") != PREPARED_FORMAT:
        return None
    files = manifest.get("files", {})
    for name, size in files.items():
        path = out / name
        if not path.is_file() or path.stat().st_size != size:
            return None
    return manifest


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


def check_replaceable(out: Path) -> None:
    """Only an empty folder or an earlier preparation (complete or not) may be replaced."""
    if not out.exists():
        return
    if not out.is_dir():
        raise ValueError(f"--out {out}: exists and is not a folder")
    is_ours = (out / MANIFEST).is_file()
    if any(out.iterdir()) and not is_ours:
        raise ValueError(f"--out {out}: the folder exists, is not empty and holds no {MANIFEST} of a dihn_dist "
                         f"preparation; remove it or choose another --out")


def publish(temporary: Path, out: Path) -> None:
    """Rename the finished temporary folder to `out` (replacing an old preparation)."""
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
    for flag in ("num_seen", "resolution", "max_side", "num_workers", "database_per_class", "query_per_class"):
        check_positive(getattr(args, flag), "--" + flag.replace("_", "-"))
    if args.num_workers is None:
        args.num_workers = available_cpus()


def prepare(args: argparse.Namespace) -> Path:
    out: Path = args.out
    check_flags(args)
    existing = None if args.force else read_complete_manifest(out)
    if existing is not None:
        if existing.get("request") != output_request(args):
            differences = {k: (existing.get("request", {}).get(k), v) for k, v in output_request(args).items()
                           if existing.get("request", {}).get(k) != v}
            raise ValueError(f"--out {out} holds a complete preparation made with other options "
                             f"(option: (stored, requested) = {differences}); pass --force to rebuild it or "
                             f"choose another --out")
        logger.info(f"{out} is complete ({existing['dataset']}, {existing['num_database']:,} database / "
                    f"{existing['num_query']:,} query images); nothing to do (--force rebuilds)")
        return out
    check_replaceable(out)
    dataset = open_dataset(args.dataset, args.root, database_list=args.database_list,
                           query_list=args.query_list, max_side=args.max_side or DEFAULT_MAX_SIDE)
    num_seen = resolve_num_seen(dataset, args.num_seen)
    side, max_side = stored_sizes(dataset, args)
    make_split(dataset, num_seen, args.database_per_class, args.query_per_class, set(), set())   # fail early
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_partials(out)
    temporary = temporary_folder(out)
    temporary.mkdir()
    try:
        write_all(temporary, dataset, num_seen, args, side, max_side)
        publish(temporary, out)
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise
    logger.info(f"prepared {out}")
    return out


def write_all(folder: Path, dataset: SourceDataset, num_seen: int, args, side, max_side) -> None:
    start = time.perf_counter()
    split, excluded = write_parts_skipping_bad(folder, dataset, num_seen, args, side, max_side)
    np.save(folder / "database_labels.npy", dataset.database.labels[split.database_rows].astype(np.uint8))
    np.save(folder / "query_labels.npy", dataset.query.labels[split.query_rows].astype(np.uint8))
    np.save(folder / "database_source_index.npy", split.database_rows.astype(np.int64))
    np.save(folder / "query_source_index.npy", split.query_rows.astype(np.int64))
    fsync_folder_files(folder)
    files = {path.name: path.stat().st_size for path in sorted(folder.iterdir())}
    manifest = build_manifest(dataset, split, num_seen, excluded, args, side, max_side, files)
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
    total = len(split.query_rows) + len(split.database_rows)
    elapsed = time.perf_counter() - start
    logger.info(f"{dataset.name}: {len(split.database_rows):,} database ({split.num_original:,} original) + "
                f"{len(split.query_rows):,} query images in {elapsed:.1f} s ({total / max(elapsed, 1e-9):,.0f} images/s)")


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    try:
        prepare(args)
    except (ValueError, FileNotFoundError) as error:
        logger.error(str(error))
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
