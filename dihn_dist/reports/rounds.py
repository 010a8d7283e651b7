"""The rounds report: `python -m dihn_dist.evaluate RUN_1 RUN_2 ... RUN_k` (the runs of rounds 1..k, in order).

Classes arrive round after round (`prepare --extends`, `train --old-run`). This report follows a chain of run
folders and tells, per round, how well the chained DIHN codes and the retrained baseline retrieve, over all the
queries of the round and over the queries of each round's classes, and how much of what earlier rounds had
learned is kept (forgetting). Like the one-run report, it reads only the exported codes and labels
(`dihn_dist.training.run_reader`): no model, no images. It writes into --out (default RUN_k/rounds-report):
    rounds.md, rounds.json     three tables (per round; per round of the queries' classes; forgetting), the
                               definitions, and every number behind them
    rounds_map.png             mAP per round, DIHN against retrained ADSH
    rounds_forgetting.png      mAP of each round's class queries in that round and every later one

Definitions: DEFINITIONS below (rounds.md and rounds.json repeat them). In short: a query belongs to the round
that brought its (lowest) class; round r's DIHN codes are its incremental stage (round 1: original); the
retrained ADSH baseline is the retrain stage (round 1: its original stage, which is that very baseline);
forgetting of round g's class queries at round r = their best mAP@K in rounds g..r-1 minus their mAP@K in r.

The chain is checked before anything is computed: every run's database must begin with exactly the previous
run's, row for row (image digests and labels, `data.database_prefix_problem`, from the copies of manifest.json,
database_labels.npy and database_image_digests.npy that a run folder keeps), and add items; its queries must
begin with the previous run's; code lengths must agree. The first run that breaks the chain is named in a
one-line error.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch

from ..common.formats import INCREMENTAL, ORIGINAL, RETRAIN, classes_so_far, is_incremental
from ..data.prepared import database_prefix_problem, database_record
from ..method import metrics
from ..training.run_reader import ExportedRun, StageExport, load_run
from . import figures
from .figures import format_value, markdown_table, text_table

SERIES = ("dihn", "retrain")
SERIES_TITLES = {"dihn": "DIHN", "retrain": "retrained ADSH"}
SERIES_COLOURS = {"dihn": "tab:orange", "retrain": "tab:green"}
FIGURE_INCHES = {"rounds_map": (7.0, 5.0), "rounds_forgetting": (12.0, 4.5)}
# Row values compared with each stage's record (result.json), when computed with the same K.
RECORDED_KEYS = ("map_all", "map_topk", "map_original_queries", "map_incremental_queries")


@dataclass
class Round:
    """One run of the chain and what stands for it."""
    number: int                        # 1-based
    run: ExportedRun
    classes: Tuple[int, int]           # [first, end): the classes this round brought
    stages: Dict[str, Optional[str]]   # series -> the stage whose codes stand for it (None: not trained)
    series: Dict[str, Optional[dict]] = field(default_factory=dict)  # series -> its row (evaluate_rounds)
    keeps_previous_codes: Optional[bool] = None  # DIHN codes begin with the previous round's, bit for bit

    @property
    def class_range(self) -> str:
        first, end = self.classes
        return "-" if end <= first else str(first) if end == first + 1 else f"{first}-{end - 1}"


# ----------------------------------------------------------------------------------------------------
# The chain

def chain_problem(earlier: ExportedRun, later: ExportedRun) -> Optional[str]:
    """Why `later` is not a later round of `earlier` (None when it is)."""
    if earlier.root.resolve() == later.root.resolve():
        return "the same run folder twice"
    if earlier.code_length != later.code_length:
        return f"{later.code_length}-bit codes after {earlier.code_length}-bit ones"
    problem = database_prefix_problem(database_record(earlier.root), database_record(later.root))
    if problem is not None:
        return problem
    if len(later.database_labels) == len(earlier.database_labels):
        return "its database adds no item to the previous run's"
    if classes_so_far(later.manifest) < classes_so_far(earlier.manifest):
        return f"{classes_so_far(later.manifest)} classes after {classes_so_far(earlier.manifest)}"
    return query_prefix_problem(earlier.query_labels, later.query_labels)


def query_prefix_problem(earlier: np.ndarray, later: np.ndarray) -> Optional[str]:
    """The queries of a round are the previous round's (same label rows, 0 in new columns), then new ones:
    what lets forgetting follow the same queries from round to round."""
    rows, width = earlier.shape
    if len(later) < rows or later.shape[1] < width:
        return f"its {len(later)} queries cannot begin with the previous run's {rows}"
    differing = np.flatnonzero((later[:rows, :width] != earlier).any(axis=1) | later[:rows, width:].any(axis=1))
    if len(differing):
        return f"query row {differing[0]} carries other labels than in the previous run: its queries do not " \
               f"begin with the previous run's"
    return None


def check_chain(runs: List[ExportedRun]) -> None:
    """Raise ValueError (one line, naming the first run that breaks it) unless the runs form a chain."""
    for earlier, later in zip(runs, runs[1:]):
        problem = chain_problem(earlier, later)
        if problem is not None:
            raise ValueError(f"{later.root}: not the round after {earlier.root}: {problem}; give the runs in round "
                             f"order, each trained on data prepared with --extends the previous run's data")


def series_stages(run: ExportedRun) -> Dict[str, Optional[str]]:
    """Which finished stage stands for each series in this run (see the definitions above)."""
    finished = run.finished_stages()
    dihn = INCREMENTAL if INCREMENTAL in finished else ORIGINAL if ORIGINAL in finished else None
    if dihn is None:
        # raises the one-line error that names the command which trains the stage this round publishes
        # (a first round killed in stage 1 resumes stage 1, it is not given a stage 2)
        run.stage(run.published_stage())
    retrain = RETRAIN if RETRAIN in finished else None
    if retrain is None and dihn == ORIGINAL and run.stage_rows(ORIGINAL) == len(run.database_labels):
        retrain = ORIGINAL
    return {"dihn": dihn, "retrain": retrain}


def load_rounds(run_dirs: List) -> List[Round]:
    """The runs, checked to form a chain, with the classes each round brought and the stages standing for it."""
    runs = [load_run(run_dir) for run_dir in run_dirs]
    check_chain(runs)
    rounds, previous_classes = [], 0
    for number, run in enumerate(runs, start=1):
        classes = classes_so_far(run.manifest)
        rounds.append(Round(number, run, (previous_classes, classes), series_stages(run)))
        previous_classes = classes
    return rounds


def query_rounds(query_labels: np.ndarray, rounds: List[Round]) -> np.ndarray:
    """The round of each query (1-based): the earliest round among its classes; 0 for a query without labels."""
    ends = np.array([r.classes[1] for r in rounds])
    lowest_class = np.argmax(query_labels != 0, axis=1)
    number = np.searchsorted(ends, lowest_class, side="right") + 1
    return np.where(query_labels.any(axis=1), number, 0)


# ----------------------------------------------------------------------------------------------------
# Numbers

def mean_or_none(values: np.ndarray) -> Optional[float]:
    return float(values.mean()) if len(values) else None


def evaluate_series(round_: Round, stage: StageExport, rounds_of_queries: np.ndarray, topk: Optional[int]) -> dict:
    """mAP@ALL and mAP@K of one stage over all queries, over those of each round's classes, and over those of
    the previous rounds' / this round's new classes (as the trainer splits them), with its record compared."""
    run = round_.run
    query_codes, db_codes = torch.from_numpy(stage.query_codes), torch.from_numpy(stage.database_codes)
    query_labels = torch.from_numpy(run.query_labels)
    db_labels = torch.from_numpy(run.database_labels[:stage.num_database])
    aps_all = metrics.average_precisions(query_codes, db_codes, query_labels, db_labels, topk=None).numpy()
    aps_topk = aps_all if topk is None else \
        metrics.average_precisions(query_codes, db_codes, query_labels, db_labels, topk=topk).numpy()
    new_classes = is_incremental(run.query_labels, run.num_seen)
    row = {"stage": stage.name, "map_all": float(aps_all.mean()), "map_topk": float(aps_topk.mean()),
           "topk": topk or stage.num_database, "num_database": stage.num_database,
           "num_queries": int(len(aps_all)),
           "map_original_queries": mean_or_none(aps_topk[~new_classes]),
           "map_incremental_queries": mean_or_none(aps_topk[new_classes]),
           "by_query_round": [{"round": g, "num_queries": int((rounds_of_queries == g).sum()),
                               "map_all": mean_or_none(aps_all[rounds_of_queries == g]),
                               "map_topk": mean_or_none(aps_topk[rounds_of_queries == g])}
                              for g in range(1, round_.number + 1)]}
    recorded = stage.result.get("row", {})
    row["recorded_differences"] = (figures.differences_from_record(row, recorded, RECORDED_KEYS)
                                   if recorded.get("topk") == row["topk"] else None)
    return row


def evaluate_rounds(rounds: List[Round], topk: Optional[int] = None) -> None:
    """Fill each round's series rows and whether its DIHN codes keep the previous round's.
    topk None: each run's --topk; <= 0: the whole database."""
    previous_codes = None
    for round_ in rounds:
        run = round_.run
        k = run.config.get("topk") if topk is None else (topk if topk > 0 else None)
        rounds_of_queries = query_rounds(run.query_labels, rounds[:round_.number])
        stages = {name: run.stage(name) for name in set(filter(None, round_.stages.values()))}
        round_.series = {series: evaluate_series(round_, stages[name], rounds_of_queries, k) if name else None
                         for series, name in round_.stages.items()}
        codes = stages[round_.stages["dihn"]].database_codes
        if previous_codes is not None:
            round_.keeps_previous_codes = bool(len(codes) >= len(previous_codes)
                                               and np.array_equal(codes[:len(previous_codes)], previous_codes))
        previous_codes = codes


def query_round_maps(rounds: List[Round], series: str) -> List[List[Optional[float]]]:
    """m[g-1][r-1] = mAP@K of the queries of round g's classes in round r (None: before g, or not trained)."""
    matrix = [[None] * len(rounds) for _ in rounds]
    for round_ in rounds:
        row = round_.series.get(series)
        for split in (row["by_query_round"] if row else []):
            matrix[split["round"] - 1][round_.number - 1] = split["map_topk"]
    return matrix


def forgetting(maps: List[List[Optional[float]]]) -> Tuple[List[List[Optional[float]]], List[Optional[float]]]:
    """From query_round_maps: f[g-1][r-1] = max over rounds l in [g, r) of maps[g-1][l-1] minus maps[g-1][r-1]
    (None unless r > g and both are known), and the average forgetting of each round r over g < r."""
    size = len(maps)
    table = [[None] * size for _ in range(size)]
    for g in range(size):
        for r in range(g + 1, size):
            earlier = [value for value in maps[g][g:r] if value is not None]
            if earlier and maps[g][r] is not None:
                table[g][r] = max(earlier) - maps[g][r]
    averages = []
    for r in range(size):
        values = [table[g][r] for g in range(r) if table[g][r] is not None]
        averages.append(float(np.mean(values)) if values else None)
    return table, averages


# ----------------------------------------------------------------------------------------------------
# Tables

def pair(first: Optional[float], second: Optional[float]) -> str:
    """A DIHN / retrained ADSH cell."""
    return f"{format_value(first)} / {format_value(second)}"


def codes_description(round_: Round) -> str:
    """The stages that stand for DIHN and for retrained ADSH in this round."""
    dihn, retrain = round_.stages["dihn"], round_.stages["retrain"]
    if retrain == dihn:
        return f"{dihn} (both)"
    return f"{dihn} + {retrain}" if retrain else dihn


def topk_text(row: dict) -> str:
    return "all" if row["topk"] >= row["num_database"] else f"{row['topk']:,}"


def metric_name(rounds: List[Round]) -> str:
    """What mAP@K is in this report: mAP@ALL when every K is the whole database (the tables then show it once)."""
    rows = [row for r in rounds for row in r.series.values() if row]
    return "mAP@ALL" if all(row["topk"] >= row["num_database"] for row in rows) else "mAP@K"


def summary_rows(rounds: List[Round], average_forgetting: Dict[str, List[Optional[float]]]) -> List[List[str]]:
    """One row per round: its data, the stages standing for it, mAP over all its queries, average forgetting."""
    with_topk = metric_name(rounds) == "mAP@K"
    header = ["round", "classes", "database", "queries", "codes", "mAP@ALL DIHN / retrained"]
    if with_topk:
        header += ["K", "mAP@K DIHN / retrained"]
    rows = [header + ["forgetting DIHN / retrained"]]
    for round_ in rounds:
        dihn, retrain = round_.series["dihn"], round_.series["retrain"] or {}
        index = round_.number - 1
        row = [str(round_.number), round_.class_range, f"{len(round_.run.database_labels):,}",
               f"{len(round_.run.query_labels):,}", codes_description(round_),
               pair(dihn["map_all"], retrain.get("map_all"))]
        if with_topk:
            row += [topk_text(dihn), pair(dihn["map_topk"], retrain.get("map_topk"))]
        rows.append(row + [pair(average_forgetting["dihn"][index], average_forgetting["retrain"][index])])
    return rows


def query_round_rows(rounds: List[Round], maps: Dict[str, list]) -> List[List[str]]:
    """mAP@K of each round's class queries (rows) in each round (columns), DIHN / retrained ADSH."""
    counts = rounds[-1].series["dihn"]["by_query_round"]
    rows = [["queries of", "queries"] + [f"round {r.number}" for r in rounds]]
    for g, round_ in enumerate(rounds):
        cells = [pair(maps["dihn"][g][r], maps["retrain"][g][r]) if r >= g else "" for r in range(len(rounds))]
        rows.append([f"round {round_.number} classes ({round_.class_range})", str(counts[g]["num_queries"]), *cells])
    return rows


def forgetting_rows(rounds: List[Round], tables: Dict[str, list], averages: Dict[str, list]) -> List[List[str]]:
    """Forgetting of each earlier round's class queries (rows) at each later round (columns)."""
    rows = [["forgetting of"] + [f"round {r.number}" for r in rounds[1:]]]
    for g, round_ in enumerate(rounds[:-1]):
        cells = [pair(tables["dihn"][g][r], tables["retrain"][g][r]) if r > g else "" for r in range(1, len(rounds))]
        rows.append([f"round {round_.number} classes ({round_.class_range})", *cells])
    rows.append(["average", *[pair(averages["dihn"][r], averages["retrain"][r]) for r in range(1, len(rounds))]])
    return rows


# ----------------------------------------------------------------------------------------------------
# Plots

def round_ticks(axes, rounds: List[Round]) -> None:
    axes.set_xticks([r.number for r in rounds], [f"{r.number}\n(+{r.class_range})" if r.number > 1 else
                                                 f"1\n({r.class_range})" for r in rounds])
    axes.set_xlim(0.7, len(rounds) + 0.3)


def plot_map_per_round(rounds: List[Round], path: Path) -> Path:
    """mAP@ALL of DIHN and of retrained ADSH per round (and mAP@K, dashed, when K is not the whole database)."""
    figure, axes = figures.new_figure(FIGURE_INCHES["rounds_map"])
    with_topk = metric_name(rounds) == "mAP@K"
    for series in SERIES:
        points = [(r.number, r.series[series]) for r in rounds if r.series[series]]
        if not points:
            continue
        numbers = [number for number, _ in points]
        axes.plot(numbers, [row["map_all"] for _, row in points], marker="o", color=SERIES_COLOURS[series],
                  label=f"{SERIES_TITLES[series]} mAP@ALL")
        if with_topk:
            axes.plot(numbers, [row["map_topk"] for _, row in points], marker="s", linestyle="--",
                      color=SERIES_COLOURS[series], label=f"{SERIES_TITLES[series]} mAP@K")
    axes.set(title="mAP per round: every query so far, the whole database so far", xlabel="round (classes)",
             ylabel="mAP", ylim=(-0.02, 1.02))
    round_ticks(axes, rounds)
    axes.grid(alpha=0.3)
    axes.legend(loc="best", fontsize=9)
    return figures.save_figure(figure, path)


def plot_query_rounds(rounds: List[Round], maps: Dict[str, list], path: Path) -> Path:
    """One panel per series: mAP@K of each round's class queries, from their round to the last."""
    figure, panels = figures.new_figure(FIGURE_INCHES["rounds_forgetting"], panels=len(SERIES))
    metric = metric_name(rounds)
    colours = [f"C{i % 10}" for i in range(len(rounds))]
    for axes, series in zip(panels, SERIES):
        for g, round_ in enumerate(rounds):
            points = [(r + 1, value) for r, value in enumerate(maps[series][g]) if value is not None]
            if points:
                axes.plot(*zip(*points), marker="o", color=colours[g],
                          label=f"round {round_.number} classes ({round_.class_range})")
        axes.set(title=f"{SERIES_TITLES[series]}: {metric} of each round's class queries", xlabel="round",
                 ylabel=metric, ylim=(-0.02, 1.02))
        round_ticks(axes, rounds)
        axes.grid(alpha=0.3)
        axes.legend(loc="best", fontsize=9)
    return figures.save_figure(figure, path)


# ----------------------------------------------------------------------------------------------------
# The report

DEFINITIONS = {
    "round r's classes": "classes [K_(r-1), K_r), where K_r is round r's number of classes so far (prepare "
                         "--classes K; an image-list preparation: its label columns) and K_0 = 0",
    "a query's round": "the earliest round among its classes (the round of its lowest class); for single-label "
                       "data, the round that brought its class. A query without labels counts only in the mAP "
                       "over all queries",
    "DIHN": "the run's incremental stage when it finished, else its original stage (round 1: ADSH on round 1's "
            "classes, where the chain starts)",
    "retrained ADSH": "the run's retrain stage; in a round whose original stage covers the whole database (round 1) "
                      "that stage is itself ADSH trained from scratch on every class so far, so it stands for "
                      "both series ('original (both)')",
    "mAP@K": "K = the run's --topk (or evaluate's --topk); 'all' = the whole database, where mAP@K = mAP@ALL. "
             "Every round searches its own whole database",
    "forgetting": "of the queries of round g's classes at a later round r: their best mAP@K in rounds g..r-1 "
                  "minus their mAP@K in round r (as in the continual-learning literature, Chaudhry et al. 2018). "
                  "Positive: worse than before; negative: better. A round's database is larger than the earlier "
                  "ones', so more distractors count in a drop as well as weaker codes. The per-round column is "
                  "the average over the earlier rounds' class queries",
}


def stage_label(round_: Round, series: str) -> str:
    return f"round {round_.number} {SERIES_TITLES[series]} ({round_.stages[series]})"


def agreement_note(rounds: List[Round]) -> str:
    """Whether the recomputed rows equal the trainer's (result.json / metrics.json), each stage once."""
    compared, differing, skipped = [], {}, []
    for round_ in rounds:
        for series in SERIES:
            row = round_.series[series]
            if row is None or (series == "retrain" and round_.stages["retrain"] == round_.stages["dihn"]):
                continue
            label = stage_label(round_, series)
            if row["recorded_differences"] is None:
                skipped.append(label)
            elif row["recorded_differences"]:
                differing[label] = row["recorded_differences"]
            else:
                compared.append(label)
    if differing:
        return f"WARNING: differs from the trainer's recorded rows (recomputed, recorded): {differing}"
    note = f"Recomputed rows equal the trainer's recorded rows ({', '.join(compared)})." if compared else ""
    if skipped:
        note += f" Not compared (another K than the trainer's): {', '.join(skipped)}."
    return note.strip()


def chain_note(rounds: List[Round]) -> str:
    broken = [r.number for r in rounds if r.keeps_previous_codes is False]
    if broken:
        return (f"NOTE: the DIHN codes of round(s) {', '.join(map(str, broken))} do not begin with the previous "
                f"round's codes (B_old came from elsewhere: --old-codes, or another run of the previous round).")
    return "Every round's DIHN codes begin with the previous round's codes, bit for bit (B_old frozen)."


def data_summary(rounds: List[Round]) -> str:
    first, last = rounds[0].run, rounds[-1].run
    architectures = sorted({f"{r.run.config['arch']} ({figures.backbone_description(r.run.config)})"
                            for r in rounds})
    classes = ", +".join(r.class_range for r in rounds)
    return (f"{last.manifest.get('dataset', 'data')} in {len(rounds)} rounds (classes {classes}): "
            f"{len(first.database_labels):,} to {len(last.database_labels):,} database items, "
            f"{len(first.query_labels):,} to {len(last.query_labels):,} queries; {last.code_length}-bit codes, "
            f"{', '.join(architectures)}")


def markdown_report(summary: dict, tables: Dict[str, List[List[str]]], plots: Dict[str, str]) -> str:
    runs = "\n".join(f"{number}. `{run}`" for number, run in enumerate(summary["runs"], start=1))
    lines = ["# Rounds report", "", summary["data"], "", runs, "",
             "## mAP per round (all queries so far)", "", markdown_table(tables["rounds"]), "",
             f"## {summary['metric']} of the queries of each round's classes (DIHN / retrained ADSH)", "",
             markdown_table(tables["query_rounds"]), "",
             "## Forgetting (DIHN / retrained ADSH)", "", markdown_table(tables["forgetting"]), "",
             "## Definitions", ""]
    lines += [f"* **{term}**: {text}." for term, text in DEFINITIONS.items()]
    lines += ["", summary["agreement"], "", summary["chain"], ""]
    titles = {"rounds_map": "mAP per round",
              "rounds_forgetting": "mAP of each round's class queries, round after round"}
    for name, file in plots.items():
        lines += [f"## {titles[name]}", "", f"![{titles[name]}]({file})", ""]
    return "\n".join(lines)


def round_json(round_: Round) -> dict:
    run = round_.run
    first, end = round_.classes
    return {"round": round_.number, "run": str(run.root), "classes": [first, end],
            "class_names": run.class_names[first:end], "num_database": int(len(run.database_labels)),
            "num_queries": int(len(run.query_labels)), "stages": round_.stages,
            "keeps_previous_codes": round_.keeps_previous_codes, "series": round_.series}


def rounds_report(run_dirs: List, topk: Optional[int] = None, out: Optional[Path] = None) -> dict:
    """Check the chain, evaluate every round, write rounds.md, rounds.json and the plots into `out` (default
    RUN_k/rounds-report); return rounds.json's content (with "out"). topk as in `evaluate_rounds`."""
    rounds = load_rounds(run_dirs)
    evaluate_rounds(rounds, topk)
    maps = {series: query_round_maps(rounds, series) for series in SERIES}
    forgotten = {series: forgetting(maps[series]) for series in SERIES}
    averages = {series: forgotten[series][1] for series in SERIES}
    tables = {"rounds": summary_rows(rounds, averages), "query_rounds": query_round_rows(rounds, maps),
              "forgetting": forgetting_rows(rounds, {s: forgotten[s][0] for s in SERIES}, averages)}
    out = figures.make_report_folder(Path(out) if out else rounds[-1].run.root / "rounds-report")
    plots = {"rounds_map": plot_map_per_round(rounds, out / "rounds_map.png").name,
             "rounds_forgetting": plot_query_rounds(rounds, maps, out / "rounds_forgetting.png").name}
    summary = {"runs": [str(r.run.root) for r in rounds], "data": data_summary(rounds), "topk": topk,
               "metric": metric_name(rounds),
               "rounds": [round_json(r) for r in rounds],
               "query_round_map_topk": maps,
               "forgetting": {s: {"by_query_round": forgotten[s][0], "average": averages[s]} for s in SERIES},
               "definitions": DEFINITIONS, "agreement": agreement_note(rounds), "chain": chain_note(rounds),
               "plots": plots, "tables": {name: text_table(rows) for name, rows in tables.items()}}
    (out / "rounds.json").write_text(json.dumps(summary, indent=2) + "\n")
    (out / "rounds.md").write_text(markdown_report(summary, tables, plots) + "\n")
    summary["out"] = str(out)
    return summary


def print_report(summary: dict) -> None:
    """What the command prints: the data, the three tables, the checks, where the report is."""
    tables = summary["tables"]
    print(summary["data"])
    print(tables["rounds"])
    print(f"\n{summary['metric']} of the queries of each round's classes (DIHN / retrained ADSH)")
    print(tables["query_rounds"])
    print(f"\nforgetting: best earlier {summary['metric']} of the queries of a round's classes minus this "
          f"round's (DIHN / retrained ADSH)")
    print(tables["forgetting"])
    print(summary["agreement"])
    print(summary["chain"])
    print(f"report: {Path(summary['out']) / 'rounds.md'} (plots: {', '.join(summary['plots'].values())})")
