"""What a training run tells its user: logs, progress bars, TensorBoard scalars, the final table.

Rank 0 logs to the terminal and train.log; every rank keeps its own log; only rank 0 writes TensorBoard
and draws progress bars. The other ranks get objects that do nothing, so the training loop never
branches on rank to report something.
"""
from __future__ import annotations

import sys
import time
from contextlib import contextmanager
from typing import Dict

import torch
from loguru import logger

from ..common.formats import STAGE_SHORT_TITLES
from ..distributed import comm
from .runfolder import RunFolder


@contextmanager
def logging_to(run: RunFolder, debug: bool):
    """Rank 0 logs to the terminal and train.log, every rank to logs/rank<k>.log, while the block runs;
    the file sinks are closed afterwards (the trainer may be called in-process, e.g. by the tests)."""
    level = "DEBUG" if debug else "INFO"
    logger.remove()
    sinks = []
    if comm.context().is_main:
        logger.add(sys.stderr, level=level, format="<green>{time:HH:mm:ss}</green> | {level: <7} | {message}")
        sinks.append(logger.add(run.path("train.log"), level=level))
    sinks.append(logger.add(run.path("logs", f"rank{comm.context().rank}.log"), level="DEBUG"))
    try:
        yield
    finally:
        for sink in sinks:
            logger.remove(sink)


class Reporter:
    """TensorBoard scalars and hyper-parameters under RUN_DIR/tensorboard, written by rank 0 alone."""

    def __init__(self, run: RunFolder):
        self.writer = None
        if comm.context().is_main:
            from torch.utils.tensorboard import SummaryWriter
            self.writer = SummaryWriter(str(run.path("tensorboard")))

    def scalars(self, prefix: str, values: Dict[str, float], step: int) -> None:
        if self.writer is not None:
            for name, value in values.items():
                if isinstance(value, (int, float)):
                    self.writer.add_scalar(f"{prefix}/{name}", value, step)

    def hparams(self, settings: dict, final: Dict[str, float]) -> None:
        if self.writer is not None:
            keep = {k: v for k, v in settings.items() if isinstance(v, (int, float, str, bool))}
            self.writer.add_hparams(keep, {f"hparam/{k}": v for k, v in final.items()}, run_name="hparams")

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        if self.writer is not None:
            self.writer.close()


class IterationClock:
    """The wall-clock phases of one outer iteration. A lap first waits for the device's queued work, so that
    it measures that work (CUDA runs asynchronously)."""

    def __init__(self):
        self.started = self.last = time.perf_counter()
        self.laps: Dict[str, float] = {}

    def lap(self, phase: str) -> None:
        comm.synchronize()
        now = time.perf_counter()
        self.laps[f"{phase}_s"] = now - self.last
        self.last = now

    def elapsed(self) -> float:
        return time.perf_counter() - self.started


def iteration_record(iteration: int, lr: float, losses: Dict[str, float], clock: IterationClock,
                     code_update: Dict[str, float], images: int, device: torch.device) -> dict:
    """What the history, TensorBoard and the log keep of one outer iteration."""
    record = {"iteration": iteration, "lr": lr, **losses, **clock.laps, **code_update}
    record["images_per_s"] = images / record["train_s"]
    if device.type == "cuda":
        record["peak_gpu_memory_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
    return record


def evaluation_record(row: dict, times: Dict[str, float]) -> dict:
    """An evaluation during the stage (--eval-every): the row's metrics as eval_*, and its times."""
    return {**{f"eval_{k}": v for k, v in row.items() if isinstance(v, float)}, **times, "eval_s": sum(times.values())}


def progress(iterable, total: int, description: str):
    """A tqdm bar on rank 0 in a terminal; elsewhere (other ranks, Slurm logs) the plain iterable."""
    if comm.context().is_main and sys.stderr.isatty():
        from tqdm import tqdm
        return tqdm(iterable, total=total, desc=description, leave=False, dynamic_ncols=True)
    return iterable


def log_start(config, data, run: RunFolder, warning=None) -> None:
    ctx = comm.context()
    if warning:
        logger.warning(warning)
    logger.info(f"dihn_dist: {ctx.world_size} process(es) on {ctx.device} ({torch.get_num_threads()} torch threads, "
                f"{config.loader_threads} loader threads each), data {data.root} ({data.num_original} original + "
                f"{data.num_database - data.num_original} incremental database items, {data.num_query} queries), "
                f"run folder {run.root}")


def log_iteration(stage: str, iteration: int, max_iter: int, record: dict) -> None:
    logger.info(f"stage {stage} iteration {iteration + 1}/{max_iter}: loss {record['loss_total']:.4f} "
                f"(hash {record['loss_hash']:.4f}, quant {record['loss_quantization']:.4f}, "
                f"balance {record['loss_balance']:.4f}), train {record['train_s']:.1f}s, dcc {record['dcc_s']:.2f}s")


def print_table(results: Dict[str, dict]) -> None:
    """The comparison table of the run's finished stages (rank 0 only)."""
    if not comm.context().is_main:
        return
    fmt = lambda v: f"{v:8.4f}" if isinstance(v, float) else f"{'-':>8}"  # noqa: E731
    lines = [f"{'row':<16} {'mAP@ALL':>8} {'mAP@k':>8} {'orig q':>8} {'incr q':>8} {'time s':>8}"]
    for name, result in results.items():
        row = result["row"]
        lines.append(f"{STAGE_SHORT_TITLES[name]:<16} {fmt(row['map_all'])} {fmt(row['map_topk'])} "
                     f"{fmt(row['map_original_queries'])} {fmt(row['map_incremental_queries'])} "
                     f"{result['train_time_s']:8.1f}")
    print("\n".join(lines), flush=True)
