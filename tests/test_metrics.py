"""dihn_dist.method.metrics against slow loops and hand-computed cases (docs/method.md, the retrieval metric).

Both ranking back ends (numpy on CPU by default, torch = the CUDA code path) are checked everywhere.
"""
import math

import numpy as np
import pytest
import torch

from dihn_dist.method import metrics as M


@pytest.fixture(params=["numpy", "torch"])
def backend(request, monkeypatch):
    monkeypatch.setattr(M, "CPU_BACKEND", request.param)
    return request.param


def gen(seed):
    return torch.Generator().manual_seed(seed)


def codes(num_rows, bits, g, dtype=torch.float32):
    return (torch.randint(0, 2, (num_rows, bits), generator=g) * 2 - 1).to(dtype)


def one_hot(num_rows, num_classes, g):
    return torch.nn.functional.one_hot(torch.randint(0, num_classes, (num_rows,), generator=g),
                                       num_classes).to(torch.uint8)


def multi_hot(num_rows, width, g, p=0.25):
    return (torch.rand(num_rows, width, generator=g) < p).to(torch.uint8)  # rows without labels included


# ----------------------------------------------------------------------------------------------------
# Slow references: plain Python lists and loops

def loop_ranking(q_code, db_codes):
    """Database indices sorted by (Hamming distance, index), and the distances."""
    dist = [sum(1 for x, y in zip(q_code, b) if x != y) for b in db_codes]
    return sorted(range(len(db_codes)), key=lambda j: (dist[j], j)), dist


def loop_relevant(q_labels, d_labels):
    return any(x and y for x, y in zip(q_labels, d_labels))


def loop_aps(qc, dc, ql, dl, topk=None):
    qc, dc, ql, dl = qc.tolist(), dc.tolist(), ql.tolist(), dl.tolist()
    n = len(dc)
    k = n if topk is None or topk <= 0 or topk > n else topk
    aps = []
    for i in range(len(qc)):
        order, _ = loop_ranking(qc[i], dc)
        hits, total = 0, 0.0
        for rank, j in enumerate(order[:k], start=1):
            if loop_relevant(ql[i], dl[j]):
                hits += 1
                total += hits / rank
        aps.append(total / hits if hits else 0.0)
    return aps


def loop_precision_at(qc, dc, ql, dl, k):
    qc, dc, ql, dl = qc.tolist(), dc.tolist(), ql.tolist(), dl.tolist()
    k = min(k, len(dc))
    values = []
    for i in range(len(qc)):
        order, _ = loop_ranking(qc[i], dc)
        values.append(sum(loop_relevant(ql[i], dl[j]) for j in order[:k]) / k)
    return sum(values) / len(values)


def loop_precision_recall_by_radius(qc, dc, ql, dl):
    c = qc.shape[1]
    qc, dc, ql, dl = qc.tolist(), dc.tolist(), ql.tolist(), dl.tolist()
    precision, recall = [0.0] * (c + 1), [0.0] * (c + 1)
    for i in range(len(qc)):
        _, dist = loop_ranking(qc[i], dc)
        rel = [loop_relevant(ql[i], d) for d in dl]
        for radius in range(c + 1):
            retrieved = [j for j in range(len(dc)) if dist[j] <= radius]
            hits = sum(rel[j] for j in retrieved)
            precision[radius] += hits / len(retrieved) if retrieved else 0.0
            recall[radius] += hits / sum(rel) if sum(rel) else 0.0
    return [p / len(qc) for p in precision], [r / len(qc) for r in recall]


# ----------------------------------------------------------------------------------------------------
# Hand-computed cases

def hand_case():
    # query 0 = [+1, +1]; database distances 1, 0, 1, 0, 2 -> ranking by (distance, index): 1, 3, 0, 2, 4
    query_codes = torch.tensor([[1, 1], [1, 1]])
    db_codes = torch.tensor([[1, -1], [1, 1], [-1, 1], [1, 1], [-1, -1]])
    # items 0, 3, 4 carry label 0 (relevant to query 0); nothing carries label 2 (query 1 has no hit)
    query_labels = torch.tensor([[1, 0, 0], [0, 0, 1]])
    db_labels = torch.tensor([[1, 0, 0], [0, 1, 0], [0, 1, 0], [1, 1, 0], [1, 0, 0]])
    return query_codes, db_codes, query_labels, db_labels


def test_hand_computed_ties_by_database_index(backend):
    qc, dc, ql, dl = hand_case()
    # ranked relevance of query 0: [0, 1, 1, 0, 1] -> AP = (1/2 + 2/3 + 3/5) / 3
    ap_all = (1 / 2 + 2 / 3 + 3 / 5) / 3
    aps = M.average_precisions(qc, dc, ql, dl)
    assert aps.dtype == torch.float64
    assert aps.tolist() == pytest.approx([ap_all, 0.0], abs=1e-15)
    # (a tie order by decreasing index would give 3, 1, 2, 0, 4 -> (1 + 2/4 + 3/5) / 3 = 0.7)
    assert M.mean_average_precision(qc, dc, ql, dl) == pytest.approx(ap_all / 2, abs=1e-15)
    assert M.average_precisions(qc, dc, ql, dl, topk=2).tolist() == pytest.approx([1 / 2, 0.0], abs=1e-15)
    assert M.average_precisions(qc, dc, ql, dl, topk=3).tolist() == pytest.approx([(1 / 2 + 2 / 3) / 2, 0.0])
    # no relevant item in the top 1: the query scores 0 and still counts in the mean
    assert M.average_precisions(qc, dc, ql, dl, topk=1).tolist() == [0.0, 0.0]
    assert M.mean_average_precision(qc, dc, ql, dl, topk=1) == 0.0


def test_hand_computed_topk_all_spellings(backend):
    qc, dc, ql, dl = hand_case()
    full = M.mean_average_precision(qc, dc, ql, dl)
    for topk in (None, 0, -1, 5, 6, 1000):
        assert M.mean_average_precision(qc, dc, ql, dl, topk=topk) == full
    # topk=-1 must not drop the last database item (a reference bug, docs/method.md): it holds a hit at rank 5
    assert M.mean_average_precision(qc, dc, ql, dl, topk=4) != full


def test_hand_computed_multi_label(backend):
    query_codes = torch.tensor([[1, 1, 1]])
    db_codes = torch.tensor([[1, 1, 1], [1, 1, -1], [-1, -1, -1], [1, -1, 1]])  # distances 0, 1, 3, 1
    query_labels = torch.tensor([[1, 1, 0]])
    db_labels = torch.tensor([[0, 0, 1], [0, 1, 1], [1, 0, 0], [1, 1, 1]])  # relevant: 1, 2, 3
    # ranking 0, 1, 3, 2 -> relevance 0, 1, 1, 1 -> AP = (1/2 + 2/3 + 3/4) / 3
    assert M.mean_average_precision(query_codes, db_codes, query_labels, db_labels) == \
        pytest.approx((1 / 2 + 2 / 3 + 3 / 4) / 3, abs=1e-15)
    assert M.precision_at_k(query_codes, db_codes, query_labels, db_labels, 2) == 0.5
    assert M.precision_at_ks(query_codes, db_codes, query_labels, db_labels, [1, 3, 4]).tolist() == \
        pytest.approx([0.0, 2 / 3, 3 / 4])


def test_hand_computed_precision_recall_by_radius(backend):
    qc, dc, ql, dl = hand_case()
    precision, recall = M.precision_recall_by_radius(qc, dc, ql, dl)
    # query 0: radius 0 -> items 1, 3 (1 hit of 3 relevant); radius 1 -> 1, 3, 0, 2 (2 hits); radius 2 -> all
    # query 1: no relevant item at all -> precision 0 and recall 0 everywhere
    assert precision.tolist() == pytest.approx([1 / 2 / 2, 2 / 4 / 2, 3 / 5 / 2])
    assert recall.tolist() == pytest.approx([1 / 3 / 2, 2 / 3 / 2, 3 / 3 / 2])


def test_hamming_distances_and_relevance_match_loops():
    g = gen(1)
    qc, dc = codes(5, 9, g, torch.int8), codes(13, 9, g)
    d = M.hamming_distances(qc, dc)
    assert d.dtype == torch.int16
    expected = [[sum(x != y for x, y in zip(q, b)) for b in dc.tolist()] for q in qc.tolist()]
    assert d.tolist() == expected
    ql, dl = multi_hot(5, 4, g), multi_hot(13, 4, g)
    assert M.relevance(ql, dl).tolist() == [[loop_relevant(a, b) for b in dl.tolist()] for a in ql.tolist()]


# ----------------------------------------------------------------------------------------------------
# Random cases against the loops

@pytest.mark.parametrize("multi", [False, True])
@pytest.mark.parametrize("topk", [None, 0, -1, 1, 7, 60, 61, 500])
def test_average_precisions_match_loop(backend, multi, topk):
    g = gen(2 if multi else 3)
    n, bits = 61, 5  # few bits: many ties
    qc, dc = codes(9, bits, g), codes(n, bits, g)
    ql = multi_hot(9, 6, g) if multi else one_hot(9, 4, g)
    dl = multi_hot(n, 6, g) if multi else one_hot(n, 4, g)
    expected = loop_aps(qc, dc, ql, dl, topk)
    for chunk_rows in (None, 1, 4):
        got = M.average_precisions(qc, dc, ql, dl, topk, chunk_rows=chunk_rows)
        assert got.shape == (9,)
        assert got.tolist() == pytest.approx(expected, abs=1e-12)
    assert M.mean_average_precision(qc, dc, ql, dl, topk) == pytest.approx(sum(expected) / 9, abs=1e-12)


@pytest.mark.parametrize("dtype", [torch.int8, torch.int16, torch.int64, torch.float16, torch.float32,
                                   torch.float64])
def test_code_dtypes_give_the_same_map(backend, dtype):
    g = gen(4)
    qc, dc = codes(6, 12, g), codes(40, 12, g)
    ql, dl = one_hot(6, 3, g), one_hot(40, 3, g)
    expected = sum(loop_aps(qc, dc, ql, dl)) / 6
    got = M.mean_average_precision(qc.to(dtype), dc.to(dtype), ql.bool(), dl.float())
    assert got == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("bits,width", [(8, 8), (64, 64), (70, 3), (130, 65), (300, 9)])
def test_wide_codes_and_labels(backend, bits, width):
    """Several packed words for codes (> 64 bits, > 255 bits) and labels (> 64 columns)."""
    g = gen(5)
    qc, dc = codes(4, bits, g), codes(30, bits, g)
    dc[5:9] = qc[0]  # exact matches at distance 0
    ql, dl = multi_hot(4, width, g, 0.15), multi_hot(30, width, g, 0.15)
    expected = loop_aps(qc, dc, ql, dl)
    assert M.average_precisions(qc, dc, ql, dl).tolist() == pytest.approx(expected, abs=1e-12)
    assert M.average_precisions(qc, dc, ql, dl, topk=10).tolist() == \
        pytest.approx(loop_aps(qc, dc, ql, dl, 10), abs=1e-12)


@pytest.mark.parametrize("k", [1, 5, 50, 200])
def test_precision_at_k_matches_loop(backend, k):
    g = gen(6)
    qc, dc = codes(7, 6, g), codes(50, 6, g)
    ql, dl = multi_hot(7, 5, g), multi_hot(50, 5, g)
    assert M.precision_at_k(qc, dc, ql, dl, k, chunk_rows=3) == \
        pytest.approx(loop_precision_at(qc, dc, ql, dl, k), abs=1e-12)


def test_precision_at_ks_matches_loop(backend):
    g = gen(7)
    qc, dc = codes(8, 6, g), codes(45, 6, g)
    ql, dl = one_hot(8, 3, g), one_hot(45, 3, g)
    ks = [1, 3, 10, 45, 100]
    got = M.precision_at_ks(qc, dc, ql, dl, ks, chunk_rows=3)
    assert got.dtype == torch.float64 and got.shape == (5,)
    assert got.tolist() == pytest.approx([loop_precision_at(qc, dc, ql, dl, k) for k in ks], abs=1e-12)


@pytest.mark.parametrize("multi", [False, True])
def test_precision_recall_by_radius_matches_loop(backend, multi):
    g = gen(8)
    qc, dc = codes(6, 7, g), codes(40, 7, g)
    ql = multi_hot(6, 4, g) if multi else one_hot(6, 3, g)
    ql[0] = 0  # a query with no relevant item: recall 0
    dl = multi_hot(40, 4, g) if multi else one_hot(40, 3, g)
    precision, recall = M.precision_recall_by_radius(qc, dc, ql, dl, chunk_rows=4)
    expected_p, expected_r = loop_precision_recall_by_radius(qc, dc, ql, dl)
    assert precision.shape == (8,) and recall.shape == (8,)
    assert precision.tolist() == pytest.approx(expected_p, abs=1e-12)
    assert recall.tolist() == pytest.approx(expected_r, abs=1e-12)


# ----------------------------------------------------------------------------------------------------
# The two back ends and their pieces agree

def test_backends_agree_on_a_larger_problem(monkeypatch):
    g = gen(9)
    n, bits = 1500, 16
    proto = codes(10, bits, g)
    db_classes = torch.randint(0, 10, (n,), generator=g)
    dc = torch.where(torch.rand(n, bits, generator=g) < 0.2, -proto[db_classes], proto[db_classes])
    qc = codes(37, bits, g)
    dl = torch.nn.functional.one_hot(db_classes, 10)
    ql = one_hot(37, 10, g)
    results = {}
    for name in ("numpy", "torch"):
        monkeypatch.setattr(M, "CPU_BACKEND", name)
        results[name] = (M.average_precisions(qc, dc, ql, dl, chunk_rows=5),
                         M.average_precisions(qc, dc, ql, dl, topk=100),
                         M.precision_at_ks(qc, dc, ql, dl, [1, 10, 1000]),
                         *M.precision_recall_by_radius(qc, dc, ql, dl))
    for a, b in zip(results["numpy"], results["torch"]):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


def test_numpy_ranker_ranking_is_the_stable_order():
    g = gen(10)
    qc, dc = codes(5, 70, g), codes(200, 70, g)
    dc[100:] = dc[:100]  # every distance appears at least twice: ties everywhere
    ql, dl = multi_hot(5, 9, g), multi_hot(200, 9, g)
    ranker = M._NumpyRanker(qc, dc, ql, dl)
    assert ranker.distances(slice(0, 5)).tolist() == M.hamming_distances(qc, dc).tolist()
    for topk in (200, 17):
        ranked = ranker.rank(slice(0, 5), topk)
        order = torch.sort(M.hamming_distances(qc, dc), dim=1, stable=True).indices[:, :topk]
        expected = torch.gather(M.relevance(ql, dl), 1, order)
        assert ranked.dtype == np.bool_ and ranked.tolist() == expected.tolist()


def test_ap_reductions_agree():
    rng = np.random.default_rng(11)
    ranked = rng.random((9, 300)) < 0.2
    ranked[2] = False  # no hit: 0
    ranked[4] = True
    ranked[5, :] = False
    ranked[5, -1] = True  # a single hit at the last rank
    expected = []
    for row in ranked.tolist():
        hits, total = 0, 0.0
        for rank, hit in enumerate(row, start=1):
            if hit:
                hits += 1
                total += hits / rank
        expected.append(total / hits if hits else 0.0)
    assert M._numpy_average_precisions(ranked).tolist() == pytest.approx(expected, abs=1e-14)
    assert M._torch_average_precisions(torch.from_numpy(ranked)).tolist() == pytest.approx(expected, abs=1e-14)
    assert M._numpy_average_precisions(np.zeros((3, 5), bool)).tolist() == [0.0, 0.0, 0.0]


def test_pack_rows_layout():
    bits = np.zeros((2, 20), bool)
    bits[0, [0, 3, 19]] = True
    bits[1, 8] = True
    words = M._pack_rows(bits)
    assert words.dtype == np.uint32 and words.shape == (2, 1)
    assert words[:, 0].tolist() == [1 | 8 | (1 << 19), 1 << 8]
    assert M._pack_rows(np.ones((1, 8), bool)).dtype == np.uint8
    assert M._pack_rows(np.ones((1, 130), bool)).shape == (1, 3)


def test_inputs_are_not_modified(backend):
    g = gen(12)
    args = (codes(4, 8, g, torch.int8), codes(20, 8, g), multi_hot(4, 3, g), multi_hot(20, 3, g))
    saved = [a.clone() for a in args]
    M.average_precisions(*args)
    M.precision_recall_by_radius(*args)
    for a, b in zip(args, saved):
        assert torch.equal(a, b)


def test_chunked_memory_bounded_chunks():
    # at the NUS-WIDE scale a chunk holds a bounded number of entries whatever the query count
    chunks = list(M._chunks(2100, 195_834, None))
    assert sum(c.stop - c.start for c in chunks) == 2100
    assert max(c.stop - c.start for c in chunks) * 195_834 <= M.CHUNK_ENTRIES
    chunks = list(M._chunks(2100, 195_834, None, M.NUMPY_CHUNK_ENTRIES))
    assert max(c.stop - c.start for c in chunks) * 195_834 <= M.NUMPY_CHUNK_ENTRIES


# ----------------------------------------------------------------------------------------------------
# Bad input

def test_validation_errors(backend):
    qc, dc, ql, dl = hand_case()
    cases = [
        ("query_codes", (qc * 0, dc, ql, dl)),
        ("query_codes", (qc[:0], dc, ql[:0], dl)),
        ("query_codes", (qc[0], dc, ql, dl)),
        ("db_codes", (qc, dc[:, :1], ql, dl)),
        ("db_codes", (qc, dc[:0], ql, dl[:0])),
        ("db_codes", (qc, dc.float() / 2, ql, dl)),
        ("query_labels", (qc, dc, ql * 2, dl)),
        ("query_labels", (qc, dc, ql[:1], dl)),
        ("query_labels", (qc, dc, ql[:, :0], dl[:, :0])),
        ("db_labels", (qc, dc, ql, dl[:, :2])),
        ("db_labels", (qc, dc, ql, dl[:3])),
        ("db_labels", (qc, dc, ql, -dl)),
    ]
    for name, args in cases:
        for fn in (M.average_precisions, M.mean_average_precision, M.precision_recall_by_radius):
            with pytest.raises(ValueError, match=f"^{name}:"):
                fn(*args)
        with pytest.raises(ValueError, match=f"^{name}:"):
            M.precision_at_k(*args, 1)
        with pytest.raises(ValueError, match=f"^{name}:"):
            M.precision_at_ks(*args, [1])
    with pytest.raises(ValueError, match="^k:"):
        M.precision_at_k(qc, dc, ql, dl, 0)
    with pytest.raises(ValueError, match="^ks:"):
        M.precision_at_ks(qc, dc, ql, dl, [])
    with pytest.raises(ValueError, match="^ks:"):
        M.precision_at_ks(qc, dc, ql, dl, [3, -1])


def test_metrics_on_cuda_match_cpu():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device on this machine")
    g = gen(13)
    qc, dc = codes(20, 12, g), codes(700, 12, g)
    ql, dl = multi_hot(20, 5, g), multi_hot(700, 5, g)
    cpu = M.average_precisions(qc, dc, ql, dl)
    gpu = M.average_precisions(qc.cuda(), dc.cuda(), ql.cuda(), dl.cuda())
    assert gpu.device.type == "cuda"
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=0, atol=1e-12)
    assert math.isclose(M.mean_average_precision(qc.cuda(), dc.cuda(), ql.cuda(), dl.cuda(), topk=50),
                        M.mean_average_precision(qc, dc, ql, dl, topk=50), abs_tol=1e-12)
    p_cpu, r_cpu = M.precision_recall_by_radius(qc, dc, ql, dl)
    p_gpu, r_gpu = M.precision_recall_by_radius(qc.cuda(), dc.cuda(), ql.cuda(), dl.cuda())
    torch.testing.assert_close(p_gpu.cpu(), p_cpu)
    torch.testing.assert_close(r_gpu.cpu(), r_cpu)


def test_nearest_ranks_by_distance_then_row_on_both_back_ends():
    g = torch.Generator().manual_seed(5)
    db = (torch.randint(0, 2, (300, 12), generator=g) * 2 - 1).to(torch.int8)
    queries = (torch.randint(0, 2, (7, 12), generator=g) * 2 - 1).to(torch.int8)
    distances = ((12 - queries.float() @ db.float().T) / 2).long()
    expected = torch.tensor(np.lexsort((np.broadcast_to(np.arange(300), (7, 300)), distances.numpy()), axis=1)[:, :20])
    rows, found = M.nearest(queries, db, 20)
    assert torch.equal(rows, expected) and torch.equal(found, torch.gather(distances, 1, expected))
    from unittest import mock
    with mock.patch.object(M, "CPU_BACKEND", "torch"):
        assert torch.equal(M.nearest(queries, db, 20)[0], expected)


@pytest.mark.parametrize("backend", ["numpy", "torch"])
def test_retrieval_row_from_one_ranking_equals_the_separate_metrics(backend):
    from unittest import mock
    g = torch.Generator().manual_seed(9)
    db_labels = (torch.rand(700, 6, generator=g) < 0.25).float()
    db_labels[torch.arange(700), torch.randint(0, 6, (700,), generator=g)] = 1
    query_labels = db_labels[torch.randperm(700, generator=g)[:40]]
    db = (torch.randint(0, 2, (700, 10), generator=g) * 2 - 1).to(torch.int8)
    queries = (torch.randint(0, 2, (40, 10), generator=g) * 2 - 1).to(torch.int8)
    with mock.patch.object(M, "CPU_BACKEND", backend), mock.patch.object(M, "NUMPY_CHUNK_ENTRIES", 3000):
        row = M.retrieval_row(queries, db, query_labels, db_labels, 4, 50, 30)
        aps = M.average_precisions(queries, db, query_labels, db_labels, topk=50)
        new = query_labels[:, 4:].sum(1) > 0
        assert row["map_all"] == pytest.approx(M.mean_average_precision(queries, db, query_labels, db_labels), abs=1e-12)
        assert row["map_topk"] == pytest.approx(float(aps.mean()), abs=1e-12)
        assert row["precision_at_30"] == pytest.approx(M.precision_at_k(queries, db, query_labels, db_labels, 30),
                                                       abs=1e-12)
        assert row["map_incremental_queries"] == pytest.approx(float(aps[new].mean()), abs=1e-12)
        assert row["map_original_queries"] == pytest.approx(float(aps[~new].mean()), abs=1e-12)
        assert (row["topk"], row["num_queries"], row["num_database"]) == (50, 40, 700)


# ----------------------------------------------------------------------------------------------------
# Sharded metrics: both back ends, both label forms

def as_patterns(labels, id_dtype=torch.int64):
    """labels as a (patterns, pattern_ids) pair, the patterns in first-appearance order (not sorted)."""
    rows = [tuple(r) for r in labels.tolist()]
    table = list(dict.fromkeys(rows))
    return torch.tensor(table, dtype=torch.bool).reshape(-1, labels.shape[1]), \
        torch.tensor([table.index(r) for r in rows], dtype=id_dtype)


def shard_pieces(qc, dc, ql, dl, sizes, topk, precision_k, form="rows", chunk_rows=None):
    """Per shard: shard_distance_counts and shard_rank_sums, shards of `sizes` rows in row order."""
    bounds = np.cumsum([0] + list(sizes)).tolist()
    shards = []
    for a, b in zip(bounds, bounds[1:]):
        labels = dl[a:b]
        if form != "rows":  # one table for every shard, as the ranks share it
            patterns, ids = as_patterns(dl, torch.int32 if form == "patterns32" else torch.int64)
            labels = (patterns.float() if form == "patterns" else patterns, ids[a:b])
        shards.append((dc[a:b], labels))
    counts = [M.shard_distance_counts(qc, c, ql, labels, chunk_rows) for c, labels in shards]
    total = torch.stack(counts).sum(dim=0)
    before = [sum(counts[:i], torch.zeros_like(total)) for i in range(len(counts))]
    sums = [M.shard_rank_sums(qc, c, ql, labels, total, b, topk, precision_k, chunk_rows)
            for (c, labels), b in zip(shards, before)]
    return counts, total, sums


@pytest.mark.parametrize("multi", [False, True], ids=["single", "multi"])
@pytest.mark.parametrize("topk", [None, 7])
def test_shard_backends_and_label_forms_agree(monkeypatch, multi, topk):
    """numpy and torch, labels per row or as patterns: the same counts and integer columns, and the float
    columns to 1e-12 relative; 5 bits over 90 rows ties everywhere, one shard is empty."""
    g = gen(14 if multi else 15)
    qc, dc = codes(11, 5, g), codes(90, 5, g)
    ql = multi_hot(11, 6, g) if multi else one_hot(11, 4, g)
    dl = multi_hot(90, 6, g) if multi else one_hot(90, 4, g)
    sizes = [31, 0, 44, 15]
    results = {}
    for backend in ("torch", "numpy"):
        monkeypatch.setattr(M, "CPU_BACKEND", backend)
        for form in ("rows", "patterns", "patterns32", "bool_patterns"):
            for chunk_rows in (None, 3):
                results[backend, form, chunk_rows] = shard_pieces(qc, dc, ql, dl, sizes, topk, 9, form, chunk_rows)
    expected_counts, _, expected_sums = results["torch", "rows", None]
    assert all(not s.any() for s in (expected_counts[1], expected_sums[1]))  # the empty shard
    assert expected_sums[0][:, 0].sum() > 0 and expected_sums[2][:, 3].sum() > 0
    for key, (counts, _, sums) in results.items():
        for got, expected in zip(counts, expected_counts):
            assert got.dtype == torch.int64 and torch.equal(got, expected), key
        for got, expected in zip(sums, expected_sums):
            assert got.dtype == torch.float64 and torch.equal(got[:, 2:], expected[:, 2:]), key
            torch.testing.assert_close(got[:, :2], expected[:, :2], rtol=1e-12, atol=0, msg=str(key))


@pytest.mark.parametrize("form", ["rows", "patterns"])
def test_three_shards_give_the_whole_retrieval_row(backend, form):
    g = gen(16)
    qc, dc = codes(17, 8, g), codes(150, 8, g)
    ql, dl = multi_hot(17, 5, g), multi_hot(150, 5, g)
    for topk, precision_k in ((None, 20), (25, 6)):
        counts, total, sums = shard_pieces(qc, dc, ql, dl, [40, 70, 40], topk, precision_k, form, chunk_rows=4)
        row = M.sharded_retrieval_row(total, sum(sums), ql, 3, topk, precision_k)
        expected = M.retrieval_row(qc, dc, ql, dl, 3, topk, precision_k)
        assert row.keys() == expected.keys()
        for key, value in expected.items():
            assert row[key] == (pytest.approx(value, rel=1e-12, abs=0) if isinstance(value, float) else value), key


def test_shard_label_pattern_errors(backend):
    qc, dc, ql, dl = hand_case()
    patterns, ids = as_patterns(dl)
    total = M.shard_distance_counts(qc, dc, ql, dl)
    cases = [
        ("shard_labels pattern_ids", (patterns, ids + 1)),  # the last id is out of range
        ("shard_labels pattern_ids", (patterns, ids - 1)),
        ("shard_labels pattern_ids", (patterns, ids[:-1])),
        ("shard_labels pattern_ids", (patterns, ids.float())),
        ("shard_labels patterns", (patterns[:, :2], ids)),
        ("shard_labels patterns", (patterns.float() * 2, ids)),
        ("shard_labels", (patterns, ids, ids)),
    ]
    for name, labels in cases:
        with pytest.raises(ValueError, match=f"^{name}:"):
            M.shard_distance_counts(qc, dc, ql, labels)
        with pytest.raises(ValueError, match=f"^{name}:"):
            M.shard_rank_sums(qc, dc, ql, labels, total, total * 0, None, 2)
    with pytest.raises(ValueError, match="^db_labels:"):  # the one-process metrics take labels per row only
        M.average_precisions(qc, dc, ql, (patterns, ids))


def test_shard_metrics_on_cuda_match_cpu():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device on this machine")
    g = gen(17)
    qc, dc, ql, dl = codes(9, 10, g), codes(120, 10, g), multi_hot(9, 5, g), multi_hot(120, 5, g)
    patterns, ids = as_patterns(dl, torch.int32)
    for labels in (dl, (patterns, ids)):
        for device in ("cpu", "cuda"):
            on = lambda x: tuple(t.to(device) for t in x) if isinstance(x, tuple) else x.to(device)  # noqa: E731
            counts = M.shard_distance_counts(qc.to(device), dc.to(device), ql.to(device), on(labels))
            sums = M.shard_rank_sums(qc.to(device), dc.to(device), ql.to(device), on(labels), counts,
                                     torch.zeros_like(counts), 30, 10)
            assert counts.device.type == sums.device.type == device
            if device == "cpu":
                expected = counts, sums
        assert torch.equal(counts.cpu(), expected[0]) and torch.equal(sums.cpu()[:, 2:], expected[1][:, 2:])
        torch.testing.assert_close(sums.cpu()[:, :2], expected[1][:, :2], rtol=1e-12, atol=0)
