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

GRAD_COMPRESSIONS = ("none", "bf16")


def wrap(model: torch.nn.Module, grad_compression: str = "none") -> torch.nn.Module:
    """DDP around the model when there are several processes; the model itself otherwise.

    Batch norm on GPUs becomes SyncBatchNorm: each layer's statistics are those of the global batch, so
    N processes compute what one process computes with the whole batch (up to the order of float sums).
    PyTorch's SyncBatchNorm refuses CPU tensors, so on CPU (gloo) each process normalises with the
    statistics of its own share of the batch, and the running averages are rank 0's (DDP copies rank 0's
    buffers to every rank before each forward): there, N processes do NOT follow the trajectory of one
    (docs/training.md measures how far apart).

    grad_compression bf16: DDP's bf16_compress_hook sends each gradient bucket as bfloat16 (divided by the
    world size before the sum), half the bytes of float32, and casts the sum back; every rank applies the
    same rounded average, so ranks stay identical, but the trajectory differs from an uncompressed run."""
    if grad_compression not in GRAD_COMPRESSIONS:
        raise ValueError(f"--grad-compression: expected one of {', '.join(GRAD_COMPRESSIONS)}, "
                         f"got {grad_compression!r}")
    if not _context.distributed:
        return model
    if any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        if _context.device.type == "cuda":
            model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        elif _context.is_main:
            logger.warning("batch norm on CPU processes: each process normalises with its own share of the global "
                           "batch (SyncBatchNorm needs GPUs), so this run is not the one-process run's")
    device_ids = [_context.device.index] if _context.device.type == "cuda" else None
    wrapped = torch.nn.parallel.DistributedDataParallel(model, device_ids=device_ids)
    if grad_compression == "bf16":
        from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
        wrapped.register_comm_hook(None, default_hooks.bf16_compress_hook)
    return wrapped


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


def rows_sha256(num_rows: int, rows_at: Callable[[int, int], torch.Tensor], chunk_rows: int = 1 << 20) -> str:
    """sha256 of every rank's rows concatenated in rank order (row-major bytes), the same hex digest on every
    rank: what sha256 of the whole tensor on one process gives. This rank has num_rows rows, rows_at(a, b)
    giving rows [a, b) (from packed codes, say). Rank 0 hashes its own rows, then receives each other rank's
    in chunks of chunk_rows, so no rank holds more than one chunk of rows at a time."""
    import hashlib

    digest = hashlib.sha256()
    chunks = lambda total: ((a, min(total, a + chunk_rows)) for a in range(0, total, chunk_rows))  # noqa: E731
    if not _context.distributed:
        for a, b in chunks(num_rows):
            digest.update(rows_at(a, b).detach().contiguous().cpu().numpy().tobytes())
        return digest.hexdigest()
    device = _device_for_collectives()
    count = torch.tensor([num_rows], device=device)
    counts = [torch.zeros_like(count) for _ in range(_context.world_size)]
    torch_dist.all_gather(counts, count)
    width = rows_at(0, 0)  # the shape and dtype of a row, for receiving
    for source, rows_of_source in enumerate(int(c.item()) for c in counts):
        for a, b in chunks(rows_of_source):
            if source == 0:
                if _context.is_main:
                    digest.update(rows_at(a, b).detach().contiguous().cpu().numpy().tobytes())
            elif _context.rank == source:
                torch_dist.send(rows_at(a, b).detach().contiguous().to(device), dst=0)
            elif _context.is_main:
                chunk = torch.empty((b - a,) + tuple(width.shape[1:]), dtype=width.dtype, device=device)
                torch_dist.recv(chunk, src=source)
                digest.update(chunk.cpu().numpy().tobytes())
    return broadcast_object(digest.hexdigest() if _context.is_main else None)


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


def load_rank_rows(folder, start: int, end: int) -> torch.Tensor:
    """Rows [start, end) of the tensors save_rank_tensors wrote into `folder` under keys "rows_A_B" (rows
    [A, B) of one tensor split by rows), whatever world size wrote them: this rank reads only the saved
    blocks that overlap its rows (torch.distributed.checkpoint, no collective), so a resume on another
    world size re-splits them."""
    from pathlib import Path

    import torch.distributed.checkpoint as dcp

    folder = Path(folder)
    saved = dcp.FileSystemReader(folder).read_metadata().state_dict_metadata
    blocks = []
    for key, meta in saved.items():
        first, last = (int(part) for part in key.split("_")[1:3])
        if first < end and last > start and last > first:
            blocks.append((first, last, key, meta))
    any_block = next(iter(saved.values()))
    pieces = [torch.empty((0,) + tuple(any_block.size)[1:], dtype=any_block.properties.dtype)]
    covered = start
    for first, last, key, meta in sorted(blocks):
        if first > covered:
            break
        holder = {key: torch.empty(tuple(meta.size), dtype=meta.properties.dtype)}
        dcp.load(holder, storage_reader=dcp.FileSystemReader(folder), no_dist=True)
        pieces.append(holder[key][covered - first:min(last, end) - first])
        covered = min(last, end)
    if covered < end:
        raise ValueError(f"{folder}: holds no rows {covered}..{end} (a checkpoint of another database size)")
    return torch.cat(pieces)


def rank0_computes(compute: Callable[[], Any], receive: Callable[[Any], Any]) -> Any:
    """`compute()` on rank 0 alone, its result handed to every rank by `receive`, which gets None on the other
    ranks (for tensors with a broadcast of their own, e.g. broadcast_codes; objects and verdicts: rank0_decides)."""
    return receive(compute() if _context.is_main else None)


def rank0_decides(check: Callable[[], Any]) -> Any:
    """`check()` on rank 0 alone, and its verdict on every rank: what it returned, or the error it raised,
    raised again on every rank (the same one line everywhere).

    For every decision about files that rank 0 writes (the run folder, a finished stage, a checkpoint):
    a rank that looked for itself could see them before rank 0 created them and again after, or not yet
    (a shared filesystem's cache), and act on another verdict than rank 0's. The broadcast is also the
    barrier: no rank goes on before rank 0 has decided."""
    if not _context.distributed:
        return check()
    raised, verdict = None, None
    if _context.is_main:
        try:
            verdict = (check(), None)
        except Exception as error:  # noqa: B902 - whatever it is, every rank must end with it
            raised, verdict = error, (None, _sendable(error))
    result, error = broadcast_object(verdict)
    if raised is not None:
        raise raised
    if error is not None:
        raise error
    return result


def _sendable(error: Exception) -> Exception:
    """The error as it can travel to the other ranks: itself when it survives pickling as the same type and
    message, else an error of the same exit code with its one line."""
    import pickle

    from ..common.errors import USAGE, UsageError, exit_code, one_line
    try:
        copy = pickle.loads(pickle.dumps(error))
        if type(copy) is type(error) and str(copy) == str(error):
            return copy
    except Exception:  # noqa: B902 - an exception type that does not pickle: fall through
        pass
    return UsageError(one_line(error)) if exit_code(error) == USAGE else RuntimeError(one_line(error))


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
    """SIGTERM only sets a flag; `stop_agreed` after each outer iteration turns it into a stop on every rank
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


def stop_agreed() -> bool:
    """True on every rank when SIGTERM reached any rank (a collective: every rank calls it at the same point)."""
    return any_rank(stop_on_sigterm.requested)



def _device_for_collectives() -> torch.device:
    # NCCL moves CUDA tensors only; gloo moves CPU tensors.
    return _context.device if _context.device.type == "cuda" else torch.device("cpu")
