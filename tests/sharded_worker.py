"""A tiny seeded problem solved two ways: the whole-database path (--shard-database off: every code on one
process; r, the hash-term stats, one DCC sweep, the retrieval row) and the sharded path,
dihn_dist.distributed.sharded.RowShard (each rank its own rows, in blocks), under torchrun or in one process.
tests/test_sharding.py compares them.

    torchrun --nproc_per_node N tests/sharded_worker.py SEED MULTI(0|1) NUM_FROZEN TOPK OUT.pt
"""
from __future__ import annotations

import os
import sys

import torch

from dihn_dist.method import dcc, hashing, metrics

NUM_DATABASE, CODE_LENGTH, NUM_LABELS, NUM_SAMPLES, NUM_QUERIES = 97, 6, 5, 30, 11
GAMMA, NUM_SEEN, PRECISION_K = 200.0, 3, 15
BLOCK_ROWS = 13  # rows per block of a shard: several blocks a shard, boundaries apart from the shards'


def make_problem(seed: int, multi: bool, num_frozen: int, topk) -> dict:
    """Codes, labels, a sample of distinct rows with its network outputs, and queries. Six bits for 97 rows
    make many equal distances, so the tie rule across shard boundaries is exercised."""
    g = torch.Generator().manual_seed(seed)
    n, c, L = NUM_DATABASE, CODE_LENGTH, NUM_LABELS

    def labels(rows):
        if not multi:
            return torch.nn.functional.one_hot(torch.randint(0, L, (rows,), generator=g), L).to(torch.float32)
        out = (torch.rand(rows, L, generator=g) < 0.3).to(torch.float32)
        out[torch.arange(rows), torch.randint(0, L, (rows,), generator=g)] = 1  # at least one label
        return out

    def codes(rows):
        return (torch.randint(0, 2, (rows, c), generator=g) * 2 - 1).to(torch.float32)

    return {"codes": codes(n), "labels": labels(n), "sample": torch.randperm(n, generator=g)[:NUM_SAMPLES],
            "outputs": torch.randn(NUM_SAMPLES, c, generator=g).tanh(), "query_codes": codes(NUM_QUERIES),
            "query_labels": labels(NUM_QUERIES), "num_frozen": num_frozen, "topk": topk, "multi": multi}


def rank_order(problem: dict, world_size: int) -> torch.Tensor:
    """Slots of the sample in the order the ranks' shares are gathered (rank r trains on slots r::N)."""
    return torch.cat([torch.arange(rank, NUM_SAMPLES, world_size) for rank in range(world_size)])


def one_process(problem: dict, world_size: int) -> dict:
    """The training loop's calls today (training/loop.py: similarity_offset, train_on_sample, update_codes,
    evaluate), with U in the order gather_rows gives it under world_size ranks."""
    codes, labels, nf = problem["codes"], problem["labels"], problem["num_frozen"]
    slots = rank_order(problem, world_size)
    sample, U = problem["sample"][slots], problem["outputs"][slots]
    patterns, pattern_of_row = hashing.label_patterns(labels)
    r = hashing.soft_similarity_offset(labels[sample], labels, db_patterns=(patterns, pattern_of_row))
    stats = hashing.hash_term_stats(codes, patterns, pattern_of_row, r)
    learned_rows = sample - nf
    learned = dcc.solve_dcc(codes[nf:], U, labels[sample], labels[nf:],
                            torch.where(learned_rows >= 0, learned_rows, -1), GAMMA, r,
                            db_patterns=hashing.label_patterns(labels[nf:]))
    new_codes = torch.cat([codes[:nf], learned])
    row = metrics.retrieval_row(problem["query_codes"], new_codes.to(torch.int8), problem["query_labels"], labels,
                                NUM_SEEN, problem["topk"], PRECISION_K)
    return {"r": r, "gram": stats.gram, "targets": stats.targets, "target_norms": stats.target_norms,
            "codes": new_codes, "row": row}


def sharded(problem: dict, block_rows: int = BLOCK_ROWS) -> dict:
    """The same through dihn_dist.distributed.sharded.RowShard: this rank holds only its rows (in blocks of
    block_rows, so block and shard boundaries both fall inside the database) and its share of the sample."""
    from dihn_dist.distributed import comm, sharded as S

    ctx = comm.context()
    device = ctx.device
    codes, labels = problem["codes"].to(torch.int8), problem["labels"]
    shard = S.RowShard(codes.shape[0], problem["num_frozen"], CODE_LENGTH, lambda a, b: labels[a:b],
                       lambda a, b: codes[a:b], block_rows=block_rows, device=device)
    mine = torch.arange(ctx.rank, NUM_SAMPLES, ctx.world_size)
    my_rows, my_outputs = problem["sample"][mine].to(device), problem["outputs"][mine].to(device)
    my_labels = labels[problem["sample"][mine]].to(device)  # a rank knows its batch items' labels

    sample_labels, sample_rows = comm.gather_rows(my_labels), comm.gather_rows(my_rows)
    r = shard.similarity_offset(sample_labels)
    stats = shard.hash_term_stats(r)
    shard.update_codes(comm.gather_rows(my_outputs), sample_labels, sample_rows, GAMMA, r)
    row = shard.retrieval_row(problem["query_codes"].to(device), problem["query_labels"].to(device), NUM_SEEN,
                              problem["topk"], PRECISION_K)
    return {"r": r, "gram": stats.gram.cpu(), "targets": stats.targets.cpu(), "target_norms": stats.target_norms.cpu(),
            "codes": comm.gather_rows(shard.codes(0, shard.num_held)).cpu(), "row": row,
            "rows_held": comm.gather_objects((shard.first_row, shard.end_row)), "rows_agree": comm.gather_objects(row),
            "checksum": shard.checksum(), "frozen_checksum": shard.checksum(frozen_only=True)}


def main(argv) -> int:
    from dihn_dist.distributed import comm

    seed, multi, num_frozen, topk, out = int(argv[0]), argv[1] == "1", int(argv[2]), int(argv[3]), argv[4]
    comm.init("cpu")
    try:
        result = sharded(make_problem(seed, multi, num_frozen, topk or None))
        result["world_size"] = comm.context().world_size
        if comm.context().is_main:
            torch.save(result, out + ".tmp")
            os.replace(out + ".tmp", out)
    finally:
        comm.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
