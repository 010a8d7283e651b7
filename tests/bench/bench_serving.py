"""Serving benchmark: top-100 Hamming retrieval at NUS-WIDE scale, our exact ranking against FAISS, one run.

Data (synthetic, seeded): 193,734 database codes x 48 bits and 2,100 queries with class structure as in
bench_core.py: 21 class prototypes, each code its class's prototype with 20% of its bits flipped (many equal
distances, as with trained codes). The database is ordered like a DIHN database grown over three rounds:
rows [0, 120,000) carry classes 0..14, the next 40,000 classes 15..17, the last 33,734 classes 18..20;
the queries are 100 per class.

What is timed (wall clock; every method runs with the same --threads, FAISS through OpenMP, ours on a thread
pool over chunks of queries as metrics.py does):
  exact, stable argsort   metrics' numpy back end (metrics._NumpyRanker: the codes packed into machine words
                          once, not timed), per chunk of queries popcount(query XOR code), then numpy's stable
                          argsort of each row cut to 100: the ranking the mAP rests on (ties by row)
  exact, partition        the same distances, then the 100 nearest by (distance, row) without sorting whole
                          rows: np.partition for the 100th distance, the rows below it plus the lowest rows at
                          it, sorted by distance (the same result, asserted)
  retrieve (torch)        retrieve.rank_database, what retrieve ranks with without --faiss: the int8 codes'
                          inner products (torch) and a stable argsort; single queries only
  FAISS flat / ivf / hnsw faiss_index.search: the index's search of the padded query rows, then the re-sort of its
                          100 by (distance, row); indexes built by faiss_index.build_index as the export builds them
  batch = all 2,100 queries in one call (median of --repeats); single = the first --single queries, one
  call each (retrieve's torch ranking: the first 20)
Build: faiss_index.build_index on all rows (IVF: k-means training included). Append: the whole export command
(python -m dihn_dist.export's export_index) over three synthetic run folders, round 1 fresh, then
--append-to twice: read the run, read the old index, check its rows against the new run's first rows, add
the new rows, write the index and its sidecar.
Size: the serialized index (faiss.serialize_index_binary), about what it holds in memory; for ours the
packed words.
Checks: FAISS flat equals the exact top 100 up to ties (equal distance lists; the same rows below the 100th
distance: asserted); recall@100 of ivf and hnsw counts a returned row as right when its distance is at most
the exact 100th distance (a row tied at the cut is as good as another); the flat index appended round by
round answers like a fresh index of the final codes (asserted the same way); ivf and hnsw appended: recall.

    python tests/bench/bench_serving.py [--threads 1] [--single 100] [--repeats 1] [--hnsw-rounds]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from benchkit import table

from dihn_dist.method import metrics as M
from dihn_dist.serving import export, faiss_index, retrieve

ROUNDS = (120_000, 160_000, 193_734)      # database rows after each round
ROUND_CLASSES = (15, 18, 21)              # classes present after each round
CODE_LENGTH, NUM_QUERY, TOPK, FLIP = 48, 2100, 100, 0.2
TORCH_SINGLE = 20                         # retrieve's torch ranking is slow per query: fewer calls


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=1,
                        help="threads for every method (default 1: on a shared machine OpenMP's spinning "
                             "threads make FAISS's timings erratic)")
    parser.add_argument("--single", type=int, default=100,
                        help="single-query calls timed per method (retrieve's torch ranking: at most 20)")
    parser.add_argument("--repeats", type=int, default=1, help="batch searches: median of this many")
    parser.add_argument("--hnsw-rounds", action="store_true", help="also grow an HNSW index over the rounds "
                                                                    "(another HNSW build, ~40 s on one core)")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args()


def timed(fn, repeats=1):
    """(result of the last call, median seconds)."""
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return result, statistics.median(times)


# ----------------------------------------------------------------------------------------------------
# Data

def make_codes(seed):
    """(database codes, query codes, database classes, query classes): int8 +-1, rounds ordered by class."""
    rng = np.random.default_rng(seed)
    prototypes = rng.integers(0, 2, (ROUND_CLASSES[-1], CODE_LENGTH))
    starts, lows = (0,) + ROUNDS[:-1], (0,) + ROUND_CLASSES[:-1]
    db_classes = np.concatenate([rng.integers(low, high, end - start)
                                 for start, end, low, high in zip(starts, ROUNDS, lows, ROUND_CLASSES)])
    query_classes = np.repeat(np.arange(ROUND_CLASSES[-1]), NUM_QUERY // ROUND_CLASSES[-1])

    def noisy(classes):
        bits = prototypes[classes] ^ (rng.random((classes.size, CODE_LENGTH)) < FLIP)
        return (bits * 2 - 1).astype(np.int8)

    return noisy(db_classes), noisy(query_classes), db_classes, query_classes


def write_round_run(root: Path, codes, num_original, classes, query_codes, query_classes) -> Path:
    """A run folder in the exported format holding what an export reads (stage incremental = all rows)."""
    root.mkdir(parents=True)
    one_hot = np.eye(ROUND_CLASSES[-1], dtype=np.uint8)
    (root / "format.json").write_text(json.dumps({"format": "dihn_dist.run", "format_version": 1}))
    (root / "config.json").write_text(json.dumps({"code_length": CODE_LENGTH, "arch": "alexnet"}))
    (root / "manifest.json").write_text(json.dumps({
        "format": "dihn_dist.prepared", "format_version": 2, "num_database": codes.shape[0],
        "num_query": query_codes.shape[0], "num_classes": ROUND_CLASSES[-1], "num_original": num_original,
        "num_seen": ROUND_CLASSES[0]}))
    np.save(root / "database_labels.npy", one_hot[classes])
    np.save(root / "query_labels.npy", one_hot[query_classes])
    stage = root / "incremental"
    stage.mkdir()
    np.save(stage / "database_codes.npy", codes)
    np.save(stage / "database_codes.packed.npy", np.packbits(codes > 0, axis=1))
    np.save(stage / "query_codes.npy", query_codes)
    (stage / "result.json").write_text("{}")
    return root


# ----------------------------------------------------------------------------------------------------
# Ours: exact top 100 by (distance, row)

def top_k_argsort(distances, k):
    return np.argsort(distances, axis=1, kind="stable")[:, :k]


def top_k_partition(distances, k):
    """The k nearest by (distance, row) of each row, without sorting whole rows."""
    kth = np.partition(distances, k - 1, axis=1)[:, k - 1:k]          # the k-th smallest distance
    below = distances < kth
    at = distances == kth
    need = k - np.count_nonzero(below, axis=1, keepdims=True)         # rows to take at the k-th distance
    chosen = below | (at & (np.cumsum(at, axis=1, dtype=np.int32) <= need))
    rows = np.nonzero(chosen)[1].reshape(-1, k)                       # ascending rows, k per query
    order = np.argsort(np.take_along_axis(distances, rows, axis=1), axis=1, kind="stable")
    return np.take_along_axis(rows, order, axis=1)


def exact_search(ranker, num_queries, k, select, threads):
    """(distances, rows) of the top k of every query, chunked like metrics' numpy back end."""
    chunks = list(M._chunks(num_queries, ranker.db_words.shape[0], None, M.NUMPY_CHUNK_ENTRIES))

    def work(rows):
        distances = ranker.distances(rows)
        top = select(distances, k)
        return np.take_along_axis(distances, top, axis=1), top

    with ThreadPoolExecutor(threads) as pool:
        parts = list(pool.map(work, chunks))
    return np.concatenate([d for d, _ in parts]).astype(np.int32), np.concatenate([r for _, r in parts])


def exact_single(ranker, count, k):
    for i in range(count):
        top_k_argsort(ranker.distances(slice(i, i + 1)), k)


# ----------------------------------------------------------------------------------------------------
# Checks

def assert_same_up_to_ties(distances, rows, expected_distances, expected_rows, what):
    assert np.array_equal(distances, expected_distances), f"{what}: other distances"
    for d, r, ed, er in zip(distances, rows, expected_distances, expected_rows):
        cut = ed[-1]
        assert set(r[d < cut]) == set(er[ed < cut]), f"{what}: other rows below the cut"


def recall_at_k(distances, exact_distances):
    """Returned rows within the exact k-th distance, over k (missing rows have distance 2**31 - 1)."""
    return float(np.mean(np.count_nonzero(distances <= exact_distances[:, -1:], axis=1) / distances.shape[1]))


def identical_share(rows, exact_rows):
    return float(np.mean((rows == exact_rows).all(axis=1)))


# ----------------------------------------------------------------------------------------------------
# FAISS

def index_size(index) -> int:
    faiss = faiss_index.require_faiss()
    return int(faiss.serialize_index_binary(index).nbytes)


def faiss_single(index, packed_queries, count, k):
    for i in range(count):
        faiss_index.search(index, packed_queries[i:i + 1], k)


def bench_index(kind, packed_db, packed_queries, exact, args):
    index, build_s = timed(lambda: faiss_index.build_index(packed_db, kind, CODE_LENGTH))
    (distances, rows), batch_s = timed(lambda: faiss_index.search(index, packed_queries, TOPK), args.repeats)
    _, single_s = timed(lambda: faiss_single(index, packed_queries, args.single, TOPK))
    result = dict(index=index, build_s=build_s, size=index_size(index), batch_qps=NUM_QUERY / batch_s,
                  single_qps=args.single / single_s, recall=recall_at_k(distances, exact[0]),
                  identical=identical_share(rows, exact[1]), settings=faiss_index.search_settings(index))
    if kind == "flat":
        assert_same_up_to_ties(distances, rows, *exact, "FAISS flat")
        index.use_heap = False  # FAISS's counting-sort k-NN instead of a heap per query (not stored in a file)
        (d2, r2), batch_s = timed(lambda: faiss_index.search(index, packed_queries, TOPK), args.repeats)
        result["no_heap_batch_qps"] = NUM_QUERY / batch_s
        assert_same_up_to_ties(d2, r2, *exact, "FAISS flat, use_heap False")
        _, single_s = timed(lambda: faiss_single(index, packed_queries, args.single, TOPK))
        result["no_heap_single_qps"] = args.single / single_s
        index.use_heap = True
    return result


def bench_rounds(kind, codes, query_codes, db_classes, query_classes, exact, fresh, folder):
    """Export round 1, append rounds 2 and 3 (each the whole export command, timed); compare with `fresh`."""
    times, previous = [], None
    starts = (0,) + ROUNDS[:-1]
    for number, (start, end) in enumerate(zip(starts, ROUNDS), start=1):
        run = folder / f"round{number}"
        if not run.exists():
            write_round_run(run, codes[:end], start or end, db_classes[:end], query_codes, query_classes)
        path = folder / f"{kind}{number}.index"
        _, seconds = timed(lambda: export.export_index(run, path, kind=kind if previous is None else None,
                                                       append_to=previous))
        times.append(seconds)
        previous = path
    served = faiss_index.load_index(previous)
    assert np.array_equal(served.codes, faiss_index.pack_codes(codes)), f"{kind}: appended codes differ"
    packed_queries = faiss_index.pack_codes(query_codes)
    distances, rows = faiss_index.search(served.index, packed_queries, TOPK)
    fresh_distances, fresh_rows = faiss_index.search(fresh, packed_queries, TOPK)
    if kind == "flat":
        assert_same_up_to_ties(distances, rows, fresh_distances, fresh_rows, "appended flat vs fresh flat")
        check = "same top-100 as the fresh index up to ties (asserted)"
    else:
        check = (f"recall@100 {recall_at_k(distances, exact[0]):.4f} (fresh index: "
                 f"{recall_at_k(fresh_distances, exact[0]):.4f})")
    return dict(times=times, check=check, settings=faiss_index.search_settings(served.index))


# ----------------------------------------------------------------------------------------------------
# Report

def settings_text(settings):
    return ", ".join(f"{k} {v}" for k, v in settings.items())


def main():
    args = parse_args()
    faiss = faiss_index.require_faiss()
    faiss.omp_set_num_threads(args.threads)
    torch.set_num_threads(args.threads)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"faiss {faiss.__version__}, numpy {np.__version__}, torch {torch.__version__}, {args.threads} thread(s) "
          f"for every method, {os.cpu_count()} CPUs, load average {load:.2f}", flush=True)
    started = time.perf_counter()
    codes, query_codes, db_classes, query_classes = make_codes(args.seed)
    packed_db, packed_queries = faiss_index.pack_codes(codes), faiss_index.pack_codes(query_codes)
    n = codes.shape[0]

    one = np.zeros((NUM_QUERY, 1), np.uint8)
    ranker, pack_s = timed(lambda: M._NumpyRanker(torch.from_numpy(query_codes), torch.from_numpy(codes),
                                                  torch.from_numpy(one), torch.from_numpy(one[:1].repeat(n, 0))))
    exact, argsort_s = timed(lambda: exact_search(ranker, NUM_QUERY, TOPK, top_k_argsort, args.threads), args.repeats)
    partitioned, partition_s = timed(lambda: exact_search(ranker, NUM_QUERY, TOPK, top_k_partition, args.threads),
                                     args.repeats)
    assert np.array_equal(partitioned[1], exact[1]) and np.array_equal(partitioned[0], exact[0])
    _, exact_single_s = timed(lambda: exact_single(ranker, args.single, TOPK))
    torch_single = min(args.single, TORCH_SINGLE)
    _, torch_single_s = timed(lambda: [retrieve.rank_database(query_codes[i], codes, TOPK)
                                       for i in range(torch_single)])
    check = retrieve.rank_database(query_codes[0], codes, TOPK)
    assert np.array_equal(check[0], exact[1][0]) and np.array_equal(check[1], exact[0][0])
    print(f"exact rankings done ({time.perf_counter() - started:.0f} s)", flush=True)

    results = {}
    for kind in faiss_index.INDEX_KINDS:
        results[kind] = bench_index(kind, packed_db, packed_queries, exact, args)
        print(f"{kind} done ({time.perf_counter() - started:.0f} s)", flush=True)

    rounds = {}
    with tempfile.TemporaryDirectory(prefix="bench_serving.") as folder:
        for kind in faiss_index.INDEX_KINDS if args.hnsw_rounds else ("flat", "ivf"):
            rounds[kind] = bench_rounds(kind, codes, query_codes, db_classes, query_classes, exact,
                                        results[kind]["index"], Path(folder))
            print(f"{kind} rounds done ({time.perf_counter() - started:.0f} s)", flush=True)

    qps = lambda seconds, count: f"{count / seconds:,.0f}"  # noqa: E731
    flat = results["flat"]
    rows = [
        ("exact: packed popcount + stable argsort (metrics)", f"{pack_s:.3f} s (packing)",
         f"{ranker.db_words.nbytes:,}", qps(argsort_s, NUM_QUERY), qps(exact_single_s, args.single), "reference"),
        ("exact: packed popcount + partition", "-", "-", qps(partition_s, NUM_QUERY), "-", "identical (asserted)"),
        ("exact: retrieve.rank_database (torch, int8 codes)", "-", f"{codes.nbytes:,}", "-",
         qps(torch_single_s, torch_single), "identical (asserted)"),
        ("FAISS IndexBinaryFlat", f"{flat['build_s']:.3f} s", f"{flat['size']:,}", f"{flat['batch_qps']:,.0f}",
         f"{flat['single_qps']:,.0f}", f"equal up to ties (asserted); identical incl. ties: {flat['identical']:.0%}"),
        ("FAISS IndexBinaryFlat, use_heap = False", "-", "-", f"{flat['no_heap_batch_qps']:,.0f}",
         f"{flat['no_heap_single_qps']:,.0f}", "equal up to ties (asserted)"),
    ]
    for kind in ("ivf", "hnsw"):
        r = results[kind]
        rows.append((f"FAISS {faiss_index.FAISS_CLASSES[kind]} ({settings_text(r['settings'])})", f"{r['build_s']:.2f} s",
                     f"{r['size']:,}", f"{r['batch_qps']:,.0f}", f"{r['single_qps']:,.0f}",
                     f"recall@100 {r['recall']:.4f}"))
    print()
    print(f"Top-{TOPK} of {NUM_QUERY:,} queries in {n:,} codes x {CODE_LENGTH} bits ({args.threads} thread(s)):")
    print(table(("method", "build", "size (bytes)", "batch queries/s", "single queries/s", "check"), rows))
    round_rows = [(f"{faiss_index.FAISS_CLASSES[kind]}", *(f"{t:.2f} s" for t in r["times"]), r["check"])
                  for kind, r in rounds.items()]
    print()
    print("Growing the index over three rounds (each cell: the whole export command):")
    print(table(("index", f"round 1: {ROUNDS[0]:,} rows (fresh)", f"+ {ROUNDS[1] - ROUNDS[0]:,} (append)",
                 f"+ {ROUNDS[2] - ROUNDS[1]:,} (append)", "appended index vs a fresh one of the final codes"),
                round_rows))
    print(f"\ntotal {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
