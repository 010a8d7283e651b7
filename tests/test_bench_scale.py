"""The synthetic NUS-WIDE tc21 generator of tests/bench/bench_scale.py, at a tiny size: the files are what
`dihn_dist.data.sources.load_nus_wide_tc21` reads, the labels are multi-label with the protocol's query blocks,
and every image shows its tags (each tag's tint is the one that dominates the picture's saturated pixels)."""
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent / "bench"))
import nus_synth  # noqa: E402

from dihn_dist.data.sources import NUS_WIDE_FILES, load_nus_wide_tc21

DATABASE, QUERY_PER_TAG = 60, 1


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    out = tmp_path_factory.mktemp("nus_synth") / "source"
    marker = nus_synth.generate(out, DATABASE, QUERY_PER_TAG, seed=0, workers=2, log=lambda message: None)
    return out, marker


def test_layout_is_what_the_loader_reads(generated):
    out, marker = generated
    assert sorted(p.name for p in out.iterdir()) == sorted([*NUS_WIDE_FILES.values(), "images", nus_synth.MARKER])
    dataset = load_nus_wide_tc21(out)
    assert len(dataset.database) == DATABASE and len(dataset.query) == 21 * QUERY_PER_TAG
    assert dataset.database.labels.shape == (DATABASE, 21) and dataset.query.labels.shape == (21, 21)
    assert dataset.database.images.paths[0] == "images/database/000/d000000.jpg"
    assert dataset.query.images.paths[-1] == "images/query/000/q000020.jpg"
    assert marker["images"] == DATABASE + 21 * QUERY_PER_TAG
    assert not list(out.rglob("*.tmp"))


def test_labels_are_multi_label_with_one_query_block_per_tag(generated):
    dataset = load_nus_wide_tc21(generated[0])
    per_image = dataset.database.labels.sum(axis=1)
    assert per_image.min() >= 1 and per_image.max() <= 3 and (per_image > 1).any()
    query = dataset.query.labels
    assert all(query[tag, tag] == 1 for tag in range(21))   # block t (one query here) carries tag t


def tint_pixel_counts(image: np.ndarray) -> np.ndarray:
    """Per tint: pixels (every second row and column) of nearly its hue and brighter than any background."""
    red, green, blue = (image[::2, ::2, channel].astype(np.float32).ravel() for channel in range(3))
    norms = np.sqrt(red * red + green * green + blue * blue)
    bright = np.maximum(np.maximum(red, green), blue) > 125
    counts = []
    for tint in nus_synth.TINTS:   # channel by channel: numpy's reductions over a 3-wide axis are slow
        cosine_times_norm = (red * tint[0] + green * tint[1] + blue * tint[2]) / np.sqrt((tint ** 2).sum())
        counts.append(int((bright & (cosine_times_norm > 0.97 * norms)).sum()))
    return np.array(counts)


def test_images_show_their_tags(generated):
    dataset = load_nus_wide_tc21(generated[0])
    carried, absent = [], []
    for part in (dataset.database, dataset.query):
        for index in range(len(part)):
            image = part.images.load(index)
            assert 192 <= min(image.shape[:2]) and max(image.shape[:2]) == 256
            counts = tint_pixel_counts(image)
            tints = {nus_synth.tag_content(int(tag))[1] for tag in np.flatnonzero(part.labels[index])}
            assert int(np.argmax(counts)) in tints, part.images.describe(index)
            carried += [counts[t] for t in tints]
            absent += [counts[t] for t in range(len(nus_synth.TINTS)) if t not in tints]
    assert np.mean(carried) > 100 * (np.mean(absent) + 1)


def test_a_complete_folder_is_skipped_and_other_settings_refused(generated):
    out, marker = generated
    assert nus_synth.generate(out, DATABASE, QUERY_PER_TAG, seed=0, log=lambda message: None) == marker
    with pytest.raises(ValueError, match="other settings"):
        nus_synth.generate(out, DATABASE + 1, QUERY_PER_TAG, seed=0, log=lambda message: None)


# ----------------------------------------------------------------------------------------------------------
# bench_scale.py --simulate ROWS (issue 23): both paths under torchrun x2 on gloo, at a CI size

SIMULATE_ROWS, SIMULATE_BLOCK, SIMULATE_QUERIES = 20_000, 3_001, 210
BENCH_SCALE = Path(__file__).parent / "bench" / "bench_scale.py"
SIMULATE_PHASES = {"sharded": ["sample", "r", "hash-term stats", "gather U", "dcc", "exchange", "checkpoint",
                               "evaluation"],
                   "rank0": ["sample", "r", "hash-term stats", "gather U", "dcc", "broadcast", "checkpoint",
                             "evaluation"]}


@pytest.fixture(scope="module")
def simulated(tmp_path_factory):
    """Blocks of 3,001 rows: uneven, and a shard boundary (row 10,000) inside one; 210 of the 2,100 queries."""
    import subprocess

    work = tmp_path_factory.mktemp("simulate")
    command = [sys.executable, str(BENCH_SCALE), "--work", str(work), "--simulate", str(SIMULATE_ROWS),
               "--simulate-block-rows", str(SIMULATE_BLOCK), "--simulate-queries", str(SIMULATE_QUERIES)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=900)   # a hang guard only
    return work / f"simulate-{SIMULATE_ROWS}", result


def table_cells(stdout: str):
    lines = [line for line in stdout.splitlines() if line.startswith("| ")]
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in lines]


def test_simulate_prints_every_phase_of_both_paths_and_they_agree(simulated):
    folder, result = simulated
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    cells = table_cells(result.stdout)
    assert cells[0] == ["path", "phase", "seconds", "longest wait s (share)", "peak RSS per rank"]
    for path, phases in SIMULATE_PHASES.items():
        rows = [row for row in cells[1:] if row[0] == path]
        assert [row[1] for row in rows][:len(phases)] == phases
        for row in rows[:len(phases)]:
            assert float(row[2].split()[0]) >= 0 and row[4].endswith("GiB") and len(row[4].split(" / ")) == 2
        evaluation = rows[len(phases) - 1]
        assert "(x10: " in evaluation[2] and f"for {SIMULATE_QUERIES} queries" in evaluation[2]
        assert {"iteration (sample .. checkpoint)", "peak RSS per rank (whole run)",
                "state per rank (bytes)"} <= {row[1] for row in rows}
    assert cells[-1][:3] == ["both", "sharded vs rank-0 path", "AGREE"]
    assert "load average" in result.stdout and "upper bounds" in result.stdout

    import json

    summary = json.loads((folder / "summary.json").read_text())
    agreement = summary["agreement"]
    assert agreement["agree"] and agreement["codes_equal"] and agreement["stats_equal"] and agreement["r_equal"]
    assert agreement["max_metric_difference"] <= 1e-9
    sharded = summary["sharded"]
    assert sharded["rows_held"] == [[0, 10_000], [10_000, 20_000]]
    # n/N x (c/8 + 4) bytes a rank plus the shared pattern table (P x 21 bool)
    assert sharded["state_bytes"] == [10_000 * (6 + 4) + sharded["patterns"] * 21] * 2


def test_simulate_checkpoints_hold_the_solved_codes(simulated):
    """The sharded checkpoint (one torch.distributed.checkpoint file per rank, named by its rows) and rank 0's
    file hold the same packed codes, the ones both paths' digests name; no temp folder is left."""
    import hashlib

    import numpy as np
    import torch
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    folder, result = simulated
    assert result.returncode == 0
    checkpoint = folder / "sharded-codes-iteration1"
    assert sorted(p.name for p in checkpoint.iterdir()) == [".metadata", "__0_0.distcp", "__1_0.distcp"]
    assert not list(folder.glob("*.tmp"))
    dcp_to_torch_save(checkpoint, folder / "sharded-codes.pt")
    shards = torch.load(folder / "sharded-codes.pt")
    assert sorted(shards) == ["rows_0_10000", "rows_10000_20000"]
    whole = np.load(folder / "rank0-codes-iteration1.npy")
    assert whole.shape == (SIMULATE_ROWS, 6) and whole.dtype == np.uint8
    assert np.array_equal(np.concatenate([shards["rows_0_10000"].numpy(),
                                          shards["rows_10000_20000"].numpy()]), whole)
    digests = torch.load(folder / "rank0.pt", weights_only=False)["digests"]
    assert digests == [hashlib.sha256(whole[a:b].tobytes()).hexdigest() for a, b in ((0, 10_000), (10_000, 20_000))]


def test_simulate_compare_notices_a_difference(simulated):
    import scale_sim
    import torch

    folder, result = simulated
    assert result.returncode == 0
    sharded, rank0 = (torch.load(folder / f"{path}.pt", weights_only=False) for path in ("sharded", "rank0"))
    assert scale_sim.compare(sharded, rank0)["agree"]
    one_bit = dict(sharded, digests=[sharded["digests"][0], "0" * 64])
    assert not scale_sim.compare(one_bit, rank0)["agree"]
    nudged = dict(sharded, row=dict(sharded["row"], map_all=sharded["row"]["map_all"] + 1e-8))
    assert not scale_sim.compare(nudged, rank0)["agree"]
    targets = sharded["targets"].clone()
    targets[0, 0] += 1
    assert not scale_sim.compare(dict(sharded, targets=targets), rank0)["stats_equal"]


@pytest.mark.parametrize("flags, expected", [
    (["--simulate", "0"], "--simulate: expected a positive number"),
    (["--simulate", "10", "--simulate-paths", "sharded,rank1"], "--simulate-paths: expected sharded, rank0"),
    (["--simulate", "10", "--simulate-queries", "2101"], "--simulate-queries: expected 1 to 2100"),
])
def test_simulate_bad_flags_get_one_line(flags, expected, tmp_path):
    import subprocess

    result = subprocess.run([sys.executable, str(BENCH_SCALE), "--work", str(tmp_path), *flags],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and expected in result.stderr
