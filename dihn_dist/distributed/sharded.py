"""The database split by rows over the ranks (--shard-database on): `RowShard` keeps this rank's rows only and
gives r, the hash-term statistics, the DCC update, the checksums and the retrieval row of the whole database,
the same as the one-process path (docs/method.md, "Sharding the database by rows"). Glue only: the math is
method/'s pure functions, the communication comm's collectives.

Rank r holds rows shard_bounds(n)[r], contiguous and in rank order: their codes bit-packed (c/8 bytes a row)
and their label-pattern ids (int32) into the one pattern table that every rank shares. Everything else (the
unpacked codes, a block's labels as rows of the table, float copies) lives for one block of block_rows rows
at a time, so a rank holds n/N x (c/8 + 4) bytes plus the table plus one block's temporaries, whatever n.
Splitting a shard into blocks is the same decomposition as splitting the database over more ranks, which
method/ makes exact (integer partial sums, per-row DCC, per-distance counts of the rows before).
"""
from __future__ import annotations

from typing import Callable, Iterator, Optional, Tuple

import numpy as np
import torch

from ..common.codes import pack_codes, packed_width, unpack_codes
from ..method import dcc, hashing, metrics
from . import comm

# Rows per block: a block's unpacked codes, label rows and DCC temporaries take a few hundred MB.
BLOCK_ROWS = 1 << 20

RowSource = Callable[[int, int], object]  # (first, end) -> that range of rows (a tensor or numpy array)


def shard_bounds(num_rows: int, world_size: Optional[int] = None, rank: Optional[int] = None) -> Tuple[int, int]:
    """[start, end) of a rank's rows (this rank's by default): contiguous, in rank order, the first
    num_rows % world_size ranks one row more."""
    ctx = comm.context()
    world_size = ctx.world_size if world_size is None else world_size
    rank = ctx.rank if rank is None else rank
    base, extra = divmod(int(num_rows), world_size)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


def as_tensor(rows, device: torch.device) -> torch.Tensor:
    rows = torch.from_numpy(np.array(rows)) if isinstance(rows, np.ndarray) else rows  # a copy: memmaps are read-only
    return rows.to(device)


class RowShard:
    """This rank's rows [first_row, end_row) of a database of num_rows rows, rows below num_frozen keeping
    their codes (stage 2's B_old).

    label_rows(a, b) and code_rows(a, b) give database rows [a, b) of the 0/1 labels and of the initial +-1
    codes (read once, a block at a time). Every method that takes no rank-local argument is collective:
    every rank calls it, in the same order."""

    def __init__(self, num_rows: int, num_frozen: int, code_length: int, label_rows: RowSource,
                 code_rows: RowSource, block_rows: int = BLOCK_ROWS, device: Optional[torch.device] = None):
        self.device = device or comm.context().device
        self.num_rows, self.num_frozen, self.code_length = int(num_rows), int(num_frozen), int(code_length)
        self.block_rows = int(block_rows)
        self.first_row, self.end_row = shard_bounds(num_rows)
        first = self.first_row
        labels_of = lambda lo, hi: as_tensor(label_rows(first + lo, first + hi), self.device)  # noqa: E731
        # The table of every rank's distinct rows is the table of every row: label_patterns of the whole database.
        local = [hashing.label_patterns(labels_of(lo, hi))[0] for lo, hi in self.blocks()]
        width = labels_of(0, 0).shape[1]
        local = (hashing.label_patterns(torch.cat(local))[0] if local
                 else torch.zeros(0, width, dtype=torch.bool, device=self.device))
        gathered = comm.gather_rows(local.to(torch.uint8))
        if gathered.shape[0] == 0:
            raise ValueError("label_rows: no rank holds any row")
        self.patterns = hashing.label_patterns(gathered)[0].to(self.device)
        self.pattern_ids = torch.empty(self.num_held, dtype=torch.int32, device=self.device)
        self.packed = torch.empty(self.num_held, packed_width(code_length), dtype=torch.uint8, device=self.device)
        for lo, hi in self.blocks():
            self.pattern_ids[lo:hi] = hashing.pattern_ids(self.patterns, labels_of(lo, hi)).to(torch.int32)
            codes = as_tensor(code_rows(first + lo, first + hi), self.device)
            hashing.check_codes("code_rows", codes, code_length)
            self.packed[lo:hi] = pack_codes(codes)
        # Rows per pattern (all rows, and the learned ones): r needs no pass over the rows, and the learned
        # rows' table (what DCC forms its products over) is the rows of the table that learned rows carry.
        learned = self.pattern_counts(self.learned_start, self.num_held)
        counts = torch.stack([self.pattern_counts(0, self.learned_start) + learned, learned])
        self.rows_per_pattern, learned_per_pattern = comm.all_reduce_sum(counts)
        in_learned = learned_per_pattern > 0
        self.learned_patterns = self.patterns[in_learned]
        self.learned_id_of_pattern = torch.cumsum(in_learned.to(torch.int64), dim=0) - 1  # -1: frozen rows only
        self.learned_single_label = hashing.is_single_label(self.learned_patterns)

    @property
    def num_held(self) -> int:
        return self.end_row - self.first_row

    @property
    def learned_start(self) -> int:
        """The first learned row of this shard, counted from the shard's first row."""
        return min(max(self.num_frozen - self.first_row, 0), self.num_held)

    def blocks(self, start: int = 0, end: Optional[int] = None) -> Iterator[Tuple[int, int]]:
        """[lo, hi) of the blocks of this shard's rows [start, end), counted from the shard's first row."""
        end = self.num_held if end is None else end
        for lo in range(start, end, self.block_rows):
            yield lo, min(end, lo + self.block_rows)

    def codes(self, lo: int, hi: int) -> torch.Tensor:
        """int8 +-1 codes of this shard's rows [lo, hi)."""
        return unpack_codes(self.packed[lo:hi], self.code_length)

    def ids(self, lo: int, hi: int) -> torch.Tensor:
        return self.pattern_ids[lo:hi].to(torch.int64)

    def pattern_counts(self, lo: int, hi: int) -> torch.Tensor:
        counts = torch.zeros(self.patterns.shape[0], dtype=torch.int64, device=self.device)
        for a, b in self.blocks(lo, hi):
            counts += torch.bincount(self.ids(a, b), minlength=self.patterns.shape[0])
        return counts

    # ------------------------------------------------------------------------------------------------
    # One outer iteration

    def similarity_offset(self, sample_labels: torch.Tensor) -> float:
        """r of the soft similarity over the sample (its labels, the same on every rank) and the whole
        database, from the rows per pattern: no pass over the rows, no collective."""
        positives = hashing.count_similar_pairs_by_pattern(sample_labels.to(self.device), self.patterns,
                                                           self.rows_per_pattern)
        return hashing.soft_offset_from_counts(positives, sample_labels.shape[0] * self.num_rows)

    def hash_term_stats(self, r: Optional[float]) -> hashing.HashTermStats:
        """hash_term_stats of the whole database: each block's partial sums, summed and all-reduced (exact,
        integer-valued float64)."""
        num_patterns = self.patterns.shape[0]
        partials = hashing.hash_term_partials(torch.zeros(0, self.code_length, dtype=torch.int8, device=self.device),
                                              torch.zeros(0, dtype=torch.int64, device=self.device), num_patterns)
        for lo, hi in self.blocks():
            partials = partials + hashing.hash_term_partials(self.codes(lo, hi), self.ids(lo, hi), num_patterns)
        summed = hashing.HashTermPartials(gram=comm.all_reduce_sum(partials.gram),
                                          per_pattern=comm.all_reduce_sum(partials.per_pattern))
        return hashing.hash_term_stats_from_partials(summed, self.patterns, self.pattern_ids, self.num_rows, r)

    def sample_rows(self, sample: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(the sample's database rows sorted, their int8 codes, their pattern ids) on every rank, from the
        ranks that hold them: each rank sends its rows of the sorted sample, and the shards are contiguous and
        in rank order, so the gathered rows come in the sorted sample's order."""
        order = torch.sort(sample.to(self.device)).values
        mine = order[(order >= self.first_row) & (order < self.end_row)] - self.first_row
        local = torch.cat([self.pattern_ids[mine].unsqueeze(1), self.packed[mine].to(torch.int32)], dim=1)
        gathered = comm.gather_rows(local).to(self.device)
        return order, unpack_codes(gathered[:, 1:].to(torch.uint8), self.code_length), gathered[:, 0].long()

    def update_codes(self, U: torch.Tensor, sample_labels: torch.Tensor, sample_rows: torch.Tensor, gamma: float,
                     r: Optional[float]) -> torch.Tensor:
        """One DCC sweep over this rank's learned rows, given the whole sample's outputs U, labels and database
        rows (the same on every rank, in the order the one-process path gathers U). Returns this rank's count
        of the bits that changed and each bit's sum over its learned rows (int64, 1 + c): all-reduced, the
        update's statistics (kept apart so that the wait for the slowest rank shows as the exchange)."""
        sample_labels, sample_rows = sample_labels.to(self.device), sample_rows.to(self.device)
        # The whole database's decision, so that every block forms the same products (dcc.solve_dcc_rows).
        factorize = self.learned_single_label and hashing.is_single_label(sample_labels)
        changed = torch.zeros(1 + self.code_length, dtype=torch.int64, device=self.device)
        for lo, hi in self.blocks(self.learned_start):
            before = self.codes(lo, hi)
            ids = self.ids(lo, hi)
            after = dcc.solve_dcc_rows(before.float(), self.first_row + lo, U, sample_labels, sample_rows,
                                       self.patterns[ids].float(), gamma, r, self.num_frozen, factorize=factorize,
                                       db_patterns=(self.learned_patterns, self.learned_id_of_pattern[ids]))
            after = after.to(torch.int8)
            changed[0] += (after != before).sum()
            changed[1:] += after.sum(dim=0, dtype=torch.int64)
            self.packed[lo:hi] = pack_codes(after)
        return changed

    # ------------------------------------------------------------------------------------------------
    # Evaluation, checksums, saved rows

    def retrieval_row(self, query_codes: torch.Tensor, query_labels: torch.Tensor, num_seen: int,
                      topk: Optional[int], precision_k: int) -> dict:
        """metrics.retrieval_row over the whole database, every rank ranking only its own rows: per-distance
        counts all-reduced and prefix-summed over the ranks (and blocks) before, then each rank's rank sums
        all-reduced. The same row on every rank. query_codes, query_labels: every query, on every rank."""
        query_codes, query_labels = query_codes.to(self.device), query_labels.to(self.device)
        labels_of = lambda lo, hi: (self.patterns, self.pattern_ids[lo:hi])  # noqa: E731
        counts = [metrics.shard_distance_counts(query_codes, self.codes(lo, hi), query_labels, labels_of(lo, hi))
                  for lo, hi in self.blocks()]
        local = (torch.stack(counts).sum(dim=0) if counts else
                 torch.zeros(query_codes.shape[0], 2, self.code_length + 1, dtype=torch.int64, device=self.device))
        total, before = comm.all_reduce_sum(local), comm.exclusive_prefix_sum(local)
        sums = torch.zeros(query_codes.shape[0], 4, dtype=torch.float64, device=self.device)
        for (lo, hi), block_counts in zip(self.blocks(), counts):
            sums += metrics.shard_rank_sums(query_codes, self.codes(lo, hi), query_labels, labels_of(lo, hi),
                                            total, before, topk, precision_k)
            before = before + block_counts  # this block's rows precede the next block's
        return metrics.sharded_retrieval_row(total, comm.all_reduce_sum(sums), query_labels, num_seen, topk,
                                             precision_k)

    def checksum(self, frozen_only: bool = False) -> str:
        """sha256 of the int8 codes of every row (or of the frozen rows) in order: the whole database's
        codes_checksum, from every rank's rows."""
        held = self.learned_start if frozen_only else self.num_held
        return comm.rows_sha256(held, self.codes)

    def restore(self, rows: torch.Tensor) -> None:
        """This shard's codes from saved rows: packed (uint8), or int8 +-1 as the whole-database path and the
        first sharded checkpoints keep them."""
        rows = rows.to(self.device)
        expected = packed_width(self.code_length) if rows.dtype == torch.uint8 else self.code_length
        if tuple(rows.shape) != (self.num_held, expected):
            raise ValueError(f"saved codes: expected rows {self.first_row}..{self.end_row} of width {expected}, "
                             f"got shape {tuple(rows.shape)}")
        self.packed = rows.clone() if rows.dtype == torch.uint8 else pack_codes(rows)
