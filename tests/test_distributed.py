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
          "--lr", "1e-3", "--num-workers", "1", "--device", "cpu", "--seed", "5", "--augment", "crop-flip"]
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
    assert "resumed after iteration" in (out / "train.log").read_text()
    for name in ("database_codes.npy", "query_codes.npy"):
        assert np.array_equal(np.load(reference / "original" / name), np.load(out / "original" / name))


def test_a_failing_rank_stops_every_rank(tiny_prepared, tmp_path):
    out = tmp_path / "failing"
    started = time.time()
    env = {**os.environ, "DIHN_FAIL_AT": "rank=1,iteration=2"}
    command = [*TORCHRUN, "--nproc_per_node", "2", "--master_port", str(free_port()),
               *train_args(tiny_prepared, out, "--batch-size", "32", "--max-iter", "4", "--stage", "original")]
    result = subprocess.run(command, capture_output=True, text=True, timeout=240, env=env)
    elapsed = time.time() - started
    assert result.returncode != 0
    assert "injected failure" in result.stdout + result.stderr
    assert elapsed < 120
    assert not (out / "original" / "result.json").exists()


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
