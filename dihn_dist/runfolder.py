"""The run folder: everything a run leaves behind, each file written atomically (temp file, then rename).

Layout:
    config.json                 resolved configuration
    metrics.json                per stage: evaluation rows, per-iteration loss terms and times, checksums
    train.log, logs/rank*.log   loguru logs (rank 0's, and one per rank)
    tensorboard/                event files (rank 0)
    checkpoints/<stage>.pt      last complete outer iteration of a stage in progress
    <stage>/                    a finished stage; result.json is written last and marks it complete
        model.pt                state dict of the hashing network
        database_codes.npy      int8 +-1 codes of the stage's database (rows = database positions)
        database_codes.packed.npy  the same, numpy.packbits(codes > 0, axis=1)
        query_codes.npy         int8 +-1 codes of the query set from this stage's model
    database_labels.npy, query_labels.npy, manifest.json   copied from the prepared data
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch


def atomic_write_bytes(path: Path, payload: bytes) -> None:
    """Write to a temp file in the same folder, fsync, rename: a crash leaves the old file or the new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as file:
            file.write(payload)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temp, path)
    except BaseException:
        if os.path.exists(temp):
            os.unlink(temp)
        raise


def atomic_write_json(path: Path, value: Any) -> None:
    atomic_write_bytes(path, (json.dumps(value, indent=2, sort_keys=True) + "\n").encode())


def atomic_save_numpy(path: Path, array: np.ndarray) -> None:
    buffer = io.BytesIO()
    np.save(buffer, array)
    atomic_write_bytes(path, buffer.getvalue())


def atomic_torch_save(path: Path, value: Any) -> None:
    buffer = io.BytesIO()
    torch.save(value, buffer)
    try:
        atomic_write_bytes(path, buffer.getvalue())
    except OSError as error:
        raise OSError(f"could not write {path} ({error.strerror or error}); the previous version of it, "
                      f"if any, is intact") from error


def codes_checksum(codes: torch.Tensor) -> str:
    """sha256 of the codes as int8 +-1 rows: equal checksums mean bit-identical codes."""
    array = codes.detach().to("cpu", torch.int8).contiguous().numpy()
    return hashlib.sha256(array.tobytes()).hexdigest()


class RunFolder:
    def __init__(self, root: str):
        self.root = Path(root)

    def path(self, *parts: str) -> Path:
        return self.root.joinpath(*parts)

    def checkpoint_path(self, stage: str) -> Path:
        return self.path("checkpoints", f"{stage}.pt")

    def stage_complete(self, stage: str) -> bool:
        return self.path(stage, "result.json").is_file()

    def has_run(self) -> bool:
        return self.path("config.json").is_file()

    def read_json(self, *parts: str) -> dict:
        return json.loads(self.path(*parts).read_text())

    def save_stage(self, stage: str, model_state: dict, database_codes: torch.Tensor,
                   query_codes: torch.Tensor, result: dict) -> None:
        codes = database_codes.detach().to("cpu", torch.int8).numpy()
        atomic_torch_save(self.path(stage, "model.pt"), model_state)
        atomic_save_numpy(self.path(stage, "database_codes.npy"), codes)
        atomic_save_numpy(self.path(stage, "database_codes.packed.npy"), np.packbits(codes > 0, axis=1))
        atomic_save_numpy(self.path(stage, "query_codes.npy"), query_codes.detach().to("cpu", torch.int8).numpy())
        atomic_write_json(self.path(stage, "result.json"), result)

    def load_stage(self, stage: str) -> dict:
        """A finished stage: model state, database codes (int8 tensor), query codes and its result."""
        folder = self.path(stage)
        if not self.stage_complete(stage):
            raise FileNotFoundError(f"{folder}: stage {stage!r} is not complete (no result.json); run "
                                    f"python -m dihn_dist.train --out {self.root} --stage {stage} --resume")
        return {
            "model": torch.load(folder / "model.pt", map_location="cpu", weights_only=True),
            "database_codes": torch.from_numpy(np.load(folder / "database_codes.npy")),
            "query_codes": torch.from_numpy(np.load(folder / "query_codes.npy")),
            "result": json.loads((folder / "result.json").read_text()),
        }

    def load_checkpoint(self, stage: str) -> Optional[dict]:
        path = self.checkpoint_path(stage)
        if not path.is_file():
            return None
        return torch.load(path, map_location="cpu", weights_only=False)
