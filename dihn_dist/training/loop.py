"""python -m dihn_dist.train: ADSH on the original classes (stage 1), then DIHN for the new ones (stage 2).

Each stage is Algorithm 1 of the paper (`StageTraining.fit`):

    codes = the frozen rows' codes (B_old in stage 2) + random codes for the rows being learned
    for each outer iteration:
        sample m database items          (seeded by seed, stage and iteration: the same on every rank)
        train the CNN on them for E epochs, codes fixed; keep the last epoch's outputs U
        update the learned codes by DCC: rank 0 for every row, broadcasting them bit-packed, or with
            --shard-database on each rank for its own rows (training/database.py)
        every --checkpoint-every iterations: checkpoint (atomic, written in the background by rank 0);
        if SIGTERM arrived: checkpoint now and stop
    encode the queries, evaluate, export the stage

Stage 2 learns only the incremental items' codes B_new; B_old stays bit-identical (checked by checksum
before and after). Under torchrun every rank runs this same code: dist.py owns the communication, and
runfolder.py and reporting.py write on rank 0 only. Whatever depends on files rank 0 writes (may --out be
used, is a stage finished, its codes, a checkpoint) is decided by rank 0 alone and received by every rank
(comm.rank0_decides), errors included.
"""
from __future__ import annotations

import os
import time
from typing import Optional, Tuple

import numpy as np
import torch
from loguru import logger

from ..common.formats import INCREMENTAL, ORIGINAL
from ..data.loader import FeatureRows, TrainLoader, batch_schedule, eval_batches, global_batch_bounds
from ..data.prepared import PreparedData, load_prepared
from ..distributed import comm
from ..distributed.machine import inference_batch_size
from ..method import hashing
from ..models import augment
from ..models.networks import (
    HashHead,
    MixedPrecision,
    Weights,
    build_model,
    encode_batches,
    hash_layer_parameters,
    input_resolution,
    resolve_pretrained,
    use_channels_last,
)
from .config import Config, resolve_for_data
from .features import features_key, frozen_features
from .reporting import (
    IterationClock,
    Reporter,
    evaluation_record,
    iteration_record,
    log_iteration,
    log_start,
    logging_to,
    print_table,
    progress,
)
from .database import shards_database, stage_database
from .runfolder import RunFolder, check_same_weights, find_old_codes, old_code_rows
from .stages import InitialCodes, Stage, sample_positions, seed_of, seeded_generator, stage_spec


def train(config: Config) -> int:
    """Check every input, then run the configured stages in order and report every finished one."""
    config, data, run = check_inputs(config)  # nothing is written before these return
    try:
        weights, warning = check_weights(config, run)
        if config.check_only:
            if comm.context().is_main:
                print("\n".join(describe_plan(config, data, run, weights)), flush=True)
            return 0
        run.create(config, data, weights)
        torch.autograd.set_detect_anomaly(config.debug)
        with logging_to(run, config.debug), Reporter(run) as reporter:
            log_start(config, data, run, warning)
            if weights:
                logger.info(f"backbone: ImageNet weights {weights.file} (sha256 {weights.sha256}, {weights.source})")
            for name in config.stage:
                run_stage(name, config, data, run, reporter, weights)
            summary = run.write_metrics()
            print_table(summary["stages"])
            reporter.hparams(config.to_json(), {f"{r['stage']}_map_all": r["map_all"] for r in summary["rows"]})
    finally:
        run.release()
    return 0


def check_inputs(config: Config):
    """Everything that can be wrong with the command, checked before the run folder is touched, so that a
    failed start leaves nothing behind that would block the corrected command. Returns the configuration
    with what depends on the data resolved (--augment auto), the data and the run folder, with rank 0
    holding the run folder's lock when it is already a run folder (else create takes it)."""
    delay_for_tests()
    run = RunFolder(config.out)
    try:
        return check_inputs_of(config, run)
    except BaseException:
        run.release()
        raise


def check_inputs_of(config: Config, run: RunFolder):
    ctx = comm.context()
    data = load_data(config)
    recorded = comm.rank0_decides(run.recorded_config) if config.resume else None
    config = resolve_for_data(config, data.dataset, recorded)
    comm.rank0_decides(lambda: run.claim(config, data.manifest))
    if config.batch_size < ctx.world_size:
        raise ValueError(f"--batch-size {config.batch_size}: the global batch must hold at least one item per "
                         f"process ({ctx.world_size} processes)")
    for name in config.stage:
        stage = stage_spec(name, config, data)
        if not ctx.world_size <= config.num_samples <= stage.num_database:
            raise ValueError(f"--num-samples {config.num_samples}: expected {ctx.world_size}..{stage.num_database} "
                             f"(the database of stage {name} has {stage.num_database} items)")
    if INCREMENTAL in config.stage and data.num_database == data.num_original:
        raise ValueError(f"--stage incremental: --data {data.root} has no new items (all {data.num_database} "
                         f"database rows are inherited); prepare the next round with prepare --extends")
    if INCREMENTAL in config.stage and ORIGINAL not in config.stage:
        comm.rank0_decides(lambda: check_old_codes(config, data, run))
    if config.resume:
        comm.rank0_decides(lambda: run.check_checkpoints(config.stage))
    MixedPrecision(config.precision, ctx.device)  # bf16 on a GPU without it fails here
    return config, data, run


def check_old_codes(config: Config, data: PreparedData, run: RunFolder) -> None:
    """B_old can be read, unless this run's stage 2 is finished already."""
    if not run.stage_complete(INCREMENTAL):
        find_old_codes(config, data, run)


def describe_plan(config: Config, data: PreparedData, run: RunFolder, weights: Optional[Weights]) -> list:
    """What `train` would do with these checked inputs (--check-only prints it)."""
    ctx = comm.context()
    resolution = input_resolution(config.arch, config.resolution, data.image_size)
    precision = MixedPrecision(config.precision, ctx.device)
    per_rank = -(-config.batch_size // ctx.world_size)
    lines = [f"check-only: every input checked, nothing written; {ctx.world_size} process(es) on "
             f"{ctx.device if ctx.world_size == 1 else ctx.device.type}"]
    for name in config.stage:
        stage = stage_spec(name, config, data)
        if run.stage_complete(name):
            state = "already complete, skipped"
        elif config.resume and run.checkpoint_path(name).is_file():
            state = f"resumes from {run.checkpoint_path(name)}"
        else:
            state = "from the start"
        frozen = ""
        if stage.num_frozen:
            source = (f"--old-codes {config.old_codes}" if config.old_codes else
                      f"--old-run {config.old_run}" if config.old_run else "this run's stage original")
            frozen = f", B_old from {source}"
        lines.append(f"  stage {name}: {stage.num_database} database rows ({stage.num_frozen} frozen{frozen}), "
                     f"{state}")
        if shards_database(config, stage.num_database):
            lines.append(f"    database split by rows over {ctx.world_size} processes (--shard-database "
                         f"{config.shard_database})")
    start = (f"{weights.file} (sha256 {weights.sha256[:16]}..., {weights.source})" if weights else
             "from scratch" if config.arch == "small-cnn" else "none: the backbone starts UNTRAINED")
    lines += [f"  outer iterations: {config.max_iter} x {config.max_epoch} epoch(s) x {config.num_samples} samples "
              f"per stage; checkpoint every {config.checkpoint_every}",
              f"  batch: {config.batch_size} global, at most {per_rank} per process",
              f"  network: {config.arch} at {resolution} px, precision {precision.name}, channels-last "
              f"{'on' if use_channels_last(config.channels_last, ctx.device) else 'off'}, compile "
              f"{'on' if config.compile else 'off'}, gradient all-reduce {config.grad_compression}",
              f"  weights: {start}{', trunk frozen' if config.freeze_backbone else ''}",
              f"  run folder: {run.root} ({'resumed' if run.has_run() else 'created when training starts'})"]
    return lines


def check_weights(config: Config, run: RunFolder) -> Tuple[Optional[Weights], Optional[str]]:
    """What --pretrained resolves to (the weights, or None with the untrained-backbone warning), checked:
    the file exists, matches the hash in its name and fits --arch; a resumed run keeps its weights."""
    weights, warning = resolve_pretrained(config.arch, config.pretrained)
    if config.freeze_backbone and weights is None:
        raise ValueError(f"--freeze-backbone: --pretrained {config.pretrained} gives --arch {config.arch} no weights, "
                         f"so the fixed trunk would be random. {warning}")
    if config.resume:
        comm.rank0_decides(lambda: check_same_weights(run, weights))
    build_model(config.arch, config.code_length, weights.file if weights else None)  # a file that does not fit fails here
    return weights, warning


def load_data(config: Config) -> PreparedData:
    try:
        return load_prepared(config.data, dataset=config.dataset, num_seen=config.num_seen)
    except FileNotFoundError as missing:
        if config.root:  # the reference CLI's --dataset/--root: say exactly how to prepare them
            raise FileNotFoundError(f"{missing}; with --root given: python -m dihn_dist.prepare --dataset "
                                    f"{config.dataset or 'DATASET'} --root {config.root} --out {config.data}") from None
        raise


def run_stage(name: str, config: Config, data: PreparedData, run: RunFolder, reporter: Reporter,
              weights: Optional[Weights] = None) -> dict:
    """One stage from its start (or its checkpoint) to its exported codes."""
    finished = comm.rank0_decides(lambda: run.read_json(name, "result.json") if run.stage_complete(name) else None)
    if finished is not None:
        logger.info(f"stage {name}: already complete in {run.root}, skipped")
        return finished
    stage = stage_spec(name, config, data)
    frozen_rows = (old_code_rows(config, data, run, shards_database(config, stage.num_database))
                   if name == INCREMENTAL else None)
    training = StageTraining(stage, config, data, run, reporter, InitialCodes(stage, config, frozen_rows), weights)
    if training.database.sharded:
        logger.info(f"stage {name}: the database is split by rows over {comm.context().world_size} processes "
                    f"(--shard-database {config.shard_database})")
    logger.info(f"stage {name}: {stage.num_database} database items ({stage.num_frozen} frozen), "
                f"{config.max_iter} outer iterations x {config.max_epoch} epochs x {config.num_samples} samples")
    result, query_codes = training.fit()
    model_state = {k: v.detach().cpu() for k, v in training.network.state_dict().items()}
    run.save_stage(name, model_state, training.database.save_codes(run, name), query_codes, result)
    logger.info(f"stage {name}: {result['row']}")
    return result


class StageTraining:
    """The network, optimizer, loader and codes of one stage, and the outer loop over them.

    `network` is the whole hashing network (what is saved and encodes images); `model` is what trains: the
    network (under DDP when distributed), or with --freeze-backbone its hash layer alone (HashHead), fed
    rows of the frozen trunk's feature table instead of images."""

    def __init__(self, stage: Stage, config: Config, data: PreparedData, run: RunFolder, reporter: Reporter,
                 initial: InitialCodes, weights: Optional[Weights] = None):
        ctx = comm.context()
        self.stage, self.config, self.data, self.run, self.reporter = stage, config, data, run, reporter
        self.resolution = input_resolution(config.arch, config.resolution, data.image_size)
        torch.manual_seed(config.seed * 1000 + stage.seed_key)  # the same initial weights on every rank
        network = build_model(config.arch, config.code_length, weights.file if weights else None).to(ctx.device)
        self.channels_last = use_channels_last(config.channels_last, ctx.device)
        if self.channels_last:
            network = network.to(memory_format=torch.channels_last)
        self.network = network
        self.precision = MixedPrecision(config.precision, ctx.device)
        self.features, self.features_s = None, 0.0
        if config.freeze_backbone:
            network.trunk.requires_grad_(False)
            self.features, self.features_s = frozen_features(
                network, features_key(config.arch, weights, self.resolution, self.precision, data), data, run,
                batch_size=inference_batch_size(config.batch_size, ctx.device), num_workers=config.loader_threads,
                precision=self.precision, channels_last=self.channels_last)
            self.channels_last = False  # the steps get feature rows, not images
            trained = HashHead(network)
        else:
            trained = network
        wrapped = comm.wrap(trained, config.grad_compression)
        self.model = torch.compile(wrapped) if config.compile else wrapped
        # Dropout (and EfficientNet's drop-connect) draws from here: each rank its own masks, as separate GPUs would.
        torch.manual_seed(seed_of(config.seed, stage.seed_key, ctx.rank))
        self.optimizer = self.precision.optimizer(parameter_groups(network, trained, config), config.lr,
                                                  config.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.ExponentialLR(self.optimizer, gamma=stage.lr_decay)
        self.database = stage_database(stage, config, data, initial)
        self.history, self.next_iteration, self.elapsed_s = [], 0, 0.0
        share = len(batch_schedule(np.arange(config.num_samples), config.batch_size, ctx.world_size, ctx.rank)[0])
        if self.features is not None:
            self.loader = FeatureRows(self.features["database"], length=share)
        else:
            self.loader = TrainLoader(data, batch_size=-(-config.batch_size // ctx.world_size), length=share,
                                      resolution=self.resolution, device=ctx.device, num_workers=config.loader_threads)
        if config.resume:
            self.restore()

    def fit(self):
        """The outer iterations of Algorithm 1, then the stage's evaluation and result."""
        stage, config = self.stage, self.config
        frozen_before = self.database.frozen_checksum()
        with self.run.checkpoints_landing(stage.name):
            for iteration in range(self.next_iteration, config.max_iter):
                clock = IterationClock()
                inject_failure(iteration, self.model, stage.name)
                sample = sample_positions(config.seed, stage, iteration, config.num_samples)
                r = self.database.similarity_offset(sample) if config.soft_similarity else None
                outputs, positions, losses = self.train_on_sample(sample, r, iteration)
                lr = self.optimizer.param_groups[0]["lr"]
                self.scheduler.step()
                clock.lap("train")
                code_update = self.database.update_codes(outputs, positions, r, clock)
                record = iteration_record(iteration, lr, losses, clock, code_update,
                                          images=config.num_samples * config.max_epoch, device=self.database.device)
                if self.evaluates_after(iteration):
                    row, _, times = self.evaluate()
                    record.update(evaluation_record(row, times))
                self.end_iteration(iteration, record, clock.elapsed())
            frozen_after = self.database.frozen_checksum()
            if frozen_after != frozen_before:
                raise RuntimeError(f"stage {stage.name}: the frozen codes changed ({frozen_before} -> {frozen_after})")
            row, query_codes, times = self.evaluate()  # while the last checkpoint lands
        return {"stage": stage.name, "row": row, "iterations": self.history, "train_time_s": self.elapsed_s,
                "final_eval": times,
                "frozen_rows": stage.num_frozen, "frozen_checksum_before": frozen_before,
                "frozen_checksum_after": frozen_after, "codes_checksum": self.database.checksum(),
                "resolution": self.resolution, "trunk_features_s": self.features_s}, query_codes

    def evaluates_after(self, iteration: int) -> bool:
        """--eval-every: an evaluation after this outer iteration (the last one is the stage's own evaluation)."""
        every = self.config.eval_every
        return bool(every) and (iteration + 1) % every == 0 and iteration + 1 < self.config.max_iter

    def end_iteration(self, iteration: int, record: dict, elapsed_s: float) -> None:
        """The per-iteration bookkeeping: history, TensorBoard, log line, checkpoint, agreed stop.

        A checkpoint every --checkpoint-every iterations and after the last one, in the background; a stop
        (SIGTERM on any rank) checkpoints at once, synchronously, whatever the schedule."""
        self.elapsed_s += elapsed_s
        self.history.append(record)
        self.next_iteration = iteration + 1
        self.reporter.scalars(self.stage.name, {k: v for k, v in record.items() if k != "iteration"}, iteration)
        log_iteration(self.stage.name, iteration, self.config.max_iter, record)
        stop = comm.stop_agreed()
        scheduled = self.next_iteration % self.config.checkpoint_every == 0
        if stop or scheduled or self.next_iteration == self.config.max_iter:
            started = time.perf_counter()
            self.checkpoint(background=not stop)
            # what the loop paid (a background write goes on); in the history from the next checkpoint on
            record["checkpoint_s"] = time.perf_counter() - started
        if stop:
            raise comm.StopRequested(f"stopped by SIGTERM after outer iteration {iteration + 1} of stage "
                                     f"{self.stage.name}; continue with --resume")

    def train_on_sample(self, sample: torch.Tensor, r: Optional[float], iteration: int):
        """--max-epoch epochs over the sample with the codes fixed.

        Returns this rank's outputs U of the last epoch with their database positions, and the loss terms
        summed over every rank (per item and database entry, for reporting). The hash term's statistics
        of the fixed codes are computed once here (every rank gets the same), so a step costs O(batch c^2)
        whatever the database size; so are the sampled rows' own codes and label patterns, wherever they are
        held. Everything a step needs from the host (its positions, its augmentation) moves to the device
        once per epoch, so a step never waits for the host; the loss totals are checked for NaN/inf once per
        epoch, on every rank alike.
        """
        ctx, config, stage = comm.context(), self.config, self.stage
        num_samples, n = sample.shape[0], stage.num_database
        stats = self.database.hash_term_stats(r)
        sampled = self.database.sample_rows(sample)
        global_sizes = [end - start
                        for start, end in global_batch_bounds(num_samples, config.batch_size, ctx.world_size)]
        by_position = np.argsort(sample.numpy())  # the slot of a position, without an n-sized table
        slot_of = lambda positions: by_position[np.searchsorted(sample.numpy()[by_position], positions)]  # noqa
        totals = torch.zeros(3, dtype=torch.float64, device=ctx.device)  # hash, quantization, balance
        for epoch in range(config.max_epoch):
            generator = seeded_generator(config.seed, stage.seed_key, iteration, epoch)
            order = sample[torch.randperm(num_samples, generator=generator)].numpy()
            augment_params = augment.draw_params(generator, num_samples, config.augment)
            positions, step_sizes = batch_schedule(order, config.batch_size, ctx.world_size, ctx.rank)
            params = augment_params[slot_of(positions)].to(ctx.device)
            on_device = torch.from_numpy(positions).to(ctx.device)
            batch_patterns = sampled.patterns_at(on_device)
            starts = np.cumsum([0] + step_sizes)
            self.loader.set_order(positions, step_sizes)
            epoch_totals, kept_outputs = torch.zeros_like(totals), []
            for step, (images, _, _) in enumerate(progress(self.loader, len(step_sizes),
                                                           f"{stage.name} it {iteration + 1} epoch {epoch + 1}")):
                batch = slice(starts[step], starts[step + 1])
                if config.augment != "none":
                    images = augment.apply(images, params[batch])
                if self.channels_last:
                    images = images.contiguous(memory_format=torch.channels_last)
                with self.precision.autocast():
                    outputs = self.model(images).float()
                bit_sums = comm.differentiable_all_reduce_sum(outputs.sum(dim=0)) if stage.mu > 0 else None
                hash_term = hashing.factorized_hash_loss(outputs, batch_patterns[batch], stats)
                loss, terms = hashing.batch_loss(outputs, hash_term, sampled.codes_at(on_device[batch]), bit_sums,
                                                 gamma=config.gamma, mu=stage.mu, num_database=n,
                                                 global_batch=global_sizes[step], world_size=ctx.world_size)
                self.precision.step(loss, self.optimizer)
                epoch_totals += torch.stack([terms["hash"], terms["quantization"],
                                             terms["balance"] / ctx.world_size]).detach()
                kept_outputs.append(outputs.detach())
            totals += self.check_finite(comm.all_reduce_sum(epoch_totals), iteration, epoch)
        hash_total, quantization, balance = (totals / (num_samples * config.max_epoch * n)).tolist()
        losses = {"loss_hash": hash_total, "loss_quantization": config.gamma * quantization,
                  "loss_balance": stage.mu * balance}
        losses["loss_total"] = sum(losses.values())
        return torch.cat(kept_outputs), on_device, losses

    def check_finite(self, epoch_totals: torch.Tensor, iteration: int, epoch: int) -> torch.Tensor:
        """The epoch's loss totals (summed over every rank, so every rank decides alike), or the error."""
        if not bool(torch.isfinite(epoch_totals).all()):
            hash_total, quantization, balance = epoch_totals.tolist()
            raise FloatingPointError(
                f"stage {self.stage.name}, iteration {iteration + 1}, epoch {epoch + 1}: non-finite loss (hash "
                f"{hash_total:.4g}, quantization {quantization:.4g}, balance {balance:.4g}); the last good "
                f"checkpoint is kept")
        return epoch_totals

    def evaluate(self):
        """The stage's retrieval row (the same on every rank): its model's query codes against its codes.
        Returns (row, query codes, the times of the sharded query encoding and of the metrics)."""
        started = time.perf_counter()
        if self.features is not None:  # the head on the cached query features: the network's codes, trunk and all
            query_codes = encode_batches(comm.unwrap(self.model), [(self.features["query"],)], self.precision.autocast)
        else:
            query_codes = encode(self.network, self.data, "query", self.config, self.resolution, self.precision,
                                 self.channels_last)
        encoded = time.perf_counter()  # encode ends in a gather: every rank's shard is done
        query_labels = torch.from_numpy(self.data.query_labels).to(query_codes.device)
        row = self.database.retrieval_row(query_codes, query_labels)
        return row, query_codes, {"eval_encode_s": encoded - started, "eval_metrics_s": time.perf_counter() - encoded}

    def checkpoint(self, background: bool = False) -> None:
        rng = comm.gather_rng_states()
        self.run.save_checkpoint(self.stage.name, background=background, state={
            "stage": self.stage.name, "iteration": self.next_iteration - 1, "model": self.network,
            "optimizer": self.optimizer, "scheduler": self.scheduler,
            **self.database.checkpoint_codes(self.run, self.next_iteration - 1),
            "history": self.history, "elapsed_s": self.elapsed_s, "rng": rng,
            "scaler": self.precision.scaler.state_dict() if self.precision.scaler else None})

    def restore(self) -> None:
        checkpoint = self.run.restore_checkpoint(self.stage.name, model=self.network,
                                                 optimizer=self.optimizer, scheduler=self.scheduler)
        if checkpoint is None:
            return
        self.database.restore_codes(self.run, checkpoint)
        self.history, self.elapsed_s = checkpoint["history"], checkpoint["elapsed_s"]
        self.next_iteration = checkpoint["iteration"] + 1
        if self.precision.scaler is not None and checkpoint.get("scaler"):
            self.precision.scaler.load_state_dict(checkpoint["scaler"])
        if not comm.restore_rng_states(checkpoint["rng"]):
            logger.warning(f"stage {self.stage.name}: the checkpoint comes from {len(checkpoint['rng'])} process(es), "
                           f"this run has {comm.context().world_size}: dropout masks will differ from an "
                           f"uninterrupted run's")
        # 1-based, as every message counts outer iterations (the checkpoint stores the 0-based index)
        logger.info(f"stage {self.stage.name}: resumed after outer iteration {checkpoint['iteration'] + 1} "
                    f"of {self.config.max_iter}")


def parameter_groups(network: torch.nn.Module, trained: torch.nn.Module, config: Config) -> list:
    """Adam's parameter groups: the new hash layer at --lr, the rest of the network at --lr x
    --backbone-lr-scale (one group, as the reference, when the scale is 1; only the hash layer with a frozen
    trunk). ExponentialLR decays every group by the same factor, so the ratio holds all run long."""
    if trained is not network or config.backbone_lr_scale == 1:
        return [{"params": list(trained.parameters())}]
    head = hash_layer_parameters(network)
    new = {id(p) for p in head}
    return [{"params": head},
            {"params": [p for p in network.parameters() if id(p) not in new],
             "lr": config.lr * config.backbone_lr_scale}]


def encode(model: torch.nn.Module, data: PreparedData, part: str, config: Config, resolution: int,
           precision: MixedPrecision, channels_last: bool = False) -> torch.Tensor:
    """int8 codes of every row of a part (query/database), each rank encoding a contiguous shard."""
    ctx = comm.context()
    count = data.num_query if part == "query" else data.num_database
    shard = np.array_split(np.arange(count), ctx.world_size)[ctx.rank]
    batch_size = inference_batch_size(config.batch_size, ctx.device)
    batches = eval_batches(data, part, batch_size=batch_size, resolution=resolution, device=ctx.device,
                           num_workers=config.loader_threads, indices=shard)
    local = encode_batches(comm.unwrap(model), progress(batches, -(-len(shard) // batch_size), f"encoding {part}"),
                           precision.autocast, channels_last)
    if local is None:  # more ranks than rows
        local = torch.empty(0, config.code_length, dtype=torch.int8, device=ctx.device)
    return comm.gather_rows(local).to(ctx.device)


def delay_for_tests() -> None:
    """Fault injection for the tests: DIHN_DELAY_RANK="rank=R,seconds=S" makes rank R start its checks S
    seconds late, as a rank that loads its data slowly does."""
    spec = os.environ.get("DIHN_DELAY_RANK")
    if not spec:
        return
    target = dict(item.split("=") for item in spec.split(","))
    if int(target["rank"]) == comm.context().rank:
        time.sleep(float(target["seconds"]))


def inject_failure(iteration: int, model: torch.nn.Module, stage: str) -> None:
    """Fault injection for the tests: DIHN_FAIL_AT="rank=R,iteration=I[,stage=S][,kind=nan|hang]" raises on
    rank R at (1-based) outer iteration I (of stage S only, if given), or with kind=nan poisons that rank's
    weights so that only its loss turns non-finite, or with kind=hang stops there for good: a test then
    kills the process (kill -9) knowing exactly which checkpoint the run holds."""
    spec = os.environ.get("DIHN_FAIL_AT")
    if not spec:
        return
    target = dict(item.split("=") for item in spec.split(","))
    if int(target["rank"]) != comm.context().rank or int(target["iteration"]) != iteration + 1:
        return
    if target.get("stage", stage) != stage:
        return
    if target.get("kind") == "hang":
        while True:
            time.sleep(3600)
    if target.get("kind") == "nan":
        with torch.no_grad():
            next(model.parameters()).fill_(float("nan"))
        return
    raise RuntimeError(f"injected failure (DIHN_FAIL_AT={spec}) on rank {comm.context().rank}")


