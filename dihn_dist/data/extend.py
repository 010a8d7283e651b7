"""A new round of a preparation: `python -m dihn_dist.prepare ... --extends OLD_DATA --out NEW_DATA`.

NEW_DATA's database is OLD_DATA's database, row for row, followed by this round's new items; its query set
is OLD_DATA's queries followed by this round's new queries. OLD_DATA itself is only read.

What the rows mean. Rows [0, num_original) of NEW are the rows inherited from OLD (num_original = OLD's
num_database, also recorded as num_inherited and under "extends"): a trainer keeps their codes frozen. The
classes OLD covered are NEW's seen classes (num_seen = OLD's num_classes_so_far: its --classes K, else its
number of label columns); the new items may carry any class, new images of old classes included, so the
rule "rows past num_original carry a class >= num_seen" of a first preparation does not hold here (see
`data.check_database_order`). Queries carrying a class >= num_seen are the new classes' queries.

Bit-identical old items. An inherited item's image is never decoded or re-encoded: its stored bytes (the
JPEG file or the raw pixels) and FFCV image metadata (mode, height, width) are read from OLD's .beton
through FFCV's Reader (per-item metadata and allocation table) and a memory map, and written into NEW's
.beton as they are by `StoredImageField`, an RGBImageField whose encode also takes such a stored image. Its
label row is written widened: OLD's columns, then 0 for each class added since. After writing, every item of
NEW is read back and its image digest (blake2b of the stored metadata and bytes, see
`betonwriter.IMAGE_DIGEST_SCHEME`) compared with the digest of the same row of OLD: the copy is checked,
not assumed. `data.check_database_prefix` makes the same check later (a trainer's --old-run) from the
saved digest files and label rows.

How the new items are given:
  image-list      --database-list / --query-list hold this round's items, labels over every class so far
                  (L_new >= L_old columns, the first L_old being OLD's classes). A full list that starts with
                  exactly OLD's items (the same image files, each once, labels padded with 0) is accepted
                  too: those lines are skipped. Any other line naming one of OLD's image files, or whose
                  stored image is identical to one of OLD's, is refused.
  fashion-mnist,  --classes K adds the classes OLD_DATA's K_old..K-1: their training images (database) and
  cifar-10        their protocol queries, from the same source files (checked by sha256).
Options not given (--root of fashion-mnist/cifar-10, --resolution / --max-side, --database-per-class,
--query-per-class) are OLD's; the stored image size must be OLD's.
"""
from __future__ import annotations

import dataclasses
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
from loguru import logger

from ..common.digest import file_sha256
from ..common.formats import ITEM_PATH_FILES, MANIFEST, PREPARED_FORMAT, classes_so_far, folder_kind
from .manifest import (
    CLASS_ROUND_DATASETS,
    Contents,
    log_written,
    round_record,
    save_preparation,
    source_records,
)
from .parts import ITEM_DIGEST_FILES, PARTS, InheritedPart, read_back_parts, widened, write_parts_skipping_bad
from .prepared import PreparedData, load_prepared
from .sources import SourceDataset, SourcePart
from .split import select_rows, unanswerable_queries_warning
from .writer import read_back

EXTENDABLE_DATASETS = ("image-list", *CLASS_ROUND_DATASETS)
ROUND_ORDER = ("database = rows [0, num_original): the database of extends.path, each item's stored image copied byte "
               "for byte, label rows padded with 0 for the classes added since; then this round's new items in "
               "source order (they may carry old classes too); queries likewise: extends.path's, then this round's")
LIST_FLAGS = {"query": "--query-list", "database": "--database-list"}


@dataclass
class OldPreparation:
    root: Path
    data: PreparedData
    classes_so_far: int
    parts: Dict[str, InheritedPart] = dataclasses.field(default_factory=dict)   # filled by read_old_parts

    @property
    def manifest(self) -> dict:
        return self.data.manifest


def open_old_preparation(args) -> OldPreparation:
    """Check --extends and --out, load OLD_DATA (its files checked against its manifest) and fill in the
    options NEW inherits. Cheap: OLD's stored items are read later, once NEW is known to need writing."""
    old_root = Path(args.extends)
    if args.out.resolve() == old_root.resolve():
        raise ValueError(f"--out {args.out} is the --extends folder; a round writes a new preparation and leaves "
                         f"OLD_DATA as it is (runs trained on it still use it): choose another --out")
    check_is_preparation(old_root)
    try:
        data = load_prepared(old_root)
    except (ValueError, FileNotFoundError) as error:
        raise type(error)(f"--extends {old_root}: {error}") from error
    if data.dataset != args.dataset:
        raise ValueError(f"--dataset {args.dataset}: but --extends {old_root} holds {data.dataset}; a round extends "
                         f"a preparation of the same dataset")
    if args.dataset not in EXTENDABLE_DATASETS:
        raise ValueError(f"--extends applies to {', '.join(EXTENDABLE_DATASETS)}, not {args.dataset}")
    old = OldPreparation(old_root, data, classes_so_far(data.manifest))
    inherit_options(args, old)
    return old


def check_is_preparation(root: Path) -> None:
    kind = folder_kind(root)
    if kind == "missing":
        raise FileNotFoundError(f"--extends {root}: does not exist; expected a prepared data folder "
                                f"(python -m dihn_dist.prepare ... --out {root})")
    if kind == "run":
        raise ValueError(f"--extends {root}: is a training run folder, not prepared data; pass the prepared data "
                         f"folder the run trained on (its config.json names it as data)")
    if kind != "prepared":
        raise ValueError(f"--extends {root}: is not a dihn_dist preparation (no format.json saying "
                         f"{PREPARED_FORMAT!r}); pass a folder written by python -m dihn_dist.prepare")


def inherit_options(args, old: OldPreparation) -> None:
    """Options not given are OLD's; the stored image size must be OLD's; num_seen is OLD's classes."""
    request = old.manifest.get("request") or {}
    image = old.manifest["image"]
    flag, stored = (("--resolution", int(image["height"])) if image["storage"] == "raw"
                    else ("--max-side", int(image["max_side"])))
    given = args.resolution if image["storage"] == "raw" else args.max_side
    if given is not None and given != stored:
        raise ValueError(f"{flag} {given}: but --extends {old.root} stores images at {stored} px; a round keeps "
                         f"OLD's stored size (omit {flag})")
    if image["storage"] == "raw":
        args.resolution = stored
    else:
        args.max_side = stored
    if args.root is None and args.dataset != "image-list" and request.get("root"):
        args.root = Path(request["root"])
    for key in ("database_per_class", "query_per_class"):
        if getattr(args, key) is None:
            setattr(args, key, request.get(key))
    if args.num_seen is not None and args.num_seen != old.classes_so_far:
        raise ValueError(f"--num-seen {args.num_seen}: with --extends, the seen classes are the "
                         f"{old.classes_so_far} classes of {old.root} (omit --num-seen)")
    args.num_seen = old.classes_so_far
    if args.dataset in CLASS_ROUND_DATASETS:
        if args.classes is None:
            raise ValueError(f"--extends with --dataset {args.dataset} needs --classes K: the round adds classes "
                             f"{old.classes_so_far}..K-1 to the {old.classes_so_far} classes of {old.root}")
        if args.classes <= old.classes_so_far:
            raise ValueError(f"--classes {args.classes}: expected more than the {old.classes_so_far} classes "
                             f"(0..{old.classes_so_far - 1}) --extends {old.root} already has")


def read_old_parts(old: OldPreparation) -> None:
    """Read every stored item of OLD, checked against OLD's recorded item digests (so what NEW copies is
    what OLD was written with), and OLD's image files (image-list)."""
    manifest = old.manifest
    for name in PARTS:
        labels = old.data.query_labels if name == "query" else old.data.database_labels
        beton = old.root / f"{name}.beton"
        stored = read_back(beton, labels)
        check_recorded_digests(old.root / ITEM_DIGEST_FILES[name], stored.digests)
        paths = read_item_paths(old, name) if manifest["dataset"] == "image-list" else None
        source_index = np.load(old.root / f"{name}_source_index.npy", allow_pickle=False).astype(np.int64)
        old.parts[name] = InheritedPart(beton, labels, source_index, stored.images, stored.image_digests, paths)


def check_recorded_digests(path: Path, digests: np.ndarray) -> None:
    if not path.is_file():
        return   # a preparation made before per-item digests: its files' fingerprints were checked on load
    recorded = np.load(path, allow_pickle=False)
    differs = np.flatnonzero((recorded != digests).any(axis=1)) if recorded.shape == digests.shape else [0]
    if len(differs):
        raise ValueError(f"--extends {path.parent}: item {differs[0]} of {path.name.split('_')[0]}.beton differs "
                         f"from its recorded digest in {path}: the .beton was rewritten; rebuild OLD_DATA")


def read_item_paths(old: OldPreparation, name: str) -> List[str]:
    path = old.root / ITEM_PATH_FILES[name]
    if not path.is_file():
        raise FileNotFoundError(f"--extends {old.root}: has no {ITEM_PATH_FILES[name]} (an image-list preparation "
                                f"made before dihn_dist recorded each item's image file); rebuild it with "
                                f"{old.manifest.get('command', 'its prepare command')} --force")
    paths = path.read_text().splitlines()
    expected = old.data.num_query if name == "query" else old.data.num_database
    if len(paths) != expected:
        raise ValueError(f"{path}: {len(paths)} lines, expected {expected} (one per item); rebuild OLD_DATA")
    return paths


# ----------------------------------------------------------------------------------------------------------
# This round's new items


@dataclass
class RoundSplit:
    query_rows: np.ndarray      # source rows of this round's new queries, in source order
    database_rows: np.ndarray   # source rows of this round's new database items, in source order


@dataclass
class RoundPlan:
    parts: Dict[str, SourcePart]   # the source parts holding the new items (image-list: less OLD's lines)
    classes: Optional[tuple]       # class rounds: (first, end), the classes this round adds
    sources: List[dict]            # this round's source files, with sha256

    def split_without(self, excluded: Dict[str, set], args) -> RoundSplit:
        rows = {name: select_rows(self.parts[name], getattr(args, f"{name}_per_class"), excluded[name], self.classes)
                for name in PARTS}
        return RoundSplit(rows["query"], rows["database"])


def plan_round(dataset: SourceDataset, old: OldPreparation, args) -> RoundPlan:
    """Which source rows are this round's new items; checked against OLD before anything is written."""
    read_old_parts(old)
    sources = source_records(dataset)
    if dataset.name == "image-list":
        check_label_width(dataset, old)
        parts = {name: new_lines(getattr(dataset, name), old, name) for name in PARTS}
        plan = RoundPlan(parts, None, sources)
    else:
        check_same_sources(old, sources, args)
        plan = RoundPlan({name: getattr(dataset, name) for name in PARTS}, (old.classes_so_far, args.classes), sources)
    split = plan.split_without({name: set() for name in PARTS}, args)
    if len(split.database_rows) == 0:
        what = (f"{LIST_FLAGS['database']} {args.database_list} names only OLD's items" if dataset.name == "image-list"
                else f"classes {old.classes_so_far}..{args.classes - 1} have no database items")
        raise ValueError(f"{dataset.name}: no new database items: {what}; a round adds at least one item")
    if dataset.name == "image-list":
        check_new_classes_have_items(plan.parts["database"], split.database_rows, old)
    warning = unanswerable_queries_warning(
        np.concatenate([widened(old.parts["query"].labels, dataset.num_classes),
                        plan.parts["query"].labels[split.query_rows]]),
        np.concatenate([widened(old.parts["database"].labels, dataset.num_classes),
                        plan.parts["database"].labels[split.database_rows]]), dataset.class_names)
    if warning:
        logger.warning(f"{dataset.name} round: {warning}")
    return plan


def check_new_classes_have_items(part: SourcePart, rows: np.ndarray, old: OldPreparation) -> None:
    """A list whose label columns add classes must give them items: new items that all carry only OLD's
    classes mean the new classes were labelled in OLD's columns (the columns of a round are OLD's, then
    the new classes), and the round would add classes that no item has."""
    old_width, width = old.data.num_classes, part.labels.shape[1]
    if width <= old_width or part.labels[rows][:, old_width:].any():
        return
    raise ValueError(f"{LIST_FLAGS['database']} {part.origin}: its {len(rows)} new items carry only the "
                     f"classes of --extends {old.root} (label columns 0..{old_width - 1}), so the "
                     f"{width - old_width} new class(es) get no items; label this round's new classes in columns "
                     f"{old_width}..{width - 1} (a round's columns are OLD's {old_width}, then the new classes)")


def check_label_width(dataset: SourceDataset, old: OldPreparation) -> None:
    old_width, new_width = old.data.num_classes, dataset.num_classes
    if new_width < old_width:
        raise ValueError(f"{LIST_FLAGS['database']} {dataset.database.origin}: {new_width} label columns, but "
                         f"--extends {old.root} has {old_width} classes; a round's labels cover every class so far "
                         f"(the first {old_width} columns are OLD's classes, new classes follow)")


def item_path(part: SourcePart, row: int) -> str:
    return os.path.abspath(part.images.path(int(row)))


def new_lines(part: SourcePart, old: OldPreparation, name: str) -> SourcePart:
    """The part without OLD's lines. A list naming OLD's image files is a full list: it must start with
    exactly OLD's items (each once, labels padded with 0 for the new classes); no other line may name one."""
    inherited = old.parts[name]
    old_rows = {path: row for row, path in enumerate(inherited.paths)}
    paths = [item_path(part, row) for row in part.rows]
    full = bool(paths) and paths[0] in old_rows
    skip = len(inherited) if full else 0
    if full:
        check_old_lines(part, paths[:skip], inherited, old_rows, old, name)
    for position in range(skip, len(paths)):
        if paths[position] in old_rows:
            raise ValueError(f"{part.images.describe(int(part.rows[position]))}: is item {old_rows[paths[position]]} "
                             f"of the {name} part of --extends {old.root}; a round lists only new items, or "
                             f"starts with exactly OLD's {len(inherited)} {name} items and then lists new ones")
    return dataclasses.replace(part, rows=part.rows[skip:])


def check_old_lines(part: SourcePart, paths: List[str], inherited: InheritedPart, old_rows: Dict[str, int],
                    old: OldPreparation, name: str) -> None:
    """The leading lines of a full list are OLD's items, each once, with OLD's labels padded with 0."""
    seen = set()
    old_width = inherited.labels.shape[1]
    for position, path in enumerate(paths):
        described = part.images.describe(int(part.rows[position]))
        if path not in old_rows or path in seen:
            raise ValueError(f"{described}: a list that starts with OLD's items (line 1 names one of the "
                             f"{len(inherited)} {name} items of --extends {old.root}) must start with exactly "
                             f"those, each once; this line is " + ("a repeat" if path in seen else "not one of them"))
        seen.add(path)
        given = part.labels[part.rows[position]]
        expected = inherited.labels[old_rows[path]]
        if not (np.array_equal(given[:old_width], expected) and not given[old_width:].any()):
            raise ValueError(f"{described}: labels {given.tolist()} for item {old_rows[path]} of --extends "
                             f"{old.root}, which has {expected.tolist()}; OLD's items keep their labels, padded "
                             f"with 0 for the new classes")


def check_same_sources(old: OldPreparation, sources: List[dict], args) -> None:
    """A class round reads the very source files of OLD's rounds (their source_index values stay valid)."""
    recorded = {Path(entry["path"]).name: entry["sha256"] for entry in old.manifest.get("sources", [])}
    current = {Path(entry["path"]).name: entry["sha256"] for entry in sources}
    differing = sorted(name for name in set(recorded) | set(current) if recorded.get(name) != current.get(name))
    if differing:
        raise ValueError(f"--root {args.root}: the {args.dataset} source files differ from those --extends "
                         f"{old.root} was prepared from ({', '.join(differing)}); a class round takes its new "
                         f"classes from the same source")


def write_round(folder: Path, dataset: SourceDataset, old: OldPreparation, plan: RoundPlan, args, side,
                max_side) -> None:
    start = time.perf_counter()
    split, excluded = write_parts_skipping_bad(folder, dataset, lambda excluded: plan.split_without(excluded, args),
                                               args, side, max_side, inherited=old.parts)
    contents = round_contents(dataset, old, plan, split, excluded, args)
    stored = read_back_parts(folder, contents.labels)
    for name in PARTS:
        check_copied(old, name, stored[name].image_digests)
        if dataset.name == "image-list":
            check_new_images_are_new(dataset, old, name, getattr(split, f"{name}_rows"), stored[name].image_digests)
    save_preparation(folder, dataset, contents, args, side, max_side, stored)
    log_written(dataset, contents, time.perf_counter() - start)


def round_contents(dataset: SourceDataset, old: OldPreparation, plan: RoundPlan, split: RoundSplit,
                   excluded: Dict[str, set], args) -> Contents:
    rows = {"query": split.query_rows, "database": split.database_rows}
    inherited = old.parts
    counts = {name: (len(inherited[name]), len(inherited[name]) + len(rows[name])) for name in PARTS}
    classes = args.classes if args.classes is not None else dataset.num_classes
    paths = None
    if dataset.name == "image-list":
        paths = {name: inherited[name].paths + [item_path(getattr(dataset, name), row) for row in rows[name]]
                 for name in PARTS}
    return Contents(
        labels={name: np.concatenate([widened(inherited[name].labels, dataset.num_classes),
                                      getattr(dataset, name).labels[rows[name]].astype(np.uint8)]) for name in PARTS},
        source_index={name: np.concatenate([inherited[name].source_index, rows[name].astype(np.int64)])
                      for name in PARTS},
        paths=paths,
        num_original=len(inherited["database"]), num_seen=old.classes_so_far, classes_so_far=classes,
        skipped={name: [getattr(dataset, name).images.describe(r) for r in sorted(excluded[name])] for name in PARTS},
        order=ROUND_ORDER,
        rounds=old_rounds(old) + [round_record(counts["database"], counts["query"], classes, plan.sources)],
        extends=extends_record(old))


def old_rounds(old: OldPreparation) -> List[dict]:
    """OLD's rounds; a preparation made before rounds were recorded is one round."""
    manifest = old.manifest
    if isinstance(manifest.get("rounds"), list):
        return list(manifest["rounds"])
    return [{"database_rows": [0, old.data.num_database], "query_rows": [0, old.data.num_query],
             "num_classes_so_far": old.classes_so_far, "sources": manifest.get("sources", []),
             "created": manifest.get("created")}]


def extends_record(old: OldPreparation) -> dict:
    """What NEW says about OLD: enough to find it and to tell whether it is still the folder NEW was made from."""
    manifest = old.manifest
    return {"path": str(old.root.resolve()), "manifest_sha256": file_sha256(old.root / MANIFEST),
            "dataset": manifest["dataset"], "num_database": old.data.num_database, "num_query": old.data.num_query,
            "num_classes": old.data.num_classes, "num_classes_so_far": old.classes_so_far,
            "num_inherited": {"database": old.data.num_database, "query": old.data.num_query},
            "files": manifest["files"]}


def check_copied(old: OldPreparation, name: str, image_digests: np.ndarray) -> None:
    """NEW's first rows hold OLD's stored images, bit for bit (read back from the written file)."""
    inherited = old.parts[name].image_digests
    differs = np.flatnonzero((image_digests[:len(inherited)] != inherited).any(axis=1))
    if len(differs):
        raise RuntimeError(f"{name}.beton: the stored image of inherited row {differs[0]} differs from row "
                           f"{differs[0]} of {old.root / (name + '.beton')} after copying")


def check_new_images_are_new(dataset: SourceDataset, old: OldPreparation, name: str, rows: np.ndarray,
                             image_digests: np.ndarray) -> None:
    """image-list: a new item whose stored image is identical to one of OLD's is a repeat (another path)."""
    inherited = old.parts[name]
    old_rows = {digest.tobytes(): row for row, digest in enumerate(inherited.image_digests)}
    for position, digest in enumerate(image_digests[len(inherited):]):
        row = old_rows.get(digest.tobytes())
        if row is not None:
            raise ValueError(f"{getattr(dataset, name).images.describe(int(rows[position]))}: its stored image is "
                             f"identical to item {row} of the {name} part of --extends {old.root} "
                             f"({inherited.paths[row]}); a round adds only new images")

