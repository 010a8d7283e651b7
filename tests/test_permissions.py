"""Published files honour the umask: a serving account that the umask admits can read codes, configs,
checkpoints, manifests, FAISS indexes and their sidecars (temp files made by mkstemp are 0600 otherwise)."""
from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
from conftest import TINY_TRAIN_ARGS

from dihn_dist import prepare, train
from dihn_dist.common.atomic import atomic_write_bytes

pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # numba finalizers


@pytest.fixture
def umask():
    """Set the process umask for one test, restored after it."""
    saved = os.umask(0o022)
    os.umask(saved)

    def set_umask(mask: int) -> None:
        os.umask(mask)

    yield set_umask
    os.umask(saved)


def modes(root: Path) -> dict:
    return {str(path.relative_to(root)): stat.S_IMODE(path.stat().st_mode) for path in sorted(root.rglob("*"))}


def test_atomic_writes_take_the_umask(tmp_path, umask):
    for mask, expected in ((0o022, 0o644), (0o027, 0o640), (0o077, 0o600)):
        umask(mask)
        path = tmp_path / f"file-{mask:o}"
        atomic_write_bytes(path, b"x")
        assert stat.S_IMODE(path.stat().st_mode) == expected, oct(mask)


def test_every_file_of_a_prepare_train_export_is_0644_under_umask_022(tmp_path, umask):
    umask(0o022)
    data, run = tmp_path / "data", tmp_path / "run"
    assert prepare.main(["--dataset", "fashion-mnist", "--out", str(data), "--database-per-class", "12",
                         "--query-per-class", "3", "--resolution", "28", "--num-workers", "2"]) == 0
    assert train.main(["--data", str(data), "--out", str(run), *TINY_TRAIN_ARGS, "--max-iter", "1",
                       "--num-samples", "60", "--stage", "original"]) == 0
    written = [data, run]
    try:
        import faiss  # noqa: F401 - only whether it is installed
    except ImportError:   # the FAISS export is an optional extra: check the rest without it
        faiss = None
    if faiss is not None:
        from dihn_dist import export
        served = tmp_path / "served"
        assert export.main([str(run), "--faiss", str(served / "codes.index")]) == 0
        assert export.main([str(run), "--faiss", str(served / "codes.index"), "--append-to",
                            str(served / "codes.index")]) == 0
        written.append(served)
    for root in written:
        found = modes(root)
        files = {name: mode for name, mode in found.items() if (root / name).is_file()}
        folders = {name: mode for name, mode in found.items() if (root / name).is_dir()}
        assert files and all(mode == 0o644 for mode in files.values()), {k: oct(v) for k, v in files.items()}
        assert all(mode == 0o755 for mode in folders.values()), {k: oct(v) for k, v in folders.items()}
    assert {"config.json", "manifest.json", "original/database_codes.npy", "original/model.pt"} <= set(modes(run))
    assert any(name.startswith("checkpoints/") for name in modes(run))
