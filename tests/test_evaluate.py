"""python -m dihn_dist.evaluate and the exported format, on a tiny finished run; TensorBoard read-back."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import assert_plots_decode, copy_run

from dihn_dist.method import metrics
from dihn_dist.models.networks import build_model
from dihn_dist.reports import evaluate, figures
from dihn_dist.training import run_reader

# FFCV's discarded loaders print harmless numba finalizer KeyErrors (FFCV 1.0.2 with numba).
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")


@pytest.fixture(scope="module")
def run(finished_run):
    return finished_run


@pytest.fixture(scope="module")
def report(run, tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    return evaluate.evaluate_run(run, out=out)


def test_report_rows_equal_metrics_json(run, report):
    recorded = json.loads((run / "metrics.json").read_text())["rows"]
    assert [r["stage"] for r in report["rows"]] == [r["stage"] for r in recorded] == \
        ["original", "incremental", "retrain"]
    for ours, theirs in zip(report["rows"], recorded):
        assert set(theirs) <= set(ours)
        for key, value in theirs.items():
            if isinstance(value, float):
                assert ours[key] == pytest.approx(value, abs=1e-12), (theirs["stage"], key)
            else:
                assert ours[key] == value, (theirs["stage"], key)
    assert report["agreement"].startswith("Recomputed rows equal")
    written = json.loads((Path(report["out"]) / "report.json").read_text())
    assert written["rows"] == json.loads(json.dumps(report["rows"]))


def test_topk_option_changes_only_map_at_k(run, tmp_path):
    summary = evaluate.evaluate_run(run, topk=5, out=tmp_path)
    incremental = run_reader.load_run(run).stage("incremental")
    labels = run_reader.load_run(run)
    expected = metrics.mean_average_precision(
        torch.from_numpy(incremental.query_codes), torch.from_numpy(incremental.database_codes),
        torch.from_numpy(labels.query_labels), torch.from_numpy(labels.database_labels), topk=5)
    row = next(r for r in summary["rows"] if r["stage"] == "incremental")
    assert (row["topk"], row["map_topk"]) == (5, pytest.approx(expected, abs=1e-12))
    assert summary["agreement"].startswith("Not compared")


def test_plots_decode_with_their_figure_size(report):
    assert_plots_decode(Path(report["out"]), report["plots"], evaluate.FIGURE_INCHES, "report.md")


def test_curves_and_bit_balance(run, report):
    loaded = run_reader.load_run(run)
    for stage, curves in report["stages"].items():
        codes = loaded.stage(stage).database_codes
        assert curves["bit_balance"] == pytest.approx((codes > 0).mean(axis=0).tolist())
        pr = curves["precision_recall"]
        assert len(pr["precision"]) == len(pr["recall"]) == loaded.code_length + 1
        assert np.all(np.diff(pr["recall"]) >= -1e-12)  # recall grows with the radius
        at_k = curves["precision_at_k"]
        assert at_k["k"][0] == 1 and at_k["k"][-1] == codes.shape[0]
        # precision over the whole database = fraction of relevant items, averaged over queries
        assert at_k["precision"][-1] == pytest.approx(pr["precision"][-1])


def test_map_per_iteration_comes_from_the_eval_entries(run):
    loaded = run_reader.load_run(run)
    stage = loaded.stage("incremental")
    stage_report = evaluate.evaluate_stage(loaded, stage, None, loaded.config["precision_k"])
    iterations, maps = zip(*figures.map_points(stage_report.iterations, stage_report.row["map_all"]))
    history = json.loads((run / "metrics.json").read_text())["stages"]["incremental"]["iterations"]
    assert iterations == (1, 2)
    assert maps == (history[0]["eval_map_all"], stage_report.row["map_all"])


def test_cli_prints_the_table(run, tmp_path, capsys):
    assert evaluate.main([str(run), "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    for text in ("mAP@ALL", "original codes", "DIHN", "retrained ADSH", "report.md"):
        assert text in printed
    assert (tmp_path / "report.md").is_file()


def test_exported_codes_load_with_numpy_alone(run):
    # The documented recipe: unpack the packed rows, Hamming distance by popcount of XOR.
    c = json.loads((run / "config.json").read_text())["code_length"]
    packed = np.load(run / "incremental" / "database_codes.packed.npy")
    codes = np.load(run / "incremental" / "database_codes.npy")
    query_codes = np.load(run / "incremental" / "query_codes.npy")
    assert np.array_equal(np.unpackbits(packed, axis=1, count=c).astype(np.int8) * 2 - 1, codes)
    query_packed = np.packbits(query_codes[:1] > 0, axis=1)
    distances = np.bitwise_count(np.bitwise_xor(packed, query_packed)).sum(axis=1)
    expected = metrics.hamming_distances(torch.from_numpy(query_codes[:1]), torch.from_numpy(codes))[0].numpy()
    assert np.array_equal(distances, expected)
    # and the reader needs neither torch nor the rest of dihn_dist's dependencies
    check = ("import sys; from dihn_dist.training import run_reader; r = run_reader.load_run(sys.argv[1]); "
             "r.stage('incremental'); assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", check, str(run)], check=True)


def test_tensorboard_scalars_read_back(run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    history = json.loads((run / "metrics.json").read_text())["stages"]
    tags = set(events.Tags()["scalars"])
    for stage, result in history.items():
        for key in ("loss_total", "loss_hash", "loss_quantization", "lr", "train_s", "dcc_s", "gather_s"):
            scalars = events.Scalars(f"{stage}/{key}")
            assert [s.step for s in scalars] == [r["iteration"] for r in result["iterations"]], (stage, key)
            assert [s.value for s in scalars] == pytest.approx([r[key] for r in result["iterations"]], rel=1e-6)
        assert f"{stage}/eval_map_all" in tags


# ----------------------------------------------------------------------------------------------------
# Bad run folders

def test_missing_run_folder(tmp_path):
    with pytest.raises(run_reader.IncompleteRunError, match="does not exist.*dihn_dist.train"):
        evaluate.evaluate_run(tmp_path / "nothing")
    with pytest.raises(run_reader.IncompleteRunError, match="config.json is missing.*not a run folder"):
        evaluate.evaluate_run(tmp_path)


def test_missing_labels_name_the_resume_command(run, tmp_path):
    broken = copy_run(run, tmp_path / "run")
    (broken / "query_labels.npy").unlink()
    with pytest.raises(run_reader.IncompleteRunError, match="query_labels.npy is missing.*--config .*--resume"):
        evaluate.evaluate_run(broken)


def test_missing_codes_say_how_to_export_them_again(run, tmp_path):
    broken = copy_run(run, tmp_path / "run")
    (broken / "incremental" / "database_codes.packed.npy").unlink()
    with pytest.raises(run_reader.IncompleteRunError,
                       match="database_codes.packed.npy is missing; delete .*result.json and run .*--stage "
                             "incremental --resume.*re-exports"):
        evaluate.evaluate_run(broken)


def test_unfinished_stage_is_left_out_and_named_when_asked_for(run, tmp_path):
    partial = copy_run(run, tmp_path / "run")
    (partial / "retrain" / "result.json").unlink()
    summary = evaluate.evaluate_run(partial, out=tmp_path / "report")
    assert [r["stage"] for r in summary["rows"]] == ["original", "incremental"]
    with pytest.raises(run_reader.IncompleteRunError, match="stage 'retrain' has not finished.*--stage retrain"):
        run_reader.load_run(partial).stage("retrain")


def test_other_format_version_is_refused(run, tmp_path, capsys):
    other = copy_run(run, tmp_path / "run")
    manifest = json.loads((other / "manifest.json").read_text())
    manifest["format_version"] = 99
    (other / "manifest.json").write_text(json.dumps(manifest))
    assert evaluate.main([str(other)]) == 2
    assert "format_version 99" in capsys.readouterr().err


def test_codes_of_another_shape_are_refused(run, tmp_path):
    other = copy_run(run, tmp_path / "run")
    config = json.loads((other / "config.json").read_text())
    config["code_length"] = 16
    (other / "config.json").write_text(json.dumps(config))
    with pytest.raises(run_reader.RunFormatError, match="database_codes.packed.npy: expected uint8 of shape"):
        evaluate.evaluate_run(other)


def test_diagnose_stage_reads_a_finished_run(run, capsys):
    """tests/bench/diagnose_stage.py, the evidence script of docs/quality.md, on a finished tiny run."""
    sys.path.insert(0, str(Path(__file__).parent / "bench"))
    import diagnose_stage
    diagnose_stage.main([str(run), "--stage", "incremental"])
    printed = capsys.readouterr().out
    assert "units" in printed and "dead" in printed and "bit means" in printed
    assert printed.count("median |g|") == 2 * len(list(build_model("small-cnn", 8).parameters()))
