"""A synthetic NUS-WIDE tc21 in the real file layout, at any size (the full protocol: 193,734 + 2,100).

    python tests/bench/nus_synth.py OUT [--database 193734] [--query-per-tag 100] [--workers 2] [--seed 0]

Writes what `dihn_dist.data.sources.load_nus_wide_tc21` reads: database_img.txt, database_label_onehot.txt,
test_img.txt, test_label_onehot.txt (paths relative to OUT, 21 space-separated 0/1 per line) and the JPEGs
under OUT/images/{database,query}/NNN/. `generated.json` is written last: it marks the folder complete
(a rerun with the same settings returns at once) and records the tag counts, the time and the bytes.

Tags. The 21 columns are named like NUS-WIDE's 21 most frequent concepts in that protocol's column order
(alphabetical), so tags 18-20, the incremental ones, are vehicle, water and window. Each image carries
1, 2 or 3 tags (probabilities TAGS_PER_IMAGE, mean 1.85), drawn without replacement with the weights
TAG_WEIGHTS: a handful of very frequent tags (sky, clouds, person, water, animal) and a long tail, a skew
like NUS-WIDE's (the weights are chosen to resemble it, they are not its published counts). At full size
(seed 0) the database has 1.85 tags per image (40% one, 35% two, 25% three), tag shares from sky 28.2%,
clouds 24.1%, person 21.4%, water 16.9%, animal 14.4% down to beach 3.2% and mountain 3.0%, 1,544 distinct
tag patterns, and 26.3% incremental rows (a tag in 18-20). The queries are 100 per tag (2,100): query
block t carries tag t plus 0-2 more tags drawn the same way, as NUS-WIDE's per-tag query draw does.

Content. Tag t is one (Fashion-MNIST class, tint) pair: 7 well separated classes x 3 tints = 21, so a
network must see both the garment's shape and its colour. An image is a 2 x 2 mosaic on a smooth noisy
background: one Fashion-MNIST item of each of its tags (database: training images, queries: test images,
so no query item repeats a database item) at a random cell, scale and brightness, and, in some empty cells,
a grey distractor from a class no tag uses (untagged content, as in real photos). Sizes 256 x 256,
256 x 192 or 192 x 256 (width x height), JPEG quality 90.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from multiprocessing import get_context
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np

FORMAT = "dihn_dist.bench.synthetic_nus_wide_tc21"
MARKER = "generated.json"
LIST_FILES = {"database": ("database_img.txt", "database_label_onehot.txt"),
              "query": ("test_img.txt", "test_label_onehot.txt")}
FULL_DATABASE = 193_734
FULL_QUERY_PER_TAG = 100

TAG_NAMES = ["animal", "beach", "buildings", "clouds", "flowers", "grass", "lake", "mountain", "ocean", "person",
             "plants", "reflection", "road", "rocks", "sky", "snow", "sunset", "tree", "vehicle", "water", "window"]
NUM_TAGS = len(TAG_NAMES)
# Relative tag weights, in the column order above: a few very frequent tags and a long tail, like NUS-WIDE's.
TAG_WEIGHTS = np.array([35, 7.5, 19, 62, 11, 20, 14, 7, 13, 54, 16, 10, 12, 9, 74, 8, 10, 7.8, 8.8, 42, 17],
                       dtype=np.float64)
TAGS_PER_IMAGE = {1: 0.40, 2: 0.35, 3: 0.25}

# Tag t = (TAG_CLASSES[t % 7], TINTS[t // 7]). Pullover, coat and shirt look alike and like T-shirts,
# so they are left out of the tags and serve as untagged distractors.
TAG_CLASSES = [0, 1, 3, 5, 7, 8, 9]          # T-shirt, trouser, dress, sandal, sneaker, bag, ankle boot
DISTRACTOR_CLASSES = [2, 4, 6]
TINTS = np.array([[255, 150, 40], [70, 215, 90], [80, 135, 255]], dtype=np.float32)   # RGB: orange, green, blue
SIZES = [(256, 256), (256, 192), (192, 256)]       # (width, height)
SIZE_WEIGHTS = [0.40, 0.45, 0.15]
DISTRACTOR_PROBABILITY = 0.3
JPEG_QUALITY = 90
FILES_PER_FOLDER = 1000
CHUNK = 250            # images per pool task: small enough to balance, large enough to amortise the call


def tag_content(tag: int) -> Tuple[int, int]:
    """(Fashion-MNIST class, tint index) that tag `tag` is drawn as."""
    return TAG_CLASSES[tag % len(TAG_CLASSES)], tag // len(TAG_CLASSES)


# ----------------------------------------------------------------------------------------------------------
# Labels


def draw_tag_counts(rng: np.random.Generator, rows: int) -> np.ndarray:
    counts, probabilities = zip(*TAGS_PER_IMAGE.items())
    return rng.choice(np.array(counts), size=rows, p=np.array(probabilities))


def draw_labels(rng: np.random.Generator, rows: int, forced: Optional[np.ndarray] = None) -> np.ndarray:
    """(rows x 21) uint8: each row 1-3 distinct tags, weighted sampling without replacement (Gumbel top-k);
    `forced[i]`, when given, is always among row i's tags."""
    keys = np.log(TAG_WEIGHTS)[None, :] + rng.gumbel(size=(rows, NUM_TAGS))
    if forced is not None:
        keys[np.arange(rows), forced] = np.inf
    rank = np.argsort(np.argsort(-keys, axis=1), axis=1)   # 0 = the first tag drawn
    return (rank < draw_tag_counts(rng, rows)[:, None]).astype(np.uint8)


def make_labels(seed: int, num_database: int, query_per_tag: int) -> Dict[str, np.ndarray]:
    rng = np.random.default_rng([seed, 0])
    forced = np.repeat(np.arange(NUM_TAGS), query_per_tag)
    return {"database": draw_labels(rng, num_database), "query": draw_labels(rng, len(forced), forced)}


# ----------------------------------------------------------------------------------------------------------
# Images (in the pool's worker processes)

_ITEMS: Dict[str, Dict[int, np.ndarray]] = {}   # part -> class -> (N, 28, 28) uint8, set before the pool forks


def fashion_items() -> Dict[str, Dict[int, np.ndarray]]:
    """Fashion-MNIST images by class: training images for the database, test images for the queries."""
    from dihn_dist.data.sources import load_fashion_mnist
    source = load_fashion_mnist()
    items = {}
    for part, images, labels in (("database", source.database.images.pixels, source.database.labels),
                                 ("query", source.query.images.pixels, source.query.labels)):
        classes = labels.argmax(axis=1)
        items[part] = {c: images[classes == c] for c in TAG_CLASSES + DISTRACTOR_CLASSES}
    return items


_GRAIN: List[np.ndarray] = []   # one fixed field of grain per process, cropped at random offsets


def grain_bank() -> np.ndarray:
    """1,024 px of 2 x 2 px grain in [-6, 6] (drawing fresh grain per image would double the render time)."""
    if not _GRAIN:
        import cv2
        coarse = np.random.default_rng(12345).uniform(-6, 6, size=(512, 512, 3)).astype(np.float32)
        _GRAIN.append(cv2.resize(coarse, (1024, 1024), interpolation=cv2.INTER_NEAREST))
    return _GRAIN[0]


def background(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    """A smooth random colour field with mild grain (float32 H x W x 3): gives the JPEGs a realistic size."""
    import cv2
    coarse = rng.uniform(15, 110, size=(3, 3, 3)).astype(np.float32)
    field = cv2.resize(coarse, (width, height), interpolation=cv2.INTER_LINEAR)   # no overshoot: stays dark
    bank = grain_bank()
    y, x = (int(v) for v in rng.integers(0, bank.shape[0] - max(width, height), size=2))
    field += bank[y:y + height, x:x + width]
    return field


def paste_item(canvas: np.ndarray, item: np.ndarray, colour: np.ndarray, cell: Tuple[int, int, int, int],
               rng: np.random.Generator) -> None:
    """Draw a 28 px item, upscaled to 75-100% of its cell, in `colour` at a random place inside the cell."""
    import cv2
    x0, y0, cell_w, cell_h = cell
    side = int(min(cell_w, cell_h) * rng.uniform(0.75, 1.0))
    alpha = cv2.resize(item, (side, side), interpolation=cv2.INTER_LINEAR).astype(np.float32)[:, :, None] / 255
    x = x0 + int(rng.integers(0, cell_w - side + 1))
    y = y0 + int(rng.integers(0, cell_h - side + 1))
    region = canvas[y:y + side, x:x + side]
    region += alpha * (colour * rng.uniform(0.75, 1.0) - region)


def render(rng: np.random.Generator, tags: np.ndarray, items: Dict[int, np.ndarray]) -> np.ndarray:
    """The RGB uint8 image of one row of tags."""
    width, height = SIZES[rng.choice(len(SIZES), p=SIZE_WEIGHTS)]
    canvas = background(rng, width, height)
    cells = [(x, y, width // 2, height // 2) for y in (0, height // 2) for x in (0, width // 2)]
    order = rng.permutation(len(cells))
    for tag, cell in zip(np.flatnonzero(tags), order):
        class_index, tint = tag_content(int(tag))
        pool = items[class_index]
        paste_item(canvas, pool[rng.integers(len(pool))], TINTS[tint], cells[cell], rng)
    for cell in order[int(tags.sum()):]:
        if rng.random() < DISTRACTOR_PROBABILITY:
            pool = items[DISTRACTOR_CLASSES[rng.integers(len(DISTRACTOR_CLASSES))]]
            paste_item(canvas, pool[rng.integers(len(pool))], np.full(3, rng.uniform(120, 230), np.float32),
                       cells[cell], rng)
    return np.clip(canvas, 0, 255).astype(np.uint8)


def single_threaded_opencv() -> None:
    """The pool already has one process per core: OpenCV's own threads would only contend (about 1.5x slower)."""
    import cv2
    cv2.setNumThreads(1)


def relative_path(part: str, index: int) -> str:
    return f"images/{part}/{index // FILES_PER_FOLDER:03d}/{part[0]}{index:06d}.jpg"


def write_jpeg(path: Path, rgb: np.ndarray) -> int:
    """Encode and write atomically (temp name, then rename): an existing file is always a whole image."""
    import cv2
    ok, encoded = cv2.imencode(".jpg", rgb[:, :, ::-1], [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])
    if not ok:
        raise RuntimeError(f"JPEG encoding failed for {path}")
    temporary = path.with_suffix(".tmp")
    temporary.write_bytes(encoded.tobytes())
    os.replace(temporary, path)
    return len(encoded)


def write_chunk(task) -> Tuple[int, int]:
    """Render and write images [start, start + len(labels)) of a part; returns (images written, bytes).
    Each image has its own generator seeded by (seed, part, index), so a chunk can be redone alone and the
    images do not depend on the number of workers; images already on disk are kept (resumable)."""
    root, part, start, labels, seed = task
    part_id = 0 if part == "database" else 1
    written = size = 0
    for offset, tags in enumerate(labels):
        index = start + offset
        path = Path(root) / relative_path(part, index)
        if path.is_file():
            size += path.stat().st_size
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        rng = np.random.default_rng([seed, part_id, index])
        size += write_jpeg(path, render(rng, tags, _ITEMS[part]))
        written += 1
    return written, size


# ----------------------------------------------------------------------------------------------------------
# The folder


def settings(num_database: int, query_per_tag: int, seed: int) -> dict:
    return {"format": FORMAT, "num_database": num_database, "query_per_tag": query_per_tag, "seed": seed,
            "tag_weights": TAG_WEIGHTS.tolist(), "tags_per_image": {str(k): v for k, v in TAGS_PER_IMAGE.items()},
            "jpeg_quality": JPEG_QUALITY}


def read_marker(out: Path) -> Optional[dict]:
    path = out / MARKER
    return json.loads(path.read_text()) if path.is_file() else None


def write_lists(out: Path, labels: Dict[str, np.ndarray]) -> None:
    for part, (image_list, label_list) in LIST_FILES.items():
        rows = labels[part]
        (out / image_list).write_text("".join(relative_path(part, i) + "\n" for i in range(len(rows))))
        (out / label_list).write_text("".join(" ".join(map(str, row)) + "\n" for row in rows.tolist()))


def tag_summary(labels: np.ndarray) -> dict:
    counts = labels.sum(axis=0)
    per_image = labels.sum(axis=1)
    return {"rows": int(len(labels)), "per_tag": {name: int(c) for name, c in zip(TAG_NAMES, counts)},
            "tags_per_image": {str(k): int((per_image == k).sum()) for k in sorted(set(per_image.tolist()))},
            "mean_tags_per_image": float(per_image.mean()),
            "incremental_rows": int(labels[:, 18:].any(axis=1).sum()),
            "distinct_patterns": int(len(np.unique(labels, axis=0)))}


def render_all(out: Path, labels: Dict[str, np.ndarray], seed: int, workers: int, log) -> Tuple[int, int]:
    """Every image of both parts on a pool of `workers` processes; returns (images written, total bytes)."""
    global _ITEMS
    _ITEMS = fashion_items()   # the forked workers inherit it
    tasks = [(str(out), part, start, rows[start:start + CHUNK], seed)
             for part, rows in labels.items() for start in range(0, len(rows), CHUNK)]
    total = sum(len(rows) for rows in labels.values())
    written = size = done = 0
    started = time.perf_counter()
    next_report = started + 30
    with get_context("fork").Pool(workers, initializer=single_threaded_opencv) as pool:
        for chunk_written, chunk_size in pool.imap_unordered(write_chunk, tasks):
            written, size, done = written + chunk_written, size + chunk_size, done + 1
            if time.perf_counter() >= next_report:
                rate = written / (time.perf_counter() - started)
                log(f"generate: {done}/{len(tasks)} chunks, {written:,} of {total:,} images written, "
                    f"{rate:,.0f} images/s")
                next_report += 30
    return written, size


def generate(out: Path, num_database: int = FULL_DATABASE, query_per_tag: int = FULL_QUERY_PER_TAG,
             seed: int = 0, workers: int = 2, log=print) -> dict:
    """Write the dataset into `out` (or resume it) and return its marker; at once when already complete."""
    out = Path(out)
    wanted = settings(num_database, query_per_tag, seed)
    marker = read_marker(out)
    if marker is not None:
        if marker["settings"] != wanted:
            raise ValueError(f"{out} holds a synthetic dataset with other settings ({marker['settings']}); "
                             f"remove it or choose another folder")
        log(f"generate: {out} is complete ({marker['images']:,} images), skipped")
        return marker
    out.mkdir(parents=True, exist_ok=True)
    labels = make_labels(seed, num_database, query_per_tag)
    started = time.perf_counter()
    written, size = render_all(out, labels, seed, workers, log)
    write_lists(out, labels)
    elapsed = time.perf_counter() - started
    marker = {"settings": wanted, "images": sum(len(v) for v in labels.values()), "images_written": written,
              "jpeg_bytes": size, "seconds": elapsed, "workers": workers,
              "images_per_s": written / elapsed if written else None,
              "tags": {part: tag_summary(rows) for part, rows in labels.items()}, "tag_names": TAG_NAMES}
    temporary = out / (MARKER + ".tmp")
    temporary.write_text(json.dumps(marker, indent=1) + "\n")
    os.replace(temporary, out / MARKER)   # last: the folder is complete only now
    log(f"generate: {marker['images']:,} images ({written:,} written now) in {elapsed:.1f} s, "
        f"{size / 1e9:.2f} GB of JPEG")
    return marker


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--database", type=int, default=FULL_DATABASE)
    parser.add_argument("--query-per-tag", type=int, default=FULL_QUERY_PER_TAG)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    marker = generate(args.out, args.database, args.query_per_tag, args.seed, args.workers)
    print(json.dumps(marker["tags"], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
