"""The split of a first preparation: which source rows go to the query and the database, in which order
(original items first, then incremental ones), and the checks that every part holds items.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Set

import numpy as np

from ..common.formats import is_incremental
from .sources import SourceDataset, SourcePart, first_rows_per_class

# ----------------------------------------------------------------------------------------------------------
# The split: which source rows go where, in which order


@dataclass
class Split:
    query_rows: np.ndarray      # source rows of the query part, in source order
    database_rows: np.ndarray   # source rows of the database: original items, then incremental items
    num_original: int


def classes_between(labels: np.ndarray, first: int, end: int) -> np.ndarray:
    """Rows whose classes all lie below `end`, one of them at least `first`: the items that a class round
    bringing classes first..end-1 adds (first = 0: every item of classes 0..end-1)."""
    return ~is_incremental(labels, end) & is_incremental(labels, first)


def select_rows(part: SourcePart, per_class: Optional[int], excluded: Set[int],
                classes: Optional[tuple] = None) -> np.ndarray:
    """The part's rows, less `excluded`, within the class window (first, end) if given, then the first
    `per_class` of each class; in source order."""
    rows = np.asarray([r for r in part.rows if int(r) not in excluded], dtype=np.int64) if excluded \
        else np.asarray(part.rows, dtype=np.int64)
    if classes is not None:
        rows = rows[classes_between(part.labels[rows], *classes)]
    if per_class is not None and len(rows):
        rows = rows[first_rows_per_class(part.labels[rows], per_class)]
    return rows


def make_split(dataset: SourceDataset, num_seen: int, database_per_class: Optional[int],
               query_per_class: Optional[int], excluded_query: Set[int], excluded_database: Set[int],
               classes: Optional[int] = None) -> Split:
    """The split of a first preparation; `classes` K keeps the items of classes 0..K-1 only."""
    window = (0, classes) if classes is not None else None
    query_rows = select_rows(dataset.query, query_per_class, excluded_query, window)
    database_rows = select_rows(dataset.database, database_per_class, excluded_database, window)
    incremental = is_incremental(dataset.database.labels[database_rows], num_seen)
    ordered = np.concatenate([database_rows[~incremental], database_rows[incremental]])
    split = Split(query_rows, ordered, int((~incremental).sum()))
    check_split_not_empty(dataset, split, num_seen, first_round=classes is not None and num_seen == classes)
    return split


def check_split_not_empty(dataset: SourceDataset, split: Split, num_seen: int, first_round: bool = False) -> None:
    """Every part holds items; except the incremental part of a first class round (--classes K, num_seen K),
    whose items are all original: its new classes come with the next round (--extends)."""
    checks = [(len(split.query_rows), f"the query part ({dataset.query.origin})"),
              (split.num_original, f"the original database part (items with all labels < {num_seen}, "
                                   f"from {dataset.database.origin})")]
    if not first_round:
        checks.append((len(split.database_rows) - split.num_original,
                       f"the incremental database part (items with a label >= {num_seen}, from "
                       f"{dataset.database.origin})"))
    for count, what in checks:
        if count == 0:
            raise ValueError(f"{dataset.name}: {what} is empty; check --num-seen, --classes and the per-class "
                             f"limits")


def resolve_num_seen(dataset: SourceDataset, requested: Optional[int], classes: Optional[int] = None) -> int:
    """--num-seen, or its default: with --classes K, K (every item original: a first class round)."""
    if classes is not None:
        num_seen = requested if requested is not None else classes
        if not 1 <= num_seen <= classes:
            raise ValueError(f"--num-seen: expected 1..{classes} with --classes {classes}, got {num_seen}")
        return num_seen
    num_seen = requested if requested is not None else dataset.default_num_seen
    if num_seen is None:
        raise ValueError(f"--num-seen is required for --dataset {dataset.name} (number of original classes)")
    if not 1 <= num_seen < dataset.num_classes:
        raise ValueError(f"--num-seen: expected 1..{dataset.num_classes - 1} for {dataset.name} "
                         f"({dataset.num_classes} classes), got {num_seen}")
    return num_seen


def check_classes(dataset: SourceDataset, classes: Optional[int]) -> None:
    if classes is not None and classes > dataset.num_classes:
        raise ValueError(f"--classes: expected 1..{dataset.num_classes} for {dataset.name} ({dataset.num_classes} "
                         f"classes), got {classes}")


# ----------------------------------------------------------------------------------------------------------
# Checks of meaning


def unanswerable_queries(query_labels: np.ndarray, database_labels: np.ndarray) -> tuple:
    """(number of queries none of whose classes any database item has, those classes in order): such a
    query has no relevant item, so it can only score 0 (it lowers mAP by 1 / num_queries)."""
    in_database = database_labels.astype(bool).any(axis=0)
    query = query_labels.astype(bool)
    unanswerable = ~(query & in_database).any(axis=1)
    classes = np.flatnonzero(query[unanswerable].any(axis=0) & ~in_database)
    return int(unanswerable.sum()), [int(c) for c in classes]


def unanswerable_queries_warning(query_labels: np.ndarray, database_labels: np.ndarray,
                                 class_names) -> Optional[str]:
    """The warning prepare prints about unanswerable_queries, or None when every query has a relevant item."""
    count, classes = unanswerable_queries(query_labels, database_labels)
    if not count:
        return None
    named = ", ".join(f"{c} ({class_names[c]})" for c in classes)
    return (f"{count} of {len(query_labels)} queries carry only classes that no database item has "
            f"(class{'es' if len(classes) != 1 else ''} {named or 'none: these queries have no label'}); they have "
            f"no relevant item and can only score 0")
