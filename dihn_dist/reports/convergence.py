"""python -m dihn_dist.convergence RUN_DIR: when a stage stopped improving, at what mAP, after how much training.

Reads the per-iteration mAP@ALL that a run recorded with `--eval-every N` (and the stage's final row) from
RUN_DIR/<stage>/result.json. The stopping rule is the one a user could apply while training:

    converged at outer iteration t = the first evaluated t >= window such that
        mAP(t) - mAP(t - window) < min_gain        (default: less than 0.005 gained over 10 iterations)

mAP(t - window) is the latest evaluation at or before t - window (the start, before any training, has no
evaluation, so t counts from `window` on). Times are training times: the outer iterations' own time
(training, code update) up to t, without the --eval-every evaluation passes, which a run without them does
not spend. `--compare DIHN_RUN` adds the DIHN row of another run (stage 2, and stages 1 + 2) for comparison.
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Optional, Sequence, Tuple

from ..common import errors
from ..common.formats import INCREMENTAL, ORIGINAL, RETRAIN, STAGES
from ..training.run_reader import load_run, read_json, unfinished_stage_error
from .figures import map_points

DEFAULT_WINDOW = 10
DEFAULT_MIN_GAIN = 0.005


def map_at_or_before(points: Sequence[Tuple[int, float]], iteration: int) -> Optional[float]:
    """The mAP of the latest evaluation at or before `iteration`, None when there is none."""
    earlier = [value for at, value in points if at <= iteration]
    return earlier[-1] if earlier else None


def converged_at(points: Sequence[Tuple[int, float]], window: int = DEFAULT_WINDOW,
                 min_gain: float = DEFAULT_MIN_GAIN) -> Optional[int]:
    """The first evaluated iteration t whose mAP gained less than min_gain over the `window` iterations
    before it (see the module's docstring); None when the curve never flattened that much."""
    if window < 1:
        raise ValueError(f"window: expected a positive number of iterations, got {window}")
    for at, value in points:
        before = map_at_or_before(points, at - window) if at >= window else None
        if before is not None and value - before < min_gain:
            return at
    return None


def evaluation_seconds(record: dict) -> float:
    return float(record.get("eval_s", 0.0))


def training_seconds(iterations: Sequence[dict], total_s: float, upto: Optional[int] = None) -> float:
    """Seconds of training (without evaluation passes) of the first `upto` outer iterations (default all).

    The trainer records each iteration's evaluation time (eval_s) and the stage's total time (which
    includes it); an iteration's own time is its share of the total: total minus evaluations, prorated
    by the recorded per-iteration training time when only a prefix is asked for."""
    without_eval = total_s - sum(evaluation_seconds(r) for r in iterations)
    if upto is None or upto >= len(iterations):
        return without_eval
    measured = [float(r["train_s"]) for r in iterations]
    return without_eval * sum(measured[:upto]) / sum(measured)


def read_stage(run_dir: Path, stage: str, flag: str = "--stage") -> dict:
    """A finished stage's result.json; unfinished, the error names the command that trains it (and, with
    `flag`, the finished stages to choose instead)."""
    if stage not in STAGES:
        raise ValueError(f"--stage: expected one of {', '.join(STAGES)}, got {stage!r}")
    path = Path(run_dir) / stage / "result.json"
    if not path.is_file():
        raise unfinished_stage_error(load_run(run_dir), stage, flag)  # (or why run_dir is not a run folder)
    return read_json(path, Path(run_dir))


def curve_table(points: Sequence[Tuple[int, float]], iterations: Sequence[dict], total_s: float) -> str:
    lines = ["| outer iteration | mAP@ALL | training time s (no evaluation passes) |", "| --- | --- | --- |"]
    for at, value in points:
        lines.append(f"| {at} | {value:.4f} | {training_seconds(iterations, total_s, at):.0f} |")
    return "\n".join(lines)


def summary(result: dict, window: int, min_gain: float) -> dict:
    """The curve of one stage and where it converged, as numbers."""
    iterations, total_s = result["iterations"], float(result["train_time_s"])
    points = map_points(iterations, result["row"]["map_all"])
    at = converged_at(points, window, min_gain)
    best_at, best = max(points, key=lambda point: point[1])
    return {"stage": result["stage"], "points": points, "converged_at": at,
            "converged_map": map_at_or_before(points, at) if at else None,
            "converged_train_s": training_seconds(iterations, total_s, at) if at else None,
            "best_map": best, "best_at": best_at, "final_map": float(result["row"]["map_all"]),
            "iterations": len(iterations), "train_s": training_seconds(iterations, total_s),
            "train_s_with_evaluation": total_s, "records": iterations}


def describe(found: dict, window: int, min_gain: float) -> str:
    rule = f"mAP@ALL gained < {min_gain} over the last {window} outer iterations"
    lines = [f"{found['stage']}: {found['iterations']} outer iterations, final mAP@ALL {found['final_map']:.4f}, "
             f"best {found['best_map']:.4f} at iteration {found['best_at']}; training {found['train_s']:.0f} s "
             f"({found['train_s_with_evaluation']:.0f} s with the evaluation passes)"]
    if found["converged_at"] is None:
        lines.append(f"not converged ({rule}) within {found['iterations']} iterations: run longer")
    else:
        lines.append(f"converged ({rule}) at iteration {found['converged_at']}: mAP@ALL {found['converged_map']:.4f} "
                     f"after {found['converged_train_s']:.0f} s of training")
    return "\n".join(lines)


def dihn_comparison(run_dir: Path) -> str:
    """DIHN's row from a run with stages original and incremental: its mAP and training times."""
    stage2 = read_stage(run_dir, INCREMENTAL, flag="")
    stage1 = read_stage(run_dir, ORIGINAL, flag="")
    time2 = training_seconds(stage2["iterations"], float(stage2["train_time_s"]))
    time1 = training_seconds(stage1["iterations"], float(stage1["train_time_s"]))
    return (f"DIHN ({run_dir}): mAP@ALL {stage2['row']['map_all']:.4f} after {len(stage2['iterations'])} outer "
            f"iterations; training {time2:.0f} s for stage 2 on top of a finished stage 1, "
            f"{time1 + time2:.0f} s for stages 1 + 2")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m dihn_dist.convergence", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("run_dir", metavar="RUN_DIR", type=Path, help="run folder written by python -m dihn_dist.train")
    parser.add_argument("--stage", default=RETRAIN, help="the stage whose curve is read")
    parser.add_argument("--window", type=int, default=DEFAULT_WINDOW, help="outer iterations the gain is measured over")
    parser.add_argument("--min-gain", type=float, default=DEFAULT_MIN_GAIN, help="converged below this mAP@ALL gain")
    parser.add_argument("--compare", type=Path, help="a run with stages original and incremental: print its DIHN row")
    parser.add_argument("--debug", action="store_true", help="print the traceback of an error too")
    return parser.parse_args(argv)


def report(args) -> int:
    found = summary(read_stage(args.run_dir, args.stage), args.window, args.min_gain)
    print(curve_table(found["points"], found["records"], found["train_s_with_evaluation"]))
    print(describe(found, args.window, args.min_gain))
    if args.compare:
        print(dihn_comparison(args.compare))
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    return errors.run_command(lambda: report(args), debug=args.debug)
