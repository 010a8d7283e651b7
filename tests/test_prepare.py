"""dihn_dist.prepare and the dataset adapters, each on tiny inputs in its real on-disk layout."""
from __future__ import annotations

import gzip
import hashlib
import json
import pickle
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dihn_dist import prepare as prepare_module
from dihn_dist.common.formats import PREPARED_V1_FILES, RUN_FORMAT, file_fingerprint, folder_kind
from dihn_dist.data import prepare as preparation
from dihn_dist.data.loader import eval_batches
from dihn_dist.data import prepare as data_prepare
from dihn_dist.data.prepare import prepare
from dihn_dist.data.prepared import load_prepared
from dihn_dist.data.sources import FASHION_MNIST_ROOT, load_fashion_mnist
from dihn_dist.prepare import parse_args

pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # numba finalizers

IMAGENET_MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
IMAGENET_STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


def run(*argv) -> Path:
    return prepare(parse_args([str(a) for a in argv] + ["--num-workers", "1"]))


def unnormalise(images: torch.Tensor) -> np.ndarray:
    """(b, 3, R, R) normalised float -> (b, R, R, 3) uint8-valued float."""
    return (images * IMAGENET_STD * 255 + IMAGENET_MEAN * 255).permute(0, 2, 3, 1).numpy()


def manifest_of(folder: Path) -> dict:
    return json.loads((folder / "manifest.json").read_text())


def assert_nothing_written(out: Path) -> None:
    assert not out.exists()
    assert not list(out.parent.glob(f".{out.name}.*")), "a temporary folder was left behind"


def check_protocol(folder: Path, source_database_labels: np.ndarray, source_query_labels: np.ndarray) -> dict:
    """Invariants every preparation satisfies; returns the manifest."""
    manifest = manifest_of(folder)
    data = load_prepared(folder)
    database_index = np.load(folder / "database_source_index.npy")
    query_index = np.load(folder / "query_source_index.npy")
    num_seen, num_original = manifest["num_seen"], manifest["num_original"]
    assert data.database_labels.dtype == np.uint8 and data.query_labels.dtype == np.uint8
    assert np.array_equal(data.database_labels, source_database_labels[database_index])
    assert np.array_equal(data.query_labels, source_query_labels[query_index])
    incremental = data.database_labels[:, num_seen:].any(axis=1)
    assert not incremental[:num_original].any() and incremental[num_original:].all()
    assert np.all(np.diff(database_index[:num_original]) > 0) and np.all(np.diff(database_index[num_original:]) > 0)
    assert np.all(np.diff(query_index) > 0)
    assert manifest["num_database"] == len(database_index) == manifest["counts"]["database"]["total"]
    assert manifest["num_query"] == len(query_index) == manifest["counts"]["query"]["total"]
    assert manifest["counts"]["database"]["per_class"] == data.database_labels.sum(axis=0).tolist()
    assert manifest["counts"]["database_original"]["per_class"] == data.database_labels[:num_original].sum(0).tolist()
    assert manifest["counts"]["query"]["per_class"] == data.query_labels.sum(axis=0).tolist()
    assert manifest["num_incremental"] == manifest["num_database"] - num_original > 0
    listed = set(manifest["files"]) | {"manifest.json"}
    assert {path.name for path in folder.iterdir()} == listed
    for name, entry in manifest["files"].items():
        assert (folder / name).stat().st_size == entry["bytes"]
        assert file_fingerprint(folder / name) == entry["fingerprint"]
    assert folder_kind(folder) == "prepared"
    for part, count in (("query", manifest["num_query"]), ("database", manifest["num_database"])):
        digests = np.load(folder / manifest["item_digests"][part])
        assert digests.shape == (count, 16) and digests.dtype == np.uint8
    return manifest


# ----------------------------------------------------------------------------------------------------------
# Fashion-MNIST (the real files) and the output folder's life cycle


@pytest.fixture(scope="module")
def fashion():
    return load_fashion_mnist()


def test_fashion_mnist_protocol(tiny_prepared, fashion):
    manifest = check_protocol(tiny_prepared, fashion.database.labels, fashion.query.labels)
    assert (manifest["num_database"], manifest["num_original"], manifest["num_query"]) == (600, 420, 100)
    assert manifest["num_seen"] == 7 and len(manifest["class_names"]) == manifest["num_classes"] == 10
    assert manifest["image"] == {"storage": "raw", "channels": 3, "height": 28, "width": 28,
                                 "source_height": 28, "source_width": 28,
                                 "largest_side": 28, "most_common_side": 28, "smallest_side": 28}
    train_classes = fashion.database.labels.argmax(1)
    test_classes = fashion.query.labels.argmax(1)
    expected_database = np.concatenate([np.sort(np.concatenate([np.flatnonzero(train_classes == c)[:60]
                                                                for c in classes]))
                                        for classes in (range(7), range(7, 10))])
    assert np.array_equal(np.load(tiny_prepared / "database_source_index.npy"), expected_database)
    expected_query = np.sort(np.concatenate([np.flatnonzero(test_classes == c)[:10] for c in range(10)]))
    assert np.array_equal(np.load(tiny_prepared / "query_source_index.npy"), expected_query)
    labels_file = FASHION_MNIST_ROOT / "t10k-labels-idx1-ubyte.gz"
    recorded = {Path(s["path"]).name: s["sha256"] for s in manifest["sources"]}
    assert recorded[labels_file.name] == hashlib.sha256(labels_file.read_bytes()).hexdigest()


def test_rerun_is_a_quick_noop_other_options_need_force(tmp_path, monkeypatch):
    out = tmp_path / "fm"
    options = ["--dataset", "fashion-mnist", "--out", out, "--database-per-class", "3", "--query-per-class", "2"]
    run(*options)
    stamp = {path.name: path.stat().st_mtime_ns for path in out.iterdir()}
    # Quick because it does no work: the source is not even opened (a structural check, not a clock).
    with monkeypatch.context() as patch:
        patch.setattr(data_prepare, "open_dataset", lambda *a, **k: pytest.fail("the no-op opened the source"))
        run(*options)
    assert {path.name: path.stat().st_mtime_ns for path in out.iterdir()} == stamp
    with pytest.raises(ValueError, match="--force"):
        run(*options[:-1], "3")
    run(*options[:-1], "3", "--force")
    assert manifest_of(out)["num_query"] == 30


def test_interrupted_run_never_looks_complete(tmp_path, monkeypatch):
    out = tmp_path / "fm"
    options = ["--dataset", "fashion-mnist", "--out", out, "--database-per-class", "2", "--query-per-class", "1"]

    def interrupted(folder, *args):
        (folder / "database.beton").write_bytes(b"half")
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(preparation, "write_all", interrupted)
        with pytest.raises(KeyboardInterrupt):
            run(*options)
    assert_nothing_written(out)
    # A temporary folder left by a killed run (its process is gone) is neither taken as complete nor kept.
    finished = subprocess.Popen(["true"])
    finished.wait()
    stale = tmp_path / f".fm.partial-{finished.pid}-deadbeef"
    stale.mkdir()
    (stale / "query.beton").write_bytes(b"partial")
    run(*options)
    assert not stale.exists() and load_prepared(out).num_database == 20


def test_foreign_nonempty_out_folder_is_refused(tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(ValueError, match="not empty"):
        run("--dataset", "fashion-mnist", "--out", out, "--database-per-class", "1", "--query-per-class", "1")
    assert (out / "notes.txt").read_text() == "keep me"


def test_fashion_mnist_bad_files(tmp_path):
    root = tmp_path / "fm-src"
    root.mkdir()
    for name in ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", "t10k-images-idx3-ubyte.gz"):
        (root / name).symlink_to(FASHION_MNIST_ROOT / name)
    out = tmp_path / "out"
    with pytest.raises(FileNotFoundError, match="t10k-labels-idx1-ubyte.gz"):
        run("--dataset", "fashion-mnist", "--root", root, "--out", out)
    with gzip.open(root / "t10k-labels-idx1-ubyte.gz", "wb") as handle:
        handle.write(b"\x00\x00\x08\x03" + b"\x00" * 8)
    with pytest.raises(ValueError, match=r"t10k-labels-idx1-ubyte.gz: expected an IDX file"):
        run("--dataset", "fashion-mnist", "--root", root, "--out", out)
    with pytest.raises(FileNotFoundError, match="dataset-fashion-mnist"):
        run("--dataset", "fashion-mnist", "--root", tmp_path / "nowhere", "--out", out)
    assert_nothing_written(out)


def test_num_seen_out_of_range_and_empty_parts(tmp_path):
    out = tmp_path / "out"
    for value in ("10", "0"):
        with pytest.raises(ValueError, match="--num-seen"):
            run("--dataset", "fashion-mnist", "--out", out, "--num-seen", value)
    assert_nothing_written(out)


def test_cli_reports_errors_with_exit_code(tmp_path, capsys):
    code = prepare_module.main(["--dataset", "cifar-10", "--root", str(tmp_path), "--out", str(tmp_path / "o")])
    lines = capsys.readouterr().err.splitlines()
    assert code == 2 and lines[-1].startswith("error: cifar-10: ") and "cifar-10-batches-py" in lines[-1]
    assert not any("Traceback" in line for line in lines)
    code = prepare_module.main(["--dataset", "cifar-10", "--root", str(tmp_path), "--out", str(tmp_path / "o"),
                                "--debug"])
    assert code == 2 and "Traceback" in capsys.readouterr().err


def test_item_digests_are_the_stored_pixels_and_labels(tiny_prepared, fashion):
    """Raw storage: item i's digest is recomputable from the source pixels (see betonwriter.ITEM_DIGEST_SCHEME)."""
    digests = np.load(tiny_prepared / "database_item_digests.npy")
    rows = np.load(tiny_prepared / "database_source_index.npy")
    labels = np.load(tiny_prepared / "database_labels.npy")
    header = np.array([(1, 28, 28)], dtype=[("mode", "u1"), ("height", "<u2"), ("width", "<u2")]).tobytes()
    for position in (0, 419, 420, 599):
        pixels = np.repeat(fashion.database.images.pixels[rows[position]][:, :, None], 3, axis=2)
        expected = hashlib.blake2b(header + pixels.tobytes() + labels[position].tobytes(), digest_size=16)
        assert digests[position].tobytes() == expected.digest()
    assert len({row.tobytes() for row in digests}) == len(digests)


def test_folder_kind(tiny_prepared, tmp_path):
    assert folder_kind(tmp_path / "nowhere") == "missing"
    assert folder_kind(tmp_path) == "empty"
    assert folder_kind(tiny_prepared) == "prepared"
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "format.json").write_text(json.dumps(RUN_FORMAT))
    (tmp_path / "run" / "manifest.json").write_text((tiny_prepared / "manifest.json").read_text())
    assert folder_kind(tmp_path / "run") == "run"
    (tmp_path / "run" / "format.json").write_text("{not json")
    assert folder_kind(tmp_path / "run") == "other"
    (tmp_path / "file").write_text("x")
    assert folder_kind(tmp_path / "file") == "other"
    # A preparation of format version 1 had no marker: recognised only when it holds exactly its files.
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    for name in PREPARED_V1_FILES:
        shutil.copy(tiny_prepared / name, legacy / name)
    manifest = json.loads((legacy / "manifest.json").read_text())
    (legacy / "manifest.json").write_text(json.dumps({**manifest, "format_version": 1}))
    assert folder_kind(legacy) == "prepared"
    (legacy / "notes.txt").write_text("x")
    assert folder_kind(legacy) == "other"


# ----------------------------------------------------------------------------------------------------------
# CIFAR-10: torchvision's cifar-10-batches-py and the reference .npy files


def write_cifar_batches(folder: Path, rng) -> tuple:
    """5 training batches of 20 images and a test batch with 100 images per class (the protocol's query)."""
    folder.mkdir(parents=True)
    images, labels = [], []
    for name, count in [(f"data_batch_{i}", 20) for i in range(1, 6)] + [("test_batch", 1000)]:
        data = rng.integers(0, 256, size=(count, 3072), dtype=np.uint8)
        batch_labels = rng.permutation(np.arange(count) % 10).tolist()
        with open(folder / name, "wb") as handle:
            pickle.dump({b"data": data, b"labels": batch_labels, b"batch_label": name.encode()}, handle)
        images.append(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
        labels += batch_labels
    with open(folder / "batches.meta", "wb") as handle:
        pickle.dump({b"label_names": [f"c{i}".encode() for i in range(10)]}, handle)
    return np.concatenate(images), np.eye(10, dtype=np.uint8)[labels]


def test_cifar10_batches_layout(tmp_path):
    images, labels = write_cifar_batches(tmp_path / "src" / "cifar-10-batches-py", np.random.default_rng(0))
    out = run("--dataset", "cifar-10", "--root", tmp_path / "src", "--out", tmp_path / "out",
              "--query-per-class", "2", "--database-per-class", "4")
    manifest = check_protocol(out, labels, labels)
    assert manifest["class_names"] == [f"c{i}" for i in range(10)]
    assert (manifest["num_query"], manifest["num_database"], manifest["num_original"]) == (20, 40, 28)
    query_index = np.load(out / "query_source_index.npy")
    test_classes = labels[100:].argmax(1)
    expected = 100 + np.sort(np.concatenate([np.flatnonzero(test_classes == c)[:2] for c in range(10)]))
    assert np.array_equal(query_index, expected)
    assert not set(query_index) & set(np.load(out / "database_source_index.npy"))
    # Stored pixels round-trip exactly (raw storage, no resize at the native 32 px): HWC order kept.
    data = load_prepared(out)
    rows = np.array([39, 0, 27, 28, 5])
    loaded = [unnormalise(im) for im, _, _ in eval_batches(data, "database", batch_size=2, resolution=32,
                                                            device="cpu", num_workers=1, indices=rows)]
    source_rows = np.load(out / "database_source_index.npy")[rows]
    np.testing.assert_allclose(np.concatenate(loaded), images[source_rows], atol=1e-3)


def test_cifar10_reference_npy_layout(tmp_path):
    rng = np.random.default_rng(1)
    src = tmp_path / "src"
    src.mkdir()
    query_labels = np.eye(10, dtype=np.uint8)[np.repeat(np.arange(10), 2)]
    database_labels = np.eye(10, dtype=np.uint8)[np.repeat(np.arange(10), 5)]   # sorted by class, as shipped
    np.save(src / "cifar10_1000_query_data.npy", rng.integers(0, 256, (20, 32, 32, 3), dtype=np.uint8))
    np.save(src / "cifar10_1000_query_onehot_targets.npy", query_labels)
    np.save(src / "cifar10_59000_retrieval_data.npy", rng.integers(0, 256, (50, 32, 32, 3), dtype=np.uint8))
    np.save(src / "cifar10_59000_retrieval_onehot_targets.npy", database_labels)
    out = run("--dataset", "cifar-10", "--root", src, "--out", tmp_path / "out")
    manifest = check_protocol(out, database_labels, query_labels)
    assert (manifest["num_query"], manifest["num_database"], manifest["num_original"]) == (20, 50, 35)
    assert np.array_equal(np.load(out / "database_source_index.npy"), np.arange(50))
    np.save(src / "cifar10_59000_retrieval_onehot_targets.npy", database_labels[:49])
    with pytest.raises(ValueError, match="49 label rows for 50 images"):
        run("--dataset", "cifar-10", "--root", src, "--out", tmp_path / "out2")
    assert_nothing_written(tmp_path / "out2")


# ----------------------------------------------------------------------------------------------------------
# NUS-WIDE tc21 list files with JPEGs on disk


def random_tags(rng, count: int, incremental: bool) -> np.ndarray:
    labels = np.zeros((count, 21), dtype=np.uint8)
    for row in labels:
        row[rng.choice(18, size=rng.integers(1, 4), replace=False)] = 1
        if incremental:
            row[rng.integers(18, 21)] = 1
    return labels


def write_nus_wide(root: Path, rng, database: int = 16, query: int = 6) -> dict:
    (root / "images" / "a").mkdir(parents=True)
    labels = {}
    for part, count, image_list, label_list in (("database", database, "database_img.txt", "database_label_onehot.txt"),
                                                ("query", query, "test_img.txt", "test_label_onehot.txt")):
        part_labels = np.concatenate([random_tags(rng, count - count // 3, False),
                                      random_tags(rng, count // 3, True)])[rng.permutation(count)]
        paths = []
        for i in range(count):
            path = f"images/a/{part}_{i}.jpg"
            height, width = rng.integers(40, 200, size=2)
            Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(root / path, quality=90)
            paths.append(path)
        (root / image_list).write_text("\n".join(paths) + "\n")
        (root / label_list).write_text("\n".join(" ".join(map(str, row)) for row in part_labels) + "\n")
        labels[part] = part_labels
    return labels


def test_nus_wide_tc21_lists(tmp_path):
    root = tmp_path / "nus"
    labels = write_nus_wide(root, np.random.default_rng(2))
    out = run("--dataset", "nus-wide-tc21", "--root", root, "--out", tmp_path / "out", "--max-side", "64")
    manifest = check_protocol(out, labels["database"], labels["query"])
    assert manifest["num_seen"] == 18 and manifest["num_classes"] == 21
    assert manifest["image"]["storage"] == "jpeg" and manifest["image"]["max_side"] == 64
    from ffcv.reader import Reader
    reader = Reader(str(out / "database.beton"))
    metadata = reader.metadata[f"f{reader.field_names.index('image')}"]
    assert metadata["width"].max() <= 64 and metadata["height"].max() <= 64
    assert set(metadata["mode"]) == {0}   # 0 = JPEG in FFCV


def test_nus_wide_inconsistent_lists(tmp_path):
    root = tmp_path / "nus"
    write_nus_wide(root, np.random.default_rng(3), database=6, query=3)
    out = tmp_path / "out"
    label_file = root / "database_label_onehot.txt"
    lines = label_file.read_text().splitlines()
    label_file.write_text("\n".join(lines[:-1]) + "\n")
    with pytest.raises(ValueError, match=r"database_label_onehot.txt: 5 label rows for 6 images in .*database_img.txt"):
        run("--dataset", "nus-wide-tc21", "--root", root, "--out", out)
    label_file.write_text("\n".join(lines[:2] + ["0 1 2" + " 0" * 18] + lines[3:]) + "\n")
    with pytest.raises(ValueError, match=r"database_label_onehot.txt line 3: labels must be 0 or 1, got '2'"):
        run("--dataset", "nus-wide-tc21", "--root", root, "--out", out)
    label_file.write_text("\n".join(lines[:3] + ["0 1" * 10] + lines[4:]) + "\n")
    with pytest.raises(ValueError, match=r"database_label_onehot.txt line 4: expected 21 labels"):
        run("--dataset", "nus-wide-tc21", "--root", root, "--out", out)
    label_file.write_text("\n".join(lines) + "\n")
    (root / "images/a/query_1.jpg").unlink()
    with pytest.raises(FileNotFoundError, match=r"query_1.jpg \(listed in .*test_img.txt line 2\)"):
        run("--dataset", "nus-wide-tc21", "--root", root, "--out", out)
    assert_nothing_written(out)


# ----------------------------------------------------------------------------------------------------------
# image-list: a multi-label set of 2x2 mosaics of real Fashion-MNIST images


def write_mosaics(folder: Path, name: str, fashion, rng, count: int, num_incremental: int):
    """`count` 56x56 mosaics of four test images; the last `num_incremental` include a class >= 7, the others
    only classes < 7. Labels: the union of the four classes. Written as PNG (lossless) plus a list file."""
    pixels = fashion.query.images.pixels
    classes = fashion.query.labels.argmax(1)
    (folder / name).mkdir(parents=True)
    lines, labels = [], np.zeros((count, 10), dtype=np.uint8)
    for i in range(count):
        allowed = np.flatnonzero(classes < 7)
        picks = rng.choice(allowed, size=4, replace=False)
        if i >= count - num_incremental:
            picks[rng.integers(4)] = rng.choice(np.flatnonzero(classes >= 7))
        tiles = pixels[picks]
        mosaic = np.block([[tiles[0], tiles[1]], [tiles[2], tiles[3]]])
        Image.fromarray(mosaic).convert("RGB").save(folder / name / f"{i}.png")
        labels[i, classes[picks]] = 1
        lines.append(f"{name}/{i}.png " + " ".join(map(str, labels[i])))
    order = rng.permutation(count)   # interleave original and incremental items in the list
    (folder / f"{name}.txt").write_text("\n".join(lines[j] for j in order) + "\n")
    return labels[order], order


def test_image_list_multilabel_mosaics(tmp_path, fashion):
    rng = np.random.default_rng(4)
    database_labels, database_order = write_mosaics(tmp_path, "db", fashion, rng, 30, 10)
    query_labels, _ = write_mosaics(tmp_path, "q", fashion, rng, 8, 3)
    assert (database_labels.sum(1) > 1).any(), "mosaics should carry several labels"
    out = run("--dataset", "image-list", "--database-list", tmp_path / "db.txt", "--query-list", tmp_path / "q.txt",
              "--num-seen", "7", "--out", tmp_path / "out")
    manifest = check_protocol(out, database_labels, query_labels)
    assert (manifest["num_database"], manifest["num_original"], manifest["num_query"]) == (30, 20, 8)
    # The stored JPEG of database position 0 is close to the mosaic it came from (JPEG quality 90). JPEG
    # datasets are evaluated on a centre crop of 224/256 of the side: int(0.875 * 56) = 49 px from offset 3.
    data = load_prepared(out)
    images, _, rows = next(eval_batches(data, "database", batch_size=4, resolution=49, device="cpu", num_workers=1,
                                        indices=np.arange(4)))
    assert rows.tolist() == [0, 1, 2, 3]
    list_line = np.load(out / "database_source_index.npy")[0]
    original = np.asarray(Image.open(tmp_path / "db" / f"{database_order[list_line]}.png").convert("RGB"))
    assert np.abs(unnormalise(images)[0] - original[3:52, 3:52]).mean() < 4


def test_image_list_errors_name_file_and_line(tmp_path, fashion):
    rng = np.random.default_rng(5)
    write_mosaics(tmp_path, "db", fashion, rng, 6, 2)
    write_mosaics(tmp_path, "q", fashion, rng, 3, 1)
    out = tmp_path / "out"
    lists = ["--dataset", "image-list", "--database-list", tmp_path / "db.txt", "--query-list", tmp_path / "q.txt",
             "--out", out]
    with pytest.raises(ValueError, match="--num-seen is required"):
        run(*lists)
    write_mosaics(tmp_path, "db_original_only", fashion, rng, 4, 0)
    with pytest.raises(ValueError, match="incremental database part .* is empty"):
        run(*lists[:3], tmp_path / "db_original_only.txt", *lists[4:], "--num-seen", "7")
    query = (tmp_path / "q.txt").read_text().splitlines()
    (tmp_path / "q.txt").write_text("\n".join(query[:1] + [query[1] + " 1"] + query[2:]) + "\n")
    with pytest.raises(ValueError, match=r"q.txt line 2: expected 10 labels"):
        run(*lists, "--num-seen", "7")
    assert_nothing_written(out)


def test_corrupt_image_fails_or_is_skipped(tmp_path, fashion):
    rng = np.random.default_rng(6)
    database_labels, _ = write_mosaics(tmp_path, "db", fashion, rng, 8, 3)
    write_mosaics(tmp_path, "q", fashion, rng, 3, 1)
    first_line = (tmp_path / "db.txt").read_text().splitlines()[4]
    corrupt = tmp_path / first_line.split()[0]
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n" + b"not an image" * 10)
    out = tmp_path / "out"
    lists = ["--dataset", "image-list", "--database-list", tmp_path / "db.txt", "--query-list", tmp_path / "q.txt",
             "--out", out, "--num-seen", "7"]
    with pytest.raises(ValueError, match=rf"{corrupt.name} \(listed in .*db.txt line 5\).*--skip-bad"):
        run(*lists)
    assert_nothing_written(out)
    run(*lists, "--skip-bad")
    manifest = manifest_of(out)
    assert manifest["num_database"] == 7 and manifest["skipped_bad"]["database"] == 1
    assert "db.txt line 5" in manifest["skipped_bad"]["images"]["database"][0]
    assert 4 not in np.load(out / "database_source_index.npy")


def test_small_images_record_their_own_size(tmp_path, fashion):
    """56 px mosaics stored as JPEG with --max-side 256 (the default) stay 56 px: the manifest and
    PreparedData.image_size (the trainer's default resolution) say 56, not 256."""
    rng = np.random.default_rng(7)
    write_mosaics(tmp_path, "db", fashion, rng, 6, 2)
    write_mosaics(tmp_path, "q", fashion, rng, 3, 1)
    out = run("--dataset", "image-list", "--database-list", tmp_path / "db.txt", "--query-list", tmp_path / "q.txt",
              "--num-seen", "7", "--out", tmp_path / "out")
    image = manifest_of(out)["image"]
    assert (image["max_side"], image["largest_side"], image["most_common_side"], image["smallest_side"]) == \
        (256, 56, 56, 56)
    data = load_prepared(out)
    assert (data.image_size, data.max_side, data.largest_side) == (56, 256, 56)


def test_jpeg_images_are_resized_to_max_side_by_prepare(tmp_path):
    """Longest side brought to --max-side by WriterItems (FFCV's resizer never runs); the most common longest
    side is --max-side when most images are larger."""
    root = tmp_path / "nus"
    write_nus_wide(root, np.random.default_rng(8), database=9, query=3)
    out = run("--dataset", "nus-wide-tc21", "--root", root, "--out", tmp_path / "out", "--max-side", "32")
    from ffcv.reader import Reader
    reader = Reader(str(out / "database.beton"))
    metadata = reader.metadata[f"f{reader.field_names.index('image')}"]
    assert np.maximum(metadata["height"], metadata["width"]).tolist() == [32] * 9
    assert load_prepared(out).image_size == 32


def both_workers_busy_first(monkeypatch) -> None:
    """Writer workers (forked) wait at their first image until two of them have taken one: with 2 workers,
    both write items, so the race between them (pages, allocation order) is always in play."""
    import multiprocessing
    import os

    from dihn_dist.data import parts
    barrier = multiprocessing.Barrier(2)
    waited = set()
    load_image = parts.WriterItems.load_image

    def load_after_the_barrier(self, position):
        if os.getpid() not in waited:
            waited.add(os.getpid())
            barrier.wait(timeout=300)
        return load_image(self, position)

    monkeypatch.setattr(parts.WriterItems, "load_image", load_after_the_barrier)


def test_preparation_is_the_same_bytes_whatever_the_workers(tmp_path, monkeypatch):
    options = ["--dataset", "fashion-mnist", "--database-per-class", "20", "--query-per-class", "5",
               "--resolution", "28"]
    one = prepare(parse_args([*options, "--out", str(tmp_path / "one"), "--num-workers", "1"]))
    both_workers_busy_first(monkeypatch)
    two = prepare(parse_args([*options, "--out", str(tmp_path / "two"), "--num-workers", "2"]))

    def sha256s(folder: Path) -> dict:
        return {path.name: hashlib.sha256(path.read_bytes()).hexdigest() for path in sorted(folder.iterdir())
                if path.name != "manifest.json"}   # the manifest records when and where: compared by "files"

    assert sha256s(one) == sha256s(two)
    assert {"query.beton", "database.beton"} <= set(sha256s(one))
    assert manifest_of(one)["files"] == manifest_of(two)["files"]   # what a run's --resume compares


def write_spaced_image_list(folder: Path, separator: str) -> list:
    """6 database and 3 query PNGs (3 classes, --num-seen 2) in the folder "my images", whose name has a
    space; each list line is `path SEPARATOR labels`."""
    rng = np.random.default_rng(7)
    (folder / "my images").mkdir(parents=True)
    for name, classes in {"db": [0, 1, 0, 1, 2, 2], "q": [0, 1, 2]}.items():
        lines = []
        for i, label in enumerate(classes):
            Image.fromarray(rng.integers(0, 256, (28, 28, 3), dtype=np.uint8)).save(folder / "my images" / f"{name}{i}.png")
            lines.append(f"my images/{name}{i}.png{separator}" + " ".join("1" if c == label else "0" for c in range(3)))
        (folder / f"{name}.txt").write_text("\n".join(lines) + "\n")
    return ["--dataset", "image-list", "--database-list", str(folder / "db.txt"), "--query-list",
            str(folder / "q.txt"), "--num-seen", "2", "--num-workers", "1"]


def test_image_list_path_with_a_space_is_named_and_a_tab_separates_it(tmp_path, capsys):
    """A space in a path is said to be one (not a wrong label count), with the list, the line and the fix;
    `path<TAB>labels` lines are the documented way to list such paths."""
    options = write_spaced_image_list(tmp_path / "src", " ")
    out = tmp_path / "out"
    assert prepare_module.main([*options, "--out", str(out)]) == 2
    stderr = capsys.readouterr().err
    assert stderr.count("\n") == 1, stderr
    assert stderr.startswith(f"error: {tmp_path / 'src' / 'db.txt'} line 1: 5 fields, more than a path and its "
                             f"0/1 labels: the image path seems to contain a space ('my images/db0.png'); "
                             f"separate the path from its labels with a tab")
    assert_nothing_written(out)
    # The same dataset with tab-separated lines prepares, and records the paths with their spaces.
    options = write_spaced_image_list(tmp_path / "tabbed", "\t")
    assert prepare_module.main([*options, "--out", str(out)]) == 0
    paths = (out / "database_item_paths.txt").read_text().splitlines()
    assert len(paths) == 6 and all("/my images/db" in path for path in paths)


def test_image_list_more_fields_than_labels_names_the_line_and_the_fix(tmp_path):
    """A path with a space whose second word looks like a label (`photo 1`): the count tells, and says so."""
    from dihn_dist.data.sources import load_image_list
    write_spaced_image_list(tmp_path, "\t")
    (tmp_path / "q.txt").write_text("my images/q0.png\t1 0 0\nphoto 1 0 1 0\n")
    with pytest.raises(ValueError, match=r"q.txt line 2: expected 3 labels \(0/1\) after the path, got 4: more "
                                         r"fields than expected; if the path contains a space, separate the path"):
        load_image_list(tmp_path / "db.txt", tmp_path / "q.txt")
