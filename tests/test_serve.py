"""FAISS serving: python -m dihn_dist.export (fresh and --append-to over rounds), retrieve --faiss, refusals.

Most tests use small run folders written here in the documented exported format (dihn_dist/exported.py):
they hold codes only, which is all an export reads. Chained rounds are built by hand: round r's database
is round r - 1's rows then new rows, and its first rows are round r - 1's codes bit for bit.
"""
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

faiss = pytest.importorskip("faiss")

from dihn_dist.serving import export, faiss_index, retrieve
from dihn_dist.training.run_reader import load_run

# FFCV's discarded loaders print harmless numba finalizer KeyErrors (FFCV 1.0.2 with numba).
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")

CODE_LENGTH = 12          # not a multiple of 8: the index pads to 16 bits
ROUNDS = (300, 420, 500)  # database rows after each round
NUM_CLASSES = 5
NUM_QUERY = 40
K = 25


# ----------------------------------------------------------------------------------------------------
# Synthetic runs in the exported format

def structured_codes(rng, rows: int, code_length: int = CODE_LENGTH, flip: float = 0.15) -> np.ndarray:
    """int8 +-1 codes near one of NUM_CLASSES prototypes (as trained codes are): many equal distances."""
    prototypes = rng.integers(0, 2, (NUM_CLASSES, code_length))
    bits = prototypes[rng.integers(0, NUM_CLASSES, rows)] ^ (rng.random((rows, code_length)) < flip)
    return (bits * 2 - 1).astype(np.int8)


def write_run(root: Path, codes: np.ndarray, num_original: int, stages=("incremental",), seed: int = 0) -> Path:
    """A run folder holding what an export reads: markers, config, manifest, labels and each stage's codes
    (stage original: rows [0, num_original); incremental: all rows)."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True)
    rows, code_length = codes.shape
    (root / "format.json").write_text(json.dumps({"format": "dihn_dist.run", "format_version": 1}))
    (root / "config.json").write_text(json.dumps({"code_length": code_length, "arch": "small-cnn"}))
    (root / "manifest.json").write_text(json.dumps({
        "format": "dihn_dist.prepared", "format_version": 2, "num_database": rows, "num_query": NUM_QUERY,
        "num_classes": NUM_CLASSES, "num_original": num_original, "num_seen": 3}))
    one_hot = np.eye(NUM_CLASSES, dtype=np.uint8)
    np.save(root / "database_labels.npy", one_hot[rng.integers(0, NUM_CLASSES, rows)])
    np.save(root / "query_labels.npy", one_hot[rng.integers(0, NUM_CLASSES, NUM_QUERY)])
    for stage in stages:
        stage_codes = codes[:num_original] if stage == "original" else codes
        folder = root / stage
        folder.mkdir()
        np.save(folder / "database_codes.npy", stage_codes)
        np.save(folder / "database_codes.packed.npy", np.packbits(stage_codes > 0, axis=1))
        np.save(folder / "query_codes.npy", structured_codes(rng, NUM_QUERY, code_length))
        (folder / "result.json").write_text("{}")
    return root


@pytest.fixture(scope="module")
def final_codes():
    return structured_codes(np.random.default_rng(7), ROUNDS[-1])


@pytest.fixture(scope="module")
def rounds(final_codes, tmp_path_factory):
    """Three chained rounds: round 1 = stage original of its run (rows [0, 300)), rounds 2 and 3 = stage
    incremental of runs whose old rows (num_original) are the previous round's database."""
    root = tmp_path_factory.mktemp("rounds")
    runs = [write_run(root / "round1", final_codes[:ROUNDS[0]], ROUNDS[0], stages=("original",))]
    for number, (old, new) in enumerate(zip(ROUNDS, ROUNDS[1:]), start=2):
        runs.append(write_run(root / f"round{number}", final_codes[:new], old, seed=number))
    return runs


def stage_codes(run: Path, stage: str = "incremental") -> np.ndarray:
    return np.load(run / stage / "database_codes.npy")


def query_codes(run: Path, stage: str = "incremental") -> np.ndarray:
    return np.load(run / stage / "query_codes.npy")


# ----------------------------------------------------------------------------------------------------
# Helpers: the exact ranking and "equal up to ties"

def exact_top_k(codes: np.ndarray, queries: np.ndarray, k: int):
    """Independent of dihn_dist: distances from the inner product, ties by row. (distances, rows)."""
    distances = (codes.shape[1] - queries.astype(np.int64) @ codes.astype(np.int64).T) // 2
    order = np.argsort(distances, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(distances, order, axis=1), order


def assert_same_up_to_ties(distances, rows, expected_distances, expected_rows):
    """The distance lists are equal; the rows closer than the k-th distance are the same rows; FAISS's
    list is sorted by (distance, row)."""
    assert np.array_equal(distances, expected_distances)
    for d, r, ed, er in zip(distances, rows, expected_distances, expected_rows):
        cut = ed[-1]
        assert set(r[d < cut]) == set(er[ed < cut])
        assert list(zip(d, r)) == sorted(zip(d, r))


def faiss_top_k(path: Path, queries: np.ndarray, k: int, exhaustive: bool = False):
    served = faiss_index.load_index(path)
    if exhaustive and served.kind == "ivf":
        served.index.nprobe = served.index.nlist  # every list: exact, so equal up to ties
    return faiss_index.search(served.index, faiss_index.pack_codes(queries), k)


def refused(capsys, argv, *fragments, main=export.main) -> str:
    """Run a CLI expecting a refusal: exit code 2 and one line on stderr holding every fragment."""
    assert main([str(a) for a in argv]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: "), err
    for fragment in fragments:
        assert fragment in err, (fragment, err)
    return err


# ----------------------------------------------------------------------------------------------------
# Bits, ids, files

def test_index_holds_the_exported_packed_rows_and_distances_are_hamming(final_codes):
    packed = faiss_index.pack_codes(final_codes)
    assert np.array_equal(packed, np.packbits(final_codes > 0, axis=1))
    index = faiss_index.build_index(packed, "flat", CODE_LENGTH)
    assert index.d == 32 and index.code_size == 4                  # 12 bits -> FAISS's 4-byte kernel
    rows = faiss_index.stored_rows(index)
    assert np.array_equal(rows[:, :2], packed) and not rows[:, 2:].any()  # the bytes as given, then zeros
    queries = final_codes[:30]
    padded_queries = faiss_index.to_index_rows(faiss_index.pack_codes(queries), CODE_LENGTH)
    distances, rows = index.search(padded_queries, final_codes.shape[0])
    hamming = (CODE_LENGTH - queries.astype(np.int64) @ final_codes.astype(np.int64).T) // 2
    assert np.array_equal(distances, np.take_along_axis(hamming, rows, axis=1))  # padding bits add nothing


def test_index_rows_take_faiss_fast_sizes():
    sizes = {c: faiss_index.index_bytes(c) for c in (8, 12, 32, 33, 48, 64, 65, 128, 130, 256, 512, 520)}
    assert sizes == {8: 4, 12: 4, 32: 4, 33: 8, 48: 8, 64: 8, 65: 16, 128: 16, 130: 20, 256: 32, 512: 64, 520: 72}


def test_an_index_with_bits_beyond_the_code_is_refused(final_codes, tmp_path):
    packed = faiss_index.pack_codes(final_codes)
    index = faiss_index.build_index(packed, "flat", CODE_LENGTH)
    rows = faiss_index.to_index_rows(packed, CODE_LENGTH)
    rows[3, 1] |= 1                                                  # bit 15 of a 12-bit code
    index.reset()
    index.add(rows)
    path = tmp_path / "odd.index"
    faiss_index.write_index(index, path, faiss_index.make_sidecar(index, CODE_LENGTH, faiss_index.codes_sha256(packed, CODE_LENGTH),
                                                     tmp_path, "incremental", []))
    with pytest.raises(faiss_index.IndexMismatchError, match="non-zero bits beyond the 12 code bits"):
        faiss_index.load_index(path)


def test_faiss_own_bit_helpers_read_bits_in_the_other_order(final_codes):
    """FAISS's fvecs2bitvecs/bitvecs2fvecs put bit j at bit j % 8 of its byte; numpy.packbits (our format)
    at bit 7 - j % 8. Decoding an index row with FAISS's helper reverses the bits of every byte."""
    packed = faiss_index.pack_codes(final_codes[:5])
    bits = faiss_index.index_bits(CODE_LENGTH)
    decoded = np.zeros((5, bits), dtype=np.float32)
    faiss.bitvecs2fvecs(faiss.swig_ptr(faiss_index.to_index_rows(packed, CODE_LENGTH)), faiss.swig_ptr(decoded), bits, 5)
    reversed_within_bytes = [8 * (j // 8) + 7 - j % 8 for j in range(bits)]
    rows = faiss_index.to_index_rows(packed, CODE_LENGTH)
    padded = np.unpackbits(rows, axis=1).astype(np.float32) * 2 - 1
    assert np.array_equal(decoded, padded[:, reversed_within_bytes])
    assert np.array_equal(np.packbits(decoded > 0, axis=1, bitorder="little"), rows)


@pytest.mark.parametrize("kind", faiss_index.INDEX_KINDS)
def test_export_writes_index_and_sidecar(rounds, tmp_path, kind, capsys):
    run = rounds[-1]
    path = tmp_path / f"{kind}.index"
    assert export.main([str(run), "--faiss", str(path), "--index", kind]) == 0
    printed = capsys.readouterr().out
    assert f"wrote {path}" in printed and f"{faiss_index.FAISS_CLASSES[kind]}, 500 rows x 12 bits" in printed
    sidecar = json.loads(faiss_index.sidecar_path(path).read_text())
    codes = stage_codes(run)
    import hashlib
    assert sidecar["codes_sha256"] == hashlib.sha256(codes.tobytes()).hexdigest()
    assert {k: sidecar[k] for k in ("format", "index", "faiss_class", "code_length", "index_bits", "num_rows",
                                    "id_to_database_row", "run", "stage")} == {
        "format": "dihn_dist.faiss_index", "index": kind, "faiss_class": faiss_index.FAISS_CLASSES[kind],
        "code_length": 12, "index_bits": 32, "num_rows": 500, "id_to_database_row": "identity",
        "run": str(run.resolve()), "stage": "incremental"}
    assert sidecar["rounds"] == [{"run": str(run.resolve()), "stage": "incremental", "rows": [0, 500],
                                  "codes_sha256": sidecar["codes_sha256"]}]
    served = faiss_index.load_index(path)
    assert np.array_equal(served.codes, faiss_index.pack_codes(codes))    # FAISS id i = database row i
    assert not list(tmp_path.glob(".*.tmp")), "a temp file was left behind"
    if kind == "ivf":
        nlist = faiss_index.ivf_nlist(500)
        assert sidecar["search_settings"] == {"nlist": nlist, "nprobe": faiss_index.ivf_nprobe(nlist)}
        assert served.index.nprobe == faiss_index.ivf_nprobe(nlist)         # stored in the index file
    if kind == "hnsw":
        assert served.index.hnsw.efSearch == faiss_index.HNSW_EF_SEARCH


def test_default_stage_is_incremental_else_original(rounds, tmp_path):
    both = write_run(tmp_path / "both", stage_codes(rounds[1]), ROUNDS[0], stages=("original", "incremental"))
    assert export.export_index(both, tmp_path / "a.index").sidecar["stage"] == "incremental"
    assert export.export_index(rounds[0], tmp_path / "b.index").sidecar["stage"] == "original"
    original = export.export_index(both, tmp_path / "c.index", stage="original").sidecar
    assert (original["stage"], original["num_rows"]) == ("original", ROUNDS[0])


@pytest.mark.parametrize("kind", faiss_index.INDEX_KINDS)
def test_faiss_top_k_equals_the_exact_ranking_up_to_ties(rounds, tmp_path, kind):
    run = rounds[-1]
    path = tmp_path / "index"
    export.export_index(run, path, kind=kind)
    queries = query_codes(run)
    distances, rows = faiss_top_k(path, queries, K, exhaustive=True)
    assert_same_up_to_ties(distances, rows, *exact_top_k(stage_codes(run), queries, K))


# ----------------------------------------------------------------------------------------------------
# Appending round by round

@pytest.mark.parametrize("kind", faiss_index.INDEX_KINDS)
def test_append_over_rounds_equals_a_fresh_index_of_the_final_codes(rounds, tmp_path, kind, capsys):
    paths = [tmp_path / f"round{r}.index" for r in (1, 2, 3)]
    assert export.main([str(rounds[0]), "--faiss", str(paths[0]), "--index", kind]) == 0
    for run, old, new in zip(rounds[1:], paths, paths[1:]):
        assert export.main([str(run), "--faiss", str(new), "--append-to", str(old)]) == 0  # kind: the old one's
    printed = capsys.readouterr().out
    assert "appended 80 rows to the 420 of" in printed
    fresh = tmp_path / "fresh.index"
    export.export_index(rounds[-1], fresh, kind=kind)
    appended, rebuilt = faiss_index.load_index(paths[-1]), faiss_index.load_index(fresh)
    assert appended.kind == kind
    assert np.array_equal(appended.codes, rebuilt.codes)
    assert appended.sidecar["codes_sha256"] == rebuilt.sidecar["codes_sha256"]
    assert [r["rows"] for r in appended.sidecar["rounds"]] == [[0, 300], [300, 420], [420, 500]]
    assert [r["stage"] for r in appended.sidecar["rounds"]] == ["original", "incremental", "incremental"]
    queries = query_codes(rounds[-1])
    expected = exact_top_k(stage_codes(rounds[-1]), queries, K)
    for path in (paths[-1], fresh):
        assert_same_up_to_ties(*faiss_top_k(path, queries, K, exhaustive=True), *expected)


def test_append_in_place_and_nothing_new(rounds, tmp_path):
    path = tmp_path / "served.index"
    export.export_index(rounds[0], path)
    export.export_index(rounds[1], path, append_to=path)           # FILE may be OLD_INDEX: replaced atomically
    again = export.export_index(rounds[1], path, append_to=path)   # the same round again: nothing to add
    assert again.added_rows == 0 and again.sidecar["num_rows"] == ROUNDS[1]
    assert len(again.sidecar["rounds"]) == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["served.index", "served.index.json"]


def flip_bit(run: Path, row: int, bit: int, stage: str = "incremental") -> None:
    """Change one bit of a stage's database code in both exported files (as a retrained B_old would)."""
    codes = stage_codes(run, stage)
    codes[row, bit] = -codes[row, bit]
    np.save(run / stage / "database_codes.npy", codes)
    np.save(run / stage / "database_codes.packed.npy", np.packbits(codes > 0, axis=1))


@pytest.mark.parametrize("kind", faiss_index.INDEX_KINDS)
def test_a_changed_b_old_is_refused(rounds, tmp_path, kind, capsys):
    old = tmp_path / "round1.index"
    export.export_index(rounds[0], old, kind=kind)
    changed = shutil.copytree(rounds[1], tmp_path / "changed")
    flip_bit(changed, row=17, bit=5)
    out = tmp_path / "round2.index"
    refused(capsys, [changed, "--faiss", out, "--append-to", old],
            f"--append-to {old}: row 17 of the index differs from row 17 of {changed} stage incremental",
            "first 300 rows (B_old) bit for bit")
    assert not out.exists() and not faiss_index.sidecar_path(out).exists()
    flip_bit(changed, row=310, bit=5)   # a new row may be anything: only B_old is frozen
    flip_bit(changed, row=17, bit=5)
    assert export.main([str(changed), "--faiss", str(out), "--append-to", str(old)]) == 0


def test_other_code_length_more_rows_or_other_kind_are_refused(rounds, tmp_path, capsys):
    old = tmp_path / "round2.index"
    export.export_index(rounds[1], old, kind="hnsw")
    out = tmp_path / "out.index"
    refused(capsys, [rounds[2], "--faiss", out, "--append-to", old, "--index", "flat"],
            f"--append-to {old}: is a hnsw index (IndexBinaryHNSW), --index flat was asked for")
    refused(capsys, [rounds[0], "--faiss", out, "--append-to", old],
            f"--append-to {old}: holds 420 rows, more than the 300 rows of {rounds[0]} stage original")
    longer = write_run(tmp_path / "longer", structured_codes(np.random.default_rng(1), 500, 16), 420)
    refused(capsys, [longer, "--faiss", out, "--append-to", old],
            f"--append-to {old}: holds 12-bit codes, {longer} stage incremental has 16-bit codes")
    assert not out.exists()


def test_index_and_sidecar_must_describe_each_other(rounds, tmp_path, capsys):
    first, second = tmp_path / "first.index", tmp_path / "second.index"
    export.export_index(rounds[0], first)
    export.export_index(rounds[1], second)
    out = tmp_path / "out.index"
    shutil.copy(faiss_index.sidecar_path(second), faiss_index.sidecar_path(first))  # the sidecar of another index
    refused(capsys, [rounds[2], "--faiss", out, "--append-to", first],
            f"{first}.json: describes a flat index of 420 rows of 12-bit codes (d = 32), but first.index is a "
            f"flat index of 300 rows with d = 32")
    changed = shutil.copytree(rounds[1], tmp_path / "changed")
    flip_bit(changed, row=5, bit=0)
    export.export_index(changed, first)                              # same size, other codes
    shutil.copy(faiss_index.sidecar_path(second), faiss_index.sidecar_path(first))
    refused(capsys, [rounds[2], "--faiss", out, "--append-to", first],
            f"{first}.json: records codes sha256", "but first.index holds codes with sha256")
    (tmp_path / "broken.index").write_bytes(b"not an index")
    shutil.copy(faiss_index.sidecar_path(second), tmp_path / "broken.index.json")
    refused(capsys, [rounds[2], "--faiss", out, "--append-to", tmp_path / "broken.index"],
            f"{tmp_path / 'broken.index'}: not a FAISS binary index")
    faiss_index.sidecar_path(second).unlink()
    refused(capsys, [rounds[2], "--faiss", out, "--append-to", second], f"{second}.json is missing")
    refused(capsys, [rounds[2], "--faiss", out, "--append-to", tmp_path / "none.index"],
            f"{tmp_path / 'none.index'}: no such index file")


def test_a_failed_write_keeps_the_old_index(rounds, tmp_path, monkeypatch):
    path = tmp_path / "served.index"
    export.export_index(rounds[0], path)
    before = path.read_bytes()

    def disk_full(index, name):
        Path(name).write_bytes(b"partial")
        raise RuntimeError("No space left on device")

    monkeypatch.setattr(faiss, "write_index_binary", disk_full)
    with pytest.raises(RuntimeError, match="No space left"):
        export.export_index(rounds[1], path, append_to=path)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["served.index", "served.index.json"]


def test_without_faiss_the_commands_say_how_to_install_it(rounds, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "faiss", None)   # import faiss -> ImportError
    hint = "pip install 'dihn_dist[serve]' (or pip install faiss-cpu)"
    refused(capsys, [rounds[0], "--faiss", tmp_path / "x.index"], hint)
    refused(capsys, [rounds[0], "--query", "0", "--faiss", tmp_path / "x.index"], hint, main=retrieve.main)


# ----------------------------------------------------------------------------------------------------
# retrieve --faiss

def test_retrieve_refuses_an_index_of_other_codes(rounds, tmp_path, capsys):
    path = tmp_path / "round2.index"
    export.export_index(rounds[1], path)
    refused(capsys, [rounds[2], "--query", "0", "--faiss", path],
            f"--faiss {path}: holds 420 rows, {rounds[2]} stage incremental has 500", main=retrieve.main)
    changed = shutil.copytree(rounds[1], tmp_path / "changed")
    flip_bit(changed, row=400, bit=0)
    refused(capsys, [changed, "--query", "0", "--faiss", path],
            f"--faiss {path}: row 400 of the index differs from row 400 of {changed} stage incremental",
            main=retrieve.main)


@pytest.mark.slow  # the shared finished_run fixture trains a tiny run (its only user in this file)
def test_retrieve_with_faiss_on_a_trained_run(finished_run, tmp_path, capsys):
    """Round 1 = the run's stage original, round 2 = its stage incremental (whose first rows are B_old):
    the appended index equals the stage's codes, and retrieve --faiss lists the exact top k up to ties."""
    run = load_run(finished_run)
    round1, round2 = tmp_path / "round1.index", tmp_path / "round2.index"
    assert export.main([str(finished_run), "--faiss", str(round1), "--stage", "original"]) == 0
    assert export.main([str(finished_run), "--faiss", str(round2), "--append-to", str(round1)]) == 0
    capsys.readouterr()
    sidecar = faiss_index.load_index(round2).sidecar
    recorded = json.loads((finished_run / "incremental" / "result.json").read_text())
    assert sidecar["codes_sha256"] == recorded["codes_checksum"]   # the trainer's checksum of the same codes
    assert [r["rows"] for r in sidecar["rounds"]] == [[0, run.num_original], [run.num_original, 600]]
    topk = 15
    assert retrieve.main([str(finished_run), "--query", "3", "--topk", str(topk), "--faiss", str(round2),
                          "--out", str(tmp_path / "sheet.png")]) == 0
    printed = capsys.readouterr().out
    assert f"ranked by FAISS IndexBinaryFlat {round2}" in printed and "stage incremental" in printed
    table = [line.split() for line in printed.splitlines() if line[:4].strip().isdigit()]
    rows = np.array([[int(r[1]) for r in table]])
    distances = np.array([[int(r[2]) for r in table]])
    stage = run.stage("incremental")
    assert_same_up_to_ties(distances, rows, *exact_top_k(stage.database_codes, stage.query_codes[3:4], topk))


def test_export_and_serve_import_no_torch():
    """A serving machine needs numpy and faiss only (like exported.py)."""
    import subprocess
    check = "import sys, dihn_dist.serving.export, dihn_dist.serving.faiss_index; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", check], check=True, cwd=Path(__file__).resolve().parents[1])


# ----------------------------------------------------------------------------------------------------
# An export killed while it replaces a pair

KILL_DURING_EXPORT = """
import os, signal, sys
from dihn_dist.serving import export
run, target, point = sys.argv[1:4]
publish = os.replace

def replace(source, destination):
    if point == "before the index rename" and str(destination) == target:
        os.kill(os.getpid(), signal.SIGKILL)
    if point == "between the two renames" and str(destination) == target + ".json":
        os.kill(os.getpid(), signal.SIGKILL)
    publish(source, destination)
    if point == "after the sidecar rename" and str(destination) == target + ".json":
        os.kill(os.getpid(), signal.SIGKILL)

os.replace = replace
export.main([run, "--faiss", target, "--append-to", target])
"""


@pytest.mark.parametrize("point", ["before the index rename", "between the two renames", "after the sidecar rename"])
def test_a_kill_while_replacing_an_index_leaves_a_complete_pair_or_says_how_to_restore_it(rounds, tmp_path, point,
                                                                                         capsys):
    import signal
    import subprocess
    path = tmp_path / "served.index"
    export.export_index(rounds[0], path)
    killed = subprocess.run([sys.executable, "-c", KILL_DURING_EXPORT, str(rounds[1]), str(path), point],
                            cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    old, new = (faiss_index.pack_codes(stage_codes(run, stage))
                for run, stage in ((rounds[0], "original"), (rounds[1], "incremental")))
    if point == "between the two renames":
        previous = faiss_index.previous_path(path)
        refused(capsys, [rounds[1], "--faiss", path, "--append-to", path], f"{path}: is not the index its sidecar",
                "interrupted", f"restore the previous pair with mv {previous} {path}, then rerun the export")
        previous.replace(path)                                   # the restore the message names
        assert np.array_equal(faiss_index.load_index(path).codes, old)
        export.export_index(rounds[1], path, append_to=path)    # and the rerun
        assert np.array_equal(faiss_index.load_index(path).codes, new)
    else:
        expected = old if point == "before the index rename" else new
        assert np.array_equal(faiss_index.load_index(path).codes, expected)
