"""--shard-database on: the training loop with the database split by rows over the processes ends
with the codes of --shard-database off bit for bit and its metrics to 1e-9, under torchrun with 2 and 3
gloo processes (against one process with off: the small CNN's N processes follow the one-process
trajectory, test_distributed), in stage 1, in stage 2 (B_old ends inside a shard: 420 of 600 rows, 72 of 90) and on
multi-label data; a sharded run's checkpoint (torch.distributed.checkpoint, one file a rank) resumes to the
uninterrupted run's codes, on the same and on another world size."""
import json
import os
import subprocess

import numpy as np
import pytest
import torch

from test_distributed import COMMON, TORCHRUN, free_port, torchrun

STAGES = ("original", "incremental")
# A watchdog only: three processes on a loaded 2-core machine took about 5 minutes for one tiny run.
TIMEOUT = 900
SHORT = ["--batch-size", "32", "--max-iter", "2", "--stage", "all", "--num-samples", "40"]


def stage_result(out, stage):
    return json.loads((out / stage / "result.json").read_text())


def assert_same_codes_and_metrics(off, on):
    for stage in STAGES:
        for name in ("database_codes.npy", "database_codes.packed.npy", "query_codes.npy"):
            assert np.array_equal(np.load(off / stage / name), np.load(on / stage / name)), (stage, name)
        expected, got = stage_result(off, stage), stage_result(on, stage)
        for key in ("codes_checksum", "frozen_checksum_before", "frozen_checksum_after"):
            assert got[key] == expected[key], (stage, key)
        assert got["row"].keys() == expected["row"].keys()
        for key, value in expected["row"].items():
            assert got["row"][key] == pytest.approx(value, rel=0, abs=1e-9), (stage, key)


def run(nproc, data, out, mode, *extra):
    result = torchrun(nproc, data, out, *SHORT, "--shard-database", mode, *extra, timeout=TIMEOUT)
    assert result.returncode == 0, result.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def rank0_path(tiny_prepared, tmp_path_factory):
    """The reference of every process count: one process, --shard-database off."""
    return run(1, tiny_prepared, tmp_path_factory.mktemp("shard-off") / "off", "off")


@pytest.fixture(scope="module")
def rank0_path_multi_label(tiny_nus, tmp_path_factory):
    return run(1, tiny_nus, tmp_path_factory.mktemp("shard-off-nus") / "off", "off", "--augment", "none")


# One process with on is RowShard's in-process test (test_sharding); its blocks are tested there and under
# torchrun in blocks of 13 rows.
@pytest.mark.parametrize("nproc", [2, 3])
def test_sharded_database_gives_the_rank0_paths_codes_and_metrics(nproc, rank0_path, tiny_prepared, tmp_path):
    on = run(nproc, tiny_prepared, tmp_path / "on", "on")
    assert_same_codes_and_metrics(rank0_path, on)
    log = (on / "train.log").read_text()
    assert f"the database is split by rows over {nproc} processes" in log
    assert "split by rows" not in (rank0_path / "train.log").read_text()
    # each rank checkpointed only its rows; the checkpoint file keeps no codes
    folders = sorted((on / "checkpoints").glob("original.codes.it*"))
    assert [f.name for f in folders] == ["original.codes.it1", "original.codes.it2"]
    assert len(list(folders[-1].glob("*.distcp"))) == nproc
    assert torch.load(on / "checkpoints" / "original.pt", weights_only=False)["codes"] is None


@pytest.mark.parametrize("nproc", [3])
def test_sharded_database_on_multi_label_data(nproc, rank0_path_multi_label, tiny_nus, tmp_path):
    on = run(nproc, tiny_nus, tmp_path / "on", "on", "--augment", "none")
    assert_same_codes_and_metrics(rank0_path_multi_label, on)


def test_auto_keeps_small_databases_on_the_rank0_path(tiny_prepared, tmp_path):
    from dihn_dist.training.config import SHARD_DATABASE_ROWS, parse_config
    from dihn_dist.training.database import shards_database

    config = parse_config(["--data", str(tiny_prepared), "--out", str(tmp_path / "a")])
    assert config.shard_database == "auto"
    assert not shards_database(config, 600) and not shards_database(config, SHARD_DATABASE_ROWS)  # one process


def interrupted_then_resumed(data, out, first_nproc, then_nproc):
    env = {**os.environ, "DIHN_FAIL_AT": "rank=0,iteration=2"}
    args = [*SHORT, "--stage", "original", "--shard-database", "on"]
    command = [*TORCHRUN, "--nproc_per_node", str(first_nproc), "--master_port", str(free_port()), "-m",
               "dihn_dist.train", "--data", str(data), "--out", str(out)]
    failed = subprocess.run([*command, *COMMON, *args], capture_output=True, text=True, timeout=TIMEOUT, env=env)
    assert failed.returncode != 0 and "injected failure" in failed.stdout + failed.stderr
    assert not (out / "original" / "result.json").exists()
    resumed = torchrun(then_nproc, data, out, *args, "--resume", timeout=TIMEOUT)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed after outer iteration 1" in (out / "train.log").read_text()


@pytest.mark.parametrize("then_nproc", [2, 3], ids=["same-world-size", "two-then-three"])
def test_a_sharded_run_resumes_to_the_uninterrupted_codes(then_nproc, rank0_path, tiny_prepared, tmp_path):
    """small-cnn has no dropout and N processes follow one process's trajectory (test_distributed), so the
    uninterrupted run is the one-process reference's stage 1, and a resume on three processes from two
    processes' checkpoint (each rank loading its new rows from the folder the two wrote) ends with its codes
    too."""
    uninterrupted = rank0_path
    out = tmp_path / "resumed"
    interrupted_then_resumed(tiny_prepared, out, 2, then_nproc)
    for name in ("database_codes.npy", "query_codes.npy"):
        assert np.array_equal(np.load(uninterrupted / "original" / name), np.load(out / "original" / name)), name
    assert stage_result(out, "original")["codes_checksum"] == stage_result(uninterrupted, "original")["codes_checksum"]


def test_codes_checkpoint_rows_are_read_back_on_any_split(tmp_path):
    """comm.load_rank_rows: rows saved in blocks (as three ranks save theirs) read back over other bounds."""
    from dihn_dist.distributed import comm

    codes = torch.randint(0, 2, (11, 5), generator=torch.Generator().manual_seed(1)).to(torch.int8) * 2 - 1
    comm.save_rank_tensors({"rows_0_4": codes[:4], "rows_4_8": codes[4:8], "rows_8_11": codes[8:]},
                           tmp_path / "codes")
    for start, end in [(0, 11), (0, 6), (3, 9), (6, 11), (8, 8), (4, 8)]:
        assert torch.equal(comm.load_rank_rows(tmp_path / "codes", start, end), codes[start:end]), (start, end)
    with pytest.raises(ValueError, match="holds no rows 11..12"):
        comm.load_rank_rows(tmp_path / "codes", 9, 12)


def test_a_missing_codes_folder_is_one_line_naming_resume(tmp_path):
    from dihn_dist.training.runfolder import RunFolder

    with pytest.raises(ValueError, match=r"^--resume: .*original\.codes\.it3, .* is missing; delete .*original\.pt"):
        RunFolder(tmp_path).load_codes_checkpoint("original.codes.it3", 0, 5)
