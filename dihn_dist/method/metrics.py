"""Retrieval metrics over binary codes: Hamming ranking, mAP@k, precision@k, precision/recall by radius.

Pure tensor functions (no I/O, no torch.distributed), run on the device of the query codes. Protocol
(docs/method.md, "Retrieval and the metric"): rank the database by Hamming distance 0.5 * (c - q.b), ties broken by database
index; relevant = shares at least one label; AP@k = mean precision@i over the relevant hits i within
the top k; a query with no hit in its top k scores 0 and still counts. topk None or <= 0 = the whole
database. Work is chunked over queries so memory stays bounded at 2,100 x 195,834.

Two interchangeable ranking back ends compute the same thing (the tests check that they agree):
- "torch" (CUDA, or CPU when forced): distances by a matrix product, a stable torch.sort per chunk,
  a gather of the relevance, AP from a cumulative sum of the hits.
- "numpy" (the CPU default): codes and labels are packed into machine words once; per chunk the
  distances are popcount(q XOR b) (uint8, exact integers 0..c), the ranking is numpy's stable radix
  argsort of those small integers (linear time, ties stay in database-index order), the relevance is an
  AND of packed label masks gathered in rank order, and AP needs only the ranks of the hits:
  AP = (1/H) sum_i i / rank_i over the H hits in the top k. Chunks run on a thread pool (numpy releases
  the GIL in all of these), one thread per torch intra-op thread.
The sharded metrics at the end (shard_distance_counts, shard_rank_sums) choose between the same back ends
the same way. In numpy one bincount of (query, distance, relevant) keys gives the per-distance counts, the
same stable radix argsort orders the shard, and the rank sums touch only the hits: a hit's global rank and
hit number are its position plus an offset per (query, distance), and the per-query sums are np.add.reduceat
over each query's run of hits. Their shard labels may be a (patterns, pattern_ids) pair: relevance is then
computed once per pattern (a matrix product, or the packed-mask AND) and gathered by the ids.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterator, List, Optional, Tuple, Union

import numpy as np
import torch

from ..common.formats import is_incremental
from .hashing import check_codes, check_labels, check_nonempty, check_pattern_ids, check_rows, describe_tensor

# Query rows per chunk are chosen so one chunk's query x database matrices stay near this many entries.
CHUNK_ENTRIES = 1 << 24
# The numpy back end works on smaller chunks (cache-friendly, and several of them run at once).
NUMPY_CHUNK_ENTRIES = 1 << 21
# Back end used for CPU inputs: "numpy" (fast, needs numpy >= 2.0 for bitwise_count) or "torch".
CPU_BACKEND = "numpy" if hasattr(np, "bitwise_count") else "torch"


def hamming_distances(query_codes: torch.Tensor, db_codes: torch.Tensor) -> torch.Tensor:
    """Integer Hamming distances (q x n, int16) between +-1 codes of any dtype."""
    inner = query_codes.float() @ db_codes.float().T
    return ((query_codes.shape[1] - inner) / 2).round().to(torch.int16)


def relevance(query_labels: torch.Tensor, db_labels: torch.Tensor) -> torch.Tensor:
    """q x n bool: the query and the database item share at least one label."""
    return (query_labels.float() @ db_labels.float().T) > 0


def _validate(query_codes, db_codes, query_labels, db_labels, db: str = "db") -> None:
    """The inputs' shapes and values; `db` names the database side in the errors ("shard": a shard of it,
    which, unlike the whole database, may hold no rows, and whose labels may be a (patterns, pattern_ids)
    pair). Pattern ids on a CUDA device are not range-checked here (that would sync; the indexing fails)."""
    check_codes("query_codes", query_codes)
    check_nonempty("query_codes", query_codes)
    check_codes(f"{db}_codes", db_codes, query_codes.shape[1])
    if db == "db":
        check_nonempty("db_codes", db_codes)
    check_labels("query_labels", query_labels)
    check_nonempty("query_labels", query_labels)
    check_rows("query_labels", query_labels, query_codes.shape[0], "query_codes")
    if db == "shard" and isinstance(db_labels, tuple):
        if len(db_labels) != 2:
            raise ValueError(f"shard_labels: expected a label matrix or a (patterns, pattern_ids) pair, "
                             f"got a tuple of {len(db_labels)}")
        check_labels("shard_labels patterns", db_labels[0], query_labels.shape[1])
        check_pattern_ids("shard_labels pattern_ids", db_labels[1], db_codes.shape[0], db_labels[0].shape[0],
                           "shard_codes")
        return
    check_labels(f"{db}_labels", db_labels, query_labels.shape[1])
    check_rows(f"{db}_labels", db_labels, db_codes.shape[0], f"{db}_codes")


def _as_patterns(labels):
    """(label rows, row -> label row or None): labels given per row, or as a (patterns, pattern_ids) pair."""
    return labels if isinstance(labels, tuple) else (labels, None)


def _resolve_topk(topk: Optional[int], num_database: int) -> int:
    if topk is None or topk <= 0 or topk > num_database:
        return num_database
    return int(topk)


def _chunks(num_queries: int, num_database: int, chunk_rows: Optional[int],
            entries: int = CHUNK_ENTRIES) -> Iterator[slice]:
    rows = chunk_rows or max(1, entries // num_database)
    for start in range(0, num_queries, rows):
        yield slice(start, min(start + rows, num_queries))


def _backend(query_codes: torch.Tensor) -> str:
    return "torch" if query_codes.device.type != "cpu" else CPU_BACKEND


# ----------------------------------------------------------------------------------------------------
# torch back end

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


def _torch_average_precisions(ranked: torch.Tensor) -> torch.Tensor:
    hits = ranked.to(torch.float64)
    ranks = torch.arange(1, ranked.shape[1] + 1, dtype=torch.float64, device=ranked.device)
    precision_at_hits = hits.cumsum(dim=1) / ranks * hits
    num_hits = hits.sum(dim=1)
    return torch.where(num_hits > 0, precision_at_hits.sum(dim=1) / num_hits.clamp(min=1), 0.0)


# ----------------------------------------------------------------------------------------------------
# numpy back end (CPU)

def _pack_rows(bits: np.ndarray) -> np.ndarray:
    """Pack a boolean (rows x width) matrix into unsigned words (rows x words), bit j of row = column j.

    The word is the smallest of uint8/16/32/64 that holds the width; wider rows use several uint64s.
    """
    packed = np.packbits(bits, axis=1, bitorder="little")  # rows x ceil(width / 8) bytes
    nbytes = packed.shape[1]
    word = 1 if nbytes <= 1 else 2 if nbytes <= 2 else 4 if nbytes <= 4 else 8
    padded = -(-nbytes // word) * word
    if padded != nbytes:
        packed = np.concatenate([packed, np.zeros((packed.shape[0], padded - nbytes), np.uint8)], axis=1)
    return np.ascontiguousarray(packed).view(f"<u{word}")


def _as_bits(tensor: torch.Tensor, positive_is_one: bool) -> np.ndarray:
    tensor = tensor.detach().cpu()
    return (tensor > 0 if positive_is_one else tensor != 0).numpy()


class _NumpyRanker:
    """Packed codes and labels of one call; rank(rows, topk) gives the relevance in rank order.

    db_labels may be a (patterns, pattern_ids) pair: then only the patterns are packed, and a chunk's
    relevance is computed once per pattern and gathered by the ids."""

    def __init__(self, query_codes, db_codes, query_labels=None, db_labels=None):
        self.code_length = query_codes.shape[1]
        self.query_words = _pack_rows(_as_bits(query_codes, True))
        self.db_words = _pack_rows(_as_bits(db_codes, True))
        if query_labels is not None:  # ranking by distance alone needs no labels
            patterns, ids = _as_patterns(db_labels)
            self.query_masks = _pack_rows(_as_bits(query_labels, False))
            self.db_masks = _pack_rows(_as_bits(patterns, False))
            self.pattern_ids = None if ids is None else ids.detach().cpu().numpy().astype(np.intp, copy=False)

    def distances(self, rows: slice) -> np.ndarray:
        """Exact Hamming distances of a chunk of queries (uint8, or uint16 beyond 255 bits)."""
        total = None
        for w in range(self.db_words.shape[1]):
            count = np.bitwise_count(np.bitwise_xor(self.query_words[rows, w, None], self.db_words[None, :, w]))
            if self.code_length > 255:
                count = count.astype(np.uint16)  # a uint8 sum over the words could overflow
            total = count if total is None else total + count
        return total

    def relevance(self, rows: slice, columns=None) -> np.ndarray:
        """Relevance of a chunk of queries to the database (bool), or to db rows `columns` per query."""
        if self.pattern_ids is not None:
            per_pattern = self._shares(rows, None)
            if columns is None:
                return np.take(per_pattern, self.pattern_ids, axis=1)
            return np.take_along_axis(per_pattern, self.pattern_ids[columns], axis=1)
        return self._shares(rows, columns)

    def _shares(self, rows: slice, columns) -> np.ndarray:
        """A chunk of queries shares a label with each packed mask (or with masks `columns` per query)."""
        relevant = None
        for w in range(self.db_masks.shape[1]):
            db = self.db_masks[:, w] if columns is None else self.db_masks[:, w][columns]
            shared = (db & self.query_masks[rows, w, None]) != 0
            relevant = shared if relevant is None else (relevant | shared)
        return relevant

    def rank(self, rows: slice, topk: int) -> np.ndarray:
        distances = self.distances(rows)
        # Stable radix sort of small integers: ties keep database-index order.
        order = np.argsort(distances, axis=1, kind="stable")[:, :topk]
        return self.relevance(rows, order)

    def counts(self, rows: slice) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(distances, relevance, rows x 2 x (c+1) int64 counts) of a chunk of queries: per query and
        distance 0..c, the items ([:, 0]) and the relevant items ([:, 1]) at that distance."""
        distances, relevant = self.distances(rows), self.relevance(rows)
        num_rows, bins = distances.shape[0], self.code_length + 1
        # One bincount of the key (query, distance, relevant) counts both, with no masked copy of the hits.
        key = distances.astype(np.int64)
        key += (np.arange(num_rows, dtype=np.int64) * bins)[:, None]
        key <<= 1
        key |= relevant
        pairs = np.bincount(key.ravel(), minlength=num_rows * bins * 2).reshape(num_rows, bins, 2)
        return distances, relevant, np.stack([pairs.sum(axis=2), pairs[:, :, 1]], axis=1)


def _numpy_average_precisions(ranked: np.ndarray) -> np.ndarray:
    """AP of each row of a ranked relevance matrix: (1/H) sum_i i / rank_i over its H hits.

    Only the hits are touched after one scan: their flat positions (row-major, so each row's hits come
    in rank order), from which rank_i = position - row * k + 1 and i = hit number within the row.
    """
    num_rows, k = ranked.shape
    positions = np.flatnonzero(ranked)
    num_hits = np.count_nonzero(ranked, axis=1)
    first = np.cumsum(num_hits) - num_hits  # index of each row's first hit among all hits
    ranks = positions - np.repeat(np.arange(num_rows, dtype=np.int64) * k - 1, num_hits)
    hit_numbers = np.arange(1, positions.size + 1, dtype=np.int64) - np.repeat(first, num_hits)
    ratios = hit_numbers / ranks  # float64
    return np.where(num_hits > 0, _segment_sums(ratios, num_hits) / np.maximum(num_hits, 1), 0.0)


def _segment_sums(values: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """float64 sums of consecutive runs of values, lengths[i] of them in run i (an empty run sums to 0).

    reduceat, not a weighted bincount: several times faster, and summed in order within each run."""
    sums = np.zeros(lengths.shape[0], dtype=np.float64)
    if values.size:
        nonempty = lengths > 0
        sums[nonempty] = np.add.reduceat(values, (np.cumsum(lengths) - lengths)[nonempty], dtype=np.float64)
    return sums


def _numpy_map(fn: Callable, query_codes, db_codes, query_labels, db_labels, topk, chunk_rows) -> List:
    """[fn(ranked relevance of the chunk) for each chunk], the chunks spread over a thread pool.

    topk None: fn(ranker, rows) instead, for work that does not need the ranking.
    """
    ranker = _NumpyRanker(query_codes, db_codes, query_labels, db_labels)
    chunks = list(_chunks(query_codes.shape[0], db_codes.shape[0], chunk_rows, NUMPY_CHUNK_ENTRIES))
    if topk is None:
        work = lambda rows: fn(ranker, rows)  # noqa: E731
    else:
        work = lambda rows: fn(ranker.rank(rows, topk))  # noqa: E731
    workers = min(max(1, torch.get_num_threads()), len(chunks))
    if workers == 1:
        return [work(rows) for rows in chunks]
    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(work, chunks))


# ----------------------------------------------------------------------------------------------------
# Public metrics

def nearest(query_codes: torch.Tensor, db_codes: torch.Tensor, k: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """(rows, Hamming distances) of each query's k nearest database codes, ties by database row: the
    ranking every metric here uses (q x k int64 rows, q x k int64 distances, on the CPU)."""
    check_codes("query_codes", query_codes)
    check_codes("db_codes", db_codes, query_codes.shape[1])
    k = min(int(k), db_codes.shape[0])
    if _backend(query_codes) == "numpy":
        distances = _NumpyRanker(query_codes, db_codes).distances(slice(None)).astype(np.int64)
        order = np.argsort(distances, axis=1, kind="stable")[:, :k]
        return torch.from_numpy(order), torch.from_numpy(np.take_along_axis(distances, order, axis=1))
    distances = hamming_distances(query_codes, db_codes.to(query_codes.device)).long()
    ranked = torch.sort(distances, dim=1, stable=True)
    return ranked.indices[:, :k].cpu(), ranked.values[:, :k].cpu()


def average_precisions(query_codes: torch.Tensor, db_codes: torch.Tensor, query_labels: torch.Tensor,
                       db_labels: torch.Tensor, topk: Optional[int] = None,
                       chunk_rows: Optional[int] = None) -> torch.Tensor:
    """AP@topk of every query (float64 tensor of length q, on the query codes' device)."""
    _validate(query_codes, db_codes, query_labels, db_labels)
    topk = _resolve_topk(topk, db_codes.shape[0])
    device = query_codes.device
    if _backend(query_codes) == "numpy":
        parts = _numpy_map(_numpy_average_precisions, query_codes, db_codes, query_labels, db_labels,
                           topk, chunk_rows)
        return torch.from_numpy(np.concatenate(parts)).to(torch.float64)
    aps = torch.zeros(query_codes.shape[0], dtype=torch.float64, device=device)
    for rows, ranked in _ranked_relevance(query_codes, db_codes, query_labels, db_labels, topk, chunk_rows):
        aps[rows] = _torch_average_precisions(ranked)
    return aps


def mean_average_precision(query_codes: torch.Tensor, db_codes: torch.Tensor, query_labels: torch.Tensor,
                           db_labels: torch.Tensor, topk: Optional[int] = None,
                           chunk_rows: Optional[int] = None) -> float:
    """mAP@topk (topk None or <= 0: the whole database) as a Python float."""
    return float(average_precisions(query_codes, db_codes, query_labels, db_labels, topk, chunk_rows).mean())


def _hits_at(ks: List[int], query_codes, db_codes, query_labels, db_labels, chunk_rows) -> torch.Tensor:
    """Total number of relevant items among the top k, summed over the queries, for each k (int64)."""
    top = max(ks)
    index = [k - 1 for k in ks]
    if _backend(query_codes) == "numpy":
        count = lambda ranked: np.cumsum(ranked, axis=1, dtype=np.int64)[:, index].sum(axis=0)  # noqa: E731
        parts = _numpy_map(count, query_codes, db_codes, query_labels, db_labels, top, chunk_rows)
        return torch.from_numpy(np.sum(parts, axis=0).astype(np.int64))
    totals = torch.zeros(len(ks), dtype=torch.int64)
    for _, ranked in _ranked_relevance(query_codes, db_codes, query_labels, db_labels, top, chunk_rows):
        hits = ranked.to(torch.int64).cumsum(dim=1)[:, torch.tensor(index, device=ranked.device)]
        totals += hits.sum(dim=0).cpu()
    return totals


def precision_at_k(query_codes: torch.Tensor, db_codes: torch.Tensor, query_labels: torch.Tensor,
                   db_labels: torch.Tensor, k: int, chunk_rows: Optional[int] = None) -> float:
    """Mean over queries of the fraction of relevant items among the top k of the ranking."""
    _validate(query_codes, db_codes, query_labels, db_labels)
    if k <= 0:
        raise ValueError(f"k: expected a positive number of retrieved items, got {k}")
    k = min(int(k), db_codes.shape[0])
    hits = _hits_at([k], query_codes, db_codes, query_labels, db_labels, chunk_rows)
    return float(hits[0]) / k / query_codes.shape[0]


def precision_at_ks(query_codes, db_codes, query_labels, db_labels, ks, chunk_rows=None) -> torch.Tensor:
    """precision@k for several k in one ranking pass (float64 tensor, one entry per k)."""
    _validate(query_codes, db_codes, query_labels, db_labels)
    ks = [min(int(k), db_codes.shape[0]) for k in ks]
    if not ks or min(ks) <= 0:
        raise ValueError(f"ks: expected positive numbers of retrieved items, got {ks}")
    hits = _hits_at(ks, query_codes, db_codes, query_labels, db_labels, chunk_rows).to(torch.float64)
    return hits / torch.tensor(ks, dtype=torch.float64) / query_codes.shape[0]


def precision_recall_by_radius(query_codes: torch.Tensor, db_codes: torch.Tensor, query_labels: torch.Tensor,
                               db_labels: torch.Tensor,
                               chunk_rows: Optional[int] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Mean precision and recall when retrieving every item within Hamming radius 0..c.

    Returns two float64 tensors of length c + 1. A query that retrieves nothing within a radius has
    precision 0 there; a query with no relevant item in the database has recall 0.
    """
    _validate(query_codes, db_codes, query_labels, db_labels)
    code_length = query_codes.shape[1]
    if _backend(query_codes) == "numpy":
        def per_chunk(ranker, rows):
            counts = ranker.counts(rows)[2].cumsum(axis=2)
            retrieved, hits, num_relevant = counts[:, 0], counts[:, 1], counts[:, 1, -1]
            precision = np.where(retrieved > 0, hits / np.maximum(retrieved, 1), 0.0).sum(axis=0)
            recall = np.where(num_relevant[:, None] > 0, hits / np.maximum(num_relevant, 1)[:, None], 0.0)
            return precision, recall.sum(axis=0)

        parts = _numpy_map(per_chunk, query_codes, db_codes, query_labels, db_labels, None, chunk_rows)
        precision = torch.from_numpy(np.sum([p for p, _ in parts], axis=0))
        recall = torch.from_numpy(np.sum([r for _, r in parts], axis=0))
        return precision / query_codes.shape[0], recall / query_codes.shape[0]
    device = query_codes.device
    db_codes, db_labels, query_labels = db_codes.to(device), db_labels.to(device), query_labels.to(device)
    precision = torch.zeros(code_length + 1, dtype=torch.float64, device=device)
    recall = torch.zeros_like(precision)
    for rows in _chunks(query_codes.shape[0], db_codes.shape[0], chunk_rows):
        distances = hamming_distances(query_codes[rows], db_codes).long()
        relevant = relevance(query_labels[rows], db_labels)
        per_radius = torch.zeros(distances.shape[0], code_length + 1, dtype=torch.int64, device=device)
        retrieved = per_radius.scatter_add(1, distances, torch.ones_like(distances)).cumsum(dim=1)
        hits = per_radius.scatter_add(1, distances, relevant.long()).cumsum(dim=1).to(torch.float64)
        num_relevant = relevant.sum(dim=1, keepdim=True)
        precision += torch.where(retrieved > 0, hits / retrieved.clamp(min=1), 0.0).sum(dim=0)
        recall += torch.where(num_relevant > 0, hits / num_relevant.clamp(min=1), 0.0).sum(dim=0)
    return precision / query_codes.shape[0], recall / query_codes.shape[0]


# ----------------------------------------------------------------------------------------------------
# The retrieval row of a report

def retrieval_row(query_codes: torch.Tensor, db_codes: torch.Tensor, query_labels: torch.Tensor,
                  db_labels: torch.Tensor, num_seen: int, topk: Optional[int], precision_k: int) -> dict:
    """mAP@ALL, mAP@topk, precision@precision_k, and mAP@topk over the queries of original classes and over
    those of incremental classes (a query is incremental when it carries any class >= num_seen).

    One ranking serves all three: each chunk of queries is ranked once over the whole database, and AP@ALL,
    AP@topk and the hits of the top precision_k are all read from that ranking (three separate calls would
    rank three times: at NUS-WIDE size the ranking is most of the cost)."""
    _validate(query_codes, db_codes, query_labels, db_labels)
    n = db_codes.shape[0]
    k, pk = _resolve_topk(topk, n), min(int(precision_k), n)

    def summarise(ranked):  # AP@ALL, AP@k and hits in the top pk of a chunk's ranked relevance
        if isinstance(ranked, np.ndarray):
            return (_numpy_average_precisions(ranked), _numpy_average_precisions(ranked[:, :k]),
                    np.count_nonzero(ranked[:, :pk], axis=1))
        return (_torch_average_precisions(ranked).cpu().numpy(), _torch_average_precisions(ranked[:, :k]).cpu().numpy(),
                ranked[:, :pk].sum(dim=1).cpu().numpy())

    if _backend(query_codes) == "numpy":
        parts = _numpy_map(summarise, query_codes, db_codes, query_labels, db_labels, n, None)
    else:
        parts = [summarise(ranked) for _, ranked in
                 _ranked_relevance(query_codes, db_codes, query_labels, db_labels, n, None)]
    aps_all, aps_topk, hits = (torch.from_numpy(np.concatenate(column)) for column in zip(*parts))
    return _row(aps_all, aps_topk, hits, query_labels, num_seen, topk, precision_k, n)


def _row(aps_all, aps_topk, hits, query_labels, num_seen, topk, precision_k, n) -> dict:
    """retrieval_row's dict from each query's AP@ALL, AP@topk and hits in the top precision_k (CPU tensors)."""
    pk = min(int(precision_k), n)
    new_queries = is_incremental(query_labels, num_seen).cpu()
    return {
        "map_all": float(aps_all.mean()),
        "map_topk": float(aps_topk.mean()),
        "topk": topk or n,
        f"precision_at_{precision_k}": float(hits.sum()) / pk / aps_all.shape[0],
        "map_original_queries": float(aps_topk[~new_queries].mean()) if bool((~new_queries).any()) else None,
        "map_incremental_queries": float(aps_topk[new_queries].mean()) if bool(new_queries.any()) else None,
        "num_queries": int(aps_all.shape[0]),
        "num_database": int(n),
    }


# ----------------------------------------------------------------------------------------------------
# A database split by rows into shards (one per rank): the same metrics, no rank ranking the whole database
#
# The ranking orders items by (Hamming distance, database row). With the rows split into contiguous shards
# in rank order, the items ranked before an item of shard s at distance d are: every item at a smaller
# distance (in any shard), the items at distance d in the shards before s, and the items at distance d of
# shard s with a lower row. Per query the first two need only counts per distance (c + 1 bins of items and
# of relevant items): shard_distance_counts, summed over all shards and over the shards before s (an
# all-reduce and an exclusive prefix in rank order). The third is a sort of the shard's own rows. So every
# shard places its own hits in the global ranking and adds i / rank_i for them (shard_rank_sums); the sums
# over shards are the AP numerators. Counts and ranks are exact integers; only the float sum of the ratios
# is associated differently from the one-process ranking (differences of order 1e-16 relative).

# Query rows per chunk of the torch back end: several int64 query x shard matrices live at once.
SHARD_CHUNK_ENTRIES = 1 << 21

# A shard's labels: a row per item, or (patterns P x L, pattern_ids of the rows), item i labelled
# patterns[pattern_ids[i]]: multi-label data repeats a few thousand patterns over millions of rows.
ShardLabels = Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]


def _shard_inputs(query_codes, shard_codes, query_labels, shard_labels):
    """The torch back end's shard side on the query codes' device, labels as (patterns, int64 ids or None)."""
    device = query_codes.device
    patterns, ids = _as_patterns(shard_labels)
    return (shard_codes.to(device), query_labels.to(device),
            (patterns.to(device), None if ids is None else ids.to(device, torch.long)))


def _shard_chunk(query_codes, shard_codes, query_labels, shard_labels, rows):
    """(distances int64, relevance bool, per-distance counts q x 2 x (c+1)) of a chunk of queries (torch),
    shard_labels as _shard_inputs gives them."""
    distances = hamming_distances(query_codes[rows], shard_codes).long()
    patterns, ids = shard_labels
    relevant = relevance(query_labels[rows], patterns)
    if ids is not None:
        relevant = relevant[:, ids]
    counts = torch.zeros(distances.shape[0], 2, query_codes.shape[1] + 1, dtype=torch.int64,
                         device=distances.device)
    counts[:, 0].scatter_add_(1, distances, torch.ones_like(distances))
    counts[:, 1].scatter_add_(1, distances, relevant.long())
    return distances, relevant, counts


def _below(counts):
    """Items at smaller distances (counts along the last axis; torch or numpy)."""
    return counts.cumsum(-1) - counts


def _numpy_rank_sums(ranker: _NumpyRanker, rows: slice, total, before, k: int, pk: int) -> np.ndarray:
    """shard_rank_sums of a chunk of queries: once the shard is ordered, only its hits are touched."""
    distances, relevant, local = ranker.counts(rows)
    num_rows, n = distances.shape
    # Stable radix sort of small integers: within a distance the shard's rows stay in row order.
    order = np.argsort(distances, axis=1, kind="stable")
    order += (np.arange(num_rows) * n)[:, None]  # flat indices: a flat take is much faster than take_along_axis
    positions = np.flatnonzero(np.take(relevant, order))  # row-major: rank order per row
    # The hits come query by query, distance by distance, local[q, 1, d] of them at (q, d): what a hit adds
    # to its flat position (its hit index in the chunk) to make its global rank (hit number) depends on
    # (q, d) only, so it is a repeat of a q x (c+1) table. The tables follow the torch back end's offsets.
    per_group, num_hits = local[:, 1].ravel(), local[:, 1].sum(axis=1)
    rank_table = (_below(total[rows, 0]) + before[rows, 0] - _below(local[:, 0])
                  - (np.arange(num_rows, dtype=np.int64) * n - 1)[:, None])
    hit_table = (_below(total[rows, 1]) + before[rows, 1] - _below(local[:, 1])
                 - (np.cumsum(num_hits) - num_hits - 1)[:, None])
    ranks = positions + np.repeat(rank_table.ravel(), per_group)
    ratios = (np.arange(positions.size) + np.repeat(hit_table.ravel(), per_group)) / ranks
    within_k = ranks <= k
    columns = (ratios, ratios * within_k, within_k, ranks <= pk)
    return np.stack([_segment_sums(values, num_hits) for values in columns], axis=1)


def shard_distance_counts(query_codes: torch.Tensor, shard_codes: torch.Tensor, query_labels: torch.Tensor,
                          shard_labels: ShardLabels, chunk_rows: Optional[int] = None) -> torch.Tensor:
    """q x 2 x (c+1) int64 on the query codes' device: per query and Hamming distance d, the shard's items
    at distance d ([:, 0]) and its relevant items at distance d ([:, 1]). A shard without rows gives zeros.
    shard_labels: a label row per shard row, or a (patterns, pattern_ids) pair (ShardLabels)."""
    _validate(query_codes, shard_codes, query_labels, shard_labels, db="shard")
    device = query_codes.device
    counts = torch.zeros(query_codes.shape[0], 2, query_codes.shape[1] + 1, dtype=torch.int64, device=device)
    if shard_codes.shape[0] == 0:
        return counts
    if _backend(query_codes) == "numpy":
        parts = _numpy_map(lambda ranker, rows: ranker.counts(rows)[2], query_codes, shard_codes, query_labels,
                           shard_labels, None, chunk_rows)
        return torch.from_numpy(np.concatenate(parts))
    shard_codes, query_labels, shard_labels = _shard_inputs(query_codes, shard_codes, query_labels, shard_labels)
    for rows in _chunks(query_codes.shape[0], shard_codes.shape[0], chunk_rows, SHARD_CHUNK_ENTRIES):
        counts[rows] = _shard_chunk(query_codes, shard_codes, query_labels, shard_labels, rows)[2]
    return counts


def shard_rank_sums(query_codes: torch.Tensor, shard_codes: torch.Tensor, query_labels: torch.Tensor,
                    shard_labels: ShardLabels, counts_total: torch.Tensor, counts_before: torch.Tensor,
                    topk: Optional[int], precision_k: int, chunk_rows: Optional[int] = None) -> torch.Tensor:
    """q x 4 float64 on the query codes' device: this shard's part of each query's metrics.

    counts_total: shard_distance_counts summed over every shard; counts_before: summed over the shards
    holding lower database rows (zeros for the first). Columns: the sum of i / rank_i over the shard's
    relevant items (i = the item's hit number, rank_i its rank in the whole database's ranking), the same
    over those ranked within the top topk, the number of those, and the number of its relevant items in
    the top precision_k. Summed over shards they give AP@ALL and AP@topk (sharded_retrieval_row).
    shard_labels as in shard_distance_counts.
    """
    _validate(query_codes, shard_codes, query_labels, shard_labels, db="shard")
    device = query_codes.device
    num_queries, bins = query_codes.shape[0], query_codes.shape[1] + 1
    for name, counts in (("counts_total", counts_total), ("counts_before", counts_before)):
        if not isinstance(counts, torch.Tensor) or tuple(counts.shape) != (num_queries, 2, bins):
            raise ValueError(f"{name}: expected shape ({num_queries}, 2, {bins}) from shard_distance_counts, "
                             f"got {describe_tensor(counts)}")
    num_database = int(counts_total[0, 0].sum())
    k, pk = _resolve_topk(topk, num_database), min(int(precision_k), num_database)
    sums = torch.zeros(num_queries, 4, dtype=torch.float64, device=device)
    if shard_codes.shape[0] == 0:
        return sums
    if _backend(query_codes) == "numpy":
        total, before = (counts.cpu().long().numpy() for counts in (counts_total, counts_before))
        parts = _numpy_map(lambda ranker, rows: _numpy_rank_sums(ranker, rows, total, before, k, pk),
                           query_codes, shard_codes, query_labels, shard_labels, None, chunk_rows)
        return torch.from_numpy(np.concatenate(parts))
    shard_codes, query_labels, shard_labels = _shard_inputs(query_codes, shard_codes, query_labels, shard_labels)
    counts_total, counts_before = counts_total.to(device), counts_before.to(device)
    positions = torch.arange(1, shard_codes.shape[0] + 1, dtype=torch.int64, device=device)
    for rows in _chunks(num_queries, shard_codes.shape[0], chunk_rows, SHARD_CHUNK_ENTRIES):
        distances, relevant, local = _shard_chunk(query_codes, shard_codes, query_labels, shard_labels, rows)
        # Stable: within a distance the shard's rows stay in row order, the global tie rule.
        sorted_distances, order = torch.sort(distances, dim=1, stable=True)
        hits = torch.gather(relevant, 1, order)
        # Global rank = local position - the shard's items at smaller distances + everyone's items at
        # smaller distances + the earlier shards' items at the same distance; hit numbers likewise.
        rank_offset = _below(counts_total[rows, 0]) + counts_before[rows, 0] - _below(local[:, 0])
        hit_offset = _below(counts_total[rows, 1]) + counts_before[rows, 1] - _below(local[:, 1])
        ranks = positions + torch.gather(rank_offset, 1, sorted_distances)
        hit_numbers = hits.long().cumsum(dim=1) + torch.gather(hit_offset, 1, sorted_distances)
        ratios = torch.where(hits, hit_numbers.double() / ranks.double(), 0.0)
        within_k = ranks <= k
        sums[rows, 0] = ratios.sum(dim=1)
        sums[rows, 1] = torch.where(within_k, ratios, 0.0).sum(dim=1)
        sums[rows, 2] = (hits & within_k).sum(dim=1).double()
        sums[rows, 3] = (hits & (ranks <= pk)).sum(dim=1).double()
    return sums


def sharded_average_precisions(counts_total: torch.Tensor,
                               rank_sums: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(AP@ALL, AP@topk, hits in the top precision_k) of every query (float64, CPU) from shard_distance_counts
    and shard_rank_sums, each summed over every shard."""
    counts_total, rank_sums = counts_total.cpu(), rank_sums.cpu()
    num_relevant = counts_total[:, 1].sum(dim=1).double()
    aps_all = torch.where(num_relevant > 0, rank_sums[:, 0] / num_relevant.clamp(min=1), 0.0)
    aps_topk = torch.where(rank_sums[:, 2] > 0, rank_sums[:, 1] / rank_sums[:, 2].clamp(min=1), 0.0)
    return aps_all, aps_topk, rank_sums[:, 3]


def sharded_retrieval_row(counts_total: torch.Tensor, rank_sums: torch.Tensor, query_labels: torch.Tensor,
                          num_seen: int, topk: Optional[int], precision_k: int) -> dict:
    """retrieval_row's dict from shard_distance_counts and shard_rank_sums, each summed over every shard."""
    aps_all, aps_topk, hits = sharded_average_precisions(counts_total, rank_sums)
    return _row(aps_all, aps_topk, hits, query_labels, num_seen, topk, precision_k, int(counts_total[0, 0].sum()))
