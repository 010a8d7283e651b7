"""Files that several processes share: the ranks of one job agree on rank 0's verdict about the run folder
(a late rank never judges a folder rank 0 has just created), config.json names absolute paths (a resume
from another folder continues the same run), and one trainer at a time holds a run folder (its lock)."""
from __future__ import annotations

import fcntl
import json
import os
import socket
import subprocess
import sys

import pytest
from conftest import TINY_TRAIN_ARGS as TINY
from test_distributed import TORCHRUN, free_port, train_args
from test_faults import checksums, error_line, train_cli

from dihn_dist import evaluate, train
from dihn_dist.common.formats import RUN_LOCK

pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # numba finalizers

DIST = ["--batch-size", "32", "--max-iter", "1"]


def torchrun_late_rank(data, out, *extra):
    """Two processes under torchrun, rank 1 starting its checks 3 s after rank 0 (DIHN_DELAY_RANK)."""
    command = [*TORCHRUN, "--nproc_per_node", "2", "--master_port", str(free_port()),
               *train_args(data, out, *DIST, *extra)]
    return subprocess.run(command, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "DIHN_DELAY_RANK": "rank=1,seconds=3"})


def test_a_late_rank_agrees_with_rank_0_on_a_new_run_and_on_its_resume(tiny_prepared, tmp_path):
    """Before rank 0 decided for every rank, rank 1 checked --out after rank 0 had created the run there
    and refused it ("already holds a run")."""
    out = tmp_path / "run"
    result = torchrun_late_rank(tiny_prepared, out, "--stage", "original")
    assert result.returncode == 0, result.stderr[-3000:]
    assert (out / "original" / "result.json").is_file()
    result = torchrun_late_rank(tiny_prepared, out, "--stage", "original,incremental", "--resume")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "stage original: already complete" in (out / "train.log").read_text()
    assert (out / "incremental" / "result.json").is_file()
    assert [row["stage"] for row in json.loads((out / "metrics.json").read_text())["rows"]] == \
        ["original", "incremental"]


def test_a_late_rank_gets_rank_0s_refusal(tiny_prepared, tmp_path):
    """A run there without --resume: both ranks end with rank 0's line, and the run is untouched."""
    out = tmp_path / "run"
    assert train.main(["--data", str(tiny_prepared), "--out", str(out), *TINY, "--max-iter", "1",
                       "--stage", "original"]) == 0
    before = checksums(out)
    result = torchrun_late_rank(tiny_prepared, out, "--stage", "original")
    assert result.returncode != 0
    for rank in (0, 1):
        assert f"error (rank {rank}): --out {out}: already holds a run" in result.stderr, result.stderr[-3000:]
    assert checksums(out) == before


def test_resume_from_another_folder_continues_the_same_run(tiny_prepared, tmp_path):
    """config.json used to keep --out as typed: `--config RUN/config.json --resume` run elsewhere trained a
    second run under that other folder."""
    started, elsewhere = tmp_path / "started", tmp_path / "elsewhere"
    started.mkdir()
    elsewhere.mkdir()
    command = [sys.executable, "-m", "dihn_dist.train", "--data", str(tiny_prepared), "--out", "runs/r", *TINY,
               "--max-iter", "1", "--stage", "original"]
    result = subprocess.run(command, cwd=started, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    run = started / "runs" / "r"
    saved = json.loads((run / "config.json").read_text())
    assert saved["out"] == str(run) and saved["data"] == str(tiny_prepared.resolve())
    result = subprocess.run([sys.executable, "-m", "dihn_dist.train", "--config", str(run / "config.json"),
                             "--resume"], cwd=elsewhere, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert list(elsewhere.iterdir()) == [], "a second run was started"
    assert "stage original: already complete" in (run / "train.log").read_text()


def hold_lock(folder, text: str):
    """Take a run folder's lock the way a trainer does; the open file holds it until closed."""
    handle = open(folder / RUN_LOCK, "a+")
    fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    handle.seek(0)
    handle.truncate()
    handle.write(text)
    handle.flush()
    return handle


def test_a_second_trainer_on_a_run_folder_is_refused_naming_the_holder(tiny_prepared, tmp_path):
    out = tmp_path / "run"
    base = ["--data", str(tiny_prepared), "--out", str(out), *TINY, "--max-iter", "1", "--stage", "original"]
    assert train.main(base) == 0
    holder = f"pid {os.getpid()} on host {socket.gethostname()}\n"
    handle = hold_lock(out, holder)
    before = checksums(out)
    try:
        code, stderr = train_cli(*base, "--resume")
    finally:
        handle.close()
    assert code == 2
    line = error_line(stderr)
    assert f"--out {out}: another trainer is using this run folder (pid {os.getpid()} on host " \
           f"{socket.gethostname()};" in line and str(out / RUN_LOCK) in line
    assert checksums(out) == before
    # the lock goes with its holder: the same command now resumes
    code, stderr = train_cli(*base, "--resume")
    assert code == 0, stderr[-3000:]
    assert "stage original: already complete" in (out / "train.log").read_text()


def test_a_new_run_folder_taken_meanwhile_is_refused(tiny_prepared, tmp_path):
    """Two trainers started on the same new --out: the second finds the first's lock when it creates the run."""
    out = tmp_path / "run"
    out.mkdir()
    handle = hold_lock(out, "pid 4242 on host elsewhere\n")
    try:
        code, stderr = train_cli("--data", str(tiny_prepared), "--out", str(out), *TINY, "--max-iter", "1",
                                 "--stage", "original")
    finally:
        handle.close()
    assert code == 2
    assert "another trainer is using this run folder (pid 4242 on host elsewhere;" in error_line(stderr)
    assert sorted(p.name for p in out.iterdir()) == [RUN_LOCK]
    assert (out / RUN_LOCK).read_text() == "pid 4242 on host elsewhere\n"


@pytest.fixture(scope="module")
def small_run(tiny_prepared, tmp_path_factory):
    out = tmp_path_factory.mktemp("evaluate_out") / "run"
    assert train.main(["--data", str(tiny_prepared), "--out", str(out), *TINY, "--max-iter", "1",
                       "--stage", "original"]) == 0
    return out


@pytest.mark.parametrize("target, expected", [
    ("data", "is a prepared data folder; a report never writes into data"),
    ("run", "is a run folder; write the report into a folder of its own"),
    ("stage", "is a folder of the run"),
    ("file", "exists and is not a folder"),
])
def test_evaluate_out_refuses_folders_that_are_not_its_own(small_run, tiny_prepared, tmp_path, capsys, target,
                                                           expected):
    file = tmp_path / "notes.txt"
    file.write_text("keep me")
    out = {"data": tiny_prepared, "run": small_run, "stage": small_run / "original", "file": file}[target]
    watched = out if out.is_dir() else tmp_path
    before = checksums(watched)
    capsys.readouterr()
    assert evaluate.main([str(small_run), "--out", str(out)]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: --out {out}: {expected}"), lines
    assert checksums(watched) == before
