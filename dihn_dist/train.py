"""python -m dihn_dist.train: ADSH on the original classes (stage 1), then DIHN for the new ones (stage 2).

One outer iteration, as in the paper:
    1. sample m items of the stage's database (seeded by seed, stage and iteration: a resumed run draws
       the same subsets);
    2. train the CNN on them for --max-epoch epochs, codes fixed; keep the last epoch's outputs U;
    3. gather U on rank 0, which solves the discrete code update (DCC) for the codes being learned and
       broadcasts them, bit-packed, to every rank.
Stage 2 learns only the incremental items' codes B_new; the original codes B_old stay bit-identical
(checked by checksum before and after). Under torchrun every rank runs this same loop; dist.py owns
the communication, and only rank 0 logs, writes TensorBoard, metrics and checkpoints.
"""
from __future__ import annotations

import hashlib
import os
import signal
import sys
import time
from dataclasses import dataclass
from typing import Dict, List, Optional

import numpy as np
import torch
from loguru import logger
from torch.nn.parallel import DistributedDataParallel

from . import augment, dist, hashing, metrics
from .config import RESUME_INVARIANTS, Config, default_num_workers, parse_config
from .data import (PreparedData, TrainLoader, batch_schedule, eval_batches, global_batch_bounds,
                   hide_discarded_loader_noise, load_prepared)
from .formats import RUN_FORMAT, STAGE_SHORT_TITLES, STAGE_TITLES
from .models import build_model, input_resolution
from .runfolder import RunFolder, atomic_torch_save, atomic_write_json, atomic_save_numpy, codes_checksum


@dataclass(frozen=True)
class Stage:
    name: str
    num_database: int  # the stage sees database rows [0, num_database)
    num_frozen: int    # rows [0, num_frozen) keep the codes they start with
    mu: float          # weight of the bit-balance term
    lr_decay: float

    @property
    def seed_key(self) -> int:
        return {"original": 1, "incremental": 2, "retrain": 3}[self.name]


def stage_spec(name: str, config: Config, data: PreparedData) -> Stage:
    if name == "original":
        return Stage(name, data.num_original, 0, 0.0, config.lr_decay_original)
    if name == "incremental":
        return Stage(name, data.num_database, data.num_original, config.mu, config.lr_decay_incremental)
    return Stage(name, data.num_database, 0, 0.0, config.lr_decay_original)


def seeded_generator(*keys: int) -> torch.Generator:
    digest = hashlib.sha256(repr(keys).encode()).digest()
    generator = torch.Generator()
    generator.manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))
    return generator


def sample_positions(seed: int, stage: Stage, iteration: int, num_samples: int) -> torch.Tensor:
    """The m database positions of one outer iteration, the same on every rank and after a resume."""
    generator = seeded_generator(seed, stage.seed_key, iteration)
    return torch.randperm(stage.num_database, generator=generator)[:num_samples]


def raise_injected_failure(iteration: int) -> None:
    """Fault injection for the tests: DIHN_FAIL_AT="rank=R,iteration=I" raises on rank R at iteration I."""
    spec = os.environ.get("DIHN_FAIL_AT")
    if not spec:
        return
    target = dict(item.split("=") for item in spec.split(","))
    if int(target["rank"]) == dist.context().rank and int(target["iteration"]) == iteration + 1:
        raise RuntimeError(f"injected failure (DIHN_FAIL_AT={spec}) on rank {dist.context().rank}")


class StopRequested(Exception):
    """SIGTERM (torchrun stopping its workers, a Slurm preemption) arrived; the last iteration is saved."""


class StopFlag:
    """SIGTERM only sets a flag; the loop checks it after each checkpoint, so a stopped run loses nothing."""

    def __init__(self):
        self.requested = False
        self.previous = None

    def __enter__(self):
        self.previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def _handle(self, signum, frame):
        self.requested = True
        logger.warning("SIGTERM received: stopping after the current outer iteration's checkpoint")

    def __exit__(self, *exc):
        signal.signal(signal.SIGTERM, self.previous)


STOP = StopFlag()


def binarize(outputs: torch.Tensor) -> torch.Tensor:
    """sign() as int8 +-1 codes; an output of exactly 0 becomes +1 (never a 0 bit)."""
    return torch.where(outputs >= 0, 1, -1).to(torch.int8)


# ----------------------------------------------------------------------------------------------------
# Reporting: rank 0 writes, the other ranks do nothing (so the loop never branches on rank)

class Reporter:
    def __init__(self, run: RunFolder, enabled: bool):
        self.writer = None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter
            self.writer = SummaryWriter(str(run.path("tensorboard")))

    def scalars(self, prefix: str, values: Dict[str, float], step: int) -> None:
        if self.writer is not None:
            for name, value in values.items():
                self.writer.add_scalar(f"{prefix}/{name}", value, step)

    def hparams(self, config: Config, final: Dict[str, float]) -> None:
        if self.writer is not None:
            keep = {k: v for k, v in config.to_json().items() if isinstance(v, (int, float, str, bool))}
            self.writer.add_hparams(keep, {f"hparam/{k}": v for k, v in final.items()}, run_name="hparams")

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def progress(iterable, total: int, description: str):
    """A tqdm bar on rank 0 in a terminal; elsewhere (other ranks, Slurm logs) the plain iterable."""
    if dist.context().is_main and sys.stderr.isatty():
        from tqdm import tqdm
        return tqdm(iterable, total=total, desc=description, leave=False, dynamic_ncols=True)
    return iterable


# ----------------------------------------------------------------------------------------------------
# Evaluation

def encode(model: torch.nn.Module, data: PreparedData, part: str, config: Config, resolution: int) -> torch.Tensor:
    """int8 codes of every row of a part (query/database), each rank encoding a contiguous shard."""
    ctx = dist.context()
    count = data.num_query if part == "query" else data.num_database
    shard = np.array_split(np.arange(count), ctx.world_size)[ctx.rank]
    network = model.module if isinstance(model, DistributedDataParallel) else model
    network.eval()
    codes = []
    batch_size = max(config.batch_size, 256)
    batches = eval_batches(data, part, batch_size=batch_size, resolution=resolution, device=ctx.device,
                           num_workers=config.num_workers, indices=shard)
    with torch.no_grad():
        for images, _, _ in progress(batches, -(-len(shard) // batch_size), f"encoding {part}"):
            codes.append(binarize(network(images)))
    network.train()
    local = torch.cat(codes) if codes else torch.empty(0, config.code_length, dtype=torch.int8, device=ctx.device)
    return dist.gather_rows(local).to(ctx.device)


def incremental_queries(query_labels: torch.Tensor, num_seen: int) -> torch.Tensor:
    """Queries that carry any class >= num_seen (the same rule that makes a database item incremental)."""
    return query_labels[:, num_seen:].sum(dim=1) > 0


def retrieval_row(query_codes, db_codes, query_labels, db_labels, num_seen: int, config: Config) -> dict:
    """mAP@ALL, mAP@topk, precision@k, and mAP@topk split by queries of original/incremental classes."""
    aps_all = metrics.average_precisions(query_codes, db_codes, query_labels, db_labels, topk=None)
    aps_topk = aps_all if config.topk is None else metrics.average_precisions(
        query_codes, db_codes, query_labels, db_labels, topk=config.topk)
    new_queries = incremental_queries(query_labels, num_seen).to(aps_topk.device)
    row = {
        "map_all": float(aps_all.mean()),
        "map_topk": float(aps_topk.mean()),
        "topk": config.topk or db_codes.shape[0],
        f"precision_at_{config.precision_k}": metrics.precision_at_k(
            query_codes, db_codes, query_labels, db_labels, config.precision_k),
        "map_original_queries": float(aps_topk[~new_queries].mean()) if bool((~new_queries).any()) else None,
        "map_incremental_queries": float(aps_topk[new_queries].mean()) if bool(new_queries.any()) else None,
        "num_queries": int(query_codes.shape[0]),
        "num_database": int(db_codes.shape[0]),
    }
    return row


# ----------------------------------------------------------------------------------------------------
# One outer iteration's training on the sampled subset

def train_on_sample(model, optimizer, loader: TrainLoader, sample: torch.Tensor, codes: torch.Tensor,
                    labels: torch.Tensor, r: Optional[float], stage: Stage, config: Config, iteration: int):
    """--max-epoch epochs over the sample with the codes fixed.

    Returns this rank's outputs U of the last epoch with their database positions, and the loss terms
    summed over every rank (for reporting). The loss of rank r is scaled so that DDP's gradient average
    over N ranks equals the gradient of the global-batch loss: N x (hash + gamma quant) / (B_global n)
    plus the bit-balance of the all-reduced per-bit sums, whose backward all-reduces again.
    """
    ctx = dist.context()
    num_samples, n = sample.shape[0], stage.num_database
    slot_of_position = torch.full((n,), -1, dtype=torch.long)
    slot_of_position[sample] = torch.arange(num_samples)
    # hash, quantization, balance (global), items; kept on the device so a step waits for nothing
    # but the finiteness check
    totals = torch.zeros(4, dtype=torch.float64, device=codes.device)
    kept_outputs, kept_positions = [], []
    for epoch in range(config.max_epoch):
        generator = seeded_generator(config.seed, stage.seed_key, iteration, epoch)
        order = sample[torch.randperm(num_samples, generator=generator)].numpy()
        augment_params = augment.draw_params(generator, num_samples, config.augment)
        positions, step_sizes = batch_schedule(order, config.batch_size, ctx.world_size, ctx.rank)
        global_sizes = [end - start for start, end in
                        global_batch_bounds(num_samples, config.batch_size * ctx.world_size, ctx.world_size)]
        loader.set_order(positions, step_sizes)
        last_epoch = epoch == config.max_epoch - 1
        batches = progress(loader, len(step_sizes), f"{stage.name} it {iteration + 1} epoch {epoch + 1}")
        for step, (images, batch_labels, batch_positions) in enumerate(batches):
            slots = slot_of_position[batch_positions.cpu()]
            outputs = model(augment.apply(images, augment_params[slots]))
            batch_similarity = hashing.similarity(batch_labels, labels, r)
            terms = hashing.loss_terms(outputs, codes, batch_similarity, codes[batch_positions])
            weighted = terms["hash"] + config.gamma * terms["quantization"]
            normaliser = global_sizes[step] * n
            loss = ctx.world_size * weighted / normaliser
            balance = torch.zeros((), device=outputs.device)
            if stage.mu > 0:
                balance = hashing.bit_balance_loss(dist.differentiable_all_reduce_sum(outputs.sum(dim=0)))
                loss = loss + stage.mu * balance / normaliser
            if not bool(torch.isfinite(loss)):
                raise FloatingPointError(
                    f"stage {stage.name}, iteration {iteration + 1}, epoch {epoch + 1}, step {step + 1}: non-finite loss "
                    f"(hash {terms['hash'].item():.4g}, quantization {terms['quantization'].item():.4g}, "
                    f"balance {balance.item():.4g}); the last good checkpoint is kept")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            items = torch.tensor(float(outputs.shape[0]), device=outputs.device)
            totals += torch.stack([terms["hash"], terms["quantization"], balance / ctx.world_size, items]).detach()
            if last_epoch:
                kept_outputs.append(outputs.detach())
                kept_positions.append(batch_positions)
    totals = dist.all_reduce_sum(totals)
    items = totals[3].item()
    losses = {
        "hash": totals[0].item() / (items * n),
        "quantization": config.gamma * totals[1].item() / (items * n),
        "balance": stage.mu * totals[2].item() / (items * n),
    }
    losses["total"] = sum(losses.values())
    return torch.cat(kept_outputs), torch.cat(kept_positions), losses


def update_codes(codes: torch.Tensor, outputs: torch.Tensor, positions: torch.Tensor, labels: torch.Tensor,
                 r: Optional[float], stage: Stage, config: Config):
    """Gather U on rank 0, solve DCC for the learned rows there, broadcast them packed. Returns timings."""
    ctx = dist.context()
    started = time.perf_counter()
    all_outputs = dist.gather_rows(outputs.float())
    all_positions = dist.gather_rows(positions)
    gathered = time.perf_counter()
    learned = codes[stage.num_frozen:]
    if ctx.is_main:
        rows = all_positions - stage.num_frozen
        learned = hashing.solve_dcc(learned, all_outputs, labels[all_positions], labels[stage.num_frozen:],
                                    torch.where(rows >= 0, rows, -1), config.gamma, r)
    solved = time.perf_counter()
    learned, payload = dist.broadcast_codes(learned, config.code_length)
    learned = learned.to(codes.dtype)
    changed = (learned != codes[stage.num_frozen:]).float().mean().item()
    codes[stage.num_frozen:] = learned
    done = time.perf_counter()
    return {"gather_s": gathered - started, "dcc_s": solved - gathered, "broadcast_s": done - solved,
            "broadcast_bytes": payload, "bits_changed": changed,
            # 0 when every bit splits the learned codes half and half, 1 when a bit is constant
            "bit_imbalance": learned.float().mean(dim=0).abs().mean().item()}


# ----------------------------------------------------------------------------------------------------
# A stage from start (or checkpoint) to finish

class StageRunner:
    def __init__(self, stage: Stage, config: Config, data: PreparedData, run: RunFolder, reporter: Reporter,
                 initial_codes: torch.Tensor, resolution: int):
        self.stage, self.config, self.data, self.run, self.reporter = stage, config, data, run, reporter
        self.resolution = resolution
        ctx = dist.context()
        if config.num_samples > stage.num_database:
            raise ValueError(f"--num-samples {config.num_samples} is larger than the database of stage "
                             f"{stage.name} ({stage.num_database} items)")
        torch.manual_seed(config.seed * 1000 + stage.seed_key)
        network = build_model(config.arch, config.code_length, config.pretrained).to(ctx.device)
        if ctx.distributed:
            if config.arch == "resnet50":
                network = torch.nn.SyncBatchNorm.convert_sync_batchnorm(network)
            network = DistributedDataParallel(network, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None)
        self.model = network
        self.optimizer = torch.optim.Adam(network.parameters(), lr=config.lr, weight_decay=config.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.ExponentialLR(self.optimizer, gamma=stage.lr_decay)
        self.codes = initial_codes.to(ctx.device, torch.float32)
        self.labels = torch.from_numpy(data.database_labels[:stage.num_database]).to(ctx.device, torch.float32)
        self.history: List[dict] = []
        self.start_iteration = 0
        self.elapsed_s = 0.0
        share = len(batch_schedule(np.arange(config.num_samples), config.batch_size, ctx.world_size, ctx.rank)[0])
        self.loader = TrainLoader(data, batch_size=config.batch_size, resolution=resolution, device=ctx.device,
                                  num_workers=config.num_workers, augment="none", seed=config.seed, length=share)

    def restore(self, checkpoint: dict) -> None:
        network = self.model.module if isinstance(self.model, DistributedDataParallel) else self.model
        network.load_state_dict(checkpoint["model"])
        self.optimizer.load_state_dict(checkpoint["optimizer"])
        self.scheduler.load_state_dict(checkpoint["scheduler"])
        self.codes = checkpoint["codes"].to(self.codes.device, torch.float32)
        self.history = checkpoint["history"]
        self.start_iteration = checkpoint["iteration"] + 1
        self.elapsed_s = checkpoint["elapsed_s"]
        torch.set_rng_state(checkpoint["torch_rng"])
        if checkpoint.get("cuda_rng") is not None and self.codes.is_cuda:
            torch.cuda.set_rng_state(checkpoint["cuda_rng"], self.codes.device)
        logger.info(f"stage {self.stage.name}: resumed after iteration {checkpoint['iteration']}")

    def network_state(self) -> dict:
        network = self.model.module if isinstance(self.model, DistributedDataParallel) else self.model
        return {k: v.detach().cpu() for k, v in network.state_dict().items()}

    def checkpoint(self, iteration: int) -> None:
        if dist.context().is_main:
            atomic_torch_save(self.run.checkpoint_path(self.stage.name), {
                "stage": self.stage.name, "iteration": iteration, "model": self.network_state(),
                "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                "codes": self.codes.to("cpu", torch.int8), "history": self.history,
                "elapsed_s": self.elapsed_s, "torch_rng": torch.get_rng_state(),
                # dropout (alexnet) on a GPU draws from the device's generator
                "cuda_rng": torch.cuda.get_rng_state(self.codes.device) if self.codes.is_cuda else None,
            })
        dist.barrier()

    def soft_offset(self, sample: torch.Tensor) -> Optional[float]:
        if not self.config.soft_similarity:
            return None
        return hashing.soft_similarity_offset(self.labels[sample], self.labels)

    def evaluate(self) -> dict:
        """The stage's retrieval row: its model's query codes against its database codes."""
        query_codes = encode(self.model, self.data, "query", self.config, self.resolution)
        query_labels = torch.from_numpy(self.data.query_labels).to(query_codes.device)
        row = {}
        if dist.context().is_main:
            row = retrieval_row(query_codes, self.codes.to(torch.int8), query_labels, self.labels,
                                self.data.num_seen, self.config)
        return {"row": row, "query_codes": query_codes}

    def fit(self) -> dict:
        stage, config = self.stage, self.config
        frozen_before = codes_checksum(self.codes[:stage.num_frozen])
        for iteration in range(self.start_iteration, config.max_iter):
            started = time.perf_counter()
            raise_injected_failure(iteration)
            sample = sample_positions(config.seed, stage, iteration, config.num_samples)
            r = self.soft_offset(sample.to(self.labels.device))
            outputs, positions, losses = train_on_sample(self.model, self.optimizer, self.loader, sample, self.codes,
                                                         self.labels, r, stage, config, iteration)
            lr = self.optimizer.param_groups[0]["lr"]
            self.scheduler.step()
            trained = time.perf_counter()
            timings = update_codes(self.codes, outputs, positions, self.labels, r, stage, config)
            timings["train_s"] = trained - started
            timings["images_per_s"] = config.num_samples * config.max_epoch / timings["train_s"]
            record = {"iteration": iteration, "lr": lr, **{f"loss_{k}": v for k, v in losses.items()}, **timings}
            if config.eval_every and (iteration + 1) % config.eval_every == 0 and iteration + 1 < config.max_iter:
                eval_started = time.perf_counter()
                record.update({f"eval_{k}": v for k, v in self.evaluate()["row"].items() if isinstance(v, float)})
                record["eval_s"] = time.perf_counter() - eval_started
            self.elapsed_s += time.perf_counter() - started
            self.history.append(record)
            self.reporter.scalars(stage.name, {k: v for k, v in record.items() if k != "iteration"}, iteration)
            logger.info(f"stage {stage.name} iteration {iteration + 1}/{config.max_iter}: "
                        f"loss {losses['total']:.4f} (hash {losses['hash']:.4f}, quant {losses['quantization']:.4f}, "
                        f"balance {losses['balance']:.4f}), train {timings['train_s']:.1f}s, dcc {timings['dcc_s']:.2f}s")
            self.checkpoint(iteration)
            # Every rank must agree, or the ones that carry on would wait for the others forever.
            if dist.any_rank(STOP.requested):
                raise StopRequested(f"stopped by SIGTERM after outer iteration {iteration + 1} of stage "
                                    f"{stage.name}; continue with --resume")
        frozen_after = codes_checksum(self.codes[:stage.num_frozen])
        if frozen_after != frozen_before:
            raise RuntimeError(f"stage {stage.name}: the frozen codes changed ({frozen_before} -> {frozen_after})")
        evaluated = self.evaluate()
        return {"stage": stage.name, "row": evaluated["row"], "iterations": self.history,
                "train_time_s": self.elapsed_s, "frozen_rows": stage.num_frozen,
                "frozen_checksum_before": frozen_before, "frozen_checksum_after": frozen_after,
                "codes_checksum": codes_checksum(self.codes), "query_codes": evaluated["query_codes"]}


# ----------------------------------------------------------------------------------------------------
# The whole run

def setup_logging(run: RunFolder, debug: bool) -> None:
    ctx = dist.context()
    level = "DEBUG" if debug else "INFO"
    logger.remove()
    if ctx.is_main:
        logger.add(sys.stderr, level=level, format="<green>{time:HH:mm:ss}</green> | {level: <7} | {message}")
        logger.add(run.path("train.log"), level=level)
    logger.add(run.path("logs", f"rank{ctx.rank}.log"), level="DEBUG")


def check_resume(run: RunFolder, config: Config) -> None:
    if not run.has_run():
        return
    if not config.resume:
        raise ValueError(f"--out {run.root}: already holds a run; pass --resume to continue it, or choose "
                         f"another --out")
    saved = run.read_json("config.json")
    changed = [k for k in RESUME_INVARIANTS if saved.get(k) != getattr(config, k)]
    if changed:
        detail = ", ".join(f"--{k.replace('_', '-')} {saved.get(k)!r} -> {getattr(config, k)!r}" for k in changed)
        raise ValueError(f"--resume {run.root}: the run was started with other settings ({detail})")


def check_data(config: Config, data: PreparedData) -> None:
    if config.dataset and config.dataset != data.dataset:
        raise ValueError(f"--dataset {config.dataset}: but --data {data.root} holds {data.dataset}")
    if config.num_seen is not None and config.num_seen != data.num_seen:
        raise ValueError(f"--num-seen {config.num_seen}: but --data {data.root} was prepared with num_seen "
                         f"{data.num_seen}; re-run python -m dihn_dist.prepare with --num-seen {config.num_seen}")


def load_old_codes(config: Config, data: PreparedData, run: RunFolder):
    """B_old and the original model: from --old-run, or from this run's finished stage 1."""
    source = RunFolder(config.old_run) if config.old_run else run
    if not source.stage_complete("original"):
        raise FileNotFoundError(
            f"{source.root}: has no finished original stage (stage 1), which stage 2 starts from; run "
            f"--stage original first, or pass --old-run RUN_DIR of a run that has one")
    if config.old_run:
        old_config = source.read_json("config.json")
        old_manifest = source.read_json("manifest.json")
        for key, ours in (("code_length", config.code_length), ("arch", config.arch)):
            if old_config.get(key) != ours:
                raise ValueError(f"--old-run {source.root}: was trained with {key} {old_config.get(key)!r}, "
                                 f"this run uses {ours!r}")
        for key in ("dataset", "num_original", "num_database", "num_seen"):
            if old_manifest.get(key) != data.manifest.get(key):
                raise ValueError(f"--old-run {source.root}: its data has {key} {old_manifest.get(key)!r}, "
                                 f"--data {data.root} has {data.manifest.get(key)!r}")
    old = source.load_stage("original")
    codes = old["database_codes"]
    if tuple(codes.shape) != (data.num_original, config.code_length):
        raise ValueError(f"{source.root}/original/database_codes.npy: expected shape "
                         f"({data.num_original}, {config.code_length}), found {tuple(codes.shape)}")
    hashing.check_codes(f"{source.root}/original/database_codes.npy", codes)
    return old


def initial_codes(stage: Stage, config: Config, frozen: Optional[torch.Tensor]) -> torch.Tensor:
    generator = seeded_generator(config.seed, stage.seed_key, -1)
    learned = torch.randint(0, 2, (stage.num_database - stage.num_frozen, config.code_length), generator=generator)
    learned = (learned * 2 - 1).to(torch.int8)
    return learned if frozen is None else torch.cat([frozen.to(torch.int8), learned])


def run_stage(name: str, config: Config, data: PreparedData, run: RunFolder, reporter: Reporter,
              resolution: int) -> dict:
    stage = stage_spec(name, config, data)
    if run.stage_complete(name):
        logger.info(f"stage {name}: already complete in {run.root}, skipped")
        return run.load_stage(name)["result"]
    frozen = load_old_codes(config, data, run)["database_codes"] if name == "incremental" else None
    runner = StageRunner(stage, config, data, run, reporter, initial_codes(stage, config, frozen), resolution)
    checkpoint = run.load_checkpoint(name) if config.resume else None
    if checkpoint is not None:
        runner.restore(checkpoint)
    logger.info(f"stage {name}: {stage.num_database} database items ({stage.num_frozen} frozen), "
                f"{config.max_iter} outer iterations x {config.max_epoch} epochs x {config.num_samples} samples")
    result = runner.fit()
    query_codes = result.pop("query_codes")
    if dist.context().is_main:
        run.save_stage(name, runner.network_state(), runner.codes, query_codes, result)
    dist.barrier()
    return result


def write_metrics(run: RunFolder, config: Config, results: Dict[str, dict]) -> dict:
    rows = {name: result["row"] for name, result in results.items()}
    summary = {"rows": [{"name": STAGE_TITLES[k], "stage": k, **v} for k, v in rows.items()], "stages": results}
    atomic_write_json(run.path("metrics.json"), summary)
    return summary


def main(argv=None) -> int:
    hide_discarded_loader_noise()
    config = parse_config(argv)
    ctx = dist.init(config.device)
    run = RunFolder(config.out)
    try:
        with STOP:
            return train(config, run)
    except StopRequested as stop:
        logger.warning(str(stop))
        return 128 + signal.SIGTERM
    finally:
        dist.shutdown()


def train(config: Config, run: RunFolder) -> int:
    """The configured stages in order; rank 0 writes the run folder's shared files."""
    ctx = dist.context()
    if config.num_workers is None:
        config.num_workers = default_num_workers()
    try:
        data = load_prepared(config.data)
    except FileNotFoundError as missing:
        if config.root:  # the reference CLI's --dataset/--root: say exactly how to prepare them
            raise FileNotFoundError(f"{missing}\nwith --root given: python -m dihn_dist.prepare --dataset "
                                    f"{config.dataset or 'DATASET'} --root {config.root} --out {config.data}") from None
        raise
    check_data(config, data)
    check_resume(run, config)
    dist.barrier()
    run.root.mkdir(parents=True, exist_ok=True)
    setup_logging(run, config.debug)
    if config.debug:
        torch.autograd.set_detect_anomaly(True)
    resolution = input_resolution(config.arch, config.resolution, data.image_size)
    if ctx.is_main:
        atomic_write_json(run.path("format.json"), RUN_FORMAT)
        atomic_write_json(run.path("config.json"), config.to_json())
        atomic_write_json(run.path("manifest.json"), data.manifest)
        atomic_save_numpy(run.path("database_labels.npy"), data.database_labels)
        atomic_save_numpy(run.path("query_labels.npy"), data.query_labels)
    logger.info(f"dihn_dist: {ctx.world_size} process(es) on {ctx.device}, data {data.root} "
                f"({data.num_original} original + {data.num_database - data.num_original} incremental "
                f"database items, {data.num_query} queries), run folder {run.root}")
    reporter = Reporter(run, ctx.is_main)
    results = {}
    for name in config.stage:
        results[name] = run_stage(name, config, data, run, reporter, resolution)
        if ctx.is_main:
            logger.info(f"stage {name}: {results[name]['row']}")
    if ctx.is_main:
        write_metrics(run, config, results)
        print_table(results)
        reporter.hparams(config, {f"{name}_map_all": r["row"]["map_all"] for name, r in results.items()})
    reporter.close()
    return 0


def print_table(results: Dict[str, dict]) -> None:
    lines = [f"{'row':<16} {'mAP@ALL':>8} {'mAP@k':>8} {'orig q':>8} {'incr q':>8} {'time s':>8}"]
    for name, result in results.items():
        row = result["row"]
        fmt = lambda v: f"{v:8.4f}" if isinstance(v, float) else f"{'-':>8}"
        lines.append(f"{STAGE_SHORT_TITLES[name]:<16} {fmt(row['map_all'])} {fmt(row['map_topk'])} "
                     f"{fmt(row['map_original_queries'])} {fmt(row['map_incremental_queries'])} "
                     f"{result['train_time_s']:8.1f}")
    print("\n".join(lines), flush=True)


if __name__ == "__main__":
    sys.exit(main())
