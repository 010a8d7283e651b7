"""Retrieval metrics over binary codes: Hamming ranking, mAP@k, precision@k, precision/recall by radius.

Pure tensor functions (no I/O, no torch.distributed), run on the device of the query codes. Protocol
(NOTES section 1): rank the database by Hamming distance 0.5 * (c - q.b), ties broken by database
index; relevant = shares at least one label; AP@k = mean precision@i over the relevant hits i within
the top k; a query with no hit in its top k scores 0 and still counts. topk None or <= 0 = the whole
database. Work is chunked over queries so memory stays bounded at 2,100 x 195,834.
"""
from __future__ import annotations

from typing import Iterator, Optional, Tuple

import torch

from .hashing import check_codes, check_labels, check_nonempty, check_rows

# Query rows per chunk are chosen so one chunk's query x database matrices stay near this many entries.
CHUNK_ENTRIES = 1 << 24


def hamming_distances(query_codes: torch.Tensor, db_codes: torch.Tensor) -> torch.Tensor:
    """Integer Hamming distances (q x n, int16) between +-1 codes of any dtype."""
    inner = query_codes.float() @ db_codes.float().T
    return ((query_codes.shape[1] - inner) / 2).round().to(torch.int16)


def relevance(query_labels: torch.Tensor, db_labels: torch.Tensor) -> torch.Tensor:
    """q x n bool: the query and the database item share at least one label."""
    return (query_labels.float() @ db_labels.float().T) > 0


def _validate(query_codes, db_codes, query_labels, db_labels) -> None:
    check_codes("query_codes", query_codes)
    check_nonempty("query_codes", query_codes)
    check_codes("db_codes", db_codes, query_codes.shape[1])
    check_nonempty("db_codes", db_codes)
    check_labels("query_labels", query_labels)
    check_rows("query_labels", query_labels, query_codes.shape[0], "query_codes")
    check_labels("db_labels", db_labels, query_labels.shape[1])
    check_rows("db_labels", db_labels, db_codes.shape[0], "db_codes")


def _resolve_topk(topk: Optional[int], num_database: int) -> int:
    if topk is None or topk <= 0 or topk > num_database:
        return num_database
    return int(topk)


def _chunks(num_queries: int, num_database: int, chunk_rows: Optional[int]) -> Iterator[slice]:
    rows = chunk_rows or max(1, CHUNK_ENTRIES // num_database)
    for start in range(0, num_queries, rows):
        yield slice(start, min(start + rows, num_queries))


def _ranked_relevance(query_codes, db_codes, query_labels, db_labels, topk, chunk_rows):
    """For each chunk of queries: (chunk slice, relevance of the top-k items in rank order)."""
    device = query_codes.device
    db_codes = db_codes.to(device)
    db_labels = db_labels.to(device)
    query_labels = query_labels.to(device)
    for rows in _chunks(query_codes.shape[0], db_codes.shape[0], chunk_rows):
        distances = hamming_distances(query_codes[rows], db_codes)
        # A stable sort keeps equal distances in database-index order (the tie rule).
        order = torch.sort(distances, dim=1, stable=True).indices[:, :topk]
        relevant = relevance(query_labels[rows], db_labels)
        yield rows, torch.gather(relevant, 1, order)


def average_precisions(query_codes: torch.Tensor, db_codes: torch.Tensor, query_labels: torch.Tensor,
                       db_labels: torch.Tensor, topk: Optional[int] = None,
                       chunk_rows: Optional[int] = None) -> torch.Tensor:
    """AP@topk of every query (float64 tensor of length q, on the query codes' device)."""
    _validate(query_codes, db_codes, query_labels, db_labels)
    topk = _resolve_topk(topk, db_codes.shape[0])
    device = query_codes.device
    aps = torch.zeros(query_codes.shape[0], dtype=torch.float64, device=device)
    ranks = torch.arange(1, topk + 1, dtype=torch.float64, device=device)
    for rows, ranked in _ranked_relevance(query_codes, db_codes, query_labels, db_labels, topk, chunk_rows):
        hits = ranked.to(torch.float64)
        precision_at_hits = hits.cumsum(dim=1) / ranks * hits
        num_hits = hits.sum(dim=1)
        aps[rows] = torch.where(num_hits > 0, precision_at_hits.sum(dim=1) / num_hits.clamp(min=1), 0.0)
    return aps


def mean_average_precision(query_codes: torch.Tensor, db_codes: torch.Tensor, query_labels: torch.Tensor,
                           db_labels: torch.Tensor, topk: Optional[int] = None,
                           chunk_rows: Optional[int] = None) -> float:
    """mAP@topk (topk None or <= 0: the whole database) as a Python float."""
    return float(average_precisions(query_codes, db_codes, query_labels, db_labels, topk, chunk_rows).mean())


def precision_at_k(query_codes: torch.Tensor, db_codes: torch.Tensor, query_labels: torch.Tensor,
                   db_labels: torch.Tensor, k: int, chunk_rows: Optional[int] = None) -> float:
    """Mean over queries of the fraction of relevant items among the top k of the ranking."""
    _validate(query_codes, db_codes, query_labels, db_labels)
    if k <= 0:
        raise ValueError(f"k: expected a positive number of retrieved items, got {k}")
    k = min(int(k), db_codes.shape[0])
    total = 0.0
    for _, ranked in _ranked_relevance(query_codes, db_codes, query_labels, db_labels, k, chunk_rows):
        total += float(ranked.sum(dim=1).to(torch.float64).div(k).sum())
    return total / query_codes.shape[0]


def precision_at_ks(query_codes, db_codes, query_labels, db_labels, ks, chunk_rows=None) -> torch.Tensor:
    """precision@k for several k in one ranking pass (float64 tensor, one entry per k)."""
    _validate(query_codes, db_codes, query_labels, db_labels)
    ks = [min(int(k), db_codes.shape[0]) for k in ks]
    if not ks or min(ks) <= 0:
        raise ValueError(f"ks: expected positive numbers of retrieved items, got {ks}")
    top = max(ks)
    totals = torch.zeros(len(ks), dtype=torch.float64)
    index = torch.tensor(ks) - 1
    for _, ranked in _ranked_relevance(query_codes, db_codes, query_labels, db_labels, top, chunk_rows):
        hits = ranked.to(torch.float64).cumsum(dim=1)[:, index.to(ranked.device)].cpu()
        totals += hits.sum(dim=0)
    return totals / torch.tensor(ks, dtype=torch.float64) / query_codes.shape[0]


def precision_recall_by_radius(query_codes: torch.Tensor, db_codes: torch.Tensor, query_labels: torch.Tensor,
                               db_labels: torch.Tensor,
                               chunk_rows: Optional[int] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Mean precision and recall when retrieving every item within Hamming radius 0..c.

    Returns two float64 tensors of length c + 1. A query that retrieves nothing within a radius has
    precision 0 there; a query with no relevant item in the database has recall 0.
    """
    _validate(query_codes, db_codes, query_labels, db_labels)
    code_length = query_codes.shape[1]
    device = query_codes.device
    db_codes, db_labels, query_labels = db_codes.to(device), db_labels.to(device), query_labels.to(device)
    precision = torch.zeros(code_length + 1, dtype=torch.float64, device=device)
    recall = torch.zeros_like(precision)
    for rows in _chunks(query_codes.shape[0], db_codes.shape[0], chunk_rows):
        distances = hamming_distances(query_codes[rows], db_codes).long()
        relevant = relevance(query_labels[rows], db_labels).to(torch.float64)
        per_radius = torch.zeros(distances.shape[0], code_length + 1, dtype=torch.float64, device=device)
        retrieved = per_radius.scatter_add(1, distances, torch.ones_like(relevant)).cumsum(dim=1)
        hits = per_radius.scatter_add(1, distances, relevant).cumsum(dim=1)
        num_relevant = relevant.sum(dim=1, keepdim=True)
        precision += torch.where(retrieved > 0, hits / retrieved.clamp(min=1), 0.0).sum(dim=0)
        recall += torch.where(num_relevant > 0, hits / num_relevant.clamp(min=1), 0.0).sum(dim=0)
    return precision / query_codes.shape[0], recall / query_codes.shape[0]
