"""FFCV loaders for training and encoding, and the per-rank batch schedule.

Distributed training does not use FFCV's `distributed=True`: the trainer draws one subset order per epoch
(the same on every rank), `batch_schedule` gives each rank its share of every global batch, and each rank's
`TrainLoader` loads exactly that share in that order. FFCV stays on the CPU; uint8 images travel to the
device and are normalised there.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

import numba
import numpy as np
import torch
from torch import Tensor

from .prepared import IMAGENET_MEAN, IMAGENET_STD, JPEG_EVAL_CROP, PreparedData

# ----------------------------------------------------------------------------------------------------------
# Sharding one epoch's subset across ranks


def global_batch_bounds(num_items: int, global_size: int, world_size: int) -> List[Tuple[int, int]]:
    """Consecutive global batches of `global_size`; a final partial batch smaller than
    max(world_size, ceil(global_size / 2)) is merged into the previous one."""
    bounds = [(start, min(start + global_size, num_items)) for start in range(0, num_items, global_size)]
    if len(bounds) > 1:
        last_start, last_end = bounds[-1]
        if last_end - last_start < max(world_size, math.ceil(global_size / 2)):
            bounds[-2:] = [(bounds[-2][0], last_end)]
    return bounds


def batch_schedule(subset_order: np.ndarray, global_batch: int, world_size: int,
                   rank: int) -> Tuple[np.ndarray, List[int]]:
    """This rank's share of one epoch: (database positions in load order, size of each of its steps).

    A global step holds `global_batch` consecutive items of `subset_order`, split across ranks with
    np.array_split (shares differ by at most one item). A final partial global batch smaller than
    max(world_size, ceil(global_batch / 2)) is merged into the previous global batch, so no rank ever has an
    empty step and no item is dropped; a larger one is a step of its own. Every rank has the same number of
    steps, shares are disjoint and together cover `subset_order` exactly, and the global steps are the same
    for every world size: 1 process and N processes see the same items in the same order at every step.
    """
    order = np.asarray(subset_order)
    if order.ndim != 1:
        raise ValueError(f"subset_order: expected a 1-D array of database positions, got shape {order.shape}")
    if global_batch < world_size or world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"batch_schedule: need global_batch >= world_size >= 1 and 0 <= rank < world_size, "
                         f"got global_batch={global_batch}, world_size={world_size}, rank={rank}")
    if len(order) < world_size:
        raise ValueError(f"the subset has {len(order)} items, fewer than the {world_size} ranks: every rank needs "
                         f"at least one item per step (sample more items)")
    shares = [np.array_split(order[start:end], world_size)[rank]
              for start, end in global_batch_bounds(len(order), global_batch, world_size)]
    return np.concatenate(shares), [len(share) for share in shares]


# ----------------------------------------------------------------------------------------------------------
# FFCV pipelines


def pipelines(resolution: int, crop_ratio: float) -> Dict[str, list]:
    """uint8 images (b, 3, R, R) (a channels-last view), uint8 labels (b, L), int64 positions (b, 1), on the CPU.

    The pipelines never touch CUDA: FFCV's loader thread would create a context on GPU 0 in every process
    (`cpu_only_epoch_iterator`) and reuse its buffers before a non-blocking copy had finished. `convert_batch`
    copies the images out of FFCV's buffer and sends them to the device, one copy per batch, the labels and
    positions stay on the host. No random decoding either: FFCV's random
    decoders draw from unseeded generators, so augmentation runs on the device (`dihn_dist.models.augment`)."""
    from ffcv.fields.basics import IntDecoder
    from ffcv.fields.ndarray import NDArrayDecoder
    from ffcv.fields.rgb_image import CenterCropRGBImageDecoder
    from ffcv.transforms import ToTensor, ToTorchImage
    return {"image": [CenterCropRGBImageDecoder((resolution, resolution), ratio=crop_ratio), ToTensor(),
                      ToTorchImage()],
            "labels": [NDArrayDecoder(), ToTensor()],
            "index": [IntDecoder(), ToTensor()]}


def cpu_only_epoch_iterator() -> None:
    """Keep FFCV's loader thread off CUDA. With CUDA present, FFCV 1.0.2's epoch iterator runs every batch's
    pipeline inside `torch.cuda.stream(...)` in its own thread, whose current device is 0 whatever the
    process chose: every rank >= 1 then creates a context on GPU 0 (and under EXCLUSIVE_PROCESS compute mode
    the loader thread dies while the main thread waits for its batch forever). Our pipelines end on the CPU
    (`pipelines`), so its streams and events guard nothing: the module flag that enables them is read at
    every use, and switched off here before any loader iterates. (FFCV's only other CUDA call, pinning its
    buffers, runs in the main thread, on this process's own device.)"""
    from ffcv.loader import epoch_iterator
    epoch_iterator.IS_CUDA = False


def build_loader(beton: Path, *, batch_size: int, num_workers: int, indices: np.ndarray, pipeline_spec,
                 seed: int):
    from ffcv.loader import Loader, OrderOption
    cpu_only_epoch_iterator()
    if num_workers < 1:
        raise ValueError(f"num_workers: expected >= 1 (FFCV's -1 would use every CPU of the host), got {num_workers}")
    return Loader(str(beton), batch_size=batch_size, num_workers=num_workers, order=OrderOption.SEQUENTIAL,
                  indices=indices, pipelines=pipeline_spec, drop_last=False, seed=seed, os_cache=True,
                  distributed=False)


@numba.njit(parallel=True, nogil=True, cache=True, fastmath=True)
def normalise_into(images, mean, inverse_std, out):   # pragma: no cover (compiled)
    """uint8 (b, H, W, 3) -> float32 (b, 3, H, W) in one pass: (pixel - mean) * inverse_std. Cached on disk by
    numba, so only the first run on a machine compiles."""
    b, h, w, _ = images.shape
    for i in numba.prange(b):
        for y in range(h):
            for x in range(w):
                for k in range(3):
                    out[i, k, y, x] = (np.float32(images[i, y, x, k]) - mean[k]) * inverse_std[k]


class Normaliser:
    """uint8 (b, 3, R, R) on the CPU -> float32 ImageNet-normalised on `device`, a fresh contiguous tensor.

    On CPU one numba pass (`normalise_into`, `num_threads` threads) replaces the 3-4 passes of torch ops,
    which cost more than FFCV's whole decode at 224 px; on CUDA the uint8 batch is copied over (4x fewer
    bytes than float32) and normalised there: staged in a fresh pinned buffer (FFCV refills its own buffer
    as soon as the next batch is asked for), then copied without blocking the host. The pinned buffer goes
    back to torch's caching host allocator, which reuses it only once the copy has completed (the copy
    records an event on it), so the host never waits for the device here."""

    def __init__(self, device: torch.device, num_threads: int = 1):
        self.device = torch.device(device)
        self.num_threads = num_threads
        mean = torch.tensor(IMAGENET_MEAN).mul(255)
        inverse_std = torch.tensor(IMAGENET_STD).mul(255).reciprocal()
        self.mean_np, self.inverse_std_np = mean.numpy(), inverse_std.numpy()
        self.mean = mean.view(1, 3, 1, 1).to(self.device)
        self.inverse_std = inverse_std.view(1, 3, 1, 1).to(self.device)

    def __call__(self, images: Tensor) -> Tensor:
        if self.device.type == "cpu":
            return self.normalise_on_cpu(images)
        on_device = self.to_device(images)
        out = torch.empty(images.shape, dtype=torch.float32, device=self.device)
        out.copy_(on_device)
        return out.sub_(self.mean).mul_(self.inverse_std)

    def to_device(self, images: Tensor) -> Tensor:
        """The batch on the (CUDA) device: one host-to-device copy that the host does not wait for."""
        staged = torch.empty(images.shape, dtype=images.dtype, pin_memory=True)
        staged.copy_(images)
        return staged.to(self.device, non_blocking=True)

    def normalise_on_cpu(self, images: Tensor) -> Tensor:
        pixels = np.ascontiguousarray(images.permute(0, 2, 3, 1).numpy())   # FFCV's layout: (b, H, W, 3)
        out = torch.empty(images.shape, dtype=torch.float32)
        previous = numba.get_num_threads()
        numba.set_num_threads(min(self.num_threads, numba.config.NUMBA_NUM_THREADS))
        try:
            normalise_into(pixels, self.mean_np, self.inverse_std_np, out.numpy())
        finally:
            numba.set_num_threads(previous)
        return out


def convert_batch(batch, normalise: Normaliser) -> Tuple[Tensor, Tensor, Tensor]:
    """FFCV's (reused) host buffers -> fresh tensors the caller may keep: the normalised images on the device,
    the labels (float32) and database/part positions (int64) on the host. Nothing on the device reads the
    labels or positions (the trainer knows each step's positions from its schedule), so only the images
    cross to the device."""
    images, labels, index = batch
    return (normalise(images), labels.to(torch.float32, copy=True), index.reshape(-1).to(torch.int64, copy=True))


def eval_crop_ratio(data: PreparedData) -> float:
    """Small raw images (Fashion-MNIST, CIFAR) are only resized (cropping 28-32 px images loses content);
    JPEGs stored at max side 256 get the usual resize + centre crop (224/256 of the shorter side)."""
    return 1.0 if data.image_storage == "raw" else JPEG_EVAL_CROP


def check_resolution(resolution: int) -> None:
    if resolution < 1:
        raise ValueError(f"resolution: expected a positive number of pixels, got {resolution}")


# ----------------------------------------------------------------------------------------------------------
# Training loader: one FFCV Loader per stage, its order swapped in place each epoch


def checked_order(positions, step_sizes: Sequence[int], length: int, num_rows: int) -> np.ndarray:
    """An epoch's order for a loader built for `length` positions of a table of `num_rows` rows: the
    positions as an array, or the error naming what is wrong."""
    positions = np.asarray(positions)
    if positions.shape != (length,):
        raise ValueError(f"set_order: expected {length} positions (the length this loader was built for), "
                         f"got shape {positions.shape}")
    if sum(step_sizes) != length or min(step_sizes, default=0) < 1:
        raise ValueError(f"set_order: step sizes must be positive and sum to {length}, "
                         f"got {len(step_sizes)} steps summing to {sum(step_sizes)}")
    if positions.min() < 0 or positions.max() >= num_rows:
        raise ValueError(f"set_order: positions must lie in 0..{num_rows - 1}")
    return positions


class TrainLoader:
    """Loads given database positions in a given order, in batches of given sizes.

    One FFCV Loader (SEQUENTIAL order: FFCV 1.0.2 yields `indices` exactly in the order given) is compiled
    once; `set_order` swaps `loader.indices` and `loader.traversal_order.indices` in place (same length and
    dtype every epoch), so a new subset costs no recompilation. FFCV batches of `batch_size` are regrouped
    into the requested step sizes (a merged final step concatenates two of them).
    """

    def __init__(self, data: PreparedData, *, batch_size: int, resolution: int, device: torch.device,
                 num_workers: int, length: int):
        if batch_size < 1:
            raise ValueError(f"batch_size: expected >= 1, got {batch_size}")
        if not 1 <= length <= data.num_database:
            raise ValueError(f"length: expected 1..{data.num_database} (database size) positions per epoch, "
                             f"got {length}")
        check_resolution(resolution)
        self.data = data
        self.length = length
        self.device = torch.device(device)
        self.normalise = Normaliser(self.device, num_threads=num_workers)
        initial = np.arange(length, dtype=np.uint64)
        self.loader = build_loader(data.beton("database"), batch_size=batch_size, num_workers=num_workers,
                                   indices=initial, seed=0, pipeline_spec=pipelines(resolution, 1.0))
        self.step_sizes: Optional[List[int]] = None

    def set_order(self, positions: np.ndarray, step_sizes: Sequence[int]) -> None:
        indices = checked_order(positions, step_sizes, self.length, self.data.num_database).astype(np.uint64)
        self.loader.indices = indices
        self.loader.traversal_order.indices = indices
        self.step_sizes = list(step_sizes)

    def __len__(self) -> int:
        if self.step_sizes is None:
            raise RuntimeError("TrainLoader: call set_order() before iterating")
        return len(self.step_sizes)

    def __iter__(self) -> Iterator[Tuple[Tensor, Tensor, Tensor]]:
        if self.step_sizes is None:
            raise RuntimeError("TrainLoader: call set_order() before iterating")
        batches = (convert_batch(batch, self.normalise) for batch in self.loader)
        return regroup(batches, self.step_sizes)


class FeatureRows:
    """TrainLoader's stand-in when the trunk is frozen (--freeze-backbone): the same set_order / iteration
    contract, serving rows of a feature table that is already on the device, indexed by database position,
    instead of decoding images. Yields (features, None, positions) per step."""

    def __init__(self, table: Tensor, *, length: int):
        if not 1 <= length <= table.shape[0]:
            raise ValueError(f"length: expected 1..{table.shape[0]} (rows of the feature table) positions per "
                             f"epoch, got {length}")
        self.table, self.length = table, length
        self.positions: Optional[Tensor] = None
        self.step_sizes: Optional[List[int]] = None

    def set_order(self, positions: np.ndarray, step_sizes: Sequence[int]) -> None:
        positions = checked_order(positions, step_sizes, self.length, self.table.shape[0])
        self.positions = torch.from_numpy(positions.astype(np.int64)).to(self.table.device)
        self.step_sizes = list(step_sizes)

    def __len__(self) -> int:
        if self.step_sizes is None:
            raise RuntimeError("FeatureRows: call set_order() before iterating")
        return len(self.step_sizes)

    def __iter__(self) -> Iterator[Tuple[Tensor, None, Tensor]]:
        if self.step_sizes is None:
            raise RuntimeError("FeatureRows: call set_order() before iterating")
        start = 0
        for size in self.step_sizes:
            rows = self.positions[start:start + size]
            start += size
            yield self.table[rows], None, rows


def regroup(batches: Iterable[Tuple[Tensor, ...]], step_sizes: Sequence[int]) -> Iterator[Tuple[Tensor, ...]]:
    """Re-cut a stream of batches (of fresh tensors) into batches of exactly `step_sizes` items, in order."""
    source = iter(batches)
    held: List[Tuple[Tensor, ...]] = []
    held_count = 0
    for size in step_sizes:
        while held_count < size:
            batch = next(source, None)
            if batch is None:
                raise RuntimeError(f"the loader ran out of items: a step of {size} needs more than the "
                                   f"{held_count} left")
            held.append(batch)
            held_count += len(batch[0])
        if len(held) == 1 and held_count == size:
            step = held.pop()
        else:
            step, rest = take_items(held, size)
            held = [rest] if rest is not None else []
        held_count -= size
        yield step
    if held_count or next(source, None) is not None:
        raise RuntimeError("the loader yielded more items than the step sizes account for")


def take_items(held: List[Tuple[Tensor, ...]], size: int):
    """The first `size` items of the concatenated held batches, and the remainder (or None)."""
    joined = tuple(torch.cat(parts) for parts in zip(*held)) if len(held) > 1 else held[0]
    rest = tuple(t[size:] for t in joined) if len(joined[0]) > size else None
    return tuple(t[:size] for t in joined), rest


# ----------------------------------------------------------------------------------------------------------
# Evaluation: encode the query or database part, sequentially, without randomness


def eval_batches(data: PreparedData, part: str, *, batch_size: int, resolution: int, device, num_workers: int,
                 indices: Optional[np.ndarray] = None) -> Iterator[Tuple[Tensor, Tensor, Tensor]]:
    """(images, labels, row indices within `part`) for the given rows (default all), in order; images are
    resized (raw datasets) or resized and centre-cropped (JPEG datasets) to `resolution`, normalised, on
    `device`; labels and row indices stay on the host (`convert_batch`)."""
    beton = data.beton(part)
    rows = data.num_query if part == "query" else data.num_database
    check_resolution(resolution)
    indices = np.arange(rows) if indices is None else np.asarray(indices)
    if indices.ndim != 1 or (len(indices) and (indices.min() < 0 or indices.max() >= rows)):
        raise ValueError(f"indices: expected a 1-D array of rows in 0..{rows - 1} of the {part} part")
    device = torch.device(device)
    if len(indices) == 0:
        return iter(())
    normalise = Normaliser(device, num_threads=num_workers)
    loader = build_loader(beton, batch_size=batch_size, num_workers=num_workers, seed=0,
                          indices=indices.astype(np.uint64),
                          pipeline_spec=pipelines(resolution, eval_crop_ratio(data)))
    return (convert_batch(batch, normalise) for batch in loader)
