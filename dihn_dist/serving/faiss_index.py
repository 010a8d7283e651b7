"""Serving a run's database codes with FAISS binary indexes (optional: pip install 'dihn_dist[serve]').

torch-free like `exported.py`: numpy, the standard library, and faiss, imported only when an index is
built or read (without it: one line saying how to install it).

An index is two files, published as one unit (see write_index: the sidecar's rename is the commit):

    FILE        a FAISS binary index (faiss.write_index_binary; faiss.read_index_binary reads it):
                    flat  IndexBinaryFlat: exact, a linear scan of popcount(query XOR code)
                    ivf   IndexBinaryIVF: k-means lists over the codes (see ivf_nlist / ivf_nprobe)
                    hnsw  IndexBinaryHNSW: a navigable graph (HNSW_M, HNSW_EF_CONSTRUCTION, HNSW_EF_SEARCH)
                IVF and HNSW are approximate; their search settings (nprobe, efSearch) are stored in FILE.
    FILE.json   the sidecar (SIDECAR_FORMAT): which run and stage the codes come from, the code length,
                the number of rows, how FAISS ids map to database rows, the checksum of the indexed codes
                and one entry per round that made the index (see make_sidecar), and the size and sha256
                of FILE itself ("index_file"), so that a reader tells a new FILE beside an old sidecar.
    FILE.previous  only while a pair is replaced: the old FILE, which the old FILE.json describes.

Codes and bits. FAISS binary indexes hold rows of d / 8 bytes and use the bytes as given: the distance is
popcount(XOR), whatever bit order the bytes follow. An index row is the run's exported packed row byte for
byte (database_codes.packed.npy = numpy.packbits(codes > 0, axis=1): bit j of a code is bit 7 - j % 8 of
byte j // 8) followed by zero bytes up to index_bytes(c), and queries are packed and padded the same way,
so the distances are exactly the Hamming distances of the +-1 codes (padding bits are 0 on both sides).
The padding is there for speed: FAISS has popcount kernels for rows of 4, 8, 16, 20, 32 and 64 bytes and a
slow generic one for other sizes (48-bit codes as 6 bytes searched 2-4x slower than as 8 at 193,734 rows).
FAISS's own float <-> bit helpers (faiss.fvecs2bitvecs, bitvecs2fvecs, used by IndexBinaryFromFloat and
inside the IVF training) put bit j at bit j % 8 of its byte instead; decoding an index row with them gives
the code with the bits of every byte reversed. That permutation changes no distance, and the IVF k-means
(which sees the bits as coordinates) is invariant to permuting them.

Ids. Rows are added in database order with plain `add` (no IndexBinaryIDMap), so FAISS id i = insertion
order = database row i; an append adds the new rows after the old ones, so the ids stay database rows.

Ties. FAISS returns the k nearest by distance, but which of several rows at the k-th distance it keeps,
and in what order it lists equal distances, is its own (heap order, threads). dihn_dist's exact ranking
(metrics.py, retrieve without --faiss) breaks ties by database row. `search` re-sorts FAISS's k results
by (distance, row), so the two agree exactly except for which rows tied at the k-th distance make the cut.

Appending (rounds). Frozen B_old means a served index never has to be rebuilt: the database of a chained
round is the old rows then the new rows, and the old rows are the previous round's codes bit for bit.
`check_prefix` verifies that by reconstructing the old index's codes (all three kinds allow it: IVF
through its direct map, which every index built here carries) and comparing them row by row with the
new stage's first rows; then only the new rows are added. IVF keeps the lists it was trained on in the
first round (new rows go to their nearest existing list); HNSW links the new rows into its graph.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import numpy as np

from ..common.atomic import fsync_file, temp_beside
from ..common.digest import file_sha256
from ..common.codes import BIT_ORDER, pack_codes, unpack_codes  # noqa: F401 - export and retrieve use faiss_index.pack_codes
from ..common.errors import UsageError
from ..common.formats import read_json_object

INDEX_KINDS = ("flat", "ivf", "hnsw")
FAISS_CLASSES = {"flat": "IndexBinaryFlat", "ivf": "IndexBinaryIVF", "hnsw": "IndexBinaryHNSW"}
SIDECAR_FORMAT = {"format": "dihn_dist.faiss_index", "format_version": 1}
SIDECAR_SUFFIX = ".json"
PREVIOUS_SUFFIX = ".previous"
INSTALL_HINT = "pip install 'dihn_dist[serve]' (or pip install faiss-cpu)"
# Row sizes (bytes) that FAISS's Hamming distance has a dedicated kernel for; others use a generic loop.
FAISS_FAST_CODE_SIZES = (4, 8, 16, 20, 32, 64)
CHECKSUM_SCHEME = ("sha256 of the codes as int8 +-1 rows (rows x code_length, row-major): the trainer's "
                   "codes_checksum in result.json")
IDENTITY = "identity"

# HNSW: 32 neighbours a node and FAISS's default construction beam (40; 80 measured no better recall at
# 193,734 x 48 bits and a 30% longer build); a search beam of 128 (FAISS widens it to k when k is larger).
HNSW_M = 32
HNSW_EF_CONSTRUCTION = 40
HNSW_EF_SEARCH = 128
# IVF: k-means wants at least this many training points a list (FAISS warns below it).
IVF_MIN_POINTS_PER_LIST = 39


class IndexMismatchError(ValueError):
    """An index (or its sidecar) is not the one a command needs: other codes, rows, length or kind."""


class MissingFaissError(UsageError):
    """faiss is not installed: the optional extra is needed for --faiss."""


def require_faiss():
    """The faiss module, or one line saying how to install it."""
    try:
        import faiss
    except ImportError as error:
        raise MissingFaissError(f"FAISS is not installed; the FAISS index commands need it: {INSTALL_HINT}") \
            from error
    return faiss


# ----------------------------------------------------------------------------------------------------
# Codes


def codes_sha256(packed: np.ndarray, code_length: int) -> str:
    """CHECKSUM_SCHEME of packed rows: equal checksums mean bit-identical codes, and an exported index's
    checksum equals its stage's recorded codes_checksum."""
    return hashlib.sha256(np.ascontiguousarray(unpack_codes(packed, code_length)).tobytes()).hexdigest()


def index_bytes(code_length: int) -> int:
    """Bytes of an index row for c-bit codes: the smallest of FAISS_FAST_CODE_SIZES that holds them, beyond
    64 bytes a multiple of 8 (FAISS needs whole bytes; the fast sizes are what makes a search fast)."""
    needed = math.ceil(code_length / 8)
    return next((size for size in FAISS_FAST_CODE_SIZES if size >= needed), 8 * math.ceil(needed / 8))


def index_bits(code_length: int) -> int:
    """FAISS's d for c-bit codes."""
    return 8 * index_bytes(code_length)


def to_index_rows(packed: np.ndarray, code_length: int) -> np.ndarray:
    """Exported packed rows (rows, ceil(c / 8)) -> index rows: the same bytes, then zero bytes."""
    rows = np.zeros((packed.shape[0], index_bytes(code_length)), dtype=np.uint8)
    rows[:, :packed.shape[1]] = packed
    return rows


def padding_is_zero(rows: np.ndarray, code_length: int) -> bool:
    """Whether every bit of the index rows beyond the c code bits is 0 (as to_index_rows leaves them)."""
    bits = np.unpackbits(rows, axis=1)
    return not bits[:, code_length:].any()


def first_differing_row(stored: np.ndarray, expected: np.ndarray) -> Optional[int]:
    """The first row where two packed code matrices of the same shape differ, or None."""
    differs = np.flatnonzero((stored != expected).any(axis=1))
    return int(differs[0]) if differs.size else None


# ----------------------------------------------------------------------------------------------------
# Building and searching

def ivf_nlist(num_rows: int) -> int:
    """Lists of an IVF index: round(sqrt(n)), the low end of FAISS's guidance (a small multiple of sqrt(n)),
    which keeps the k-means training cheap (about 10 s for 193,734 rows on one core); at most n / 39 so
    k-means has its 39 points a list; at least 1."""
    return max(1, min(round(math.sqrt(num_rows)), num_rows // IVF_MIN_POINTS_PER_LIST))


def ivf_nprobe(nlist: int) -> int:
    """Lists a query visits: one eighth of them, at least 1 (recall@100 0.9998 at 4x the exact scan's speed
    in tests/bench/bench_serving.py, 193,734 codes x 48 bits). Stored in the index; a server may change
    index.nprobe to trade recall for speed."""
    return max(1, math.ceil(nlist / 8))


def new_index(kind: str, code_length: int, training: np.ndarray):
    """An empty index of `kind` for c-bit codes; IVF is trained (k-means) on the packed `training` rows."""
    faiss = require_faiss()
    d = index_bits(code_length)
    if kind == "flat":
        return faiss.IndexBinaryFlat(d)
    if kind == "hnsw":
        index = faiss.IndexBinaryHNSW(d, HNSW_M)
        index.hnsw.efConstruction = HNSW_EF_CONSTRUCTION
        index.hnsw.efSearch = HNSW_EF_SEARCH
        return index
    if kind == "ivf":
        nlist = ivf_nlist(training.shape[0])
        quantizer = faiss.IndexBinaryFlat(d)
        index = faiss.IndexBinaryIVF(quantizer, d, nlist)  # faiss's wrapper keeps the quantizer alive
        index.train(np.ascontiguousarray(training))
        index.nprobe = ivf_nprobe(nlist)
        index.make_direct_map(True)  # so that its codes can be reconstructed (check_prefix, load_index)
        return index
    raise UsageError(f"--index: expected one of {', '.join(INDEX_KINDS)}, got {kind!r}")


def build_index(packed: np.ndarray, kind: str, code_length: int):
    """An index of `kind` holding the exported packed rows, FAISS id = row."""
    rows = to_index_rows(packed, code_length)
    index = new_index(kind, code_length, rows)
    index.add(rows)
    return index


def add_rows(index, packed: np.ndarray, code_length: int) -> None:
    """Append exported packed rows: they get the ids ntotal, ntotal + 1, ..."""
    index.add(to_index_rows(packed, code_length))


def kind_of(index) -> str:
    """"flat", "ivf" or "hnsw" from the FAISS class; other FAISS binary indexes are not ours."""
    name = type(index).__name__
    for kind, faiss_class in FAISS_CLASSES.items():
        if name == faiss_class:
            return kind
    raise IndexMismatchError(f"a FAISS {name}; dihn_dist serves {', '.join(FAISS_CLASSES.values())}")


def stored_rows(index) -> np.ndarray:
    """Every row the index holds (index_bytes wide), in id order (reconstructed; IVF through its direct map)."""
    if kind_of(index) == "ivf" and index.direct_map.type == 0:  # DirectMap.NoMap: an IVF not built here
        index.make_direct_map(True)
    if index.ntotal == 0:
        return np.zeros((0, index.code_size), dtype=np.uint8)
    return index.reconstruct_n(0, index.ntotal)


def search_settings(index) -> Dict[str, int]:
    """The settings of an approximate index that decide its recall (recorded in the sidecar)."""
    kind = kind_of(index)
    if kind == "ivf":
        return {"nlist": int(index.nlist), "nprobe": int(index.nprobe)}
    if kind == "hnsw":
        return {"M": HNSW_M, "efConstruction": int(index.hnsw.efConstruction), "efSearch": int(index.hnsw.efSearch)}
    return {}


def search(index, packed_queries: np.ndarray, k: int) -> Tuple[np.ndarray, np.ndarray]:
    """(distances int32, database rows int64), each (queries, k): the k nearest of the exported packed
    query rows by Hamming distance, sorted by (distance, row). An approximate index may find fewer than k:
    row -1, distance 2**31 - 1."""
    queries = np.zeros((packed_queries.shape[0], index.code_size), dtype=np.uint8)
    queries[:, :packed_queries.shape[1]] = packed_queries   # padded like the index rows
    distances, rows = index.search(queries, int(k))
    # FAISS lists equal distances in its own order; ours is by row (see the module docstring).
    order = np.lexsort((np.where(rows < 0, np.iinfo(np.int64).max, rows), distances), axis=-1)
    return np.take_along_axis(distances, order, axis=1), np.take_along_axis(rows, order, axis=1)


def shortfall_note(index, found: int, asked: int) -> Optional[str]:
    """Why an approximate index returned `found` < `asked` rows (None when it returned them all)."""
    if found >= asked:
        return None
    kind = kind_of(index)
    if kind == "ivf":
        why = (f"an IVF search visits only nprobe = {index.nprobe} of its nlist = {index.nlist} lists, and the "
               f"lists nearest this query hold only {found} codes (index.nprobe = nlist searches every list)")
    elif kind == "hnsw":
        why = (f"the HNSW graph search (efSearch = {index.hnsw.efSearch}) reached only {found} rows from the "
               f"query's entry point")
    else:
        why = f"the index holds {index.ntotal} rows"
    return (f"note: the {kind} index returned {found} of the {asked} rows asked for: {why}; an index exported "
            f"with --index flat is exact and always returns them all")


# ----------------------------------------------------------------------------------------------------
# Files

def sidecar_path(index_path) -> Path:
    return Path(str(index_path) + SIDECAR_SUFFIX)


def make_sidecar(index, code_length: int, codes_checksum: str, run: Path, stage: str,
                 rounds: List[dict]) -> dict:
    """The sidecar of an index: what it holds and where from.

    rounds: one entry per export that made the index, oldest first: {"run", "stage", "rows": [start, end),
    "codes_sha256" of all rows [0, end)}; a fresh index has one."""
    faiss = require_faiss()
    return {
        **SIDECAR_FORMAT,
        "index": kind_of(index),
        "faiss_class": type(index).__name__,
        "faiss_version": faiss.__version__,
        "search_settings": search_settings(index),
        "code_length": int(code_length),
        "index_bits": index_bits(code_length),
        "bit_order": BIT_ORDER,
        "num_rows": int(index.ntotal),
        "id_to_database_row": IDENTITY,
        "codes_sha256": codes_checksum,
        "checksum_scheme": CHECKSUM_SCHEME,
        "run": str(Path(run).resolve()),
        "stage": stage,
        "rounds": rounds,
    }


def previous_path(index_path) -> Path:
    return Path(str(index_path) + PREVIOUS_SUFFIX)


def file_record(path: Path) -> Dict[str, Any]:
    """The sidecar's "index_file": the index file's size and sha256."""
    return {"bytes": path.stat().st_size, "sha256": file_sha256(path)}


def write_index(index, path, sidecar: dict) -> dict:
    """Publish FILE and FILE.json as one unit; returns the sidecar as written (with "index_file").

    Both are written in full under temp names first. The old FILE, if any, is kept as FILE.previous (a hard
    link) until the new pair is complete; then FILE is replaced, and replacing FILE.json commits the pair.
    A kill at any point leaves the old pair, the new pair, or (between the two renames) a new FILE beside the
    old FILE.json, which load_index tells from the recorded "index_file" and refuses, naming FILE.previous
    and how to restore it; never a half-written file."""
    faiss = require_faiss()
    path = Path(path)
    side = sidecar_path(path)
    with temp_beside(path) as index_temp, temp_beside(side) as sidecar_temp:
        faiss.write_index_binary(index, str(index_temp))
        fsync_file(index_temp)
        sidecar = {**sidecar, "index_file": file_record(index_temp)}
        sidecar_temp.write_text(json.dumps(sidecar, indent=2, sort_keys=True) + "\n")
        fsync_file(sidecar_temp)
        keep_previous(path)
        os.replace(index_temp, path)
        os.replace(sidecar_temp, side)
    previous_path(path).unlink(missing_ok=True)
    return sidecar


def keep_previous(path: Path) -> None:
    """FILE.previous = the current FILE (if any), so that the old pair stays recoverable while it is replaced."""
    previous = previous_path(path)
    previous.unlink(missing_ok=True)
    if not path.is_file():
        return
    try:
        os.link(path, previous)
    except OSError:   # a file system without hard links
        shutil.copy2(path, previous)
    fsync_file(previous)


def check_index_file(path: Path, sidecar: dict) -> None:
    """Refuse a FILE that is not the one FILE.json records while FILE.previous is: an interrupted write_index."""
    recorded = sidecar.get("index_file")
    previous = previous_path(path)
    if not isinstance(recorded, dict) or not previous.is_file():
        return   # no interrupted replacement (other mismatches: the checks of load_index name them)
    current = file_record(path)
    if current == recorded or file_record(previous) != recorded:
        return
    raise IndexMismatchError(
        f"{path}: is not the index its sidecar {sidecar_path(path).name} describes ({current['bytes']} bytes, "
        f"sha256 {current['sha256'][:16]}...; the sidecar records {recorded['bytes']} bytes, sha256 "
        f"{recorded['sha256'][:16]}...): an export into it was interrupted between writing the index and its "
        f"sidecar; {previous} is the previous index, which the sidecar describes: restore the previous pair "
        f"with mv {previous} {path}, then rerun the export")


@dataclass
class ServedIndex:
    """An index read back with its sidecar, its codes checked against the sidecar's checksum."""
    path: Path
    index: Any
    sidecar: dict
    codes: np.ndarray   # (num_rows, ceil(c / 8)) uint8: the rows the index holds, reconstructed, in the
                        # exported layout (without the padding bytes)

    @property
    def kind(self) -> str:
        return self.sidecar["index"]

    @property
    def code_length(self) -> int:
        return int(self.sidecar["code_length"])

    @property
    def num_rows(self) -> int:
        return int(self.index.ntotal)


def read_sidecar(path: Path) -> dict:
    side = sidecar_path(path)
    if not side.is_file():
        raise FileNotFoundError(f"{side} is missing: the sidecar that python -m dihn_dist.export writes next to "
                                f"{path.name}; re-export the index")
    sidecar = read_json_object(side)
    if sidecar is None or {k: sidecar.get(k) for k in SIDECAR_FORMAT} != SIDECAR_FORMAT:
        raise IndexMismatchError(f"{side}: not a dihn_dist FAISS sidecar (expected \"format\": "
                                 f"\"{SIDECAR_FORMAT['format']}\", version {SIDECAR_FORMAT['format_version']})")
    missing = [k for k in ("index", "code_length", "num_rows", "codes_sha256", "id_to_database_row", "rounds")
               if k not in sidecar]
    if missing:
        raise IndexMismatchError(f"{side}: missing keys {missing}")
    if sidecar["id_to_database_row"] != IDENTITY:
        raise IndexMismatchError(f"{side}: id_to_database_row {sidecar['id_to_database_row']!r}; this version "
                                 f"serves only indexes whose FAISS ids are database rows ({IDENTITY!r})")
    return sidecar


def read_faiss_index(path: Path):
    faiss = require_faiss()
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such index file; python -m dihn_dist.export RUN --faiss {path} "
                                f"writes one")
    try:
        return faiss.read_index_binary(str(path))
    except RuntimeError as error:
        reason = str(error).strip().splitlines()[-1][:200] if str(error).strip() else type(error).__name__
        raise IndexMismatchError(f"{path}: not a FAISS binary index ({reason})") from error


def load_index(path) -> ServedIndex:
    """Read FILE and FILE.json and check that they describe each other: kind, rows, bits and the checksum
    of the reconstructed codes (so neither file name nor sidecar is trusted alone)."""
    path = Path(path)
    index = read_faiss_index(path)
    sidecar = read_sidecar(path)
    check_index_file(path, sidecar)
    side = sidecar_path(path)
    kind = kind_of(index)
    code_length = int(sidecar["code_length"])
    if kind != sidecar["index"] or index.d != index_bits(code_length) or index.ntotal != sidecar["num_rows"]:
        raise IndexMismatchError(
            f"{side}: describes a {sidecar['index']} index of {sidecar['num_rows']} rows of {code_length}-bit codes "
            f"(d = {index_bits(code_length)}), but {path.name} is a {kind} index of {index.ntotal} rows with "
            f"d = {index.d} (the sidecar of another index)")
    rows = stored_rows(index)
    if not padding_is_zero(rows, code_length):
        raise IndexMismatchError(f"{path}: its rows have non-zero bits beyond the {code_length} code bits (not "
                                 f"written by python -m dihn_dist.export); re-export the index")
    codes = rows[:, :math.ceil(code_length / 8)]
    checksum = codes_sha256(codes, code_length)
    if checksum != sidecar["codes_sha256"]:
        raise IndexMismatchError(f"{side}: records codes sha256 {sidecar['codes_sha256'][:16]}..., but "
                                 f"{path.name} holds codes with sha256 {checksum[:16]}... (the sidecar of "
                                 f"another index, or an index rewritten without it); re-export the index")
    return ServedIndex(path, index, sidecar, codes)


# ----------------------------------------------------------------------------------------------------
# Checks between an index and a stage's codes

def check_prefix(old: ServedIndex, packed: np.ndarray, code_length: int, kind: Optional[str], source: str) -> None:
    """Refuse to append `packed` (the new stage's codes, all rows) to `old` unless the old index holds
    exactly the stage's first rows (B_old, bit for bit), with the same code length and index kind.
    `source` names the new codes in messages ("RUN stage incremental")."""
    name = f"--append-to {old.path}"
    if kind is not None and kind != old.kind:
        raise IndexMismatchError(f"{name}: is a {old.kind} index ({FAISS_CLASSES[old.kind]}), --index {kind} was "
                                 f"asked for; an index only grows in its own kind: pass --index {old.kind}, "
                                 f"or export a fresh index without --append-to")
    if code_length != old.code_length:
        raise IndexMismatchError(f"{name}: holds {old.code_length}-bit codes, {source} has {code_length}-bit codes")
    if old.num_rows > packed.shape[0]:
        raise IndexMismatchError(f"{name}: holds {old.num_rows} rows, more than the {packed.shape[0]} rows of "
                                 f"{source}; an index only grows: append a later round's run to it")
    expected = packed[:old.num_rows]
    row = first_differing_row(old.codes, expected)
    if row is not None:
        raise IndexMismatchError(
            f"{name}: row {row} of the index differs from row {row} of {source}; expected the index to hold the "
            f"run's first {old.num_rows} rows (B_old) bit for bit (index codes sha256 "
            f"{old.sidecar['codes_sha256'][:16]}..., the run's first {old.num_rows} rows "
            f"{codes_sha256(expected, code_length)[:16]}...): is this run a later round of that index?")


def check_serves(served: ServedIndex, packed: np.ndarray, code_length: int, source: str) -> None:
    """Refuse to rank a stage's database with an index that holds other codes (retrieve --faiss)."""
    name = f"--faiss {served.path}"
    if code_length != served.code_length:
        raise IndexMismatchError(f"{name}: holds {served.code_length}-bit codes, {source} has {code_length}-bit "
                                 f"codes")
    if served.num_rows != packed.shape[0]:
        raise IndexMismatchError(f"{name}: holds {served.num_rows} rows, {source} has {packed.shape[0]}; export "
                                 f"the stage's codes with python -m dihn_dist.export (--append-to the old index)")
    row = first_differing_row(served.codes, packed)
    if row is not None:
        raise IndexMismatchError(f"{name}: row {row} of the index differs from row {row} of {source}; export the "
                                 f"stage's codes with python -m dihn_dist.export")
