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
def temp_beside(path) -> Iterator[Path]:
    """A new empty temp file in `path`'s folder (permissions as open() would give, see current_umask),
    removed when the block ends unless the block renamed it: for writers that publish several files."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        try:
            # mkstemp creates 0600 whatever the umask; published files get what open() would give them,
            # so that the accounts the umask admits (a serving account reading the codes) can read them.
            os.fchmod(handle, 0o666 & ~current_umask())
        finally:
            os.close(handle)
        yield Path(temp)
    finally:
        if os.path.exists(temp):
            os.unlink(temp)


def fsync_file(path) -> None:
    with open(path, "rb+") as file:
        os.fsync(file.fileno())


@contextmanager
def atomic_path(path) -> Iterator[Path]:
    """A temp path in `path`'s folder to write to (for writers that want a file name, not bytes); when the
    block ends without an error the temp file is fsynced and renamed to `path`, otherwise removed."""
    with temp_beside(path) as temp:
        yield temp
        fsync_file(temp)
        os.replace(temp, path)


def current_umask() -> int:
    """The process's umask: from /proc on Linux (no window in which another thread sees a changed umask),
    else by setting and restoring it."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: Path, payload: bytes) -> None:
    """Write to a temp file in the same folder, fsync, rename: a crash leaves the old file or the new one."""
    with atomic_path(path) as temp:
        temp.write_bytes(payload)


def atomic_write_json(path: Path, value: Any) -> None:
    atomic_write_bytes(path, (json.dumps(value, indent=2, sort_keys=True) + "\n").encode())
