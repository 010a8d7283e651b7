"""Every test here is a bad input or a fault: exit code, a message that names the thing and what was expected,
and nothing lost (checksums of the folders involved, before and after). Prepare first, then the trainer."""
from __future__ import annotations

import contextlib
import hashlib
import json
import multiprocessing
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY_TRAIN_ARGS as TINY
from conftest import copy_run
from PIL import Image

from dihn_dist import prepare as prepare_module
from dihn_dist import train
from dihn_dist.common.errors import run_command
from dihn_dist.common.formats import RUN_FORMAT
from dihn_dist.data import writer as beton_writer
from dihn_dist.data.prepared import load_prepared, verify_prepared
from dihn_dist.data.sources import FileImages
from dihn_dist.distributed import machine

pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # numba finalizers

# The options tiny_prepared (conftest) was made with.
TINY_OPTIONS = ["--dataset", "fashion-mnist", "--database-per-class", "60", "--query-per-class", "10",
                "--resolution", "28"]


def checksums(folder: Path) -> dict:
    """sha256 of every file under `folder`, by relative path: equal before and after = nothing lost."""
    return {str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
            for path in sorted(folder.rglob("*")) if path.is_file()}


def prepare_cli(capsys, *argv, workers: int = 1):
    """(exit code, the error line) of `python -m dihn_dist.prepare ARGV`: on failure, stderr must be that one
    line and nothing else (no traceback, no warning above it)."""
    capsys.readouterr()
    code = prepare_module.main([str(a) for a in argv] + ["--num-workers", str(workers)])
    stderr = capsys.readouterr().err
    return code, (error_line(stderr, after_progress=True) if code else "")


def load_cli(capsys, folder: Path):
    """(exit code, the error line) of loading prepared data the way every command does."""
    capsys.readouterr()
    code = run_command(lambda: load_prepared(folder) and 0, debug=False)
    stderr = capsys.readouterr().err
    return code, (error_line(stderr) if code else "")


def assert_nothing_written(out: Path) -> None:
    assert not out.exists()
    assert not list(out.parent.glob(f".{out.name}.*")), "a temporary folder was left behind"


# ----------------------------------------------------------------------------------------------------------
# --out: folders that are not prepare's to write


def fake_run_folder(folder: Path, tiny_prepared: Path) -> Path:
    """What `python -m dihn_dist.train --out` leaves: its marker, a copy of the data's manifest, results."""
    (folder / "checkpoints").mkdir(parents=True)
    (folder / "original").mkdir()
    (folder / "format.json").write_text(json.dumps(RUN_FORMAT))
    shutil.copy(tiny_prepared / "manifest.json", folder / "manifest.json")
    shutil.copy(tiny_prepared / "database_labels.npy", folder / "database_labels.npy")
    (folder / "config.json").write_text(json.dumps({"code_length": 8, "arch": "small-cnn"}))
    (folder / "checkpoints" / "incremental.pt").write_bytes(os.urandom(4096))
    (folder / "original" / "model.pt").write_bytes(os.urandom(4096))
    np.save(folder / "original" / "database_codes.npy", np.ones((420, 8), dtype=np.int8))
    return folder


@pytest.mark.parametrize("force", [[], ["--force"]])
def test_out_a_run_folder_is_refused_even_with_force(tiny_prepared, tmp_path, capsys, force):
    run = fake_run_folder(tmp_path / "run", tiny_prepared)
    before = checksums(run)
    code, message = prepare_cli(capsys, *TINY_OPTIONS, "--out", run, *force)
    assert code == 2
    assert f"--out {run} is a training run folder" in message and "never writes into a run folder" in message
    assert "even with --force" in message and "choose another --out" in message
    assert checksums(run) == before
    assert not list(tmp_path.glob(".run.*"))


@pytest.mark.parametrize("force", [[], ["--force"]])
def test_out_a_foreign_folder_is_refused_even_with_force(tiny_prepared, tmp_path, capsys, force):
    """Not ours although it holds a preparation's manifest.json: only format.json says what a folder is."""
    out = tmp_path / "mine"
    (out / "sub").mkdir(parents=True)
    (out / "notes.txt").write_text("keep me")
    (out / "sub" / "data.bin").write_bytes(os.urandom(1000))
    shutil.copy(tiny_prepared / "manifest.json", out / "manifest.json")
    before = checksums(out)
    code, message = prepare_cli(capsys, *TINY_OPTIONS, "--out", out, *force)
    assert code == 2
    assert f"--out {out}: the folder is not empty and is not a dihn_dist preparation" in message
    assert "format.json" in message and "empty it or choose another --out" in message
    assert checksums(out) == before


def test_out_a_file_is_refused(tmp_path, capsys):
    out = tmp_path / "file"
    out.write_text("keep me")
    code, message = prepare_cli(capsys, *TINY_OPTIONS, "--out", out, "--force")
    assert code == 2 and f"--out {out}: exists and is not a folder" in message
    assert out.read_text() == "keep me"


def test_other_options_need_force_and_name_what_would_be_deleted(tiny_prepared, tmp_path, capsys):
    out = tmp_path / "prepared"
    shutil.copytree(tiny_prepared, out)
    before = checksums(out)
    code, message = prepare_cli(capsys, *TINY_OPTIONS[:-3], "9", "--resolution", "28", "--out", out)
    assert code == 2
    assert f"--out {out} holds a preparation made with other options (query_per_class: 10 -> 9)" in message
    files = list(out.iterdir())
    total = sum(path.stat().st_size for path in files)
    beton = (out / "database.beton").stat().st_size
    assert f"pass --force to replace it, which deletes its {len(files)} files, {total / 2 ** 20:.1f} MiB: " in message
    assert f"database.beton ({beton / 2 ** 20:.1f} MiB)" in message and "manifest.json (" in message
    assert checksums(out) == before


def test_a_preparation_holding_other_files_is_not_replaced_even_with_force(tiny_prepared, tmp_path, capsys):
    out = tmp_path / "prepared"
    shutil.copytree(tiny_prepared, out)
    (out / "my_notes.txt").write_text("keep me")
    before = checksums(out)
    code, message = prepare_cli(capsys, *TINY_OPTIONS[:-3], "9", "--resolution", "28", "--out", out, "--force")
    assert code == 2
    assert f"--out {out} holds a preparation and also my_notes.txt, which no preparation writes" in message
    assert "move it out" in message
    assert checksums(out) == before


# ----------------------------------------------------------------------------------------------------------
# Damaged prepared files: named on load, and not silently replaced


def test_truncated_database_beton_is_named(tiny_prepared, tmp_path, capsys):
    folder = tmp_path / "prepared"
    shutil.copytree(tiny_prepared, folder)
    beton = folder / "database.beton"
    size = beton.stat().st_size
    os.truncate(beton, size // 2)
    before = checksums(folder)
    code, message = load_cli(capsys, folder)
    assert code == 2 and len(message.splitlines()) == 1
    assert f"{beton}: expected {size:,} bytes (as listed in manifest.json), found {size // 2:,}" in message
    assert "truncated" in message
    assert f"re-run python -m dihn_dist.prepare --dataset fashion-mnist --resolution 28 --database-per-class 60 " \
           f"--query-per-class 10 --out {folder} --force" in message
    # prepare does not take it for complete, nor replace it without --force
    code, message = prepare_cli(capsys, *TINY_OPTIONS, "--out", folder)
    assert code == 2 and "holds a preparation that is damaged (database.beton: expected" in message
    assert "pass --force to replace it" in message
    assert checksums(folder) == before


def test_swapped_beton_is_named(tiny_prepared, tmp_path, capsys):
    folder = tmp_path / "prepared"
    shutil.copytree(tiny_prepared, folder)
    database, query = folder / "database.beton", folder / "query.beton"
    shutil.copy(query, database)
    code, message = load_cli(capsys, folder)
    assert code == 2 and f"{database}: expected" in message and "replaced" in message
    # The same size, other bytes (the query part padded to the database's size): the fingerprint tells.
    size = (tiny_prepared / "database.beton").stat().st_size
    os.truncate(database, size)
    before = checksums(folder)
    code, message = load_cli(capsys, folder)
    assert code == 2
    assert f"{database}: fingerprint differs: the file was rewritten or replaced; re-run python -m " \
           f"dihn_dist.prepare" in message and message.endswith("--force")
    with pytest.raises(ValueError, match="database.beton: fingerprint differs"):
        verify_prepared(load_prepared(folder, fingerprints=False))
    assert checksums(folder) == before


def test_load_refuses_a_run_folder(tiny_prepared, tmp_path, capsys):
    run = fake_run_folder(tmp_path / "run", tiny_prepared)
    before = checksums(run)
    code, message = load_cli(capsys, run)
    assert code == 2 and f"{run} is a training run folder, not prepared data" in message
    assert checksums(run) == before


# ----------------------------------------------------------------------------------------------------------
# Degenerate images and writer workers that die


def write_image_list(folder: Path, extra: dict = None) -> dict:
    """A tiny image-list dataset of 28 px PNGs, 3 classes, --num-seen 2: database lines 1-4 original, 5-6
    incremental; `extra` = {line number: PIL image} replaces those database images."""
    rng = np.random.default_rng(0)
    (folder / "img").mkdir(parents=True)
    lists = {"db": [0, 1, 0, 1, 2, 2], "q": [0, 1, 2]}
    for name, classes in lists.items():
        lines = []
        for i, label in enumerate(classes):
            path = f"img/{name}{i}.png"
            image = (extra or {}).get(i + 1) if name == "db" else None
            image = image or Image.fromarray(rng.integers(0, 256, (28, 28, 3), dtype=np.uint8))
            image.save(folder / path)
            lines.append(f"{path} " + " ".join("1" if c == label else "0" for c in range(3)))
        (folder / f"{name}.txt").write_text("\n".join(lines) + "\n")
    return {"options": ["--dataset", "image-list", "--database-list", folder / "db.txt",
                        "--query-list", folder / "q.txt", "--num-seen", "2"]}


@pytest.mark.timeout(600)  # a watchdog for hangs only: prepare must end by itself
def test_elongated_image_is_a_bad_image(tmp_path, capsys):
    """1 x 3000 px: at --max-side 256 its short side would be 0 px (FFCV's own resizer made OpenCV abort the
    worker and the writer wait forever)."""
    source = write_image_list(tmp_path / "src", {3: Image.new("RGB", (1, 3000), (200, 10, 10))})
    out = tmp_path / "out"
    code, message = prepare_cli(capsys, *source["options"], "--out", out)
    assert code == 2
    assert f"image {tmp_path / 'src' / 'img' / 'db2.png'} (listed in {tmp_path / 'src' / 'db.txt'} line 3): " \
           f"1 x 3000 px: at --max-side 256 its short side would be 0 px; images need both sides >= 4 px" in message
    assert "pass --skip-bad" in message
    assert_nothing_written(out)
    code, _ = prepare_cli(capsys, *source["options"], "--out", out, "--skip-bad")
    assert code == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["num_database"] == 5 and manifest["skipped_bad"]["database"] == 1
    assert "db.txt line 3" in manifest["skipped_bad"]["images"]["database"][0]
    assert manifest["image"]["smallest_side"] == manifest["image"]["most_common_side"] == 28


@pytest.mark.timeout(600)  # a watchdog for hangs only: prepare must end by itself
@pytest.mark.parametrize("death", ["exit 3", "SIGKILL"])
def test_a_worker_that_dies_ends_prepare_naming_its_image(tmp_path, capsys, monkeypatch, death):
    """Workers are forked, so the patched load reaches them: the worker on database line 4 dies."""
    source = write_image_list(tmp_path / "src")
    load = FileImages.load

    def dying_load(self, index):
        if self.list_file.name == "db.txt" and index == 3:
            if death == "SIGKILL":
                os.kill(os.getpid(), signal.SIGKILL)
            os._exit(3)
        return load(self, index)

    monkeypatch.setattr(FileImages, "load", dying_load)
    from ffcv.writer import DatasetWriter
    shared_memory = []
    prepare_writer = DatasetWriter.prepare

    def recording_prepare(writer):
        prepare_writer(writer)
        shared_memory.append(writer.metadata_sm.name)

    monkeypatch.setattr(DatasetWriter, "prepare", recording_prepare)
    out = tmp_path / "out"
    code, message = prepare_cli(capsys, *source["options"], "--out", out, workers=2)
    assert code == 1
    how = "exited with code 3" if death == "exit 3" else "was killed by signal SIGKILL"
    assert "error: WriterWorkerDied: writing database.beton: a writer worker (pid " in message and how in message
    assert f"while on database item 3 of 6: {tmp_path / 'src' / 'img' / 'db3.png'} (listed in " \
           f"{tmp_path / 'src' / 'db.txt'} line 4)" in message
    assert message.endswith("the other workers were stopped; nothing was written to --out")
    assert_nothing_written(out)
    assert not multiprocessing.active_children()
    assert len(shared_memory) == 3   # query.beton, its rewrite in item order (2 workers), then database.beton
    assert not (Path("/dev/shm") / shared_memory[-1].lstrip("/")).exists(), "FFCV's shared memory was left behind"


@pytest.mark.timeout(600)  # a watchdog for hangs only: prepare must end by itself
def test_an_exception_inside_ffcv_encode_ends_prepare(tmp_path, capsys, monkeypatch):
    source = write_image_list(tmp_path / "src")
    import ffcv.fields.rgb_image as rgb_image

    def failing_encode(image, quality):
        raise ValueError("encoder exploded")

    monkeypatch.setattr(rgb_image, "encode_jpeg", failing_encode)
    out = tmp_path / "out"
    code, message = prepare_cli(capsys, *source["options"], "--out", out)
    assert code == 1
    assert "writing query.beton: a writer worker" in message and "exited with code 1 (a Python exception" in message
    assert "while on query item 0 of 3" in message
    assert_nothing_written(out)


@pytest.mark.timeout(600)  # a watchdog for hangs only: prepare must end by itself
def test_a_stuck_worker_ends_prepare(tmp_path, capsys, monkeypatch):
    source = write_image_list(tmp_path / "src")
    load = FileImages.load

    def stuck_load(self, index):
        if self.list_file.name == "q.txt" and index == 1:
            time.sleep(3600)
        return load(self, index)

    monkeypatch.setattr(FileImages, "load", stuck_load)
    monkeypatch.setattr(beton_writer, "WORKER_STALL_SECONDS", 2.0)
    out = tmp_path / "out"
    code, message = prepare_cli(capsys, *source["options"], "--out", out)
    assert code == 1
    assert "writing query.beton: no writer worker took a new item for 2 s" in message
    assert "while on query item 1 of 3" in message and "q.txt line 2" in message
    assert_nothing_written(out)
    assert not multiprocessing.active_children()


def test_sides_below_the_minimum_are_refused(tmp_path, capsys):
    code, message = prepare_cli(capsys, "--dataset", "fashion-mnist", "--resolution", "3", "--out", tmp_path / "o")
    assert code == 2 and message == "error: --resolution: expected at least 4 pixels, got 3"
    source = write_image_list(tmp_path / "src", {2: Image.new("RGB", (3, 3))})
    code, message = prepare_cli(capsys, *source["options"], "--out", tmp_path / "o")
    assert code == 2 and "db1.png (listed in" in message and "line 2): 3 x 3 px: its short side is 3 px" in message
    assert_nothing_written(tmp_path / "o")


# ----------------------------------------------------------------------------------------------------------
# The trainer and the two directions between data and run folders


def test_prepare_into_a_trained_run_is_refused_and_the_run_survives(finished_run, tmp_path, capsys):
    """The real thing, not a fake run folder: a finished run of all stages, with --force too."""
    run = copy_run(finished_run, tmp_path / "run")
    before = checksums(run)
    for force in ([], ["--force"]):
        code, message = prepare_cli(capsys, *TINY_OPTIONS, "--out", run, *force)
        assert code == 2 and "is a training run folder" in message
        assert checksums(run) == before


def test_train_into_a_data_folder_is_refused_and_the_data_survives(tiny_prepared, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(tiny_prepared, data)
    before = checksums(data)
    code, stderr = train_cli("--data", str(data), "--out", str(data), *TINY, "--max-iter", "1")
    assert code == 2
    assert f"--out {data}: is a prepared data folder" in error_line(stderr)
    assert checksums(data) == before


def test_train_names_a_truncated_beton_in_one_line(tiny_prepared, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(tiny_prepared, data)
    beton = data / "database.beton"
    beton.write_bytes(beton.read_bytes()[: beton.stat().st_size // 2])
    out = tmp_path / "run"
    code, stderr = train_cli("--data", str(data), "--out", str(out), *TINY, "--max-iter", "1")
    assert code == 2
    line = error_line(stderr)
    assert str(beton) in line and "truncated or replaced" in line and "--force" in line
    assert not out.exists()


def test_small_images_train_at_their_own_size(tmp_path, capsys):
    """28 px PNGs through image-list are stored as JPEG with max side 256; the small CNN trains at 28 px."""
    source = write_image_list(tmp_path / "src")
    data = tmp_path / "data"
    assert prepare_cli(capsys, *source["options"], "--out", data)[0] == 0
    out = tmp_path / "run"
    assert train.main(["--data", str(data), "--out", str(out), "--arch", "small-cnn", "--code-length", "8",
                       "--max-iter", "1", "--max-epoch", "1", "--num-samples", "2", "--batch-size", "2",
                       "--device", "cpu", "--stage", "original"]) == 0
    assert json.loads((out / "original" / "result.json").read_text())["resolution"] == 28


def train_cli(*args, env=None):
    """The trainer as users run it: (exit code, stderr)."""
    result = subprocess.run([sys.executable, "-m", "dihn_dist.train", *args], capture_output=True, text=True,
                            timeout=600, env={**os.environ, **(env or {})})
    return result.returncode, result.stderr


# What may stand above the error line, and only where a test says so: work done before the failure reports
# itself. The trainer's log lines (its format, HH:MM:SS | LEVEL | ...) when a run fails while training, and
# prepare's tqdm bars (`NN%|...| i/n [...]`, redrawn with carriage returns) of the parts it wrote before it
# met the bad image (or the full disk). Nothing else: a traceback or a warning above the error fails the test.
# prepare's log lines carry the date and milliseconds (loguru's default format), the trainer's the time.
TRAINER_LOG_LINE = re.compile(r"^(\d{4}-\d\d-\d\d )?\d\d:\d\d:\d\d(\.\d+)? \| (INFO|WARNING) +\| ")
PROGRESS_BAR = re.compile(r"^ *\d+%\|[^|]*\| *\d+/\d+ \[[^\]]*\]$")


def error_line(stderr: str, after_log: bool = False, after_progress: bool = False) -> str:
    """The error: ALL of stderr must be exactly one line starting with "error" (a traceback or any other line
    above it fails the test); `after_log`, `after_progress`: the lines above that these allow."""
    lines = stderr.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    if after_log:
        lines = [line for line in lines if not TRAINER_LOG_LINE.match(line)]
    if after_progress:
        # a bar is redrawn with carriage returns and cleared with blanks when it closes
        lines = [line for line in lines if not all(PROGRESS_BAR.match(bar) or not bar.strip()
                                                   for bar in line.split("\r"))]
    assert len(lines) == 1 and lines[0].startswith("error"), stderr[-3000:]
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
    assert "no finished stage has codes for the 420 inherited rows" in capsys.readouterr().err and not out.exists()
    # the corrected command needs no --resume: nothing was left behind
    assert train.main(["--data", str(tiny_prepared), "--out", str(out), *TINY, "--max-iter", "1",
                       "--stage", "original"]) == 0


# ----------------------------------------------------------------------------------------------------
# Config files are checked by type, unknown stages at parse time


def test_yaml_exponent_without_dot_is_a_number(tmp_path):
    from dihn_dist.training.config import parse_config
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
    assert "RuntimeError: injected failure" in error_line(stderr, after_log=True)
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
        machine.select_device("cuda:1", local_rank=0, local_world_size=2)
    assert machine.select_device("cuda", local_rank=1, local_world_size=2) == torch.device("cuda", 1)
    assert machine.select_device("cuda:3", local_rank=0, local_world_size=1) == torch.device("cuda", 3)


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
    from dihn_dist.training.run_reader import load_run, load_stage
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


# ----------------------------------------------------------------------------------------------------------
# Writer workers die with prepare

# prepare with every writer worker stuck on its first image: the workers stay alive until something ends them.
STUCK_PREPARE = """
import sys, time
from dihn_dist.data import parts
parts.WriterItems.load_image = lambda self, position: time.sleep(3600)
from dihn_dist import prepare
sys.exit(prepare.main(sys.argv[1:]))
"""
# Bounds of the polls below: generous, since they only bound how long a failure takes to show.
POLL_SECONDS = 120


def poll(condition, what: str):
    deadline = time.monotonic() + POLL_SECONDS
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"{what} within {POLL_SECONDS} s")


def test_a_kill_9_of_prepare_ends_its_writer_workers(tmp_path):
    psutil = pytest.importorskip("psutil")
    parent = subprocess.Popen([sys.executable, "-c", STUCK_PREPARE, "--dataset", "fashion-mnist", "--out",
                               str(tmp_path / "out"), "--database-per-class", "5", "--query-per-class", "2",
                               "--resolution", "28", "--num-workers", "2"], cwd=Path(__file__).resolve().parents[1])
    children = []
    try:
        watched = psutil.Process(parent.pid)

        def workers():
            found = [child for child in watched.children(recursive=True)
                     if "resource_tracker" not in " ".join(child.cmdline())]
            return found if len(found) >= 2 else None

        poll(workers, "two writer workers started")
        children = watched.children(recursive=True)
        parent.kill()
        parent.wait()

        def gone(process) -> bool:
            try:
                return process.status() == psutil.STATUS_ZOMBIE
            except psutil.NoSuchProcess:
                return True

        poll(lambda: all(gone(child) for child in children), "every process prepare started ended after its kill -9")
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait()
        for child in children:   # only if the test failed: never leave them running
            with contextlib.suppress(psutil.NoSuchProcess):
                child.kill()


# ----------------------------------------------------------------------------------------------------
# Errors name the thing the user gave: the checkpoint file, --out (never a temp folder inside it or an
# image), an --old-run that is prepared data


@pytest.mark.parametrize("damage", ["truncated", "empty"])
def test_a_damaged_checkpoint_is_named_before_anything_is_written(tiny_prepared, tmp_path, damage):
    out = tmp_path / "run"
    base = ["--data", str(tiny_prepared), "--out", str(out), *TINY, "--max-iter", "2", "--stage", "original"]
    assert train.main(base) == 0
    shutil.rmtree(out / "original")  # as if stopped after iteration 2's checkpoint
    checkpoint = out / "checkpoints" / "original.pt"
    os.truncate(checkpoint, checkpoint.stat().st_size // 2 if damage == "truncated" else 0)
    before = checksums(out)
    code, stderr = train_cli(*base, "--resume")
    assert code == 2
    line = error_line(stderr)
    assert line.startswith(f"error: {checkpoint}: the checkpoint of stage original cannot be read (")
    assert "truncated or damaged); delete it to start stage original again from its first outer iteration" in line
    assert checksums(out) == before


def test_evaluate_out_an_existing_file_is_one_line(finished_run, tmp_path, capsys):
    from dihn_dist import evaluate
    out = tmp_path / "report.txt"
    out.write_text("keep me")
    capsys.readouterr()
    assert evaluate.main([str(finished_run), "--out", str(out)]) == 2
    assert capsys.readouterr().err.strip() == \
        f"error: --out {out}: exists and is not a folder; choose a folder for the report"
    assert out.read_text() == "keep me"


def test_old_run_a_prepared_data_folder_is_named_as_such(tiny_prepared, tmp_path):
    out = tmp_path / "run"
    before = checksums(tiny_prepared)
    code, stderr = train_cli("--data", str(tiny_prepared), "--out", str(out), *TINY, "--max-iter", "1",
                             "--stage", "incremental", "--old-run", str(tiny_prepared))
    assert code == 2
    assert error_line(stderr) == f"error: --old-run {tiny_prepared}: is a prepared data folder, not a run folder; " \
                                 f"pass the --out of the run trained on it (or --old-codes FILE)"
    assert not out.exists() and checksums(tiny_prepared) == before


def read_only(folder: Path):
    """Make `folder` unwritable for this process (root ignores permissions: the immutable flag then), or skip."""
    if os.geteuid() != 0:
        folder.chmod(0o555)
        return lambda: folder.chmod(0o755)
    if subprocess.run(["chattr", "+i", str(folder)], capture_output=True).returncode != 0:
        pytest.skip("running as root without chattr +i: no way to make a folder read-only")
    return lambda: subprocess.run(["chattr", "-i", str(folder)], check=True)


def prepare_subprocess(*argv, fsize=None):
    """(exit code, the error line) of prepare in a process of its own, optionally with a file size limit that
    makes every write past it fail as on a full disk (Python ignores SIGXFSZ: the write gets EFBIG)."""
    import resource
    limit = (lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))) if fsize else None
    result = subprocess.run([sys.executable, "-m", "dihn_dist.prepare", *map(str, argv), "--num-workers", "1"],
                            capture_output=True, text=True, timeout=600, preexec_fn=limit)
    return result.returncode, error_line(result.stderr, after_log=True, after_progress=True)


@pytest.mark.parametrize("command", ["prepare", "train"])
@pytest.mark.parametrize("problem", ["read-only", "a file on its path"])
def test_out_that_cannot_be_created_is_named(tiny_prepared, tmp_path, command, problem):
    parent = tmp_path / "parent"
    parent.mkdir()
    if problem == "read-only":
        out, undo = parent / "out", read_only(parent)
    else:
        (parent / "file").write_text("keep me")
        out, undo = parent / "file" / "out", lambda: None
    try:
        if command == "prepare":
            source = write_image_list(tmp_path / "src")
            code, line = prepare_subprocess(*source["options"], "--out", out)
        else:
            code, stderr = train_cli("--data", str(tiny_prepared), "--out", str(out), *TINY, "--max-iter", "1")
            line = error_line(stderr)
    finally:
        undo()
    reason = "a part of its path is a file, not a folder" if problem == "a file on its path" else ""
    assert code == 2
    assert line.startswith(f"error: --out {out}: cannot create it ({reason}") and \
        line.endswith("); choose a writable --out"), line
    assert ".partial" not in line
    assert sorted(p.name for p in parent.iterdir()) == ([] if problem == "read-only" else ["file"])


def test_prepare_on_a_full_disk_names_out_not_an_image(tmp_path):
    source = write_image_list(tmp_path / "src")
    out = tmp_path / "out"
    code, line = prepare_subprocess(*source["options"], "--out", out, fsize=4096)
    assert code == 1
    assert line == f"error: OSError: --out {out}: could not write the preparation (File too large, while a " \
                   f"writer worker wrote query.beton); nothing was written to --out: make room or choose another --out"
    assert_nothing_written(out)


def test_train_on_a_full_disk_names_out(tiny_prepared, tmp_path):
    import resource
    out = tmp_path / "run"
    result = subprocess.run([sys.executable, "-m", "dihn_dist.train", "--data", str(tiny_prepared), "--out",
                             str(out), *TINY, "--max-iter", "1"], capture_output=True, text=True, timeout=600,
                            preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096)))
    assert result.returncode == 1
    assert error_line(result.stderr) == f"error: OSError: --out {out}: could not write the run folder (File too " \
                                        f"large); make room or choose another --out, then run the command again"
    assert not (out / "config.json").exists()  # no run recorded: the same command starts afresh
