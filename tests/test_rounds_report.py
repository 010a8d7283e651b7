"""python -m dihn_dist.evaluate RUN_1 ... RUN_k: the rounds report, on conftest's four-round chain (round 1 =
stage original; rounds 2-4 = DIHN chained from the round before; the retrained baseline in round 2 only):
its numbers against each run's own record, the split of the queries by the round of their classes, forgetting,
the plots, and the refusal of runs that do not form a chain."""
from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import CHAIN_CLASSES, CHAIN_TRAIN_ARGS, assert_plots_decode, copy_run

from dihn_dist import train
from dihn_dist.method import metrics
from dihn_dist.reports import evaluate, rounds
from dihn_dist.training import run_reader

pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # numba finalizers

QUERIES_PER_CLASS = 5  # conftest's CHAIN_PREPARE_ARGS


@pytest.fixture(scope="module")
def report(chain, tmp_path_factory) -> dict:
    return rounds.rounds_report(chain["runs"], out=tmp_path_factory.mktemp("rounds-report"))


def recorded_rows(run: Path) -> dict:
    return {row["stage"]: row for row in json.loads((run / "metrics.json").read_text())["rows"]}


def test_each_round_equals_its_runs_metrics_json(chain, report):
    for round_, run in zip(report["rounds"], chain["runs"]):
        recorded = recorded_rows(run)
        dihn = round_["series"]["dihn"]
        assert dihn["stage"] == ("original" if round_["round"] == 1 else "incremental")
        for key in ("map_all", "map_topk", "map_original_queries", "map_incremental_queries", "num_database"):
            assert dihn[key] == pytest.approx(recorded[dihn["stage"]][key], abs=1e-12), (round_["round"], key)
    stages = [(r["stages"]["dihn"], r["stages"]["retrain"]) for r in report["rounds"]]
    assert stages == [("original", "original"), ("incremental", "retrain"), ("incremental", None),
                      ("incremental", None)]
    retrain = report["rounds"][1]["series"]["retrain"]
    assert retrain["map_all"] == pytest.approx(recorded_rows(chain["runs"][1])["retrain"]["map_all"], abs=1e-12)
    assert report["agreement"].startswith("Recomputed rows equal the trainer's recorded rows")
    assert report["chain"].startswith("Every round's DIHN codes begin with the previous round's")
    assert [r["keeps_previous_codes"] for r in report["rounds"]] == [None, True, True, True]


def test_queries_are_split_by_the_round_of_their_class(chain, report):
    new_classes = np.diff((0, *CHAIN_CLASSES))  # 4, 2, 2, 2
    for round_ in report["rounds"]:
        splits = round_["series"]["dihn"]["by_query_round"]
        counts = [split["num_queries"] for split in splits]
        assert counts == [QUERIES_PER_CLASS * n for n in new_classes[:round_["round"]]]
        assert sum(counts) == round_["num_queries"]
        # single-label: this round's class queries are exactly the trainer's "incremental queries"
        if round_["round"] > 1:
            assert splits[-1]["map_topk"] == pytest.approx(round_["series"]["dihn"]["map_incremental_queries"])
    # recomputed by hand: round 3's DIHN codes, the queries of classes 4-5 (round 2's)
    run = run_reader.load_run(chain["runs"][2])
    stage = run.stage("incremental")
    of_round_two = run.query_labels[:, 4:6].any(axis=1)
    aps = metrics.average_precisions(torch.from_numpy(stage.query_codes), torch.from_numpy(stage.database_codes),
                                     torch.from_numpy(run.query_labels), torch.from_numpy(run.database_labels))
    split = report["rounds"][2]["series"]["dihn"]["by_query_round"][1]
    assert (split["round"], split["num_queries"]) == (2, int(of_round_two.sum()))
    assert split["map_all"] == pytest.approx(float(aps.numpy()[of_round_two].mean()), abs=1e-12)


def test_forgetting_is_the_drop_from_the_best_earlier_round(report):
    maps = report["query_round_map_topk"]["dihn"]
    table = report["forgetting"]["dihn"]["by_query_round"]
    for g in range(4):
        for r in range(4):
            if r <= g:
                assert table[g][r] is None
            else:
                assert table[g][r] == pytest.approx(max(maps[g][g:r]) - maps[g][r])
    for r in range(1, 4):
        assert report["forgetting"]["dihn"]["average"][r] == pytest.approx(np.mean([table[g][r] for g in range(r)]))
    assert report["forgetting"]["dihn"]["average"][0] is None
    # the retrained baseline exists in rounds 1 (its original stage) and 2 only
    retrain = report["forgetting"]["retrain"]
    assert retrain["average"][2:] == [None, None]
    assert retrain["by_query_round"][0][1] == pytest.approx(report["query_round_map_topk"]["retrain"][0][0] -
                                                            report["query_round_map_topk"]["retrain"][0][1])


def test_forgetting_skips_rounds_without_a_value_and_may_be_negative():
    maps = [[0.5, 0.7, None, 0.4],
            [None, 0.9, 0.95, 0.8],
            [None, None, 0.6, None],
            [None, None, None, 0.3]]
    table, averages = rounds.forgetting(maps)
    assert table[0] == [None, pytest.approx(-0.2), None, pytest.approx(0.3)]   # best of 0.5, 0.7 minus 0.4
    assert table[1] == [None, None, pytest.approx(-0.05), pytest.approx(0.15)]  # best of 0.9, 0.95 minus 0.8
    assert table[2] == [None] * 4                                              # nothing after round 3
    assert averages == [None, pytest.approx(-0.2), pytest.approx(-0.05), pytest.approx(0.225)]


def test_a_multi_label_query_belongs_to_the_earliest_round_of_its_classes():
    chain = [SimpleNamespace(classes=(0, 4)), SimpleNamespace(classes=(4, 6)), SimpleNamespace(classes=(6, 8))]
    labels = np.zeros((5, 8), np.uint8)
    labels[0, [5, 7]] = 1   # rounds 2 and 3: round 2
    labels[1, [0, 7]] = 1   # rounds 1 and 3: round 1
    labels[2, 6] = 1        # round 3
    labels[3, 3] = 1        # round 1
    assert rounds.query_rounds(labels, chain).tolist() == [2, 1, 3, 1, 0]   # no label: no round


def test_plots_decode_with_their_figure_size(report):
    assert_plots_decode(Path(report["out"]), report["plots"], rounds.FIGURE_INCHES, "rounds.md")


def test_cli_prints_the_tables_and_writes_into_the_last_run_by_default(chain, tmp_path, capsys):
    runs = [copy_run(run, tmp_path / run.name) for run in chain["runs"]]
    assert evaluate.main([str(run) for run in runs]) == 0
    printed = capsys.readouterr().out
    for text in ("fashion-mnist in 4 rounds (classes 0-3, +4-5, +6-7, +8-9)", "original (both)",
                 "incremental + retrain", "round 4 classes (8-9)", "forgetting of", "average",
                 str(runs[-1] / "rounds-report" / "rounds.md")):
        assert text in printed, text
    assert (runs[-1] / "rounds-report" / "rounds.json").is_file()


def test_one_run_is_still_the_one_run_report(chain, tmp_path, capsys):
    assert evaluate.main([str(chain["runs"][1]), "--out", str(tmp_path)]) == 0
    assert "P@1000" in capsys.readouterr().out
    assert (tmp_path / "report.md").is_file() and not (tmp_path / "rounds.md").exists()


def test_a_skipped_round_is_a_chain_of_wider_rounds(chain, tmp_path):
    """Round 3's data begins with round 1's database, so runs 1 and 3 form a chain of 4 + 4 classes."""
    summary = rounds.rounds_report([chain["runs"][0], chain["runs"][2]], out=tmp_path)
    assert [r["classes"] for r in summary["rounds"]] == [[0, 4], [4, 8]]
    assert [s["num_queries"] for s in summary["rounds"][1]["series"]["dihn"]["by_query_round"]] == [20, 20]
    assert summary["rounds"][1]["keeps_previous_codes"] is True


def test_codes_that_do_not_keep_the_previous_rounds_are_flagged(chain, tmp_path):
    runs = [copy_run(run, tmp_path / run.name) for run in chain["runs"][:2]]
    packed_path = runs[1] / "incremental" / "database_codes.packed.npy"
    packed = np.load(packed_path)
    packed[0] ^= 0x80   # flip the first bit of row 0, one of round 1's frozen rows
    np.save(packed_path, packed)
    summary = rounds.rounds_report(runs, out=tmp_path / "report")
    assert summary["rounds"][1]["keeps_previous_codes"] is False
    assert summary["chain"].startswith("NOTE: the DIHN codes of round(s) 2 do not begin")


@pytest.fixture(scope="module")
def foreign_run(tiny_prepared, tmp_path_factory) -> Path:
    """A round-1 run of other data: the classic 7+3 tiny preparation."""
    out = tmp_path_factory.mktemp("foreign") / "run"
    assert train.main(["--data", str(tiny_prepared), "--out", str(out), *CHAIN_TRAIN_ARGS, "--stage", "original"]) == 0
    return out


def refusal(argv, capsys) -> str:
    assert evaluate.main([str(a) for a in argv]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0]


def test_runs_in_the_wrong_order_are_refused(chain, tmp_path, capsys):
    run1, run2, run3 = chain["runs"][:3]
    line = refusal([run1, run3, run2, "--out", tmp_path], capsys)
    assert line.startswith(f"error: {run2}: not the round after {run3}: ")
    assert "has 240 items" in line and "only 180" in line and "give the runs in round order" in line
    line = refusal([run1, run1, "--out", tmp_path], capsys)
    assert line == (f"error: {run1}: not the round after {run1}: the same run folder twice; give the runs in round "
                    f"order, each trained on data prepared with --extends the previous run's data")
    assert not (tmp_path / "rounds.json").exists()


def test_a_foreign_run_is_refused(chain, foreign_run, tmp_path, capsys):
    run1, run2 = chain["runs"][:2]
    line = refusal([foreign_run, run2, "--out", tmp_path], capsys)
    assert line.startswith(f"error: {run2}: not the round after {foreign_run}: ")
    line = refusal([run1, foreign_run, "--out", tmp_path], capsys)
    assert line.startswith(f"error: {foreign_run}: not the round after {run1}: database row ")
    assert not (tmp_path / "rounds.json").exists()


def test_queries_must_begin_with_the_previous_rounds():
    earlier = np.eye(4, dtype=np.uint8)
    later = np.concatenate([np.pad(earlier, ((0, 0), (0, 2))), np.eye(6, dtype=np.uint8)[4:]])
    assert rounds.query_prefix_problem(earlier, later) is None
    relabelled = later.copy()
    relabelled[2, 5] = 1
    assert rounds.query_prefix_problem(earlier, relabelled).startswith("query row 2 carries other labels")
    assert "cannot begin" in rounds.query_prefix_problem(earlier, later[:3])


def test_precision_k_belongs_to_the_one_run_report(chain):
    with pytest.raises(SystemExit) as stopped:
        evaluate.parse_args([str(run) for run in chain["runs"][:2]] + ["--precision-k", "10"])
    assert stopped.value.code == 2
