"""python -m dihn_dist.retrieve on a tiny finished run: ranking, labels, contact sheet, image-file queries."""
import numpy as np
import pytest
from conftest import copy_run
from PIL import Image

from dihn_dist.data.loader import eval_batches
from dihn_dist.data.prepared import load_prepared
from dihn_dist.serving import retrieve
from dihn_dist.training import run_reader

# FFCV's discarded loaders print harmless numba finalizer KeyErrors (FFCV 1.0.2 with numba).
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")

QUERY = 3
TOPK = 12


@pytest.fixture(scope="module")
def run(finished_run):
    return finished_run


@pytest.fixture(scope="module")
def result(run, tmp_path_factory):
    return retrieve.retrieve(run, QUERY, stage="incremental", topk=TOPK,
                             out=tmp_path_factory.mktemp("sheet") / "sheet.png")


def expected_ranking(codes: np.ndarray, query_code: np.ndarray) -> np.ndarray:
    """Independent of retrieve.py: distance from the inner product, ties by row."""
    distances = (codes.shape[1] - codes.astype(np.int64) @ query_code.astype(np.int64)) // 2
    return np.lexsort((np.arange(len(codes)), distances)), distances


def test_results_sorted_by_hamming_distance_with_their_labels(run, result):
    loaded = run_reader.load_run(run)
    stage = loaded.stage("incremental")
    assert result.matches_exported  # the model re-encodes the query exactly as at export
    assert np.array_equal(result.query_code, stage.query_codes[QUERY])
    order, distances = expected_ranking(stage.database_codes, result.query_code)
    assert [item.index for item in result.items] == order[:TOPK].tolist()
    assert [item.distance for item in result.items] == distances[order[:TOPK]].tolist()
    assert [item.rank for item in result.items] == list(range(1, TOPK + 1))
    ranked = [(item.distance, item.index) for item in result.items]
    assert ranked == sorted(ranked)
    query_labels = loaded.query_labels[QUERY]
    assert result.query_labels == [loaded.class_names[k] for k in np.flatnonzero(query_labels)]
    for item in result.items:
        labels = loaded.database_labels[item.index]
        assert item.labels == [loaded.class_names[k] for k in np.flatnonzero(labels)]
        assert item.relevant == bool((labels & query_labels).any())


def frame_colour(sheet: Image.Image, x: int, y: int):
    """Colour of the frame of the cell whose top-left corner is (x, y)."""
    return sheet.getpixel((x + retrieve.GAP + 1, y + retrieve.GAP + 1))


def test_contact_sheet_frames_show_relevance(result):
    with Image.open(result.sheet) as sheet:
        sheet.load()
    assert sheet.size == retrieve.sheet_size(TOPK)
    assert frame_colour(sheet, 0, retrieve.HEADER_HEIGHT) == retrieve.COLOURS["query"]
    columns = retrieve.MAX_COLUMNS
    for slot, item in enumerate(result.items):
        x = retrieve.CELL_WIDTH + retrieve.SEPARATOR + retrieve.CELL_WIDTH * (slot % columns)
        y = retrieve.HEADER_HEIGHT + retrieve.CELL_HEIGHT * (slot // columns)
        expected = retrieve.COLOURS["relevant" if item.relevant else "irrelevant"]
        assert frame_colour(sheet, x, y) == expected, item


def test_image_file_query_is_encoded_like_the_query_set(run, tiny_prepared, tmp_path, capsys):
    data = load_prepared(tiny_prepared)
    resolution = retrieve.model_resolution(run_reader.load_run(run), data)
    images, _, _ = next(iter(eval_batches(data, "query", batch_size=1, resolution=resolution, device="cpu",
                                          num_workers=1, indices=np.array([QUERY]))))
    path = tmp_path / "query.png"
    Image.fromarray(retrieve.to_display(images)[0]).save(path)
    class_name = data.manifest["class_names"][int(np.flatnonzero(data.query_labels[QUERY])[0])]
    sheet = tmp_path / "file_query.png"
    assert retrieve.main([str(run), "--query", str(path), "--topk", "4", "--query-labels", class_name,
                          "--out", str(sheet)]) == 0
    printed = capsys.readouterr().out
    stored = np.load(run / "incremental" / "query_codes.npy")[QUERY]
    assert f"code {''.join('1' if b > 0 else '0' for b in stored)}" in printed
    assert f"(labels: {class_name})" in printed and "contact sheet" in printed
    with Image.open(sheet) as image:
        assert image.size == retrieve.sheet_size(4)
    unlabelled = retrieve.retrieve(run, path, topk=3, write_sheet=False)
    assert np.array_equal(unlabelled.query_code, stored)
    assert unlabelled.query_labels is None and all(item.relevant is None for item in unlabelled.items)


def test_original_stage_ranks_the_original_database_only(run):
    loaded = run_reader.load_run(run)
    original = retrieve.retrieve(run, QUERY, stage="original", topk=loaded.num_original + 50, write_sheet=False)
    assert len(original.items) == loaded.num_original
    assert sorted(item.index for item in original.items) == list(range(loaded.num_original))


# ----------------------------------------------------------------------------------------------------
# Bad input

def test_query_index_out_of_range(run, result):
    with pytest.raises(ValueError, match="--query 100: out of range.*100 images \\(rows 0..99\\)"):
        retrieve.retrieve(run, 100, write_sheet=False)


def test_unreadable_or_missing_image(run, tmp_path, capsys):
    garbage = tmp_path / "broken.jpg"
    garbage.write_bytes(b"not an image at all")
    with pytest.raises(ValueError, match="broken.jpg: cannot read the image"):
        retrieve.retrieve(run, garbage, write_sheet=False)
    assert retrieve.main([str(run), "--query", str(tmp_path / "missing.png")]) == 2
    assert "no such image file" in capsys.readouterr().err


def test_unknown_query_label(run, tmp_path):
    path = tmp_path / "grey.png"
    Image.new("RGB", (40, 30), (128, 128, 128)).save(path)
    with pytest.raises(ValueError, match="unknown class 'Zebra'"):
        retrieve.retrieve(run, path, query_labels="Zebra", write_sheet=False)


def test_unfinished_stage_and_missing_data(run, tmp_path):
    partial = copy_run(run, tmp_path / "run")
    (partial / "retrain" / "result.json").unlink()
    with pytest.raises(run_reader.IncompleteRunError, match="stage 'retrain' has not finished.*--stage retrain"):
        retrieve.retrieve(partial, QUERY, stage="retrain", write_sheet=False)
    with pytest.raises(FileNotFoundError, match="pass --data DIR"):
        retrieve.retrieve(partial, QUERY, data_dir=str(tmp_path / "moved"), write_sheet=False)
    with pytest.raises(ValueError, match="--topk"):
        retrieve.retrieve(partial, QUERY, topk=0, write_sheet=False)


@pytest.mark.parametrize("size", [(1, 1), (3, 40)])
def test_a_query_image_under_the_stored_minimum_is_refused(run, tmp_path, capsys, size):
    from dihn_dist.data.parts import MIN_STORED_SIDE
    path = tmp_path / "tiny.png"
    Image.new("RGB", size, (128, 128, 128)).save(path)
    assert retrieve.main([str(run), "--query", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert f"error: --query {path}: {size[0]} x {size[1]} px; images need both sides >= {MIN_STORED_SIDE} px" in err
    edge = tmp_path / "edge.png"
    Image.new("RGB", (MIN_STORED_SIDE, 40), (128, 128, 128)).save(edge)
    assert len(retrieve.retrieve(run, edge, topk=3, write_sheet=False).items) == 3   # the minimum itself is fine


def test_an_ivf_index_returning_fewer_than_topk_says_so_and_why(run, tmp_path):
    pytest.importorskip("faiss")
    from dihn_dist.serving import export, faiss_index
    ivf, flat = tmp_path / "ivf.index", tmp_path / "flat.index"
    export.export_index(run, ivf, kind="ivf")
    export.export_index(run, flat)
    index = faiss_index.load_index(ivf).index
    topk = index.ntotal   # every row: more than the nprobe lists nearest one query hold
    assert index.nprobe < index.nlist
    short = retrieve.retrieve(run, QUERY, topk=topk, write_sheet=False, faiss_path=ivf)
    found = len(short.items)
    assert 0 < found < topk
    assert short.note == faiss_index.shortfall_note(index, found, topk)
    assert f"returned {found} of the {topk} rows asked for" in short.note
    assert f"nprobe = {index.nprobe} of its nlist = {index.nlist} lists" in short.note
    assert short.note in retrieve.format_retrieval(short).splitlines()
    exact = retrieve.retrieve(run, QUERY, topk=topk, write_sheet=False, faiss_path=flat)
    assert len(exact.items) == topk and exact.note is None
    assert "note:" not in retrieve.format_retrieval(exact)
