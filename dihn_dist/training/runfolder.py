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

import fcntl
import hashlib
import io
import json
import os
import socket
import threading
import zipfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import numpy as np
import torch
from loguru import logger

from ..common.atomic import atomic_write_bytes, atomic_write_json, fsync_file
from ..common.codes import pack_codes, unpack_codes
from ..common.errors import cannot_create
from ..common.formats import (
    FOLDER_MARKER,
    IMAGE_DIGEST_FILES,
    INCREMENTAL,
    ORIGINAL,
    PUBLISHED_STAGES,
    RUN_FORMAT,
    RUN_LOCK,
    STAGE_TITLES,
    STAGES,
    folder_kind,
    train_command,
)
from ..distributed import comm
from .run_reader import check_codes_file, code_rows, load_codes_file, load_run, stage_train_command


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


def host_copy(value: Any) -> Any:
    """A copy of a (nested dict/list/tuple of) state that later training steps cannot change: every tensor
    copied to the host (also a CPU tensor, which a state dict only references), every container new."""
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", copy=True)
    if isinstance(value, dict):
        return type(value)((k, host_copy(v)) for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return type(value)(host_copy(v) for v in value)
    return value


def codes_checksum(codes: torch.Tensor) -> str:
    """sha256 of the codes as int8 +-1 rows: equal checksums mean bit-identical codes."""
    array = codes.detach().to("cpu", torch.int8).contiguous().numpy()
    return hashlib.sha256(array.tobytes()).hexdigest()


# Settings that name files: config.json keeps them absolute, so that the commands the tools print
# (`--config RUN/config.json --out RUN ...`) work from any folder, and `--config RUN/config.json --resume`
# run from another folder continues RUN instead of starting a run under that folder.
PATH_SETTINGS = ("data", "root", "out", "old_run", "old_codes", "pretrained")


def stored_settings(config) -> dict:
    settings = config.to_json()
    for key in PATH_SETTINGS:
        if settings.get(key) not in (None, "", "none", "auto"):
            settings[key] = str(Path(settings[key]).resolve())
    return settings


# The config.json entry recording what --pretrained resolved to (file, sha256, source): written by the
# trainer, not a setting (a config file may carry it; it is then ignored).
RECORDED_WEIGHTS = "weights"


def check_same_weights(run: "RunFolder", weights) -> None:
    """--resume must start from the weights the run started from (a reinstalled package or another file
    under the same --pretrained would otherwise mix two backbones in one run)."""
    saved = run.read_json("config.json") if run.has_run() else {}
    if RECORDED_WEIGHTS not in saved:  # a new run, or one from before the weights were recorded
        return
    recorded = (saved[RECORDED_WEIGHTS] or {}).get("sha256")
    current = weights.sha256 if weights else None
    if recorded != current:
        raise ValueError(f"--resume {run.root}: the run started from weights with sha256 {recorded or 'none'}, "
                         f"--pretrained now gives {current or 'none'} ({weights.file if weights else 'no file'}); "
                         f"restore those weights or choose another --out")


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
        self._lock = None  # rank 0's open lock file while this trainer holds the folder
        self._writer: Optional[threading.Thread] = None
        self._writer_error: Optional[BaseException] = None

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
    # One trainer per run folder: rank 0 holds an exclusive lock on it from its first check to the end

    def claim(self, config, manifest: dict) -> None:
        """May this command use the folder (check_resume)? A run folder is locked first, so that a second
        trainer is refused before it reads or writes anything. Rank 0's decision (comm.rank0_decides)."""
        if folder_kind(self.root) == "run":
            self.lock()
        try:
            self.check_resume(config, manifest)
        except BaseException:
            self.release()
            raise

    def lock(self) -> None:
        """Take the folder's lock for the rest of this trainer's run, or refuse naming its holder."""
        if self._lock is not None:
            return
        path = self.path(RUN_LOCK)
        try:
            handle = open(path, "a+")
        except OSError as error:
            raise ValueError(f"--out {self.root}: cannot write into it ({error.strerror or error}); choose a "
                             f"writable --out") from None
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "its pid and host not written yet"
            handle.close()
            raise ValueError(f"--out {self.root}: another trainer is using this run folder ({holder}; it holds "
                             f"{path}); wait until it ends, or stop it, before starting another trainer on this "
                             f"folder") from None
        except OSError as error:
            # Some parallel filesystems are mounted without lock support: train unguarded rather than never.
            handle.close()
            logger.warning(f"{path}: the filesystem refuses locks ({error.strerror or error}); nothing stops a "
                           f"second trainer from using {self.root} at the same time")
            self._lock = False
            return
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()} on host {socket.gethostname()}\n")
        handle.flush()
        self._lock = handle

    def release(self) -> None:
        """Let go of the lock (the kernel does it anyway when the process ends, however it ends). The pid and
        host are wiped first, while still holding it, so that a trainer that ended, or was refused by a check,
        leaves the file empty and names no one."""
        if self._lock:
            try:
                self._lock.truncate(0)
            except OSError:
                pass
            self._lock.close()
        self._lock = None

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
        # A setting its config.json lacks did not exist yet when the run started: the run had its default.
        changed = [k for k in _resume_invariants() if saved.get(k, _default_of(k)) != current.get(k)]
        if changed:
            detail = ", ".join(f"--{k.replace('_', '-')} {saved.get(k, _default_of(k))!r} -> {getattr(config, k)!r}"
                               for k in changed)
            raise ValueError(f"--resume {self.root}: the run was started with other settings ({detail}); resume "
                             f"it with `{train_command(self.root)}`, or choose another --out")
        if self.path("manifest.json").is_file():
            differences = data_differences(self.read_json("manifest.json"), manifest)
            if differences:
                raise ValueError(f"--resume {self.root}: the prepared data at --data {config.data} is not the data "
                                 f"this run started from ({'; '.join(differences[:5])}); pass the original --data")

    # ------------------------------------------------------------------------------------------------
    # Writing (main process only)

    def create(self, config, data, weights=None) -> None:
        """The marker, the settings (stages asked of this run so far; under "weights" the ImageNet weights
        file the backbone starts from and its sha256), the data's manifest and labels.
        Rank 0 writes; every rank gets its success or its error."""
        comm.rank0_decides(lambda: self._create(config, data, weights))

    def _create(self, config, data, weights=None) -> None:
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise cannot_create("--out", self.root, error) from None
        if self._lock is None:
            self.lock()
            # Again under the lock: another trainer may have started a run here since the first check.
            self.check_resume(config, data.manifest)
        self.remove_stale_temp_files()
        stages = list(config.stage)
        if self.has_run():
            stages += self.read_json("config.json").get("stage", [])
        settings = {**stored_settings(config), "stage": [s for s in STAGES if s in stages],
                    RECORDED_WEIGHTS: weights.to_json() if weights else None}
        try:
            atomic_write_json(self.path("format.json"), RUN_FORMAT)
            atomic_write_json(self.path("manifest.json"), data.manifest)
            atomic_save_numpy(self.path("database_labels.npy"), data.database_labels)
            atomic_save_numpy(self.path("query_labels.npy"), data.query_labels)
            # A later round's --old-run checks, item by item, that its data begins with this run's.
            digests = data.root / IMAGE_DIGEST_FILES["database"]
            if digests.is_file():
                atomic_write_bytes(self.path(IMAGE_DIGEST_FILES["database"]), digests.read_bytes())
            # Last: a folder without config.json holds no run yet, so a start that failed here is not
            # taken for a run by the next command.
            atomic_write_json(self.path("config.json"), settings)
        except OSError as error:
            raise OSError(f"--out {self.root}: could not write the run folder ({error.strerror or error}); make "
                          f"room or choose another --out, then run the command again") from None

    def remove_stale_temp_files(self) -> None:
        """Temp files of writes that a kill -9 interrupted (never renamed into place)."""
        for temp in self.root.rglob(".*.tmp"):
            temp.unlink(missing_ok=True)

    def save_checkpoint(self, stage: str, state: Dict[str, Any], background: bool = False) -> None:
        """Objects with a state_dict are saved by it; everything else as it is.

        Synchronous (the default): written and fsynced before every rank goes on. background: rank 0 takes a
        host copy of the state now and a thread writes it while training goes on (the other ranks do not
        wait at all); the previous background write is finished first, and its error, if any, is raised
        here or by `wait_for_checkpoint`."""
        if comm.context().is_main:
            self.wait_for_checkpoint()
            saved = {k: (v.state_dict() if hasattr(v, "state_dict") else v) for k, v in state.items()}
            if background:
                self._start_writer(self.checkpoint_path(stage), host_copy(saved))
            else:
                atomic_torch_save(self.checkpoint_path(stage), saved)
        if not background:
            comm.barrier()

    def _start_writer(self, path: Path, state: Dict[str, Any]) -> None:
        def write():
            try:
                atomic_torch_save(path, state)
            except BaseException as error:  # noqa: B902 - handed to the training thread
                self._writer_error = error
        self._writer = threading.Thread(target=write, name=f"checkpoint {path.name}", daemon=True)
        self._writer.start()

    def wait_for_checkpoint(self) -> None:
        """Until the background checkpoint write (if any) is on disk; raises its error."""
        if self._writer is not None:
            self._writer.join()
            self._writer = None
        error, self._writer_error = self._writer_error, None
        if error is not None:
            raise error

    @contextmanager
    def checkpoints_landing(self, stage: str):
        """The block's background checkpoint writes are on disk when it ends. A write that failed is raised,
        unless another error is ending the block already: then it is only logged, so that it does not hide
        the error that stopped the stage."""
        try:
            yield
        except BaseException:
            try:
                self.wait_for_checkpoint()
            except Exception as write_error:  # noqa: B902
                logger.error(f"stage {stage}: the last checkpoint could not be written: {write_error}")
            raise
        self.wait_for_checkpoint()

    def features_path(self, key: dict) -> Path:
        """The feature cache of a frozen trunk: its name carries the weights' sha256 prefix, the input
        side and the precision, its header the whole key (load_features compares it)."""
        return self.path("features", f"{key['arch']}-{key['weights_sha256'][:16]}-{key['resolution']}px-"
                                     f"{key['precision']}.pt")

    def save_features(self, key: dict, tables: Dict[str, torch.Tensor]) -> None:
        """Written atomically by rank 0; every rank waits for it."""
        if comm.context().is_main:
            atomic_torch_save(self.features_path(key), {"key": key, **{k: v.cpu() for k, v in tables.items()}})
        comm.barrier()

    def load_features(self, key: dict) -> Optional[Dict[str, torch.Tensor]]:
        """The cached tables for exactly this key, else None (absent, or computed under another key)."""
        path = self.features_path(key)
        if not path.is_file():
            return None
        cached = torch.load(path, map_location="cpu", weights_only=True)
        if cached.get("key") != key:
            return None
        return {k: v for k, v in cached.items() if k != "key"}

    def save_stage(self, stage: str, model_state: dict, database_codes: Optional[torch.Tensor],
                   query_codes: torch.Tensor, result: dict) -> None:
        """The stage's files, result.json last (it marks the stage finished). database_codes None: written
        already from the shards (save_database_codes_from_shards)."""
        if comm.context().is_main:
            atomic_torch_save(self.path(stage, "model.pt"), model_state)
            if database_codes is not None:
                codes = database_codes.detach().to("cpu", torch.int8).numpy()
                atomic_save_numpy(self.path(stage, "database_codes.npy"), codes)
                atomic_save_numpy(self.path(stage, "database_codes.packed.npy"), pack_codes(codes))
            atomic_save_numpy(self.path(stage, "query_codes.npy"),
                              query_codes.detach().to("cpu", torch.int8).numpy())
            atomic_write_json(self.path(stage, "result.json"), result)
        comm.barrier()

    def save_database_codes_from_shards(self, stage: str, packed: torch.Tensor, first_row: int, num_rows: int,
                                        code_length: int, block_rows: int = 1 << 20) -> None:
        """database_codes.packed.npy and its int8 form written by every rank, each its own rows (packed: rows
        [first_row, first_row + len(packed))): rank 0 creates each file at a temp name with its final size,
        every rank writes its rows into it (a numpy memmap; the int8 rows unpacked a block at a time) and
        fsyncs, and rank 0 renames it into place once every rank is done. No rank holds more than its rows,
        and the name never shows a half-written file (a crash leaves a temp file that the next start
        removes)."""
        packed = packed.detach().to("cpu").numpy()
        layouts = {"database_codes.npy": (np.int8, code_length), "database_codes.packed.npy": (np.uint8, packed.shape[1])}
        temps = {name: self.path(stage, f".{name}.shards.tmp") for name in layouts}

        def create() -> None:
            self.path(stage).mkdir(parents=True, exist_ok=True)
            for name, (dtype, width) in layouts.items():
                np.lib.format.open_memmap(temps[name], mode="w+", dtype=dtype, shape=(num_rows, width)).flush()

        comm.rank0_decides(create)
        for name in layouts:
            if packed.shape[0]:
                target = np.lib.format.open_memmap(temps[name], mode="r+")
                for lo in range(0, packed.shape[0], block_rows):
                    rows = packed[lo:lo + block_rows]
                    rows = rows if name.endswith("packed.npy") else unpack_codes(rows, code_length)
                    target[first_row + lo:first_row + lo + rows.shape[0]] = rows
                target.flush()
                del target
            fsync_file(temps[name])
        comm.barrier()
        if comm.context().is_main:
            for name in layouts:
                os.replace(temps[name], self.path(stage, name))
        comm.barrier()

    def codes_checkpoint_path(self, stage: str, iteration: int) -> Path:
        """The folder of a sharded run's codes after an outer iteration (0-based), beside the checkpoint
        that names it."""
        return self.path("checkpoints", f"{stage}.codes.it{iteration + 1}")

    def save_codes_checkpoint(self, stage: str, iteration: int, shard: torch.Tensor, first_row: int) -> str:
        """Every rank's rows of the codes as it holds them (packed), with torch.distributed.checkpoint: one file
        a rank, the folder renamed into place when complete. Returns the folder's name, for the checkpoint to
        record."""
        folder = self.codes_checkpoint_path(stage, iteration)
        comm.save_rank_tensors({f"rows_{first_row}_{first_row + shard.shape[0]}": shard}, folder)
        return folder.name

    def load_codes_checkpoint(self, name: str, first_row: int, end_row: int) -> torch.Tensor:
        """This rank's rows [first_row, end_row) of a codes folder that save_codes_checkpoint wrote, from
        whatever world size wrote it."""
        folder = self.path("checkpoints", name)
        if not folder.is_dir():
            raise ValueError(f"--resume: {folder}, which holds the codes of the checkpoint of stage "
                             f"{name.split('.codes.')[0]}, is missing; delete {self.path('checkpoints')}/"
                             f"{name.split('.codes.')[0]}.pt to start that stage again from its first outer iteration")
        return comm.load_rank_rows(folder, first_row, end_row)

    def remove_codes_checkpoints(self, stage: str, keep) -> None:
        """Rank 0 removes the stage's codes folders (and their temp folders) that no checkpoint names any more."""
        if not comm.context().is_main:
            return
        import shutil
        for folder in self.path("checkpoints").glob(f"{stage}.codes.it*"):
            if folder.name not in keep:
                shutil.rmtree(folder, ignore_errors=True)

    def write_metrics(self) -> dict:
        """metrics.json from every finished stage of the run, whichever command finished it (read and
        written by rank 0, the summary sent to every rank)."""
        return comm.rank0_decides(self._write_metrics)

    def _write_metrics(self) -> dict:
        results = {stage: self.read_json(stage, "result.json") for stage in self.finished_stages()}
        summary = {"rows": [{"name": STAGE_TITLES[k], "stage": k, **v["row"]} for k, v in results.items()],
                   "stages": results}
        atomic_write_json(self.path("metrics.json"), summary)
        return summary

    # ------------------------------------------------------------------------------------------------
    # Reading

    def restore_checkpoint(self, stage: str, **objects) -> Optional[dict]:
        """Load a stage's checkpoint into the given objects (each by load_state_dict); return the whole
        checkpoint for its plain values, or None when the stage has none. Rank 0 reads it and sends it to
        every rank, so every rank resumes from the same iteration (or none does)."""
        checkpoint = comm.rank0_decides(lambda: self.read_checkpoint(stage))
        if checkpoint is None:
            return None
        for name, target in objects.items():
            target.load_state_dict(checkpoint[name])
        return checkpoint

    def read_checkpoint(self, stage: str) -> Optional[dict]:
        path = self.checkpoint_path(stage)
        if not path.is_file():
            return None
        try:
            return torch.load(path, map_location="cpu", weights_only=False)
        except Exception as error:  # noqa: B902 - torch reports damage as RuntimeError, EOFError, pickle errors
            raise ValueError(self.damaged_checkpoint(stage, error)) from None

    def check_checkpoints(self, stages) -> None:
        for stage in stages:
            if not self.stage_complete(stage):
                self.check_checkpoint(stage)

    def check_checkpoint(self, stage: str) -> None:
        """A truncated or empty checkpoint, named before anything is written (only its zip directory is read:
        it sits at the end of the file, so a cut-off file has none)."""
        path = self.checkpoint_path(stage)
        if not path.is_file():
            return
        try:
            with zipfile.ZipFile(path) as archive:
                archive.namelist()
        except (zipfile.BadZipFile, OSError, EOFError) as error:
            raise ValueError(self.damaged_checkpoint(stage, error)) from None

    def damaged_checkpoint(self, stage: str, error: BaseException) -> str:
        reason = " ".join(str(error).split()) or type(error).__name__
        return (f"{self.checkpoint_path(stage)}: the checkpoint of stage {stage} cannot be read ({reason}; the "
                f"file is truncated or damaged); delete it to start stage {stage} again from its first outer "
                f"iteration (finished stages are kept), or put back an intact copy of it")


def _resume_invariants():
    from ..training.config import RESUME_INVARIANTS
    return RESUME_INVARIANTS


def _default_of(name: str):
    from ..training.config import default_of
    return default_of(name)


def load_old_codes(config, data, run: RunFolder) -> torch.Tensor:
    """B_old, whole (find_old_codes names and checks its file)."""
    return torch.from_numpy(load_codes_file(find_old_codes(config, data, run), config.code_length))


def old_code_rows(config, data, run: RunFolder, sharded: bool) -> Callable[[int, int], object]:
    """B_old as rows [a, b) on demand. Whole database (sharded False): rank 0 reads every row and sends them, so
    a rank on a node that does not see the file yet gets them too. Sharded: rank 0 checks the file
    (find_old_codes, a block at a time), then each rank reads only its rows of it (memory-mapped; the run
    folder is on storage every node sees, as the shards' checkpoints need), so no rank holds B_old whole."""
    if not sharded:
        codes = comm.rank0_decides(lambda: load_old_codes(config, data, run))
        return lambda a, b: codes[a:b]
    codes = np.load(comm.rank0_decides(lambda: find_old_codes(config, data, run)), mmap_mode="r", allow_pickle=False)
    return lambda a, b: code_rows(codes, config.code_length, a, b)


def find_old_codes(config, data, run: RunFolder) -> str:
    """The file of B_old, checked: the codes of the data's inherited rows [0, num_original), which stage 2
    keeps bit for bit.

    From --old-codes FILE (codes from elsewhere), from --old-run RUN (RUN's database must be the beginning
    of --data's, checked item by item; its --old-stage, default the last finished stage whose codes cover
    the inherited rows), or from this run's own finished stage 1 (their database_codes.packed.npy)."""
    if config.old_codes:
        name = config.old_codes
    else:
        source = RunFolder(config.old_run) if config.old_run else run
        if config.old_run:
            check_old_run(source, config, data)
        stage = (config.old_stage or source.stage_covering(data.num_original)) if config.old_run else ORIGINAL
        if not source.stage_complete(stage):
            raise FileNotFoundError(
                f"{source.root}: has no finished {stage} stage, which stage 2 starts from; "
                + (f"pass --stage {ORIGINAL},{INCREMENTAL} to train it first" if not config.old_run else
                   f"train it with `{stage_train_command(load_run(source.root), stage)}`")
                + ", or pass --old-run RUN_DIR of a run that has one (or --old-codes FILE)")
        name = f"{source.root}/{stage}/database_codes.packed.npy"
    codes = check_codes_file(name, config.code_length)
    shape = (codes.shape[0], config.code_length if codes.dtype == np.uint8 else codes.shape[1])
    if shape != (data.num_original, config.code_length):
        raise ValueError(f"{name}: expected ({data.num_original}, {config.code_length}) codes, one per inherited "
                         f"database row of --data {data.root}, found {shape}")
    return name


def check_old_run(source: RunFolder, config, data) -> None:
    """--old-run must be a finished run of the same code length whose database begins --data's."""
    from ..data.prepared import check_database_prefix
    kind = folder_kind(source.root)
    if kind == "prepared":
        raise ValueError(f"--old-run {source.root}: is a prepared data folder, not a run folder; pass the --out of "
                         f"the run trained on it (or --old-codes FILE)")
    if kind != "run":
        what = "does not exist" if kind == "missing" else f"is not a dihn_dist run folder (no {FOLDER_MARKER} of a run)"
        raise FileNotFoundError(f"--old-run {source.root}: {what}; pass the --out of a finished run (or "
                                f"--old-codes FILE)")
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
