"""The discrete code update (DCC): one sweep of cyclic coordinate descent over the bits of the learned codes.

With the network outputs U of the sample fixed, the codes minimise ||B U^T||^2 - 2 tr(B^T P) with
P = c S^T U + gamma Ubar (docs/method.md). Each bit has a closed form given the others, so a sweep costs
O(n c^2) after P and never forms an n x m product. Pure tensor functions, like `hashing`.
"""
from __future__ import annotations

from typing import Optional

import torch

from .hashing import (
    DEFAULT_BLOCK_ROWS,
    PatternsOf,
    check_codes,
    check_labels,
    check_nonempty,
    check_rows,
    describe_tensor,
    similarity_transpose_times,
)


def dcc_linear_term(U: torch.Tensor, sample_labels: torch.Tensor, db_labels: torch.Tensor,
                    sample_pos: torch.Tensor, gamma: float, r: Optional[float] = None,
                    block_rows: int = DEFAULT_BLOCK_ROWS, factorize: Optional[bool] = None,
                    db_patterns: PatternsOf = None) -> torch.Tensor:
    """P = c * S^T U + gamma * Ubar (n x c), Ubar holding U's rows at the sampled items' positions."""
    U = U.float()
    code_length = U.shape[1]
    P = code_length * similarity_transpose_times(sample_labels, db_labels, U, r, block_rows, factorize, db_patterns)
    inside = sample_pos >= 0
    P.index_add_(0, sample_pos[inside], gamma * U[inside])
    return P


def solve_dcc(B: torch.Tensor, U: torch.Tensor, sample_labels: torch.Tensor, db_labels: torch.Tensor,
              sample_pos: torch.Tensor, gamma: float, r: Optional[float] = None,
              block_rows: int = DEFAULT_BLOCK_ROWS, factorize: Optional[bool] = None,
              db_patterns: PatternsOf = None) -> torch.Tensor:
    """One DCC sweep over the bits of the codes being learned; returns new codes.

    B (n x c, +-1, any dtype): current codes of the database part being learned. U (m x c float): the
    network outputs of the m sampled items. sample_labels (m x L), db_labels (n x L): 0/1 labels.
    sample_pos (m,) int64: each sampled item's row in B, or -1 when it is not in this part.
    gamma: weight of the quantization term. r: None for the hard +-1 similarity, else the soft offset
    (S*(1+r)-r) that the caller computed over the whole database. db_patterns: label_patterns(db_labels),
    when the caller keeps them (they do not change between sweeps).

    For k = 0..c-1: B[:,k] = sgn(P[:,k] - B_{-k} (U_{-k}^T U[:,k])), P = c S^T U + gamma Ubar; an exact
    0 keeps the previous bit. B_{-k} U_{-k}^T U[:,k] = B_{-k} G_{-k,k} with G = U^T U (c x c),
    so a sweep costs O(n c^2) after P (O(m n c), bounded memory) and never forms an n x m product.
    (G's column k is used with its k-th entry zeroed, which is exactly the sum over j != k.)

    Returns a new tensor with B's shape, dtype and device; the inputs are not modified.
    """
    check_codes("B", B)
    check_nonempty("B", B)
    code_length = B.shape[1]
    if not isinstance(U, torch.Tensor) or U.dim() != 2 or U.shape[1] != code_length:
        raise ValueError(f"U: expected a 2-D tensor with {code_length} columns (B has {code_length} bits), "
                         f"got {describe_tensor(U)}")
    check_nonempty("U", U)
    if not bool(torch.isfinite(U).all()):
        raise ValueError("U: contains NaN or inf")
    check_labels("sample_labels", sample_labels)
    check_nonempty("sample_labels", sample_labels)
    check_rows("sample_labels", sample_labels, U.shape[0], "U")
    check_labels("db_labels", db_labels, sample_labels.shape[1])
    check_rows("db_labels", db_labels, B.shape[0], "B")
    if (not isinstance(sample_pos, torch.Tensor) or sample_pos.is_floating_point() or sample_pos.is_complex()
            or sample_pos.dtype == torch.bool):
        found = f"dtype {sample_pos.dtype}" if isinstance(sample_pos, torch.Tensor) else type(sample_pos).__name__
        raise ValueError(f"sample_pos: expected an integer tensor of rows of B (or -1), got {found}")
    if sample_pos.dim() != 1 or sample_pos.shape[0] != U.shape[0]:
        raise ValueError(f"sample_pos: expected shape ({U.shape[0]},) to match U, got {tuple(sample_pos.shape)}")
    sample_pos = sample_pos.to(device=U.device, dtype=torch.long)
    if sample_pos.numel() and (int(sample_pos.max()) >= B.shape[0] or int(sample_pos.min()) < -1):
        raise ValueError(f"sample_pos: entries must be -1 or in [0, {B.shape[0]}), "
                         f"found range [{int(sample_pos.min())}, {int(sample_pos.max())}]")

    U = U.float()
    P = dcc_linear_term(U, sample_labels, db_labels, sample_pos, gamma, r, block_rows, factorize, db_patterns)
    gram = U.T @ U
    # Bit-major layout (c x n): each bit's column is contiguous for the update and the matvec.
    codes = B.to(device=U.device, dtype=torch.float32).T.contiguous()
    P = P.T.contiguous()
    for k in range(code_length):
        column = gram[:, k].clone()
        column[k] = 0
        values = torch.addmv(P[k], codes.T, column, alpha=-1)  # P[:,k] - B_{-k} U_{-k}^T U[:,k]
        signs = values.sign()
        codes[k] = torch.where(signs == 0, codes[k], signs)  # sgn(0) keeps the previous bit
    return codes.T.to(device=B.device, dtype=B.dtype).contiguous()


def solve_dcc_rows(codes: torch.Tensor, first_row: int, U: torch.Tensor, sample_labels: torch.Tensor,
                   sample_rows: torch.Tensor, labels: torch.Tensor, gamma: float, r: Optional[float],
                   num_frozen: int, *, factorize: bool, db_patterns: PatternsOf = None,
                   block_rows: int = DEFAULT_BLOCK_ROWS) -> torch.Tensor:
    """One DCC sweep over one block of database rows [first_row, first_row + rows): a shard's own rows.

    codes (rows x c, +-1) and labels (rows x L): the block's. U (m x c), sample_labels (m x L) and
    sample_rows (m,) int64: every sampled item's output, labels and *database* row (all ranks' samples, in
    the same order everywhere). Rows below num_frozen keep their codes (stage 2's B_old may end inside a
    block); the others get solve_dcc's update. Returns the block's new codes.

    Why a block can be solved alone: given U, row j's bit k becomes sgn(P[j,k] - B[j,-k] . G[-k,k]) with
    G = U^T U, and P[j] = c S[:,j]^T U + gamma Ubar[j] depends only on row j's labels and on whether row j
    was sampled. Nothing couples two rows, so the blocks of a row split together make exactly the sweep
    over all learned rows. Bit for bit, as long as each row's arithmetic does not depend on which other
    rows are in the call: hence `factorize` must be the whole database's decision (every rank the same,
    not this block's labels) and db_patterns, when given, (the one pattern table of the learned rows
    that every block shares, the ids of this block's rows into it; frozen rows' ids are not read), so that
    every block forms the same pattern products and only gathers its own rows from them.
    """
    check_codes("codes", codes)
    check_rows("labels", labels, codes.shape[0], "codes")
    start = min(max(int(num_frozen) - int(first_row), 0), codes.shape[0])  # the block's first learned row
    learned = codes[start:]
    if learned.shape[0] == 0:
        return codes.clone()
    local = sample_rows.to(device=U.device, dtype=torch.long) - (int(first_row) + start)
    inside = (local >= 0) & (local < learned.shape[0])
    if db_patterns is not None:
        db_patterns = (db_patterns[0], db_patterns[1][start:])
    solved = solve_dcc(learned, U, sample_labels, labels[start:], torch.where(inside, local, -1), gamma, r,
                       block_rows, factorize, db_patterns)
    return torch.cat([codes[:start], solved])
