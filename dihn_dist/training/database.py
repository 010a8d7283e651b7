"""A stage's database codes and labels as the outer loop sees them, held one of two ways (--shard-database).

`WholeDatabase` (off): every rank holds every code (float32) and label; rank 0 solves DCC for the learned
rows and broadcasts the codes packed, and ranks the whole database in the evaluation. `ShardedDatabase`
(on): rank r holds only rows shard_bounds(n)[r] (codes bit-packed and int32 label-pattern ids into the
pattern table that every rank shares), and r, the hash-term statistics, DCC, the checksums, the
evaluation, the codes file and the checkpoint's codes come from each rank's rows and collectives
(distributed/sharded.py; docs/method.md, "Sharding the database by rows"). Both give the same codes bit
for bit and the same metrics to about 1e-16, so the loop (training/loop.py) calls one interface and never
asks which it has.
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch

from ..data.prepared import PreparedData
from ..distributed import comm, sharded
from ..method import dcc, hashing, metrics
from .config import SHARD_DATABASE_ROWS, Config
from .reporting import IterationClock
from .runfolder import RunFolder, codes_checksum
from .stages import InitialCodes, Stage


def shards_database(config: Config, num_database: int) -> bool:
    """--shard-database resolved for a stage of num_database rows (auto: from SHARD_DATABASE_ROWS rows with
    more than one process; one process holds every row either way)."""
    if config.shard_database == "auto":
        return comm.context().world_size > 1 and num_database >= SHARD_DATABASE_ROWS
    return config.shard_database == "on"


def stage_database(stage: Stage, config: Config, data: PreparedData, initial: InitialCodes):
    """The stage's database, whole or sharded as --shard-database says; initial(a, b): rows [a, b) of its codes
    before the first outer iteration."""
    held = ShardedDatabase if shards_database(config, stage.num_database) else WholeDatabase
    return held(stage, config, data, initial)


class WholeDatabase:
    """Every code and label on every rank; rank 0 solves DCC and ranks the database."""

    sharded = False

    def __init__(self, stage: Stage, config: Config, data: PreparedData, initial: InitialCodes):
        device = comm.context().device
        self.stage, self.config, self.num_seen = stage, config, data.num_seen
        self.codes = initial(0, stage.num_database).to(device, torch.float32)
        self.labels = torch.from_numpy(np.array(data.database_labels[:stage.num_database])).to(device, torch.float32)
        # The hash term, r and DCC see database items only through their label patterns: found once a stage.
        self.patterns, self.pattern_of_row = hashing.label_patterns(self.labels)
        self.learned_patterns = hashing.label_patterns(self.labels[stage.num_frozen:])

    @property
    def device(self) -> torch.device:
        return self.codes.device

    def similarity_offset(self, sample: torch.Tensor) -> float:
        """r of the soft similarity S*(1+r)-r over this sample and the stage's database."""
        return hashing.soft_similarity_offset(self.labels[sample], self.labels,
                                              db_patterns=(self.patterns, self.pattern_of_row))

    def hash_term_stats(self, r: Optional[float]) -> hashing.HashTermStats:
        return hashing.hash_term_stats(self.codes, self.patterns, self.pattern_of_row, r)

    def sample_rows(self, sample: torch.Tensor) -> "WholeDatabase":
        """What the steps look up of the sampled rows (codes_at, patterns_at): here, every row is at hand."""
        return self

    def codes_at(self, positions: torch.Tensor) -> torch.Tensor:
        return self.codes[positions]

    def patterns_at(self, positions: torch.Tensor) -> torch.Tensor:
        return self.pattern_of_row[positions]

    def update_codes(self, outputs: torch.Tensor, positions: torch.Tensor, r: Optional[float],
                     clock: IterationClock) -> dict:
        """Every rank's U gathered; rank 0 solves DCC for the learned rows and every rank receives the new codes
        packed. Laps the clock (gather, dcc, broadcast); returns what the update sent and changed."""
        stage, codes = self.stage, self.codes
        all_outputs, all_positions = comm.gather_rows(outputs.float()), comm.gather_rows(positions)
        clock.lap("gather")
        learned_before = codes[stage.num_frozen:]
        learned_rows = all_positions - stage.num_frozen  # negative: a sampled frozen row

        def solve() -> torch.Tensor:
            return dcc.solve_dcc(learned_before, all_outputs, self.labels[all_positions],
                                 self.labels[stage.num_frozen:], torch.where(learned_rows >= 0, learned_rows, -1),
                                 self.config.gamma, r, db_patterns=self.learned_patterns)

        def receive(solved: Optional[torch.Tensor]):
            clock.lap("dcc")  # on rank 0 the solve; the other ranks wait for it in the broadcast
            return comm.broadcast_codes(solved, learned_before.shape[0], self.config.code_length)

        learned, sent = comm.rank0_computes(solve, receive)
        clock.lap("broadcast")
        learned = learned.to(codes.dtype)
        changed = (learned != learned_before).float().mean().item()
        codes[stage.num_frozen:] = learned
        return {"broadcast_bytes": sent, "bits_changed": changed,
                # 0 when every bit splits the learned codes half and half, 1 when a bit is constant
                "bit_imbalance": learned.float().mean(dim=0).abs().mean().item()}

    def retrieval_row(self, query_codes: torch.Tensor, query_labels: torch.Tensor) -> dict:
        """The retrieval row of the query codes against the database, ranked on rank 0 (the same on every rank)."""
        config = self.config
        return comm.rank0_decides(lambda: metrics.retrieval_row(
            query_codes, self.codes.to(torch.int8), query_labels, self.labels, self.num_seen,
            config.topk, config.precision_k))

    def frozen_checksum(self) -> str:
        return codes_checksum(self.codes[:self.stage.num_frozen])

    def checksum(self) -> str:
        return codes_checksum(self.codes)

    def checkpoint_codes(self, run: RunFolder, iteration: int) -> dict:
        """What the checkpoint keeps of the codes: all of them, in the checkpoint file."""
        return {"codes": self.codes.to("cpu", torch.int8)}

    def restore_codes(self, run: RunFolder, checkpoint: dict) -> None:
        self.codes = saved_rows(run, checkpoint, 0, self.stage.num_database).to(self.device, torch.float32)

    def save_codes(self, run: RunFolder, stage: str) -> Optional[torch.Tensor]:
        """The codes for run.save_stage to write (rank 0 writes them)."""
        return self.codes


class ShardedDatabase:
    """This rank's contiguous rows of the database only (distributed/sharded.py's RowShard): what the loop asks
    of the database, with the clock laps, the sample's labels and the run folder's files."""

    sharded = True

    def __init__(self, stage: Stage, config: Config, data: PreparedData, initial: InitialCodes):
        self.stage, self.config, self.data, self.num_seen = stage, config, data, data.num_seen
        self.shard = sharded.RowShard(stage.num_database, stage.num_frozen, config.code_length,
                                      lambda a, b: data.database_labels[a:b], initial)
        self.codes_folder = None  # the codes folder of the last checkpoint (it must outlive the next one's write)

    @property
    def device(self) -> torch.device:
        return self.shard.device

    def labels_of(self, positions: torch.Tensor) -> torch.Tensor:
        """Labels of any database rows: every rank has the prepared data's labels at hand (its loader reads
        any sampled row), so a sampled row's labels need no collective."""
        rows = positions.to("cpu").numpy()
        return torch.from_numpy(self.data.database_labels[rows]).to(self.device, torch.float32)

    def similarity_offset(self, sample: torch.Tensor) -> float:
        return self.shard.similarity_offset(self.labels_of(sample))

    def hash_term_stats(self, r: Optional[float]) -> hashing.HashTermStats:
        return self.shard.hash_term_stats(r)

    def sample_rows(self, sample: torch.Tensor) -> "SampleRows":
        """The sampled rows' codes and pattern ids, from the ranks that hold them (one gather of m rows): the
        quantization term needs each item's own code and the hash term its pattern."""
        return SampleRows(*self.shard.sample_rows(sample))

    def update_codes(self, outputs: torch.Tensor, positions: torch.Tensor, r: Optional[float],
                     clock: IterationClock) -> dict:
        """Every rank's U gathered; every rank solves DCC for its own learned rows, and the ranks add up what
        changed (no code moves). Laps the clock (gather, dcc, broadcast: the count exchange)."""
        U, labels, rows = (comm.gather_rows(t) for t in (outputs.float(), self.labels_of(positions), positions))
        clock.lap("gather")
        changed = self.shard.update_codes(U, labels, rows, self.config.gamma, r)
        clock.lap("dcc")
        total = comm.all_reduce_sum(changed)
        clock.lap("broadcast")
        num_learned = self.stage.num_database - self.stage.num_frozen
        return {"broadcast_bytes": 0, "bits_changed": int(total[0]) / (num_learned * self.config.code_length),
                "bit_imbalance": (total[1:].double() / num_learned).abs().mean().item()}

    def retrieval_row(self, query_codes: torch.Tensor, query_labels: torch.Tensor) -> dict:
        """The retrieval row, every rank ranking only its own rows (the same row on every rank)."""
        return self.shard.retrieval_row(query_codes, query_labels, self.num_seen, self.config.topk,
                                        self.config.precision_k)

    def frozen_checksum(self) -> str:
        """sha256 of the frozen rows in order, the same string as the whole database's codes_checksum."""
        return self.shard.checksum(frozen_only=True)

    def checksum(self) -> str:
        return self.shard.checksum()

    def checkpoint_codes(self, run: RunFolder, iteration: int) -> dict:
        """Every rank's rows into their own folder (torch.distributed.checkpoint); the checkpoint names it.
        The folder of the previous checkpoint stays until this one has landed: the folders of the ones
        before are removed."""
        name = run.save_codes_checkpoint(self.stage.name, iteration, self.shard.packed, self.shard.first_row)
        keep = {name, self.codes_folder} if self.codes_folder else {name}
        run.remove_codes_checkpoints(self.stage.name, keep)
        self.codes_folder = name
        return {"codes": None, "codes_folder": name}

    def restore_codes(self, run: RunFolder, checkpoint: dict) -> None:
        self.shard.restore(saved_rows(run, checkpoint, self.shard.first_row, self.shard.end_row))
        self.codes_folder = checkpoint.get("codes_folder")

    def save_codes(self, run: RunFolder, stage: str) -> Optional[torch.Tensor]:
        """Writes the codes files from the shards now; nothing left for run.save_stage to write."""
        run.save_database_codes_from_shards(stage, self.shard.packed, self.shard.first_row, self.stage.num_database,
                                            self.config.code_length)
        return None


class SampleRows:
    """The sampled rows' codes and pattern ids, looked up by database position."""

    def __init__(self, positions: torch.Tensor, codes: torch.Tensor, pattern_ids: torch.Tensor):
        self.positions, self.codes, self.pattern_ids = positions, codes, pattern_ids

    def codes_at(self, positions: torch.Tensor) -> torch.Tensor:
        return self.codes[torch.searchsorted(self.positions, positions.to(self.positions.device))]

    def patterns_at(self, positions: torch.Tensor) -> torch.Tensor:
        return self.pattern_ids[torch.searchsorted(self.positions, positions.to(self.positions.device))]


def saved_rows(run: RunFolder, checkpoint: dict, first_row: int, end_row: int) -> torch.Tensor:
    """Rows [first_row, end_row) of a checkpoint's codes, wherever it keeps them: in the file (a run that
    held the whole database) or in its codes folder (a sharded run, on any world size)."""
    if checkpoint.get("codes_folder"):
        return run.load_codes_checkpoint(checkpoint["codes_folder"], first_row, end_row)
    return checkpoint["codes"][first_row:end_row]
