"""One finished tiny run (stages original, incremental and retrain) shared by test_evaluate and test_retrieve.

Training it takes seconds but more than the tests that read it, so it is trained once per test session:
the folder lives under the session's tmp_path_factory and its path is cached here.
"""
from __future__ import annotations

import shutil
from pathlib import Path

from dihn_dist import train

ARGS = ["--arch", "small-cnn", "--code-length", "8", "--max-iter", "2", "--max-epoch", "1", "--num-samples", "120",
        "--batch-size", "32", "--lr", "1e-3", "--num-workers", "1", "--device", "cpu", "--stage", "all,retrain",
        # an evaluation after outer iteration 1 gives the per-iteration mAP entries (eval_*) and scalars
        "--eval-every", "1"]
_cache = {}


def finished_run(tiny_prepared: Path, tmp_path_factory) -> Path:
    if "run" not in _cache:
        out = tmp_path_factory.mktemp("tiny_run") / "run"
        assert train.main(["--data", str(tiny_prepared), "--out", str(out), *ARGS]) == 0
        _cache["run"] = out
    return _cache["run"]


def copy_run(run: Path, destination: Path) -> Path:
    """A copy to damage in a test (the shared run stays intact)."""
    shutil.copytree(run, destination)
    return destination
