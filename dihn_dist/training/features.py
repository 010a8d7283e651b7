"""The frozen trunk's features (--freeze-backbone): computed once per run, reused by every stage and resume.

The trunk is the same pretrained network in every stage and never trains, so its pooled features of every
database and query image are a fixed table. Each rank computes a contiguous shard (eval mode: the
ImageNet batch-norm statistics, no dropout), the shards are gathered on every rank, and rank 0 caches the
tables in the run folder (atomically). The cache's name carries the weights' sha256 prefix, the input side
and the precision; its header the whole key below, so a cache computed under any other key is never
reused. Only the hash layer then trains, on rows of the table on the device.
"""
from __future__ import annotations

import time
from typing import Dict, Tuple

import numpy as np
import torch
from loguru import logger

from ..data.loader import eval_batches, eval_crop_ratio
from ..data.prepared import PreparedData
from ..distributed import comm
from ..models.networks import LiteHashNet, MixedPrecision, Weights
from .reporting import progress
from .runfolder import RunFolder

# Bump when what a cached table holds changes.
FEATURES_FORMAT = 1


def features_key(arch: str, weights: Weights, resolution: int, precision: MixedPrecision,
                 data: PreparedData) -> dict:
    """What decides the tables: the trunk (architecture and weights), how images reach it (side, crop,
    precision) and which images (the prepared files' fingerprints). Channels-last and the device are left
    out: they change the order of float operations, not the function computed."""
    return {"format": FEATURES_FORMAT, "arch": arch, "weights_sha256": weights.sha256, "resolution": resolution,
            "crop_ratio": eval_crop_ratio(data), "precision": precision.name,
            "data_files": data.manifest.get("files"), "num_database": data.num_database,
            "num_query": data.num_query}


def trunk_features(network: LiteHashNet, data: PreparedData, part: str, *, resolution: int, batch_size: int,
                   num_workers: int, precision: MixedPrecision, channels_last: bool) -> torch.Tensor:
    """float32 pooled features of every row of a part, each rank computing a contiguous shard."""
    ctx = comm.context()
    count = data.num_query if part == "query" else data.num_database
    shard = np.array_split(np.arange(count), ctx.world_size)[ctx.rank]
    batches = eval_batches(data, part, batch_size=batch_size, resolution=resolution, device=ctx.device,
                           num_workers=num_workers, indices=shard)
    was_training = network.training
    network.eval()
    rows = [torch.empty(0, LiteHashNet.FEATURES, device=ctx.device)]
    with torch.no_grad(), precision.autocast():
        for images, _, _ in progress(batches, -(-len(shard) // batch_size), f"trunk features of {part}"):
            if channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            rows.append(network.features(images).float())
    network.train(was_training)
    return comm.gather_rows(torch.cat(rows)).to(ctx.device)


def frozen_features(network: LiteHashNet, key: dict, data: PreparedData, run: RunFolder, *, batch_size: int,
                    num_workers: int, precision: MixedPrecision,
                    channels_last: bool) -> Tuple[Dict[str, torch.Tensor], float]:
    """({"database", "query"}: the tables on this rank's device, seconds spent computing them): from the run
    folder's cache when it holds them under this key (0 s), else computed (sharded) and cached."""
    ctx = comm.context()
    path = run.features_path(key)
    cached = run.load_features(key)
    if not comm.any_rank(cached is None):  # every rank reads the shared cache, or every rank recomputes
        logger.info(f"frozen trunk: reused the cached features {path}")
        return {part: table.to(ctx.device) for part, table in cached.items()}, 0.0
    started = time.perf_counter()
    tables = {part: trunk_features(network, data, part, resolution=key["resolution"], batch_size=batch_size,
                                   num_workers=num_workers, precision=precision, channels_last=channels_last)
              for part in ("database", "query")}
    elapsed = time.perf_counter() - started
    run.save_features(key, tables)
    logger.info(f"frozen trunk: computed the features of {data.num_database} database and {data.num_query} query "
                f"images in {elapsed:.1f} s, cached in {path}")
    return tables, elapsed
