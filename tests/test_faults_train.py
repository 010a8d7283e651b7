"""Every test here is a bad input or a fault of the trainer: the exit code, a message that names the thing and
what was expected, and nothing lost (checksums of the folders involved, before and after)."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import TINY_TRAIN_ARGS as TINY, copy_run
from dihn_dist import dist, train


def checksums(folder: Path) -> dict:
    """Every file under a folder -> sha256 of its bytes."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(Path(folder).rglob("*")) if p.is_file()}


def train_cli(*args, env=None):
    """The trainer as users run it: (exit code, stderr)."""
    result = subprocess.run([sys.executable, "-m", "dihn_dist.train", *args], capture_output=True, text=True,
                            timeout=600, env={**os.environ, **(env or {})})
    return result.returncode, result.stderr


def error_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.startswith("error")]
    assert len(lines) == 1, stderr[-3000:]
    return lines[0]


# ----------------------------------------------------------------------------------------------------
# A failed start leaves nothing that blocks the corrected command


@pytest.mark.parametrize("bad, expected", [
    (["--num-samples", "100000"], "--num-samples 100000: expected 1..420"),
    (["--max-iter", "0"], "--max-iter: expected a positive number, got 0"),
    (["--lr", "-1"], "--lr: expected a positive value, got -1.0"),
    (["--batch-size", "0"], "--batch-size: expected a positive number, got 0"),
])
def test_bad_flags_create_no_run_folder(tiny_prepared, tmp_path, bad, expected):
    out = tmp_path / "run"
    code, stderr = train_cli("--data", str(tiny_prepared), "--out", str(out), *TINY, "--max-iter", "1", *bad)
    assert code == 2
    assert expected in error_line(stderr)
    assert not out.exists()


def test_corrected_command_runs_after_a_failed_start(finished_run, tiny_prepared, tmp_path, capsys):
    out = tmp_path / "run"
    assert train.main(["--data", str(tiny_prepared), "--out", str(out), *TINY, "--max-iter", "1",
                       "--stage", "original", "--pretrained", str(tmp_path / "missing.pth")]) == 2
    assert "--pretrained" in capsys.readouterr().err and not out.exists()
    broken = copy_run(finished_run, tmp_path / "old")
    (broken / "original" / "result.json").unlink()
    assert train.main(["--data", str(tiny_prepared), "--out", str(out), *TINY, "--max-iter", "1",
                       "--stage", "incremental", "--old-run", str(broken)]) == 2
    assert "no finished original stage" in capsys.readouterr().err and not out.exists()
    # the corrected command needs no --resume: nothing was left behind
    assert train.main(["--data", str(tiny_prepared), "--out", str(out), *TINY, "--max-iter", "1",
                       "--stage", "original"]) == 0


# ----------------------------------------------------------------------------------------------------
# Config files are checked by type, unknown stages at parse time


def test_yaml_exponent_without_dot_is_a_number(tmp_path):
    from dihn_dist.config import parse_config
    path = tmp_path / "c.yaml"
    path.write_text("lr: 1e-3\nmax_iter: 3\nstage: [original, retrain]\n")
    config = parse_config(["--config", str(path)])
    assert (config.lr, config.max_iter, config.stage) == (0.001, 3, ["original", "retrain"])


@pytest.mark.parametrize("text, expected", [
    ("max_iter: ten\n", "key 'max_iter': expected an integer, got str 'ten'"),
    ("soft_similarity: 1\n", "key 'soft_similarity': expected true or false"),
    ("stage: [original, foo]\n", "key 'stage': unknown stage 'foo'"),
    ("arch: 3\n", "key 'arch': expected a string"),
    ("code-lenght: 12\n", "unknown key 'code-lenght'"),
])
def test_config_file_errors_name_the_key_before_training(tiny_prepared, tmp_path, text, expected):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    out = tmp_path / "run"
    code, stderr = train_cli("--config", str(path), "--data", str(tiny_prepared), "--out", str(out), *TINY)
    assert code == 2
    line = error_line(stderr)
    assert str(path) in line and expected in line
    assert not out.exists()


def test_unknown_stage_on_the_command_line_is_a_usage_error(tiny_prepared, tmp_path):
    code, stderr = train_cli("--data", str(tiny_prepared), "--out", str(tmp_path / "r"), "--stage", "original,foo")
    assert code == 2 and "unknown stage 'foo'" in stderr and not (tmp_path / "r").exists()


# ----------------------------------------------------------------------------------------------------
# One line per error; exit 1 for runtime failures; --debug shows the traceback


def test_runtime_failure_is_one_line_with_exit_code_one(tiny_prepared, tmp_path):
    out = tmp_path / "run"
    args = ["--data", str(tiny_prepared), "--out", str(out), *TINY, "--max-iter", "3", "--stage", "original"]
    code, stderr = train_cli(*args, env={"DIHN_FAIL_AT": "rank=0,iteration=2"})
    assert code == 1
    assert "RuntimeError: injected failure" in error_line(stderr)
    assert "Traceback" not in stderr
    code, stderr = train_cli(*args, "--resume", "--debug", env={"DIHN_FAIL_AT": "rank=0,iteration=3"})
    assert code == 1 and "Traceback" in stderr


def test_non_finite_loss_on_one_rank_stops_every_rank(tiny_prepared, tmp_path):
    """Only rank 1's loss turns NaN: both ranks agree (per-epoch all-reduced totals) and the job ends, naming
    the iteration, instead of rank 0 waiting in a collective until the timeout."""
    from test_distributed import TORCHRUN, free_port, train_args
    out = tmp_path / "nan"
    command = [*TORCHRUN, "--nproc_per_node", "2", "--master_port", str(free_port()),
               *train_args(tiny_prepared, out, "--batch-size", "32", "--max-iter", "3", "--stage", "original",
                           "--collective-timeout", "120")]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "DIHN_FAIL_AT": "rank=1,iteration=2,kind=nan"})
    assert result.returncode != 0
    for rank in (0, 1):
        assert "iteration 2, epoch 1: non-finite loss" in (out / "logs" / f"rank{rank}.log").read_text() + \
            result.stderr, rank
    assert torch.load(out / "checkpoints" / "original.pt", weights_only=False)["iteration"] == 0


def test_device_index_that_is_not_the_local_rank_is_refused(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    with pytest.raises(ValueError, match=r"--device cuda:1: under torchrun each process uses its own GPU"):
        dist.select_device("cuda:1", local_rank=0, local_world_size=2)
    assert dist.select_device("cuda", local_rank=1, local_world_size=2) == torch.device("cuda", 1)
    assert dist.select_device("cuda:3", local_rank=0, local_world_size=1) == torch.device("cuda", 3)


# ----------------------------------------------------------------------------------------------------
# Stage commands merge into a run; hints repair exactly the folder they name


def test_one_more_stage_keeps_the_other_rows(tiny_prepared, tmp_path):
    out = tmp_path / "run"
    base = ["--data", str(tiny_prepared), "--out", str(out), *TINY, "--max-iter", "1"]
    assert train.main([*base, "--stage", "original,incremental"]) == 0
    before = json.loads((out / "metrics.json").read_text())
    original = checksums(out / "original")
    assert train.main([*base, "--stage", "retrain", "--resume"]) == 0
    after = json.loads((out / "metrics.json").read_text())
    assert [r["stage"] for r in after["rows"]] == ["original", "incremental", "retrain"]
    assert after["rows"][:2] == before["rows"] and after["stages"]["incremental"] == before["stages"]["incremental"]
    assert json.loads((out / "config.json").read_text())["stage"] == ["original", "incremental", "retrain"]
    assert checksums(out / "original") == original


def test_hint_on_a_copied_run_repairs_the_copy_only(finished_run, tmp_path):
    from dihn_dist.exported import load_run, load_stage
    copy = copy_run(finished_run, tmp_path / "moved" / "run")
    original_before = checksums(finished_run)
    (copy / "retrain" / "result.json").unlink()
    with pytest.raises(FileNotFoundError) as missing:  # what retrieve --stage retrain reports
        load_stage(load_run(copy), "retrain")
    # the hint is a command: run it as printed
    hint = str(missing.value).split("`")[1]
    assert f"--out {copy}" in hint
    program, *arguments = hint.split()
    assert program == "python"
    result = subprocess.run([sys.executable, *arguments], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (copy / "retrain" / "result.json").is_file()
    assert checksums(finished_run) == original_before
    rows = json.loads((copy / "metrics.json").read_text())["rows"]
    assert [r["stage"] for r in rows] == ["original", "incremental", "retrain"]


def test_stale_checkpoint_temp_file_is_removed_on_resume(tiny_prepared, tmp_path):
    out = tmp_path / "run"
    base = ["--data", str(tiny_prepared), "--out", str(out), *TINY, "--max-iter", "1", "--stage", "original"]
    assert train.main(base) == 0
    stale = out / "checkpoints" / ".original.pt.abc123.tmp"
    stale.write_bytes(b"half a checkpoint")
    assert train.main([*base, "--resume"]) == 0
    assert not stale.exists()


# ----------------------------------------------------------------------------------------------------
# Resuming on other data is refused, naming what changed


def test_resume_on_re_prepared_data_is_refused_and_the_run_is_untouched(tiny_prepared, tmp_path):
    from dihn_dist.prepare import main as prepare_main
    data = tmp_path / "data"
    shutil.copytree(tiny_prepared, data)
    out = tmp_path / "run"
    base = ["--data", str(data), "--out", str(out), *TINY, "--max-iter", "2", "--stage", "original"]
    assert train.main(base) == 0
    before = checksums(out)
    # the same --data re-prepared with other settings
    assert prepare_main(["--dataset", "fashion-mnist", "--out", str(data), "--database-per-class", "50",
                         "--query-per-class", "10", "--resolution", "28", "--num-workers", "2", "--force"]) == 0
    code, stderr = train_cli(*base, "--stage", "original,incremental", "--resume")
    assert code == 2
    line = error_line(stderr)
    assert "not the data this run started from" in line and "num_database: 600 -> 500" in line
    assert checksums(out) == before
