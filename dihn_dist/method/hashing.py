"""The mathematical core of ADSH and DIHN: similarity, losses and the discrete code update (DCC).

Pure tensor functions: no I/O, no torch.distributed, the same code on CPU and CUDA (everything runs on
the device of its inputs). Notation follows docs/method.md: m sampled items, n database items, c bits,
L label columns; codes are +-1; labels are 0/1 multi-hot rows (one-hot for single-label datasets).

The m x n similarity between the sample and the database is never materialised whole: single-label
data factorizes (S = 2 Y_s Y_db^T - 1), multi-label data is processed in blocks of database rows.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

# Database rows per block when the similarity has to be formed explicitly (multi-label data).
# m = 2,000 x 16,384 float32 = 128 MiB for the block: bounded whatever n is.
DEFAULT_BLOCK_ROWS = 16384


# ----------------------------------------------------------------------------------------------------
# Validation: every public function names the argument and what it found.

def check_codes(name: str, codes: torch.Tensor, code_length: Optional[int] = None) -> None:
    if not isinstance(codes, torch.Tensor) or codes.dim() != 2:
        raise ValueError(f"{name}: expected a 2-D tensor of +-1 codes, got {describe_tensor(codes)}")
    if code_length is not None and codes.shape[1] != code_length:
        raise ValueError(f"{name}: expected {code_length} bits per row, got shape {tuple(codes.shape)}")
    if codes.numel() and not bool(((codes == 1) | (codes == -1)).all()):
        bad = codes[(codes != 1) & (codes != -1)].flatten()[:5].tolist()
        raise ValueError(f"{name}: codes must be +-1, found values such as {bad}")


def check_labels(name: str, labels: torch.Tensor, width: Optional[int] = None) -> None:
    if not isinstance(labels, torch.Tensor) or labels.dim() != 2:
        raise ValueError(f"{name}: expected a 2-D 0/1 label matrix, got {describe_tensor(labels)}")
    if width is not None and labels.shape[1] != width:
        raise ValueError(f"{name}: expected {width} label columns, got shape {tuple(labels.shape)}")
    if labels.numel() and not bool(((labels == 0) | (labels == 1)).all()):
        bad = labels[(labels != 0) & (labels != 1)].flatten()[:5].tolist()
        raise ValueError(f"{name}: labels must be 0/1, found values such as {bad}")


def check_rows(name: str, tensor: torch.Tensor, rows: int, other: str) -> None:
    if tensor.shape[0] != rows:
        raise ValueError(f"{name}: has {tensor.shape[0]} rows but {other} has {rows}")


def check_nonempty(name: str, tensor: torch.Tensor) -> None:
    if tensor.numel() == 0:
        raise ValueError(f"{name}: is empty (shape {tuple(tensor.shape)})")


def describe_tensor(x) -> str:
    if isinstance(x, torch.Tensor):
        return f"a tensor of shape {tuple(x.shape)}"
    return f"{type(x).__name__}"


# ----------------------------------------------------------------------------------------------------
# Similarity

def is_single_label(labels: torch.Tensor) -> bool:
    """True when every row has exactly one label: then S factorizes and no block is needed."""
    return bool((labels.sum(dim=1) == 1).all())


def _unique_label_rows(labels: torch.Tensor, device: torch.device):
    """(distinct 0/1 rows in lexicographic order, index of each row's pattern) on device: label patterns
    repeat heavily. Up to 62 label columns each row becomes one int64 key (first column most significant,
    so the keys sort like the rows): a 1-D unique is several times faster than torch.unique(dim=0)."""
    bits = labels.to(device) != 0
    if bits.shape[1] > 62:
        return torch.unique(bits, dim=0, return_inverse=True)
    weights = 2 ** torch.arange(bits.shape[1] - 1, -1, -1, device=device, dtype=torch.int64)
    keys, inverse = torch.unique((bits.to(torch.int64) * weights).sum(dim=1), return_inverse=True)
    return (keys.unsqueeze(1) & weights) != 0, inverse


PatternsOf = Optional[tuple]  # (distinct label rows, row -> pattern index) of db_labels, from label_patterns


def _shared_transpose_times(sample_labels: torch.Tensor, db_labels: torch.Tensor, V: torch.Tensor,
                            block_rows: int, factorize: bool, db_patterns: PatternsOf = None) -> torch.Tensor:
    """[share]^T V (n x k), [share] = the m x n 0/1 matrix "sample i and database item j share a label".

    Single-label rows factorize: [share]^T V = Y_db (Y_s^T V). Otherwise [share] depends only on the
    label patterns, so it is formed between the distinct patterns of the database (one block of
    block_rows patterns at a time: memory block_rows x m) and the distinct patterns of the sample (V summed
    within each sample pattern), then expanded back to the n database rows. `db_patterns` (label_patterns of
    db_labels) saves finding the database's patterns again when the caller keeps them.
    """
    if factorize:
        ys = sample_labels.to(device=V.device, dtype=V.dtype)
        return db_labels.to(device=V.device, dtype=V.dtype) @ (ys.T @ V)
    sample_patterns, sample_inverse = _unique_label_rows(sample_labels, V.device)
    db_patterns, db_inverse = db_patterns if db_patterns is not None else _unique_label_rows(db_labels, V.device)
    db_patterns, db_inverse = db_patterns.to(V.device), db_inverse.to(V.device)
    grouped = torch.zeros(sample_patterns.shape[0], V.shape[1], dtype=V.dtype, device=V.device)
    grouped.index_add_(0, sample_inverse, V)
    ys = sample_patterns.to(V.dtype)
    per_pattern = torch.empty(db_patterns.shape[0], V.shape[1], dtype=V.dtype, device=V.device)
    for start in range(0, db_patterns.shape[0], block_rows):
        block = db_patterns[start:start + block_rows].to(V.dtype)
        shared = ((block @ ys.T) > 0).to(V.dtype)  # at most block_rows x m
        per_pattern[start:start + block.shape[0]] = shared @ grouped
    return per_pattern[db_inverse]


def count_similar_pairs(sample_labels: torch.Tensor, db_labels: torch.Tensor,
                        block_rows: int = DEFAULT_BLOCK_ROWS, db_patterns: PatternsOf = None) -> int:
    """Number of (sample, database item) pairs that share at least one label."""
    factorize = is_single_label(sample_labels) and is_single_label(db_labels)
    ones = torch.ones(sample_labels.shape[0], 1, dtype=torch.float64, device=sample_labels.device)
    shared = _shared_transpose_times(sample_labels, db_labels, ones, block_rows, factorize, db_patterns)
    return int(round(float(shared.sum())))


def count_similar_pairs_by_pattern(sample_labels: torch.Tensor, patterns: torch.Tensor,
                                   rows_per_pattern: torch.Tensor, block_rows: int = DEFAULT_BLOCK_ROWS) -> int:
    """count_similar_pairs over a database given as its distinct label rows (patterns, P x L) and the number of
    its rows carrying each (rows_per_pattern, P integers): the same integer, in O(m P L) whatever n."""
    check_labels("sample_labels", sample_labels)
    check_labels("patterns", patterns, sample_labels.shape[1])
    if tuple(rows_per_pattern.shape) != (patterns.shape[0],):
        raise ValueError(f"rows_per_pattern: expected shape ({patterns.shape[0]},), one count per pattern, got "
                         f"{describe_tensor(rows_per_pattern)}")
    sample = sample_labels.to(device=patterns.device, dtype=torch.float32)
    total = 0
    for start in range(0, patterns.shape[0], block_rows):
        block = patterns[start:start + block_rows].to(torch.float32)
        sharing = ((sample @ block.T) > 0).sum(dim=0)  # sampled items sharing a label with each pattern
        total += int((sharing.to(torch.int64) * rows_per_pattern[start:start + block_rows].to(sharing.device)).sum())
    return total


def soft_similarity_offset(sample_labels: torch.Tensor, db_labels: torch.Tensor,
                           block_rows: int = DEFAULT_BLOCK_ROWS, db_patterns: PatternsOf = None) -> float:
    """r = sum(S) / sum(1 - S) over the sampled block (m x n), for the soft form S*(1+r)-r.

    With P similar and N dissimilar pairs, sum(S) = P - N and sum(1 - S) = 2N; the soft form keeps
    positives at 1 and moves negatives to -P/N, i.e. towards 0 when positives are rare.
    """
    check_labels("sample_labels", sample_labels)
    check_labels("db_labels", db_labels, sample_labels.shape[1])
    total = sample_labels.shape[0] * db_labels.shape[0]
    return soft_offset_from_counts(count_similar_pairs(sample_labels, db_labels, block_rows, db_patterns), total)


def soft_offset_from_counts(positives: int, total: int) -> float:
    """r from the number of similar pairs among `total` sample x database pairs. Both are integer sums
    over database rows, so a sharded database adds its shards' count_similar_pairs and gets the same r."""
    negatives = total - positives
    if negatives == 0:
        # Every pair is similar: S is all ones and the soft form changes nothing.
        return 0.0
    return (positives - negatives) / (2.0 * negatives)


def similarity_transpose_times(sample_labels: torch.Tensor, db_labels: torch.Tensor, U: torch.Tensor,
                               r: Optional[float] = None, block_rows: int = DEFAULT_BLOCK_ROWS,
                               factorize: Optional[bool] = None, db_patterns: PatternsOf = None) -> torch.Tensor:
    """S^T U (n x c) for the m x n similarity S of the sample to the database, without forming S whole.

    Uses S = 2 [share] - 1 and, in soft form, S*(1+r)-r = (1+r) S - r, so
        S^T U = (1+r) (2 [share]^T U - 1 colsum(U)) - r 1 colsum(U).
    Single-label rows factorize: [share]^T U = Y_db (Y_s^T U), O(n L c). Otherwise [share] is formed
    between distinct label patterns, one block of block_rows database patterns at a time (memory
    m x block_rows), and expanded back to the n rows.
    """
    U = U.float()
    column_sums = U.sum(dim=0)
    if factorize is None:
        factorize = is_single_label(sample_labels) and is_single_label(db_labels)
    shared_t_u = _shared_transpose_times(sample_labels, db_labels, U, block_rows, factorize, db_patterns)
    hard = 2 * shared_t_u - column_sums
    if r is None:
        return hard
    return (1 + r) * hard - r * column_sums


def quantization_loss(outputs: torch.Tensor, own_codes: torch.Tensor) -> torch.Tensor:
    """sum_i ||B_db(i) - F_i||^2, own_codes = the codes at each batch item's *database* position."""
    return ((own_codes.to(outputs.dtype) - outputs) ** 2).sum()


def bit_balance_loss(bit_sums: torch.Tensor) -> torch.Tensor:
    """sum_k (sum_i F_ik)^2 from the per-bit sums over the whole (global) batch."""
    return (bit_sums ** 2).sum()


def batch_loss(outputs: torch.Tensor, hash_term: torch.Tensor, own_codes: torch.Tensor,
               bit_sums: Optional[torch.Tensor], *, gamma: float, mu: float, num_database: int,
               global_batch: int, world_size: int = 1):
    """The loss one of `world_size` processes backpropagates for one step, and its unweighted terms.

        loss = (world_size * (hash + gamma * quantization) + mu * balance) / (global_batch * n)

    hash: sum_i sum_j (F_i . B_j - c S_ij)^2 over this process's items (the dense pairwise form of tests/oracles.py, or
    factorized_hash_loss at a cost independent of n); quantization: quantization_loss against each item's
    own database code; balance: bit_balance_loss of `bit_sums`, the per-bit sums of the outputs over the
    whole global batch (None when mu is 0: stage 1 and retrain leave the term out).

    Why the scaling: DDP averages the gradients over the processes, so the factor world_size makes the
    average of the per-process hash and quantization gradients the gradient of the global-batch loss.
    The balance term is already global: under DDP `bit_sums` comes from an all-reduce whose backward sums
    every process's gradient (world_size copies), which DDP's average divides out again. One process with
    the global batch (world_size 1, bit_sums = outputs.sum(0)) is the DIHN loss divided by (batch size * n).
    Returns (loss, {"hash", "quantization", "balance"}) with the terms unweighted, for reporting.
    """
    quantization = quantization_loss(outputs, own_codes)
    normaliser = global_batch * num_database
    loss = world_size * (hash_term + gamma * quantization) / normaliser
    balance = torch.zeros((), dtype=outputs.dtype, device=outputs.device)
    if mu > 0:
        if bit_sums is None:
            raise ValueError("bit_sums: the per-bit sums over the global batch are needed when mu > 0")
        balance = bit_balance_loss(bit_sums)
        loss = loss + mu * balance / normaliser
    return loss, {"hash": hash_term, "quantization": quantization, "balance": balance}


# ----------------------------------------------------------------------------------------------------
# Factorized hash term: the batch x database hash loss at a per-step cost independent of n
#
# Within an outer iteration the codes B (n x c) and r are fixed, and S_ij depends on the batch item i
# only through its label pattern p. Expanding the square for one batch item u:
#     sum_j (u . b_j - c S_pj)^2 = u^T G u - 2c u . T_p + c^2 Q_p,
#     G = B^T B,   T_p = sum_j S_pj b_j,   Q_p = sum_j S_pj^2.
# G, T and Q are computed once per code update (hash_term_stats); each step then costs O(b c^2)
# (factorized_hash_loss) instead of O(b n c).

# Label patterns per side of one block of the pattern x pattern "share" matrix: 4,096^2 float64 =
# 128 MiB (plus its float32 and bool forms), bounded however many distinct patterns the database has.
DEFAULT_PATTERN_BLOCK_ROWS = 4096


@dataclass(frozen=True, eq=False)
class HashTermStats:
    """What the factorized hash term needs from the fixed codes, on the codes' device (float64 but the ids).

    gram (c x c): G = B^T B. targets (P x c): T_p, one row per label pattern. target_norms (P,): Q_p.
    pattern_of_row (n,) int64: the pattern of each database row (the one given to hash_term_stats), so a
    batch's database positions map to pattern ids with patterns_at(positions).
    """
    gram: torch.Tensor
    targets: torch.Tensor
    target_norms: torch.Tensor
    pattern_of_row: torch.Tensor
    code_length: int
    num_database: int

    @property
    def num_patterns(self) -> int:
        return self.targets.shape[0]

    def patterns_at(self, positions: torch.Tensor) -> torch.Tensor:
        """Pattern ids of the database rows at positions, on the device of the stats."""
        return self.pattern_of_row[positions.to(self.pattern_of_row.device)]


def label_patterns(db_labels: torch.Tensor):
    """(patterns (P x L bool), pattern_of_row (n,) int64) on the device of db_labels.

    patterns holds the distinct label rows of the database and patterns[pattern_of_row] == db_labels != 0.
    Single-label data gives one pattern per class present; multi-label data repeats patterns heavily
    (thousands of patterns for hundreds of thousands of rows), which is what makes the hash term cheap.
    Computed once per stage: the labels do not change between outer iterations.
    """
    check_labels("db_labels", db_labels)
    check_nonempty("db_labels", db_labels)
    patterns, pattern_of_row = _unique_label_rows(db_labels, db_labels.device)
    return patterns, pattern_of_row.to(torch.long)


def pattern_ids(patterns: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(rows,) int64: each label row's index in `patterns`, a table from label_patterns (distinct rows in
    label_patterns' order), on the device of labels.

    How a shard of the database maps its rows into the one table every rank shares: the table from
    label_patterns(concatenated per-shard tables) is label_patterns(all labels)'s, so the ids are the same as
    the whole database's. A label row missing from the table is an error.
    """
    check_labels("patterns", patterns)
    check_labels("labels", labels, patterns.shape[1])
    num_patterns = patterns.shape[0]
    if labels.shape[0] == 0:
        return torch.zeros(0, dtype=torch.long, device=labels.device)
    # The unique rows of table + labels are the table itself exactly when it is sorted and distinct and
    # holds every label row; the inverse of the labels then indexes the table.
    distinct, inverse = _unique_label_rows(torch.cat([patterns.to(labels.device) != 0, labels != 0]), labels.device)
    if distinct.shape[0] != num_patterns or not bool(
            (inverse[:num_patterns] == torch.arange(num_patterns, device=labels.device)).all()):
        raise ValueError("labels: has label rows missing from patterns, or patterns is not a label_patterns table")
    return inverse[num_patterns:].to(torch.long)


def check_pattern_ids(name: str, ids: torch.Tensor, rows: int, num_patterns: int, other: str) -> None:
    """ids: a 1-D integer tensor of `rows` pattern ids in [0, num_patterns)."""
    if (not isinstance(ids, torch.Tensor) or ids.is_floating_point() or ids.is_complex()
            or ids.dtype == torch.bool):
        found = f"dtype {ids.dtype}" if isinstance(ids, torch.Tensor) else type(ids).__name__
        raise ValueError(f"{name}: expected an integer tensor of pattern ids, got {found}")
    if ids.dim() != 1 or ids.shape[0] != rows:
        raise ValueError(f"{name}: expected shape ({rows},) to match {other}, got {tuple(ids.shape)}")
    # The value check would cost a device sync on CUDA, where an id out of range fails the indexing anyway.
    if ids.numel() and not ids.is_cuda:
        low, high = torch.stack([ids.min(), ids.max()]).tolist()  # one device sync, not two
        if low < 0 or high >= num_patterns:
            raise ValueError(f"{name}: pattern ids must be in [0, {num_patterns}), found range [{low}, {high}]")


def _shared_pattern_sums(patterns: torch.Tensor, per_pattern: torch.Tensor, block_rows: int) -> torch.Tensor:
    """[share] per_pattern (P x k), [share]_pq = 1 when patterns p and q have a label in common.

    [share] is formed one block_rows x block_rows tile at a time, so memory stays bounded even when
    nearly every database row has its own pattern. Intersection counts are small integers (at most L),
    exact in float32; the products with per_pattern (integer sums of codes and counts) are float64.
    """
    as_float = patterns.to(device=per_pattern.device, dtype=torch.float32)
    num_patterns = as_float.shape[0]
    result = torch.zeros_like(per_pattern)
    for row in range(0, num_patterns, block_rows):
        row_block = as_float[row:row + block_rows]
        for col in range(0, num_patterns, block_rows):
            shared = (row_block @ as_float[col:col + block_rows].T) > 0
            result[row:row + row_block.shape[0]] += shared.to(per_pattern.dtype) @ per_pattern[col:col + block_rows]
    return result


def hash_term_stats(codes: torch.Tensor, patterns: torch.Tensor, pattern_of_row: torch.Tensor,
                    r: Optional[float] = None,
                    block_rows: int = DEFAULT_PATTERN_BLOCK_ROWS) -> HashTermStats:
    """G, T_p and Q_p of the factorized hash term for the codes of the whole database; once per code update.

    codes (n x c, +-1): every database row, frozen rows included. patterns (P x L, 0/1 or bool) and
    pattern_of_row (n,) int64: from label_patterns(db_labels). r: None for the hard +-1 similarity, else
    the soft offset (S*(1+r)-r: positives stay 1, negatives become -(1+2r)).

    With A_p = sum_j [share(p, j)] b_j, s = sum_j b_j and N_p = the number of rows sharing a label with p:
        G = B^T B,
        T_p = (1+r) (2 A_p - s) - r s,          (hard form: r = 0, T_p = 2 A_p - s)
        Q_p = N_p + (n - N_p) (1+2r)^2          (hard form: Q_p = n).
    A_p and N_p only depend on patterns: with per-pattern code sums and row counts (index_add_, O(n c)),
    they are [share] times those, [share] being P x P and formed in block_rows x block_rows tiles.
    Cost O(n c^2 + P^2 (L + c)); memory O(P c + block_rows^2), never n x n or P x n.
    Everything is float64 (the three terms are large and cancel) on the device of codes.
    """
    check_codes("codes", codes)
    check_nonempty("codes", codes)
    num_database = codes.shape[0]
    check_labels("patterns", patterns)
    check_nonempty("patterns", patterns)
    check_pattern_ids("pattern_of_row", pattern_of_row, num_database, patterns.shape[0], "codes")
    if r is not None and (isinstance(r, bool) or not isinstance(r, (int, float)) or not math.isfinite(r)):
        raise ValueError(f"r: expected None or a finite number, got {r!r}")
    if isinstance(block_rows, bool) or not isinstance(block_rows, int) or block_rows < 1:
        raise ValueError(f"block_rows: expected a positive integer, got {block_rows!r}")

    pattern_of_row = pattern_of_row.to(device=codes.device, dtype=torch.long)
    partials = _partials(codes, pattern_of_row, patterns.shape[0])
    return hash_term_stats_from_partials(partials, patterns, pattern_of_row, num_database, r, block_rows)


@dataclass(frozen=True, eq=False)
class HashTermPartials:
    """The row sums behind HashTermStats, for one block of database rows (float64, integer-valued).

    gram (c x c): sum_j b_j b_j^T. per_pattern (P x (c+1)): per label pattern, the code sum of its rows
    and (last column) their count. Every entry is an integer of magnitude at most the block's rows, so
    float64 holds it exactly and the sum over blocks is exact in any order (below 2^53 rows): the partials
    of a row split add up to the whole database's, bit for bit.
    """
    gram: torch.Tensor
    per_pattern: torch.Tensor

    def __add__(self, other: "HashTermPartials") -> "HashTermPartials":
        return HashTermPartials(self.gram + other.gram, self.per_pattern + other.per_pattern)


def hash_term_partials(codes: torch.Tensor, pattern_of_row: torch.Tensor, num_patterns: int) -> HashTermPartials:
    """The partial sums of hash_term_stats over one block of rows (a shard; an empty block gives zeros).

    codes (rows x c, +-1): the block's codes; pattern_of_row (rows,) int64: their ids in the shared
    pattern table of num_patterns patterns. One pass over the rows, O(rows c^2), on the codes' device.
    """
    check_codes("codes", codes)
    check_pattern_ids("pattern_of_row", pattern_of_row, codes.shape[0], num_patterns, "codes")
    return _partials(codes, pattern_of_row, num_patterns)


def _partials(codes: torch.Tensor, pattern_of_row: torch.Tensor, num_patterns: int) -> HashTermPartials:
    device = codes.device
    B = codes.to(torch.float64)
    per_pattern = torch.zeros(num_patterns, codes.shape[1] + 1, dtype=torch.float64, device=device)
    per_pattern.index_add_(0, pattern_of_row.to(device=device, dtype=torch.long),
                           torch.cat([B, torch.ones_like(B[:, :1])], dim=1))
    return HashTermPartials(gram=B.T @ B, per_pattern=per_pattern)


def hash_term_stats_from_partials(partials: HashTermPartials, patterns: torch.Tensor, pattern_of_row: torch.Tensor,
                                  num_database: int, r: Optional[float] = None,
                                  block_rows: int = DEFAULT_PATTERN_BLOCK_ROWS) -> HashTermStats:
    """HashTermStats from the partials summed over every row of the database (see hash_term_stats).

    pattern_of_row: the pattern ids that the stats' patterns_at looks up (hash_term_stats passes the whole
    database's; a sharded caller passes the ids of the rows it will look up). num_database: n, all rows.
    """
    code_length = partials.gram.shape[0]
    num_patterns = patterns.shape[0]
    if tuple(partials.per_pattern.shape) != (num_patterns, code_length + 1):
        raise ValueError(f"partials: expected per_pattern of shape ({num_patterns}, {code_length + 1}) for "
                         f"{num_patterns} patterns, got {tuple(partials.per_pattern.shape)}")
    per_pattern = partials.per_pattern
    device = per_pattern.device
    shared = _shared_pattern_sums(patterns, per_pattern, block_rows)
    shared_code_sums, shared_counts = shared[:, :code_length], shared[:, code_length]
    code_sum = per_pattern[:, :code_length].sum(dim=0)

    targets = 2 * shared_code_sums - code_sum
    if r is None:
        target_norms = torch.full((num_patterns,), float(num_database), dtype=torch.float64, device=device)
    else:
        targets = (1 + r) * targets - r * code_sum
        target_norms = shared_counts + (num_database - shared_counts) * (1 + 2 * r) ** 2
    return HashTermStats(gram=partials.gram, targets=targets, target_norms=target_norms,
                         pattern_of_row=pattern_of_row, code_length=code_length, num_database=num_database)


def factorized_hash_loss(outputs: torch.Tensor, batch_patterns: torch.Tensor,
                         stats: HashTermStats) -> torch.Tensor:
    """sum_i sum_j (u_i . b_j - c S_ij)^2 = sum_i u_i^T G u_i - 2c u_i . T_p(i) + c^2 Q_p(i), in O(b c^2).

    The same value as the dense pairwise form (tests/oracles.py) for the
    codes, labels and r the stats were computed from, with gradient 2 G u_i - 2c T_p(i) for row i.
    outputs (b x c float): the network outputs of the batch. batch_patterns (b,) int64: each item's pattern
    id (stats.patterns_at(batch database positions)).

    Computed in float64 (the terms cancel) and returned as a scalar of outputs.dtype; the gradient flows
    back into outputs through the cast. The stats are moved to the device of outputs if they differ.
    """
    if not isinstance(stats, HashTermStats):
        raise ValueError(f"stats: expected a HashTermStats from hash_term_stats, got {describe_tensor(stats)}")
    code_length = stats.code_length
    if (not isinstance(outputs, torch.Tensor) or outputs.dim() != 2 or outputs.shape[1] != code_length
            or not outputs.is_floating_point()):
        dtype = f" of dtype {outputs.dtype}" if isinstance(outputs, torch.Tensor) else ""
        raise ValueError(f"outputs: expected a 2-D float tensor with {code_length} columns (the stats' code "
                         f"length), got {describe_tensor(outputs)}{dtype}")
    check_pattern_ids("batch_patterns", batch_patterns, outputs.shape[0], stats.num_patterns, "outputs")

    device = outputs.device
    ids = batch_patterns.to(device=device, dtype=torch.long)
    u = outputs.to(torch.float64)
    gram = stats.gram.to(device)
    quadratic = ((u @ gram) * u).sum()
    linear = (u * stats.targets.to(device)[ids]).sum()
    constant = stats.target_norms.to(device)[ids].sum()
    loss = quadratic - 2 * code_length * linear + code_length ** 2 * constant
    return loss.to(outputs.dtype)
