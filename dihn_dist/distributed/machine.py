"""The process's share of the machine: which device it trains on, how many CPUs it may use, and
deterministic kernels. No collectives here (see `comm`).
"""
from __future__ import annotations

import os

import torch


def select_device(requested: str, local_rank: int, local_world_size: int = 1) -> torch.device:
    """auto: this process's GPU when CUDA is present, else CPU; cuda without an index: cuda:LOCAL_RANK.

    Under torchrun with several processes on a node, an explicit cuda:N must be this process's own GPU
    (N = LOCAL_RANK): otherwise every rank would train on the same GPU."""
    if requested == "auto":
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    if requested.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ValueError(f"--device {requested}: CUDA is not available on this machine (use --device cpu)")
        try:
            device = torch.device(requested)
        except RuntimeError:
            raise ValueError(f"--device: expected auto, cpu or cuda[:index], got {requested!r}") from None
        if device.index is None:
            device = torch.device("cuda", local_rank)
        elif local_world_size > 1 and device.index != local_rank:
            raise ValueError(f"--device {requested}: under torchrun each process uses its own GPU, cuda:LOCAL_RANK "
                             f"(this is local rank {local_rank} of {local_world_size}); pass --device cuda, and "
                             f"choose the GPUs with CUDA_VISIBLE_DEVICES")
        if device.index >= torch.cuda.device_count():
            raise ValueError(f"--device {requested}: only {torch.cuda.device_count()} CUDA device(s) visible")
        return device
    if requested != "cpu":
        raise ValueError(f"--device: expected auto, cpu or cuda[:index], got {requested!r}")
    return torch.device("cpu")


def available_cpus() -> int:
    """CPUs this process may run on: its affinity mask (taskset, cgroups, Slurm binding), and no more than
    Slurm's --cpus-per-task when Slurm gave one (without task binding the mask is the whole node)."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cpus = os.cpu_count() or 1
    slurm = os.environ.get("SLURM_CPUS_PER_TASK", "")
    if slurm.isdigit() and int(slurm) > 0:
        cpus = min(cpus, int(slurm))
    return max(1, cpus)


def cpu_share(local_world_size: int) -> int:
    """This process's share of the CPUs: the node's processes split them evenly, at least one each."""
    return max(1, available_cpus() // max(1, local_world_size))


def set_intra_op_threads(local_world_size: int) -> None:
    # torchrun exports OMP_NUM_THREADS=1 to its workers when the user left it unset, so under torchrun
    # that value is torchrun's default, not a choice: each process takes its CPU share instead.
    chosen = os.environ.get("OMP_NUM_THREADS")
    torchrun_default = chosen == "1" and local_world_size > 1 and "TORCHELASTIC_RUN_ID" in os.environ
    if chosen is None or torchrun_default:
        torch.set_num_threads(cpu_share(local_world_size))


def inference_batch_size(batch_size: int, device: torch.device) -> int:
    """The batch of the forward-only passes (encoding queries, the frozen trunk's features). A GPU gets at
    least 256 images a call: it idles between calls. A CPU gets at most 32: bigger batches' activations
    spill out of the caches. Measured on 2 cores (fp32, images/s at batch 32 / 256): EfficientNet-Lite0's
    trunk at 64 px 575 / 223, ResNet-50 at 224 px 12 / 9, AlexNet 115 / 100; the small CNN, cheap either
    way, 2,620 / 2,961 (`tests/bench/bench_backbones.py --part throughput` prints the Lite0 figures)."""
    return max(batch_size, 256) if device.type == "cuda" else min(batch_size, 32)


def fast_kernels() -> None:
    """The default outside --deterministic: cuDNN picks the fastest convolution algorithm per input shape
    (timed once per shape; the trainer's shapes are few and fixed) and fp32 matmuls and convolutions use
    TF32 on GPUs that have it (Ampere and later: 10 mantissa bits in the products, float32 accumulation).
    Either can change results between runs or GPUs in the last bits; --deterministic turns both off."""
    torch.backends.cudnn.benchmark = True
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True


def make_deterministic() -> None:
    """Deterministic kernels (and no TF32) so that a GPU run repeats from its seed, at some cost in speed.
    cuBLAS needs its workspace setting before the CUDA context exists: call this before init()."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=True)  # an op without a deterministic kernel warns
    torch.backends.cudnn.benchmark = False
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
