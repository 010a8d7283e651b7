"""Every hint a tool prints is followed here: the test provokes the message, takes the command out of it,
runs it (in this process, through the same `main` that `python -m dihn_dist.X` runs), and checks that it
helped: the command that failed now succeeds. Hints with a placeholder (DATA) get the tiny test data for it,
and commands that start a fresh training get the tiny settings appended (later flags win)."""
from __future__ import annotations

import json
import re
import shlex
import shutil
from pathlib import Path
from typing import List, Tuple

import pytest
from conftest import TINY_TRAIN_ARGS as TINY
from conftest import copy_run

from dihn_dist import prepare, train
from dihn_dist.reports import convergence, evaluate
from dihn_dist.serving import export, retrieve

pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # numba finalizers

CLIS = {"dihn_dist.train": train.main, "dihn_dist.prepare": prepare.main, "dihn_dist.evaluate": evaluate.main,
        "dihn_dist.export": export.main, "dihn_dist.retrieve": retrieve.main,
        "dihn_dist.convergence": convergence.main}
PACKAGE = Path(__file__).resolve().parents[1] / "dihn_dist"


def cli(capsys, name: str, *argv) -> Tuple[int, str]:
    """(exit code, the error line or "") of `python -m dihn_dist.NAME ARGV`."""
    capsys.readouterr()
    code = CLIS[f"dihn_dist.{name}"]([str(a) for a in argv])
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
    return code, errors[-1] if errors else ""


def hinted_command(message: str) -> List[str]:
    """The command a message suggests (between backticks, or after "re-run"), as argv words."""
    quoted = re.findall(r"`(python -m [^`]+)`", message)
    rerun = re.findall(r"re-run (python -m dihn_dist\.\w+ .*--force)", message)
    commands = quoted or rerun
    assert len(commands) == 1, f"expected one command in: {message}"
    return shlex.split(commands[0])


def follow(capsys, message: str, *extra, data: Path = None) -> List[str]:
    """Do what the message says: delete what it says to delete, run its command (DATA -> `data`, `extra`
    appended); assert that the command succeeded. Returns the command."""
    for path in re.findall(r"delete (\S+) and run", message):
        Path(path).unlink()
    words = hinted_command(message)
    assert words[:2] == ["python", "-m"] and words[2] in CLIS, words
    arguments = [str(data) if word == "DATA" else word for word in words[3:]]
    assert "DATA" not in words or data is not None, f"{message}: the test has no DATA for the placeholder"
    capsys.readouterr()
    code = CLIS[words[2]]([*arguments, *extra])
    assert code == 0, f"the hinted command {' '.join(words)} failed:\n{capsys.readouterr().err[-3000:]}"
    return words


# ----------------------------------------------------------------------------------------------------
# The reports and serving tools on runs that lack something


def test_rounds_report_of_a_killed_first_round_resumes_round_one(chain, tmp_path, capsys):
    """Round 1 killed in its only stage: the hint resumes that stage (a first round has no stage 2: its data
    has no new items, so `--stage incremental` could never work)."""
    first = copy_run(chain["runs"][0], tmp_path / "run1")
    shutil.rmtree(first / "original")  # what a kill before the stage's end leaves: its checkpoint, no export
    assert (first / "checkpoints" / "original.pt").is_file()
    report = ["evaluate", first, chain["runs"][1], "--out", tmp_path / "report"]
    code, message = cli(capsys, *report)
    assert code == 2 and "stage 'original' has not finished" in message
    command = follow(capsys, message)
    assert command[command.index("--stage") + 1] == "original" and command[command.index("--out") + 1] == str(first)
    assert cli(capsys, *report)[0] == 0


def test_retrieve_without_stage_on_a_stage_one_run_uses_stage_one(finished_run, tmp_path, capsys):
    run = copy_run(finished_run, tmp_path / "run")
    for stage in ("incremental", "retrain"):
        shutil.rmtree(run / stage)
    capsys.readouterr()
    assert retrieve.main([str(run), "--query", "0", "--topk", "3", "--out", str(tmp_path / "q0.png")]) == 0
    assert ", stage original, code" in capsys.readouterr().out
    # A stage it has not (yet): the hint trains it, and the same command then succeeds.
    asked = ["retrieve", run, "--query", "0", "--stage", "retrain", "--out", tmp_path / "q0r.png"]
    code, message = cli(capsys, *asked)
    assert code == 2 and "or pass --stage original" in message
    follow(capsys, message)
    assert cli(capsys, *asked)[0] == 0


def test_evaluate_on_a_data_folder_names_a_run_to_train_beside_it(tiny_prepared, tmp_path, capsys):
    data = tmp_path / "data"
    shutil.copytree(tiny_prepared, data)
    code, message = cli(capsys, "evaluate", data)
    assert code == 2 and f"{data} is a prepared data folder, not a run folder" in message
    command = follow(capsys, message, *TINY, "--max-iter", "1", "--stage", "original")
    run = Path(command[command.index("--out") + 1])
    assert run == tmp_path / "data-run"
    assert cli(capsys, "evaluate", run, "--out", tmp_path / "report")[0] == 0


def test_evaluate_on_a_missing_or_empty_folder_names_the_training_that_writes_it(tiny_prepared, tmp_path, capsys):
    for run in (tmp_path / "missing", tmp_path / "empty"):
        if run.name == "empty":
            run.mkdir()
        code, message = cli(capsys, "evaluate", run)
        assert code == 2 and "DATA: a prepared data folder" in message
        follow(capsys, message, *TINY, "--max-iter", "1", "--stage", "original", data=tiny_prepared)
        assert cli(capsys, "evaluate", run)[0] == 0


def test_convergence_of_a_stage_the_run_never_had_names_the_command_that_adds_it(finished_run, tmp_path, capsys):
    """The run was asked for stages original and incremental only: resuming it would change nothing, the
    hint must add the stage."""
    run = copy_run(finished_run, tmp_path / "run")
    shutil.rmtree(run / "retrain")
    (run / "checkpoints" / "retrain.pt").unlink()
    config = json.loads((run / "config.json").read_text())
    (run / "config.json").write_text(json.dumps({**config, "stage": ["original", "incremental"]}))
    code, message = cli(capsys, "convergence", run)
    assert code == 2 and "or pass --stage original or incremental" in message
    assert "--stage retrain --resume" in message
    follow(capsys, message)
    assert cli(capsys, "convergence", run)[0] == 0


@pytest.mark.parametrize("damage, command", [
    ("query_labels.npy", "evaluate"),                      # missing: --resume writes the labels again
    ("manifest.json=", "evaluate"),                        # not JSON: delete it, --resume writes it again
    ("incremental/result.json=", "evaluate"),              # not JSON: delete it, re-exported from the checkpoint
    ("incremental/query_codes.npy", "export"),             # missing export file of a finished stage
    ("original,incremental,retrain", "export"),            # no finished stage at all
])
def test_hints_of_a_damaged_run_repair_it(finished_run, tmp_path, capsys, damage, command):
    run = copy_run(finished_run, tmp_path / "run")
    if damage.endswith("="):
        (run / damage[:-1]).write_text("{half written")
    elif "," in damage:
        for stage in damage.split(","):
            shutil.rmtree(run / stage)
    else:
        (run / damage).unlink()
    argv = [run, "--out", tmp_path / "report"] if command == "evaluate" else [run, "--faiss", tmp_path / "i.faiss"]
    code, message = cli(capsys, command, *argv)
    assert code == 2, message
    follow(capsys, message)
    assert cli(capsys, command, *argv)[0] == 0


# ----------------------------------------------------------------------------------------------------
# The trainer and prepare


def test_trainer_hints_lead_to_a_run_that_goes_on(finished_run, tiny_prepared, tmp_path, capsys):
    run = copy_run(finished_run, tmp_path / "run")
    base = ["--data", tiny_prepared, "--out", run, *TINY, "--max-iter", "2", "--stage", "original,incremental,retrain"]
    code, message = cli(capsys, "train", *base)
    assert code == 2 and "pass --resume to continue it" in message
    assert cli(capsys, "train", *base, "--resume")[0] == 0
    code, message = cli(capsys, "train", *base, "--code-length", "16", "--resume")
    assert code == 2 and "other settings" in message
    follow(capsys, message)
    # stage 2 on a fresh folder without stage 1: the hinted --stage makes the same command work
    fresh = ["--data", tiny_prepared, "--out", tmp_path / "fresh", *TINY, "--max-iter", "1"]
    code, message = cli(capsys, "train", *fresh, "--stage", "incremental")
    assert code == 2 and "pass --stage original,incremental to train it first" in message
    assert cli(capsys, "train", *fresh, "--stage", "original,incremental")[0] == 0


def test_damaged_preparation_hint_rebuilds_it(tiny_prepared, tmp_path, capsys):
    data = tmp_path / "data"
    shutil.copytree(tiny_prepared, data)
    beton = data / "query.beton"
    beton.write_bytes(beton.read_bytes()[:1000])
    out = tmp_path / "run"
    args = ["--data", data, "--out", out, *TINY, "--max-iter", "1", "--stage", "original"]
    code, message = cli(capsys, "train", *args)
    assert code == 2 and "truncated" in message and not out.exists()
    follow(capsys, message, "--num-workers", "2")
    assert cli(capsys, "train", *args)[0] == 0


# ----------------------------------------------------------------------------------------------------
# No hint goes untested


# The modules whose messages hold a command to run: in backticks, or made by train_command,
# stage_train_command or prepare_command. Each kind of hint of theirs is followed above; a new module that
# prints commands fails this test until a test follows its hints and it is listed here.
HINTING_MODULES = {"data/prepared.py", "training/run_reader.py", "training/runfolder.py"}


def test_every_module_that_prints_a_command_is_known():
    command = re.compile(r"f\".*(`python -m|\{(stage_)?train_command\(|\{prepare_command\()")
    hinting = {str(path.relative_to(PACKAGE)) for path in PACKAGE.rglob("*.py")
               if any(command.search(line) for line in path.read_text().splitlines())}
    assert hinting == HINTING_MODULES
