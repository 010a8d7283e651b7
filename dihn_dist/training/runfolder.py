"""The run folder: everything a run leaves behind, each file written atomically (temp file, then rename).

Layout:
    format.json                 run format marker (written first)
    config.json                 resolved configuration; "stage" lists every stage asked of this run
    manifest.json               the manifest of the prepared data the run started from
    metrics.json                every finished stage: evaluation row, per-iteration loss terms and times, checksums
    train.log, logs/rank*.log   loguru logs (rank 0's, and one per rank)
    tensorboard/                event files (rank 0)
    checkpoints/<stage>.pt      last complete outer iteration of a stage in progress
    <stage>/                    a finished stage; result.json is written last and marks it complete
        model.pt                state dict of the hashing network
        database_codes.npy      int8 +-1 codes of the stage's database (rows = database positions)
        database_codes.packed.npy  the same, numpy.packbits(codes > 0, axis=1)
        query_codes.npy         int8 +-1 codes of the query set from this stage's model
    database_labels.npy, query_labels.npy   copied from the prepared data

Only the main process writes (every writing method returns at once on the other ranks), so the trainer
never branches on rank to save something. The checks that decide whether a command may use this folder
(resume, changed settings, changed data, an old run to start stage 2 from) live here too.
"""
from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np
import torch

from ..common.atomic import atomic_write_bytes, atomic_write_json
from ..common.codes import pack_codes
from ..common.formats import (
    FOLDER_MARKER,
    IMAGE_DIGEST_FILES,
    INCREMENTAL,
    ORIGINAL,
    PUBLISHED_STAGES,
    RUN_FORMAT,
    STAGE_TITLES,
    STAGES,
    folder_kind,
    train_command,
)
from ..distributed import comm
from ..method.hashing import check_codes
from .run_reader import load_codes_file, load_run


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


# Settings that name files: config.json keeps them absolute, so that the commands the tools print
# (`--config RUN/config.json --out RUN ...`) work from any folder.
PATH_SETTINGS = ("data", "old_run", "old_codes", "pretrained")


def stored_settings(config) -> dict:
    settings = config.to_json()
    for key in PATH_SETTINGS:
        if settings.get(key) not in (None, "", "none"):
            settings[key] = str(Path(settings[key]).resolve())
    return settings


# Manifest keys that identify the prepared data a run trains on.
DATA_IDENTITY = ("dataset", "num_database", "num_query", "num_classes", "num_original", "num_seen", "files")


def data_differences(saved: dict, current: dict) -> List[str]:
    """What differs between two manifests, key by key (and file by file), in words."""
    differences = []
    for key in DATA_IDENTITY:
        before, after = saved.get(key), current.get(key)
        if before == after:
            continue
        if isinstance(before, dict) and isinstance(after, dict):
            for name in sorted(set(before) | set(after)):
                if before.get(name) != after.get(name):
                    differences.append(f"{key}/{name}: {before.get(name)!r} -> {after.get(name)!r}")
        else:
            differences.append(f"{key}: {before!r} -> {after!r}")
    return differences


class RunFolder:
    def __init__(self, root):
        self.root = Path(root)

    def path(self, *parts: str) -> Path:
        return self.root.joinpath(*parts)

    def checkpoint_path(self, stage: str) -> Path:
        return self.path("checkpoints", f"{stage}.pt")

    def stage_complete(self, stage: str) -> bool:
        return self.path(stage, "result.json").is_file()

    def finished_stages(self) -> List[str]:
        return [stage for stage in STAGES if self.stage_complete(stage)]

    def stage_covering(self, rows: int) -> str:
        """The last finished stage (incremental, else original) whose codes cover exactly `rows` database rows:
        the previous round's DIHN codes in a chain of rounds, or stage 1's codes when the same data goes on."""
        manifest = self.read_json("manifest.json") if self.path("manifest.json").is_file() else {}
        covers = {INCREMENTAL: manifest.get("num_database"), ORIGINAL: manifest.get("num_original")}
        for stage in PUBLISHED_STAGES:
            if self.stage_complete(stage) and covers[stage] == rows:
                return stage
        finished = ", ".join(f"{s} ({covers[s]} rows)" for s in covers if self.stage_complete(s)) or "none"
        raise ValueError(f"--old-run {self.root}: no finished stage has codes for the {rows} inherited rows of --data "
                         f"(finished: {finished}); prepare --data with --extends this run's data, or choose "
                         f"--old-stage")

    def has_run(self) -> bool:
        return self.path("config.json").is_file()

    def read_json(self, *parts: str) -> dict:
        return json.loads(self.path(*parts).read_text())

    def recorded_config(self) -> Optional[dict]:
        """The settings a run folder recorded (config.json), or None where the folder holds no run."""
        return self.read_json("config.json") if folder_kind(self.root) == "run" and self.has_run() else None

    # ------------------------------------------------------------------------------------------------
    # Checks before anything is written

    def check_resume(self, config, manifest: dict) -> None:
        """May this command use the folder? Only a new or empty folder, or a run folder; a run there needs
        --resume, the same settings and the same data."""
        kind = folder_kind(self.root)
        if kind == "prepared":
            raise ValueError(f"--out {self.root}: is a prepared data folder (its {FOLDER_MARKER} says so); the "
                             f"trainer never writes into data: choose another --out")
        if kind == "other":
            raise ValueError(f"--out {self.root}: exists and is not a dihn_dist run folder (no {FOLDER_MARKER} of a "
                             f"run); choose a new or empty folder")
        if not self.has_run():
            return
        if not config.resume:
            raise ValueError(f"--out {self.root}: already holds a run; pass --resume to continue it (or to add "
                             f"stages to it), or choose another --out")
        saved = self.read_json("config.json")
        current = stored_settings(config)
        changed = [k for k in _resume_invariants() if saved.get(k) != current.get(k)]
        if changed:
            detail = ", ".join(f"--{k.replace('_', '-')} {saved.get(k)!r} -> {getattr(config, k)!r}" for k in changed)
            raise ValueError(f"--resume {self.root}: the run was started with other settings ({detail}); resume "
                             f"it with `{train_command(self.root)}`, or choose another --out")
        if self.path("manifest.json").is_file():
            differences = data_differences(self.read_json("manifest.json"), manifest)
            if differences:
                raise ValueError(f"--resume {self.root}: the prepared data at --data {config.data} is not the data "
                                 f"this run started from ({'; '.join(differences[:5])}); pass the original --data")

    # ------------------------------------------------------------------------------------------------
    # Writing (main process only)

    def create(self, config, data) -> None:
        """The marker, the settings (stages asked of this run so far), the data's manifest and labels."""
        if comm.context().is_main:
            self._create(config, data)
        comm.barrier()

    def _create(self, config, data) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        self.remove_stale_temp_files()
        stages = list(config.stage)
        if self.has_run():
            stages += self.read_json("config.json").get("stage", [])
        settings = {**stored_settings(config), "stage": [s for s in STAGES if s in stages]}
        atomic_write_json(self.path("format.json"), RUN_FORMAT)
        atomic_write_json(self.path("config.json"), settings)
        atomic_write_json(self.path("manifest.json"), data.manifest)
        atomic_save_numpy(self.path("database_labels.npy"), data.database_labels)
        atomic_save_numpy(self.path("query_labels.npy"), data.query_labels)
        # A later round's --old-run checks, item by item, that its data begins with this run's.
        digests = data.root / IMAGE_DIGEST_FILES["database"]
        if digests.is_file():
            atomic_write_bytes(self.path(IMAGE_DIGEST_FILES["database"]), digests.read_bytes())

    def remove_stale_temp_files(self) -> None:
        """Temp files of writes that a kill -9 interrupted (never renamed into place)."""
        for temp in self.root.rglob(".*.tmp"):
            temp.unlink(missing_ok=True)

    def save_checkpoint(self, stage: str, state: Dict[str, Any]) -> None:
        """Objects with a state_dict are saved by it; everything else as it is. Every rank waits for it."""
        if comm.context().is_main:
            saved = {k: (v.state_dict() if hasattr(v, "state_dict") else v) for k, v in state.items()}
            atomic_torch_save(self.checkpoint_path(stage), saved)
        comm.barrier()

    def save_stage(self, stage: str, model_state: dict, database_codes: torch.Tensor,
                   query_codes: torch.Tensor, result: dict) -> None:
        if comm.context().is_main:
            codes = database_codes.detach().to("cpu", torch.int8).numpy()
            atomic_torch_save(self.path(stage, "model.pt"), model_state)
            atomic_save_numpy(self.path(stage, "database_codes.npy"), codes)
            atomic_save_numpy(self.path(stage, "database_codes.packed.npy"), pack_codes(codes))
            atomic_save_numpy(self.path(stage, "query_codes.npy"),
                              query_codes.detach().to("cpu", torch.int8).numpy())
            atomic_write_json(self.path(stage, "result.json"), result)
        comm.barrier()

    def write_metrics(self) -> dict:
        """metrics.json from every finished stage of the run, whichever command finished it."""
        results = {stage: self.read_json(stage, "result.json") for stage in self.finished_stages()}
        summary = {"rows": [{"name": STAGE_TITLES[k], "stage": k, **v["row"]} for k, v in results.items()],
                   "stages": results}
        if comm.context().is_main:
            atomic_write_json(self.path("metrics.json"), summary)
        return summary

    # ------------------------------------------------------------------------------------------------
    # Reading

    def restore_checkpoint(self, stage: str, **objects) -> Optional[dict]:
        """Load a stage's checkpoint into the given objects (each by load_state_dict); return the whole
        checkpoint for its plain values, or None when the stage has none."""
        path = self.checkpoint_path(stage)
        if not path.is_file():
            return None
        checkpoint = torch.load(path, map_location="cpu", weights_only=False)
        for name, target in objects.items():
            target.load_state_dict(checkpoint[name])
        return checkpoint


def _resume_invariants():
    from ..training.config import RESUME_INVARIANTS
    return RESUME_INVARIANTS


def load_old_codes(config, data, run: RunFolder) -> torch.Tensor:
    """B_old: the codes of the data's inherited rows [0, num_original), which stage 2 keeps bit for bit.

    From --old-codes FILE (codes from elsewhere), from --old-run RUN (RUN's database must be the beginning
    of --data's, checked item by item; its --old-stage, default the last finished stage whose codes cover
    the inherited rows), or from this run's own finished stage 1."""
    if config.old_codes:
        name = config.old_codes
        codes = torch.from_numpy(load_codes_file(config.old_codes, config.code_length))
    else:
        source = RunFolder(config.old_run) if config.old_run else run
        if config.old_run:
            check_old_run(source, config, data)
        stage = (config.old_stage or source.stage_covering(data.num_original)) if config.old_run else ORIGINAL
        if not source.stage_complete(stage):
            raise FileNotFoundError(
                f"{source.root}: has no finished {stage} stage, which stage 2 starts from; run --stage {stage} "
                f"first, or pass --old-run RUN_DIR of a run that has one (or --old-codes FILE)")
        name = f"{source.root}/{stage}/database_codes.packed.npy"
        codes = torch.from_numpy(load_run(source.root).stage(stage).database_codes)
    if tuple(codes.shape) != (data.num_original, config.code_length):
        raise ValueError(f"{name}: expected ({data.num_original}, {config.code_length}) codes, one per inherited "
                         f"database row of --data {data.root}, found {tuple(codes.shape)}")
    check_codes(name, codes)
    return codes


def check_old_run(source: RunFolder, config, data) -> None:
    """--old-run must be a finished run of the same code length whose database begins --data's."""
    from ..data.prepared import check_database_prefix
    if not source.finished_stages():
        raise FileNotFoundError(f"--old-run {source.root}: has no finished stage (no <stage>/result.json); finish "
                                f"it first, or pass --old-codes FILE")
    old_config = source.read_json("config.json")
    if old_config.get("code_length") != config.code_length:
        raise ValueError(f"--old-run {source.root}: was trained with code_length {old_config.get('code_length')!r}, "
                         f"this run uses {config.code_length!r}")
    try:
        check_database_prefix(source.root, data)
    except ValueError as mismatch:
        raise ValueError(f"--old-run {source.root}: its database is not the beginning of --data {data.root}'s "
                         f"({mismatch}); prepare --data with --extends the old run's data") from None
