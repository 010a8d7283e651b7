"""The facts every module shares, each written down once: folder formats, stage names, the incremental rule.

numpy-free and torch-free on purpose: the numpy-only reader (`exported.py`), the writer (`prepare.py`),
the loader (`data.py`) and the trainer all import from here, and none of them imports another for a
constant.
"""
from __future__ import annotations

# A prepared data folder (python -m dihn_dist.prepare): manifest.json describes it, written last.
PREPARED_FORMAT = "dihn_dist.prepared"
PREPARED_FORMAT_VERSION = 1
MANIFEST = "manifest.json"

# A run folder (python -m dihn_dist.train --out): format.json is its marker, written before anything else.
RUN_FORMAT = {"format": "dihn_dist.run", "format_version": 1}
FOLDER_MARKER = "format.json"

# The stages of a run, in the order they run, and how their retrieval rows are named in reports.
STAGES = ("original", "incremental", "retrain")
STAGE_TITLES = {
    "original": "original codes (ADSH, original database)",
    "incremental": "DIHN (whole database)",
    "retrain": "ADSH retrained on all classes",
}
STAGE_SHORT_TITLES = {"original": "original codes", "incremental": "DIHN", "retrain": "retrained ADSH"}


def is_incremental(labels, num_seen: int):
    """Rows (items or queries) that carry any class >= num_seen: the new classes' items.

    `labels` is a 0/1 (rows x classes) numpy array or torch tensor; returns a boolean vector of the same kind.
    The rule that splits the database (original items first), the query set and the reports.
    """
    return labels[:, num_seen:].sum(1) > 0


def train_command(run_dir, stage=None) -> str:
    """The command that continues the run in `run_dir`, in that very folder (also a copied or moved one),
    with exactly its saved settings; with `stage`, the command that adds or finishes that stage."""
    stage_flag = f" --stage {stage}" if stage else ""
    return f"python -m dihn_dist.train --config {run_dir}/config.json --out {run_dir}{stage_flag} --resume"
