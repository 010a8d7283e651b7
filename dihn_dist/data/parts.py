"""Writing one part (query or database) of a preparation with FFCV: the items brought to their stored size,
bad images found and named, the .beton written by watched workers, every item read back and digested.

A new round's part starts with the previous round's stored items, copied byte for byte (`RoundItems`,
`InheritedPart`), then this round's items (`WriterItems`).
"""
from __future__ import annotations

import ctypes
import multiprocessing
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Set

import numpy as np
from ffcv.fields import RGBImageField
from loguru import logger

from ..common.formats import IMAGE_DIGEST_FILES
from .sources import BadImageError, SourceDataset, SourcePart
from .writer import (
    StoredImage,
    StoredImages,
    StoredItems,
    WorkerTable,
    WriterWorkerDied,
    read_back,
    rewrite_in_item_order,
    watched_write,
)

# ----------------------------------------------------------------------------------------------------------
# Writing NEW


class RoundItems:
    """What FFCV's writer workers index for one part of NEW: (image, labels (L_new,), position).

    Positions [0, n) serve OLD's items: a StoredImage (OLD's stored bytes, read through a memory map that
    each worker opens for itself) and OLD's label row padded with 0 for the new classes. Positions n.. serve
    this round's items through `new` (a WriterItems: resized, bad images flagged)."""

    def __init__(self, inherited: InheritedPart, new: WriterItems, width: int, num_workers: int):
        self.inherited = inherited
        self.new = new
        self.labels = widened(inherited.labels, width)
        self.workers = WorkerTable(num_workers)
        self.mapped = None
        self.mapped_by = None

    def __len__(self) -> int:
        return len(self.inherited) + len(self.new)

    def describe(self, position: int) -> str:
        if position < len(self.inherited):
            return f"item {position} of {self.inherited.beton} (inherited)"
        return self.new.describe(position - len(self.inherited))

    def __getitem__(self, position: int):
        self.workers.record(position)
        if position < len(self.inherited):
            return self.stored_image(position), self.labels[position], position
        image, labels, _ = self.new.item(position - len(self.inherited))
        return image, labels, position

    def stored_image(self, row: int) -> StoredImage:
        if self.mapped_by != os.getpid():   # a forked worker maps the file itself
            self.mapped = np.memmap(self.inherited.beton, dtype=np.uint8, mode="r")
            self.mapped_by = os.getpid()
        images = self.inherited.images
        start = int(images.pointers[row])
        header = images.headers[row]
        return StoredImage(int(header["mode"]), int(header["height"]), int(header["width"]),
                           np.asarray(self.mapped[start:start + int(images.sizes[row])]))


def widened(labels: np.ndarray, width: int) -> np.ndarray:
    """Label rows padded with 0 up to `width` classes."""
    padded = np.zeros((len(labels), width), dtype=np.uint8)
    padded[:, :labels.shape[1]] = labels
    return padded

DEFAULT_MAX_SIDE = 256
JPEG_QUALITY = 90
# The smallest stored image side: below it an image carries no usable content (and resizing to a 0 px side
# makes OpenCV abort). Tiny images, and images too elongated to keep this short side once their longest
# side is brought to --max-side, are bad images.
MIN_STORED_SIDE = 4
ITEM_DIGEST_FILES = {"query": "query_item_digests.npy", "database": "database_item_digests.npy"}
PARTS = ("query", "database")


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
    from ffcv.fields import IntField, NDArrayField
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
        from ..data.writer import round_fields
        items = RoundItems(inherited, new_items, dataset.num_classes, args.num_workers)
        fields = round_fields(fields)
        largest = max(largest, inherited.largest_image_bytes)
    path = folder / f"{name}.beton"
    logger.info(f"writing {name}.beton: {len(items):,} images with {args.num_workers} worker(s)")
    page_size = page_size_for(largest)
    elapsed = write_beton(path, items, fields, args.num_workers, page_size)
    if inherited is not None:
        from ..data.writer import record_image_field_type
        record_image_field_type(path)
    logger.info(f"{name}.beton: {len(items):,} images in {elapsed:.1f} s ({len(items) / max(elapsed, 1e-9):,.0f} "
                f"images/s)")
    bad = new_items.bad_positions()
    if len(bad) and not args.skip_bad:
        raise_first_bad(new_items, bad[0])
    if not len(bad) and args.num_workers > 1:   # one worker writes the item-order layout already
        start = time.perf_counter()
        rewrite_in_item_order(path, fields, page_size)
        logger.info(f"{name}.beton: rewritten in item order (the same bytes whatever the workers) in "
                    f"{time.perf_counter() - start:.1f} s")
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
# OLD_DATA


@dataclass
class InheritedPart:
    """One part of OLD_DATA as NEW inherits it: where its stored images lie, their digests, its label rows."""
    beton: Path
    labels: np.ndarray          # (n, L_old) uint8
    source_index: np.ndarray    # (n,) int64
    images: StoredImages
    image_digests: np.ndarray   # (n, 16) uint8
    paths: Optional[List[str]]  # image-list: each item's image file

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def largest_image_bytes(self) -> int:
        return int(self.images.sizes.max()) if len(self.labels) else 0
