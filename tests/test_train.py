"""End to end on a tiny prepared Fashion-MNIST set: stages, frozen codes, exports, resume, bad input."""
import json
import os
import signal
import subprocess
import sys
import time
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import TINY_TRAIN_ARGS as TINY
from conftest import copy_run

from dihn_dist import train
from dihn_dist.method import metrics
from dihn_dist.training import loop
from dihn_dist.training.stages import Stage, initial_codes


def run_train(data, out, *extra):
    return train.main(["--data", str(data), "--out", str(out), *TINY, *extra])


def run_train_raising(data, out, *extra):
    """The trainer without its command-line error handling, for pytest.raises."""
    return train.run_command_line(["--data", str(data), "--out", str(out), *TINY, *extra])


def test_both_stages_leave_a_complete_run_folder(finished_run):
    for name in ("config.json", "metrics.json", "train.log", "logs/rank0.log", "manifest.json"):
        assert (finished_run / name).is_file(), name
    for stage in ("original", "incremental", "retrain"):
        for name in ("model.pt", "database_codes.npy", "database_codes.packed.npy", "query_codes.npy", "result.json"):
            assert (finished_run / stage / name).is_file(), (stage, name)
    assert any((finished_run / "tensorboard").iterdir())


def test_original_codes_are_bit_identical_after_stage_two(finished_run):
    original = np.load(finished_run / "original" / "database_codes.npy")
    incremental = np.load(finished_run / "incremental" / "database_codes.npy")
    assert incremental.shape[0] > original.shape[0]
    assert np.array_equal(incremental[:original.shape[0]], original)
    result = json.loads((finished_run / "incremental" / "result.json").read_text())
    assert result["frozen_checksum_before"] == result["frozen_checksum_after"]
    # and the learned part did move away from its seeded random start (training/stages.py initial_codes)
    assert set(np.unique(incremental)) == {-1, 1}
    config = json.loads((finished_run / "config.json").read_text())
    stage = Stage("incremental", incremental.shape[0], original.shape[0], mu=0.0, lr_decay=1.0)
    start = initial_codes(stage, SimpleNamespace(seed=config["seed"], code_length=config["code_length"]),
                          torch.from_numpy(original)).numpy()
    assert np.array_equal(start[:original.shape[0]], original)  # the start the stage really had
    moved = (incremental[original.shape[0]:] != start[original.shape[0]:]).mean()
    assert moved > 0.05, f"only {moved:.1%} of the learned bits differ from their random start"


def test_packed_codes_match_int8_codes(finished_run):
    codes = np.load(finished_run / "incremental" / "database_codes.npy")
    packed = np.load(finished_run / "incremental" / "database_codes.packed.npy")
    bits = np.unpackbits(packed, axis=1)[:, :codes.shape[1]]
    assert np.array_equal(bits.astype(np.int8) * 2 - 1, codes)


def test_metrics_equal_map_recomputed_from_exported_codes(finished_run):
    summary = json.loads((finished_run / "metrics.json").read_text())
    db_labels = torch.from_numpy(np.load(finished_run / "database_labels.npy"))
    query_labels = torch.from_numpy(np.load(finished_run / "query_labels.npy"))
    for row in summary["rows"]:
        stage = finished_run / row["stage"]
        codes = torch.from_numpy(np.load(stage / "database_codes.npy"))
        queries = torch.from_numpy(np.load(stage / "query_codes.npy"))
        expected = metrics.mean_average_precision(queries, codes, query_labels, db_labels[:codes.shape[0]])
        assert row["map_all"] == pytest.approx(expected, abs=1e-12)
    assert [r["stage"] for r in summary["rows"]] == ["original", "incremental", "retrain"]
    original_row = summary["rows"][0]
    assert original_row["map_incremental_queries"] == 0.0  # no relevant item in the original database


def checksums(folder):
    """sha256 of every file under `folder`, by relative path: equal before and after = nothing changed."""
    import hashlib
    return {str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
            for path in sorted(folder.rglob("*")) if path.is_file()}


def test_rerun_without_resume_is_refused(finished_run, tiny_prepared, tmp_path):
    run = copy_run(finished_run, tmp_path / "run")  # a refusal test never points --out at the shared run
    before = checksums(run)
    with pytest.raises(ValueError, match="--resume"):
        run_train_raising(tiny_prepared, run, "--max-iter", "2")
    assert checksums(run) == before


def test_resume_with_other_settings_is_refused(finished_run, tiny_prepared, tmp_path):
    run = copy_run(finished_run, tmp_path / "run")
    before = checksums(run)
    with pytest.raises(ValueError, match="--code-length"):
        train.run_command_line(["--data", str(tiny_prepared), "--out", str(run), *TINY, "--max-iter", "2",
                    "--code-length", "16", "--resume"])
    assert checksums(run) == before


def _train_command(data, out, *extra):
    return [sys.executable, "-m", "dihn_dist.train", "--data", str(data), "--out", str(out), *TINY, *extra]


def test_killed_run_resumes_to_the_same_codes(tiny_prepared, tmp_path):
    args = ["--max-iter", "4", "--stage", "original"]
    reference = tmp_path / "reference"
    subprocess.run(_train_command(tiny_prepared, reference, *args), check=True, capture_output=True)

    interrupted = tmp_path / "interrupted"
    process = subprocess.Popen(_train_command(tiny_prepared, interrupted, *args),
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    checkpoint = interrupted / "checkpoints" / "original.pt"
    deadline = time.time() + 120
    while not checkpoint.exists() and time.time() < deadline and process.poll() is None:
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert checkpoint.exists(), "the run never wrote a checkpoint"
    assert not (interrupted / "original" / "result.json").exists(), "the run finished before it was killed"
    done = torch.load(checkpoint, weights_only=False)["iteration"]
    assert done < 3

    subprocess.run(_train_command(tiny_prepared, interrupted, *args, "--resume"), check=True, capture_output=True)
    for name in ("database_codes.npy", "query_codes.npy"):
        assert np.array_equal(np.load(reference / "original" / name), np.load(interrupted / "original" / name))
    ref_model = torch.load(reference / "original" / "model.pt")
    new_model = torch.load(interrupted / "original" / "model.pt")
    assert all(torch.equal(ref_model[k], new_model[k]) for k in ref_model)


def test_stage_two_from_another_run(finished_run, tiny_prepared, tmp_path):
    out = tmp_path / "stage2"
    assert run_train(tiny_prepared, out, "--max-iter", "1", "--stage", "incremental", "--old-run", str(finished_run)) == 0
    old = np.load(finished_run / "original" / "database_codes.npy")
    new = np.load(out / "incremental" / "database_codes.npy")
    assert np.array_equal(new[:old.shape[0]], old)


def test_old_run_with_other_code_length_is_refused(finished_run, tiny_prepared, tmp_path):
    with pytest.raises(ValueError, match="code_length"):
        train.run_command_line(["--data", str(tiny_prepared), "--out", str(tmp_path / "x"), *TINY, "--code-length", "16",
                    "--max-iter", "1", "--stage", "incremental", "--old-run", str(finished_run)])


def test_incremental_without_stage_one_is_refused(tiny_prepared, tmp_path):
    with pytest.raises(FileNotFoundError, match="original stage"):
        run_train_raising(tiny_prepared, tmp_path / "x", "--max-iter", "1", "--stage", "incremental")


def test_old_codes_that_are_not_plus_minus_one_are_refused(finished_run, tiny_prepared, tmp_path):
    codes = np.load(finished_run / "original" / "database_codes.npy")
    codes[0, 0] = 0
    np.save(tmp_path / "codes.npy", codes)
    with pytest.raises(ValueError, match="must be \\+-1"):
        run_train_raising(tiny_prepared, tmp_path / "x", "--max-iter", "1", "--stage", "incremental", "--old-codes",
                          str(tmp_path / "codes.npy"))


def test_old_run_codes_of_the_wrong_shape_are_refused_naming_the_file(finished_run, tiny_prepared, tmp_path):
    """B_old from --old-run is read from the packed codes, checked against the run's manifest."""
    broken = copy_run(finished_run, tmp_path / "broken")
    packed = broken / "original" / "database_codes.packed.npy"
    np.save(packed, np.load(packed)[:-1])
    with pytest.raises(ValueError, match="database_codes.packed.npy"):
        run_train_raising(tiny_prepared, tmp_path / "x", "--max-iter", "1", "--stage", "incremental", "--old-run", str(broken))


def test_too_many_samples_is_refused(tiny_prepared, tmp_path):
    with pytest.raises(ValueError, match="--num-samples"):
        train.run_command_line(["--data", str(tiny_prepared), "--out", str(tmp_path / "x"), *TINY, "--num-samples", "100000"])


def test_missing_data_folder_names_the_command(tmp_path):
    with pytest.raises((FileNotFoundError, ValueError), match="prepare"):
        train.run_command_line(["--data", str(tmp_path / "nothing"), "--out", str(tmp_path / "x"), *TINY])


def test_unknown_arch_is_refused(tiny_prepared, tmp_path, capsys):
    with pytest.raises(SystemExit):
        train.main(["--data", str(tiny_prepared), "--out", str(tmp_path / "x"), "--arch", "vgg"])
    assert "--arch" in capsys.readouterr().err


def test_pretrained_file_that_does_not_fit_is_refused(tmp_path):
    from dihn_dist.models.networks import build_model
    bogus = tmp_path / "weights.pth"
    torch.save({"conv.weight": torch.zeros(3)}, bogus)
    with pytest.raises(ValueError, match="does not fit --arch alexnet"):
        build_model("alexnet", 12, str(bogus))
    with pytest.raises(FileNotFoundError, match="IMAGENET1K_V1"):
        build_model("alexnet", 12, str(tmp_path / "missing.pth"))


def test_pretrained_state_dict_loads(tmp_path):
    import torchvision

    from dihn_dist.models.networks import build_model
    torch.manual_seed(0)
    source = torchvision.models.alexnet(weights=None)
    path = tmp_path / "alexnet.pth"
    torch.save(source.state_dict(), path)
    model = build_model("alexnet", 12, str(path))
    assert torch.equal(model.backbone.features[0].weight, source.features[0].weight)
    assert model.backbone.classifier[6].out_features == 12


def test_non_finite_loss_stops_with_the_iteration_and_keeps_checkpoint(tiny_prepared, tmp_path, monkeypatch):
    calls = {"n": 0}
    real = loop.hashing.batch_loss

    def poisoned(*args, **kwargs):
        loss, terms = real(*args, **kwargs)
        calls["n"] += 1
        if calls["n"] > 8:  # after two outer iterations (4 steps of 32 of 120 items each) have checkpointed
            loss, terms = loss * float("nan"), {**terms, "hash": terms["hash"] * float("nan")}
        return loss, terms

    monkeypatch.setattr(loop.hashing, "batch_loss", poisoned)
    out = tmp_path / "nan"
    with pytest.raises(FloatingPointError, match="iteration 3, .*hash nan"):
        run_train_raising(tiny_prepared, out, "--max-iter", "3", "--stage", "original")
    assert torch.load(out / "checkpoints" / "original.pt", weights_only=False)["iteration"] == 1


def test_config_file_with_flag_override(tiny_prepared, tmp_path):
    from dihn_dist.training.config import parse_config
    config_file = tmp_path / "c.json"
    config_file.write_text(json.dumps({"code-length": 24, "max_iter": 7, "arch": "small-cnn"}))
    config = parse_config(["--config", str(config_file), "--max-iter", "9"])
    assert (config.code_length, config.max_iter, config.arch) == (24, 9, "small-cnn")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"code_lenght": 24}))
    with pytest.raises(ValueError, match="unknown key 'code_lenght'"):
        parse_config(["--config", str(bad)])


def sigterm_after_the_first_iteration(tiny_prepared, out, *args) -> str:
    """Start a run, SIGTERM it once its log shows outer iteration 1 (of 4), and return its stderr; it must have
    stopped with 128 + SIGTERM."""
    process = subprocess.Popen(_train_command(tiny_prepared, out, *args), stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True)
    log = out / "train.log"
    deadline = time.time() + 120
    while time.time() < deadline and process.poll() is None and "iteration 1/4" not in (log.read_text() if log.exists() else ""):
        time.sleep(0.02)
    process.send_signal(signal.SIGTERM)
    stderr = process.communicate(timeout=120)[1]
    assert process.returncode == 128 + signal.SIGTERM, stderr[-2000:]
    return stderr


def test_sigterm_stops_after_a_checkpoint_and_resume_finishes(tiny_prepared, tmp_path):
    args = ["--max-iter", "4", "--stage", "original"]
    reference = tmp_path / "reference"
    subprocess.run(_train_command(tiny_prepared, reference, *args), check=True, capture_output=True)

    out = tmp_path / "stopped"
    stderr = sigterm_after_the_first_iteration(tiny_prepared, out, *args)
    assert "continue with --resume" in stderr
    stopped_after = torch.load(out / "checkpoints" / "original.pt", weights_only=False)["iteration"]
    assert stopped_after < 3 and not (out / "original" / "result.json").exists()
    subprocess.run(_train_command(tiny_prepared, out, *args, "--resume"), check=True, capture_output=True)
    assert np.array_equal(np.load(reference / "original" / "database_codes.npy"),
                          np.load(out / "original" / "database_codes.npy"))


def test_reference_cli_dataset_and_root_say_how_to_prepare(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match="prepare --dataset cifar-10 --root /src/cifar --out data/cifar-10"):
        train.run_command_line(["--dataset", "cifar-10", "--root", "/src/cifar", "--out", str(tmp_path / "x"), *TINY])


def test_disk_full_while_checkpointing_keeps_the_previous_checkpoint(tiny_prepared, tmp_path, monkeypatch):
    import errno

    from dihn_dist.common import atomic
    real_fsync = atomic.os.fsync
    writes = {"checkpoints": 0}

    def fsync(fd):
        if "checkpoints" in os.readlink(f"/proc/self/fd/{fd}"):
            writes["checkpoints"] += 1
            if writes["checkpoints"] == 2:
                raise OSError(errno.ENOSPC, "No space left on device")
        return real_fsync(fd)

    monkeypatch.setattr(atomic.os, "fsync", fsync)
    out = tmp_path / "full"
    with pytest.raises(OSError, match="original.pt .*No space left.*previous version of it, if any, is intact"):
        run_train_raising(tiny_prepared, out, "--max-iter", "3", "--stage", "original")
    checkpoints = list((out / "checkpoints").iterdir())
    assert [p.name for p in checkpoints] == ["original.pt"], "a temp file was left behind"
    assert torch.load(checkpoints[0], weights_only=False)["iteration"] == 0


@pytest.mark.timeout(1200)  # a watchdog for hangs only
@pytest.mark.parametrize("stage", ["incremental", "retrain"])
def test_kill_9_in_a_later_stage_resumes_to_the_uninterrupted_codes(finished_run, tiny_prepared, tmp_path, stage):
    """kill -9 after the stage's first checkpoint (stage 2, or the retrain after it), then --resume: every
    stage's codes equal those of finished_run, the same settings run without interruption."""
    args = ["--max-iter", "2", "--stage", "all,retrain", "--eval-every", "1"]  # finished_run's settings
    out = tmp_path / "killed"
    # The hook holds the run at the start of the stage's 2nd outer iteration: the kill comes after exactly
    # one checkpoint of the stage, whatever the machine's speed.
    env = {**os.environ, "DIHN_FAIL_AT": f"rank=0,iteration=2,stage={stage},kind=hang"}
    stderr = tmp_path / "stderr.txt"  # a file, not a pipe: a full pipe would stall the run
    with open(stderr, "w") as sink:
        process = subprocess.Popen(_train_command(tiny_prepared, out, *args), env=env, stdout=subprocess.DEVNULL,
                                   stderr=sink)
    checkpoint = out / "checkpoints" / f"{stage}.pt"
    try:
        while not checkpoint.exists() and process.poll() is None:
            time.sleep(0.05)
        assert process.poll() is None, f"the run ended before its {stage} checkpoint: {stderr.read_text()[-2000:]}"
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
    assert process.returncode == -signal.SIGKILL
    assert torch.load(checkpoint, weights_only=False)["iteration"] == 0
    assert not (out / stage / "result.json").exists()

    resumed = subprocess.run(_train_command(tiny_prepared, out, *args, "--resume"), capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"stage {stage}: resumed after outer iteration 1 of 2" in (out / "train.log").read_text()
    for name in ("original", "incremental", "retrain"):
        for part in ("database_codes.npy", "query_codes.npy"):
            assert np.array_equal(np.load(finished_run / name / part), np.load(out / name / part)), (name, part)


def test_crash_between_checkpoints_resumes_to_the_same_codes(tiny_prepared, tmp_path):
    """--checkpoint-every 2: a run that dies in outer iteration 4 last checkpointed after iteration 2 (the
    third iteration wrote none, in the background or otherwise); resumed, it redoes iteration 3 and ends with
    the codes and weights of an uninterrupted run that checkpointed every iteration."""
    args = ["--max-iter", "5", "--stage", "original"]
    reference = tmp_path / "reference"
    subprocess.run(_train_command(tiny_prepared, reference, *args), check=True, capture_output=True)

    out = tmp_path / "crashed"
    sparse = [*args, "--checkpoint-every", "2"]
    crashed = subprocess.run(_train_command(tiny_prepared, out, *sparse), capture_output=True, text=True,
                             env={**os.environ, "DIHN_FAIL_AT": "rank=0,iteration=4"})
    assert crashed.returncode == 1 and "injected failure" in crashed.stderr, crashed.stderr[-2000:]
    assert torch.load(out / "checkpoints" / "original.pt", weights_only=False)["iteration"] == 1
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["original.pt"]

    subprocess.run(_train_command(tiny_prepared, out, *sparse, "--resume"), check=True, capture_output=True)
    assert "resumed after outer iteration 2 of 5" in (out / "train.log").read_text()
    for name in ("database_codes.npy", "query_codes.npy"):
        assert np.array_equal(np.load(reference / "original" / name), np.load(out / "original" / name))
    ref_model = torch.load(reference / "original" / "model.pt")
    new_model = torch.load(out / "original" / "model.pt")
    assert all(torch.equal(ref_model[k], new_model[k]) for k in ref_model)


def test_sigterm_checkpoints_at_once_whatever_the_schedule(tiny_prepared, tmp_path):
    """With --checkpoint-every larger than the run, SIGTERM still leaves a checkpoint of the iteration it
    stopped after (written synchronously before the exit), and the resumed run ends as an uninterrupted one."""
    args = ["--max-iter", "4", "--stage", "original"]
    reference = tmp_path / "reference"
    subprocess.run(_train_command(tiny_prepared, reference, *args), check=True, capture_output=True)

    out = tmp_path / "stopped"
    rare = [*args, "--checkpoint-every", "50"]
    sigterm_after_the_first_iteration(tiny_prepared, out, *rare)
    stopped_after = torch.load(out / "checkpoints" / "original.pt", weights_only=False)["iteration"]
    assert stopped_after < 3 and not (out / "original" / "result.json").exists()
    subprocess.run(_train_command(tiny_prepared, out, *rare, "--resume"), check=True, capture_output=True)
    assert np.array_equal(np.load(reference / "original" / "database_codes.npy"),
                          np.load(out / "original" / "database_codes.npy"))


def test_check_only_prints_the_plan_and_writes_nothing(tiny_prepared, tmp_path, capsys):
    out = tmp_path / "planned"
    assert run_train(tiny_prepared, out, "--check-only", "--max-iter", "7") == 0
    plan = capsys.readouterr().out
    assert not out.exists(), "--check-only created the run folder"
    for expected in ("1 process(es) on cpu", "stage original: 420 database rows (0 frozen)",
                     "stage incremental: 600 database rows (420 frozen, B_old from this run's stage original)",
                     "7 x 1 epoch(s) x 120 samples", "32 global, at most 32 per process",
                     "small-cnn at 28 px, precision fp32", "weights: from scratch"):
        assert expected in plan, (expected, plan)
    assert run_train(tiny_prepared, out, "--check-only", "--num-samples", "500") == 2
    assert "--num-samples 500: expected 1..420" in capsys.readouterr().err
    assert not out.exists()


def test_fast_kernels_unless_deterministic(tiny_prepared, tmp_path):
    """cuDNN benchmarking and TF32 are switched on for a run, off with --deterministic (no GPU needed to
    check the switches)."""
    saved = (torch.backends.cudnn.benchmark, torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
             torch.are_deterministic_algorithms_enabled())
    try:
        torch.backends.cudnn.benchmark = torch.backends.cuda.matmul.allow_tf32 = False
        assert run_train(tiny_prepared, tmp_path / "fast", "--check-only") == 0
        assert torch.backends.cudnn.benchmark and torch.backends.cuda.matmul.allow_tf32
        assert torch.backends.cudnn.allow_tf32
        assert run_train(tiny_prepared, tmp_path / "exact", "--check-only", "--deterministic") == 0
        assert not (torch.backends.cudnn.benchmark or torch.backends.cuda.matmul.allow_tf32
                    or torch.backends.cudnn.allow_tf32)
    finally:
        torch.backends.cudnn.benchmark, torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = \
            saved[:3]
        torch.use_deterministic_algorithms(saved[3])


def test_a_run_from_before_a_new_setting_resumes_with_its_default(finished_run, tmp_path, tiny_prepared, capsys):
    """A run whose config.json predates a setting that --resume must keep (here --grad-compression) ran with
    that setting's default: resuming it with the default is accepted, with another value refused."""
    run = copy_run(finished_run, tmp_path / "old")
    settings = json.loads((run / "config.json").read_text())
    del settings["grad_compression"]
    (run / "config.json").write_text(json.dumps(settings))
    args = ["--max-iter", "2", "--stage", "all,retrain", "--eval-every", "1", "--resume", "--check-only"]
    assert run_train(tiny_prepared, run, *args) == 0, capsys.readouterr().err
    assert "already complete, skipped" in capsys.readouterr().out
    assert run_train(tiny_prepared, run, *args, "--grad-compression", "bf16") == 2
    assert "--grad-compression 'none' -> 'bf16'" in capsys.readouterr().err
