"""Distributed plumbing: the one module that knows about process groups, collectives and the process's share
of the machine.

Started by torchrun (RANK/WORLD_SIZE/LOCAL_RANK in the environment, env:// rendezvous) the job runs one
process per device: NCCL on CUDA, gloo on CPU. Started by plain `python -m dihn_dist.train` it is one
process and every collective below is the identity, so the training loop never branches on rank.
Also here: DDP wrapping, the CPU share of each process, and a SIGTERM stop that every rank agrees on.
"""
from __future__ import annotations

import os
import signal
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Callable, List, Optional, Tuple

import torch
import torch.distributed as torch_dist
from loguru import logger

from ..common.codes import pack_codes, packed_width, unpack_codes
from .machine import select_device, set_intra_op_threads


@dataclass(frozen=True)
class Context:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
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


def init(requested_device: str = "auto", timeout_s: float = 600) -> Context:
    """Set up the process group from torchrun's environment, or a single process without it."""
    global _context
    rank = int(os.environ.get("RANK", 0))
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    local_world_size = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    device = select_device(requested_device, local_rank, local_world_size)
    set_intra_op_threads(local_world_size)
    if device.type == "cuda":
        # Before anything allocates, or every rank would create its context on GPU 0.
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
    _context = Context(rank=rank, world_size=world_size, local_rank=local_rank,
                       local_world_size=local_world_size, device=device)
    return _context


def shutdown() -> None:
    if torch_dist.is_initialized():
        torch_dist.destroy_process_group()


def barrier() -> None:
    if _context.distributed:
        torch_dist.barrier()


def synchronize() -> None:
    """Wait for the device's queued work, so that a timestamp taken next measures it (CUDA runs async)."""
    if _context.device.type == "cuda":
        torch.cuda.synchronize(_context.device)


# ----------------------------------------------------------------------------------------------------
# The model under DDP

def wrap(model: torch.nn.Module) -> torch.nn.Module:
    """DDP around the model when there are several processes (batch norm synchronised across them, so the
    statistics are those of the global batch); the model itself otherwise."""
    if not _context.distributed:
        return model
    if any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    device_ids = [_context.device.index] if _context.device.type == "cuda" else None
    return torch.nn.parallel.DistributedDataParallel(model, device_ids=device_ids)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The network inside DDP and torch.compile's wrappers (whose state dict is the network's own)."""
    model = getattr(model, "_orig_mod", model)
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


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


def all_ranks(flag: bool) -> bool:
    """True on every rank when the flag is set on every rank (a decision all ranks must take alike)."""
    return not any_rank(not flag)


def exclusive_prefix_sum(tensor: torch.Tensor) -> torch.Tensor:
    """The sum of the tensors of the ranks before this one (zeros on rank 0), added in rank order.

    Every rank passes the same shape and dtype. For a database split by rows in rank order, this is what
    the shards of lower rows hold (counts per Hamming distance for the sharded metrics). All-gather based:
    memory world_size x the tensor, meant for small per-query or per-pattern counts."""
    tensor = tensor.detach()
    if not _context.distributed:
        return torch.zeros_like(tensor)
    device = _device_for_collectives()
    local = tensor.to(device).contiguous()
    gathered = [torch.empty_like(local) for _ in range(_context.world_size)]
    torch_dist.all_gather(gathered, local)
    before = torch.zeros_like(local)
    for earlier in gathered[:_context.rank]:
        before += earlier
    return before.to(tensor.device)


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


def broadcast_codes(codes: Optional[torch.Tensor], rows: int, code_length: int) -> Tuple[torch.Tensor, int]:
    """Rank 0's +-1 codes (rows x code_length) on every rank, sent bit-packed (c/8 bytes a row, never float32).

    `codes` matters on rank 0 only (the other ranks pass None). Returns (int8 codes on this rank's device,
    bytes sent)."""
    if _context.is_main:
        packed = pack_codes(codes.to(_device_for_collectives()))
    else:
        packed = torch.empty(rows, packed_width(code_length), dtype=torch.uint8, device=_device_for_collectives())
    if _context.distributed:
        torch_dist.broadcast(packed, src=0)
    return unpack_codes(packed, code_length).to(_context.device), packed.numel()


def save_rank_tensors(tensors: dict, folder) -> None:
    """Every rank's own tensors (keys distinct across ranks, e.g. named by their row range) saved with
    torch.distributed.checkpoint, one file per rank, into `folder`. Written into a temp folder beside it
    that rank 0 renames once every rank's file and the metadata are complete, so a folder with this name is
    never half written. Name the folder by what it holds (the iteration): an existing `folder` is replaced,
    and a crash between removing it and the rename would leave neither. Every rank returns after the rename."""
    import shutil
    from pathlib import Path

    import torch.distributed.checkpoint as dcp

    folder = Path(folder)
    temp = folder.with_name(folder.name + ".tmp")
    if _context.is_main and temp.exists():
        shutil.rmtree(temp)  # left by a crash: never read
    barrier()
    local = {key: value.detach().cpu() for key, value in tensors.items()}
    if _context.distributed:
        dcp.save(local, storage_writer=dcp.FileSystemWriter(temp))
    else:
        dcp.save(local, storage_writer=dcp.FileSystemWriter(temp), no_dist=True)
    if _context.is_main:
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(temp, folder)
    barrier()


def rank0_computes(compute: Callable[[], Any], receive: Callable[[Any], Any] = None) -> Any:
    """`compute()` on rank 0 alone, its result handed to every rank by `receive` (which gets None on the other
    ranks; default: broadcast_object). The one place where work is split by rank, so callers never branch."""
    receive = receive or broadcast_object
    return receive(compute() if _context.is_main else None)


def broadcast_object(obj: Any) -> Any:
    """Rank 0's object on every rank (pickled)."""
    if not _context.distributed:
        return obj
    holder: List = [obj]
    torch_dist.broadcast_object_list(holder, src=0)
    return holder[0]


def gather_objects(obj: Any) -> List[Any]:
    """Every rank's object, in rank order, on every rank (pickled)."""
    if not _context.distributed:
        return [obj]
    gathered: List[Any] = [None] * _context.world_size
    torch_dist.all_gather_object(gathered, obj)
    return gathered


def gather_rng_states() -> List[dict]:
    """Every rank's CPU (and CUDA) generator state, in rank order, for rank 0 to checkpoint: ranks draw
    different dropout masks, so one state for all would not resume them."""
    cuda = torch.cuda.get_rng_state() if _context.device.type == "cuda" else None
    return gather_objects({"cpu": torch.get_rng_state(), "cuda": cuda})


def restore_rng_states(states: List[dict]) -> bool:
    """This rank's generator state from gather_rng_states' list; False when it came from another world size."""
    if len(states) != _context.world_size:
        return False
    torch.set_rng_state(states[_context.rank]["cpu"])
    if states[_context.rank]["cuda"] is not None and _context.device.type == "cuda":
        torch.cuda.set_rng_state(states[_context.rank]["cuda"])
    return True


# ----------------------------------------------------------------------------------------------------
# Stopping on SIGTERM (torchrun stopping its workers, a Slurm preemption)

class StopRequested(Exception):
    """SIGTERM arrived and every rank stopped after the same checkpoint."""


class _StopOnSigterm:
    """SIGTERM only sets a flag; `check_stop` after each checkpoint turns it into StopRequested on every rank
    at once (a rank that stopped alone would leave the others waiting in a collective)."""

    def __init__(self):
        self.requested = False
        self.previous = None

    def __enter__(self):
        self.requested = False
        self.previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def _handle(self, signum, frame):
        self.requested = True
        logger.warning("SIGTERM received: stopping after the current outer iteration's checkpoint")

    def __exit__(self, *exc):
        signal.signal(signal.SIGTERM, self.previous)


stop_on_sigterm = _StopOnSigterm()


def check_stop(where: str) -> None:
    """Raise StopRequested on every rank when SIGTERM reached any rank."""
    if any_rank(stop_on_sigterm.requested):
        raise StopRequested(f"stopped by SIGTERM after {where}; continue with --resume")


def _device_for_collectives() -> torch.device:
    # NCCL moves CUDA tensors only; gloo moves CPU tensors.
    return _context.device if _context.device.type == "cuda" else torch.device("cpu")
