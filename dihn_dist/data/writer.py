"""Writing a .beton with FFCV's DatasetWriter so that no writer worker can make it wait forever, and reading
every stored item back (per-item digests, stored image sizes, a check of what was written).

Watched writes. FFCV's DatasetWriter forks worker processes and then waits for a shared counter of finished
items, and for one message per worker, without ever looking at the workers: a worker that dies (an
exception in an encoder, a kill, the out-of-memory killer) leaves it waiting forever at 0% CPU, and the
other workers spin forever too, waiting for the dead one's page. `watched_write` runs the same writer, but
keeps the worker Process objects and checks them at every point where the writer waits: a worker that
exits with a non-zero code, or no worker making progress for `stall_seconds`, stops the other workers,
frees FFCV's shared memory and raises WriterWorkerDied, naming the item the worker was on (a WorkerTable
in shared memory, filled by the dataset's __getitem__, says which item each worker took last). Each worker
dies with the process that started it (`die_with_parent`): a kill -9 of prepare leaves no worker behind.

Per-item digests. `read_back` reads every stored item of a finished .beton through FFCV's Reader (the
per-sample metadata and the allocation table) and a memory map of the file: item i's digest is the 16-byte
BLAKE2b (hashlib.blake2b, digest_size=16) of, in order, its image's FFCV metadata as stored (mode: 1 byte,
0 JPEG / 1 raw; height and width: uint16 little-endian each), the stored image bytes (the JPEG file or the
raw HxWx3 pixels, exactly as in the .beton) and its stored label row (uint8, one byte per class). Equal
digests mean identical stored items. Item i's image digest is the same without the label row: equal image
digests mean bit-identical stored images, whatever the width of the label rows (a later round of a
preparation widens its label rows for the new classes and keeps its images).
"""
from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import mmap
import multiprocessing
import multiprocessing.queues
import os
import queue
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, List, Optional

import numpy as np
from ffcv.fields import RGBImageField

DIGEST_BYTES = 16
ITEM_DIGEST_SCHEME = ("blake2b (16-byte digest) of the item's stored image metadata (mode: 1 byte, 0 = JPEG, "
                      "1 = raw; height, width: uint16 little-endian), the stored image bytes (JPEG file or raw "
                      "HxWx3 pixels, exactly as in the .beton) and the stored label row (uint8 per class)")
IMAGE_DIGEST_SCHEME = ("blake2b (16-byte digest) of the item's stored image metadata (mode: 1 byte, 0 = JPEG, "
                       "1 = raw; height, width: uint16 little-endian) and the stored image bytes (JPEG file or raw "
                       "HxWx3 pixels, exactly as in the .beton): the item digest without the label row")
WORKER_STALL_SECONDS = 600.0   # no writer worker taking a new item for this long: it is stuck, not slow
QUEUE_POLL_SECONDS = 0.2


# Errors that only writing raises: a worker that fails with one of these could not write the .beton (a full
# disk or quota, a file size limit, a read-only filesystem); its image is not to blame.
WRITE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS})


class WriterWorkerDied(RuntimeError):
    """A writer worker died (or all of them stalled): the message names the worker and its item."""


class RecordWriteErrors:
    """A writer worker's target that notes a write error (WRITE_ERRNOS) in shared memory before it ends the
    worker, so that the parent reports the output, not the image the worker was on."""

    def __init__(self, target, write_errno):
        self.target = target
        self.write_errno = write_errno

    def __call__(self, *args, **kwargs):
        try:
            return self.target(*args, **kwargs)
        except OSError as error:
            if error.errno not in WRITE_ERRNOS:
                raise
            # The parent names --out in one line; a worker's traceback above it would only say the same.
            self.write_errno.value = error.errno
            sys.stderr.flush()
            os._exit(1)


# ----------------------------------------------------------------------------------------------------------
# Which item each worker took last


class WorkerTable:
    """(pid, position) of the item each writer worker took last, in shared memory.

    Each worker claims a slot on its first `record` (workers are forked copies, so the claimed slot is
    remembered per process); the parent reads the table to name the item of a worker that died."""

    def __init__(self, capacity: int):
        self.capacity = max(capacity, 1)
        self.rows = multiprocessing.RawArray(ctypes.c_int64, 2 * self.capacity)   # pid, position; pid 0 = free
        self.claimed = multiprocessing.Value(ctypes.c_int64, 0)
        self.slot_owner = 0
        self.slot = -1

    def record(self, position: int) -> None:
        pid = os.getpid()
        if self.slot_owner != pid:
            with self.claimed.get_lock():
                self.slot = self.claimed.value
                self.claimed.value += 1
            self.slot_owner = pid
        if self.slot < self.capacity:
            self.rows[2 * self.slot + 1] = position
            self.rows[2 * self.slot] = pid

    def position_of(self, pid: int) -> Optional[int]:
        for slot in range(self.capacity):
            if self.rows[2 * slot] == pid:
                return int(self.rows[2 * slot + 1])
        return None

    def snapshot(self) -> tuple:
        return tuple(self.rows)


# ----------------------------------------------------------------------------------------------------------
# The watched write


class WatchedQueue(multiprocessing.queues.Queue):
    """A multiprocessing Queue whose blocking get() in the creating process checks the workers every
    QUEUE_POLL_SECONDS instead of waiting forever; in the (forked) workers it is an ordinary queue."""

    def __init__(self, watch: "WorkerWatch"):
        super().__init__(ctx=multiprocessing.get_context())
        self.watch = watch
        self.owner = os.getpid()

    def get(self, block=True, timeout=None):
        if not block or timeout is not None or os.getpid() != self.owner:
            return super().get(block, timeout)
        while True:
            try:
                return super().get(timeout=QUEUE_POLL_SECONDS)
            except queue.Empty:
                self.watch.check()


class WorkerWatch:
    """Stands in for the Process, Queue and sleep of FFCV's writer during one write, and checks its workers."""

    def __init__(self, table: WorkerTable, describe: Callable[[int], str], what: str, stall_seconds: float):
        self.table = table
        self.describe = describe
        self.what = what
        self.stall_seconds = stall_seconds
        self.owner = os.getpid()
        self.processes: List[multiprocessing.Process] = []
        self.queues: List[WatchedQueue] = []
        self.write_errno = multiprocessing.Value(ctypes.c_int, 0, lock=False)
        self.progress = (table.snapshot(), time.monotonic())

    def Process(self, target=None, args=(), **kwargs) -> multiprocessing.Process:   # noqa: N802 - a class
        target = RecordWriteErrors(target, self.write_errno)
        process = multiprocessing.Process(target=run_dying_with_parent, args=(os.getpid(), target, *args), **kwargs)
        self.processes.append(process)
        return process

    def Queue(self) -> WatchedQueue:   # noqa: N802 - stands in for a class
        watched = WatchedQueue(self)
        self.queues.append(watched)
        return watched

    def sleep(self, seconds: float) -> None:
        time.sleep(seconds)
        self.check()

    def check(self) -> None:
        """Raise WriterWorkerDied if a worker exited with an error or none took an item for stall_seconds."""
        if os.getpid() != self.owner:
            return
        for process in self.processes:
            code = process.exitcode
            if code not in (None, 0):
                if self.write_errno.value:
                    number = self.write_errno.value
                    raise OSError(number, f"{os.strerror(number)}, while a writer worker wrote {self.what}")
                raise WriterWorkerDied(self.death_message(process.pid, code))
        snapshot, since = self.progress
        now = time.monotonic()
        if self.table.snapshot() != snapshot:
            self.progress = (self.table.snapshot(), now)
        elif now - since > self.stall_seconds:
            raise WriterWorkerDied(self.stall_message(now - since))

    def death_message(self, pid: int, code: int) -> str:
        if code > 0:
            how = f"exited with code {code}" + (" (a Python exception: its traceback is printed above)"
                                                 if code == 1 else "")
        else:
            name = signal_name(-code)
            how = f"was killed by signal {name}" + (" (by a user, or by the system for lack of memory)"
                                                    if -code == signal.SIGKILL else "")
        return f"writing {self.what}: a writer worker (pid {pid}) {how} {self.last_item(pid)}; the other workers " \
               f"were stopped"

    def stall_message(self, seconds: float) -> str:
        items = [self.last_item(process.pid) for process in self.processes if process.exitcode is None]
        return f"writing {self.what}: no writer worker took a new item for {seconds:.0f} s ({'; '.join(items)}); " \
               f"they were stopped"

    def last_item(self, pid: int) -> str:
        position = self.table.position_of(pid)
        return "before it took an item" if position is None else f"while on {self.describe(position)}"

    def stop_workers(self) -> None:
        for process in self.processes:
            if process.exitcode is None:
                process.terminate()
        deadline = time.monotonic() + 5
        for process in self.processes:
            process.join(max(0.0, deadline - time.monotonic()))
            if process.exitcode is None:
                process.kill()
                process.join(5)

    def release_queues(self) -> None:
        """Items left in a queue keep its feeder thread blocked; without this, interpreter exit would join it."""
        for watched in self.queues:
            watched.cancel_join_thread()
            watched.close()

    def reap_workers(self) -> None:
        """After a complete write every worker has sent its last message and is exiting: wait for it."""
        for process in self.processes:
            process.join(10)
            if process.exitcode is None:
                process.terminate()
                process.join(5)


# prctl(2) option: the signal the kernel sends this process when its parent dies (Linux).
PR_SET_PDEATHSIG = 1
PARENT_POLL_SECONDS = 1.0


def die_with_parent(parent: int) -> None:
    """Make this (forked) worker die when `parent` does, however it ends (kill -9 included): otherwise the
    workers of a killed prepare keep running, each holding hundreds of MB, until their queue runs dry.
    Linux: the kernel sends SIGKILL (PR_SET_PDEATHSIG); elsewhere a thread watches the parent pid."""
    armed = False
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            armed = ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0) == 0
    if os.getppid() != parent:   # the parent died before the request took effect: no signal will come
        os._exit(1)
    if not armed:
        def watch() -> None:
            while os.getppid() == parent:
                time.sleep(PARENT_POLL_SECONDS)
            os._exit(1)
        threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def run_dying_with_parent(parent: int, target: Callable, *args) -> None:
    die_with_parent(parent)
    target(*args)


def signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return str(number)


# FFCV 1.0.2's DatasetWriter._write_common starts its workers with the name Process of ffcv.writer, makes
# its queues with the name Queue, and once the workers run waits in two places only: a loop that polls the
# done counter with sleep(0.1), then one allocations_queue.get() per worker. During a watched write these
# three names of ffcv.writer are replaced by a WorkerWatch's; this is all of FFCV's internals relied on.
WATCHED_NAMES = ("Process", "Queue", "sleep")


@contextlib.contextmanager
def watched_names(watch: WorkerWatch) -> Iterator[None]:
    import ffcv.writer
    missing = [name for name in WATCHED_NAMES if not hasattr(ffcv.writer, name)]
    if missing:
        raise RuntimeError(f"ffcv.writer has no {', '.join(missing)}: this FFCV is not the 1.0.x dihn_dist was "
                           f"written for (setup.cfg pins ffcv>=1.0.2,<1.1)")
    saved = {name: getattr(ffcv.writer, name) for name in WATCHED_NAMES}
    try:
        for name in WATCHED_NAMES:
            setattr(ffcv.writer, name, getattr(watch, name))
        yield
    finally:
        for name, value in saved.items():
            setattr(ffcv.writer, name, value)


def watched_write(writer, dataset, table: WorkerTable, describe: Callable[[int], str], what: str, *,
                  chunksize: int, stall_seconds: Optional[float] = None) -> None:
    """writer.from_indexed_dataset(dataset), raising WriterWorkerDied instead of waiting on a dead worker.

    `dataset.__getitem__` must call `table.record(position)`; `describe(position)` names an item;
    `stall_seconds` defaults to WORKER_STALL_SECONDS."""
    watch = WorkerWatch(table, describe, what, WORKER_STALL_SECONDS if stall_seconds is None else stall_seconds)
    try:
        with watched_names(watch):
            writer.from_indexed_dataset(dataset, chunksize=chunksize)
    except BaseException:
        watch.stop_workers()
        watch.release_queues()
        free_shared_memory(writer)
        sys.stderr.write("\n")   # FFCV's progress bar stays mid-line: let the error that follows start a line
        raise
    watch.reap_workers()


def free_shared_memory(writer) -> None:
    """The metadata block FFCV's writer allocates and frees only after a complete write."""
    from multiprocessing.shared_memory import SharedMemory
    block = getattr(writer, "metadata_sm", None)
    if isinstance(block, SharedMemory):
        block.close()
        with contextlib.suppress(FileNotFoundError):
            block.unlink()


# ----------------------------------------------------------------------------------------------------------
# Reading every stored item back


HEADER_TYPE = np.dtype([("mode", "u1"), ("height", "<u2"), ("width", "<u2")])   # the digested image metadata


@dataclass
class StoredImages:
    """Where each item's image lies in a .beton: FFCV's image metadata and the allocation holding its bytes."""
    headers: np.ndarray    # (N,) HEADER_TYPE: mode (0 JPEG, 1 raw), height, width
    pointers: np.ndarray   # (N,) int64 file offsets of the stored image bytes
    sizes: np.ndarray      # (N,) int64 their lengths


@dataclass
class StoredItems:
    digests: np.ndarray         # (N, 16) uint8, see ITEM_DIGEST_SCHEME
    image_digests: np.ndarray   # (N, 16) uint8, see IMAGE_DIGEST_SCHEME
    images: StoredImages

    @property
    def heights(self) -> np.ndarray:
        """(N,) stored image heights in pixels."""
        return self.images.headers["height"].astype(np.int64)

    @property
    def widths(self) -> np.ndarray:
        return self.images.headers["width"].astype(np.int64)


def read_back(path: Path, expected_labels: np.ndarray) -> StoredItems:
    """Every item of a .beton with fields image, labels, index, checked (index i at position i, the expected
    label rows) and digested. Raises RuntimeError if the file does not hold what was written."""
    from ffcv.reader import Reader
    reader = Reader(str(path))
    count, width = expected_labels.shape
    if int(reader.num_samples) != count:
        raise RuntimeError(f"{path}: holds {int(reader.num_samples)} items, {count} were written")
    fields = {name: reader.metadata[f"f{i}"] for i, name in enumerate(reader.field_names)}
    image, label_pointers, index = fields["image"], fields["labels"], fields["index"]
    if not np.array_equal(index, np.arange(count)):
        raise RuntimeError(f"{path}: item positions are not stored in order (FFCV writer)")
    headers = np.zeros(count, dtype=HEADER_TYPE)
    for key in ("mode", "height", "width"):
        headers[key] = image[key]
    images = StoredImages(headers, image["data_ptr"].astype(np.int64),
                          allocation_sizes(reader.alloc_table, image["data_ptr"], path))
    with open(path, "rb") as handle, mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
        stored = np.frombuffer(mapped, dtype=np.uint8)
        labels = stored[label_pointers.astype(np.int64)[:, None] + np.arange(width)]
        digests, image_digests = digest_items(stored, images, labels)
        del stored   # the memory map closes only once no array views it
    bad = np.flatnonzero((labels != expected_labels).any(axis=1))
    if len(bad):
        raise RuntimeError(f"{path}: item {bad[0]} holds labels {labels[bad[0]].tolist()}, "
                           f"{expected_labels[bad[0]].tolist()} were written")
    return StoredItems(digests, image_digests, images)


def allocation_sizes(alloc_table: np.ndarray, pointers: np.ndarray, path: Path) -> np.ndarray:
    """Size of the allocation starting at each pointer (FFCV's allocation table: sample_id, ptr, size)."""
    table = np.sort(alloc_table, order="ptr")
    at = np.minimum(np.searchsorted(table["ptr"], pointers), len(table) - 1)
    if len(table) == 0 or not np.array_equal(table["ptr"][at], pointers):
        raise RuntimeError(f"{path}: an image's data is missing from the allocation table (FFCV writer)")
    return table["size"][at].astype(np.int64)


def digest_items(stored: np.ndarray, images: StoredImages, labels: np.ndarray) -> tuple:
    """(item digests, image digests), each (N, 16) uint8: the image part is hashed once for both."""
    count = len(images.headers)
    digests = np.empty((count, DIGEST_BYTES), dtype=np.uint8)
    image_digests = np.empty((count, DIGEST_BYTES), dtype=np.uint8)
    stored_bytes = memoryview(stored)
    for i in range(count):
        start = images.pointers[i]
        image_digest = hashlib.blake2b(images.headers[i].tobytes(), digest_size=DIGEST_BYTES)
        image_digest.update(stored_bytes[start:start + images.sizes[i]])
        item_digest = image_digest.copy()
        item_digest.update(labels[i].tobytes())
        image_digests[i] = np.frombuffer(image_digest.digest(), dtype=np.uint8)
        digests[i] = np.frombuffer(item_digest.digest(), dtype=np.uint8)
    stored_bytes.release()
    return digests, image_digests


# ----------------------------------------------------------------------------------------------------------
# Copying stored images verbatim


@dataclass
class StoredImage:
    """One item's image as stored in a .beton: FFCV's metadata and the stored bytes (JPEG file or raw pixels)."""
    mode: int
    height: int
    width: int
    data: np.ndarray   # uint8


class StoredImageField(RGBImageField):
    """An RGBImageField whose encode also takes a StoredImage, written as it is: same metadata, same bytes,
    never decoded or re-encoded. Other images (HxWx3 uint8 arrays) are encoded as by RGBImageField."""

    def encode(self, destination, image, malloc):
        if not isinstance(image, StoredImage):
            return super().encode(destination, image, malloc)
        destination["mode"] = image.mode
        destination["height"] = image.height
        destination["width"] = image.width
        destination["data_ptr"], storage = malloc(len(image.data))
        storage[:] = image.data


def round_fields(fields: dict) -> dict:
    """The fields of a first preparation with the image field able to copy stored images."""
    image = fields["image"]
    return {**fields, "image": StoredImageField(write_mode=image.write_mode, max_resolution=image.max_resolution,
                                                jpeg_quality=image.jpeg_quality)}


# ----------------------------------------------------------------------------------------------------------
# One layout for the same items


class ItemsAsStored:
    """What the rewrite's one worker indexes: item i of a written .beton exactly as stored (its image as a
    StoredImage, its label row, i), read through a memory map the worker opens for itself."""

    def __init__(self, path: Path, images: StoredImages, labels: np.ndarray):
        self.path = path
        self.images = images
        self.labels = labels
        self.workers = WorkerTable(1)
        self.mapped = None
        self.mapped_by = None

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, position: int):
        self.workers.record(position)
        if self.mapped_by != os.getpid():
            self.mapped = np.memmap(self.path, dtype=np.uint8, mode="r")
            self.mapped_by = os.getpid()
        start, size = int(self.images.pointers[position]), int(self.images.sizes[position])
        header = self.images.headers[position]
        image = StoredImage(int(header["mode"]), int(header["height"]), int(header["width"]),
                            np.asarray(self.mapped[start:start + size]))
        return image, self.labels[position], position


def rewrite_in_item_order(path: Path, fields: dict, page_size: int) -> None:
    """Rewrite a .beton written by several workers as one worker writes it, so that its bytes depend on its
    items alone: re-preparing the same source with the same options gives the same file, whatever the
    number of workers and their timing.

    Why: FFCV's workers take chunks of items from a shared queue and claim file pages as they fill them, so
    which items share a page, the order of the pages and the order of the allocation table all follow the
    race between the workers (the item bytes themselves are the same). One worker takes the chunks in order
    and fills the pages in order. The rewrite copies every stored item as it is (StoredImageField: no
    decoding or encoding), into a temp file renamed over `path`: one sequential pass over the file, next to
    the encoding it follows (one extra file's worth of disk while it runs)."""
    from ffcv.reader import Reader
    from ffcv.writer import DatasetWriter
    reader = Reader(str(path))
    if int(reader.num_samples) == 0:
        return   # no pages: nothing whose order could differ
    stored = {name: reader.metadata[f"f{i}"] for i, name in enumerate(reader.field_names)}
    image = stored["image"]
    headers = np.zeros(len(image), dtype=HEADER_TYPE)
    for key in ("mode", "height", "width"):
        headers[key] = image[key]
    images = StoredImages(headers, image["data_ptr"].astype(np.int64),
                          allocation_sizes(reader.alloc_table, image["data_ptr"], path))
    width = int(np.prod(fields["labels"].shape))
    mapped = np.memmap(path, dtype=np.uint8, mode="r")
    labels = np.array(mapped[stored["labels"].astype(np.int64)[:, None] + np.arange(width)])
    del mapped
    items = ItemsAsStored(path, images, labels)
    temp = path.with_name(f".{path.name}.in-order")
    try:
        writer = DatasetWriter(str(temp), round_fields(fields), page_size=page_size, num_workers=1)
        watched_write(writer, items, items.workers, lambda position: f"{path.name} item {position} (rewritten in "
                      f"item order)", path.name, chunksize=1024)
        record_image_field_type(temp)
        os.replace(temp, path)
    finally:
        temp.unlink(missing_ok=True)


UNKNOWN_FIELD_TYPE = 255   # what FFCV's writer records for a field class it has no type id for


def record_image_field_type(path: Path) -> None:
    """Record the image field of a written .beton as an RGBImageField.

    FFCV's writer looks a field's type id up by its exact class, so a StoredImageField is recorded as 255
    (unknown), which readers refuse. Its items are exactly RGBImageField's (same metadata layout, same
    arguments: RGBImageField.to_binary is all zeros), so its type id is set to RGBImageField's and every
    reader decodes it with the ordinary RGB decoder."""
    from ffcv.types import TYPE_ID_HANDLER, FieldDescType, HeaderType
    rgb_type = next(type_id for type_id, handler in TYPE_ID_HANDLER.items() if handler is RGBImageField)
    header = np.fromfile(path, dtype=HeaderType, count=1)[0]
    descriptors = np.fromfile(path, dtype=FieldDescType, count=int(header["num_fields"]), offset=HeaderType.itemsize)
    names = [bytes(descriptor["name"]).rstrip(b"\0").decode("ascii") for descriptor in descriptors]
    position = names.index("image")
    if descriptors[position]["type_id"] != UNKNOWN_FIELD_TYPE:
        raise RuntimeError(f"{path}: the image field was recorded with type id {descriptors[position]['type_id']}, "
                           f"expected {UNKNOWN_FIELD_TYPE} (FFCV's writer changed)")
    descriptors[position]["type_id"] = rgb_type
    with open(path, "r+b") as handle:
        handle.seek(HeaderType.itemsize)
        handle.write(descriptors.tobytes())
        handle.flush()
        os.fsync(handle.fileno())
