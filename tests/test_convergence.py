"""The convergence read-out: the curve from a stage's history, the stopping rule, training times."""
import json

import pytest

from dihn_dist.reports import convergence, figures


def history(maps, train_s=10.0, eval_s=2.0, every=2):
    """Outer-iteration records as the trainer writes them, evaluated every `every` iterations but the last."""
    records = []
    for index, value in enumerate(maps):
        record = {"iteration": index, "train_s": train_s}
        if (index + 1) % every == 0 and index + 1 < len(maps):
            record.update(eval_map_all=value, eval_s=eval_s)
        records.append(record)
    return records


def test_points_are_the_evaluations_then_the_final_row():
    records = history([0.1, 0.2, 0.3, 0.4, 0.5])
    assert figures.map_points(records, final_map=0.55) == [(2, 0.2), (4, 0.4), (5, 0.55)]


def test_converged_at_the_first_flat_window():
    points = [(2, 0.40), (4, 0.50), (6, 0.55), (8, 0.57), (10, 0.580), (12, 0.583), (14, 0.585), (16, 0.586)]
    # gains over 4 iterations: at 6: 0.15, 8: 0.07, 10: 0.03, 12: 0.013, 14: 0.005 (not < 0.005), 16: 0.003
    assert convergence.converged_at(points, window=4, min_gain=0.005) == 16
    assert convergence.converged_at(points, window=4, min_gain=0.02) == 12


def test_never_converged_and_too_short_curves_say_none():
    rising = [(at, at / 100) for at in range(2, 21, 2)]
    assert convergence.converged_at(rising, window=10, min_gain=0.005) is None
    assert convergence.converged_at([(5, 0.5)], window=10) is None
    with pytest.raises(ValueError, match="window"):
        convergence.converged_at(rising, window=0)


def test_training_time_leaves_out_the_evaluation_passes():
    records = history([0.1] * 6, train_s=10.0, eval_s=3.0)  # evaluations at 2 and 4
    total = 6 * 12.0 + 2 * 3.0  # each iteration 12 s (training 10 s + code update), two 3 s evaluations
    assert convergence.training_seconds(records, total) == pytest.approx(72.0)
    assert convergence.training_seconds(records, total, upto=3) == pytest.approx(36.0)


def test_command_prints_the_curve_and_the_comparison(tmp_path, capsys):
    run = tmp_path / "run"
    maps = [0.3, 0.5, 0.6, 0.62, 0.63, 0.631, 0.632, 0.632]
    result = {"stage": "retrain", "row": {"map_all": 0.633}, "iterations": history(maps, every=1),
              "train_time_s": 8 * 10.0 + 7 * 2.0}
    for stage, value in (("retrain", result), ("original", {**result, "stage": "original"}),
                         ("incremental", {**result, "stage": "incremental", "row": {"map_all": 0.9}})):
        (run / stage).mkdir(parents=True)
        (run / stage / "result.json").write_text(json.dumps(value))
    assert convergence.main([str(run), "--window", "2", "--compare", str(run)]) == 0
    printed = capsys.readouterr().out
    assert "| 8 | 0.6330 |" in printed
    assert "converged (mAP@ALL gained < 0.005 over the last 2 outer iterations) at iteration 7" in printed
    assert "DIHN" in printed and "0.9000" in printed


def test_missing_stage_is_a_one_line_usage_error(tmp_path, capsys):
    # an empty folder: no stage, and not a run either, which is what the line says (with the command)
    assert convergence.main([str(tmp_path)]) == 2
    stderr = capsys.readouterr().err
    assert stderr.count("\n") == 1 and f"so {tmp_path} is not a run folder" in stderr
