"""Dataset adapters: read a dataset in its own on-disk layout into one uniform description.

Every adapter returns a `SourceDataset`: the class names, a query part and a database part (each an image
source, multi-hot uint8 labels and the rows of the source that form the part, in source order), the default
number of original ("seen") classes and the source files to checksum. The DIHN split itself (original items
first, then incremental ones; subsets per class) is made by `dihn_dist.prepare`, never here.

Pure data reading: nothing is written. Bad input raises ValueError / FileNotFoundError naming the file (and
the line, for text lists) and what was expected.
"""
from __future__ import annotations

import gzip
import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

DATASETS = ("fashion-mnist", "cifar-10", "nus-wide-tc21", "image-list")

FASHION_MNIST_ROOT = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_FILES = {
    "train_images": "train-images-idx3-ubyte.gz",
    "train_labels": "train-labels-idx1-ubyte.gz",
    "test_images": "t10k-images-idx3-ubyte.gz",
    "test_labels": "t10k-labels-idx1-ubyte.gz",
}
FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                         "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]

CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer",
                   "dog", "frog", "horse", "ship", "truck"]
CIFAR10_REFERENCE_FILES = {
    "query_images": "cifar10_1000_query_data.npy",
    "query_labels": "cifar10_1000_query_onehot_targets.npy",
    "database_images": "cifar10_59000_retrieval_data.npy",
    "database_labels": "cifar10_59000_retrieval_onehot_targets.npy",
}
CIFAR10_BATCH_FILES = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]

NUS_WIDE_FILES = {
    "database_images": "database_img.txt",
    "database_labels": "database_label_onehot.txt",
    "query_images": "test_img.txt",
    "query_labels": "test_label_onehot.txt",
}
NUS_WIDE_NUM_TAGS = 21

PROTOCOL_QUERY_PER_CLASS = 100   # Fashion-MNIST and CIFAR-10: 100 queries per class (1,000 in all)


class BadImageError(ValueError):
    """An image that cannot be read or decoded; the message names the file and where it was listed."""


# ----------------------------------------------------------------------------------------------------------
# Image sources: indexable, picklable (FFCV's writer forks workers that call load()).


@dataclass
class ArrayImages:
    """Images held in memory: (N, H, W) grey or (N, H, W, 3) RGB uint8; grey is served as 3 equal channels."""
    pixels: np.ndarray
    origin: str   # the file(s) they came from, for messages

    def __len__(self) -> int:
        return len(self.pixels)

    def load(self, index: int) -> np.ndarray:
        image = self.pixels[index]
        if image.ndim == 2:
            image = np.repeat(image[:, :, None], 3, axis=2)
        return np.ascontiguousarray(image)

    def describe(self, index: int) -> str:
        return f"image {index} of {self.origin}"

    @property
    def native_size(self) -> Tuple[int, int]:
        return int(self.pixels.shape[1]), int(self.pixels.shape[2])


@dataclass
class FileImages:
    """Image files named, one per line, in a list file; paths are relative to `root`."""
    root: Path
    paths: List[str]
    list_file: Path
    draft_side: Optional[int] = None   # let the JPEG decoder skip detail beyond this side (fast downscale)

    def __len__(self) -> int:
        return len(self.paths)

    def path(self, index: int) -> Path:
        return self.root / self.paths[index]

    def describe(self, index: int) -> str:
        return f"{self.path(index)} (listed in {self.list_file} line {index + 1})"

    def load(self, index: int) -> np.ndarray:
        from PIL import Image

        try:
            with Image.open(self.path(index)) as image:
                if self.draft_side is not None:
                    image.draft("RGB", (self.draft_side, self.draft_side))
                return np.asarray(image.convert("RGB"))
        except Exception as error:  # PIL raises many types (OSError, SyntaxError, DecompressionBombError...)
            raise BadImageError(f"cannot read image {self.describe(index)}: {error}") from error


ImageSource = Union[ArrayImages, FileImages]


@dataclass
class SourcePart:
    """One part (query or database) of a dataset: `rows` index `images` and `labels`, in source order."""
    images: ImageSource
    labels: np.ndarray        # (N_source, L) uint8 multi-hot, one row per image of `images`
    rows: np.ndarray          # int64 indices into images/labels that form this part
    origin: str               # where the labels came from, for messages

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def part_labels(self) -> np.ndarray:
        return self.labels[self.rows]


@dataclass
class SourceDataset:
    name: str
    class_names: List[str]
    query: SourcePart
    database: SourcePart
    default_num_seen: Optional[int]
    storage: str                       # "raw" (small images stored as pixels) or "jpeg"
    source_files: List[Path]           # checksummed into the manifest
    protocol: Dict[str, str] = field(default_factory=dict)   # how query/database were formed, in words

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


# ----------------------------------------------------------------------------------------------------------
# Shared checks


def require_file(path: Path, what: str) -> Path:
    if not path.is_file():
        raise FileNotFoundError(f"{what}: expected the file {path}, which does not exist")
    return path


def single_labels_to_multi_hot(labels: np.ndarray, num_classes: int, origin: str) -> np.ndarray:
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"{origin}: class labels must lie in 0..{num_classes - 1}, "
                         f"found {int(labels.min())}..{int(labels.max())}")
    multi_hot = np.zeros((len(labels), num_classes), dtype=np.uint8)
    multi_hot[np.arange(len(labels)), labels.astype(np.int64)] = 1
    return multi_hot


def check_multi_hot(labels: np.ndarray, origin: str) -> np.ndarray:
    """0/1 values, at least one label per row; returns uint8."""
    if labels.ndim != 2:
        raise ValueError(f"{origin}: expected a 2-D (items x classes) label array, got shape {labels.shape}")
    bad = np.argwhere((labels != 0) & (labels != 1))
    if len(bad):
        row, column = bad[0]
        raise ValueError(f"{origin}: labels must be 0/1, row {row} column {column} holds {labels[row, column]}")
    empty = np.flatnonzero(labels.sum(axis=1) == 0)
    if len(empty):
        raise ValueError(f"{origin}: row {empty[0]} has no label (every item needs at least one 1); "
                         f"{len(empty)} such row(s)")
    return labels.astype(np.uint8)


def first_rows_per_class(labels: np.ndarray, per_class: int) -> np.ndarray:
    """Indices of the first `per_class` rows of each class (by first label), kept in source order."""
    first_label = labels.argmax(axis=1)
    keep = np.zeros(len(labels), dtype=bool)
    for label in np.unique(first_label):
        keep[np.flatnonzero(first_label == label)[:per_class]] = True
    return np.flatnonzero(keep)


# ----------------------------------------------------------------------------------------------------------
# Fashion-MNIST (IDX files, gzip), the embedded default


def read_idx(path: Path, expected_ndim: int) -> np.ndarray:
    """An IDX file of unsigned bytes (magic 0x08, ndim); clear errors for anything else."""
    require_file(path, "fashion-mnist")
    try:
        with gzip.open(path, "rb") as handle:
            data = handle.read()
    except (OSError, EOFError) as error:
        raise ValueError(f"{path}: not a readable gzip file ({error})") from error
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08 or data[3] != expected_ndim:
        raise ValueError(f"{path}: expected an IDX file of unsigned bytes with {expected_ndim} dimension(s) "
                         f"(magic 00 00 08 {expected_ndim:02x}), got {data[:4].hex(' ')}")
    header = 4 + 4 * expected_ndim
    dims = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(expected_ndim)]
    if len(data) != header + int(np.prod(dims)):
        raise ValueError(f"{path}: header says {dims} bytes of data, the file holds {len(data) - header}")
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(dims)


def load_fashion_mnist(root: Optional[Path] = None) -> SourceDataset:
    """Query = first 100 test images of each class (1,000); database = the 60,000 training images."""
    root = Path(root) if root is not None else FASHION_MNIST_ROOT
    if not root.is_dir():
        raise FileNotFoundError(f"fashion-mnist: the folder {root} does not exist (install the Debian package "
                                f"dataset-fashion-mnist, or pass --root with the four *-ubyte.gz files)")
    paths = {key: root / name for key, name in FASHION_MNIST_FILES.items()}
    arrays = {key: read_idx(path, 3 if key.endswith("images") else 1) for key, path in paths.items()}
    parts = {}
    for split in ("train", "test"):
        images, labels = arrays[f"{split}_images"], arrays[f"{split}_labels"]
        if len(images) != len(labels):
            raise ValueError(f"{paths[split + '_labels']}: {len(labels)} labels for {len(images)} images "
                             f"in {paths[split + '_images']}")
        multi_hot = single_labels_to_multi_hot(labels, len(FASHION_MNIST_CLASSES), str(paths[f"{split}_labels"]))
        parts[split] = (ArrayImages(images, str(paths[f"{split}_images"])), multi_hot)
    test_images, test_labels = parts["test"]
    train_images, train_labels = parts["train"]
    query_rows = protocol_query_rows(test_labels, str(paths["test_labels"]))
    return SourceDataset(
        name="fashion-mnist",
        class_names=list(FASHION_MNIST_CLASSES),
        query=SourcePart(test_images, test_labels, query_rows, str(paths["test_labels"])),
        database=SourcePart(train_images, train_labels, np.arange(len(train_images)), str(paths["train_labels"])),
        default_num_seen=7,
        storage="raw",
        source_files=list(paths.values()),
        protocol={"query": "first 100 test images of each class",
                  "database": "all training images"},
    )


def protocol_query_rows(labels: np.ndarray, origin: str) -> np.ndarray:
    rows = first_rows_per_class(labels, PROTOCOL_QUERY_PER_CLASS)
    counts = labels[rows].sum(axis=0)
    short = np.flatnonzero(counts < PROTOCOL_QUERY_PER_CLASS)
    if len(short):
        raise ValueError(f"{origin}: the protocol takes the first {PROTOCOL_QUERY_PER_CLASS} test images of each "
                         f"class, but class {short[0]} has only {int(counts[short[0]])}")
    return rows


# ----------------------------------------------------------------------------------------------------------
# CIFAR-10: the reference .npy layout or torchvision's cifar-10-batches-py


def load_cifar10(root: Path) -> SourceDataset:
    root = Path(root)
    if all((root / name).is_file() for name in CIFAR10_REFERENCE_FILES.values()):
        return load_cifar10_reference(root)
    for folder in (root, root / "cifar-10-batches-py"):
        if (folder / "data_batch_1").is_file() or (folder / "test_batch").is_file():
            return load_cifar10_batches(folder)
    raise FileNotFoundError(
        f"cifar-10: {root} holds neither the reference files ({', '.join(CIFAR10_REFERENCE_FILES.values())}) "
        f"nor torchvision's cifar-10-batches-py ({', '.join(CIFAR10_BATCH_FILES)}, batches.meta)")


def load_cifar10_reference(root: Path) -> SourceDataset:
    """The reference split as given: 1,000 queries, 59,000 database images (sorted by class)."""
    parts = {}
    for part in ("query", "database"):
        image_path = root / CIFAR10_REFERENCE_FILES[f"{part}_images"]
        label_path = root / CIFAR10_REFERENCE_FILES[f"{part}_labels"]
        images = load_npy(image_path)
        if images.ndim != 4 or images.shape[1:] != (32, 32, 3) or images.dtype != np.uint8:
            raise ValueError(f"{image_path}: expected uint8 images of shape (N, 32, 32, 3), "
                             f"got {images.dtype} {images.shape}")
        labels = load_npy(label_path)
        if labels.ndim != 2 or labels.shape[1] != len(CIFAR10_CLASSES):
            raise ValueError(f"{label_path}: expected one-hot labels of shape (N, 10), got {labels.shape}")
        if len(labels) != len(images):
            raise ValueError(f"{label_path}: {len(labels)} label rows for {len(images)} images in {image_path}")
        labels = check_multi_hot(labels, str(label_path))
        parts[part] = SourcePart(ArrayImages(images, str(image_path)), labels, np.arange(len(images)),
                                 str(label_path))
    return SourceDataset(
        name="cifar-10", class_names=list(CIFAR10_CLASSES), query=parts["query"], database=parts["database"],
        default_num_seen=7, storage="raw",
        source_files=[root / name for name in CIFAR10_REFERENCE_FILES.values()],
        protocol={"query": "reference cifar10_1000_query files", "database": "reference cifar10_59000_retrieval files"},
    )


def load_npy(path: Path) -> np.ndarray:
    require_file(path, "cifar-10")
    try:
        return np.load(path, allow_pickle=False)
    except (OSError, ValueError) as error:
        raise ValueError(f"{path}: not a readable .npy array ({error})") from error


def read_cifar_batch(path: Path) -> Tuple[np.ndarray, np.ndarray]:
    require_file(path, "cifar-10 (cifar-10-batches-py)")
    try:
        with open(path, "rb") as handle:
            batch = pickle.load(handle, encoding="bytes")
        data, labels = batch[b"data"], batch[b"labels"]
    except Exception as error:   # unpickling raises anything from EOFError to UnpicklingError
        raise ValueError(f"{path}: not a CIFAR-10 python batch (a pickled dict with b'data' and b'labels'): "
                         f"{error!r}") from error
    data = np.asarray(data, dtype=np.uint8)
    labels = np.asarray(labels, dtype=np.int64)
    if data.ndim != 2 or data.shape[1] != 3072 or len(data) != len(labels):
        raise ValueError(f"{path}: expected data of shape (N, 3072) and N labels, "
                         f"got data {data.shape} and {len(labels)} labels")
    return data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), labels


def load_cifar10_batches(folder: Path) -> SourceDataset:
    """60,000 images (data_batch_1..5 then test_batch); query = first 100 of each class in test_batch,
    database = the other 59,000 in that order."""
    batches = [read_cifar_batch(folder / name) for name in CIFAR10_BATCH_FILES]
    images = np.ascontiguousarray(np.concatenate([b[0] for b in batches]))
    class_labels = np.concatenate([b[1] for b in batches])
    origin = f"{folder}/{{data_batch_1..5,test_batch}}"
    labels = single_labels_to_multi_hot(class_labels, len(CIFAR10_CLASSES), origin)
    test_start = sum(len(b[0]) for b in batches[:-1])
    query_rows = test_start + protocol_query_rows(labels[test_start:], str(folder / "test_batch"))
    database_rows = np.setdiff1d(np.arange(len(images)), query_rows)
    class_names = read_cifar_class_names(folder / "batches.meta")
    source = ArrayImages(images, origin)
    return SourceDataset(
        name="cifar-10", class_names=class_names,
        query=SourcePart(source, labels, query_rows, origin),
        database=SourcePart(source, labels, database_rows, origin),
        default_num_seen=7, storage="raw",
        source_files=[folder / name for name in CIFAR10_BATCH_FILES]
        + ([folder / "batches.meta"] if (folder / "batches.meta").is_file() else []),
        protocol={"query": "first 100 images of each class in test_batch",
                  "database": "the other 59,000 images (data_batch_1..5, then the rest of test_batch)"},
    )


def read_cifar_class_names(meta: Path) -> List[str]:
    if not meta.is_file():
        return list(CIFAR10_CLASSES)
    try:
        with open(meta, "rb") as handle:
            names = [n.decode() for n in pickle.load(handle, encoding="bytes")[b"label_names"]]
    except Exception as error:
        raise ValueError(f"{meta}: not a CIFAR-10 batches.meta pickle with b'label_names': {error!r}") from error
    if len(names) != len(CIFAR10_CLASSES):
        raise ValueError(f"{meta}: expected 10 label names, got {len(names)}")
    return names


# ----------------------------------------------------------------------------------------------------------
# Text lists: NUS-WIDE tc21 (paths and labels in separate files) and image-list (path + labels per line)


def read_lines(path: Path, what: str) -> List[str]:
    """Lines of a text file; trailing blank lines are ignored, a blank line inside is an error."""
    require_file(path, what)
    try:
        lines = path.read_text().splitlines()
    except UnicodeDecodeError as error:
        raise ValueError(f"{path}: not a UTF-8 text file ({error})") from error
    while lines and not lines[-1].strip():
        lines.pop()
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            raise ValueError(f"{path} line {number}: empty line")
    if not lines:
        raise ValueError(f"{path}: the list is empty")
    return lines


BITS = {"0": 0, "1": 1}


def parse_label_tokens(tokens: Sequence[str], width: int, path: Path, number: int) -> List[int]:
    if len(tokens) != width:
        raise ValueError(f"{path} line {number}: expected {width} labels (0/1), got {len(tokens)}")
    try:
        row = [BITS[token] for token in tokens]
    except KeyError:
        bad = next(t for t in tokens if t not in BITS)
        raise ValueError(f"{path} line {number}: labels must be 0 or 1, got {bad!r}") from None
    if not any(row):
        raise ValueError(f"{path} line {number}: no label set (every item needs at least one 1)")
    return row


def read_label_file(path: Path, width: Optional[int], what: str) -> np.ndarray:
    lines = read_lines(path, what)
    width = width if width is not None else len(lines[0].split())
    rows = [parse_label_tokens(line.split(), width, path, number) for number, line in enumerate(lines, start=1)]
    return np.asarray(rows, dtype=np.uint8)


def read_path_file(path: Path, what: str) -> List[str]:
    paths = []
    for number, line in enumerate(read_lines(path, what), start=1):
        tokens = line.split()
        if len(tokens) != 1:
            raise ValueError(f"{path} line {number}: expected one image path, got {len(tokens)} fields "
                             f"({line.strip()!r}): paths in this list cannot contain spaces; rename the file "
                             f"(or link it under a name without spaces) and list that name")
        paths.append(tokens[0])
    return paths


def check_listed_files_exist(images: FileImages) -> None:
    for index in range(len(images)):
        if not images.path(index).is_file():
            raise FileNotFoundError(f"missing image {images.describe(index)}")


def load_nus_wide_tc21(root: Path, max_side: Optional[int] = None) -> SourceDataset:
    """The four list files under `root`; image paths in them are relative to `root`."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"nus-wide-tc21: --root {root} is not a folder")
    parts = {}
    for part in ("query", "database"):
        image_list = root / NUS_WIDE_FILES[f"{part}_images"]
        label_list = root / NUS_WIDE_FILES[f"{part}_labels"]
        paths = read_path_file(image_list, "nus-wide-tc21")
        labels = read_label_file(label_list, NUS_WIDE_NUM_TAGS, "nus-wide-tc21")
        if len(labels) != len(paths):
            raise ValueError(f"{label_list}: {len(labels)} label rows for {len(paths)} images in {image_list}")
        images = FileImages(root, paths, image_list, max_side)
        check_listed_files_exist(images)
        parts[part] = SourcePart(images, labels, np.arange(len(paths)), str(label_list))
    return SourceDataset(
        name="nus-wide-tc21", class_names=[f"tag{i:02d}" for i in range(NUS_WIDE_NUM_TAGS)],
        query=parts["query"], database=parts["database"], default_num_seen=18, storage="jpeg",
        source_files=[root / name for name in NUS_WIDE_FILES.values()],
        protocol={"query": "test_img.txt / test_label_onehot.txt", "database": "database_img.txt / database_label_onehot.txt"},
    )


SPACE_IN_PATH_FIX = ("separate the path from its labels with a tab ('path<TAB>0 1 0 ...'; the path is then "
                     "everything before the first tab and may contain spaces), or rename the file without spaces")


def split_list_line(line: str, path: Path, number: int) -> Tuple[str, List[str]]:
    """An image-list line as (image path, label tokens).

    Fields are separated by whitespace, so a space inside a path cannot be told from a separator; a line
    with a tab is read as `path<TAB>labels` instead, which can. Without a tab, a second field that is not a
    0/1 label can only be the rest of a path with a space in it: said so here rather than later as a wrong
    label count."""
    if "\t" in line:
        image_path, labels = line.split("\t", 1)
        if not image_path.strip():
            raise ValueError(f"{path} line {number}: no image path before the tab")
        return image_path.strip(), labels.split()
    tokens = line.split()
    words = 1
    while words < len(tokens) and tokens[words] not in BITS:
        words += 1
    if words > 1:
        raise ValueError(f"{path} line {number}: {len(tokens)} fields, more than a path and its 0/1 labels: the "
                         f"image path seems to contain a space ({' '.join(tokens[:words])!r}); {SPACE_IN_PATH_FIX}")
    return tokens[0], tokens[1:]


def read_image_list(list_file: Path, root: Path, max_side: Optional[int],
                    width: Optional[int]) -> Tuple[FileImages, np.ndarray]:
    """`relative/path.jpg 0 1 0 ...` per line (relative to `root`); `relative/my photo.jpg<TAB>0 1 0 ...`
    for a path with spaces (see split_list_line). `width`: the number of labels (None: line 1's)."""
    lines = read_lines(list_file, "image-list")
    split = [split_list_line(line, list_file, number) for number, line in enumerate(lines, start=1)]
    width = width if width is not None else len(split[0][1])
    if width < 1:
        raise ValueError(f"{list_file} line 1: expected 'path label label ...', got no labels")
    paths, rows = [], []
    for number, (image_path, tokens) in enumerate(split, start=1):
        if len(tokens) > width:
            raise ValueError(f"{list_file} line {number}: expected {width} labels (0/1) after the path, got "
                             f"{len(tokens)}: more fields than expected; if the path contains a space, "
                             f"{SPACE_IN_PATH_FIX}")
        paths.append(image_path)
        rows.append(parse_label_tokens(tokens, width, list_file, number))
    images = FileImages(root, paths, list_file, max_side)
    check_listed_files_exist(images)
    return images, np.asarray(rows, dtype=np.uint8)


def load_image_list(database_list: Path, query_list: Path, root: Optional[Path] = None,
                    max_side: Optional[int] = None) -> SourceDataset:
    database_list, query_list = Path(database_list), Path(query_list)
    database_root = Path(root) if root is not None else database_list.parent
    query_root = Path(root) if root is not None else query_list.parent
    database_images, database_labels = read_image_list(database_list, database_root, max_side, None)
    query_images, query_labels = read_image_list(query_list, query_root, max_side, database_labels.shape[1])
    num_classes = database_labels.shape[1]
    return SourceDataset(
        name="image-list", class_names=[f"class{i:02d}" for i in range(num_classes)],
        query=SourcePart(query_images, query_labels, np.arange(len(query_images)), str(query_list)),
        database=SourcePart(database_images, database_labels, np.arange(len(database_images)), str(database_list)),
        default_num_seen=None, storage="jpeg", source_files=[database_list, query_list],
        protocol={"query": f"every line of {query_list.name}", "database": f"every line of {database_list.name}"},
    )


def open_dataset(name: str, root: Optional[Path] = None, *, database_list: Optional[Path] = None,
                 query_list: Optional[Path] = None, max_side: Optional[int] = None) -> SourceDataset:
    """Dispatch on the dataset name (one of DATASETS)."""
    if name not in DATASETS:
        raise ValueError(f"--dataset: expected one of {', '.join(DATASETS)}, got {name!r}")
    lists_given = database_list is not None or query_list is not None
    if lists_given and name != "image-list":
        raise ValueError(f"--database-list/--query-list only apply to --dataset image-list, not {name}")
    if name == "fashion-mnist":
        return load_fashion_mnist(root)
    if root is None and name != "image-list":
        raise ValueError(f"--dataset {name} needs --root (the folder holding its files)")
    if name == "cifar-10":
        return load_cifar10(root)
    if name == "nus-wide-tc21":
        return load_nus_wide_tc21(root, max_side)
    if database_list is None or query_list is None:
        raise ValueError("--dataset image-list needs both --database-list and --query-list")
    return load_image_list(database_list, query_list, root, max_side)
