"""The backbone benchmark's measuring parts at a tiny size (tests/bench/bench_backbones.py): the bare network's
rate, and the row it reads from a finished run (mAP of each stage, B_old checked against stage 1's codes)."""
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent / "bench"))
import bench_backbones  # noqa: E402


def test_bare_network_rates_are_measured_for_training_and_forward_passes():
    for mode in ("train", "forward"):
        assert bench_backbones.bare_rate("small-cnn", 28, 8, 2, mode) > 0


def test_quality_row_reads_a_finished_run(finished_run, tmp_path):
    out = tmp_path / "runs" / "small-cnn"
    out.mkdir(parents=True)
    metrics = json.loads((finished_run / "metrics.json").read_text())
    (out / "metrics.json").write_text(json.dumps(metrics))
    out.with_name("small-cnn.wall_s").write_text("90.0")
    row = bench_backbones.quality_row("small-cnn", out)
    maps = {r["stage"]: f"{r['map_all']:.4f}" for r in metrics["rows"]}
    assert row[:5] == ["small-cnn", maps["original"], maps["incremental"], maps["retrain"], "yes"]
    assert row[-1] == "1.5" and float(row[6]) > 0  # minutes; images/s

    # a B_old that changed between stage 1 and the end of DIHN is reported, not hidden
    metrics["stages"]["incremental"]["frozen_checksum_after"] = "0" * 64
    (out / "metrics.json").write_text(json.dumps(metrics))
    assert bench_backbones.quality_row("small-cnn", out)[4] == "NO"
