"""Turn a dataset on disk into FFCV files plus a manifest that fixes the DIHN retrieval protocol.

    python -m dihn_dist.prepare --dataset fashion-mnist --out data/fmnist
    python -m dihn_dist.prepare --dataset cifar-10 --root SRC --out data/cifar10
    python -m dihn_dist.prepare --dataset nus-wide-tc21 --root SRC --out data/nus --max-side 256
    python -m dihn_dist.prepare --dataset image-list --database-list db.txt --query-list q.txt --num-seen 5 --out D

Writes into --out: format.json (the marker {"format": "dihn_dist.prepared", "format_version": 2}),
query.beton, database.beton (fields image, labels, index), query_labels.npy and database_labels.npy (uint8
multi-hot), query_source_index.npy and database_source_index.npy (the source row of each position),
query_item_digests.npy and database_item_digests.npy (uint8 (N, 16): per stored item, the BLAKE2b digest of
its stored image metadata, image bytes and label row, exactly as `dihn_dist.data.writer.read_back` computes
them: equal rows mean identical stored items), query_image_digests.npy and database_image_digests.npy (the
same without the label row: equal rows mean bit-identical stored images), for image-list
query_item_paths.txt and database_item_paths.txt (each item's image file, absolute, one per line) and
manifest.json (written last). The database holds every original item first (all labels < num_seen), in
source order, then every incremental item (any label >= num_seen), in source order.

Rounds: new classes arrive later, often several times, and their items are added without touching the old
ones. fashion-mnist and cifar-10 take `--classes K` (keep classes 0..K-1 only; num_seen defaults to K, so a
first round is all original items); `--extends OLD_DATA` writes a new preparation whose database begins with
exactly OLD_DATA's items, each stored image copied byte for byte (never decoded or re-encoded) and checked
by its image digest after writing, followed by this round's new items (see `dihn_dist.data.extend`). Its rows
[0, num_original) are OLD_DATA's database (num_inherited, "extends" in the manifest); its num_seen is the
number of classes OLD_DATA had; "rounds" lists the rows each round added.

The manifest lists every other file of the folder with its size and a fingerprint (sha256 of the size and
about 3 MiB sampled from the file, see `formats.FINGERPRINT_SCHEME`), which `data.load_prepared` checks, and
the stored image sizes ("image": largest_side, most_common_side, smallest_side).

Images: raw datasets are stored at a square side (--resolution); JPEG datasets with their longest side at
most --max-side, resized here (never by FFCV, whose resizer makes a 0 px side of very elongated images). An
image that cannot be read, or whose stored sides would be under MIN_STORED_SIDE px, is a bad image: prepare
stops and names it (file, list line, why), or skips it with --skip-bad and lists it in the manifest.

Safe with folders: prepare writes only into a new or empty folder or over its own preparation (format.json
marks it), never into a run folder or any other non-empty folder, even with --force. Re-running on a
complete preparation with the same options does nothing (quickly); replacing a preparation (other options,
another version, damaged) needs --force, and the message names what would be deleted. Atomic: everything is
written into a hidden temporary folder beside --out and renamed at the end, so an interrupted run never
leaves a folder that looks complete. A writer worker that dies ends the run with an error naming the item
it was on (`dihn_dist.data.writer`), never a hang; workers die with prepare. Deterministic: the same source
and options give the same bytes in every file but the manifest, whatever --num-workers (each .beton that
several workers wrote is rewritten in item order, `writer.rewrite_in_item_order`).

Errors end with one line and exit code 2 (bad input) or 1 (a failure while writing); --debug adds the
traceback.
"""
from __future__ import annotations

import argparse
import errno
import json
import os
import shutil
import time
import uuid
from pathlib import Path
from typing import Dict, List, Optional

from loguru import logger

from ..common.errors import cannot_create
from ..common.formats import (
    FOLDER_MARKER,
    MANIFEST,
    PREPARED_FORMAT,
    PREPARED_FORMAT_VERSION,
    PREPARED_MARKER,
    RUN_FORMAT,
    folder_kind,
    listed_file_problem,
    read_json_object,
)
from .manifest import (
    CLASS_ROUND_DATASETS,
    PREPARED_FILES,
    contents_text,
    file_sha256_or_none,
    first_round_contents,
    log_written,
    output_request,
    save_preparation,
)
from .parts import DEFAULT_MAX_SIDE, MIN_STORED_SIDE, read_back_parts, write_parts_skipping_bad
from .sources import SourceDataset, open_dataset
from .split import check_classes, make_split, resolve_num_seen, unanswerable_queries_warning
from .writer import WRITE_ERRNOS


def available_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:   # not Linux
        return os.cpu_count() or 1


def check_positive(value: Optional[int], flag: str) -> None:
    if value is not None and value < 1:
        raise ValueError(f"{flag}: expected a positive integer, got {value}")


def check_side(value: Optional[int], flag: str) -> None:
    if value is not None and value < MIN_STORED_SIDE:
        raise ValueError(f"{flag}: expected at least {MIN_STORED_SIDE} pixels, got {value}")


def foreign_entries(out: Path) -> List[str]:
    """Entries of a prepared folder that no preparation writes (a preparation is replaced whole)."""
    manifest = read_json_object(out / MANIFEST) or {}
    listed = manifest.get("files") if isinstance(manifest.get("files"), dict) else {}
    known = PREPARED_FILES | set(listed)
    return sorted(entry.name + ("/" if entry.is_dir() else "") for entry in out.iterdir()
                  if entry.name not in known or not entry.is_file())


def preparation_problem(out: Path, request: Dict[str, object]) -> Optional[str]:
    """Why the preparation in `out` is not this very one, complete and intact (None when it is)."""
    manifest = read_json_object(out / MANIFEST)
    if manifest is None or manifest.get("format") != PREPARED_FORMAT:
        return f"without a readable {MANIFEST}"
    version = manifest.get("format_version")
    if version != PREPARED_FORMAT_VERSION:
        return f"made by another dihn_dist version (format_version {version}; this one writes {PREPARED_FORMAT_VERSION})"
    stored = manifest.get("request") if isinstance(manifest.get("request"), dict) else {}
    differences = {key: (stored.get(key), value) for key, value in request.items() if stored.get(key) != value}
    if differences:
        listing = ", ".join(f"{key}: {old!r} -> {new!r}" for key, (old, new) in differences.items())
        return f"made with other options ({listing})"
    extends = manifest.get("extends")
    if isinstance(extends, dict):
        old_manifest = Path(str(extends.get("path"))) / MANIFEST
        if extends.get("manifest_sha256") != file_sha256_or_none(old_manifest):
            return f"that extends {extends.get('path')}, which has changed since (its {MANIFEST} differs)"
    files = manifest.get("files") if isinstance(manifest.get("files"), dict) else {}
    for name, entry in files.items():
        problem = listed_file_problem(out / name, entry)
        if problem is not None:
            return f"that is damaged ({name}: {problem})"
    return None


def refuse_foreign_out(out: Path) -> None:
    """prepare writes only into a new or empty folder or over a preparation: never a run, never anything else."""
    kind = folder_kind(out)
    if kind == "run":
        raise ValueError(f"--out {out} is a training run folder ({FOLDER_MARKER} says {RUN_FORMAT['format']!r}: its "
                         f"checkpoints, codes and models); prepare never writes into a run folder, even with "
                         f"--force: choose another --out for the prepared data")
    if kind == "other" and not out.is_dir():
        raise ValueError(f"--out {out}: exists and is not a folder; choose another --out")
    if kind == "other":
        raise ValueError(f"--out {out}: the folder is not empty and is not a dihn_dist preparation (it has no "
                         f"{FOLDER_MARKER} saying {PREPARED_FORMAT!r}); prepare writes only into a new or empty "
                         f"folder or over its own preparation, even with --force: empty it or choose another --out")
    if kind == "prepared":
        foreign = foreign_entries(out)
        if foreign:
            raise ValueError(f"--out {out} holds a preparation and also {', '.join(foreign)}, which no preparation "
                             f"writes; prepare replaces a preparation whole, so it will not: move "
                             f"{'it' if len(foreign) == 1 else 'them'} out or choose another --out")


def out_is_done(out: Path, args) -> bool:
    """True when `out` already holds this very preparation (nothing to do); False when prepare may write it
    (new, empty, or a preparation --force lets it replace); raises ValueError otherwise."""
    refuse_foreign_out(out)
    if folder_kind(out) != "prepared":
        return False
    problem = preparation_problem(out, output_request(args))
    if problem is None and not args.force:
        manifest = json.loads((out / MANIFEST).read_text())
        logger.info(f"{out} is complete ({manifest['dataset']}, {manifest['num_database']:,} database / "
                    f"{manifest['num_query']:,} query images); nothing to do (--force rebuilds)")
        return True
    if not args.force:
        raise ValueError(f"--out {out} holds a preparation {problem}; pass --force to replace it, which deletes "
                         f"its {contents_text(out)}; or choose another --out")
    logger.warning(f"--force: the preparation in {out} ({problem or 'complete, same options'}) will be replaced "
                   f"once the new one is complete, deleting its {contents_text(out)}")
    return False


# ----------------------------------------------------------------------------------------------------------
# Atomic output folder


def temporary_folder(out: Path) -> Path:
    return out.parent / f".{out.name}.partial-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def remove_stale_partials(out: Path) -> None:
    """Temporary folders of interrupted runs (their process is gone) are removed."""
    for folder in out.parent.glob(f".{out.name}.partial-*"):
        try:
            pid = int(folder.name.rsplit(".partial-", 1)[1].split("-")[0])
            os.kill(pid, 0)
        except ProcessLookupError:
            shutil.rmtree(folder, ignore_errors=True)
        except (ValueError, IndexError, PermissionError):
            continue


def write_marker(folder: Path) -> None:
    (folder / FOLDER_MARKER).write_text(json.dumps(PREPARED_MARKER) + "\n")


def publish(temporary: Path, out: Path) -> None:
    """Rename the finished temporary folder to `out` (replacing an old preparation). `out` is checked again
    first: hours may have passed, and nothing but a preparation (or an empty folder) may be replaced."""
    refuse_foreign_out(out)
    if out.exists():
        old = out.parent / f".{out.name}.old-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        os.replace(out, old)
        os.replace(temporary, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(temporary, out)


# ----------------------------------------------------------------------------------------------------------


def stored_sizes(dataset: SourceDataset, args) -> tuple:
    """(side of stored raw images or None, max side of stored JPEGs or None); flags checked against storage."""
    if dataset.storage == "raw":
        if args.max_side is not None:
            raise ValueError(f"--max-side applies to JPEG datasets (nus-wide-tc21, image-list); {dataset.name} is "
                             f"stored raw: use --resolution")
        return args.resolution or max(dataset.database.images.native_size), None
    if args.resolution is not None:
        raise ValueError(f"--resolution applies to raw datasets (fashion-mnist, cifar-10); {dataset.name} is "
                         f"stored as JPEG: use --max-side")
    return None, args.max_side or DEFAULT_MAX_SIDE


def check_flags(args) -> None:
    for flag in ("num_seen", "num_workers", "database_per_class", "query_per_class", "classes"):
        check_positive(getattr(args, flag), "--" + flag.replace("_", "-"))
    for flag in ("resolution", "max_side"):
        check_side(getattr(args, flag), "--" + flag.replace("_", "-"))
    if args.classes is not None and args.dataset not in CLASS_ROUND_DATASETS:
        raise ValueError(f"--classes applies to {' and '.join(CLASS_ROUND_DATASETS)} (the class-rounds protocol), "
                         f"not {args.dataset}" + ("; an image-list round lists its own items: --extends OLD_DATA "
                                                   "--database-list NEW_ITEMS" if args.dataset == "image-list" else ""))
    if args.num_workers is None:
        args.num_workers = available_cpus()


def prepare(args: argparse.Namespace) -> Path:
    out: Path = args.out
    check_flags(args)
    old = None
    if args.extends is not None:
        from ..data.extend import open_old_preparation
        old = open_old_preparation(args)   # checks OLD_DATA and --out; fills in the options NEW inherits
    if out_is_done(out, args):
        return out
    dataset = open_dataset(args.dataset, args.root, database_list=args.database_list,
                           query_list=args.query_list, max_side=args.max_side or DEFAULT_MAX_SIDE)
    check_classes(dataset, args.classes)
    side, max_side = stored_sizes(dataset, args)
    if old is None:
        num_seen = resolve_num_seen(dataset, args.num_seen, args.classes)
        split = make_split(dataset, num_seen, args.database_per_class, args.query_per_class, set(), set(),
                           args.classes)   # fail early
        warning = unanswerable_queries_warning(dataset.query.labels[split.query_rows],
                                               dataset.database.labels[split.database_rows], dataset.class_names)
        if warning:
            logger.warning(warning)
        write = lambda folder: write_all(folder, dataset, num_seen, args, side, max_side)  # noqa: E731
    else:
        from ..data.extend import plan_round, write_round
        plan = plan_round(dataset, old, args)   # fail early: the new items, each checked against OLD's
        write = lambda folder: write_round(folder, dataset, old, plan, args, side, max_side)  # noqa: E731
    write_atomically(out, write)
    logger.info(f"prepared {out}")
    return out


def write_atomically(out: Path, write) -> None:
    """write(folder) into a temporary folder beside `out`, renamed to `out` once complete; removed on any error.
    The errors of writing name --out: the temporary folder is ours, not the user's."""
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_partials(out)
        temporary = temporary_folder(out)
        temporary.mkdir()
    except OSError as error:
        raise cannot_create("--out", out, error) from None
    try:
        write_marker(temporary)
        write(temporary)
        publish(temporary, out)
    except OSError as error:
        shutil.rmtree(temporary, ignore_errors=True)
        ours = str(error.filename or "").startswith(str(temporary))
        if error.errno in WRITE_ERRNOS or (ours and error.errno in (errno.EACCES, errno.EPERM)):
            raise OSError(f"--out {out}: could not write the preparation ({error.strerror or error}); nothing "
                          f"was written to --out: make room or choose another --out") from None
        raise
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise


def write_all(folder: Path, dataset: SourceDataset, num_seen: int, args, side, max_side) -> None:
    """A first preparation (no --extends)."""
    start = time.perf_counter()
    split, excluded = write_parts_skipping_bad(
        folder, dataset, lambda excluded: make_split(dataset, num_seen, args.database_per_class, args.query_per_class,
                                                     excluded["query"], excluded["database"], args.classes),
        args, side, max_side)
    contents = first_round_contents(dataset, split, num_seen, excluded, args.classes)
    stored = read_back_parts(folder, contents.labels)
    save_preparation(folder, dataset, contents, args, side, max_side, stored)
    log_written(dataset, contents, time.perf_counter() - start)


