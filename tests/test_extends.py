"""prepare --extends: a new round whose database begins with the previous round's, bit for bit (image-list
rounds of new items, Fashion-MNIST class rounds), the prefix check, and every refusal (exit code, one line,
nothing written)."""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dihn_dist import prepare as prepare_module
from dihn_dist.data import prepare as data_prepare
from dihn_dist.common.formats import RUN_FORMAT
from dihn_dist.data.loader import eval_batches
from dihn_dist.data.prepared import (
    PREFIX_FILES,
    DatabaseRecord,
    check_database_prefix,
    database_prefix_problem,
    load_prepared,
)
from dihn_dist.data.writer import read_back

pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # numba finalizers

# OLD: 3 classes (--num-seen 2); database lines 1-4 original, 5-6 incremental. The round: class 3 arrives,
# with a new image of class 0 too; two new queries.
OLD_DATABASE = [0, 1, 0, 1, 2, 2]
OLD_QUERY = [0, 1, 2]
NEW_DATABASE = [3, 0, 3]
NEW_QUERY = [3, 1]


def label_text(classes, width: int) -> str:
    return " ".join("1" if c in classes else "0" for c in range(width))


def write_images(folder: Path, prefix: str, classes, rng) -> list:
    """28 px PNGs of noise, one per class entry; returns their paths relative to `folder`."""
    (folder / "img").mkdir(parents=True, exist_ok=True)
    paths = []
    for i, _ in enumerate(classes):
        path = f"img/{prefix}{i}.png"
        Image.fromarray(rng.integers(0, 256, (28, 28, 3), dtype=np.uint8)).save(folder / path)
        paths.append(path)
    return paths


def write_list(path: Path, lines) -> Path:
    path.write_text("".join(f"{image} {labels}\n" for image, labels in lines))
    return path


@pytest.fixture(scope="module")
def lists(tmp_path_factory) -> dict:
    """The list files of both rounds, all under one folder: OLD's lists (3 columns), the round's new items
    (4 columns), and full lists (OLD's lines padded with a 0 column, then the new lines)."""
    folder = tmp_path_factory.mktemp("image-list")
    rng = np.random.default_rng(0)
    paths = {name: write_images(folder, name, classes, rng) for name, classes in
             (("db", OLD_DATABASE), ("q", OLD_QUERY), ("newdb", NEW_DATABASE), ("newq", NEW_QUERY))}
    lines = {name: [(path, label_text([c], width)) for path, c in zip(paths[name], classes)]
             for name, classes, width in (("db", OLD_DATABASE, 3), ("q", OLD_QUERY, 3),
                                          ("newdb", NEW_DATABASE, 4), ("newq", NEW_QUERY, 4))}
    padded = {name: [(path, labels + " 0") for path, labels in lines[name]] for name in ("db", "q")}
    return {"folder": folder, "paths": paths,
            "db": write_list(folder / "db.txt", lines["db"]), "q": write_list(folder / "q.txt", lines["q"]),
            "newdb": write_list(folder / "newdb.txt", lines["newdb"]),
            "newq": write_list(folder / "newq.txt", lines["newq"]),
            "fulldb": write_list(folder / "fulldb.txt", padded["db"] + lines["newdb"]),
            "fullq": write_list(folder / "fullq.txt", padded["q"] + lines["newq"]),
            "lines": lines}


def image_list_options(database: Path, query: Path) -> list:
    return ["--dataset", "image-list", "--database-list", database, "--query-list", query]


def run(*argv) -> Path:
    return prepare_module.prepare(prepare_module.parse_args([str(a) for a in argv] + ["--num-workers", "1"]))


@pytest.fixture(scope="module")
def rounds(lists, tmp_path_factory) -> dict:
    """OLD (image-list, 3 classes) and NEW = OLD extended by the new-items lists."""
    base = tmp_path_factory.mktemp("rounds")
    old = run(*image_list_options(lists["db"], lists["q"]), "--num-seen", "2", "--out", base / "old")
    new = run(*image_list_options(lists["newdb"], lists["newq"]), "--extends", old, "--out", base / "new")
    return {"old": old, "new": new, "base": base}


def stored_image_bytes(beton: Path, labels: np.ndarray) -> list:
    """Each item's stored image metadata and bytes, straight from the file."""
    images = read_back(beton, labels).images
    data = beton.read_bytes()
    return [(images.headers[i].tobytes(), data[images.pointers[i]:images.pointers[i] + images.sizes[i]])
            for i in range(len(labels))]


def checksums(folder: Path) -> dict:
    return {str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
            for path in sorted(folder.rglob("*")) if path.is_file()}


def prepare_cli(capsys, *argv):
    """(exit code, the error line) of `python -m dihn_dist.prepare ARGV`."""
    capsys.readouterr()
    code = prepare_module.main([str(a) for a in argv] + ["--num-workers", "1"])
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
    return code, errors[-1] if errors else ""


def assert_nothing_written(out: Path) -> None:
    assert not out.exists()
    assert not list(out.parent.glob(f".{out.name}.*")), "a temporary folder was left behind"


# ----------------------------------------------------------------------------------------------------------
# image-list rounds


def test_image_list_round_appends_new_items_to_bit_identical_old_ones(rounds, lists):
    old, new = load_prepared(rounds["old"]), load_prepared(rounds["new"])
    check_database_prefix(old, new)
    assert new.is_extended and not old.is_extended
    manifest = new.manifest
    assert (manifest["num_original"], manifest["num_inherited"], manifest["num_incremental"]) == (6, 6, 3)
    assert (manifest["num_seen"], manifest["num_classes"], manifest["num_classes_so_far"]) == (3, 4, 4)
    assert manifest["extends"]["path"] == str(rounds["old"].resolve())
    old_manifest = (rounds["old"] / "manifest.json").read_bytes()
    assert manifest["extends"]["manifest_sha256"] == hashlib.sha256(old_manifest).hexdigest()
    assert [r["database_rows"] for r in manifest["rounds"]] == [[0, 6], [6, 9]]
    assert [r["query_rows"] for r in manifest["rounds"]] == [[0, 3], [3, 5]]
    # Old items: the very stored bytes and metadata; label rows widened with a 0 column.
    for part, count in (("database", 6), ("query", 3)):
        old_labels, new_labels = (old.database_labels, new.database_labels) if part == "database" else \
            (old.query_labels, new.query_labels)
        old_stored = stored_image_bytes(old.beton(part), old_labels)
        new_stored = stored_image_bytes(new.beton(part), new_labels)
        assert new_stored[:count] == old_stored
        assert np.array_equal(new_labels[:count, :3], old_labels) and not new_labels[:count, 3].any()
        old_digests = np.load(rounds["old"] / f"{part}_image_digests.npy")
        assert np.array_equal(np.load(rounds["new"] / f"{part}_image_digests.npy")[:count], old_digests)
    # New items follow, in list order (the class-0 image too), queries likewise.
    assert new.database_labels[6:].argmax(1).tolist() == NEW_DATABASE
    assert new.query_labels[3:].argmax(1).tolist() == NEW_QUERY
    paths = (rounds["new"] / "database_item_paths.txt").read_text().splitlines()
    assert paths[:6] == (rounds["old"] / "database_item_paths.txt").read_text().splitlines()
    assert paths[6:] == [str(lists["folder"] / p) for p in lists["paths"]["newdb"]]
    # FFCV reads the copied items as ordinary RGB images: the same pixels as in OLD.
    rows = np.arange(6)
    decoded = [next(eval_batches(data, "database", batch_size=6, resolution=28, device="cpu", num_workers=1,
                                 indices=rows))[0] for data in (old, new)]
    assert np.array_equal(decoded[0].numpy(), decoded[1].numpy())


def test_a_full_list_starting_with_the_old_lines_gives_the_same_round(rounds, lists, tmp_path):
    full = run(*image_list_options(lists["fulldb"], lists["fullq"]), "--extends", rounds["old"], "--out",
               tmp_path / "full")
    for name in ("database_labels.npy", "query_labels.npy", "database_image_digests.npy",
                 "query_image_digests.npy", "database_item_digests.npy", "database_item_paths.txt"):
        assert (full / name).read_bytes() == (rounds["new"] / name).read_bytes(), name
    check_database_prefix(rounds["old"], full)


def test_old_lines_in_a_full_list_keep_their_labels(rounds, lists, tmp_path, capsys):
    lines = lists["fulldb"].read_text().splitlines()
    path, *labels = lines[1].split()
    changed = lists["folder"] / "fulldb_changed.txt"
    changed.write_text("\n".join(lines[:1] + [f"{path} 1 1 0 0"] + lines[2:]) + "\n")
    out = tmp_path / "out"
    code, message = prepare_cli(capsys, *image_list_options(changed, lists["newq"]), "--extends", rounds["old"],
                                "--out", out)
    assert code == 2
    assert f"{lists['folder'] / path} (listed in {changed} line 2): labels [1, 1, 0, 0] for item" in message
    assert "OLD's items keep their labels, padded with 0 for the new classes" in message
    assert_nothing_written(out)


# ----------------------------------------------------------------------------------------------------------
# Fashion-MNIST class rounds


def test_fashion_mnist_class_rounds_each_database_a_prefix_of_the_next(tmp_path, monkeypatch):
    limits = ["--database-per-class", "20", "--query-per-class", "5"]
    first = run("--dataset", "fashion-mnist", "--classes", "4", *limits, "--out", tmp_path / "r4")
    second = run("--dataset", "fashion-mnist", "--extends", first, "--classes", "6", "--out", tmp_path / "r6")
    third = run("--dataset", "fashion-mnist", "--extends", second, "--classes", "8", "--out", tmp_path / "r8")
    data = [load_prepared(folder) for folder in (first, second, third)]
    for index, classes in enumerate((4, 6, 8)):
        manifest = data[index].manifest
        assert manifest["num_classes"] == 10 and manifest["num_classes_so_far"] == classes
        assert data[index].database_labels.sum(0).tolist() == [20] * classes + [0] * (10 - classes)
        assert data[index].query_labels.sum(0).tolist() == [5] * classes + [0] * (10 - classes)
    # Round 1: every item original. Then num_seen and num_original are the previous round's.
    assert [(d.num_seen, d.num_original, d.num_database) for d in data] == [(4, 80, 80), (4, 80, 120), (6, 120, 160)]
    assert data[1].manifest["request"]["database_per_class"] == 20, "per-class limits are the previous round's"
    check_database_prefix(data[0], data[1])
    check_database_prefix(data[1], data[2])
    check_database_prefix(data[0], data[2])
    for earlier, later in ((first, second), (second, third)):
        for name in ("database_source_index.npy", "query_source_index.npy", "query_labels.npy"):
            before = np.load(earlier / name)
            assert np.array_equal(np.load(later / name)[:len(before)], before), name
    new_rows = data[2].database_labels[120:].argmax(1)
    assert sorted(set(new_rows.tolist())) == [6, 7]
    # The same command again: a quick no-op; once the previous round has changed, a rebuild needs --force.
    stamp = {path.name: path.stat().st_mtime_ns for path in third.iterdir()}
    # Quick because it does no work: the source is not even opened (a structural check, not a clock).
    with monkeypatch.context() as patch:
        patch.setattr(data_prepare, "open_dataset", lambda *a, **k: pytest.fail("the no-op opened the source"))
        run("--dataset", "fashion-mnist", "--extends", second, "--classes", "8", "--out", third)
    assert {path.name: path.stat().st_mtime_ns for path in third.iterdir()} == stamp
    manifest = json.loads((second / "manifest.json").read_text())
    (second / "manifest.json").write_text(json.dumps({**manifest, "created": "later"}))
    with pytest.raises(ValueError, match=f"that extends {second}, which has changed since .*--force"):
        run("--dataset", "fashion-mnist", "--extends", second, "--classes", "8", "--out", third)


# ----------------------------------------------------------------------------------------------------------
# Refusals: one line, exit code 2, nothing written


def test_old_data_that_is_missing_foreign_a_run_or_damaged_is_refused(rounds, lists, tmp_path, capsys):
    options = image_list_options(lists["newdb"], lists["newq"])
    out = tmp_path / "out"
    code, message = prepare_cli(capsys, *options, "--extends", tmp_path / "nowhere", "--out", out)
    assert code == 2 and f"--extends {tmp_path / 'nowhere'}: does not exist" in message
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("x")
    code, message = prepare_cli(capsys, *options, "--extends", foreign, "--out", out)
    assert code == 2 and f"--extends {foreign}: is not a dihn_dist preparation" in message
    run_folder = tmp_path / "run"
    run_folder.mkdir()
    (run_folder / "format.json").write_text(json.dumps(RUN_FORMAT))
    code, message = prepare_cli(capsys, *options, "--extends", run_folder, "--out", out)
    assert code == 2 and f"--extends {run_folder}: is a training run folder, not prepared data" in message
    damaged = tmp_path / "damaged"
    shutil.copytree(rounds["old"], damaged)
    size = (damaged / "database.beton").stat().st_size
    with open(damaged / "database.beton", "r+b") as handle:
        handle.truncate(size - 100)
    code, message = prepare_cli(capsys, *options, "--extends", damaged, "--out", out)
    assert code == 2 and f"--extends {damaged}: {damaged / 'database.beton'}: expected {size:,} bytes" in message
    incomplete = tmp_path / "incomplete"
    shutil.copytree(rounds["old"], incomplete)
    (incomplete / "manifest.json").unlink()
    code, message = prepare_cli(capsys, *options, "--extends", incomplete, "--out", out)
    assert code == 2 and f"--extends {incomplete}: {incomplete / 'manifest.json'} does not exist" in message
    assert_nothing_written(out)


def test_a_new_item_that_repeats_an_old_one_is_refused(rounds, lists, tmp_path, capsys):
    folder = lists["folder"]
    old_lines = lists["lines"]["db"]
    out = tmp_path / "out"
    # The same image file, listed among new items.
    repeat = write_list(folder / "repeat.txt",
                        lists["lines"]["newdb"][:1] + [(old_lines[4][0], old_lines[4][1] + " 0")])
    code, message = prepare_cli(capsys, *image_list_options(repeat, lists["newq"]), "--extends", rounds["old"],
                                "--out", out)
    assert code == 2
    assert f"{folder / old_lines[4][0]} (listed in {repeat} line 2): is item 4 of the database part of " \
           f"--extends {rounds['old']}; a round lists only new items" in message
    # The same image under another name: the stored image digests tell (after writing; nothing is kept).
    shutil.copy(folder / old_lines[2][0], folder / "img" / "copy.png")
    copied = write_list(folder / "copied.txt", lists["lines"]["newdb"][:1] + [("img/copy.png", "1 0 0 0")])
    code, message = prepare_cli(capsys, *image_list_options(copied, lists["newq"]), "--extends", rounds["old"],
                                "--out", out)
    assert code == 2
    assert f"{folder / 'img' / 'copy.png'} (listed in {copied} line 2): its stored image is identical to item 2 " \
           f"of the database part of --extends {rounds['old']} ({folder / old_lines[2][0]})" in message
    assert_nothing_written(out)


def test_labels_narrower_than_the_old_ones_are_refused(rounds, lists, tmp_path, capsys):
    folder = lists["folder"]
    narrow = write_list(folder / "narrow.txt", [(p, "0 1") for p in lists["paths"]["newdb"]])
    narrow_q = write_list(folder / "narrow_q.txt", [(p, "1 0") for p in lists["paths"]["newq"]])
    out = tmp_path / "out"
    code, message = prepare_cli(capsys, *image_list_options(narrow, narrow_q), "--extends", rounds["old"],
                                "--out", out)
    assert code == 2
    assert f"--database-list {narrow}: 2 label columns, but --extends {rounds['old']} has 3 classes" in message
    assert_nothing_written(out)


def test_flags_that_contradict_old_data_are_refused(rounds, lists, tmp_path, capsys):
    out = tmp_path / "out"
    code, message = prepare_cli(capsys, "--dataset", "fashion-mnist", "--classes", "6", "--extends", rounds["old"],
                                "--out", out)
    assert code == 2 and f"--dataset fashion-mnist: but --extends {rounds['old']} holds image-list" in message
    first = run("--dataset", "fashion-mnist", "--classes", "4", "--database-per-class", "2", "--query-per-class", "1",
                "--out", tmp_path / "r4")
    for classes in ("4", "3"):
        code, message = prepare_cli(capsys, "--dataset", "fashion-mnist", "--classes", classes, "--extends", first,
                                    "--out", out)
        assert code == 2
        assert f"--classes {classes}: expected more than the 4 classes (0..3) --extends {first} already has" in message
    code, message = prepare_cli(capsys, "--dataset", "fashion-mnist", "--extends", first, "--out", out)
    assert code == 2 and "needs --classes K" in message
    code, message = prepare_cli(capsys, "--dataset", "fashion-mnist", "--classes", "6", "--resolution", "32",
                                "--extends", first, "--out", out)
    assert code == 2 and "--resolution 32: but" in message and "stores images at 28 px" in message
    assert_nothing_written(out)
    before = checksums(first)
    code, message = prepare_cli(capsys, "--dataset", "fashion-mnist", "--classes", "6", "--extends", first,
                                "--out", first)
    assert code == 2 and f"--out {first} is the --extends folder" in message
    assert checksums(first) == before


# ----------------------------------------------------------------------------------------------------------
# The prefix check on its own (what the trainer's --old-run uses)


def test_check_database_prefix_names_the_first_differing_row(rounds, lists, tmp_path):
    # The same items as OLD in another list order: same counts, rows 2 and 3 swapped.
    lines = lists["db"].read_text().splitlines()
    swapped = lists["folder"] / "swapped.txt"
    swapped.write_text("\n".join(lines[:2] + [lines[3], lines[2]] + lines[4:]) + "\n")
    other = run(*image_list_options(swapped, lists["q"]), "--num-seen", "2", "--out", tmp_path / "swapped")
    with pytest.raises(ValueError) as raised:
        check_database_prefix(other, rounds["new"])
    message = str(raised.value)
    assert message.startswith(f"database row 2: its stored image differs (2 of the first 6 rows differ): the new one "
                              f"({rounds['new']}) does not begin with the old database ({other})")
    # A run folder keeps copies of PREFIX_FILES: the same check from them.
    run_folder = tmp_path / "run"
    run_folder.mkdir()
    for name in PREFIX_FILES:
        shutil.copy(rounds["old"] / name, run_folder / name)
    check_database_prefix(run_folder, load_prepared(rounds["new"]))
    with pytest.raises(ValueError, match="only 6: it cannot begin with the old one"):
        check_database_prefix(rounds["new"], run_folder)
    (run_folder / "database_image_digests.npy").unlink()
    with pytest.raises(FileNotFoundError, match="database_image_digests.npy is missing"):
        check_database_prefix(run_folder, rounds["new"])


def test_database_prefix_problem_compares_labels_over_the_old_columns():
    digests = np.arange(3 * 16, dtype=np.uint8).reshape(3, 16)
    old = DatabaseRecord("old", "image-list", np.eye(3, dtype=np.uint8)[[0, 1, 2]], digests)
    widened = np.eye(4, dtype=np.uint8)[[0, 1, 2, 3]]
    new_digests = np.vstack([digests, digests[:1]])
    assert database_prefix_problem(old, DatabaseRecord("new", "image-list", widened, new_digests)) is None
    relabelled = widened.copy()
    relabelled[1, 3] = 1
    problem = database_prefix_problem(old, DatabaseRecord("new", "image-list", relabelled, new_digests))
    assert problem.startswith("database row 1: its labels differ: [0, 1, 0] in the old, [0, 1, 0, 1] in the new")


# ----------------------------------------------------------------------------------------------------------
# Checks of meaning before anything is written


def test_new_classes_labelled_only_in_old_columns_are_refused(rounds, lists, tmp_path, capsys):
    folder = lists["folder"]
    # The round's list has OLD's 3 columns plus a new one, but its new items are labelled in OLD's columns.
    shifted = write_list(folder / "shifted.txt", [(p, label_text([c % 3], 4))
                                                  for p, c in zip(lists["paths"]["newdb"], NEW_DATABASE)])
    out = tmp_path / "out"
    code, message = prepare_cli(capsys, *image_list_options(shifted, lists["newq"]), "--extends", rounds["old"],
                                "--out", out)
    assert code == 2
    assert message.startswith(f"error: --database-list {shifted}: its 3 new items carry only the classes of "
                              f"--extends {rounds['old']} (label columns 0..2)"), message
    assert "label this round's new classes in columns 3..3" in message
    assert_nothing_written(out)


def test_queries_of_classes_without_database_items_are_warned_about(rounds, lists, tmp_path):
    from loguru import logger
    warnings = []
    sink = logger.add(lambda message: warnings.append(str(message)), level="WARNING")
    try:
        folder = lists["folder"]
        # A first preparation: class 3 has queries but no database item.
        database = write_list(folder / "db4.txt", [(p, label_text([c], 4)) for p, c in
                                                   zip(lists["paths"]["db"], OLD_DATABASE)])
        query = write_list(folder / "q4.txt", [(p, label_text([c], 4)) for p, c in
                                               zip(lists["paths"]["q"], [0, 3, 3])])
        run(*image_list_options(database, query), "--num-seen", "2", "--out", tmp_path / "first")
        assert any("2 of 3 queries carry only classes that no database item has (class 3 " in w for w in warnings), \
            warnings
        # A round: its new query of class 4 has no database item, OLD's and the other new one have.
        warnings.clear()
        new_database = write_list(folder / "newdb5.txt", [(p, label_text([c], 5)) for p, c in
                                                          zip(lists["paths"]["newdb"], NEW_DATABASE)])
        new_query = write_list(folder / "newq5.txt", [(p, label_text([c], 5)) for p, c in
                                                      zip(lists["paths"]["newq"], [4, 1])])
        run(*image_list_options(new_database, new_query), "--extends", rounds["old"], "--out", tmp_path / "round")
        assert any("1 of 5 queries carry only classes that no database item has (class 4 " in w for w in warnings), \
            warnings
        warnings.clear()
        run(*image_list_options(lists["newdb"], lists["newq"]), "--extends", rounds["old"], "--out",
            tmp_path / "fine")
        assert not any("queries carry only classes" in w for w in warnings), warnings
    finally:
        logger.remove(sink)
