"""NUS-WIDE tc21 at full size on this machine: data, preparation, two outer iterations under torchrun, the hash
term and rank 0's solo work, measured and printed as one table.

    bash launch/bench_scale.sh --work /scratch/dihn-scale            # full size: 193,734 + 2,100 images
    bash launch/bench_scale.sh --work /scratch/dihn-scale --small    # 2,000 + 210: checks everything end to end

--small also shrinks the sizes of phases 4 and 5 tenfold (200,000 rows; n = 6,000, 19,373, 200,000).

Phases, in order; each can be skipped, and each records what it measured in WORK/bench_scale-<size>.json, so
a rerun that skips a phase still prints that phase's figures:

1. generate   a synthetic NUS-WIDE tc21 in the real file layout (tests/bench/nus_synth.py) into
              WORK/source-<size>; resumable, skipped when complete.
2. prepare    python -m dihn_dist.prepare --dataset nus-wide-tc21 into WORK/prepared-<size>; skipped when
              the folder is a complete preparation.
3. train      torchrun --nproc_per_node 2 -m dihn_dist.train (48 bits, mAP@5000, 2,000 samples, --eval-every 1,
              --max-epoch 1, small-cnn at 64 px: what 2 CPU cores can run) into WORK/runs/<size>, with --resume,
              so an interrupted run continues. Each worker's peak resident set is read from /proc/<pid>/status
              (VmHWM, the kernel's own peak, plus RssAnon/RssFile) every POLL_S seconds while it runs.
4. solo       rank 0's work while every other rank waits in a collective (bounded by --collective-timeout,
              default 1,800 s): DCC (recorded by the trainer), mAP@5000 and the whole evaluation row on the
              exported codes, and a checkpoint write, timed here with rank 0's thread count; then the same at
              2,000,000 rows on random tensors.
5. hash-term  one training step's hash term, dense (b x n similarity, the trainer's former form) against
              factorized (the trainer's form) at n = 60,000, 193,734 and 2,000,000, b = 64, c = 48, labels
              with the synthetic dataset's tag distribution; plus hash_term_stats, r and label_patterns.
              Each n runs in a fresh process, so its peak memory growth is its own.

--simulate ROWS runs none of these but a simulated scale run at ROWS database rows (tensors only: random
codes, synthetic NUS-WIDE-like labels, 2,100 queries, m = 2,000): one outer iteration's non-network work and
one evaluation under torchrun, for the database sharded by rows and for the rank-0 path the loop takes today,
the two compared (codes bit for bit, metrics to 1e-9), per phase the seconds, the longest wait and each
rank's peak RSS (tests/bench/scale_sim.py). Results in WORK/simulate-ROWS/.

    bash launch/bench_scale.sh --work /scratch/dihn-scale --simulate 2000000
    bash launch/bench_scale.sh --work /scratch/dihn-scale --simulate 100000000 --simulate-paths sharded \
        --simulate-queries 21

The trainer records eval_s (query encoding + rank 0's metrics) but not its parts: phase 4 times both parts
on the run's exported model and codes instead (rank 0's shard of the queries; the whole evaluation row).
"""
from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[2]
# This checkout's dihn_dist, also when the virtual environment has another checkout installed.
sys.path.insert(0, str(REPO_ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: the dense oracles

import nus_synth  # noqa: E402
import oracles  # noqa: E402
from benchkit import table  # noqa: E402
from nus_synth import FULL_DATABASE, FULL_QUERY_PER_TAG  # noqa: E402

from dihn_dist.method import dcc  # noqa: E402

POLL_S = 0.5
GIB = 2 ** 30
HASH_SIZES = (60_000, 193_734, 2_000_000)
COLLECTIVE_TIMEOUT_S = 1800.0   # dihn_dist.training.config.Config.collective_timeout
# --small shrinks every size tenfold or more, so that it checks each phase end to end in minutes.
SMALL = {"database": 2_000, "query_per_tag": 10, "num_samples": 500, "hash_sizes": "6000,19373,200000",
         "solo_rows": 200_000}
FULL = {"database": FULL_DATABASE, "query_per_tag": FULL_QUERY_PER_TAG, "num_samples": 2000,
        "hash_sizes": ",".join(map(str, HASH_SIZES)), "solo_rows": 2_000_000}


def log(message: str) -> None:
    print(f"[bench_scale {time.strftime('%H:%M:%S')}] {message}", flush=True)


# ----------------------------------------------------------------------------------------------------------
# Command line and folders


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--work", type=Path, required=True, help="folder for data, runs and results (outside the "
                                                                 "repository: the full size takes ~5 GB)")
    parser.add_argument("--small", action="store_true", help="2,000 database + 210 query images, 500 samples")
    parser.add_argument("--database", type=int, help="database images (default 193,734; --small 2,000)")
    parser.add_argument("--query-per-tag", type=int, help="queries per tag (default 100; --small 10)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=2, help="processes for generate and prepare")
    for phase in ("generate", "prepare", "train", "solo", "hash-term"):
        parser.add_argument(f"--skip-{phase}", action="store_true")
    parser.add_argument("--only-hash-term", action="store_true", help="run the hash-term phase alone")
    parser.add_argument("--fresh-run", action="store_true", help="delete the run folder first (default: --resume)")
    parser.add_argument("--nproc", type=int, default=2, help="torchrun processes")
    parser.add_argument("--stages", default="original,incremental", help="trainer stages")
    parser.add_argument("--iterations", type=int, default=2, help="outer iterations per stage")
    parser.add_argument("--num-samples", type=int, help="samples per outer iteration (default 2,000; --small 500)")
    parser.add_argument("--arch", default="small-cnn")
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=64, help="global batch")
    parser.add_argument("--hash-sizes", help="database sizes n of the hash-term phase (default 60000,193734,2000000)")
    parser.add_argument("--solo-rows", type=int, help="rows of the synthetic solo measurement (default 2,000,000)")
    parser.add_argument("--hash-batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dense-limit-gib", type=float, default=8.0,
                        help="skip the dense hash term where its estimated peak exceeds this (or half the free memory)")
    parser.add_argument("--simulate", type=int, metavar="ROWS",
                        help="only the simulated scale run at ROWS database rows (tests/bench/scale_sim.py)")
    parser.add_argument("--simulate-paths", default="sharded,rank0",
                        help="paths of --simulate, comma-separated: sharded, rank0 (default both)")
    parser.add_argument("--simulate-queries", type=int, default=2100,
                        help="queries --simulate evaluates, evenly spaced (its evaluation is scaled to 2,100)")
    parser.add_argument("--simulate-block-rows", type=int, default=1 << 20,
                        help="rows the sharded path works on at a time")
    args = parser.parse_args(argv)
    check_simulate_args(args)
    if args.only_hash_term:
        args.skip_generate = args.skip_prepare = args.skip_train = args.skip_solo = True
    defaults = SMALL if args.small else FULL
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    check_outside_repository(args.work)
    return args


def bad_argument(message: str) -> None:
    print(f"bench_scale.py: {message}", file=sys.stderr)
    raise SystemExit(2)


def check_simulate_args(args) -> None:
    if args.simulate is None:
        return
    if args.simulate < 1:
        bad_argument(f"--simulate: expected a positive number of database rows, got {args.simulate}")
    paths = args.simulate_paths.split(",")
    if not paths or any(path not in ("sharded", "rank0") for path in paths) or len(set(paths)) != len(paths):
        bad_argument(f"--simulate-paths: expected sharded, rank0 or both (comma-separated), "
                     f"got {args.simulate_paths!r}")
    if not 1 <= args.simulate_queries <= 2100:
        bad_argument(f"--simulate-queries: expected 1 to 2100 queries, got {args.simulate_queries}")
    if args.simulate_block_rows < 1:
        bad_argument(f"--simulate-block-rows: expected a positive number of rows, got {args.simulate_block_rows}")


def check_outside_repository(work: Path) -> None:
    """Generated data never goes into the checkout (gigabytes that git would list)."""
    work = work.resolve()
    if work == REPO_ROOT or REPO_ROOT in work.parents:
        raise SystemExit(f"--work {work} is inside the repository {REPO_ROOT}: choose a folder outside it")


@dataclass
class Paths:
    work: Path
    size: str

    @property
    def source(self) -> Path:
        return self.work / f"source-{self.size}"

    @property
    def prepared(self) -> Path:
        return self.work / f"prepared-{self.size}"

    @property
    def run(self) -> Path:
        return self.work / "runs" / self.size

    @property
    def logs(self) -> Path:
        return self.work / "logs"

    @property
    def state(self) -> Path:
        return self.work / f"bench_scale-{self.size}.json"


def size_name(args) -> str:
    if args.small and args.database == SMALL["database"]:
        return "small"
    if args.database == FULL_DATABASE and args.query_per_tag == FULL_QUERY_PER_TAG:
        return "full"
    return f"db{args.database}-q{args.query_per_tag}"


class State(dict):
    """Measurements by phase, saved after every phase (atomically) so that later runs can skip it."""

    def __init__(self, path: Path):
        super().__init__(json.loads(path.read_text()) if path.is_file() else {})
        self.path = path

    def record(self, phase: str, values: dict) -> None:
        self[phase] = {**values, "recorded_at": time.time()}
        temporary = self.path.with_suffix(".tmp")
        temporary.write_text(json.dumps(self, indent=1) + "\n")
        os.replace(temporary, self.path)


def child_env() -> Dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT)] + [p for p in [env.get("PYTHONPATH")] if p])
    return env


def disk_usage(path: Path) -> Dict[str, int]:
    """{"apparent": sum of file sizes, "allocated": blocks on disk, "files": count} (du, which is fast)."""
    def du(*flags) -> int:
        return int(subprocess.run(["du", "-s", *flags, str(path)], check=True, capture_output=True,
                                  text=True).stdout.split()[0])
    files = sum(len(names) for _, _, names in os.walk(path))
    return {"apparent": du("-b"), "allocated": du("-B1"), "files": files}


def timed(fn: Callable, repeats: int = 1):
    """(result of the last call, median seconds)."""
    times, result = [], None
    for _ in range(repeats):
        started = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - started)
    return result, statistics.median(times)


# ----------------------------------------------------------------------------------------------------------
# 1. generate


def run_generate(args, paths: Paths, state: State) -> None:
    complete_before = nus_synth.read_marker(paths.source) is not None
    marker = nus_synth.generate(paths.source, args.database, args.query_per_tag, args.seed, args.workers,
                                log=lambda m: log(m))
    if complete_before and "generate" in state:
        return   # keep the measurements of the run that generated it
    previous = state.get("generate", {})
    images_per_s = marker["images_per_s"] if marker["images_written"] == marker["images"] else None
    state.record("generate", {
        "images": marker["images"], "seconds": marker["seconds"], "workers": marker["workers"],
        # a resumed generation timed only part of the images: keep the complete run's rate when there was one
        "images_per_s": images_per_s or previous.get("images_per_s") or marker["images_per_s"],
        "resumed": marker["images_written"] != marker["images"], "jpeg_bytes": marker["jpeg_bytes"],
        "disk": disk_usage(paths.source), "tags": marker["tags"]})


# ----------------------------------------------------------------------------------------------------------
# 2. prepare

PREPARE_WRITE = re.compile(r"(query|database)\.beton: ([\d,]+) images in ([\d.]+) s")
PREPARE_READ_BACK = re.compile(r"(query|database)\.beton: ([\d,]+) items read back and digested in ([\d.]+) s")


def prepare_breakdown(text: str) -> Dict[str, float]:
    """Seconds of each beton's write and read-back, from prepare's log lines."""
    found = {}
    for pattern, kind in ((PREPARE_WRITE, "write"), (PREPARE_READ_BACK, "read_back")):
        for part, _, seconds in pattern.findall(text):
            found[f"{part}_{kind}_s"] = float(seconds)
    return found


def run_prepare(args, paths: Paths, state: State) -> None:
    if (paths.prepared / "manifest.json").is_file():
        if "prepare" not in state:   # prepared by an earlier command: its size is known, its time is not
            state.record("prepare", {"seconds": None, **prepared_summary(paths.prepared)})
        log(f"prepare: {paths.prepared} is complete, skipped")
        return
    command = [sys.executable, "-m", "dihn_dist.prepare", "--dataset", "nus-wide-tc21", "--root", str(paths.source),
               "--out", str(paths.prepared), "--num-workers", str(args.workers)]
    log("prepare: " + " ".join(command))
    paths.logs.mkdir(parents=True, exist_ok=True)
    log_file = paths.logs / f"prepare-{paths.size}.log"
    started = time.perf_counter()
    with open(log_file, "w") as output:
        subprocess.run(command, check=True, env=child_env(), stdout=output, stderr=subprocess.STDOUT)
    seconds = time.perf_counter() - started
    summary = prepared_summary(paths.prepared)
    state.record("prepare", {"command": command, "seconds": seconds, "images_per_s": summary["images"] / seconds,
                             "breakdown": prepare_breakdown(log_file.read_text()), **summary})


def prepared_summary(prepared: Path) -> dict:
    manifest = json.loads((prepared / "manifest.json").read_text())
    return {"images": manifest["num_database"] + manifest["num_query"], "num_original": manifest["num_original"],
            "num_database": manifest["num_database"], "num_query": manifest["num_query"],
            "disk": disk_usage(prepared), "betons": beton_sizes(prepared)}


def beton_sizes(prepared: Path) -> Dict[str, int]:
    return {path.name: path.stat().st_size for path in sorted(prepared.glob("*.beton"))}


# ----------------------------------------------------------------------------------------------------------
# 3. train, with the workers' memory polled from /proc


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train_command(args, paths: Paths, num_samples: int) -> List[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(args.nproc),
            "--master_port", str(free_port()), "-m", "dihn_dist.train",
            "--data", str(paths.prepared), "--out", str(paths.run), "--stage", args.stages,
            "--code-length", "48", "--topk", "5000", "--num-samples", str(num_samples),
            "--max-iter", str(args.iterations), "--max-epoch", "1", "--eval-every", "1",
            "--arch", args.arch, "--resolution", str(args.resolution), "--batch-size", str(args.batch_size),
            "--lr", "1e-3", "--device", "cpu", "--seed", str(args.seed), "--resume"]


def proc_status(pid: int) -> Dict[str, int]:
    """VmHWM, VmRSS, RssAnon, RssFile of a process in bytes ({} once it has exited)."""
    wanted = ("VmHWM", "VmRSS", "RssAnon", "RssFile")
    try:
        with open(f"/proc/{pid}/status") as status:
            return {key: int(rest.split()[0]) * 1024 for key, _, rest in (line.partition(":") for line in status)
                    if key in wanted}
    except (FileNotFoundError, ProcessLookupError):
        return {}


def worker_rank(pid: int) -> Optional[int]:
    """RANK from a process's environment: torchrun's workers have it, the agent does not."""
    try:
        environment = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except (FileNotFoundError, PermissionError, ProcessLookupError):
        return None
    for entry in environment:
        if entry.startswith(b"RANK="):
            return int(entry[5:])
    return None


def descendants(pid: int) -> List[int]:
    import psutil
    try:
        return [child.pid for child in psutil.Process(pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


class MemoryPoller:
    """Per rank: the peak of VmHWM (the kernel's exact peak RSS, so a peak between two polls still counts),
    the peaks of RssAnon and RssFile (polled), and a time series of (wall time, VmRSS, RssAnon)."""

    def __init__(self):
        self.ranks: Dict[int, dict] = {}
        self.pids: Dict[int, int] = {}

    def poll(self, agent_pid: int) -> None:
        for pid in descendants(agent_pid):
            if pid not in self.pids:
                rank = worker_rank(pid)
                if rank is None:
                    continue
                self.pids[pid] = rank
            status = proc_status(pid)
            if not status:
                continue
            entry = self.ranks.setdefault(self.pids[pid], {"peak_hwm": 0, "peak_anon": 0, "peak_file": 0,
                                                           "samples": []})
            entry["peak_hwm"] = max(entry["peak_hwm"], status.get("VmHWM", 0))
            entry["peak_anon"] = max(entry["peak_anon"], status.get("RssAnon", 0))
            entry["peak_file"] = max(entry["peak_file"], status.get("RssFile", 0))
            entry["samples"].append((time.time(), status.get("VmRSS", 0), status.get("RssAnon", 0)))


def run_workers(command: List[str], log_file: Path) -> dict:
    poller = MemoryPoller()
    started, started_at = time.perf_counter(), time.time()
    with open(log_file, "a") as output:
        process = subprocess.Popen(command, env=child_env(), stdout=output, stderr=subprocess.STDOUT)
        while process.poll() is None:
            poller.poll(process.pid)
            time.sleep(POLL_S)
    seconds = time.perf_counter() - started
    if process.returncode != 0:
        raise RuntimeError(f"torchrun exited with {process.returncode}; see {log_file}")
    rss = {str(rank): values for rank, values in sorted(poller.ranks.items())}
    return {"seconds": seconds, "started_at": started_at, "rss": rss}


def stages_finished(run: Path, stages: List[str]) -> bool:
    metrics = run / "metrics.json"
    return metrics.is_file() and all(s in json.loads(metrics.read_text())["stages"] for s in stages)


def run_train(args, paths: Paths, state: State) -> None:
    stages = args.stages.split(",")
    if args.fresh_run and paths.run.exists():
        shutil.rmtree(paths.run)
    if stages_finished(paths.run, stages) and "train" in state:
        log(f"train: {paths.run} has finished {args.stages}, skipped (--fresh-run retrains)")
        return
    manifest = json.loads((paths.prepared / "manifest.json").read_text())
    # Stage original samples from the original rows only: the small data has fewer than 2,000 of them.
    num_samples = min(args.num_samples, manifest["num_original"])
    command = train_command(args, paths, num_samples)
    log("train: " + " ".join(command))
    paths.logs.mkdir(parents=True, exist_ok=True)
    log_file = paths.logs / f"train-{paths.size}.log"
    result = run_workers(command, log_file)
    state.record("train", {"command": command, "num_samples": num_samples, **result})


def log_times(rank_log: Path) -> List[tuple]:
    """(epoch seconds, message) of each line of a trainer rank log (loguru's default file format)."""
    entries = []
    for line in rank_log.read_text().splitlines():
        stamp, _, rest = line.partition(" | ")
        try:
            when = datetime.strptime(stamp.strip(), "%Y-%m-%d %H:%M:%S.%f").timestamp()
        except ValueError:
            continue
        entries.append((when, rest.split(" - ", 1)[-1]))
    return entries


def iteration_end_times(run: Path, rank: int) -> Dict[str, List[float]]:
    """Per stage, the wall time at which each outer iteration was logged as done on that rank."""
    ends: Dict[str, List[float]] = {}
    for when, message in log_times(run / "logs" / f"rank{rank}.log"):
        match = re.match(r"stage (\w+) iteration (\d+)/\d+:", message)
        if match:
            ends.setdefault(match.group(1), []).append(when)
    return ends


def stage_tail_seconds(run: Path) -> Dict[str, float]:
    """Per stage: from its last iteration's log line to its 'stage X: {row}' line on rank 0, i.e. the last
    checkpoint, the final evaluation (query encoding, rank 0's metrics) and the export."""
    last_iteration, tails = {}, {}
    for when, message in log_times(run / "logs" / "rank0.log"):
        match = re.match(r"stage (\w+) iteration \d+/\d+:", message)
        if match:
            last_iteration[match.group(1)] = when
        match = re.match(r"stage (\w+): \{", message)
        if match and match.group(1) in last_iteration:
            tails[match.group(1)] = when - last_iteration[match.group(1)]
    return tails


def rss_at(samples: List[list], when: float) -> Optional[tuple]:
    """(VmRSS, RssAnon) of the last sample at or before `when`."""
    before = [(rss, anon) for stamp, rss, anon in samples if stamp <= when]
    return before[-1] if before else None


def startup_seconds(run: Path, started_at: float) -> Optional[float]:
    """From launching torchrun to rank 0 starting its first stage (imports, process group, data, loaders)."""
    for when, message in log_times(run / "logs" / "rank0.log"):
        if when >= started_at and re.match(r"stage \w+: [\d,]+ database items", message):
            return when - started_at
    return None


# ----------------------------------------------------------------------------------------------------------
# 4. rank 0's solo work


def rank0_threads(nproc: int) -> int:
    from dihn_dist.distributed.machine import cpu_share
    return cpu_share(nproc)


def time_checkpoint_write(checkpoint: dict, target: Path, repeats: int) -> Dict[str, float]:
    from dihn_dist.training.runfolder import atomic_torch_save
    _, seconds = timed(lambda: atomic_torch_save(target, checkpoint), repeats)
    size = target.stat().st_size
    target.unlink()
    return {"checkpoint_s": seconds, "checkpoint_bytes": size}


def solo_at_run_scale(args, paths: Paths) -> Dict[str, dict]:
    """Per finished stage: mAP@5000 alone and the trainer's whole evaluation row (mAP@ALL, mAP@5000, P@1000)
    on the exported codes, and rewriting the stage's checkpoint, with rank 0's thread count."""
    import torch

    from dihn_dist.method import metrics
    labels = {part: np.load(paths.run / f"{part}_labels.npy") for part in ("database", "query")}
    manifest = json.loads((paths.run / "manifest.json").read_text())
    results = {}
    for stage in args.stages.split(","):
        db_codes = torch.from_numpy(np.load(paths.run / stage / "database_codes.npy"))
        query_codes = torch.from_numpy(np.load(paths.run / stage / "query_codes.npy"))
        db_labels = torch.from_numpy(labels["database"][:db_codes.shape[0]])
        query_labels = torch.from_numpy(labels["query"])
        inputs = (query_codes, db_codes, query_labels, db_labels)
        map_topk, map_s = timed(lambda: metrics.mean_average_precision(*inputs, topk=5000), args.repeats)
        _, row_s = timed(lambda: metrics.retrieval_row(*inputs, manifest["num_seen"], 5000, 1000), args.repeats)
        checkpoint = torch.load(paths.run / "checkpoints" / f"{stage}.pt", weights_only=False)
        results[stage] = {"rows": int(db_codes.shape[0]), "map_topk": map_topk, "map_s": map_s, "row_s": row_s,
                          **time_checkpoint_write(checkpoint, paths.work / "checkpoint-timing.pt", args.repeats),
                          **query_encoding_seconds(args, paths, stage)}
        log(f"solo: stage {stage}: mAP@5000 {map_s:.2f} s, evaluation row {row_s:.2f} s, checkpoint "
            f"{results[stage]['checkpoint_s']:.2f} s, query encoding {results[stage]['encode_s']:.2f} s")
    return results


def query_encoding_seconds(args, paths: Paths, stage: str) -> Dict[str, float]:
    """Rank 0's part of the query encoding, as the trainer does it: its shard of the queries through a new
    FFCV loader (built per evaluation, as dihn_dist.train.encode does) and the stage's network, one loader
    thread; the other ranks encode their shards at the same time, then the codes are gathered."""
    import torch

    from dihn_dist.data.loader import eval_batches
    from dihn_dist.data.prepared import hide_discarded_loader_noise, load_prepared
    from dihn_dist.models.networks import build_model, encode_batches
    hide_discarded_loader_noise()   # as the trainer does: discarded FFCV loaders print harmless numba KeyErrors
    data = load_prepared(paths.prepared)
    network = build_model(args.arch, 48, "none")
    network.load_state_dict(torch.load(paths.run / stage / "model.pt"))
    resolution = json.loads((paths.run / stage / "result.json").read_text())["resolution"]
    shard = np.array_split(np.arange(data.num_query), args.nproc)[0]

    def encode():
        return encode_batches(network, eval_batches(data, "query", batch_size=max(args.batch_size, 256),
                                                    resolution=resolution, device="cpu",
                                                    num_workers=rank0_threads(args.nproc), indices=shard))
    _, seconds = timed(encode, args.repeats)
    return {"encode_s": seconds, "encode_rows": int(len(shard))}


def random_codes(rows: int, bits: int, generator):
    import torch
    return (torch.randint(0, 2, (rows, bits), generator=generator) * 2 - 1).to(torch.float32)


def synthetic_labels(rows: int, seed: int):
    """0/1 rows with the synthetic dataset's tag distribution."""
    import torch
    return torch.from_numpy(nus_synth.draw_labels(np.random.default_rng([seed, 7]), rows))


def _solo_at_rows_child(rows: int, seed: int, threads: int, checkpoint_path: Optional[str], work: str, queue) -> None:
    """DCC, mAP@5000 alone and the trainer's whole evaluation row, and a checkpoint write, at `rows` database
    rows (random codes, outputs and query codes; m = 2,000; 2,100 queries)."""
    try:
        import torch

        from dihn_dist.method import hashing, metrics
        torch.set_num_threads(threads)
        generator = torch.Generator().manual_seed(seed)
        labels = synthetic_labels(rows, seed)
        codes = random_codes(rows, 48, generator)
        sample = torch.randperm(rows, generator=generator)[:2000]
        outputs = torch.tanh(torch.randn(2000, 48, generator=generator))
        r, r_s = timed(lambda: hashing.soft_similarity_offset(labels[sample], labels))
        _, dcc_s = timed(lambda: dcc.solve_dcc(codes, outputs, labels[sample], labels, sample, 200.0, r))
        query_labels = synthetic_labels(2100, seed + 1)
        query_codes = random_codes(2100, 48, generator).to(torch.int8)
        db_codes = codes.to(torch.int8)
        inputs = (query_codes, db_codes, query_labels, labels)
        _, map_s = timed(lambda: metrics.mean_average_precision(*inputs, topk=5000))
        _, row_s = timed(lambda: metrics.retrieval_row(*inputs, 18, 5000, 1000))
        checkpoint = torch.load(checkpoint_path, weights_only=False) if checkpoint_path else {}
        checkpoint["codes"] = db_codes   # the run's model and optimizer, with the codes of `rows` rows
        written = time_checkpoint_write(checkpoint, Path(work) / "checkpoint-timing.pt", 1)
        queue.put({"rows": rows, "r_s": r_s, "dcc_s": dcc_s, "map_s": map_s, "row_s": row_s, **written})
    except BaseException as error:   # report it, do not hang the parent
        queue.put({"error": repr(error)})


def in_child(target, *args) -> dict:
    """Run target(*args, queue) in a fresh spawned process (its own memory); its dict, or RuntimeError."""
    context = mp.get_context("spawn")
    queue = context.Queue()
    child = context.Process(target=target, args=(*args, queue))
    child.start()
    result = queue.get()
    child.join()
    if "error" in result:
        raise RuntimeError(result["error"])
    return result


def run_solo(args, paths: Paths, state: State) -> None:
    import torch
    threads = rank0_threads(args.nproc)
    torch.set_num_threads(threads)
    values = {"threads": threads}
    if stages_finished(paths.run, args.stages.split(",")):
        values["run"] = solo_at_run_scale(args, paths)
    checkpoint = paths.run / "checkpoints" / f"{args.stages.split(',')[0]}.pt"
    log(f"solo: DCC + mAP@5000 + evaluation row + checkpoint at {args.solo_rows:,} rows")
    values["synthetic"] = in_child(_solo_at_rows_child, args.solo_rows, args.seed, threads,
                                   str(checkpoint) if checkpoint.is_file() else None, str(paths.work))
    state.record("solo", values)


# ----------------------------------------------------------------------------------------------------------
# 5. the hash term, dense against factorized


def dense_peak_estimate(batch: int, rows: int) -> int:
    """Bytes the dense step holds at once: the b x n similarity, the b x n inner products and the autograd
    temporaries of (inner - c S)^2 and its backward (about six b x n float32 blocks), plus the codes as float."""
    return 6 * 4 * batch * rows + 4 * 48 * rows


def memory_available() -> int:
    with open("/proc/meminfo") as meminfo:
        for line in meminfo:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


def reset_peak_rss() -> int:
    """Reset VmHWM to the current RSS (Linux clear_refs 5); returns the current RSS in bytes."""
    with open("/proc/self/clear_refs", "w") as clear:
        clear.write("5")
    return proc_status(os.getpid())["VmRSS"]


def step_seconds(step: Callable, repeats: int) -> float:
    step()   # warm-up: first-call allocations
    return timed(step, repeats)[1]


def _hash_term_child(rows: int, batch: int, seed: int, threads: int, repeats: int, dense_limit: int, queue) -> None:
    try:
        import torch

        from dihn_dist.method import hashing
        torch.set_num_threads(threads)
        generator = torch.Generator().manual_seed(seed)
        labels = synthetic_labels(rows, seed).to(torch.float32)
        codes = random_codes(rows, 48, generator)
        sample = torch.randperm(rows, generator=generator)[:2000]
        (patterns, pattern_of_row), patterns_s = timed(lambda: hashing.label_patterns(labels))
        r, r_s = timed(lambda: hashing.soft_similarity_offset(labels[sample], labels))
        stats, stats_s = timed(lambda: hashing.hash_term_stats(codes, patterns, pattern_of_row, r), repeats)
        positions = sample[:batch]
        outputs = torch.tanh(torch.randn(batch, 48, generator=generator)).requires_grad_()

        def factorized_step():
            outputs.grad = None
            loss = hashing.factorized_hash_loss(outputs, pattern_of_row[positions], stats)
            loss.backward()
            return loss.item()

        result = {"rows": rows, "batch": batch, "patterns": int(patterns.shape[0]), "patterns_s": patterns_s,
                  "r_s": r_s, "stats_s": stats_s, "similarity_bytes": 4 * batch * rows,
                  "dense_estimate_bytes": dense_peak_estimate(batch, rows)}
        result["factorized_s"] = step_seconds(factorized_step, max(repeats, 20))
        factorized_value = factorized_step()
        if result["dense_estimate_bytes"] > dense_limit:
            result["dense_skipped"] = (f"estimated peak {result['dense_estimate_bytes'] / GIB:.1f} GiB > limit "
                                       f"{dense_limit / GIB:.1f} GiB")
        else:
            def dense_step():
                outputs.grad = None
                similarity = oracles.similarity(labels[positions], labels, r)
                loss = oracles.pairwise_hash_loss(outputs, codes, similarity, 48)
                loss.backward()
                return loss.item()

            base = reset_peak_rss()
            result["dense_s"] = step_seconds(dense_step, repeats)
            result["dense_peak_growth_bytes"] = proc_status(os.getpid())["VmHWM"] - base
            dense_value = dense_step()
            result["relative_difference"] = abs(dense_value - factorized_value) / abs(factorized_value)
        queue.put(result)
    except BaseException as error:   # MemoryError included: report it, do not hang the parent
        queue.put({"error": repr(error)})


def run_hash_term(args, paths: Paths, state: State) -> None:
    threads = rank0_threads(args.nproc)
    results = []
    for rows in (int(n) for n in args.hash_sizes.split(",")):
        limit = int(min(args.dense_limit_gib * GIB, memory_available() / 2))
        estimate = dense_peak_estimate(args.hash_batch, rows)
        log(f"hash term: n = {rows:,} (dense if its estimated peak {estimate / GIB:.2f}"
            f" GiB <= {limit / GIB:.1f} GiB)")
        try:
            results.append(in_child(_hash_term_child, rows, args.hash_batch, args.seed, threads, args.repeats, limit))
        except RuntimeError as error:
            results.append({"rows": rows, "error": str(error)})
        log(f"hash term: {results[-1]}")
    state.record("hash_term", {"threads": threads, "sizes": results})


# ----------------------------------------------------------------------------------------------------------
# The table


def gib(value: Optional[float]) -> str:
    return "-" if value is None else f"{value / GIB:.2f} GiB"


def gb(value: float) -> str:
    return f"{value / 1e9:.2f} GB"


def seconds(value: Optional[float], digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def joined(values: List[str]) -> str:
    return " / ".join(values)


def data_rows(state: State) -> List[tuple]:
    rows = []
    generate = state.get("generate")
    if generate:
        tags = generate["tags"]["database"]
        shares = sorted(((count / tags["rows"], name) for name, count in tags["per_tag"].items()), reverse=True)
        per_image = ", ".join(f"{k}: {v / tags['rows']:.0%}" for k, v in tags["tags_per_image"].items())
        rate = generate["images_per_s"]
        rows += [
            ("data", "generate: images, images/s",
             f"{generate['images']:,} in {generate['seconds']:.0f} s = {rate:,.0f} images/s" if rate else
             f"{generate['images']:,}", f"{generate['workers']} processes (OpenCV resize, JPEG q90)"
             + ("; resumed, the rate is the first complete run's" if generate.get("resumed") else "")),
            ("data", "database tags", f"{tags['mean_tags_per_image']:.2f} tags/image ({per_image})",
             f"most frequent {shares[0][1]} {shares[0][0]:.1%}, {shares[1][1]} {shares[1][0]:.1%}; rarest "
             f"{shares[-1][1]} {shares[-1][0]:.1%}; {tags['distinct_patterns']:,} tag patterns; "
             f"{tags['incremental_rows'] / tags['rows']:.1%} incremental (tags 18-20)"),
            ("disk", "source JPEGs", f"{gb(generate['disk']['apparent'])} ({gb(generate['disk']['allocated'])} "
             f"allocated)", f"{generate['disk']['files']:,} files, du -sb / du -sB1"),
        ]
    prepare = state.get("prepare")
    if prepare:
        parts = ", ".join(f"{key[:-2].replace('_', ' ')} {value:.0f} s"
                          for key, value in prepare.get("breakdown", {}).items())
        timing = (f"{prepare['images']:,} in {prepare['seconds']:.0f} s = {prepare['images_per_s']:,.0f} images/s"
                  if prepare["seconds"] else f"{prepare['images']:,}, prepared earlier: not timed")
        rows += [
            ("data", "prepare: images/s", timing, f"--num-workers 2; {parts}"),
            ("disk", "prepared folder", f"{gb(prepare['disk']['apparent'])} ({gb(prepare['disk']['allocated'])} "
             f"allocated)", ", ".join(f"{name} {gb(size)}" for name, size in prepare["betons"].items())),
        ]
    return rows


def iteration_rows(state: State, run: Path) -> List[tuple]:
    """Per stage and outer iteration (values 'iteration 1 / iteration 2'), from the run's metrics.json."""
    metrics_file = run / "metrics.json"
    if "train" not in state or not metrics_file.is_file():
        return []
    stages = in_stage_order(json.loads(metrics_file.read_text())["stages"])
    solo = state.get("solo", {}).get("run", {})
    tails = stage_tail_seconds(run)
    rows = []
    for stage, result in stages.items():
        history = result["iterations"]
        section = f"{stage} / iteration"
        row_s = solo.get(stage, {}).get("row_s")
        map_s = solo.get(stage, {}).get("map_s")

        def column(key, digits=2):
            return joined([seconds(it.get(key), digits) for it in history])

        rows += [
            (section, "train s (every rank: r, hash_term_stats, FFCV, CNN)", column("train_s"), "metrics.json train_s"),
            (section, "gather U s", column("gather_s", 3), "gather_s"),
            (section, "DCC s (rank 0)", column("dcc_s"), f"dcc_s; rows learned: {stage_learned_rows(result, run)}"),
            (section, "broadcast s", column("broadcast_s", 3), "broadcast_s"),
            (section, "broadcast bytes (packed codes)", joined([f"{it['broadcast_bytes']:,}" for it in history]),
             "rows learned x 48 / 8"),
            (section, "eval s (query encoding + rank 0's metrics)", column("eval_s"),
             "eval_s; the last iteration's evaluation is the stage's final one, not in the record"),
            (section, "query encoding s (rank 0's shard)", seconds(solo.get(stage, {}).get("encode_s")),
             f"{solo.get(stage, {}).get('encode_rows', 0):,} queries with the stage's model, timed here (loader "
             f"built each time, as the trainer does); eval_s holds it and rank 0's evaluation row"),
            (section, "mAP@5000 s (rank 0)", seconds(map_s), "timed on the exported codes with rank 0's threads; "
             f"whole evaluation row (mAP@ALL + mAP@5000 + P@1000) {seconds(row_s)} s"),
            (section, "images/s (training)", column("images_per_s", 1), "num_samples x epochs / train_s"),
            (section, "end of stage s (last checkpoint + final evaluation + export)", seconds(tails.get(stage), 1),
             "rank 0 log timestamps"),
            (section, "mAP@5000 at the end", f"{result['row']['map_topk']:.4f}",
             f"mAP@ALL {result['row']['map_all']:.4f}"),
        ]
    return rows


def in_stage_order(stages: dict) -> dict:
    """metrics.json keeps its keys sorted; the table follows the order the stages run in."""
    from dihn_dist.common.formats import STAGES
    return {name: stages[name] for name in sorted(stages, key=STAGES.index)}


def stage_learned_rows(result: dict, run: Path) -> str:
    codes = np.load(run / result["stage"] / "database_codes.npy", mmap_mode="r")
    return f"{codes.shape[0] - result['frozen_rows']:,}"


def memory_rows(state: State, run: Path) -> List[tuple]:
    train = state.get("train")
    if not train:
        return []
    started_at = train.get("started_at") or train["rss"]["0"]["samples"][0][0]   # older records: first poll
    rows = [("train", "torchrun wall s", f"{train['seconds']:.0f}", " ".join(train["command"][3:])),
            ("train", "startup s (launch to the first stage)", seconds(startup_seconds(run, started_at), 0),
             "imports (FFCV compiles its kernels), process group, data checks, loaders; rank 0 log")]
    for rank, values in train["rss"].items():
        after = joined([f"{stage} " + joined([rss_and_anon(rss_at(values["samples"], t)) for t in times])
                        for stage, times in iteration_end_times(run, int(rank)).items()])
        rows.append(("memory", f"peak RSS rank {rank}", gib(values["peak_hwm"]),
                     f"VmHWM; peak RssAnon {gib(values['peak_anon'])} (private), RssFile {gib(values['peak_file'])} "
                     f"(mapped files: libraries and the mmapped .beton, shared page cache); VmRSS (RssAnon) after "
                     f"each iteration: {after}"))
    return rows


def rss_and_anon(sample: Optional[tuple]) -> str:
    return "-" if sample is None else f"{sample[0] / GIB:.2f} ({sample[1] / GIB:.2f})"


def hash_rows(state: State) -> List[tuple]:
    hash_term = state.get("hash_term")
    if not hash_term:
        return []
    sizes = hash_term["sizes"]
    names = joined([f"n={s['rows']:,}" for s in sizes])
    section = f"hash term ({names})"

    def each(fn) -> str:
        return joined([fn(s) if "error" not in s else "error" for s in sizes])

    def dense(s) -> str:
        if "dense_s" in s:
            return f"{s['dense_s'] * 1e3:.0f} ms"
        return "skipped"

    notes = "; ".join(f"n={s['rows']:,}: {s.get('dense_skipped') or s.get('error')}" for s in sizes
                      if "dense_s" not in s)
    batch = sizes[0].get("batch", 64)
    return [
        (section, f"dense step ms (b={batch}: similarity + loss + backward)", each(dense),
         f"{hash_term['threads']} thread(s)" + (f"; {notes}" if notes else "")),
        (section, "factorized step ms", each(lambda s: f"{s['factorized_s'] * 1e3:.2f}"),
         "factorized_hash_loss + backward"),
        (section, "speed-up", each(lambda s: f"{s['dense_s'] / s['factorized_s']:,.0f}x" if "dense_s" in s else "-"),
         "dense / factorized; relative difference of the values "
         + each(lambda s: f"{s['relative_difference']:.0e}" if "relative_difference" in s else "-")),
        (section, "b x n similarity", each(lambda s: gib(s["similarity_bytes"])),
         "peak RSS growth of the dense step " + each(lambda s: gib(s.get("dense_peak_growth_bytes")))),
        (section, "hash_term_stats s (once per outer iteration)", each(lambda s: seconds(s["stats_s"], 3)),
         "patterns " + each(lambda s: f"{s['patterns']:,}")),
        (section, "soft offset r s (once per outer iteration)", each(lambda s: seconds(s["r_s"], 3)), "m = 2,000"),
        (section, "label_patterns s (once per stage)", each(lambda s: seconds(s["patterns_s"], 3)), ""),
    ]


def solo_rows(state: State, dcc_history: Dict[str, List[float]]) -> List[tuple]:
    solo = state.get("solo")
    if not solo:
        return []
    section = "rank 0 solo"
    rows = []
    for stage, values in solo.get("run", {}).items():
        dcc_s = max(dcc_history.get(stage, [0.0]))   # the slower iteration: the longer wait
        total = dcc_s + values["row_s"] + values["checkpoint_s"]
        rows.append((section, f"stage {stage}, {values['rows']:,} rows: DCC + evaluation row + checkpoint s",
                     f"{dcc_s:.2f} + {values['row_s']:.2f} + {values['checkpoint_s']:.2f} = {total:.2f}",
                     f"{total / COLLECTIVE_TIMEOUT_S:.2%} of --collective-timeout {COLLECTIVE_TIMEOUT_S:.0f} s "
                     f"(mAP@5000 alone {values['map_s']:.2f} s; checkpoint {values['checkpoint_bytes'] / 1e6:.1f} MB)"))
    synthetic = solo.get("synthetic")
    if synthetic and "row_s" in synthetic:
        total = synthetic["dcc_s"] + synthetic["row_s"] + synthetic["checkpoint_s"]
        rows.append((section, f"{synthetic['rows']:,} rows (random tensors): DCC + evaluation row + checkpoint s",
                     f"{synthetic['dcc_s']:.2f} + {synthetic['row_s']:.2f} + {synthetic['checkpoint_s']:.2f} = "
                     f"{total:.2f}", f"{total / COLLECTIVE_TIMEOUT_S:.2%} of {COLLECTIVE_TIMEOUT_S:.0f} s; "
                     f"{solo['threads']} thread(s); mAP@5000 alone {synthetic['map_s']:.2f} s; r "
                     f"{synthetic['r_s']:.2f} s (every rank); checkpoint {synthetic['checkpoint_bytes'] / 1e6:.0f} MB"))
        limit_rows = synthetic["rows"] * COLLECTIVE_TIMEOUT_S / total
        rows.append((section, "projected: rows at which it reaches the timeout",
                     f"~{limit_rows / 1e6:,.0f} M rows", f"linear in n (DCC O(n c^2), ranking O(n) per query): "
                     f"{synthetic['rows']:,} x {COLLECTIVE_TIMEOUT_S:.0f} / {total:.1f} (the sum: each part is its "
                     f"own collective wait, so this is conservative); same on 8 GPUs or N nodes (rank 0 works alone, "
                     f"the others wait), less where DCC and the metrics run on a GPU"))
    return rows


def projection_rows(state: State, run: Path) -> List[tuple]:
    """Communication at 8 GPUs on 2 nodes, from the byte counts (projected, not measured)."""
    metrics_file = run / "metrics.json"
    if not metrics_file.is_file():
        return []
    stages = in_stage_order(json.loads(metrics_file.read_text())["stages"])
    rows = []
    samples = state.get("train", {}).get("num_samples", 2000)
    gather_bytes = samples * 48 * 4 + samples * 8
    rows.append(("projected, 8 GPUs / 2 nodes", "gather U + positions per iteration",
                 f"{gather_bytes:,} B", f"m x c x 4 + m x 8 = {samples:,} x 48 x 4 + {samples:,} x 8, whatever the "
                 f"number of ranks; 10 GbE: {gather_bytes / 1.25e9 * 1e3:.2f} ms"))
    for stage, result in stages.items():
        payload = result["iterations"][-1]["broadcast_bytes"]
        hops = math.ceil(math.log2(8))
        rows.append(("projected, 8 GPUs / 2 nodes", f"broadcast {stage} codes",
                     f"{payload / 1.25e9 * hops * 1e3:.1f} ms (10 GbE), "
                     f"{payload / 12.5e9 * hops * 1e3:.2f} ms (100 Gb IB)",
                     f"{payload:,} B / link rate x {hops} tree hops (log2 8)"))
    return rows


def print_table(rows: List[tuple]) -> None:
    print()
    print(table(("section", "measurement", "value(s)", "how / notes"), rows))


def recorded_dcc(run: Path) -> Dict[str, List[float]]:
    metrics_file = run / "metrics.json"
    if not metrics_file.is_file():
        return {}
    stages = json.loads(metrics_file.read_text())["stages"]
    return {stage: [it["dcc_s"] for it in result["iterations"]] for stage, result in stages.items()}


def report(state: State, paths: Paths) -> None:
    load = os.getloadavg()
    print(f"\nNUS-WIDE tc21 scale ({paths.size}), {os.cpu_count()} CPUs, load average {load[0]:.1f} / {load[1]:.1f} / "
          f"{load[2]:.1f} (1 / 5 / 15 min) at the end; figures marked 'projected' are arithmetic, not measurements.")
    rows = (data_rows(state) + wall_rows(state) + memory_rows(state, paths.run) + iteration_rows(state, paths.run)
            + solo_rows(state, recorded_dcc(paths.run)) + hash_rows(state) + projection_rows(state, paths.run))
    print_table(rows)


def wall_rows(state: State) -> List[tuple]:
    walls = [(name, state.get(name.replace("-", "_"), {}).get("phase_wall_s")) for name in PHASES]
    walls = [(name, wall) for name, wall in walls if wall is not None]
    if not walls:
        return []
    return [("wall", "phase wall s", joined([f"{name} {wall:.0f}" for name, wall in walls]),
             "as last run (a phase found complete keeps its earlier time)")]


# ----------------------------------------------------------------------------------------------------------
# --simulate: one outer iteration's non-network work and one evaluation at ROWS rows, two paths compared


def run_simulate(args) -> int:
    import torch

    import scale_sim
    folder = args.work.resolve() / f"simulate-{args.simulate}"
    folder.mkdir(parents=True, exist_ok=True)
    state = State(folder / "summary.json")
    results, summaries = {}, {}
    for path in args.simulate_paths.split(","):
        out = folder / f"{path}.pt"
        out.unlink(missing_ok=True)   # a failed run must not leave the previous run's result to be read
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(args.nproc),
                   "--master_port", str(free_port()), str(Path(__file__).resolve().parent / "scale_sim.py"),
                   "--path", path, "--rows", str(args.simulate), "--work", str(folder), "--out", str(out),
                   "--queries", str(args.simulate_queries), "--block-rows", str(args.simulate_block_rows),
                   "--seed", str(args.seed)]
        log(f"simulate {path}: " + " ".join(command))
        started = time.perf_counter()
        with open(folder / f"{path}.log", "w") as output:
            finished = subprocess.run(command, env=child_env(), stdout=output, stderr=subprocess.STDOUT)
        if finished.returncode != 0:
            raise RuntimeError(f"simulate {path}: torchrun exited with {finished.returncode}; see {folder / path}.log")
        results[path] = torch.load(out, weights_only=False)
        summaries[path] = {**scale_sim.summarize(results[path]), "command": command,
                           "wall_s": time.perf_counter() - started}
        state.record(path, summaries[path])
        log(f"simulate {path}: {summaries[path]['wall_s']:.0f} s")
    rows = [row for summary in summaries.values() for row in scale_sim.table_rows(summary)]
    found = None
    if len(results) == 2:
        found = scale_sim.compare(results["sharded"], results["rank0"])
        state.record("agreement", found)
        rows.append(scale_sim.agreement_row(found))
    print(f"\nSimulated scale run: {args.simulate:,} database rows, {args.nproc} ranks (gloo on "
          f"{os.cpu_count()} CPUs, torch threads per rank {next(iter(summaries.values()))['threads']}); "
          f"evaluation over {args.simulate_queries:,} of 2,100 queries"
          + (" (scaled to 2,100)" if args.simulate_queries < 2100 else "") + ".")
    for path, summary in summaries.items():
        start, end = summary["loadavg_start"], summary["loadavg_end"]
        print(f"{path}: load average {start[0]:.1f} / {start[1]:.1f} / {start[2]:.1f} at the start, {end[0]:.1f} / "
              f"{end[1]:.1f} / {end[2]:.1f} at the end (1 / 5 / 15 min): the machine is shared with other "
              f"processes, so the seconds are upper bounds.")
    print()
    print(table(scale_sim.TABLE_HEADER, rows))
    print(f"\nResults: {folder}")
    return 0 if found is None or found["agree"] else 1


PHASES = {"generate": run_generate, "prepare": run_prepare, "train": run_train, "solo": run_solo,
          "hash-term": run_hash_term}


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    if args.simulate is not None:
        args.work.resolve().mkdir(parents=True, exist_ok=True)
        return run_simulate(args)
    paths = Paths(args.work.resolve(), size_name(args))
    paths.work.mkdir(parents=True, exist_ok=True)
    state = State(paths.state)
    for name, run_phase in PHASES.items():
        if getattr(args, "skip_" + name.replace("-", "_")):
            continue
        log(f"phase {name}")
        started, started_at = time.perf_counter(), time.time()
        run_phase(args, paths, state)
        wall = time.perf_counter() - started
        key = name.replace("-", "_")
        if state.get(key, {}).get("recorded_at", 0) >= started_at:   # did the work, not skipped as done
            state.record(key, {**state[key], "phase_wall_s": wall})
        log(f"phase {name}: {wall:.0f} s")
    report(state, paths)
    return 0


if __name__ == "__main__":
    sys.exit(main())
