"""What the two reports of `python -m dihn_dist.evaluate` share (one run: `evaluate`; several rounds:
`rounds`): fixed-size figures, text and Markdown tables, and the comparison with the trainer's record."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Dict, Iterable, List, Sequence, Tuple

from ..common.errors import cannot_create
from ..common.formats import STAGES, folder_kind

# Figures are saved at a fixed size (no tight bounding box), so every PNG has a predictable pixel size.
DPI = 100
# Recomputed values equal the trainer's up to the order of float summation.
RECORDED_TOLERANCE = 1e-9


# The folders of a run that hold what the trainer wrote: a report never goes into one of them.
RUN_OWN_FOLDERS = frozenset(STAGES) | {"checkpoints", "logs", "tensorboard"}


def make_report_folder(out: Path) -> Path:
    """--out of a report, created: a new folder or one of its own, never a file, prepared data, a run folder
    or one of a run folder's own folders (a report beside a run's files would be taken for part of it)."""
    kind = folder_kind(out)
    if kind == "prepared":
        raise ValueError(f"--out {out}: is a prepared data folder; a report never writes into data: choose "
                         f"another --out")
    if kind == "run":
        raise ValueError(f"--out {out}: is a run folder; write the report into a folder of its own (the "
                         f"default is {out / 'report'})")
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out}: exists and is not a folder; choose a folder for the report")
    if out.name in RUN_OWN_FOLDERS and folder_kind(out.parent) == "run":
        raise ValueError(f"--out {out}: is a folder of the run {out.parent}, written by the trainer; choose "
                         f"another --out (the default is {out.parent / 'report'})")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise cannot_create("--out", out, error) from None
    return out


def new_figure(inches: Tuple[float, float], panels: int = 1):
    """A matplotlib figure of `inches` at DPI with `panels` axes side by side: (figure, axes)."""
    import matplotlib
    matplotlib.use("Agg")  # files only: no display needed (clusters, CI)
    import matplotlib.pyplot as plt
    return plt.subplots(1, panels, figsize=inches, dpi=DPI, layout="constrained")


def save_figure(figure, path: Path) -> Path:
    import matplotlib.pyplot as plt
    figure.savefig(path, dpi=DPI)
    plt.close(figure)
    return path


def map_points(iterations: Sequence[dict], final_map: float) -> List[Tuple[int, float]]:
    """(outer iteration, mAP@ALL) pairs, 1-based: every --eval-every evaluation, then the final row's mAP."""
    points = [(record["iteration"] + 1, float(record["eval_map_all"])) for record in iterations
              if "eval_map_all" in record]
    last = len(iterations)
    if not points or points[-1][0] != last:
        points.append((last, float(final_map)))
    return points


def format_value(value) -> str:
    """A metric with four decimals; '-' where there is none (a split without queries, a stage not run)."""
    return f"{value:.4f}" if isinstance(value, float) else "-"


def text_table(rows: List[List[str]]) -> str:
    """Aligned columns for a terminal: the first left-aligned, the others right-aligned."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in
                               enumerate(zip(row, widths))) for row in rows)


def markdown_table(rows: List[List[str]]) -> str:
    lines = ["| " + " | ".join(rows[0]) + " |", "|" + "|".join(["---"] + ["---:"] * (len(rows[0]) - 1)) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows[1:]]
    return "\n".join(lines)


def backbone_description(config: dict) -> str:
    """Where the network's weights started: the published numbers assume ImageNet weights."""
    weights = config.get("weights")
    if weights:
        frozen = ", trunk frozen" if config.get("freeze_backbone") else ""
        return f"ImageNet weights {Path(weights['file']).name} (sha256 {weights['sha256']}{frozen})"
    pretrained = config.get("pretrained")
    if pretrained not in (None, "", "none", "auto"):
        return f"backbone from {pretrained}"
    if config.get("arch") == "small-cnn":
        return "trained from scratch"
    return "UNTRAINED backbone: no --pretrained ImageNet weights, not comparable to the published numbers"


def differences_from_record(row: dict, recorded: dict, keys: Iterable[str]) -> Dict[str, list]:
    """Keys whose recomputed value differs from the trainer's record: {key: [recomputed, recorded]}.
    Compare only rows computed with the same top k (and precision k) as the trainer's."""
    differences = {}
    for key in keys:
        ours, theirs = row.get(key), recorded.get(key)
        if ours is None and theirs is None:
            continue
        if ours is None or theirs is None or not math.isclose(ours, theirs, rel_tol=0, abs_tol=RECORDED_TOLERANCE):
            differences[key] = [ours, theirs]
    return differences
