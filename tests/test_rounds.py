"""Increments as users live them, through the command lines: a database that grows round after round
(prepare --extends), each round's DIHN chained from the previous round's run (--old-run), B_old brought
from elsewhere (--old-codes), and the refusals (a wrong prefix, a foreign old run, old codes of the wrong
shape or values)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import CHAIN_CLASSES as ROUNDS
from conftest import CHAIN_TRAIN_ARGS as TRAIN

from dihn_dist import train

pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # numba finalizers

def stage_codes(run: Path) -> np.ndarray:
    stage = "incremental" if (run / "incremental" / "result.json").is_file() else "original"
    return np.load(run / stage / "database_codes.npy")


def test_every_earlier_round_is_bit_identical_in_every_later_round(chain):
    codes = [stage_codes(run) for run in chain["runs"]]
    assert [len(c) for c in codes] == [120, 180, 240, 300]
    for later in range(1, len(codes)):
        for earlier in range(later):
            n = len(codes[earlier])
            assert np.array_equal(codes[later][:n], codes[earlier]), (earlier + 1, later + 1)
    for run in chain["runs"][1:]:
        result = json.loads((run / "incremental" / "result.json").read_text())
        assert result["frozen_checksum_before"] == result["frozen_checksum_after"]
        assert result["frozen_rows"] == len(np.load(run / "database_labels.npy")) - 60


def test_each_round_reports_its_new_classes_queries(chain):
    for index, run in enumerate(chain["runs"][1:], start=1):
        row = json.loads((run / "metrics.json").read_text())["rows"][0]
        assert row["stage"] == "incremental" and row["num_database"] == 30 * ROUNDS[index]
        assert row["num_queries"] == 5 * ROUNDS[index] and row["map_incremental_queries"] is not None
    rows = [r["stage"] for r in json.loads((chain["runs"][1] / "metrics.json").read_text())["rows"]]
    assert rows == ["incremental", "retrain"]


def test_round_one_data_has_no_new_items_for_stage_two(chain, tmp_path, capsys):
    assert train.main(["--data", str(chain["data"][0]), "--out", str(tmp_path / "r"), *TRAIN,
                       "--stage", "incremental", "--old-run", str(chain["runs"][0])]) == 2
    assert "has no new items" in capsys.readouterr().err and not (tmp_path / "r").exists()


def test_an_old_run_that_is_not_a_prefix_is_refused(chain, tiny_prepared, tmp_path, capsys):
    data2, run3 = chain["data"][1], chain["runs"][2]
    # round 3's run has more rows than round 2's data inherits
    assert train.main(["--data", str(data2), "--out", str(tmp_path / "a"), *TRAIN, "--stage", "incremental",
                       "--old-run", str(run3)]) == 2
    assert "its database is not the beginning of --data" in capsys.readouterr().err
    # a foreign run: the classic 7+3 preparation's run, whose items differ row by row
    foreign = tmp_path / "foreign"
    assert train.main(["--data", str(tiny_prepared), "--out", str(foreign), *TRAIN, "--stage", "original"]) == 0
    assert train.main(["--data", str(data2), "--out", str(tmp_path / "b"), *TRAIN, "--stage", "incremental",
                       "--old-run", str(foreign)]) == 2
    message = capsys.readouterr().err
    assert f"--old-run {foreign}: its database is not the beginning of --data" in message
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_old_codes_from_elsewhere(chain, tmp_path, capsys):
    """B_old as int8 +-1 rows and as packed bits: the same run; wrong shapes and values are named."""
    data2, old = chain["data"][1], stage_codes(chain["runs"][0])
    np.save(tmp_path / "codes.npy", old)
    np.save(tmp_path / "packed.npy", np.packbits(old > 0, axis=1))
    outs = []
    for name in ("codes.npy", "packed.npy"):
        out = tmp_path / f"run-{name}"
        assert train.main(["--data", str(data2), "--out", str(out), *TRAIN, "--stage", "incremental",
                           "--old-codes", str(tmp_path / name)]) == 0
        outs.append(np.load(out / "incremental" / "database_codes.npy"))
    assert np.array_equal(outs[0], outs[1]) and np.array_equal(outs[0][:len(old)], old)

    bad = {"short.npy": old[:-1], "zeros.npy": np.where(old > 0, 1, 0).astype(np.int8),
           "wide.npy": np.concatenate([old, old], axis=1), "float.npy": old.astype(np.float32) * 0.5}
    expected = {"short.npy": "expected (120, 8) codes, one per inherited database row",
                "zeros.npy": "codes must be +-1, row 0 column", "wide.npy": "codes of 16 bits, this run uses "
                "--code-length 8", "float.npy": "codes must be +-1"}
    for name, array in bad.items():
        np.save(tmp_path / name, array)
        out = tmp_path / f"bad-{name}"
        assert train.main(["--data", str(data2), "--out", str(out), *TRAIN, "--stage", "incremental",
                           "--old-codes", str(tmp_path / name)]) == 2
        line = capsys.readouterr().err.strip().splitlines()[-1]
        assert str(tmp_path / name) in line and expected[name] in line, line
        assert not out.exists()


def test_codes_files_are_checked_a_block_at_a_time(tmp_path):
    """B_old's file is checked over its memory map a block of rows at a time: a bad value or padding bit in a
    later block is still found, named by its row; rows are then read from the map, packed or not."""
    from dihn_dist.training.run_reader import check_codes_file, code_rows

    codes = np.where(np.random.default_rng(0).random((10, 6)) < 0.5, -1, 1).astype(np.int8)
    bad = codes.copy()
    bad[7, 3] = 0
    np.save(tmp_path / "bad.npy", bad)
    with pytest.raises(ValueError, match="row 7 column 3 holds 0"):
        check_codes_file(tmp_path / "bad.npy", 6, block_rows=3)
    padded = np.packbits(codes > 0, axis=1)
    padded[8, 0] |= 1  # bit 7 of 8: beyond the 6 bits of a code
    np.save(tmp_path / "padded.npy", padded)
    with pytest.raises(ValueError, match="padding bits beyond bit 6"):
        check_codes_file(tmp_path / "padded.npy", 6, block_rows=3)
    for name, array in (("plain.npy", codes), ("packed.npy", np.packbits(codes > 0, axis=1))):
        np.save(tmp_path / name, array)
        assert np.array_equal(code_rows(check_codes_file(tmp_path / name, 6, block_rows=3), 6, 4, 9), codes[4:9])
