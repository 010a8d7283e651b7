"""Reading a run folder's exported codes and labels with numpy alone (no torch, no dihn_dist needed).

The exported format (what `python -m dihn_dist.train --out RUN_DIR` leaves; a serving system can load it
with the standard library and numpy, and may copy this file and `formats.py` as they are):

    RUN_DIR/format.json            {"format": "dihn_dist.run", "format_version": 1}
    RUN_DIR/config.json            the trainer's settings; code_length (c), arch, resolution, topk, precision_k
    RUN_DIR/manifest.json          the prepared data's manifest: "format": "dihn_dist.prepared",
                                   "format_version": 1 or 2, num_database (n), num_query (q), num_classes (L),
                                   num_original, num_seen, class_names
    RUN_DIR/database_labels.npy    uint8 (n, L), 1 where the database item carries the class
    RUN_DIR/query_labels.npy       uint8 (q, L), the same for the query set
    RUN_DIR/<stage>/               one folder per finished stage: original, incremental, retrain
        result.json                written last: a stage folder without it is not finished
        database_codes.packed.npy  uint8 (rows, ceil(c / 8)) = numpy.packbits(codes > 0, axis=1): bit j of a
                                   code is bit 7 - j % 8 of byte j // 8 (numpy's big-endian bit order), 1 = +1,
                                   padding bits are 0. Unpack: numpy.unpackbits(packed, axis=1, count=c).
        database_codes.npy         the same codes as int8 +-1 (rows, c)
        query_codes.npy            int8 +-1 (q, c): the query set encoded by this stage's model
        model.pt                   torch state dict of the hashing network (needed only to encode new images)

Database rows are positions in the prepared database: the original-class items come first, rows
[0, num_original), then the incremental ones (in data made by prepare --extends: the previous round's
database, then this round's items). Stage "original" has codes for rows [0, num_original) only
(its model never saw the new classes); incremental and retrain cover all n rows.

Retrieval with numpy alone: the Hamming distance of a packed query row p to every packed database row is
numpy.bitwise_count(numpy.bitwise_xor(packed_database, p)).sum(axis=1) (numpy >= 2.0; with int8 codes it is
(c - codes @ query_code) / 2); rank by distance, ties by row (numpy.argsort(..., kind="stable")); an item
is relevant to a query when they share a class (labels @ query_labels > 0).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np

from ..common.codes import unpack_codes
from ..common.formats import (
    INCREMENTAL,
    ORIGINAL,
    PREPARED_FORMAT,
    PUBLISHED_STAGES,
    RUN_FORMAT,
    STAGES,
    folder_kind,
    train_command,
)

# The prepared-data format versions this reader understands.
PREPARED_FORMAT_VERSIONS = (1, 2)


class IncompleteRunError(FileNotFoundError):
    """A file the run folder should hold is missing; the message says which command writes it."""


class RunFormatError(ValueError):
    """A file exists but is not what this version of dihn_dist writes (another version, or damaged)."""


@dataclass
class StageExport:
    """One finished stage: its codes as int8 +-1 and the database rows they cover."""
    name: str
    database_codes: np.ndarray   # (rows, c) int8 +-1, unpacked from database_codes.packed.npy
    query_codes: np.ndarray      # (q, c) int8 +-1
    result: dict                 # result.json: the stage's retrieval row and per-iteration history
    folder: Path

    @property
    def num_database(self) -> int:
        return int(self.database_codes.shape[0])

    @property
    def iterations(self) -> List[dict]:
        return list(self.result.get("iterations", []))

    @property
    def model_path(self) -> Path:
        return self.folder / "model.pt"


@dataclass
class ExportedRun:
    root: Path
    config: dict
    manifest: dict
    database_labels: np.ndarray  # (n, L) uint8
    query_labels: np.ndarray     # (q, L) uint8

    @property
    def code_length(self) -> int:
        return int(self.config["code_length"])

    @property
    def num_original(self) -> int:
        return int(self.manifest["num_original"])

    @property
    def num_seen(self) -> int:
        return int(self.manifest["num_seen"])

    @property
    def class_names(self) -> List[str]:
        names = self.manifest.get("class_names")
        return list(names) if names else [str(k) for k in range(self.database_labels.shape[1])]

    def finished_stages(self) -> List[str]:
        return [name for name in STAGES if (self.root / name / "result.json").is_file()]

    def published_stage(self) -> str:
        """The stage whose codes this run serves: its finished DIHN stage (incremental), else its finished
        stage 1; unfinished, the one it will publish: incremental if it was asked for or the run has a
        B_old source (--old-run/--old-codes), else original."""
        finished = self.finished_stages()
        for name in PUBLISHED_STAGES:
            if name in finished:
                return name
        wants_incremental = INCREMENTAL in (self.config.get("stage") or []) or self.config.get("old_run") \
            or self.config.get("old_codes")
        return INCREMENTAL if wants_incremental else ORIGINAL

    def stage_rows(self, stage: str) -> int:
        """Database rows a stage's codes cover."""
        return self.num_original if stage == ORIGINAL else int(self.database_labels.shape[0])

    def stage(self, name: str) -> StageExport:
        return load_stage(self, name)

    def metrics(self) -> Optional[dict]:
        """metrics.json (written when the trainer's whole command finished), or None if absent."""
        path = self.root / "metrics.json"
        return read_json(path, self.root) if path.is_file() else None


def read_json(path: Path, root: Path, damaged_hint: Optional[str] = None) -> dict:
    """A JSON object of the run folder `root`. `damaged_hint`: how to get `path` back when it is not JSON;
    by default delete it and resume, which writes it again (but config.json, the run's settings, which that
    very command reads, can only be restored from a copy)."""
    if not path.is_file():
        raise IncompleteRunError(f"{path} is missing; `{train_command(root)}` writes it")
    try:
        value = json.loads(path.read_text())
    except ValueError as error:
        if damaged_hint is None:
            damaged_hint = ("restore it from a copy of the run (no command can rebuild a run's settings)"
                            if path.name == "config.json" else
                            f"delete {path} and run `{train_command(root)}`, which writes it again")
        raise RunFormatError(f"{path}: not valid JSON ({error}); it is damaged: {damaged_hint}") from error
    if not isinstance(value, dict):
        raise RunFormatError(f"{path}: expected a JSON object")
    return value


def load_npy(path: Path, missing: str, hint: str = "", missing_error=FileNotFoundError, bad_error=ValueError,
             mmap_mode: Optional[str] = None):
    """np.load without pickles; a missing or unreadable file is one error naming it (`missing` says what was
    expected there, `hint` how to get it)."""
    if not path.is_file():
        raise missing_error(f"{path}{missing}")
    try:
        return np.load(path, mmap_mode=mmap_mode, allow_pickle=False)
    except (ValueError, OSError) as error:
        raise bad_error(f"{path}: not a readable .npy file ({error}){hint}") from error


def read_array(path: Path, hint: str, dtype, shape: tuple) -> np.ndarray:
    """np.load with the dtype and shape checked; `hint` names the command that (re)writes the file."""
    array = load_npy(path, f" is missing; {hint}", f"; {hint}", IncompleteRunError, RunFormatError)
    if array.dtype != np.dtype(dtype) or array.shape != shape:
        raise RunFormatError(f"{path}: expected {np.dtype(dtype)} of shape {shape}, found {array.dtype} "
                             f"{array.shape} (a run of another dihn_dist version or of other data?)")
    return array


def check_manifest(manifest: dict, path: Path) -> None:
    if manifest.get("format") != PREPARED_FORMAT:
        raise RunFormatError(f"{path}: not a dihn_dist manifest (expected \"format\": \"{PREPARED_FORMAT}\")")
    if manifest.get("format_version") not in PREPARED_FORMAT_VERSIONS:
        raise RunFormatError(f"{path}: format_version {manifest.get('format_version')!r}; this reader "
                             f"understands {', '.join(map(str, PREPARED_FORMAT_VERSIONS))} (a run of another "
                             f"dihn_dist version: evaluate it with that version)")
    missing = [k for k in ("num_database", "num_query", "num_classes", "num_original", "num_seen") if k not in manifest]
    if missing:
        raise RunFormatError(f"{path}: missing keys {missing}")


def load_run(run_dir) -> ExportedRun:
    """Config, manifest and labels of a run folder, checked against each other."""
    root = Path(run_dir)
    if not root.is_dir():
        raise IncompleteRunError(f"run folder {root} does not exist; `python -m dihn_dist.train --data DATA "
                                 f"--out {root}` writes one (DATA: a prepared data folder)")
    kind = folder_kind(root)
    if kind == "prepared":
        # The trainer never writes into data, so the run it would make goes next to it, not into it.
        raise IncompleteRunError(f"{root} is a prepared data folder, not a run folder; `python -m dihn_dist.train "
                                 f"--data {root} --out {root.with_name(root.name + '-run')}` trains a run on it: "
                                 f"pass that run folder instead")
    if not (root / "config.json").is_file():
        if kind == "run":  # started, stopped before its settings were written: a fresh start writes them
            hint = f"`python -m dihn_dist.train --data DATA --out {root}` writes one (DATA: its prepared data)"
        elif kind == "empty":
            hint = f"`python -m dihn_dist.train --data DATA --out {root}` writes one (DATA: a prepared data folder)"
        else:
            hint = "pass the folder that the trainer's --out named"
        raise IncompleteRunError(f"{root / 'config.json'} is missing, so {root} is not a run folder; {hint}")
    marker = root / "format.json"
    if not marker.is_file() or read_json(marker, root) != RUN_FORMAT:
        raise RunFormatError(f"{marker}: missing or not {RUN_FORMAT} (a run of another dihn_dist version: "
                             f"evaluate it with that version)")
    config = read_json(root / "config.json", root)
    if not isinstance(config.get("code_length"), int) or "arch" not in config:
        raise RunFormatError(f"{root / 'config.json'}: no code_length/arch (a run of another dihn_dist version?)")
    manifest = read_json(root / "manifest.json", root)
    check_manifest(manifest, root / "manifest.json")
    hint = f"`{train_command(root)}` writes it"
    num_classes = int(manifest["num_classes"])
    database_labels = read_array(root / "database_labels.npy", hint, np.uint8,
                                 (int(manifest["num_database"]), num_classes))
    query_labels = read_array(root / "query_labels.npy", hint, np.uint8, (int(manifest["num_query"]), num_classes))
    return ExportedRun(root, config, manifest, database_labels, query_labels)



def stage_rewrite_hint(run: ExportedRun, stage: str) -> str:
    """How to get a finished stage's export files back: --resume skips a stage with a result.json, so the
    stage must be marked unfinished; its last checkpoint then re-exports it without training again."""
    result = run.root / stage / "result.json"
    checkpoint = run.root / "checkpoints" / f"{stage}.pt"
    if checkpoint.is_file():
        return (f"delete {result} and run `{train_command(run.root, stage)}` (it re-exports the stage from "
                f"{checkpoint} without training again)")
    return f"delete {result} and run `{train_command(run.root, stage)}` (this trains the stage again)"


def stage_train_command(run: ExportedRun, name: str) -> str:
    """The command that trains and exports stage `name` of the run in its folder (resuming it, or adding it
    to the run), with stage 1 first when stage 2 has no B_old source without it (neither a finished stage 1
    nor --old-run/--old-codes)."""
    if name == INCREMENTAL and ORIGINAL not in run.finished_stages() and not (
            run.config.get("old_run") or run.config.get("old_codes")):
        return train_command(run.root, f"{ORIGINAL},{INCREMENTAL}")
    return train_command(run.root, name)


def unfinished_stage_error(run: ExportedRun, name: str, flag: str = "") -> IncompleteRunError:
    """Stage `name` has not finished: which stages have, the command that trains it, and (with `flag`, the
    option that chose the stage) the finished stages to choose instead."""
    finished = run.finished_stages()
    others = f", or pass {flag} {' or '.join(finished)}" if flag and finished else ""
    return IncompleteRunError(f"{run.root / name / 'result.json'} is missing: stage {name!r} has not finished in "
                              f"{run.root} (finished: {', '.join(finished) or 'none'}); "
                              f"`{stage_train_command(run, name)}` trains and exports it{others}")


def load_stage(run: ExportedRun, name: str, flag: str = "") -> StageExport:
    """A finished stage's codes, checked: shapes from the manifest and config, values +-1. `flag`: the option
    that chose the stage, for the message when it has not finished."""
    if name not in STAGES:
        raise ValueError(f"stage: expected one of {', '.join(STAGES)}, got {name!r}")
    folder = run.root / name
    if not (folder / "result.json").is_file():
        raise unfinished_stage_error(run, name, flag)
    hint = stage_rewrite_hint(run, name)
    result = read_json(folder / "result.json", run.root, hint)
    c = run.code_length
    rows = run.stage_rows(name)
    packed = read_array(folder / "database_codes.packed.npy", hint, np.uint8, (rows, (c + 7) // 8))
    database_codes = unpack_codes(packed, c)
    query_codes = read_array(folder / "query_codes.npy", hint, np.int8, (run.query_labels.shape[0], c))
    if not np.isin(query_codes, (-1, 1)).all():
        raise RunFormatError(f"{folder / 'query_codes.npy'}: codes must be +-1; {hint}")
    return StageExport(name, database_codes, query_codes, result, folder)


def load_stages(run: ExportedRun, names: Optional[List[str]] = None) -> Dict[str, StageExport]:
    """The given stages (default: every finished one), in the order original, incremental, retrain."""
    names = run.finished_stages() if names is None else names
    if not names:
        raise IncompleteRunError(f"{run.root} has no finished stage (no <stage>/result.json); "
                                 f"`{stage_train_command(run, run.published_stage())}` trains and exports them")
    return {name: load_stage(run, name) for name in names}


def load_codes_file(path, code_length: Optional[int] = None) -> np.ndarray:
    """Codes from a .npy file as int8 +-1 rows: +-1 values of any integer or float dtype (int8 as the trainer
    exports them, database_codes.npy), or uint8 rows of numpy.packbits(codes > 0, axis=1) (the trainer's
    database_codes.packed.npy; code_length is then needed, padding bits must be 0). One-line errors name
    the file and what was expected."""
    array = np.asarray(check_codes_file(path, code_length))
    return unpack_codes(array, code_length) if array.dtype == np.uint8 else array.astype(np.int8)


def check_codes_file(path, code_length: Optional[int] = None, block_rows: int = 1 << 20) -> np.ndarray:
    """load_codes_file's checks without its conversion: the file memory-mapped and its values checked a block
    of rows at a time, so that checking a file of any size holds one block. Returns the mapped array (packed
    uint8 rows or +-1 rows; code_rows reads rows of it)."""
    path = Path(path)
    array = load_npy(path, ": no such file (expected a .npy of +-1 codes or of packed bits)", mmap_mode="r")
    if array.ndim != 2:
        raise ValueError(f"{path}: expected a 2-D array (one code per row), got shape {array.shape}")
    blocks = [(lo, min(lo + block_rows, array.shape[0])) for lo in range(0, array.shape[0], block_rows)]
    if array.dtype == np.uint8:
        if code_length is None:
            raise ValueError(f"{path}: holds packed bits (uint8); pass --code-length to say how many bits a code has")
        if array.shape[1] != (code_length + 7) // 8:
            raise ValueError(f"{path}: packed rows of {array.shape[1]} bytes, but {code_length}-bit codes take "
                             f"{(code_length + 7) // 8}")
        for lo, hi in blocks if code_length % 8 else []:
            if (np.unpackbits(array[lo:hi, -1:], axis=1)[:, code_length % 8:] != 0).any():
                raise ValueError(f"{path}: padding bits beyond bit {code_length} are set: not packbits of "
                                 f"{code_length}-bit codes (another bit order or code length?)")
        return array
    if array.dtype.kind not in "iuf":
        raise ValueError(f"{path}: expected +-1 codes (int8) or packed bits (uint8), got dtype {array.dtype}")
    for lo, hi in blocks:
        bad = ~np.isin(array[lo:hi], (-1, 1))
        if bad.any():
            row, column = np.argwhere(bad)[0]
            raise ValueError(f"{path}: codes must be +-1, row {lo + row} column {column} holds "
                             f"{array[lo + row, column].item()!r} (0/1 bits? pack them with numpy.packbits(bits, axis=1) "
                             f"and pass the uint8 file)")
    if code_length is not None and array.shape[1] != code_length:
        raise ValueError(f"{path}: codes of {array.shape[1]} bits, this run uses --code-length {code_length}")
    return array


def code_rows(array: np.ndarray, code_length: int, first: int, end: int) -> np.ndarray:
    """Rows [first, end) of a checked codes array (check_codes_file) as int8 +-1."""
    rows = np.asarray(array[first:end])
    return unpack_codes(rows, code_length) if rows.dtype == np.uint8 else rows.astype(np.int8)
