"""The stages of a run and the seeded draws of each outer iteration.

The stage table says which database rows a stage sees, which of them keep the codes they start with, and
its bit-balance weight and learning-rate decay. Every random draw of a stage (the sampled subset, the
initial codes, the epoch orders and augmentations) comes from a generator seeded by (seed, stage,
iteration, ...), never from a global generator: the same on every rank, after a resume, and whatever the
number of processes.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional

import torch

from ..common.formats import INCREMENTAL, ORIGINAL, STAGES

if TYPE_CHECKING:  # annotations only
    from ..data.prepared import PreparedData
    from ..training.config import Config


@dataclass(frozen=True)
class Stage:
    name: str
    num_database: int  # the stage sees database rows [0, num_database)
    num_frozen: int    # rows [0, num_frozen) keep the codes they start with
    mu: float          # weight of the bit-balance term
    lr_decay: float

    @property
    def seed_key(self) -> int:
        return STAGES.index(self.name) + 1


def stage_spec(name: str, config: Config, data: PreparedData) -> Stage:
    """The stage table: original = ADSH on the original items; incremental = DIHN on every item with the
    original codes frozen; retrain = ADSH from scratch on every item (the baseline)."""
    if name == ORIGINAL:
        return Stage(name, data.num_original, 0, 0.0, config.lr_decay_original)
    if name == INCREMENTAL:
        return Stage(name, data.num_database, data.num_original, config.mu, config.lr_decay_incremental)
    return Stage(name, data.num_database, 0, 0.0, config.lr_decay_original)


def seed_of(*keys: int) -> int:
    digest = hashlib.sha256(repr(keys).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def seeded_generator(*keys: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed_of(*keys))


def sample_positions(seed: int, stage: Stage, iteration: int, num_samples: int) -> torch.Tensor:
    """The m database positions of one outer iteration, the same on every rank and after a resume."""
    generator = seeded_generator(seed, stage.seed_key, iteration)
    return torch.randperm(stage.num_database, generator=generator)[:num_samples]


def initial_codes(stage: Stage, config: Config, frozen: Optional[torch.Tensor]) -> torch.Tensor:
    generator = seeded_generator(config.seed, stage.seed_key, -1)
    learned = torch.randint(0, 2, (stage.num_database - stage.num_frozen, config.code_length), generator=generator)
    learned = (learned * 2 - 1).to(torch.int8)
    return learned if frozen is None else torch.cat([frozen.to(torch.int8), learned])
