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
