"""Distributed plumbing: the one module that knows about process groups and collectives.

Started by torchrun (RANK/WORLD_SIZE/LOCAL_RANK in the environment, env:// rendezvous) the job runs one
process per device: NCCL on CUDA, gloo on CPU. Started by plain `python -m dihn_dist.train` it is one
process and every collective below is the identity, so the training loop never branches on rank.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import List, Tuple

import torch
import torch.distributed as torch_dist


@dataclass(frozen=True)
class Context:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


_context = Context()


def context() -> Context:
    return _context


def select_device(requested: str, local_rank: int) -> torch.device:
    """auto: this process's GPU when CUDA is present, else CPU; cuda without an index: cuda:LOCAL_RANK."""
    if requested == "auto":
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    if requested.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ValueError(f"--device {requested}: CUDA is not available on this machine (use --device cpu)")
        device = torch.device(requested)
        if device.index is None:
            device = torch.device("cuda", local_rank)
        if device.index >= torch.cuda.device_count():
            raise ValueError(f"--device {requested}: only {torch.cuda.device_count()} CUDA device(s) visible")
        return device
    if requested != "cpu":
        raise ValueError(f"--device: expected auto, cpu or cuda[:index], got {requested!r}")
    return torch.device("cpu")


def init(requested_device: str = "auto", timeout_s: float = 600) -> Context:
    """Set up the process group from torchrun's environment, or a single process without it."""
    global _context
    rank = int(os.environ.get("RANK", 0))
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = select_device(requested_device, local_rank)
    if device.type == "cuda":
        # Before anything allocates or any loader is built, or every rank would land on GPU 0.
        torch.cuda.set_device(device)
    if world_size > 1 and not torch_dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        timeout = timedelta(seconds=timeout_s)
        store, rank, world_size = next(torch_dist.rendezvous("env://", timeout=timeout))
        # torchrun's agent keeps one store across worker restarts: without a per-attempt prefix the
        # restarted workers read the dead attempt's addresses and fail to connect.
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        store = torch_dist.PrefixStore(f"dihn_dist/attempt{attempt}", store)
        torch_dist.init_process_group(backend=backend, store=store, rank=rank, world_size=world_size,
                                      timeout=timeout, device_id=device if device.type == "cuda" else None)
    _context = Context(rank=rank, world_size=world_size, local_rank=local_rank, device=device)
    return _context


def shutdown() -> None:
    if torch_dist.is_initialized():
        torch_dist.destroy_process_group()


def barrier() -> None:
    if _context.distributed:
        torch_dist.barrier()


# ----------------------------------------------------------------------------------------------------
# Reductions

def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum over ranks (returns a new tensor; no gradient)."""
    tensor = tensor.detach().clone()
    if _context.distributed:
        torch_dist.all_reduce(tensor)
    return tensor


class _AllReduceSum(torch.autograd.Function):
    """Sum over ranks whose gradient is again the sum over ranks: each rank's input feeds every rank's loss."""

    @staticmethod
    def forward(ctx, tensor):
        tensor = tensor.clone()
        torch_dist.all_reduce(tensor)
        return tensor

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone()
        torch_dist.all_reduce(grad)
        return grad


def differentiable_all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum over ranks that backpropagates into every rank's contribution (for the bit-balance term)."""
    return _AllReduceSum.apply(tensor) if _context.distributed else tensor


def any_rank(flag: bool) -> bool:
    """True on every rank when the flag is set on any rank."""
    if not _context.distributed:
        return flag
    value = torch.tensor([1.0 if flag else 0.0], device=_device_for_collectives())
    torch_dist.all_reduce(value, op=torch_dist.ReduceOp.MAX)
    return bool(value.item() > 0)


# ----------------------------------------------------------------------------------------------------
# Gather and broadcast

def gather_rows(rows: torch.Tensor) -> torch.Tensor:
    """Concatenate every rank's rows (rank order) on every rank; row counts may differ between ranks."""
    if not _context.distributed:
        return rows
    device = _device_for_collectives()
    rows = rows.to(device).contiguous()
    count = torch.tensor([rows.shape[0]], device=device)
    counts = [torch.zeros_like(count) for _ in range(_context.world_size)]
    torch_dist.all_gather(counts, count)
    counts = [int(c.item()) for c in counts]
    padded = torch.zeros((max(counts),) + tuple(rows.shape[1:]), dtype=rows.dtype, device=device)
    padded[:rows.shape[0]] = rows
    gathered = [torch.empty_like(padded) for _ in counts]
    torch_dist.all_gather(gathered, padded)
    return torch.cat([g[:c] for g, c in zip(gathered, counts)])


def pack_codes(codes: torch.Tensor) -> torch.Tensor:
    """+-1 codes (n x c) -> uint8 (n x ceil(c/8)), bit order as numpy.packbits(axis=1)."""
    bits = (codes > 0).to(torch.uint8)
    pad = (-bits.shape[1]) % 8
    if pad:
        bits = torch.nn.functional.pad(bits, (0, pad))
    weights = torch.tensor([128, 64, 32, 16, 8, 4, 2, 1], dtype=torch.uint8, device=codes.device)
    return (bits.view(bits.shape[0], -1, 8) * weights).sum(dim=2, dtype=torch.uint8)


def unpack_codes(packed: torch.Tensor, code_length: int) -> torch.Tensor:
    """Inverse of pack_codes: int8 +-1 codes (n x code_length)."""
    shifts = torch.arange(7, -1, -1, dtype=torch.uint8, device=packed.device)
    bits = (packed.unsqueeze(2) >> shifts) & 1
    bits = bits.reshape(packed.shape[0], -1)[:, :code_length]
    return bits.to(torch.int8) * 2 - 1


def broadcast_codes(codes: torch.Tensor, code_length: int) -> Tuple[torch.Tensor, int]:
    """Rank 0's +-1 codes on every rank, sent bit-packed (c/8 bytes a row, never float32).

    `codes` must have the same shape on every rank (its values only matter on rank 0).
    Returns (int8 codes on the caller's device, bytes sent).
    """
    packed = pack_codes(codes)
    if _context.distributed:
        packed = packed.to(_device_for_collectives())
        torch_dist.broadcast(packed, src=0)
    return unpack_codes(packed, code_length).to(codes.device), packed.numel()


def broadcast_object(obj):
    if not _context.distributed:
        return obj
    holder: List = [obj]
    torch_dist.broadcast_object_list(holder, src=0)
    return holder[0]


def _device_for_collectives() -> torch.device:
    # NCCL moves CUDA tensors only; gloo moves CPU tensors.
    return _context.device if _context.device.type == "cuda" else torch.device("cpu")
