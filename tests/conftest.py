"""Shared pytest fixtures."""
from __future__ import annotations

from pathlib import Path

import pytest

from dihn_dist import train


@pytest.fixture(scope="session")
def tiny_prepared(tmp_path_factory) -> Path:
    """A small Fashion-MNIST preparation (60 database items and 10 queries per class, 28 px raw RGB):
    600 database images (420 original, classes 0..6, then 180 incremental) and 100 queries."""
    from dihn_dist.data.prepare import prepare
    from dihn_dist.prepare import parse_args

    out = tmp_path_factory.mktemp("prepared") / "fashion-mnist-tiny"
    prepare(parse_args(["--dataset", "fashion-mnist", "--out", str(out), "--database-per-class", "60",
                        "--query-per-class", "10", "--resolution", "28", "--num-workers", "2"]))
    return out


@pytest.fixture(scope="session")
def tiny_nus(tmp_path_factory) -> Path:
    """A tiny synthetic NUS-WIDE tc21 (tests/bench/nus_synth.py: mosaics, 1-3 of 21 tags), prepared at 16 px:
    multi-label data."""
    import sys

    from dihn_dist.data.prepare import prepare
    from dihn_dist.prepare import parse_args
    sys.path.insert(0, str(Path(__file__).resolve().parent / "bench"))
    import nus_synth
    root = tmp_path_factory.mktemp("nus")
    nus_synth.generate(root / "source", num_database=90, query_per_tag=1, workers=1, log=lambda _: None)
    prepare(parse_args(["--dataset", "nus-wide-tc21", "--root", str(root / "source"), "--out", str(root / "data"),
                        "--max-side", "16", "--num-workers", "1"]))
    return root / "data"


# The training settings of every tiny run in the tests: seconds on 2 cores. A checkpoint after every outer
# iteration: the tests interrupt runs at given iterations.
TINY_TRAIN_ARGS = ["--arch", "small-cnn", "--code-length", "8", "--max-epoch", "1", "--num-samples", "120",
                   "--batch-size", "32", "--lr", "1e-3", "--num-workers", "1", "--device", "cpu", "--seed", "3",
                   "--checkpoint-every", "1"]


@pytest.fixture(scope="session")
def finished_run(tiny_prepared, tmp_path_factory) -> Path:
    """One finished tiny run (stages original, incremental, retrain) shared by the tests that only read it.
    --eval-every 1 gives the per-iteration mAP entries (eval_*) and their TensorBoard scalars."""

    out = tmp_path_factory.mktemp("finished_run") / "run"
    assert train.main(["--data", str(tiny_prepared), "--out", str(out), *TINY_TRAIN_ARGS,
                       "--max-iter", "2", "--stage", "all,retrain", "--eval-every", "1"]) == 0
    return out


def assert_plots_decode(out: Path, plots: dict, figure_inches: dict, markdown: str) -> None:
    """Every plot of a report is a PNG of its figure's size in pixels and the report's markdown links it."""
    from PIL import Image

    from dihn_dist.reports import figures

    assert set(plots) == set(figure_inches)
    text = (out / markdown).read_text()
    for name, file in plots.items():
        with Image.open(out / file) as image:
            image.verify()
        with Image.open(out / file) as image:
            width, height = figure_inches[name]
            assert image.size == (round(width * figures.DPI), round(height * figures.DPI)), name
            assert image.format == "PNG"
        assert f"]({file})" in text


def copy_run(run: Path, destination: Path) -> Path:
    """A copy to damage in a test (the shared run stays intact)."""
    import shutil
    shutil.copytree(run, destination)
    return destination


# A growing database: Fashion-MNIST in class rounds 0-3, +4-5, +6-7, +8-9 (classes so far after each round);
# small per-class limits keep each round seconds long.
CHAIN_CLASSES = (4, 6, 8, 10)
CHAIN_PREPARE_ARGS = ["--dataset", "fashion-mnist", "--database-per-class", "30", "--query-per-class", "5",
                      "--resolution", "28", "--num-workers", "2"]
CHAIN_TRAIN_ARGS = [*TINY_TRAIN_ARGS, "--max-iter", "2", "--num-samples", "60"]


@pytest.fixture(scope="session")
def chain(tmp_path_factory) -> dict:
    """Four rounds, prepared and trained through the CLIs: round 1 = stage original, rounds 2-4 = DIHN from
    the previous round's run (and the retrained baseline in round 2). {"data", "runs": folders, "folder"}."""
    from dihn_dist import prepare

    folder = tmp_path_factory.mktemp("rounds")
    data, runs = [], []
    for index, classes in enumerate(CHAIN_CLASSES):
        out = folder / f"data{index + 1}"
        extends = ["--extends", str(data[-1])] if data else []
        assert prepare.main([*CHAIN_PREPARE_ARGS, "--classes", str(classes), *extends, "--out", str(out)]) == 0
        data.append(out)
        run = folder / f"run{index + 1}"
        stages = ["--stage", "original"] if not runs else \
            ["--stage", "incremental,retrain" if index == 1 else "incremental", "--old-run", str(runs[-1])]
        assert train.main(["--data", str(out), "--out", str(run), *CHAIN_TRAIN_ARGS, *stages]) == 0
        runs.append(run)
    return {"data": data, "runs": runs, "folder": folder}
