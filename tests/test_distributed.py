"""torchrun with gloo on CPU: N processes x batch b follow 1 process x batch N*b; rendezvous across two
agents; a killed worker is restarted and resumes; a failing rank stops the whole job."""
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import psutil
import pytest

COMMON = ["--arch", "small-cnn", "--code-length", "8", "--max-epoch", "1", "--num-samples", "120",
          "--lr", "1e-3", "--num-workers", "1", "--device", "cpu", "--seed", "5", "--augment", "crop-flip",
          "--checkpoint-every", "1"]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train_args(data, out, *extra):
    return ["-m", "dihn_dist.train", "--data", str(data), "--out", str(out), *COMMON, *extra]


def torchrun(nproc, data, out, *extra, agent=(), timeout=300):
    command = [*TORCHRUN, "--nproc_per_node", str(nproc), "--master_port", str(free_port()), *agent,
               *train_args(data, out, *extra)]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout)


def single_process(data, out, *extra):
    command = [sys.executable, *train_args(data, out, *extra)]
    return subprocess.run(command, capture_output=True, text=True, timeout=300)


def iteration_losses(out, stage):
    import json
    history = json.loads((out / "metrics.json").read_text())["stages"][stage]["iterations"]
    return np.array([[it["loss_hash"], it["loss_quantization"], it["loss_balance"]] for it in history])


@pytest.fixture(scope="module")
def one_process_run(tiny_prepared, tmp_path_factory):
    out = tmp_path_factory.mktemp("dist") / "one"
    result = single_process(tiny_prepared, out, "--batch-size", "32", "--max-iter", "2", "--stage", "all")
    assert result.returncode == 0, result.stderr[-3000:]
    return out


def assert_same_run(a, b):
    for stage in ("original", "incremental"):
        np.testing.assert_allclose(iteration_losses(a, stage), iteration_losses(b, stage), rtol=1e-4, atol=1e-6)
        for name in ("database_codes.npy", "query_codes.npy"):
            assert np.array_equal(np.load(a / stage / name), np.load(b / stage / name)), (stage, name)


def test_two_processes_follow_one_process_with_the_same_global_batch(one_process_run, tiny_prepared, tmp_path):
    out = tmp_path / "two"
    result = torchrun(2, tiny_prepared, out, "--batch-size", "32", "--max-iter", "2", "--stage", "all")
    assert result.returncode == 0, result.stderr[-3000:]
    assert_same_run(one_process_run, out)
    # only rank 0 writes the shared outputs; every rank keeps its own log
    assert (out / "logs" / "rank1.log").is_file() and (out / "logs" / "rank0.log").is_file()
    assert "rank1" not in "".join(p.name for p in (out / "checkpoints").iterdir())


def test_two_agents_rendezvous_like_two_nodes(one_process_run, tiny_prepared, tmp_path):
    out = tmp_path / "two-nodes"
    port = free_port()
    agents = [subprocess.Popen(
        [*TORCHRUN, "--nnodes", "2", "--nproc_per_node", "1", "--rdzv-backend", "c10d",
         "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "two-node-test",
         *train_args(tiny_prepared, out, "--batch-size", "32", "--max-iter", "2", "--stage", "all")],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for _ in range(2)]
    outputs = [agent.communicate(timeout=300)[0] for agent in agents]
    assert all(agent.returncode == 0 for agent in agents), outputs[0][-2000:] + outputs[1][-2000:]
    assert_same_run(one_process_run, out)


def test_killed_worker_is_restarted_and_resumes_to_the_same_codes(tiny_prepared, tmp_path):
    args = ["--batch-size", "32", "--max-iter", "4", "--stage", "original", "--resume"]
    reference = tmp_path / "reference"
    assert torchrun(2, tiny_prepared, reference, *args).returncode == 0

    out = tmp_path / "restarted"
    # The elastic (c10d) rendezvous, as recommended for --max-restarts.
    agent = subprocess.Popen([*TORCHRUN, "--nproc_per_node", "2", "--max-restarts", "1", "--rdzv-backend", "c10d",
                              "--rdzv-endpoint", f"127.0.0.1:{free_port()}", *train_args(tiny_prepared, out, *args)],
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    checkpoint = out / "checkpoints" / "original.pt"
    deadline = time.time() + 180
    while not checkpoint.exists() and time.time() < deadline and agent.poll() is None:
        time.sleep(0.02)
    assert checkpoint.exists(), "no checkpoint was written"
    assert not (out / "original" / "result.json").exists(), "the stage finished before the kill"
    workers = [p for p in psutil.Process(agent.pid).children(recursive=True) if "dihn_dist.train" in " ".join(p.cmdline())]
    assert workers, "no worker process found"
    os.kill(workers[-1].pid, signal.SIGKILL)
    output = agent.communicate(timeout=300)[0]
    assert agent.returncode == 0, output[-3000:]
    assert "resumed after outer iteration" in (out / "train.log").read_text()
    for name in ("database_codes.npy", "query_codes.npy"):
        assert np.array_equal(np.load(reference / "original" / name), np.load(out / "original" / name))


def test_a_failing_rank_stops_every_rank(tiny_prepared, tmp_path):
    out = tmp_path / "failing"
    env = {**os.environ, "DIHN_FAIL_AT": "rank=1,iteration=2"}
    command = [*TORCHRUN, "--nproc_per_node", "2", "--master_port", str(free_port()),
               *train_args(tiny_prepared, out, "--batch-size", "32", "--max-iter", "4", "--stage", "original")]
    # Rank 0 must not wait in a collective for the failed rank: the job ends by itself, failed. The
    # subprocess timeout is only a watchdog for that hang (a quarter of the 1800 s collective timeout).
    result = subprocess.run(command, capture_output=True, text=True, timeout=450, env=env)
    assert result.returncode != 0
    assert "injected failure" in result.stdout + result.stderr
    assert not (out / "original" / "result.json").exists()


def test_bf16_gradient_compression_under_gloo(one_process_run, tiny_prepared, tmp_path):
    """--grad-compression bf16 (DDP's bf16_compress_hook, which gloo carries): the run completes, its
    trajectory leaves the exact one (the hook is active) but stays close to it."""
    out = tmp_path / "bf16-grads"
    result = torchrun(2, tiny_prepared, out, "--batch-size", "32", "--max-iter", "2", "--stage", "all",
                      "--grad-compression", "bf16")
    assert result.returncode == 0, result.stderr[-3000:]
    for stage in ("original", "incremental"):
        compressed, exact = iteration_losses(out, stage), iteration_losses(one_process_run, stage)
        np.testing.assert_allclose(compressed, exact, rtol=0.05, atol=1e-6)
        assert not np.allclose(compressed, exact, rtol=1e-6, atol=0), f"{stage}: compression changed nothing"
        codes = np.load(out / stage / "database_codes.npy")
        assert (codes == np.load(one_process_run / stage / "database_codes.npy")).mean() > 0.8


READ_ON_RANK0 = """
import json, sys
from dihn_dist.distributed import comm
from dihn_dist.data.prepared import load_prepared
from dihn_dist.training.config import parse_config
from dihn_dist.training.runfolder import RunFolder, load_old_codes
data_dir, run_dir, missing, report = sys.argv[1:]
ctx = comm.init("cpu")
root = run_dir if ctx.is_main else missing  # the other rank's node does not see the run folder (yet)
config = parse_config(["--data", data_dir, "--out", root, "--stage", "incremental", "--code-length", "8"])
run = RunFolder(root)
summary = run.write_metrics()
codes = comm.rank0_decides(lambda: load_old_codes(config, load_prepared(data_dir), run))
try:
    comm.rank0_decides(lambda: RunFolder(missing).read_json("result.json"))
    error = None
except FileNotFoundError as raised:
    error = type(raised).__name__
with open(f"{report}.{ctx.rank}", "w") as f:
    json.dump({"rows": summary["rows"], "codes": codes.tolist(), "error": error}, f)
comm.shutdown()
"""


def test_files_rank0_just_wrote_are_read_on_rank0_and_broadcast(finished_run, tiny_prepared, tmp_path):
    """metrics.json's stage results and stage 2's B_old come from rank 0's reading (another node's file
    system may not show rank 0's fresh files yet); an error reading them is raised on every rank."""
    from conftest import copy_run
    run = copy_run(finished_run, tmp_path / "run")
    script, report = tmp_path / "read.py", tmp_path / "report"
    script.write_text(READ_ON_RANK0)
    result = subprocess.run([*TORCHRUN, "--nproc_per_node", "2", "--master_port", str(free_port()), str(script),
                             str(tiny_prepared), str(run), str(tmp_path / "not-here"), str(report)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    import json
    rank0, rank1 = (json.loads(report.with_name(f"report.{rank}").read_text()) for rank in (0, 1))
    assert rank0 == rank1
    assert {row["stage"] for row in rank1["rows"]} == {"original", "incremental", "retrain"}
    assert np.array_equal(np.array(rank1["codes"]), np.load(run / "original" / "database_codes.npy"))
    assert rank1["error"] == "FileNotFoundError"


def test_a_batch_norm_network_trains_under_two_cpu_processes(tiny_prepared, tmp_path):
    """EfficientNet-Lite (batch norm) under torchrun on CPU: SyncBatchNorm refuses CPU tensors, so there each
    process keeps plain batch norm (and says that the run is not the one-process run's) instead of failing
    in the first forward."""
    out = tmp_path / "lite"
    result = torchrun(2, tiny_prepared, out, "--arch", "efficientnet-lite0", "--resolution", "32", "--batch-size",
                      "32", "--max-iter", "1", "--stage", "original")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "each process normalises with its own share" in (out / "train.log").read_text()
    assert np.load(out / "original" / "database_codes.npy").shape == (420, 8)
