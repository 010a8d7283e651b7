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
