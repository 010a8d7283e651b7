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
from typing import TYPE_CHECKING, Callable, Optional

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
    """Every row's codes before the first outer iteration: the frozen rows' (B_old) then random +-1 rows."""
    return InitialCodes(stage, config, None if frozen is None else lambda a, b: frozen[a:b])(0, stage.num_database)


class InitialCodes:
    """Rows of initial_codes on demand: codes(first, end) gives rows [first, end) (int8), the frozen ones from
    frozen_rows(a, b), the others from the one stream of draws that initial_codes takes whole. Asked in
    increasing ranges (a shard's blocks), it draws each row once and holds none: torch's CPU generator gives
    the same values drawn in pieces as at once, so a shard's codes are the whole database's."""

    DRAW_ROWS = 1 << 20  # rows drawn and dropped at a time when skipping to a range

    def __init__(self, stage: Stage, config: Config, frozen_rows: Optional[Callable[[int, int], object]]):
        self.stage, self.config, self.frozen_rows = stage, config, frozen_rows
        self.generator, self.position = None, stage.num_frozen  # the next learned row the stream draws

    def draw(self, rows: int) -> torch.Tensor:
        codes = torch.randint(0, 2, (rows, self.config.code_length), generator=self.generator, dtype=torch.int8)
        self.position += rows
        return codes * 2 - 1

    def __call__(self, first: int, end: int) -> torch.Tensor:
        stage, pieces = self.stage, [torch.zeros(0, self.config.code_length, dtype=torch.int8)]
        if first < stage.num_frozen:
            pieces.append(torch.as_tensor(self.frozen_rows(first, min(end, stage.num_frozen))).to(torch.int8))
        start = max(first, stage.num_frozen)
        if start < end:
            if self.generator is None or start < self.position:
                self.generator = seeded_generator(self.config.seed, stage.seed_key, -1)
                self.position = stage.num_frozen
            while self.position < start:
                self.draw(min(self.DRAW_ROWS, start - self.position))
            pieces.append(self.draw(end - start))
        return torch.cat(pieces)
