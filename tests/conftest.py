"""Shared pytest fixtures."""
from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_prepared(tmp_path_factory) -> Path:
    """A small Fashion-MNIST preparation (60 database items and 10 queries per class, 28 px raw RGB):
    600 database images (420 original, classes 0..6, then 180 incremental) and 100 queries."""
    from dihn_dist.prepare import parse_args, prepare

    out = tmp_path_factory.mktemp("prepared") / "fashion-mnist-tiny"
    prepare(parse_args(["--dataset", "fashion-mnist", "--out", str(out), "--database-per-class", "60",
                        "--query-per-class", "10", "--resolution", "28", "--num-workers", "2"]))
    return out


# The training settings of every tiny run in the tests: seconds on 2 cores.
TINY_TRAIN_ARGS = ["--arch", "small-cnn", "--code-length", "8", "--max-epoch", "1", "--num-samples", "120",
                   "--batch-size", "32", "--lr", "1e-3", "--num-workers", "1", "--device", "cpu", "--seed", "3"]


@pytest.fixture(scope="session")
def finished_run(tiny_prepared, tmp_path_factory) -> Path:
    """One finished tiny run (stages original, incremental, retrain) shared by the tests that only read it.
    --eval-every 1 gives the per-iteration mAP entries (eval_*) and their TensorBoard scalars."""
    from dihn_dist import train

    out = tmp_path_factory.mktemp("finished_run") / "run"
    assert train.main(["--data", str(tiny_prepared), "--out", str(out), *TINY_TRAIN_ARGS,
                       "--max-iter", "2", "--stage", "all,retrain", "--eval-every", "1"]) == 0
    return out


def copy_run(run: Path, destination: Path) -> Path:
    """A copy to damage in a test (the shared run stays intact)."""
    import shutil
    shutil.copytree(run, destination)
    return destination
