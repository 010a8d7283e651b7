"""The database split by rows over the ranks: each rank keeps its own rows' codes and label-pattern ids, and
r, the hash-term statistics, DCC and the retrieval row come out as the one-process path's (docs/method.md,
"Sharding the database by rows"). Glue only: the math is method/'s pure functions, the communication
comm's collectives. Rank r holds rows shard_bounds(n)[r], contiguous and in rank order.

The training loop takes this path with --shard-database on (training/database.py, ShardedDatabase).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from ..method import dcc, hashing, metrics
from . import comm


def shard_bounds(num_rows: int, world_size: Optional[int] = None, rank: Optional[int] = None) -> Tuple[int, int]:
    """[start, end) of a rank's rows (this rank's by default): contiguous, in rank order, the first
    num_rows % world_size ranks one row more."""
    ctx = comm.context()
    world_size = ctx.world_size if world_size is None else world_size
    rank = ctx.rank if rank is None else rank
    base, extra = divmod(int(num_rows), world_size)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


def pattern_table(shard_labels: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """(the label-pattern table of all ranks' rows, this shard's ids into it): the same table as
    label_patterns of the whole database's labels, built from each rank's distinct rows only."""
    width = shard_labels.shape[1]
    local = (hashing.label_patterns(shard_labels)[0] if shard_labels.shape[0]
             else torch.zeros(0, width, dtype=torch.bool, device=shard_labels.device))
    gathered = comm.gather_rows(local.to(torch.uint8))
    if gathered.shape[0] == 0:
        raise ValueError("shard_labels: no rank holds any row")
    table = hashing.label_patterns(gathered)[0].to(shard_labels.device)
    return table, hashing.pattern_ids(table, shard_labels)


def similarity_offset(sample_labels: torch.Tensor, shard_labels: torch.Tensor, num_database: int,
                      db_patterns: hashing.PatternsOf = None) -> float:
    """r of the soft similarity over the sample and the whole database: the shards' similar-pair counts
    (integers) summed. sample_labels: every sampled item's labels, the same on every rank."""
    positives = (hashing.count_similar_pairs(sample_labels, shard_labels, db_patterns=db_patterns)
                 if shard_labels.shape[0] else 0)
    total = comm.all_reduce_sum(torch.tensor([positives], dtype=torch.int64, device=comm.context().device))
    return hashing.soft_offset_from_counts(int(total.item()), sample_labels.shape[0] * int(num_database))


def hash_term_stats(shard_codes: torch.Tensor, patterns: torch.Tensor, shard_pattern_ids: torch.Tensor,
                    num_database: int, r: Optional[float],
                    pattern_of_row: Optional[torch.Tensor] = None) -> hashing.HashTermStats:
    """hash_term_stats of the whole database from each rank's rows: the partial sums all-reduced (exact,
    integer-valued float64). pattern_of_row: the ids patterns_at will look up (default: this shard's)."""
    partials = hashing.hash_term_partials(shard_codes, shard_pattern_ids, patterns.shape[0])
    summed = hashing.HashTermPartials(gram=comm.all_reduce_sum(partials.gram),
                                      per_pattern=comm.all_reduce_sum(partials.per_pattern))
    ids = shard_pattern_ids if pattern_of_row is None else pattern_of_row
    return hashing.hash_term_stats_from_partials(summed, patterns, ids, int(num_database), r)


def learned_pattern_table(shard_labels: torch.Tensor, first_row: int,
                          num_frozen: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """(the pattern table of the learned rows of all ranks, ids of this shard's rows into it; frozen rows
    get id 0, never read): what the one-process DCC forms from label_patterns(labels[num_frozen:])."""
    start = min(max(num_frozen - first_row, 0), shard_labels.shape[0])
    table, ids = pattern_table(shard_labels[start:])
    return table, torch.cat([torch.zeros(start, dtype=torch.long, device=ids.device), ids])


def gather_sample(outputs: torch.Tensor, sample_labels: torch.Tensor,
                  sample_rows: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(U, labels, database rows) of the whole sample on every rank, from each rank's share, in rank order:
    the order the one-process path gathers U in."""
    return comm.gather_rows(outputs.float()), comm.gather_rows(sample_labels), comm.gather_rows(sample_rows)


def solve_dcc(shard_codes: torch.Tensor, first_row: int, outputs: torch.Tensor, sample_labels: torch.Tensor,
              sample_rows: torch.Tensor, shard_labels: torch.Tensor, gamma: float, r: Optional[float],
              num_frozen: int, learned_patterns: hashing.PatternsOf = None) -> torch.Tensor:
    """One DCC sweep over this rank's rows; returns its new codes (rows below num_frozen unchanged).

    outputs, sample_labels, sample_rows: this rank's share of the sample (its network outputs, their labels
    and database rows), gathered here in rank order like the one-process path's U (gather_sample).
    learned_patterns: learned_pattern_table(...), when the caller keeps it between sweeps.
    """
    U, all_labels, all_rows = gather_sample(outputs, sample_labels, sample_rows)
    return solve_dcc_gathered(shard_codes, first_row, U, all_labels, all_rows, shard_labels, gamma, r, num_frozen,
                              learned_patterns)


def solve_dcc_gathered(shard_codes: torch.Tensor, first_row: int, U: torch.Tensor, all_labels: torch.Tensor,
                       all_rows: torch.Tensor, shard_labels: torch.Tensor, gamma: float, r: Optional[float],
                       num_frozen: int, learned_patterns: hashing.PatternsOf = None) -> torch.Tensor:
    """solve_dcc once the whole sample is on every rank (gather_sample). The similarity's factorization is
    decided over every rank's learned rows, so each rank takes the whole database's decision."""
    start = min(max(num_frozen - first_row, 0), shard_labels.shape[0])
    factorize = comm.all_ranks(hashing.is_single_label(shard_labels[start:])) and hashing.is_single_label(all_labels)
    if learned_patterns is None and not factorize:
        learned_patterns = learned_pattern_table(shard_labels, first_row, num_frozen)
    return dcc.solve_dcc_rows(shard_codes, first_row, U, all_labels, all_rows, shard_labels, gamma, r, num_frozen,
                              factorize=factorize, db_patterns=learned_patterns)


def retrieval_row(query_codes: torch.Tensor, shard_codes: torch.Tensor, query_labels: torch.Tensor,
                  shard_labels: torch.Tensor, num_seen: int, topk: Optional[int], precision_k: int) -> dict:
    """metrics.retrieval_row over the whole database, every rank ranking only its own rows: per-distance
    counts all-reduced and prefix-summed over the ranks before, then each rank's rank sums all-reduced.
    The same row on every rank. query_codes and query_labels: all queries, on every rank."""
    counts = metrics.shard_distance_counts(query_codes, shard_codes, query_labels, shard_labels)
    total, before = comm.all_reduce_sum(counts), comm.exclusive_prefix_sum(counts)
    sums = comm.all_reduce_sum(metrics.shard_rank_sums(query_codes, shard_codes, query_labels, shard_labels,
                                                       total, before, topk, precision_k))
    return metrics.sharded_retrieval_row(total, sums, query_labels, num_seen, topk, precision_k)
