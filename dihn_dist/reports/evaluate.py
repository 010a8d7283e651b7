"""python -m dihn_dist.evaluate RUN_DIR [--topk K] [--precision-k K] [--out DIR]
   python -m dihn_dist.evaluate RUN_1 RUN_2 ... RUN_k [--topk K] [--out DIR]     (rounds: see dihn_dist.reports.rounds)

One run: recomputes every retrieval metric of a run from its exported codes and labels (no model, no images; see
`dihn_dist.training.run_reader` for the format) and writes, into --out (default RUN_DIR/report):
    report.md, report.json     the table (original codes / DIHN / retrained ADSH, whichever stages finished:
                               mAP@ALL, mAP@K, precision@k, mAP@K over queries of original and of
                               incremental classes) and the curves behind the plots
    precision_recall.png       precision against recall when retrieving everything within Hamming radius r
    precision_at_k.png         precision of the top k for k from 1 to the whole database
    per_iteration.png          mAP@ALL and the training loss per outer iteration, per stage
    bit_balance.png            fraction of +1 per bit of each stage's database codes
The row of a stage is computed by `metrics.retrieval_row`, as the trainer does, so with the run's --topk and
--precision-k the numbers equal those in metrics.json.

Several runs, the rounds of a growing database in order (round 1's run, then each run chained from the one
before with --old-run): the rounds report of `dihn_dist.reports.rounds` (rounds.md, rounds.json, rounds_map.png,
rounds_forgetting.png; default --out RUN_k/rounds-report): mAP per round for DIHN and the retrained baseline,
split by the round of each query's classes, and forgetting. The runs are checked to form a chain first.
"""
from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
import torch

from ..common import errors
from ..common.formats import INCREMENTAL, ORIGINAL, RETRAIN, STAGE_SHORT_TITLES, STAGE_TITLES
from ..method import metrics
from ..training.config import Config
from ..training.run_reader import ExportedRun, StageExport, load_run, load_stages
from . import figures, rounds
from .figures import backbone_description, format_value, map_points, markdown_table, save_figure, text_table

FIGURE_INCHES = {
    "precision_recall": (7.0, 5.0),
    "precision_at_k": (7.0, 5.0),
    "per_iteration": (12.0, 4.5),
    "bit_balance": (10.0, 4.5),
}
STAGE_COLOURS = {ORIGINAL: "tab:blue", INCREMENTAL: "tab:orange", RETRAIN: "tab:green"}
# Points of the precision@k curve, spaced evenly on a log axis from k = 1 to the whole database.
PRECISION_CURVE_POINTS = 40
# Row values compared with the trainer's record, besides its precision@k entries.
RECORDED_KEYS = ("map_all", "map_topk", "map_original_queries", "map_incremental_queries")


@dataclass
class StageReport:
    stage: str
    row: dict
    precision_recall: Dict[str, list]
    precision_at_k: Dict[str, list]
    bit_balance: List[float]
    iterations: List[dict]
    # None: not compared (another --topk or --precision-k than the trainer's); {}: equal to its record
    recorded_differences: Optional[Dict[str, list]] = None

    def to_json(self) -> dict:
        return {"stage": self.stage, "name": STAGE_TITLES[self.stage], "row": self.row,
                "precision_recall": self.precision_recall, "precision_at_k": self.precision_at_k,
                "bit_balance": self.bit_balance, "recorded_differences": self.recorded_differences}


def precision_curve_ks(num_database: int) -> List[int]:
    ks = np.unique(np.round(np.geomspace(1, num_database, PRECISION_CURVE_POINTS)).astype(int))
    return [int(k) for k in ks]


def differences_from_record(row: dict, recorded: dict) -> Dict[str, list]:
    """Keys whose recomputed value differs from the trainer's record (same topk and precision k only)."""
    keys = [k for k in recorded if k.startswith("precision_at_")] + list(RECORDED_KEYS)
    return figures.differences_from_record(row, recorded, keys)


def evaluate_stage(run: ExportedRun, stage: StageExport, topk: Optional[int], precision_k: int) -> StageReport:
    query_codes = torch.from_numpy(stage.query_codes)
    db_codes = torch.from_numpy(stage.database_codes)
    query_labels = torch.from_numpy(run.query_labels)
    db_labels = torch.from_numpy(run.database_labels[:stage.num_database])
    row = metrics.retrieval_row(query_codes, db_codes, query_labels, db_labels, run.num_seen, topk, precision_k)
    precision, recall = metrics.precision_recall_by_radius(query_codes, db_codes, query_labels, db_labels)
    ks = precision_curve_ks(stage.num_database)
    precision_at = metrics.precision_at_ks(query_codes, db_codes, query_labels, db_labels, ks)
    report = StageReport(
        stage=stage.name, row=row,
        precision_recall={"radius": list(range(run.code_length + 1)), "precision": precision.tolist(),
                          "recall": recall.tolist()},
        precision_at_k={"k": ks, "precision": precision_at.tolist()},
        bit_balance=(stage.database_codes > 0).mean(axis=0).tolist(),
        iterations=stage.iterations)
    recorded = stage.result.get("row", {})
    if recorded.get("topk") == row["topk"] and f"precision_at_{precision_k}" in recorded:
        report.recorded_differences = differences_from_record(row, recorded)
    return report


# ----------------------------------------------------------------------------------------------------
# Plots

def new_figure(name: str, panels: int = 1):
    return figures.new_figure(FIGURE_INCHES[name], panels)


def stage_label(report: StageReport) -> str:
    return f"{STAGE_SHORT_TITLES[report.stage]} (mAP@ALL {report.row['map_all']:.3f})"


def plot_precision_recall(reports: List[StageReport], path: Path, code_length: int) -> Path:
    figure, axes = new_figure("precision_recall")
    for report in reports:
        curve = report.precision_recall
        axes.plot(curve["recall"], curve["precision"], marker="o", markersize=3,
                  color=STAGE_COLOURS[report.stage], label=stage_label(report))
        # Radius 0 (exact code matches) and 2 are the usual hash-lookup operating points: mark them.
        for radius in (0, 2):
            if radius <= code_length:
                axes.annotate(f"r={radius}", (curve["recall"][radius], curve["precision"][radius]),
                              textcoords="offset points", xytext=(4, 4), fontsize=8,
                              color=STAGE_COLOURS[report.stage])
    axes.set(title=f"Precision-recall by Hamming radius (r = 0..{code_length})", xlabel="recall",
             ylabel="precision", xlim=(-0.02, 1.02), ylim=(-0.02, 1.02))
    axes.grid(alpha=0.3)
    axes.legend(loc="best", fontsize=9)
    return save_figure(figure, path)


def plot_precision_at_k(reports: List[StageReport], path: Path) -> Path:
    figure, axes = new_figure("precision_at_k")
    for report in reports:
        curve = report.precision_at_k
        axes.plot(curve["k"], curve["precision"], marker=".", color=STAGE_COLOURS[report.stage],
                  label=f"{STAGE_SHORT_TITLES[report.stage]} ({report.row['num_database']:,} database items)")
    axes.set_xscale("log")
    axes.set(title="Precision of the top k retrieved items", xlabel="k (items retrieved, log scale)",
             ylabel="precision@k", ylim=(-0.02, 1.02))
    axes.grid(alpha=0.3, which="both")
    axes.legend(loc="best", fontsize=9)
    return save_figure(figure, path)


def plot_per_iteration(reports: List[StageReport], path: Path) -> Path:
    figure, (map_axes, loss_axes) = new_figure("per_iteration", panels=2)
    evaluated_during_training = any("eval_map_all" in r for report in reports for r in report.iterations)
    for report in reports:
        colour = STAGE_COLOURS[report.stage]
        iterations, maps = zip(*map_points(report.iterations, report.row["map_all"]))
        map_axes.plot(iterations, maps, marker="o", color=colour, label=STAGE_SHORT_TITLES[report.stage])
        losses = [(r["iteration"] + 1, r["loss_total"]) for r in report.iterations if "loss_total" in r]
        if losses:
            loss_axes.plot(*zip(*losses), marker=".", color=colour, label=STAGE_SHORT_TITLES[report.stage])
    map_title = "mAP@ALL per outer iteration" if evaluated_during_training else \
        "final mAP@ALL (train with --eval-every N for a curve)"
    map_axes.set(title=map_title, xlabel="outer iteration", ylabel="mAP@ALL", ylim=(-0.02, 1.02))
    loss_axes.set(title="training loss per outer iteration (hash + quantization + balance)",
                  xlabel="outer iteration", ylabel="loss (mean per item and database entry)")
    # The same iteration range on both panels, also when the mAP panel has one point per stage.
    last_iteration = max([len(report.iterations) for report in reports] + [1])
    for axes in (map_axes, loss_axes):
        axes.set_xlim(0.5, last_iteration + 0.5)
        axes.xaxis.get_major_locator().set_params(integer=True)
        axes.grid(alpha=0.3)
        axes.legend(loc="best", fontsize=9)
    return save_figure(figure, path)


def plot_bit_balance(reports: List[StageReport], path: Path, code_length: int) -> Path:
    figure, axes = new_figure("bit_balance")
    width = 0.8 / len(reports)
    bits = np.arange(1, code_length + 1)
    for slot, report in enumerate(reports):
        axes.bar(bits + (slot - (len(reports) - 1) / 2) * width, report.bit_balance, width=width,
                 color=STAGE_COLOURS[report.stage],
                 label=f"{STAGE_SHORT_TITLES[report.stage]} ({report.row['num_database']:,} codes)")
    axes.axhline(0.5, color="black", linestyle="--", linewidth=1, label="balanced (0.5)")
    # Head room above 1 keeps the legend clear of the bars.
    axes.set(title="Bit balance of the database codes", xlabel="bit", ylabel="fraction of codes with +1",
             ylim=(0, 1.15), yticks=np.linspace(0, 1, 6),
             xticks=bits if code_length <= 32 else bits[::max(1, code_length // 16)])
    axes.grid(alpha=0.3, axis="y")
    axes.legend(loc="upper right", fontsize=9, ncols=len(reports) + 1)
    return save_figure(figure, path)


def write_plots(reports: List[StageReport], out: Path, code_length: int) -> Dict[str, str]:
    paths = {
        "precision_recall": plot_precision_recall(reports, out / "precision_recall.png", code_length),
        "precision_at_k": plot_precision_at_k(reports, out / "precision_at_k.png"),
        "per_iteration": plot_per_iteration(reports, out / "per_iteration.png"),
        "bit_balance": plot_bit_balance(reports, out / "bit_balance.png", code_length),
    }
    return {name: path.name for name, path in paths.items()}


# ----------------------------------------------------------------------------------------------------
# Table, report.md, report.json

def table_rows(reports: List[StageReport], precision_k: int) -> List[List[str]]:
    header = ["row", "mAP@ALL", "mAP@K", "K", f"P@{precision_k}", "mAP@K orig q", "mAP@K incr q", "database"]
    rows = [header]
    for report in reports:
        row = report.row
        rows.append([STAGE_SHORT_TITLES[report.stage], format_value(row["map_all"]), format_value(row["map_topk"]),
                     str(row["topk"]), format_value(row[f"precision_at_{precision_k}"]),
                     format_value(row["map_original_queries"]), format_value(row["map_incremental_queries"]),
                     str(row["num_database"])])
    return rows


def data_summary(run: ExportedRun) -> str:
    manifest, config = run.manifest, run.config
    num_database = run.database_labels.shape[0]
    return (f"{manifest.get('dataset', 'data')}: {num_database:,} database items ({run.num_original:,} of the "
            f"{run.num_seen} original classes, {num_database - run.num_original:,} incremental), "
            f"{run.query_labels.shape[0]:,} queries; {run.code_length}-bit codes, {config['arch']} "
            f"({backbone_description(config)})")


def agreement_note(reports: List[StageReport]) -> str:
    compared = [r for r in reports if r.recorded_differences is not None]
    differing = {r.stage: r.recorded_differences for r in compared if r.recorded_differences}
    if differing:
        return f"WARNING: differs from the trainer's recorded rows (recomputed, recorded): {differing}"
    if not compared:
        return "Not compared with the trainer's rows (they were computed with another K or precision k)."
    stages = ", ".join(STAGE_SHORT_TITLES[r.stage] for r in compared)
    return f"Recomputed rows equal the trainer's recorded rows ({stages}; result.json / metrics.json)."


def markdown_report(run: ExportedRun, reports: List[StageReport], plots: Dict[str, str], precision_k: int) -> str:
    titles = {"precision_recall": "Precision-recall by Hamming radius", "precision_at_k": "Precision@k",
              "per_iteration": "mAP and loss per outer iteration", "bit_balance": "Bit balance"}
    lines = [f"# Evaluation of {run.root}", "", data_summary(run), "",
             markdown_table(table_rows(reports, precision_k)), "",
             "mAP@K orig q / incr q: mAP@K over the queries of original / of incremental classes. "
             "Row 'original codes' ranks the original database only (its model never saw the new classes).", "",
             agreement_note(reports), ""]
    for name, file in plots.items():
        lines += [f"## {titles[name]}", "", f"![{titles[name]}]({file})", ""]
    return "\n".join(lines)


def evaluate_run(run_dir, topk: Optional[int] = None, precision_k: Optional[int] = None,
                 out: Optional[Path] = None) -> dict:
    """Evaluate every finished stage; write the report and plots; return report.json's content.

    topk None: the run's --topk; <= 0: the whole database. precision_k None: the run's --precision-k.
    """
    run = load_run(run_dir)
    topk = run.config.get("topk") if topk is None else (topk if topk > 0 else None)
    precision_k = precision_k or run.config.get("precision_k") or Config.precision_k
    out = figures.make_report_folder(Path(out) if out else run.root / "report")  # refused before the work
    stages = load_stages(run)
    reports = [evaluate_stage(run, stage, topk, precision_k) for stage in stages.values()]
    plots = write_plots(reports, out, run.code_length)
    summary = {"run": str(run.root), "data": data_summary(run), "backbone": backbone_description(run.config),
               "weights": run.config.get("weights"), "topk": topk, "precision_k": precision_k,
               "rows": [{"name": STAGE_TITLES[r.stage], "stage": r.stage, **r.row} for r in reports],
               "stages": {r.stage: r.to_json() for r in reports}, "plots": plots,
               "agreement": agreement_note(reports),
               "table": text_table(table_rows(reports, precision_k))}
    (out / "report.json").write_text(json.dumps(summary, indent=2) + "\n")
    (out / "report.md").write_text(markdown_report(run, reports, plots, precision_k) + "\n")
    summary["out"] = str(out)
    return summary


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m dihn_dist.evaluate", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR",
                        help="run folder written by python -m dihn_dist.train; several: the runs of rounds 1..k "
                             "in order, for the rounds report")
    parser.add_argument("--topk", type=int,
                        help="K of mAP@K; <= 0 means the whole database (default: each run's --topk)")
    parser.add_argument("--precision-k", type=int,
                        help="k of precision@k, one-run report only (default: the run's --precision-k)")
    parser.add_argument("--out", type=Path,
                        help="report folder (default: RUN_DIR/report; rounds: RUN_k/rounds-report)")
    parser.add_argument("--debug", action="store_true", help="print the traceback of an error too")
    args = parser.parse_args(argv)
    if args.precision_k is not None and args.precision_k <= 0:
        parser.error(f"--precision-k: expected a positive number, got {args.precision_k}")
    if args.precision_k is not None and len(args.run_dirs) > 1:
        parser.error("--precision-k applies to the report of one run; the rounds report has no precision@k")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    return errors.run_command(lambda: report(args), debug=args.debug)


def report(args) -> int:
    if len(args.run_dirs) > 1:
        rounds.print_report(rounds.rounds_report(args.run_dirs, args.topk, args.out))
        return 0
    summary = evaluate_run(args.run_dirs[0], args.topk, args.precision_k, args.out)
    print(summary["data"])
    print(summary["table"])
    print(summary["agreement"])
    print(f"report: {Path(summary['out']) / 'report.md'} (plots: {', '.join(summary['plots'].values())})")
    return 0
