"""One prepared self-check for a machine with NVIDIA GPUs (about 5-8 minutes on one GPU):

    bash launch/gpu_check.sh [--workdir DIR] [--skip-compile]

1. the CUDA tests: DCC, the factorized hash term and mAP on cuda equal their CPU results;
2. the trainer on the GPU at 224 px with AlexNet (synthetic images): images/s for fp32, bf16, bf16 +
   channels-last (and + torch.compile), and its peak GPU memory; then EfficientNet-Lite0 from its
   installed ImageNet weights at 224 px, fine-tuned and with the trunk frozen (the frozen row gives the
   one-off feature pass and the head-only steps apart);
3. DCC and mAP@5000 at NUS-WIDE size (n = 193,734, m = 2,000, c = 48, 21 tags, 2,100 queries) on the GPU,
   timed and compared with the CPU;
4. bf16 against fp32 (the small CNN, --deterministic): mAP within BF16_MAP_TOLERANCE (0.03);
5. host syncs in one outer iteration (torch's CUDA sync debug mode), at two step counts: none may come
   from the training step itself (the count may not grow with the steps);
6. with 2 or more GPUs: torchrun on 1 and on N GPUs gives the same codes up to what GPUs can promise
   (ONE_VS_N_BITS of the bits and mAP within ONE_VS_N_MAP), and no rank holds a CUDA context on a GPU
   other than its own (FFCV's loader thread used to create one on GPU 0), asked of every rank directly.
Prints one table and exits 1 on any mismatch. `--device cpu --quick` runs the same code paths on a CPU at
toy sizes (the test suite does this), so the script itself is checked where no GPU exists; `--plan-only`
runs every trainer command of the check (at the full size unless --quick) with --check-only, so a command
the trainer would refuse shows up on a CPU too.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import socket
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from dihn_dist.method import dcc
from dihn_dist.training import loop

REPO = Path(__file__).resolve().parents[2]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]

# Synthetic data: images per class of the database and query parts (10 classes, 7 of them seen, so stage
# 1 has 7 x the database count); every --num-samples below must fit in stage 1 (--plan-only checks it).
FULL_SIZE, QUICK_SIZE = (200, 10), (30, 5)
# What bf16 may cost against fp32 (the same seeded small-CNN run, mAP over all queries), at the full size and
# at --quick's: its 50 queries make mAP coarse (on the CPU, 0.4% of the bits flipped by bf16 moved it 0.026).
BF16_MAP_TOLERANCE = {False: 0.03, True: 0.05}
# What 1 and N GPUs can promise (--deterministic): the float sums of N GPUs round differently from one
# GPU's, so a few outputs near 0 may take the other sign; docs/distributed.md#what-the-gpu-check-verifies.
ONE_VS_N_BITS, ONE_VS_N_MAP = 0.999, 0.005


# The status of a device-vs-CPU comparison run on a CPU: the CPU compared with itself proves nothing, so
# the row must not read "ok" (the code path still runs, so it does not rot between GPU sessions).
NOT_APPLICABLE = "n/a"


def versus_cpu(device: str, ok: bool):
    """A device-vs-CPU row's status: its result on a device, NOT_APPLICABLE on the CPU itself."""
    return NOT_APPLICABLE if device == "cpu" else ok


class Table:
    def __init__(self):
        self.rows, self.failed = [], False

    def add(self, check: str, value: str, ok=True) -> None:
        self.rows.append((check, value, {True: "ok", False: "FAIL", None: "info", NOT_APPLICABLE: "n/a"}[ok]))
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
        database, query = write_images(work / "images", *(QUICK_SIZE if quick else FULL_SIZE), 64)
        subprocess.run([sys.executable, "-m", "dihn_dist.prepare", "--dataset", "image-list", "--database-list",
                        str(database), "--query-list", str(query), "--num-seen", "7", "--out", str(out)],
                       check=True, capture_output=True)
    return out


# ----------------------------------------------------------------------------------------------------
# The trainer commands of the check, declared once: the runs below and --plan-only take them from here


@dataclass(frozen=True)
class TrainerCommand:
    name: str
    flags: tuple  # after --data, --out and --device
    nproc: int = 1

    @property
    def folder(self) -> str:
        return "".join(ch if ch.isalnum() else "-" for ch in self.name).strip("-")


def gpu_count(device: str) -> int:
    """GPUs for the 1-vs-N runs; on a CPU, 2 processes take the same code path."""
    return torch.cuda.device_count() if device != "cpu" else 2


def trainer_commands(quick: bool, gpus: int, compile_too: bool) -> list:
    base = ("--stage", "original", "--seed", "1", "--max-epoch", "1")
    arch = ("--arch", "small-cnn", "--resolution", "32") if quick else ("--arch", "alexnet", "--resolution", "224")
    speed = (*base, *arch, "--max-iter", "3", "--num-samples", "128" if quick else "1280", "--batch-size", "64")
    commands = [TrainerCommand(f"train {arch[1]} {arch[3]} px, {name}", (*speed, *flags)) for name, flags in (
        ("fp32", ("--precision", "fp32", "--channels-last", "off")),
        ("bf16", ("--precision", "bf16", "--channels-last", "off")),
        ("bf16 + channels-last", ("--precision", "bf16", "--channels-last", "on")),
        *([("bf16 + channels-last + compile", ("--precision", "bf16", "--channels-last", "on", "--compile"))]
          if compile_too else []))]
    small = (*base, "--arch", "small-cnn", "--resolution", "32", "--max-iter", "2", "--num-samples",
             "128" if quick else "1024", "--batch-size", "64", "--deterministic")
    commands += [TrainerCommand("small-cnn fp32", (*small, "--precision", "fp32")),
                 TrainerCommand("small-cnn bf16", (*small, "--precision", "bf16"))]
    if gpus >= 2:
        commands.append(TrainerCommand(f"small-cnn fp32 x{gpus}", (*small, "--precision", "fp32"), nproc=gpus))
    side = "32" if quick else "224"
    lite = (*base, "--arch", "efficientnet-lite0", "--pretrained", "auto", "--resolution", side, "--max-iter", "3",
            "--num-samples", "128" if quick else "1280", "--batch-size", "64")
    commands += [TrainerCommand(f"train efficientnet-lite0 {side} px pretrained, {name}", (*lite, *flags))
                 for name, flags in (("fine-tuned", ()), ("frozen trunk", ("--freeze-backbone",)))]
    syncs = (*base, "--arch", "small-cnn", "--resolution", "32", "--batch-size", "64")
    commands += [TrainerCommand(f"host syncs, {steps} steps", (*syncs, "--num-samples", str(64 * steps)))
                 for steps in (4, 8)]
    return commands


def find(commands: list, name: str) -> TrainerCommand:
    return next(c for c in commands if c.name == name)


def trainer_argv(work: Path, data: Path, command: TrainerCommand, device: str) -> list:
    return ["--data", str(data), "--out", str(work / "runs" / command.folder), "--device", device, *command.flags]


def launch(work: Path, data: Path, command: TrainerCommand, device: str, *extra: str):
    args = ["-m", "dihn_dist.train", *trainer_argv(work, data, command, device), *extra]
    process = [sys.executable, *args] if command.nproc == 1 else \
        [*TORCHRUN, "--nproc_per_node", str(command.nproc), "--master_port", str(free_port()), *args]
    return subprocess.run(process, capture_output=True, text=True)


def last_line(text: str, default: str = "?") -> str:
    return (text.strip().splitlines() or [default])[-1]


def train_run(work: Path, data: Path, command: TrainerCommand, device: str) -> dict:
    result = launch(work, data, command, device)
    if result.returncode != 0:
        return {"error": last_line(result.stderr)}
    out = work / "runs" / command.folder
    metrics = json.loads((out / "metrics.json").read_text())
    return {"history": metrics["stages"]["original"]["iterations"], "map": metrics["rows"][0]["map_all"],
            "codes": np.load(out / "original" / "database_codes.npy"), "out": out,
            "result": metrics["stages"]["original"]}


def check_only(work: Path, data: Path, command: TrainerCommand, device: str) -> tuple:
    """(exit code, stdout, stderr) of the command with --check-only; one process runs in this one (the
    imports dominate a check), several under torchrun."""
    if command.nproc > 1:
        result = launch(work, data, command, device, "--check-only")
        return result.returncode, result.stdout, result.stderr
    from dihn_dist import train
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = train.main([*trainer_argv(work, data, command, device), "--check-only"])
    return code, out.getvalue(), err.getvalue()


def plan_only(table: Table, work: Path, data: Path, device: str, commands: list) -> None:
    """Every trainer command of the check with --check-only: each must pass the trainer's input checks."""
    for command in commands:
        code, out, err = check_only(work, data, command, device)
        ok = code == 0 and not (work / "runs" / command.folder).exists()
        lines = [line.strip() for line in out.splitlines()]
        summary = last_line(err) if code else next((line for line in lines if line.startswith("outer")), "?")
        table.add(f"plan: {command.name}" + (f" ({command.nproc} processes)" if command.nproc > 1 else ""),
                  summary, ok)


# ----------------------------------------------------------------------------------------------------
# Checks


def cuda_tests(table: Table, device: str) -> None:
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-k", "cuda", "tests/test_hashing.py",
                             "tests/test_hash_term.py", "tests/test_metrics.py"], cwd=REPO, capture_output=True,
                            text=True)
    summary = (result.stdout.strip().splitlines() or ["no output"])[-1]
    ran = "passed" in summary and "skipped" not in summary.split("passed")[0]
    # on a CPU the CUDA tests skip: n/a unless the run itself failed
    status = (result.returncode == 0 and NOT_APPLICABLE) if device == "cpu" else result.returncode == 0 and ran
    table.add("CUDA tests (DCC, hash term, mAP on cuda == CPU)", summary, status)


def throughput(table: Table, work: Path, data: Path, device: str, commands: list) -> None:
    for command in (c for c in commands if c.name.startswith("train ") and "pretrained" not in c.name):
        run = train_run(work, data, command, device)
        if "error" in run:
            table.add(command.name, run["error"], False)
            continue
        steady = run["history"][-1]  # the first iteration compiles FFCV's pipeline (and torch.compile)
        finite = all(np.isfinite(it["loss_total"]) for it in run["history"])
        memory = f", peak {steady['peak_gpu_memory_gb']:.2f} GiB" if "peak_gpu_memory_gb" in steady else ""
        table.add(command.name, f"{steady['images_per_s']:,.0f} images/s{memory}", finite)


def bf16_against_fp32(table: Table, work: Path, data: Path, device: str, commands: list, quick: bool) -> dict:
    """The seeded small-CNN run in fp32 and in bf16: mAP within BF16_MAP_TOLERANCE. Returns the fp32 run (the
    1-vs-N check's one-process run)."""
    fp32 = train_run(work, data, find(commands, "small-cnn fp32"), device)
    bf16 = train_run(work, data, find(commands, "small-cnn bf16"), device)
    if "error" in fp32 or "error" in bf16:
        table.add("bf16 vs fp32 mAP (small-cnn)", fp32.get("error") or bf16.get("error"), False)
        return fp32
    gap, tolerance = abs(bf16["map"] - fp32["map"]), BF16_MAP_TOLERANCE[quick]
    bits = float((bf16["codes"] == fp32["codes"]).mean())
    table.add("bf16 vs fp32 mAP (small-cnn)", f"{bf16['map']:.4f} vs {fp32['map']:.4f} (|gap| {gap:.4f} <= "
              f"{tolerance}), {bits:.2%} of bits equal", gap <= tolerance)
    return fp32


def pretrained_throughput(table: Table, work: Path, data: Path, device: str, commands: list) -> None:
    """EfficientNet-Lite0 from its installed ImageNet weights (--pretrained auto): fine-tuned, and frozen."""
    for command in (c for c in commands if "pretrained" in c.name):
        run = train_run(work, data, command, device)
        label = command.name
        if "error" in run:
            table.add(label, run["error"], False)
            continue
        steady = run["history"][-1]
        finite = all(np.isfinite(it["loss_total"]) for it in run["history"])
        memory = f", peak {steady['peak_gpu_memory_gb']:.2f} GiB" if "peak_gpu_memory_gb" in steady else ""
        value = f"{steady['images_per_s']:,.0f} images/s{memory}"
        if "--freeze-backbone" in command.flags:
            config = json.loads((run["out"] / "config.json").read_text())
            manifest = json.loads((run["out"] / "manifest.json").read_text())
            images, seconds = manifest["num_database"] + manifest["num_query"], run["result"]["trunk_features_s"]
            value = (f"head steps {value}; trunk features once: {images:,} images in {seconds:.1f} s "
                     f"({images / max(seconds, 1e-9):,.0f} images/s), weights sha256 {config['weights']['sha256'][:12]}")
            finite = finite and seconds > 0
        table.add(label, value, finite)


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
              f"{agree:.4%} of bits equal", versus_cpu(device, agree >= 0.9999))
    query_codes = (torch.randint(0, 2, (q, c), generator=g) * 2 - 1).to(torch.int8)
    query_labels = labels[torch.randperm(n, generator=g)[:q]]
    values = {}
    for where in ("cpu", device):
        dev = torch.device(where)
        args = (query_codes.to(dev), codes.to(dev), query_labels.to(dev), labels.to(dev))  # not timed
        metrics.mean_average_precision(args[0][:64], args[1], args[2][:64], args[3], topk=5000)  # warm-up
        _sync(dev)
        started = time.perf_counter()
        values[where] = metrics.mean_average_precision(*args, topk=5000)
        _sync(dev)
        timings[where] = time.perf_counter() - started
    table.add(f"mAP@5000 {q:,} x {n:,}: {device} vs cpu", f"{timings[device]:.3f} s vs {timings['cpu']:.3f} s, "
              f"{values[device]:.6f} vs {values['cpu']:.6f}", versus_cpu(device, abs(values[device] - values["cpu"]) < 1e-9))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def count_syncs(data: Path, device: str, command: TrainerCommand) -> tuple:
    """(host syncs, steps) of one outer iteration of the real training step under CUDA's sync debug mode."""
    from dihn_dist.distributed import comm
    from dihn_dist.training.config import parse_config
    from dihn_dist.training.stages import InitialCodes, sample_positions, stage_spec
    with tempfile.TemporaryDirectory() as scratch:
        config = parse_config(trainer_argv(Path(scratch), data, command, device))
        comm.init(config.device)
        config, data_, run = loop.check_inputs(config)
        run.create(config, data_)
        stage = stage_spec("original", config, data_)
        training = loop.StageTraining(stage, config, data_, run, None, InitialCodes(stage, config, None))
        sample = sample_positions(config.seed, stage, 0, config.num_samples)
        training.train_on_sample(sample, 0.1, 0)  # compiles FFCV's pipeline, benchmarks cuDNN
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("warn")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            training.train_on_sample(sample, 0.1, 1)
        torch.cuda.set_sync_debug_mode("default")
    steps = -(-config.num_samples // config.batch_size) * config.max_epoch
    return len([w for w in caught if "synchroniz" in str(w.message)]), steps


def host_syncs(table: Table, data: Path, device: str, commands: list) -> None:
    """An outer iteration syncs a few times per epoch (its loss check, the epoch's schedule on the device);
    a sync in the step itself would grow with the steps: twice the steps must not add any."""
    if device == "cpu":
        table.add("host syncs per outer iteration", "not measurable on a CPU", None)
        return
    (few, few_steps), (many, many_steps) = (count_syncs(data, device, find(commands, f"host syncs, {s} steps"))
                                            for s in (4, 8))
    table.add("host syncs per outer iteration (1 epoch)", f"{few} with {few_steps} steps, {many} with {many_steps} "
              f"steps: {many - few} from the steps", many <= few)


def multi_gpu(table: Table, work: Path, data: Path, device: str, commands: list, one: dict) -> None:
    gpus = gpu_count(device)
    if gpus < 2:
        table.add("1 vs N GPUs, contexts on other GPUs", "one GPU: skipped", None)
        return
    many = train_run(work, data, find(commands, f"small-cnn fp32 x{gpus}"), device)
    if "error" in one or "error" in many:
        table.add(f"torchrun 1 vs {gpus} {device} processes", one.get("error") or many.get("error"), False)
        return
    equal = float((one["codes"] == many["codes"]).mean())
    gap = abs(one["map"] - many["map"])
    table.add(f"torchrun 1 vs {gpus} {device} processes: equal codes",
              f"{equal:.4%} of bits equal (>= {ONE_VS_N_BITS:.1%}), mAP {many['map']:.4f} vs {one['map']:.4f} "
              f"(|gap| {gap:.4f} <= {ONE_VS_N_MAP})", equal >= ONE_VS_N_BITS and gap <= ONE_VS_N_MAP)
    if device == "cpu":
        return
    report = work / "contexts.json"
    probe = [*TORCHRUN, "--nproc_per_node", str(gpus), "--master_port", str(free_port()), str(Path(__file__)),
             "--probe", str(data), "--probe-report", str(report)]
    result = subprocess.run(probe, capture_output=True, text=True)
    if result.returncode != 0 or not report.is_file():
        table.add("CUDA contexts on other ranks' GPUs", last_line(result.stderr, "probe failed"), False)
        return
    found = json.loads(report.read_text())
    foreign = [f"rank {rank} on GPU {gpu}" for rank, gpus_held in enumerate(found) for gpu in gpus_held]
    table.add("CUDA contexts on other ranks' GPUs after loading and training", ", ".join(foreign) or "none",
              not foreign)


def probe(data: Path, report: Path) -> None:
    """Run under torchrun: every rank loads batches through the trainer's loaders and steps a network on its
    GPU, then says on which other visible GPUs it holds a primary context (asked of the CUDA driver in the
    process itself: nvidia-smi's process list is empty inside containers)."""
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
    foreign = [i for i in range(torch.cuda.device_count())
               if i != ctx.device.index and torch._C._cuda_hasPrimaryContext(i)]
    held = comm.gather_objects(foreign)
    if ctx.is_main:
        report.write_text(json.dumps(held))
    comm.barrier()
    comm.shutdown()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--workdir", type=Path, help="scratch folder (default: a temporary one)")
    parser.add_argument("--quick", action="store_true", help="toy sizes and the small CNN (CPU smoke run)")
    parser.add_argument("--skip-compile", action="store_true", help="leave out the torch.compile run (1-2 min)")
    parser.add_argument("--plan-only", action="store_true",
                        help="only run every trainer command of the check with --check-only (no training)")
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
    commands = trainer_commands(args.quick, gpu_count(args.device),
                                compile_too=not (args.skip_compile or args.quick))
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as scratch:
        work = args.workdir or Path(scratch)
        data = prepare_data(work, args.quick)
        if args.plan_only:
            plan_only(table, work, data, args.device, commands)
        else:
            cuda_tests(table, args.device)
            throughput(table, work, data, args.device, commands)
            pretrained_throughput(table, work, data, args.device, commands)
            nus_wide_sized_core(table, args.device, args.quick)
            one = bf16_against_fp32(table, work, data, args.device, commands, args.quick)
            host_syncs(table, data, args.device, commands)
            multi_gpu(table, work, data, args.device, commands, one)
    table.add("wall time", f"{time.perf_counter() - started:.0f} s", None)
    table.print()
    return 1 if table.failed else 0


if __name__ == "__main__":
    sys.exit(main())
