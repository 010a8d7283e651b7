"""Loader benchmark: FFCV TrainLoader vs the reference torchvision pipeline, same subset, same worker count.

One run, same machine: a `--subset`-item random subset of the database x `--epochs` epochs at `--resolution`
px, timing everything an outer iteration pays (set_order / building the torch DataLoader, every batch
delivered as normalised float tensors). The FFCV Loader is built (and compiled) once per stage, which is
reported separately. Also reports prepare throughput (Fashion-MNIST, full 61,000 images unless
--prepare-per-class).

    python tests/bench/bench_loader.py [--workers 0 2] [--subset 2000] [--epochs 3] [--resolution 224]
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, help="prepared folder to read (default: prepare Fashion-MNIST into a "
                        "temporary folder, which also measures prepare throughput)")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    parser.add_argument("--subset", type=int, default=2000)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--resolution", type=int, default=224)
    parser.add_argument("--prepare-per-class", type=int, default=None,
                        help="database items per class to prepare (default: all 60,000)")
    return parser.parse_args()


def prepare_fashion_mnist(out: Path, per_class, workers: int) -> float:
    command = [sys.executable, "-m", "dihn_dist.prepare", "--dataset", "fashion-mnist", "--out", str(out),
               "--num-workers", str(workers)]
    if per_class:
        command += ["--database-per-class", str(per_class)]
    start = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


class ReferenceImages(torch.utils.data.Dataset):
    """The reference pipeline: PIL image, RandomResizedCrop, flip, ToTensor, Normalize."""

    def __init__(self, pixels: np.ndarray, labels: np.ndarray, resolution: int):
        import torchvision.transforms as T
        self.pixels, self.labels = pixels, labels
        self.transform = T.Compose([T.RandomResizedCrop(resolution), T.RandomHorizontalFlip(), T.ToTensor(),
                                    T.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])])

    def __len__(self):
        return len(self.pixels)

    def __getitem__(self, index):
        from PIL import Image
        image = Image.fromarray(self.pixels[index]).convert("RGB")
        return self.transform(image), torch.from_numpy(self.labels[index]).float(), index


def source_pixels(data) -> np.ndarray:
    """The database images in database order, straight from the source files (what the reference reads)."""
    from dihn_dist.data.sources import open_dataset
    source = open_dataset(data.dataset, None)
    rows = np.load(data.root / "database_source_index.npy")
    return source.database.images.pixels[rows]


def time_reference(pixels, labels, subset, args, workers: int) -> float:
    dataset = ReferenceImages(pixels, labels, args.resolution)
    start = time.perf_counter()
    for _ in range(args.epochs):
        loader = torch.utils.data.DataLoader(torch.utils.data.Subset(dataset, subset.tolist()),
                                             batch_size=args.batch_size, shuffle=True, num_workers=workers)
        for images, batch_labels, index in loader:
            pass
    return time.perf_counter() - start


def ffcv_augmenting_loader(data, args, threads: int, subset):
    """FFCV's own random-resized-crop decoder (unseeded numba generators): what the trainer would run if it
    augmented inside the loader. Same normalisation as the trainer's path."""
    from ffcv.fields.basics import IntDecoder
    from ffcv.fields.ndarray import NDArrayDecoder
    from ffcv.fields.rgb_image import RandomResizedCropRGBImageDecoder
    from ffcv.transforms import ToTensor, ToTorchImage

    from dihn_dist.data.loader import Normaliser, build_loader, convert_batch
    from dihn_dist.models.augment import CROP_RATIO, CROP_SCALE
    decoder = RandomResizedCropRGBImageDecoder((args.resolution, args.resolution), scale=CROP_SCALE, ratio=CROP_RATIO)
    spec = {"image": [decoder, ToTensor(), ToTorchImage()], "labels": [NDArrayDecoder(), ToTensor()],
            "index": [IntDecoder(), ToTensor()]}
    loader = build_loader(data.beton("database"), batch_size=args.batch_size, num_workers=threads,
                          indices=np.sort(subset).astype(np.uint64), pipeline_spec=spec, seed=0)
    normalise = Normaliser(torch.device("cpu"), num_threads=threads)
    return loader, lambda: (convert_batch(batch, normalise) for batch in loader)


def time_ffcv(data, subset, args, workers: int, trainer_path: bool):
    """trainer_path: what dihn_dist.train runs (loader without augmentation, then the seeded crop + flip of
    dihn_dist.models.augment on the device); otherwise FFCV's own random-resized-crop decoder."""
    from dihn_dist.data.loader import TrainLoader, batch_schedule
    from dihn_dist.models import augment
    threads = max(workers, 1)   # FFCV's workers are numba threads; 0 torch workers = 1 thread doing the work
    start = time.perf_counter()
    if trainer_path:
        loader = TrainLoader(data, batch_size=args.batch_size, resolution=args.resolution,
                             device=torch.device("cpu"), num_workers=threads, length=len(subset))
        batches = lambda: loader  # noqa: E731
    else:
        loader, batches = ffcv_augmenting_loader(data, args, threads, subset)
    generator = torch.Generator().manual_seed(0)
    rng = np.random.default_rng(1)

    def reorder():
        order = rng.permutation(subset)
        if trainer_path:
            loader.set_order(*batch_schedule(order, args.batch_size, 1, 0))
        else:
            loader.indices = loader.traversal_order.indices = order.astype(np.uint64)

    reorder()
    for _ in batches():   # first epoch compiles the numba pipeline
        pass
    build = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(args.epochs):
        reorder()
        params = augment.draw_params(generator, data.num_database, "crop-flip")
        for images, labels, index in batches():
            if trainer_path:
                augment.apply(images, params[index])
    return time.perf_counter() - start, build


def main():
    args = parse_args()
    from dihn_dist.data.prepared import load_prepared
    with tempfile.TemporaryDirectory() as scratch:
        data_dir = args.data
        if data_dir is None:
            data_dir = Path(scratch) / "fashion-mnist"
            workers = max(args.workers)
            seconds = prepare_fashion_mnist(data_dir, args.prepare_per_class, max(workers, 1))
            data = load_prepared(data_dir)
            total = data.num_database + data.num_query
            print(f"prepare fashion-mnist: {total:,} images in {seconds:.1f} s = {total / seconds:,.0f} images/s "
                  f"(incl. start-up and imports; {max(workers, 1)} worker(s))")
        data = load_prepared(data_dir)
        subset = np.random.default_rng(0).choice(data.num_database, size=args.subset, replace=False)
        pixels, labels = source_pixels(data), data.database_labels
        images = args.subset * args.epochs
        print(f"loader: {args.subset} items x {args.epochs} epochs at {args.resolution} px, batch {args.batch_size}; "
              f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
        print("trainer path = FFCV loader + seeded crop/flip on the device (what dihn_dist.train runs); "
              "ffcv-aug = FFCV's own unseeded crop/flip decoder")
        print(f"{'workers':>8} {'reference img/s':>16} {'trainer path img/s':>19} {'ratio':>6} "
              f"{'ffcv-aug img/s':>15} {'ratio':>6} {'build+compile s':>16}")
        for workers in args.workers:
            torch.set_num_threads(max(workers, 1))   # same CPU share for both paths: 0 workers = 1 thread
            reference = time_reference(pixels, labels, subset, args, workers)
            trainer_seconds, build = time_ffcv(data, subset, args, workers, trainer_path=True)
            ffcv_seconds, _ = time_ffcv(data, subset, args, workers, trainer_path=False)
            print(f"{workers:>8} {images / reference:>16,.0f} {images / trainer_seconds:>19,.0f} "
                  f"{reference / trainer_seconds:>6.2f} {images / ffcv_seconds:>15,.0f} "
                  f"{reference / ffcv_seconds:>6.2f} {build:>16.1f}", flush=True)


if __name__ == "__main__":
    main()
