"""python -m dihn_dist.export RUN_DIR --faiss FILE [--stage incremental|original|retrain] [--index flat|ivf|hnsw]
[--append-to OLD_INDEX]

Writes a FAISS binary index of a finished stage's database codes to FILE and its sidecar to FILE.json
(published as one pair: a kill leaves the old pair or the new one, or a refusal that says how to restore
the old one; formats in `dihn_dist.serving.faiss_index`). FAISS ids are database rows. With --append-to, FILE is
OLD_INDEX with only the stage's new rows added: the stage's first rows must be exactly the rows OLD_INDEX
holds (B_old of a chained round, frozen bit for bit), which is checked row by row before anything is written.

Needs faiss (pip install 'dihn_dist[serve]'); reads the run with numpy alone (no torch).
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from ..common import errors
from ..common.formats import STAGES
from ..training.run_reader import ExportedRun, load_run, load_stage, unfinished_stage_error
from . import faiss_index

# The stage exported when --stage is not given: DIHN's, else stage 1's (retrain is a baseline, not served).


@dataclass
class Export:
    """What an export wrote (for the printed summary and the tests)."""
    path: Path
    sidecar: dict
    added_rows: int
    appended_to: Optional[Path]


def default_stage(run: ExportedRun) -> str:
    stage = run.published_stage()
    if stage not in run.finished_stages():
        raise unfinished_stage_error(run, stage, "--stage")
    return stage


def stage_packed_codes(run: ExportedRun, stage: str) -> np.ndarray:
    """The stage's database codes as the index holds them (the exported packed rows, checked by load_stage)."""
    return faiss_index.pack_codes(load_stage(run, stage, "--stage").database_codes)


def export_index(run_dir, out, stage: Optional[str] = None, kind: Optional[str] = None,
                 append_to=None) -> Export:
    """Build (or extend --append-to) the index of a stage's codes and write FILE and FILE.json."""
    faiss_index.require_faiss()  # before reading anything: without faiss nothing can be done
    run = load_run(run_dir)
    stage = stage or default_stage(run)
    packed = stage_packed_codes(run, stage)
    source = f"{run.root} stage {stage}"
    checksum = faiss_index.codes_sha256(packed, run.code_length)
    if append_to is None:
        index = faiss_index.build_index(packed, kind or "flat", run.code_length)
        rounds, added = [], packed.shape[0]
    else:
        old = faiss_index.load_index(append_to)
        faiss_index.check_prefix(old, packed, run.code_length, kind, source)
        index, rounds, added = old.index, list(old.sidecar["rounds"]), packed.shape[0] - old.num_rows
        faiss_index.add_rows(index, packed[old.num_rows:], run.code_length)
    rounds.append({"run": str(run.root.resolve()), "stage": stage, "rows": [packed.shape[0] - added, packed.shape[0]],
                   "codes_sha256": checksum})
    sidecar = faiss_index.make_sidecar(index, run.code_length, checksum, run.root, stage, rounds)
    sidecar = faiss_index.write_index(index, out, sidecar)
    return Export(Path(out), sidecar, added, None if append_to is None else Path(append_to))


def describe(export: Export) -> str:
    sidecar = export.sidecar
    what = (f"{sidecar['faiss_class']}, {sidecar['num_rows']} rows x {sidecar['code_length']} bits "
            f"of {sidecar['run']} stage {sidecar['stage']}")
    settings = ", ".join(f"{k} {v}" for k, v in sidecar["search_settings"].items())
    if settings:
        what += f"; {settings}"
    if export.appended_to is not None:
        kept = sidecar["num_rows"] - export.added_rows
        lines = [f"appended {export.added_rows} rows to the {kept} of {export.appended_to} (checked: its rows are "
                 f"the stage's first {kept} bit for bit)", f"wrote {export.path} ({what})"]
    else:
        lines = [f"wrote {export.path} ({what})"]
    lines.append(f"sidecar: {faiss_index.sidecar_path(export.path)} (codes sha256 {sidecar['codes_sha256'][:16]}...; FAISS "
                 f"id = database row)")
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m dihn_dist.export", description=__doc__.split("\n\n")[1])
    parser.add_argument("run_dir", metavar="RUN_DIR", help="run folder written by python -m dihn_dist.train")
    parser.add_argument("--faiss", required=True, type=Path, metavar="FILE",
                        help="the index file to write (its sidecar: FILE.json)")
    parser.add_argument("--stage", choices=STAGES,
                        help="whose database codes (default: incremental if finished, else original)")
    parser.add_argument("--index", choices=faiss_index.INDEX_KINDS,
                        help="flat = IndexBinaryFlat (exact; the default), ivf = IndexBinaryIVF (trained on the "
                             "codes, nlist = round(sqrt(rows))), hnsw = IndexBinaryHNSW; with --append-to: the old "
                             "index's kind, which must not change")
    parser.add_argument("--append-to", type=Path, metavar="OLD_INDEX",
                        help="an index of the previous round: add only this stage's new rows to a copy of it")
    parser.add_argument("--debug", action="store_true", help="print the traceback of an error too")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    return errors.run_command(lambda: run(args), debug=args.debug)


def run(args) -> int:
    export = export_index(args.run_dir, args.faiss, args.stage, args.index, args.append_to)
    print(describe(export))
    return 0
