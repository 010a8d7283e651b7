"""dihn_dist.data.prepared: prepared-folder loading, per-rank batch schedules and the FFCV loaders (CPU)."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from dihn_dist.data.loader import TrainLoader, batch_schedule, eval_batches
from dihn_dist.data.prepared import load_prepared
from dihn_dist.data.sources import load_fashion_mnist

pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # numba finalizers

MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1) * 255
STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1) * 255
CPU = torch.device("cpu")


def pixels(images: torch.Tensor) -> np.ndarray:
    """Normalised (b, 3, R, R) -> (b, R, R, 3) pixel values, rounded."""
    return (images * STD + MEAN).round().permute(0, 2, 3, 1).numpy().astype(np.int64)


@pytest.fixture(scope="module")
def source_pixels(tiny_prepared):
    """RGB pixels of each database position and query row, straight from the Fashion-MNIST files."""
    fashion = load_fashion_mnist()
    database = fashion.database.images.pixels[np.load(tiny_prepared / "database_source_index.npy")]
    query = fashion.query.images.pixels[np.load(tiny_prepared / "query_source_index.npy")]
    return {name: np.repeat(grey[..., None], 3, axis=3).astype(np.int64)
            for name, grey in (("database", database), ("query", query))}


# ----------------------------------------------------------------------------------------------------------
# batch_schedule


def global_steps(order, global_batch, world_size):
    """Items of each global step: the ranks' shares of step t, concatenated in rank order."""
    per_rank = [batch_schedule(order, global_batch, world_size, rank) for rank in range(world_size)]
    steps = []
    for rank, (positions, sizes) in enumerate(per_rank):
        bounds = np.cumsum([0] + sizes)
        for t, (start, end) in enumerate(zip(bounds[:-1], bounds[1:])):
            if rank == 0:
                steps.append([])
            steps[t].append(positions[start:end])
    return per_rank, [np.concatenate(shares) for shares in steps]


@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
@pytest.mark.parametrize("batch_size", [1, 2, 5])
def test_schedule_shards_are_disjoint_complete_and_in_order(world_size, batch_size):
    rng = np.random.default_rng(world_size * 10 + batch_size)
    for m in range(world_size, 45):
        order = rng.permutation(1000)[:m]
        per_rank, steps = global_steps(order, batch_size * world_size, world_size)
        assert len({len(sizes) for _, sizes in per_rank}) == 1, "every rank takes the same number of steps"
        assert all(min(sizes) >= 1 for _, sizes in per_rank), "no rank has an empty step"
        assert np.array_equal(np.concatenate(steps), order), "global steps cover the subset in order"
        for t in range(len(steps)):
            sizes = [per_rank[r][1][t] for r in range(world_size)]
            assert max(sizes) - min(sizes) <= 1
        for positions, sizes in per_rank:
            assert len(positions) == sum(sizes)


@pytest.mark.parametrize("half", [2, 3, 32])
def test_schedule_global_steps_do_not_depend_on_world_size(half):
    rng = np.random.default_rng(half)
    for m in range(2, 5 * half + 3):
        order = rng.permutation(m)
        _, single = global_steps(order, 2 * half, 1)
        _, double = global_steps(order, 2 * half, 2)
        assert len(single) == len(double)
        for a, b in zip(single, double):
            assert np.array_equal(a, b)


def test_schedule_merges_only_a_small_final_batch():
    assert batch_schedule(np.arange(10), 4, 1, 0)[1] == [4, 4, 2]      # 2 >= half a global batch: own step
    assert batch_schedule(np.arange(9), 4, 1, 0)[1] == [4, 5]          # 1 < 2: merged
    assert batch_schedule(np.arange(9), 4, 2, 1)[1] == [2, 2]          # global [4, 5] split 2+2 / 2+3
    assert batch_schedule(np.arange(9), 4, 2, 0)[1] == [2, 3]
    assert batch_schedule(np.arange(3), 16, 2, 1)[1] == [1]            # one short global batch
    with pytest.raises(ValueError, match="fewer than the 4 ranks"):
        batch_schedule(np.arange(3), 32, 4, 0)
    with pytest.raises(ValueError, match="rank"):
        batch_schedule(np.arange(8), 4, 2, 2)
    with pytest.raises(ValueError, match="global_batch >= world_size"):
        batch_schedule(np.arange(8), 3, 4, 0)


# ----------------------------------------------------------------------------------------------------------
# load_prepared


def test_load_prepared(tiny_prepared):
    data = load_prepared(tiny_prepared)
    assert (data.num_database, data.num_query, data.num_classes) == (600, 100, 10)
    assert (data.num_original, data.num_seen, data.dataset) == (420, 7, "fashion-mnist")
    assert (data.image_size, data.max_side, data.largest_side, data.image_storage) == (28, 28, 28, "raw")
    assert data.database_labels.shape == (600, 10) and data.database_labels.dtype == np.uint8


def test_load_prepared_errors_name_the_path_and_the_command(tiny_prepared, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nowhere does not exist.*python -m dihn_dist.prepare"):
        load_prepared(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match=r"manifest.json does not exist.*python -m dihn_dist.prepare"):
        load_prepared(tmp_path)
    copy = tmp_path / "copy"
    shutil.copytree(tiny_prepared, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    (copy / "manifest.json").write_text(json.dumps({**manifest, "format": "something-else"}))
    with pytest.raises(ValueError, match="not a dihn_dist preparation"):
        load_prepared(copy)
    (copy / "manifest.json").write_text(json.dumps(manifest))
    (copy / "query.beton").unlink()
    with pytest.raises(FileNotFoundError, match="query.beton"):
        load_prepared(copy)


# ----------------------------------------------------------------------------------------------------------
# Loaders


def test_train_loader_yields_exactly_the_requested_positions_and_steps(tiny_prepared, source_pixels):
    """Rank 0 of 2 with a merged final step (135 = 4 x 32 + 7): FFCV batches of 16 are regrouped into
    [16, 16, 16, 20] (68 items); order swapped in place for a second epoch without recompiling; the images are
    exactly the source pixels (no augmentation in the loader: it runs seeded on the device)."""
    data = load_prepared(tiny_prepared)
    rng = np.random.default_rng(0)
    first, _ = batch_schedule(rng.permutation(600)[:135], 32, 2, 0)
    loader = TrainLoader(data, batch_size=16, resolution=28, device=CPU, num_workers=2, length=len(first))
    compiled = None
    for epoch in range(2):
        positions, sizes = batch_schedule(rng.permutation(600)[:135], 32, 2, 0)
        assert len(positions) == loader.length and sizes == [16, 16, 16, 20]
        loader.set_order(positions, sizes)
        batches = list(loader)   # kept across iterations: must not be overwritten by later batches
        compiled = compiled or loader.loader.code
        assert loader.loader.code is compiled
        assert [len(b[2]) for b in batches] == sizes
        images = torch.cat([b[0] for b in batches])
        labels = torch.cat([b[1] for b in batches])
        loaded = torch.cat([b[2] for b in batches])
        assert images.dtype == torch.float32 and images.shape == (68, 3, 28, 28)
        assert loaded.dtype == torch.int64 and np.array_equal(loaded.numpy(), positions)
        assert labels.dtype == torch.float32 and np.array_equal(labels.numpy(), data.database_labels[positions])
        assert np.array_equal(pixels(images), source_pixels["database"][positions])


def test_train_loader_resizes_and_refuses_bad_orders(tiny_prepared):
    data = load_prepared(tiny_prepared)
    loader = TrainLoader(data, batch_size=8, resolution=32, device=CPU, num_workers=1, length=20)
    positions, sizes = batch_schedule(np.arange(580, 600), 8, 1, 0)
    loader.set_order(positions, sizes)
    batches = list(loader)
    assert [tuple(b[0].shape) for b in batches] == [(8, 3, 32, 32), (8, 3, 32, 32), (4, 3, 32, 32)]
    assert all(torch.isfinite(b[0]).all() for b in batches)
    assert torch.cat([b[2] for b in batches]).tolist() == list(range(580, 600))
    with pytest.raises(ValueError, match="expected 20 positions"):
        loader.set_order(np.arange(21), [21])
    with pytest.raises(ValueError, match="sum to 20"):
        loader.set_order(np.arange(20), [8, 8])
    with pytest.raises(ValueError, match="num_workers"):
        TrainLoader(data, batch_size=8, resolution=32, device=CPU, num_workers=-1, length=20)


def test_eval_batches_are_sequential_and_deterministic(tiny_prepared, source_pixels):
    data = load_prepared(tiny_prepared)
    rows = np.array([99, 3, 50, 0, 98, 97, 1])
    batches = list(eval_batches(data, "query", batch_size=3, resolution=28, device=CPU, num_workers=1,
                                indices=rows))
    assert [len(b[2]) for b in batches] == [3, 3, 1]
    assert torch.cat([b[2] for b in batches]).tolist() == rows.tolist()
    images = torch.cat([b[0] for b in batches])
    assert np.array_equal(pixels(images), source_pixels["query"][rows])
    assert np.array_equal(torch.cat([b[1] for b in batches]).numpy(), data.query_labels[rows])
    assert list(eval_batches(data, "query", batch_size=3, resolution=28, device=CPU, num_workers=1,
                             indices=np.array([], dtype=np.int64))) == []
    with pytest.raises(ValueError, match="rows in 0..99"):
        eval_batches(data, "query", batch_size=3, resolution=28, device=CPU, num_workers=1, indices=np.array([100]))
    with pytest.raises(ValueError, match="part"):
        eval_batches(data, "train", batch_size=3, resolution=28, device=CPU, num_workers=1)


def test_loaders_switch_off_ffcvs_cuda_streams(tiny_prepared, source_pixels, monkeypatch):
    """FFCV's epoch iterator wraps each batch in a CUDA stream of its own thread (current device 0) whenever
    CUDA is present; building a loader must switch that off. Here the flag is forced on as on a GPU machine:
    left on, the loader thread would call into CUDA, which this CPU machine lacks, and yield nothing."""
    from ffcv.loader import epoch_iterator
    monkeypatch.setattr(epoch_iterator, "IS_CUDA", True)
    data = load_prepared(tiny_prepared)
    loader = TrainLoader(data, batch_size=8, resolution=28, device=CPU, num_workers=1, length=12)
    assert epoch_iterator.IS_CUDA is False
    positions, sizes = batch_schedule(np.arange(100, 112), 8, 1, 0)
    loader.set_order(positions, sizes)
    images = torch.cat([b[0] for b in loader])
    assert np.array_equal(pixels(images), source_pixels["database"][positions])
    monkeypatch.setattr(epoch_iterator, "IS_CUDA", True)
    batches = list(eval_batches(data, "query", batch_size=4, resolution=28, device=CPU, num_workers=1,
                                indices=np.arange(6)))
    assert epoch_iterator.IS_CUDA is False and sum(len(b[2]) for b in batches) == 6
