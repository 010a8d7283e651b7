"""One outer iteration's non-network work and one evaluation at ROWS database rows, tensors only (no images, no
network), under torchrun: either the rank-0 path (--shard-database off: every rank holds all n codes as
float32 and all n label rows; rank 0 solves DCC for every row and ranks the whole database) or the database
sharded by rows, which is the training loop's own distributed/sharded.py RowShard (each rank holds its rows'
codes bit-packed and their label-pattern ids as int32 into one shared pattern table, and works through them in
blocks). tests/bench/bench_scale.py --simulate ROWS runs both, compares them and prints the table.

    torchrun --nproc_per_node 2 tests/bench/scale_sim.py --path sharded|rank0 --rows N --work DIR --out RESULT.pt
        [--queries Q] [--block-rows B] [--seed S] [--device auto]

The data is random but seeded by (seed, block of DATA_BLOCK rows), so both paths and any number of ranks
see the same database: codes uniform +-1 (c = 48), labels with the synthetic NUS-WIDE tag distribution
(tests/bench/nus_synth.py: 21 tags, 1-3 a row, skewed), 2,100 queries (100 per tag, as the protocol draws
them), m = 2,000 sampled rows with random network outputs U. Every row is learned (stage 1: no frozen rows).

Phases, in the order the loop needs them: sample (the sample's labels and own codes: the sharded path
gathers them from the ranks that hold the rows), r, hash-term stats, gather U, DCC, broadcast (rank-0 path)
or exchange (sharded: the update's bit counts all-reduced; no code moves), checkpoint (packed codes,
atomic: rank 0 writes one file, or one file per rank through torch.distributed.checkpoint), evaluation
(mAP@5000, mAP@ALL, P@1000 over the queries, or over --queries of them, evenly spaced). Each phase records
its seconds, the duration of every collective call in it (bench_scale turns these into the wait: a rank's
time in a collective minus the fastest rank's), and the rank's peak RSS during the phase (VmHWM, reset
at the phase's start through /proc/self/clear_refs).

--block-rows sets RowShard's rows per block (its unpacked codes, label rows and float copies live for one
block), so the sharded path's memory beyond the packed state is bounded whatever the shard size.
"""
from __future__ import annotations

import argparse
import functools
import hashlib
import os
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Tuple

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO_ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
# comm.save_rank_tensors imports it when first called: 2-3 s that a training run pays once, not per checkpoint.
import torch.distributed.checkpoint  # noqa: E402,F401

import nus_synth  # noqa: E402
from dihn_dist.common.atomic import atomic_path  # noqa: E402
from dihn_dist.common.codes import pack_codes, packed_width  # noqa: E402
from dihn_dist.distributed import comm  # noqa: E402
from dihn_dist.distributed import sharded as S  # noqa: E402
from dihn_dist.method import dcc, hashing, metrics  # noqa: E402

CODE_LENGTH, NUM_SAMPLES, NUM_QUERIES, GAMMA = 48, 2000, 21 * nus_synth.FULL_QUERY_PER_TAG, 200.0
TOPK, PRECISION_K, NUM_SEEN = 5000, 1000, 18   # NUS-WIDE tc21: tags 18-20 are the incremental ones
# Rows per seeded block of synthetic data: a block is drawn whole, so every rank that holds part of it
# draws the same rows.
DATA_BLOCK = 1 << 20
PATHS = ("sharded", "rank0")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--path", choices=PATHS, required=True)
    parser.add_argument("--rows", type=int, required=True, help="database rows n")
    parser.add_argument("--work", type=Path, required=True, help="folder for the checkpoint")
    parser.add_argument("--out", type=Path, required=True, help="result file (torch.save, written by rank 0)")
    parser.add_argument("--queries", type=int, default=NUM_QUERIES, help="queries evaluated (evenly spaced)")
    parser.add_argument("--block-rows", type=int, default=DATA_BLOCK, help="rows per block (sharded path)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args(argv)
    for name in ("rows", "queries", "block_rows"):
        if getattr(args, name) < 1:
            bad_argument(f"--{name.replace('_', '-')}: expected a positive integer, got {getattr(args, name)}")
    if args.queries > NUM_QUERIES:
        bad_argument(f"--queries: expected at most {NUM_QUERIES}, got {args.queries}")
    return args


def bad_argument(message: str) -> None:
    print(f"scale_sim.py: {message}", file=sys.stderr)
    raise SystemExit(2)


# ----------------------------------------------------------------------------------------------------------
# The synthetic problem


def data_blocks(num_rows: int, start: int, end: int) -> Iterator[Tuple[int, int, int]]:
    """(block index, first row, end row) of the parts of [start, end) in each data block."""
    for block in range(start // DATA_BLOCK, -(-end // DATA_BLOCK)):
        yield block, max(start, block * DATA_BLOCK), min(end, (block + 1) * DATA_BLOCK)


@functools.lru_cache(maxsize=2)
def block_labels(seed: int, num_rows: int, block: int) -> np.ndarray:
    """uint8 labels (rows x 21) of one whole data block."""
    rows = min(DATA_BLOCK, num_rows - block * DATA_BLOCK)
    return nus_synth.draw_labels(np.random.default_rng([seed, 11, block]), rows)


@functools.lru_cache(maxsize=2)
def block_codes(seed: int, num_rows: int, block: int) -> np.ndarray:
    """int8 +-1 codes (rows x c) of one whole data block."""
    rows = min(DATA_BLOCK, num_rows - block * DATA_BLOCK)
    return np.random.default_rng([seed, 13, block]).integers(0, 2, (rows, CODE_LENGTH), dtype=np.int8) * 2 - 1


def data_rows(draw: Callable, seed: int, num_rows: int) -> Callable[[int, int], np.ndarray]:
    """rows(lo, hi) of the synthetic database (labels or codes), from the blocks they fall in."""
    def rows(lo: int, hi: int) -> np.ndarray:
        parts = [draw(seed, num_rows, block)[a - block * DATA_BLOCK:b - block * DATA_BLOCK]
                 for block, a, b in data_blocks(num_rows, lo, hi)]
        return np.concatenate(parts) if parts else draw(seed, num_rows, 0)[:0]
    return rows


def problem_draws(seed: int, num_rows: int, world_size: int) -> dict:
    """Queries, the sample and its outputs U: the same on every rank. U and the sample are in the order the
    ranks' shares are gathered (rank r trains on slots r::N; the loop gathers U in rank order)."""
    rng = np.random.default_rng([seed, 17])
    forced = np.repeat(np.arange(nus_synth.NUM_TAGS), nus_synth.FULL_QUERY_PER_TAG)
    query_labels = nus_synth.draw_labels(rng, NUM_QUERIES, forced)
    query_codes = rng.integers(0, 2, (NUM_QUERIES, CODE_LENGTH), dtype=np.int8) * 2 - 1
    m = min(NUM_SAMPLES, num_rows)
    rng = np.random.default_rng([seed, 19])
    sample = rng.choice(num_rows, m, replace=False).astype(np.int64)
    outputs = np.tanh(rng.standard_normal((m, CODE_LENGTH))).astype(np.float32)
    slots = [np.arange(rank, m, world_size) for rank in range(world_size)]
    return {"query_labels": torch.from_numpy(query_labels), "query_codes": torch.from_numpy(query_codes),
            "sample": torch.from_numpy(sample), "outputs": torch.from_numpy(outputs), "slots": slots,
            "order": torch.from_numpy(np.concatenate(slots))}


def query_subset(count: int) -> torch.Tensor:
    """`count` of the queries, evenly spaced (so every tag's block of queries is represented)."""
    return torch.from_numpy(np.arange(count, dtype=np.int64) * NUM_QUERIES // count)


# ----------------------------------------------------------------------------------------------------------
# Timing and memory per phase


def peak_rss() -> int:
    """This process's peak resident set (VmHWM) in bytes since the last reset_peak_rss."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def current_rss() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def reset_peak_rss() -> bool:
    """Start a new peak (Linux: writing 5 to clear_refs resets VmHWM to the current RSS)."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


class Clock:
    """Seconds, collective durations and peak RSS of each phase on this rank."""

    def __init__(self):
        self.phases: Dict[str, dict] = {}
        self.current: Optional[dict] = None
        self.peak_resets = True

    @contextmanager
    def phase(self, name: str):
        comm.synchronize()
        self.peak_resets = reset_peak_rss() and self.peak_resets
        self.current = {"collectives": []}
        started = time.perf_counter()
        yield self.current
        comm.synchronize()
        self.current["seconds"] = time.perf_counter() - started
        self.current["peak_rss"] = peak_rss()
        self.phases[name] = self.current
        self.current = None

    def collective(self, call: Callable):
        """call() (a collective, or a step every rank waits on), its duration recorded."""
        started = time.perf_counter()
        result = call()
        comm.synchronize()
        self.current["collectives"].append(time.perf_counter() - started)
        return result


def digest(packed: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(packed).tobytes()).hexdigest()


# ----------------------------------------------------------------------------------------------------------
# The sharded path


def sharded_path(args, draws: dict, clock: Clock) -> dict:
    """The training loop's sharded database itself (distributed/sharded.py RowShard), driven phase by phase."""
    ctx = comm.context()
    device, n = ctx.device, args.rows
    setup_started = time.perf_counter()
    shard = S.RowShard(n, 0, CODE_LENGTH, data_rows(block_labels, args.seed, n), data_rows(block_codes, args.seed, n),
                       block_rows=args.block_rows, device=device)
    block_labels.cache_clear()
    block_codes.cache_clear()
    state_bytes = shard.packed.numel() + shard.pattern_ids.numel() * 4 + shard.patterns.numel()
    setup = {"setup_s": time.perf_counter() - setup_started, "setup_peak_rss": peak_rss()}
    comm.barrier()

    sample = draws["sample"].to(device)
    with clock.phase("sample"):
        # The sample's own codes and pattern ids, from the ranks holding them (the loop reads the labels from
        # the prepared data; here they are the pattern table's rows).
        order, own_codes, sample_ids = clock.collective(lambda: shard.sample_rows(sample))
        sample_labels = shard.patterns[sample_ids].to(torch.float32)

    with clock.phase("r"):
        r = shard.similarity_offset(sample_labels)

    with clock.phase("hash-term stats"):
        stats = clock.collective(lambda: shard.hash_term_stats(r))

    with clock.phase("gather U"):
        mine = torch.from_numpy(draws["slots"][ctx.rank]).to(device)
        U = clock.collective(lambda: comm.gather_rows(draws["outputs"].to(device)[mine]))
        sample_rows = clock.collective(lambda: comm.gather_rows(sample[mine]))

    with clock.phase("dcc"):
        labels_of_sample = shard.patterns[sample_ids[torch.searchsorted(order, sample_rows)]].to(torch.float32)
        changed = shard.update_codes(U, labels_of_sample, sample_rows, GAMMA, r)

    with clock.phase("exchange"):
        totals = clock.collective(lambda: comm.all_reduce_sum(changed))
        update = {"bits_changed": float(totals[0]) / (n * CODE_LENGTH),
                  "bit_imbalance": float((totals[1:].double() / n).abs().mean())}

    folder = args.work / "sharded-codes-iteration1"
    start, end = shard.first_row, shard.end_row
    with clock.phase("checkpoint"):
        clock.collective(lambda: comm.save_rank_tensors({f"rows_{start}_{end}": shard.packed}, folder))
    checkpoint_bytes = sum(f.stat().st_size for f in folder.iterdir()) if ctx.is_main else None

    subset = query_subset(args.queries).to(device)
    query_codes = draws["query_codes"].to(device)[subset]
    query_labels = draws["query_labels"].to(device)[subset].to(torch.float32)
    with clock.phase("evaluation"):
        row = clock.collective(lambda: shard.retrieval_row(query_codes, query_labels, NUM_SEEN, TOPK, PRECISION_K))

    return {"r": r, "stats": stats, "row": row, "update": update, "digest": digest(shard.packed.cpu().numpy()),
            "rows_held": (start, end), "state_bytes": state_bytes, "patterns": int(shard.patterns.shape[0]),
            "sample_codes_sum": int(own_codes.to(torch.int64).sum()), "checkpoint_bytes": checkpoint_bytes,
            "checkpoint": str(folder), **setup}


# ----------------------------------------------------------------------------------------------------------
# The rank-0 path (training/loop.py today)


def rank0_path(args, draws: dict, clock: Clock) -> dict:
    ctx = comm.context()
    device, n = ctx.device, args.rows
    setup_started = time.perf_counter()
    codes = torch.empty(n, CODE_LENGTH, dtype=torch.float32, device=device)
    labels = torch.empty(n, nus_synth.NUM_TAGS, dtype=torch.float32, device=device)
    labels_of, codes_of = data_rows(block_labels, args.seed, n), data_rows(block_codes, args.seed, n)
    for _, lo, hi in data_blocks(n, 0, n):
        labels[lo:hi] = torch.from_numpy(labels_of(lo, hi)).to(device)
        codes[lo:hi] = torch.from_numpy(codes_of(lo, hi)).to(device)
    patterns, pattern_of_row = hashing.label_patterns(labels)
    learned_patterns = hashing.label_patterns(labels)   # labels[num_frozen:], num_frozen = 0
    state_bytes = sum(t.numel() * t.element_size()
                      for t in (codes, labels, patterns, pattern_of_row, *learned_patterns))
    setup = {"setup_s": time.perf_counter() - setup_started, "setup_peak_rss": peak_rss()}
    comm.barrier()

    sample, order = draws["sample"].to(device), draws["order"].to(device)
    sample_u = sample[order]

    with clock.phase("sample"):
        sample_labels = labels[sample_u]
        own_codes = codes[sample_u]

    with clock.phase("r"):
        r = hashing.soft_similarity_offset(sample_labels, labels, db_patterns=(patterns, pattern_of_row))

    with clock.phase("hash-term stats"):
        stats = hashing.hash_term_stats(codes, patterns, pattern_of_row, r)

    with clock.phase("gather U"):
        mine = torch.from_numpy(draws["slots"][ctx.rank]).to(device)
        U = clock.collective(lambda: comm.gather_rows(draws["outputs"].to(device)[mine]))
        positions = clock.collective(lambda: comm.gather_rows(sample[mine]))

    with clock.phase("dcc"):
        solved = (dcc.solve_dcc(codes, U, labels[positions], labels, positions, GAMMA, r,
                                db_patterns=learned_patterns) if ctx.is_main else None)

    with clock.phase("broadcast"):
        learned, sent = clock.collective(lambda: comm.broadcast_codes(solved, n, CODE_LENGTH))
        learned = learned.to(codes.dtype)
        update = {"bits_changed": (learned != codes).float().mean().item(),
                  "bit_imbalance": learned.double().mean(dim=0).abs().mean().item(), "broadcast_bytes": sent}
        codes[:] = learned
        del learned, solved

    path = args.work / "rank0-codes-iteration1.npy"
    with clock.phase("checkpoint"):
        if ctx.is_main:
            with atomic_path(path) as temp:
                with open(temp, "wb") as handle:
                    np.save(handle, pack_codes(codes.to(torch.int8)).cpu().numpy())
        clock.collective(comm.barrier)
    checkpoint_bytes = path.stat().st_size if ctx.is_main else None

    subset = query_subset(args.queries).to(device)
    query_codes = draws["query_codes"].to(device)[subset]
    query_labels = draws["query_labels"].to(device)[subset].to(torch.float32)
    with clock.phase("evaluation"):
        row = (metrics.retrieval_row(query_codes, codes.to(torch.int8), query_labels, labels, NUM_SEEN, TOPK,
                                     PRECISION_K) if ctx.is_main else None)
        row = clock.collective(lambda: comm.broadcast_object(row))

    digests = None
    if ctx.is_main:
        packed = pack_codes(codes.to(torch.int8)).cpu().numpy()
        digests = [digest(packed[slice(*S.shard_bounds(n, ctx.world_size, rank))]) for rank in range(ctx.world_size)]
    return {"r": r, "stats": stats, "row": row, "update": update, "digests": digests, "rows_held": (0, n),
            "state_bytes": state_bytes, "patterns": int(patterns.shape[0]),
            "sample_codes_sum": int(own_codes.to(torch.int64).sum()), "checkpoint_bytes": checkpoint_bytes,
            "checkpoint": str(path), **setup}


# ----------------------------------------------------------------------------------------------------------
# Reading the results back (bench_scale.py --simulate): summaries, the two paths compared, the table

GIB = 2 ** 30
ITERATION_PHASES = ("sample", "r", "hash-term stats", "gather U", "dcc", "broadcast", "exchange", "checkpoint")
METRIC_KEYS = ("map_all", "map_topk", f"precision_at_{PRECISION_K}", "map_original_queries", "map_incremental_queries")
WAIT_GOAL, RANK_PEAK_GOAL, TOTAL_GOAL = 0.10, 12 * GIB, 24 * GIB


def summarize(result: dict) -> dict:
    """Per phase: seconds of the slowest rank, the longest wait (per collective call, a rank's time in it
    minus the fastest rank's, summed over the phase's calls) and each rank's peak RSS. The evaluation of a
    query subset is scaled to all 2,100 queries (its cost is linear in the queries), marked extrapolated."""
    ranks = result["ranks"]
    scale = NUM_QUERIES / result["queries"]
    phases = []
    for name in ranks[0]["phases"]:
        per_rank = [entry["phases"][name] for entry in ranks]
        calls = list(zip(*[p["collectives"] for p in per_rank]))
        waits = [sum(p["collectives"][k] - min(call) for k, call in enumerate(calls)) for p in per_rank]
        factor = scale if name == "evaluation" else 1.0
        phases.append({"phase": name, "seconds": max(p["seconds"] for p in per_rank) * factor,
                       "measured_s": max(p["seconds"] for p in per_rank), "wait_s": max(waits) * factor,
                       "waiting_rank": int(np.argmax(waits)), "peak_rss": [p["peak_rss"] for p in per_rank],
                       "extrapolated": factor != 1.0})
    iteration = max(sum(entry["phases"][name]["seconds"] for name in ITERATION_PHASES if name in entry["phases"])
                    for entry in ranks)
    evaluation = next(p["seconds"] for p in phases if p["phase"] == "evaluation")
    for p in phases:
        p["wait_share"] = p["wait_s"] / (iteration + evaluation)
    peaks = [max([entry["setup_peak_rss"], entry["peak_rss"]] + [p["peak_rss"] for p in entry["phases"].values()])
             for entry in ranks]
    n, world = result["rows"], result["world_size"]
    return {
        "path": result["path"], "rows": n, "world_size": world, "queries": result["queries"],
        "block_rows": result["block_rows"], "device": result["device"], "cpus": result["cpus"],
        "threads": [entry["threads"] for entry in ranks], "patterns": result["patterns"],
        "iteration_s": iteration, "evaluation_s": evaluation, "phases": phases, "peak_rss": peaks,
        "baseline_rss": [entry["baseline_rss"] for entry in ranks], "setup_s": [entry["setup_s"] for entry in ranks],
        "state_bytes": [entry["state_bytes"] for entry in ranks], "rows_held": [entry["rows_held"] for entry in ranks],
        "state_formula_bytes": state_formula(result["path"], n, world, result["patterns"]),
        "checkpoint_bytes": result["checkpoint_bytes"], "update": result["update"], "row": result["row"],
        "loadavg_start": list(result["loadavg_start"]), "loadavg_end": list(result["loadavg_end"]),
        "goals": {"max_wait_share": max(p["wait_share"] for p in phases), "max_rank_peak": max(peaks),
                  "all_ranks_peak": sum(peaks)}}


def state_formula(path: str, rows: int, world_size: int, patterns: int) -> int:
    """Bytes a rank holds by design: sharded, its ceil(n/N) rows x (c/8 packed + 4 for the int32 pattern id)
    plus the shared table (P x L bool); rank-0 path, all n rows x (4c float32 codes + 4L float32 labels + 8 + 8
    for the two int64 pattern ids of the loop's label_patterns and learned_patterns) plus two tables."""
    if path == "sharded":
        return -(-rows // world_size) * (packed_width(CODE_LENGTH) + 4) + patterns * nus_synth.NUM_TAGS
    return rows * (4 * CODE_LENGTH + 4 * nus_synth.NUM_TAGS + 16) + 2 * patterns * nus_synth.NUM_TAGS


def compare(sharded: dict, rank0: dict, tolerance: float = 1e-9) -> dict:
    """Do the two paths agree: codes bit for bit (per shard, sha256 of the packed rows), r, the hash-term
    statistics and the sample's own codes exactly, every metric of the row within `tolerance`."""
    differences = [abs(sharded["row"][k] - rank0["row"][k]) for k in METRIC_KEYS
                   if sharded["row"][k] is not None and rank0["row"][k] is not None]
    found = {"codes_equal": sharded["digests"] == rank0["digests"], "r_equal": sharded["r"] == rank0["r"],
             "stats_equal": all(torch.equal(sharded[k], rank0[k]) for k in ("gram", "targets", "target_norms")),
             "sample_codes_equal": sharded["sample_codes_sum"] == rank0["sample_codes_sum"],
             "same_metric_keys": all((sharded["row"][k] is None) == (rank0["row"][k] is None) for k in METRIC_KEYS),
             "max_metric_difference": max(differences) if differences else 0.0, "tolerance": tolerance,
             "same_queries": sharded["queries"] == rank0["queries"]}
    found["agree"] = (found["codes_equal"] and found["r_equal"] and found["stats_equal"] and found["same_queries"]
                      and found["sample_codes_equal"] and found["same_metric_keys"]
                      and found["max_metric_difference"] <= tolerance)
    return found


TABLE_HEADER = ("path", "phase", "seconds", "longest wait s (share)", "peak RSS per rank")


def table_rows(summary: dict) -> List[tuple]:
    """One row per phase, then the totals, memory and state of one path."""
    path, gib = summary["path"], lambda v: f"{v / GIB:.2f}"
    rows = []
    for p in summary["phases"]:
        note = (f" (x{NUM_QUERIES / summary['queries']:.0f}: {p['measured_s']:.1f} s for {summary['queries']:,} "
                f"queries)" if p["extrapolated"] else "")
        rows.append((path, p["phase"], f"{p['seconds']:.2f}{note}",
                     f"{p['wait_s']:.2f} ({p['wait_share']:.1%}, rank {p['waiting_rank']})",
                     " / ".join(gib(v) for v in p["peak_rss"]) + " GiB"))
    rows.append((path, "iteration (sample .. checkpoint)", f"{summary['iteration_s']:.2f}", "", ""))
    goals = summary["goals"]
    rows.append((path, "peak RSS per rank (whole run)", "", f"max wait share {goals['max_wait_share']:.1%}",
                 " / ".join(gib(v) for v in summary["peak_rss"]) + f" GiB (sum {gib(goals['all_ranks_peak'])}; "
                 f"after start-up {' / '.join(gib(v) for v in summary['baseline_rss'])})"))
    rows.append((path, "state per rank (bytes)", "", f"by design {summary['state_formula_bytes']:,}",
                 " / ".join(f"{v:,}" for v in summary["state_bytes"])))
    rows.append((path, "setup (draw the data, pattern table) s", " / ".join(f"{v:.1f}" for v in summary["setup_s"]),
                 "", ""))
    return rows


def agreement_row(found: dict) -> tuple:
    verdict = "AGREE" if found["agree"] else "DISAGREE"
    return ("both", "sharded vs rank-0 path", verdict,
            f"codes {'bit-identical' if found['codes_equal'] else 'DIFFER'}; r, stats "
            f"{'equal' if found['r_equal'] and found['stats_equal'] else 'DIFFER'}",
            f"max metric difference {found['max_metric_difference']:.1e} (tolerance {found['tolerance']:.0e})")


# ----------------------------------------------------------------------------------------------------------


def main(argv=None) -> int:
    args = parse_args(argv)
    load_start = os.getloadavg()
    ctx = comm.init(args.device)
    baseline_rss = current_rss()   # interpreter, torch and the process group: the constant of every path
    try:
        if ctx.is_main:
            args.work.mkdir(parents=True, exist_ok=True)
        comm.barrier()
        draws = problem_draws(args.seed, args.rows, ctx.world_size)
        clock = Clock()
        result = (sharded_path if args.path == "sharded" else rank0_path)(args, draws, clock)
        stats = result.pop("stats")
        per_rank = comm.gather_objects({
            "rank": ctx.rank, "phases": clock.phases, "state_bytes": result.pop("state_bytes"),
            "rows_held": result.pop("rows_held"), "setup_s": result.pop("setup_s"),
            "setup_peak_rss": result.pop("setup_peak_rss"), "peak_rss": peak_rss(),
            "peak_resets": clock.peak_resets, "digest": result.pop("digest", None), "baseline_rss": baseline_rss,
            "threads": torch.get_num_threads()})
        if ctx.is_main:
            result.update({
                "path": args.path, "rows": args.rows, "world_size": ctx.world_size, "device": str(ctx.device),
                "queries": args.queries, "block_rows": args.block_rows, "seed": args.seed,
                "gram": stats.gram.cpu(), "targets": stats.targets.cpu(), "target_norms": stats.target_norms.cpu(),
                "ranks": per_rank, "loadavg_start": load_start, "loadavg_end": os.getloadavg(),
                "cpus": os.cpu_count()})
            if result.get("digests") is None:
                result["digests"] = [entry["digest"] for entry in per_rank]
            args.out.parent.mkdir(parents=True, exist_ok=True)
            with atomic_path(args.out) as temp:
                torch.save(result, temp)
        comm.barrier()
    finally:
        comm.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
