"""One prepared self-check for a machine with NVIDIA GPUs (about 5-8 minutes on one GPU):

    bash launch/gpu_check.sh [--workdir DIR] [--skip-compile]

1. the CUDA tests: DCC, the factorized hash term and mAP on cuda equal their CPU results;
2. the trainer on the GPU at 224 px with AlexNet (synthetic images): images/s for fp32, bf16, bf16 +
   channels-last (and + torch.compile), and its peak GPU memory;
3. DCC and mAP@5000 at NUS-WIDE size (n = 193,734, m = 2,000, c = 48, 21 tags, 2,100 queries) on the GPU,
   timed and compared with the CPU;
4. host syncs in one outer iteration (torch's CUDA sync debug mode): none may come from the training step
   itself beyond the batch's host-to-device copy;
5. with 2 or more GPUs: torchrun on 1 and on N GPUs gives equal codes (--deterministic), and no rank but
   local rank 0 creates a CUDA context on GPU 0 (FFCV's loader thread used to).
Prints one table and exits 1 on any mismatch. `--device cpu --quick` runs the same code paths on a CPU at
toy sizes (the test suite does this), so the script itself is checked where no GPU exists.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from dihn_dist.method import dcc
from dihn_dist.training import loop

REPO = Path(__file__).resolve().parents[2]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]


class Table:
    def __init__(self):
        self.rows, self.failed = [], False

    def add(self, check: str, value: str, ok=True) -> None:
        self.rows.append((check, value, {True: "ok", False: "FAIL", None: "info"}[ok]))
        self.failed |= ok is False
        print(f"  {check}: {value} [{self.rows[-1][2]}]", flush=True)

    def print(self) -> None:
        width = max(len(r[0]) for r in self.rows)
        print("\n" + "\n".join(f"{c:<{width}}  {s:<4}  {v}" for c, v, s in self.rows), flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ----------------------------------------------------------------------------------------------------
# Synthetic data: class-coloured stripes with noise, through the image-list adapter


def write_images(folder: Path, count_per_class: int, query_per_class: int, side: int) -> list:
    from PIL import Image
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    lists = {}
    for part, count in (("database", count_per_class), ("query", query_per_class)):
        lines = []
        for label in range(10):
            colour = np.array([(label * 83) % 256, (label * 151) % 256, (label * 37) % 256])
            for i in range(count):
                pixels = rng.integers(0, 60, (side, side, 3)) + colour * 0.7
                pixels[:, (label * side // 10):(label * side // 10 + side // 10)] = 255
                name = f"{part}/{label}_{i}.png"
                (folder / part).mkdir(exist_ok=True)
                Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(folder / name)
                lines.append(f"{name} " + " ".join("1" if c == label else "0" for c in range(10)))
        (folder / f"{part}.txt").write_text("\n".join(lines) + "\n")
        lists[part] = folder / f"{part}.txt"
    return [lists["database"], lists["query"]]


def prepare_data(work: Path, quick: bool) -> Path:
    out = work / "data"
    if not (out / "manifest.json").is_file():
        database, query = write_images(work / "images", 30 if quick else 200, 5 if quick else 10, 64)
        subprocess.run([sys.executable, "-m", "dihn_dist.prepare", "--dataset", "image-list", "--database-list",
                        str(database), "--query-list", str(query), "--num-seen", "7", "--out", str(out)],
                       check=True, capture_output=True)
    return out


# ----------------------------------------------------------------------------------------------------
# Checks


def cuda_tests(table: Table, device: str) -> None:
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-k", "cuda", "tests/test_hashing.py",
                             "tests/test_hash_term.py", "tests/test_metrics.py"], cwd=REPO, capture_output=True,
                            text=True)
    summary = (result.stdout.strip().splitlines() or ["no output"])[-1]
    ran = "passed" in summary and "skipped" not in summary.split("passed")[0]
    table.add("CUDA tests (DCC, hash term, mAP on cuda == CPU)", summary,
              result.returncode == 0 and (ran or device == "cpu"))


def train_run(work: Path, data: Path, name: str, device: str, extra: list, nproc: int = 1) -> dict:
    out = work / "runs" / name
    args = ["-m", "dihn_dist.train", "--data", str(data), "--out", str(out), "--device", device,
            "--stage", "original", "--seed", "1", "--max-epoch", "1", *extra]
    command = [sys.executable, *args] if nproc == 1 else \
        [*TORCHRUN, "--nproc_per_node", str(nproc), "--master_port", str(free_port()), *args]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        return {"error": (result.stderr.strip().splitlines() or ["?"])[-1]}
    metrics = json.loads((out / "metrics.json").read_text())
    history = metrics["stages"]["original"]["iterations"]
    return {"history": history, "codes": np.load(out / "original" / "database_codes.npy"), "out": out}


def throughput(table: Table, work: Path, data: Path, device: str, quick: bool, compile_too: bool) -> None:
    arch = ["--arch", "small-cnn", "--resolution", "32"] if quick else ["--arch", "alexnet", "--resolution", "224"]
    common = [*arch, "--max-iter", "3", "--num-samples", "128" if quick else "1536", "--batch-size", "64"]
    variants = [("fp32", ["--precision", "fp32", "--channels-last", "off"]),
                ("bf16", ["--precision", "bf16", "--channels-last", "off"]),
                ("bf16 + channels-last", ["--precision", "bf16", "--channels-last", "on"])]
    if compile_too:
        variants.append(("bf16 + channels-last + compile", ["--precision", "bf16", "--channels-last", "on",
                                                            "--compile"]))
    for name, flags in variants:
        run = train_run(work, data, name.replace(" ", "").replace("+", "-"), device, common + flags)
        if "error" in run:
            table.add(f"train {arch[1]} {arch[3]} px, {name}", run["error"], False)
            continue
        steady = run["history"][-1]  # the first iteration compiles FFCV's pipeline (and torch.compile)
        finite = all(np.isfinite(it["loss_total"]) for it in run["history"])
        memory = f", peak {steady['peak_gpu_memory_gb']:.2f} GiB" if "peak_gpu_memory_gb" in steady else ""
        table.add(f"train {arch[1]} {arch[3]} px, {name}", f"{steady['images_per_s']:,.0f} images/s{memory}", finite)


def nus_wide_sized_core(table: Table, device: str, quick: bool) -> None:
    from dihn_dist.method import metrics
    n, m, c, q = (2000, 200, 48, 210) if quick else (193_734, 2_000, 48, 2_100)
    g = torch.Generator().manual_seed(0)
    labels = (torch.rand(n, 21, generator=g) < 0.08).float()
    labels[torch.arange(n), torch.randint(0, 21, (n,), generator=g)] = 1
    codes = (torch.randint(0, 2, (n, c), generator=g) * 2 - 1).to(torch.int8)
    sample = torch.randperm(n, generator=g)[:m]
    U = torch.tanh(torch.randn(m, c, generator=g))
    timings, solved = {}, {}
    for where in ("cpu", device):
        dev = torch.device(where)
        args = (codes.to(dev), U.to(dev), labels[sample].to(dev), labels.to(dev), sample.to(dev), 200.0, 0.3)
        dcc.solve_dcc(*args)  # warm-up (CUDA kernels, allocator)
        _sync(dev)
        started = time.perf_counter()
        solved[where] = dcc.solve_dcc(*args).cpu()
        _sync(dev)
        timings[where] = time.perf_counter() - started
    agree = float((solved["cpu"] == solved[device]).float().mean())
    table.add(f"DCC n={n:,} m={m:,} c={c}: {device} vs cpu", f"{timings[device]:.3f} s vs {timings['cpu']:.3f} s, "
              f"{agree:.4%} of bits equal", agree >= 0.9999)
    query_codes = (torch.randint(0, 2, (q, c), generator=g) * 2 - 1).to(torch.int8)
    query_labels = labels[torch.randperm(n, generator=g)[:q]]
    values = {}
    for where in ("cpu", device):
        dev = torch.device(where)
        started = time.perf_counter()
        values[where] = metrics.mean_average_precision(query_codes.to(dev), codes.to(dev), query_labels.to(dev),
                                                       labels.to(dev), topk=5000)
        _sync(dev)
        timings[where] = time.perf_counter() - started
    table.add(f"mAP@5000 {q:,} x {n:,}: {device} vs cpu", f"{timings[device]:.3f} s vs {timings['cpu']:.3f} s, "
              f"{values[device]:.6f} vs {values['cpu']:.6f}", abs(values[device] - values["cpu"]) < 1e-9)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def host_syncs(table: Table, data: Path, device: str, quick: bool) -> None:
    """One outer iteration of the real training step under CUDA's sync debug mode."""
    if device == "cpu":
        table.add("host syncs per outer iteration", "not measurable on a CPU", None)
        return
    from dihn_dist.distributed import comm
    from dihn_dist.training.config import parse_config
    from dihn_dist.training.stages import initial_codes, sample_positions, stage_spec
    with tempfile.TemporaryDirectory() as scratch:
        config = parse_config(["--data", str(data), "--out", scratch + "/run", "--device", device, "--arch",
                               "small-cnn", "--resolution", "32", "--max-epoch", "1", "--num-samples", "512",
                               "--batch-size", "64", "--stage", "original"])
        comm.init(config.device)
        config, data_, run = loop.check_inputs(config)
        run.create(config, data_)
        stage = stage_spec("original", config, data_)
        training = loop.StageTraining(stage, config, data_, run, None, initial_codes(stage, config, None))
        sample = sample_positions(config.seed, stage, 0, config.num_samples)
        training.train_on_sample(sample, 0.1, 0)  # compiles FFCV's pipeline
        torch.cuda.synchronize()
        steps = -(-config.num_samples // config.batch_size)
        torch.cuda.set_sync_debug_mode("warn")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            training.train_on_sample(sample, 0.1, 1)
        torch.cuda.set_sync_debug_mode("default")
        syncs = [w for w in caught if "synchroniz" in str(w.message)]
    table.add("host syncs in one outer iteration (1 epoch)", f"{len(syncs)} for {steps} steps", None)


def multi_gpu(table: Table, work: Path, data: Path, device: str, quick: bool) -> None:
    gpus = torch.cuda.device_count() if device != "cpu" else 2
    if gpus < 2:
        table.add("1 vs N GPUs, GPU-0 contexts", "one GPU: skipped", None)
        return
    common = ["--arch", "small-cnn", "--resolution", "32", "--precision", "fp32", "--max-iter", "2",
              "--num-samples", "128" if quick else "1024", "--batch-size", "64", "--deterministic"]
    one = train_run(work, data, "one-gpu", device, common)
    many = train_run(work, data, f"{gpus}-gpus", device, common, nproc=gpus)
    if "error" in one or "error" in many:
        table.add(f"torchrun 1 vs {gpus} {device} processes", one.get("error") or many.get("error"), False)
        return
    equal = float((one["codes"] == many["codes"]).mean())
    table.add(f"torchrun 1 vs {gpus} {device} processes: equal codes", f"{equal:.4%} of bits equal", equal == 1.0)
    if device == "cpu":
        return
    report = work / "gpu0.json"
    probe = [*TORCHRUN, "--nproc_per_node", str(gpus), "--master_port", str(free_port()), str(Path(__file__)),
             "--probe", str(data), "--probe-report", str(report)]
    result = subprocess.run(probe, capture_output=True, text=True)
    if result.returncode != 0 or not report.is_file():
        table.add("CUDA contexts on GPU 0", (result.stderr.strip().splitlines() or ["probe failed"])[-1], False)
        return
    found = json.loads(report.read_text())
    others = [r for r in found["ranks_on_gpu0"] if r != 0]
    table.add("CUDA contexts on GPU 0 after loading and training", f"ranks {found['ranks_on_gpu0']}", not others)


def probe(data: Path, report: Path) -> None:
    """Run under torchrun: every rank loads batches through the trainer's loaders and steps a network on its
    GPU; then rank 0 asks nvidia-smi which processes hold a context on GPU 0."""
    from dihn_dist.data.loader import TrainLoader, batch_schedule, eval_batches
    from dihn_dist.data.prepared import load_prepared
    from dihn_dist.distributed import comm
    from dihn_dist.models.networks import SmallCNN
    ctx = comm.init("cuda")
    prepared = load_prepared(data)
    loader = TrainLoader(prepared, batch_size=32, resolution=32, device=ctx.device, num_workers=2, length=64)
    loader.set_order(*batch_schedule(np.arange(64), 32, 1, 0))
    network = SmallCNN(8).to(ctx.device)
    for images, _, _ in loader:
        network(images).sum().backward()
    for images, _, _ in eval_batches(prepared, "query", batch_size=32, resolution=32, device=ctx.device,
                                     num_workers=2):
        network(images)
    torch.cuda.synchronize()
    pids = comm.gather_objects(os.getpid())
    if ctx.is_main:
        listing = subprocess.run(["nvidia-smi", "--query-compute-apps=pid", "--format=csv,noheader", "-i", "0"],
                                 capture_output=True, text=True).stdout.split()
        on_gpu0 = {int(p) for p in listing if p.strip().isdigit()}
        report.write_text(json.dumps({"ranks_on_gpu0": [r for r, pid in enumerate(pids) if pid in on_gpu0]}))
    comm.barrier()
    comm.shutdown()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--workdir", type=Path, help="scratch folder (default: a temporary one)")
    parser.add_argument("--quick", action="store_true", help="toy sizes and the small CNN (CPU smoke run)")
    parser.add_argument("--skip-compile", action="store_true", help="leave out the torch.compile run (1-2 min)")
    parser.add_argument("--probe", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--probe-report", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.probe:
        probe(args.probe, args.probe_report)
        return 0
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("gpu_check: torch sees no CUDA GPU on this machine (torch.cuda.is_available() is False)")
        return 1
    table = Table()
    names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if args.device != "cpu" else []
    table.add("machine", f"torch {torch.__version__}, CUDA {torch.version.cuda}, {len(names)} GPU(s): "
                         f"{', '.join(names) or 'none'}", None)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as scratch:
        work = args.workdir or Path(scratch)
        data = prepare_data(work, args.quick)
        cuda_tests(table, args.device)
        throughput(table, work, data, args.device, args.quick, compile_too=not (args.skip_compile or args.quick))
        nus_wide_sized_core(table, args.device, args.quick)
        host_syncs(table, data, args.device, args.quick)
        multi_gpu(table, work, data, args.device, args.quick)
    table.add("wall time", f"{time.perf_counter() - started:.0f} s", None)
    table.print()
    return 1 if table.failed else 0


if __name__ == "__main__":
    sys.exit(main())
