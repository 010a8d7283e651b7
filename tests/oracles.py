"""Dense, obviously correct forms of the method that the package computes another way: the tests (and
benchmarks) hold the package's functions against these."""
from __future__ import annotations

from typing import Optional
import torch


def similarity(labels_a: torch.Tensor, labels_b: torch.Tensor, r: Optional[float] = None) -> torch.Tensor:
    """Dense similarity block: +1 where rows share a label, -1 elsewhere; soft form S*(1+r)-r when r is given.

    Meant for bounded blocks (a training batch against the database, one block of rows): the caller
    decides the size. Returns float32 on the device of the labels.
    """
    shared = (labels_a.float() @ labels_b.float().T) > 0
    s = shared.float() * 2 - 1
    if r is not None:
        s = s * (1 + r) - r
    return s


def pairwise_hash_loss(outputs: torch.Tensor, database_codes: torch.Tensor, batch_similarity: torch.Tensor,
                       code_length: int) -> torch.Tensor:
    """sum_i sum_j (F_i . B_j - c S_ij)^2 over a batch (rows of outputs) and the whole database."""
    inner = outputs @ database_codes.to(outputs.dtype).T
    return ((inner - code_length * batch_similarity) ** 2).sum()

def sign_keep(values: torch.Tensor, previous: torch.Tensor) -> torch.Tensor:
    """sgn(values) with +-1 only: an exact 0 keeps the previous bit (torch.sign would write a 0 bit)."""
    return torch.where(values > 0, 1.0, torch.where(values < 0, -1.0, previous.to(values.dtype)))


def dcc_objective(B: torch.Tensor, U: torch.Tensor, P: torch.Tensor) -> torch.Tensor:
    """||B U^T||^2 - 2 tr(B^T P): the DCC objective up to a constant, as ||U^T B||^2 would need n x m."""
    B = B.to(U.dtype)
    gram = U.T @ U
    return ((B @ gram) * B).sum() - 2 * (B * P).sum()
