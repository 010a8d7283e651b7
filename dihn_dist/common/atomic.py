"""Atomic file writes with the standard library alone: a crash leaves the old file or the new one, never half.

Kept apart from `runfolder.py` (which needs torch for checkpoints) so that the torch-free tools (the FAISS
export) write the same way.
"""
from __future__ import annotations

import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator


@contextmanager
def atomic_path(path) -> Iterator[Path]:
    """A temp path in `path`'s folder to write to (for writers that want a file name, not bytes); when the
    block ends without an error the temp file is fsynced and renamed to `path`, otherwise removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(handle)
    try:
        yield Path(temp)
        with open(temp, "rb+") as file:
            os.fsync(file.fileno())
        os.replace(temp, path)
    except BaseException:
        if os.path.exists(temp):
            os.unlink(temp)
        raise


def atomic_write_bytes(path: Path, payload: bytes) -> None:
    """Write to a temp file in the same folder, fsync, rename: a crash leaves the old file or the new one."""
    with atomic_path(path) as temp:
        temp.write_bytes(payload)


def atomic_write_json(path: Path, value: Any) -> None:
    atomic_write_bytes(path, (json.dumps(value, indent=2, sort_keys=True) + "\n").encode())
