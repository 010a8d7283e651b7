"""The facts every module shares, each written down once: folder formats, what a folder is, file
fingerprints, stage names, the incremental rule.

numpy-free and torch-free on purpose: the numpy-only reader (`exported.py`), the writer (`prepare.py`),
the loader (`data.py`) and the trainer all import from here, and none of them imports another for a
constant.
"""
from __future__ import annotations

import hashlib
import json
import shlex
from pathlib import Path
from typing import Dict, Optional

# A prepared data folder (python -m dihn_dist.prepare): format.json is its marker, manifest.json describes
# it. Both are written into a hidden temporary folder that is renamed to --out once complete.
# Version 2: the marker, per-file fingerprints, per-item digests and the stored image sizes.
PREPARED_FORMAT = "dihn_dist.prepared"
PREPARED_FORMAT_VERSION = 2
PREPARED_MARKER = {"format": PREPARED_FORMAT, "format_version": PREPARED_FORMAT_VERSION}
MANIFEST = "manifest.json"

# A run folder (python -m dihn_dist.train --out): format.json is its marker, written before anything else.
RUN_FORMAT = {"format": "dihn_dist.run", "format_version": 1}
FOLDER_MARKER = "format.json"
# The lock a trainer holds on its run folder for the whole run (rank 0, fcntl.flock): it holds the holder's
# pid and host. The kernel drops the lock when the process dies, so a file left behind locks nothing, and a
# folder that holds only this file is still empty.
RUN_LOCK = ".train.lock"

# The files of a format-version-1 preparation (no marker): recognised only when a folder holds exactly these.
PREPARED_V1_FILES = frozenset({MANIFEST, "query.beton", "database.beton", "query_labels.npy", "database_labels.npy",
                               "query_source_index.npy", "database_source_index.npy"})

# Per-item digests of the stored images alone (no labels: label rows widen when a later round adds classes),
# and, for image-list preparations, each item's image file (absolute path, one per line). A run that trains on
# a preparation keeps a copy of the database's image digests, so that a later round's data can be checked to
# begin with exactly the run's database (`data.check_database_prefix`).
IMAGE_DIGEST_FILES = {"query": "query_image_digests.npy", "database": "database_image_digests.npy"}
ITEM_PATH_FILES = {"query": "query_item_paths.txt", "database": "database_item_paths.txt"}


# ----------------------------------------------------------------------------------------------------------
# What a folder is


def folder_kind(path) -> str:
    """What `path` is, by its marker (format.json), never by the files it happens to hold:

        "prepared"  a preparation (format.json says dihn_dist.prepared; or a format-version-1 preparation,
                    which had no marker: manifest.json says dihn_dist.prepared version 1 and the folder
                    holds exactly that preparation's files)
        "run"       a training run (format.json says dihn_dist.run)
        "empty"     an empty folder
        "missing"   nothing there
        "other"     anything else: a file, a non-empty folder without a dihn_dist marker, an unreadable or
                    foreign format.json

    A run folder holds a copy of its data's manifest.json, so manifest.json alone says nothing. Writers use
    this to refuse folders that are not theirs: prepare writes only into "missing", "empty" or "prepared",
    the trainer must not write its run into "prepared".
    """
    path = Path(path)
    if not path.exists():
        return "missing"
    if not path.is_dir():
        return "other"
    marker = read_json_object(path / FOLDER_MARKER)
    if marker is not None:
        return {PREPARED_FORMAT: "prepared", RUN_FORMAT["format"]: "run"}.get(marker.get("format"), "other")
    if (path / FOLDER_MARKER).exists():
        return "other"   # a format.json that is not ours (or unreadable): not ours to judge
    names = {entry.name for entry in path.iterdir()} - {RUN_LOCK}
    if not names:
        return "empty"
    if names == PREPARED_V1_FILES and is_prepared_v1_manifest(path / MANIFEST):
        return "prepared"
    return "other"


def read_json_object(path: Path) -> Optional[dict]:
    """The JSON object in `path`, or None (missing, unreadable, not JSON, not an object)."""
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def is_prepared_v1_manifest(path: Path) -> bool:
    manifest = read_json_object(path)
    return manifest is not None and manifest.get("format") == PREPARED_FORMAT and manifest.get("format_version") == 1


# ----------------------------------------------------------------------------------------------------------
# File fingerprints: cheap on a 4 GB beton, yet they catch truncation, swapped files and most rewrites


FINGERPRINT_WHOLE_FILE_UP_TO = 4 << 20    # smaller files are hashed whole
FINGERPRINT_EDGE = 1 << 20                # larger ones: the first and last MiB ...
FINGERPRINT_BLOCK = 64 << 10              # ... and this many bytes ...
FINGERPRINT_BLOCKS = 16                   # ... at this many evenly spaced offsets between them
FINGERPRINT_SCHEME = (f"sha256 of the file size (8 bytes, little-endian) followed by the whole file if it holds "
                      f"at most {FINGERPRINT_WHOLE_FILE_UP_TO >> 20} MiB, else by its first and last "
                      f"{FINGERPRINT_EDGE >> 20} MiB and {FINGERPRINT_BLOCKS} blocks of {FINGERPRINT_BLOCK >> 10} KiB "
                      f"starting at offsets edge + i * (size - 2 * edge - block) // {FINGERPRINT_BLOCKS - 1}, "
                      f"i = 0..{FINGERPRINT_BLOCKS - 1}")


def file_fingerprint(path) -> str:
    """See FINGERPRINT_SCHEME: about 3 MiB read per file, whatever its size."""
    with open(path, "rb") as handle:
        size = handle.seek(0, 2)
        digest = hashlib.sha256(size.to_bytes(8, "little"))
        for offset, length in fingerprint_spans(size):
            handle.seek(offset)
            digest.update(handle.read(length))
    return digest.hexdigest()


def listed_file_problem(path: Path, entry, fingerprint: bool = True) -> Optional[str]:
    """What is wrong with a prepared file against its manifest entry {"bytes": .., "fingerprint": ..}, in
    words, or None; sizes are compared first (free), then, with `fingerprint`, the fingerprints."""
    if not isinstance(entry, dict) or not isinstance(entry.get("bytes"), int) or "fingerprint" not in entry:
        return f"its manifest entry {entry!r} is not {{\"bytes\": .., \"fingerprint\": ..}}"
    if not path.is_file():
        return "missing"
    size = path.stat().st_size
    if size != entry["bytes"]:
        return (f"expected {entry['bytes']:,} bytes (as listed in {MANIFEST}), found {size:,}: the file was "
                f"{'truncated' if size < entry['bytes'] else 'extended'} or replaced")
    if fingerprint and file_fingerprint(path) != entry["fingerprint"]:
        return "fingerprint differs: the file was rewritten or replaced"
    return None


def fingerprint_spans(size: int):
    if size <= FINGERPRINT_WHOLE_FILE_UP_TO:
        return [(0, size)]
    step = (size - 2 * FINGERPRINT_EDGE - FINGERPRINT_BLOCK) // (FINGERPRINT_BLOCKS - 1)
    blocks = [(FINGERPRINT_EDGE + i * step, FINGERPRINT_BLOCK) for i in range(FINGERPRINT_BLOCKS)]
    return [(0, FINGERPRINT_EDGE)] + blocks + [(size - FINGERPRINT_EDGE, FINGERPRINT_EDGE)]


# ----------------------------------------------------------------------------------------------------------
# The command that (re)makes a preparation, for messages


REQUEST_FLAGS = ("dataset", "extends", "root", "database_list", "query_list", "classes", "num_seen", "resolution",
                 "max_side", "database_per_class", "query_per_class")


def prepare_command(request: Dict[str, object], out) -> str:
    """`python -m dihn_dist.prepare ...` with the options of a manifest's "request", writing to `out`."""
    words = ["python", "-m", "dihn_dist.prepare"]
    for key in REQUEST_FLAGS:
        if request.get(key) is not None:
            words += ["--" + key.replace("_", "-"), str(request[key])]
    if request.get("skip_bad"):
        words.append("--skip-bad")
    words += ["--out", str(out)]
    return " ".join(shlex.quote(word) for word in words)

# The stages of a run, in the order they run, and how their retrieval rows are named in reports.
ORIGINAL, INCREMENTAL, RETRAIN = "original", "incremental", "retrain"
STAGES = (ORIGINAL, INCREMENTAL, RETRAIN)
DIHN_STAGES = (ORIGINAL, INCREMENTAL)       # what --stage all runs (the default)
PUBLISHED_STAGES = (INCREMENTAL, ORIGINAL)  # the codes a round publishes: its DIHN codes, else stage 1's
STAGE_TITLES = {
    ORIGINAL: "original codes (ADSH, original database)",
    INCREMENTAL: "DIHN (whole database)",
    RETRAIN: "ADSH retrained on all classes",
}
STAGE_SHORT_TITLES = {ORIGINAL: "original codes", INCREMENTAL: "DIHN", RETRAIN: "retrained ADSH"}


def is_incremental(labels, num_seen: int):
    """Rows (items or queries) that carry any class >= num_seen: the new classes' items.

    `labels` is a 0/1 (rows x classes) numpy array or torch tensor; returns a boolean vector of the same kind.
    The rule that splits the query set and the reports, and the database of a first preparation (original
    items first). A preparation made with --extends splits its database by row instead: rows
    [0, num_original) are the previous round's database (all of them classes < num_seen), the rows after
    are this round's items, which may include new images of old classes.
    """
    return labels[:, num_seen:].sum(1) > 0


def classes_so_far(manifest: dict) -> int:
    """K: the classes 0..K-1 a preparation's items may carry. --classes K for a class-rounds preparation,
    else all its label columns. A later round (--extends) brings classes K and up: its num_seen is K."""
    value = manifest.get("num_classes_so_far")
    return int(value if value is not None else manifest["num_classes"])


def train_command(run_dir, stage=None) -> str:
    """The command that continues the run in `run_dir`, in that very folder (also a copied or moved one),
    with exactly its saved settings; with `stage`, the command that adds or finishes that stage."""
    stage_flag = f" --stage {stage}" if stage else ""
    config, out = shlex.quote(f"{run_dir}/config.json"), shlex.quote(str(run_dir))
    return f"python -m dihn_dist.train --config {config} --out {out}{stage_flag} --resume"
