"""The database split by rows (issue 23): each shard's partial statistics, DCC on its own rows and its part of
the metrics, put together, equal what the one-process path computes over the whole database. In-process
splits into 1, 2 and 3 uneven shards (and one with an empty shard), then torchrun x2 and x3 on gloo through
dihn_dist.distributed.sharded (tests/sharded_worker.py)."""
import subprocess
from pathlib import Path

import pytest
import torch

import sharded_worker as W
from dihn_dist.distributed.sharded import shard_bounds
from dihn_dist.training.runfolder import codes_checksum
from dihn_dist.method import dcc, hashing, metrics

N = W.NUM_DATABASE
SPLITS = {"1": [N], "2": [40, N - 40], "3-uneven": [9, 55, N - 64], "empty-shard": [0, 31, N - 31]}


def bounds(sizes):
    starts = [sum(sizes[:i]) for i in range(len(sizes))]
    return [(s, s + size) for s, size in zip(starts, sizes)]


@pytest.mark.parametrize("split", SPLITS)
@pytest.mark.parametrize("multi", [False, True], ids=["single", "multi"])
@pytest.mark.parametrize("soft", [False, True], ids=["hard", "soft"])
def test_hash_term_partials_of_the_shards_give_the_stats_bit_for_bit(split, multi, soft):
    p = W.make_problem(1, multi, 0, None)
    codes, labels = p["codes"], p["labels"]
    patterns, pattern_of_row = hashing.label_patterns(labels)
    r = 0.37 if soft else None
    whole = hashing.hash_term_stats(codes, patterns, pattern_of_row, r)
    parts = [hashing.hash_term_partials(codes[a:b], pattern_of_row[a:b], patterns.shape[0])
             for a, b in bounds(SPLITS[split])]
    summed = parts[0]
    for part in parts[1:]:
        summed = summed + part
    stats = hashing.hash_term_stats_from_partials(summed, patterns, pattern_of_row, N, r)
    for name in ("gram", "targets", "target_norms"):
        assert torch.equal(getattr(stats, name), getattr(whole, name)), name


@pytest.mark.parametrize("split", SPLITS)
@pytest.mark.parametrize("multi", [False, True], ids=["single", "multi"])
def test_shards_pattern_tables_merge_into_the_whole_databases(split, multi):
    labels = W.make_problem(2, multi, 0, None)["labels"]
    patterns, pattern_of_row = hashing.label_patterns(labels)
    shards = [labels[a:b] for a, b in bounds(SPLITS[split])]
    merged = hashing.label_patterns(torch.cat([hashing.label_patterns(s)[0] for s in shards if s.shape[0]]))[0]
    assert torch.equal(merged, patterns)
    ids = torch.cat([hashing.pattern_ids(merged, s) for s in shards])
    assert torch.equal(ids, pattern_of_row)


def test_pattern_ids_refuses_a_row_missing_from_the_table():
    table = hashing.label_patterns(torch.tensor([[1, 0, 0], [0, 1, 0]]))[0]
    with pytest.raises(ValueError, match="labels: has label rows missing"):
        hashing.pattern_ids(table, torch.tensor([[0, 0, 1]]))


@pytest.mark.parametrize("split", SPLITS)
@pytest.mark.parametrize("multi", [False, True], ids=["single", "multi"])
def test_similar_pair_counts_of_the_shards_give_r_exactly(split, multi):
    p = W.make_problem(3, multi, 0, None)
    labels, sample = p["labels"], p["sample"]
    positives = sum(hashing.count_similar_pairs(labels[sample], labels[a:b])
                    for a, b in bounds(SPLITS[split]) if b > a)
    assert hashing.soft_offset_from_counts(positives, sample.shape[0] * N) == \
        hashing.soft_similarity_offset(labels[sample], labels)


@pytest.mark.parametrize("split", SPLITS)
@pytest.mark.parametrize("multi", [False, True], ids=["single", "multi"])
@pytest.mark.parametrize("num_frozen", [0, 30, 60], ids=["stage1", "frozen-30", "frozen-60"])
@pytest.mark.parametrize("seed", [4, 5])
def test_dcc_on_each_shards_rows_is_the_one_sweep_bit_for_bit(split, multi, num_frozen, seed):
    """num_frozen 30 ends B_old inside the second shard of the 3-way and the empty-shard splits, 60 inside the
    third of the 3-way split and the second of the 2-way one."""
    p = W.make_problem(seed, multi, num_frozen, None)
    expected = W.one_process(p, 1)
    codes, labels, sample, U = p["codes"], p["labels"], p["sample"], p["outputs"]
    r = expected["r"]
    factorize = hashing.is_single_label(labels[sample]) and hashing.is_single_label(labels[num_frozen:])
    assert factorize == (not multi)
    table = hashing.label_patterns(labels[num_frozen:])[0]
    blocks = []
    for a, b in bounds(SPLITS[split]):
        start = min(max(num_frozen - a, 0), b - a)
        ids = torch.cat([torch.zeros(start, dtype=torch.long), hashing.pattern_ids(table, labels[a + start:b])])
        blocks.append(dcc.solve_dcc_rows(codes[a:b], a, U, labels[sample], sample, labels[a:b], W.GAMMA, r,
                                         num_frozen, factorize=factorize, db_patterns=(table, ids)))
    sharded = torch.cat(blocks)
    assert torch.equal(sharded, expected["codes"])
    assert torch.equal(sharded[:num_frozen], codes[:num_frozen])
    assert not torch.equal(sharded[num_frozen:], codes[num_frozen:])  # the sweep did change codes


def sharded_metrics(p, codes, sizes, topk, chunk_rows=None):
    query_codes, query_labels, labels = p["query_codes"], p["query_labels"], p["labels"]
    shards = [(codes[a:b], labels[a:b]) for a, b in bounds(sizes)]
    counts = [metrics.shard_distance_counts(query_codes, c, query_labels, l, chunk_rows) for c, l in shards]
    total = torch.stack(counts).sum(dim=0)
    before = [torch.stack(counts[:i]).sum(dim=0) if i else torch.zeros_like(total) for i in range(len(counts))]
    sums = sum(metrics.shard_rank_sums(query_codes, c, query_labels, l, total, b, topk, W.PRECISION_K, chunk_rows)
               for (c, l), b in zip(shards, before))
    return total, sums


@pytest.mark.parametrize("split", SPLITS)
@pytest.mark.parametrize("multi", [False, True], ids=["single", "multi"])
@pytest.mark.parametrize("topk", [None, 20, 1], ids=["all", "top20", "top1"])
def test_sharded_metrics_are_the_whole_rankings(split, multi, topk):
    p = W.make_problem(6, multi, 0, topk)
    codes, labels, query_codes, query_labels = p["codes"], p["labels"], p["query_codes"], p["query_labels"]
    total, sums = sharded_metrics(p, codes, SPLITS[split], topk, chunk_rows=4)
    aps_all, aps_topk, hits = metrics.sharded_average_precisions(total, sums)
    torch.testing.assert_close(aps_all, metrics.average_precisions(query_codes, codes, query_labels, labels),
                               rtol=0, atol=1e-12)
    torch.testing.assert_close(aps_topk, metrics.average_precisions(query_codes, codes, query_labels, labels, topk),
                               rtol=0, atol=1e-12)
    assert float(hits.sum()) / W.PRECISION_K / query_codes.shape[0] == \
        metrics.precision_at_k(query_codes, codes, query_labels, labels, W.PRECISION_K)
    row = metrics.sharded_retrieval_row(total, sums, query_labels, W.NUM_SEEN, topk, W.PRECISION_K)
    assert_same_row(row, metrics.retrieval_row(query_codes, codes, query_labels, labels, W.NUM_SEEN, topk,
                                               W.PRECISION_K))


def test_sharded_metrics_follow_the_row_tie_rule_across_shards():
    """Every item at distance 0: the ranking is the row order, so relevant items in the first shard make a
    perfect AP. A tie rule that put a later shard's items first would score less."""
    codes = torch.ones(6, 4)
    labels = torch.tensor([[1, 0]] * 3 + [[0, 1]] * 3, dtype=torch.float32)
    p = {"query_codes": torch.ones(1, 4), "query_labels": torch.tensor([[1.0, 0.0]]), "labels": labels}
    for sizes in ([6], [2, 4], [3, 3], [1, 1, 4]):
        aps_all = metrics.sharded_average_precisions(*sharded_metrics(p, codes, sizes, None))[0]
        assert aps_all.tolist() == [1.0], sizes
    p["labels"] = labels.flip(0)  # the relevant items last: hits at ranks 4, 5, 6
    for sizes in ([6], [2, 4], [4, 2], [1, 1, 4]):
        aps_all = metrics.sharded_average_precisions(*sharded_metrics(p, codes, sizes, None))[0]
        assert aps_all.item() == pytest.approx((1 / 4 + 2 / 5 + 3 / 6) / 3, rel=1e-15), sizes


def assert_same_row(row, expected):
    assert row.keys() == expected.keys()
    for key, value in expected.items():
        if isinstance(value, float):
            assert row[key] == pytest.approx(value, rel=0, abs=1e-9), key
        else:
            assert row[key] == value, key


def test_shard_bounds_cover_the_rows_in_rank_order():
    for rows in (0, 1, 7, 97):
        for world in (1, 2, 3, 5):
            parts = [shard_bounds(rows, world, rank) for rank in range(world)]
            assert parts[0][0] == 0 and parts[-1][1] == rows
            assert all(a[1] == b[0] for a, b in zip(parts, parts[1:]))
            assert max(b - a for a, b in parts) - min(b - a for a, b in parts) <= 1


WORKER = Path(__file__).with_name("sharded_worker.py")


def assert_same_solution(got, expected, num_frozen):
    """RowShard's r, statistics, codes, checksums and row (sharded_worker.sharded) are the whole path's."""
    assert got["r"] == expected["r"]
    for name in ("gram", "targets", "target_norms"):
        assert torch.equal(got[name], expected[name]), name
    assert torch.equal(got["codes"], expected["codes"].to(torch.int8))
    assert got["checksum"] == codes_checksum(expected["codes"])
    assert got["frozen_checksum"] == codes_checksum(expected["codes"][:num_frozen])
    assert_same_row(got["row"], expected["row"])


@pytest.mark.parametrize("nproc", [2, 3])
@pytest.mark.parametrize("multi, num_frozen, topk", [(False, 40, 0), (True, 50, 20)], ids=["single", "multi"])
def test_torchrun_sharded_path_equals_the_one_process_path(nproc, multi, num_frozen, topk, tmp_path):
    from test_distributed import TORCHRUN, free_port

    out = tmp_path / "sharded.pt"
    command = [*TORCHRUN, "--nproc_per_node", str(nproc), "--master_port", str(free_port()), str(WORKER),
               "7", "1" if multi else "0", str(num_frozen), str(topk), str(out)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    got = torch.load(out, weights_only=False)
    expected = W.one_process(W.make_problem(7, multi, num_frozen, topk or None), nproc)
    assert got["world_size"] == nproc
    assert got["rows_held"] == [shard_bounds(N, nproc, rank) for rank in range(nproc)]
    assert_same_solution(got, expected, num_frozen)
    assert all(row == got["row"] for row in got["rows_agree"])  # every rank has the same row


@pytest.mark.parametrize("multi, num_frozen, topk", [(False, 0, None), (False, 40, 20), (True, 50, 20), (True, 90, None)])
def test_row_shard_in_one_process_is_the_whole_database_path(multi, num_frozen, topk):
    """One process, its rows in blocks of 13: the blocks alone split the database (the frozen rows end inside
    one, or cover it all)."""
    problem = W.make_problem(8, multi, num_frozen, topk)
    got, expected = W.sharded(problem), W.one_process(problem, 1)
    assert_same_solution(got, expected, num_frozen)


def test_row_shard_restores_packed_or_int8_rows():
    """A checkpoint's rows come packed (sharded runs) or as int8 +-1 (whole-database runs, and the first
    sharded checkpoints): both restore; rows of another shard are refused."""
    from dihn_dist.common.codes import pack_codes
    from dihn_dist.distributed.sharded import RowShard

    problem = W.make_problem(9, True, 0, None)
    codes, labels = problem["codes"].to(torch.int8), problem["labels"]
    shard = RowShard(N, 0, W.CODE_LENGTH, lambda a, b: labels[a:b], lambda a, b: codes[a:b], block_rows=13)
    shard.restore(-codes)
    assert torch.equal(shard.codes(0, N), -codes)
    shard.restore(pack_codes(codes))
    assert torch.equal(shard.codes(0, N), codes)
    with pytest.raises(ValueError, match=f"saved codes: expected rows 0..{N}"):
        shard.restore(codes[:5])


def test_initial_codes_of_any_row_range_are_the_whole_databases(monkeypatch):
    """A shard draws its rows' initial codes from the one seeded stream (skipping, in pieces, the rows before
    its own): any range, asked in any order, is that range of initial_codes."""
    from types import SimpleNamespace

    from dihn_dist.training.stages import InitialCodes, Stage, initial_codes, seeded_generator

    monkeypatch.setattr(InitialCodes, "DRAW_ROWS", 4)
    stage, config = Stage("incremental", 50, 17, 0.1, 1.0), SimpleNamespace(seed=3, code_length=12)
    frozen = (torch.randint(0, 2, (17, 12), generator=torch.Generator().manual_seed(1)) * 2 - 1).to(torch.int8)
    whole = initial_codes(stage, config, frozen)
    assert torch.equal(whole[:17], frozen)
    # the draws of every earlier version (one int64 randint of all learned rows): runs keep their codes
    earlier = torch.randint(0, 2, (33, 12), generator=seeded_generator(3, stage.seed_key, -1)) * 2 - 1
    assert torch.equal(whole[17:], earlier.to(torch.int8))
    rows = InitialCodes(stage, config, lambda a, b: frozen[a:b])
    for first, end in [(20, 33), (0, 50), (45, 50), (3, 18), (17, 17), (30, 41)]:
        assert torch.equal(rows(first, end), whole[first:end]), (first, end)
