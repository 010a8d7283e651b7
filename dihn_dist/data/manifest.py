"""What a preparation records about itself: the manifest (sources, options, rounds, each file's size and
fingerprint, the stored image sizes) and the summaries prepare prints.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Set

import numpy as np
from loguru import logger

from .. import __version__
from ..common.digest import file_sha256
from ..common.formats import (
    FINGERPRINT_SCHEME,
    FOLDER_MARKER,
    IMAGE_DIGEST_FILES,
    ITEM_PATH_FILES,
    MANIFEST,
    PREPARED_FORMAT,
    PREPARED_FORMAT_VERSION,
    PREPARED_V1_FILES,
    file_fingerprint,
    prepare_command,
)
from .parts import ITEM_DIGEST_FILES, JPEG_QUALITY, MIN_STORED_SIDE, PARTS
from .sources import SourceDataset
from .split import Split
from .writer import IMAGE_DIGEST_SCHEME, ITEM_DIGEST_SCHEME, StoredItems

# Every file a preparation of this version holds; a prepared folder holding anything else is not replaced.
PREPARED_FILES = PREPARED_V1_FILES | {FOLDER_MARKER, *ITEM_DIGEST_FILES.values(), *IMAGE_DIGEST_FILES.values(),
                                      *ITEM_PATH_FILES.values()}
# --classes K (the class-rounds protocol: classes 0..K-1 so far) applies to these single-label datasets.
CLASS_ROUND_DATASETS = ("fashion-mnist", "cifar-10")


# ----------------------------------------------------------------------------------------------------------
# Manifest


def file_sha256_or_none(path: Path) -> Optional[str]:
    return file_sha256(path) if path.is_file() else None


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
    return [{"path": str(path.resolve()), "bytes": path.stat().st_size, "sha256": file_sha256(path)}
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


def log_written(dataset: SourceDataset, contents: Contents, elapsed: float) -> None:
    num_database, num_query = len(contents.labels["database"]), len(contents.labels["query"])
    kind = "inherited" if contents.extends is not None else "original"
    logger.info(f"{dataset.name}: {num_database:,} database ({contents.num_original:,} {kind}) + {num_query:,} query "
                f"images in {elapsed:.1f} s ({(num_database + num_query) / max(elapsed, 1e-9):,.0f} images/s)")


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


def fsync_folder_files(folder: Path) -> None:
    for path in folder.iterdir():
        with open(path, "rb") as handle:
            os.fsync(handle.fileno())
