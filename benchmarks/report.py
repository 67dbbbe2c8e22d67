"""A paper-style table (mean +- std over seeds) and learning curves (PNG) from a folder of runs:
every checkpoint of uepo_offline.py / uepo_online.py and every scores.json of the baselines.

    python benchmarks/report.py runs/

It also writes curves.csv, every run's evaluations; `--curves` reads such files back, so runs whose
folders are gone still count (the README's online figures: `--curves docs/online_curves.csv`).
"""

import csv
import json
import os
import re
import sys
from dataclasses import dataclass
from typing import Annotated

import numpy as np
import tyro

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from eval import (  # noqa: E402
    CheckpointError,
    dataset_name,
    fail,
    load_checkpoint,
    markdown_table,
    offline_ranking,
    unwritable,
)


def mean_std_over_seeds(values, digits: int = 1) -> str:
    """`mean +- std` with the sample std (ddof 1; 0 for a single seed), as the results tables."""
    std = np.std(values, ddof=1) if len(values) > 1 else 0.0
    return f"{np.mean(values):.{digits}f} +- {std:.{digits}f}"


@dataclass
class ReportArgs:
    """A paper-style table and learning curves from a folder of runs (runs/ by default layout:
    runs/{dataset}__{exp_name}__{seed}__{time}/ with the TensorBoard logs and the checkpoint)."""

    runs_dir: Annotated[str | None, tyro.conf.Positional, tyro.conf.arg(metavar="RUNS_DIR")] = None
    """the folder that holds the runs (searched recursively for checkpoints *.pt)"""
    curves: tuple[str, ...] = ()
    """curves.csv files of earlier reports: their runs count as runs of RUNS_DIR"""
    out: str | None = None
    """where to write report.md, curves.csv and the PNG curves (default: RUNS_DIR)"""
    methods: tuple[str, ...] = ()
    """the columns (exp_names) in this order; default: every method found, offline runs first"""


def check_report_args(args: ReportArgs) -> str | None:
    """The first argument out of its range, as a message naming it (None if all are valid): every
    check is made before any checkpoint is read."""
    if args.runs_dir is None and not args.curves:
        return "nothing to report: name RUNS_DIR, --curves files, or both"
    if args.runs_dir is not None and not os.path.isdir(args.runs_dir):
        return f"RUNS_DIR: no folder {args.runs_dir}"
    if missing := [path for path in args.curves if not os.path.isfile(path)]:
        return f"--curves: no file {', '.join(missing)}"
    if args.runs_dir is None and args.out is None:
        return "--out is needed without RUNS_DIR: the folder for report.md and the figures"
    if any(not method for method in args.methods):
        return "--methods: a method name is empty"
    if len(set(args.methods)) < len(args.methods):
        return f"--methods names a method twice: {' '.join(args.methods)}"
    out = args.out or args.runs_dir
    problem = unwritable(out)
    return None if problem is None else f"--out {out} (report.md and the curves) cannot be written: {problem}"


def final_score(checkpoint: dict) -> float:
    """A run's result: the mean normalized score of what it deploys at its last evaluation.
    Online: the fine-tuned sub-policy. Offline: the offline choice (`offline_ranking`'s first: the
    improved copy the run chose, else the AM-Q pick); a run without OPE has no choice,
    so it counts the mean over its sub-policies (the expected score of an uninformed pick)."""
    if checkpoint.get("phase") == "online":
        return float(np.mean(checkpoint["history"]["scores"][-1]))
    choice = offline_ranking(checkpoint)[0]
    if not np.isfinite(choice["ope_score"]):
        return float(np.mean(checkpoint["history"]["scores"][-1]))
    return float(np.mean(choice["scores"]))


def history_curve(history: dict) -> tuple[np.ndarray, np.ndarray]:
    """(steps, scores) of a run's evaluations as its checkpoint (or an online baseline's scores.json) keeps them:
    online the episodes' mean; offline the mean over the sub-policies of each one's mean (the offline choice is
    made only at the end, so there is no chosen curve)."""
    means = [np.mean(np.mean(scores, axis=-1)) for scores in history["scores"]]
    return np.array(history["step"], dtype=np.float64), np.array(means, dtype=np.float64)


CURVE_COLUMNS = ["dataset", "method", "phase", "seed", "step", "score", "final_score"]


def write_curves(runs: list[dict], path: str) -> None:
    """curves.csv: a row per evaluation of every run with a curve (`final_score` is the run's score)."""
    with open(path, "w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(CURVE_COLUMNS)
        for run in runs:
            for step, score in zip(*run["curve"]) if run["curve"] is not None else ():
                row = [run["dataset"], run["method"], run["phase"], run["seed"], int(step), score, run["score"]]
                writer.writerow(row)


def read_curves(path: str) -> list[dict]:
    """The runs of a curves.csv (`write_curves`), each with its curve; a malformed file stops the report."""
    runs, points = {}, {}  # per (dataset, method, phase, seed): the run, and its (steps, scores)
    try:
        with open(path, newline="") as file:
            rows = list(csv.DictReader(file))
        for row in rows:
            key = (row["dataset"], row["method"], row["phase"], int(row["seed"]))
            run = dict(zip(("dataset", "method", "phase", "seed"), key))
            runs[key] = run | {"score": float(row["final_score"]), "path": path}
            steps, scores = points.setdefault(key, ([], []))
            steps.append(float(row["step"]))
            scores.append(float(row["score"]))
    except (OSError, KeyError, ValueError, TypeError) as error:
        fail(f"--curves {path}: not a curves.csv of this report ({type(error).__name__}: {error})")
    return [run | {"curve": tuple(np.array(values) for values in points[key])} for key, run in runs.items()]


def read_curve(run_dir: str, tag: str) -> tuple[np.ndarray, np.ndarray] | None:
    """(steps, values) of one scalar from a run's TensorBoard logs, None if it has none."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(run_dir, size_guidance={"scalars": 0})  # 0: keep every point
    accumulator.Reload()
    if tag not in accumulator.Tags().get("scalars", []):
        return None
    events = accumulator.Scalars(tag)
    return np.array([event.step for event in events]), np.array([event.value for event in events])


def collect_runs(runs_dir: str | None, curve_files: tuple[str, ...] = ()) -> tuple[list[dict], list[str]]:
    """Every run of the curves.csv files, then every checkpoint under runs_dir as a run: its dataset (row),
    method (column; the run name's exp_name, else the folder's name), phase, final score and curve (one
    checkpoint = one seed). A checkpoint that `load_checkpoint` refuses (unreadable, a field missing,
    non-finite weights) or whose final score is not finite is skipped, never averaged in: returns (runs, one
    line per skip naming the file and why)."""
    runs, skipped = [run for path in curve_files for run in read_curves(path)], []
    for folder, _, files in sorted(os.walk(runs_dir)) if runs_dir is not None else ():
        if "scores.json" in files:
            # A baseline's run: offline (benchmarks/baselines.py) its final scores; online
            # (benchmarks/sac_online.py) a curve, evaluations at "step", of which the last is its score.
            path = os.path.join(folder, "scores.json")
            try:
                with open(path) as f:
                    saved = json.load(f)
                phase = "online" if "step" in saved else "offline"
                final = saved["scores"][-1] if phase == "online" else saved["scores"]
                score, dataset = float(np.mean(final)), dataset_name(saved["dataset_id"])
                curve = history_curve(saved) if phase == "online" else None
            except (OSError, ValueError, KeyError, TypeError) as error:
                skipped.append(f"skipped: {path}: not a baseline's scores ({type(error).__name__}: {error})")
                continue
            method = os.path.basename(folder).split("__")[1] if folder.count("__") >= 3 else os.path.basename(folder)
            curve = curve if curve is not None else read_curve(folder, "charts/normalized_score")
            runs.append(
                {
                    "dataset": dataset,
                    "method": method,
                    "phase": phase,
                    "score": score,
                    "curve": curve,
                    "seed": saved.get("args", {}).get("seed"),
                    "path": path,
                }
            )
        for name in sorted(file for file in files if file.endswith(".pt") and file != "actor.pt"):
            path = os.path.join(folder, name)
            try:
                checkpoint = load_checkpoint(path)
            except CheckpointError as error:
                skipped.append(f"skipped: {error}")
                continue
            score = final_score(checkpoint)
            if not np.isfinite(score):
                skipped.append(f"skipped: {path}: its final score is {score} (its last evaluation is not finite)")
                continue
            parts = os.path.basename(folder).split("__")
            method = parts[1] if len(parts) == 4 else os.path.basename(folder)
            phase = checkpoint.get("phase", "offline")
            runs.append(
                {
                    "dataset": dataset_name(checkpoint["dataset_id"]),
                    "method": method,
                    "phase": phase,
                    "score": score,
                    "curve": history_curve(checkpoint["history"]),
                    "seed": checkpoint["args"].get("seed"),
                    "path": path,
                }
            )
    return one_run_per_seed(runs, skipped)


def one_run_per_seed(runs: list[dict], skipped: list[str]) -> tuple[list[dict], list[str]]:
    """A run is identified by its dataset, method and seed: where several checkpoints share one (the
    offline and online checkpoints of one run folder, or one seed run twice), one is counted, the
    online phase over the offline one, else the last in folder order (run names end in their start
    time), and a line in `skipped` names both files; a seed is never averaged in twice."""
    kept = {}
    for run in runs:
        key = (run["dataset"], run["method"], run["seed"] if run["seed"] is not None else run["path"])
        if key in kept:
            earlier = kept[key]
            newer = run if (run["phase"] == "online" or earlier["phase"] == "offline") else earlier
            older = earlier if newer is run else run
            skipped.append(
                f"skipped: {older['path']}: the same {run['dataset']} run of {run['method']}, seed {run['seed']}, "
                f"as {newer['path']}, which is counted"
            )
            kept[key] = newer
        else:
            kept[key] = run
    return list(kept.values()), skipped


def report_command(args: ReportArgs) -> str:
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    if (problem := check_report_args(args)) is not None:
        fail(problem)
    runs, skipped = collect_runs(args.runs_dir, args.curves)
    source = " and ".join(([args.runs_dir] if args.runs_dir is not None else []) + list(args.curves))
    for line in skipped:
        print(line)
    if not runs:
        fail(f"no usable checkpoints (*.pt) in {source}" + (f" ({len(skipped)} skipped, see above)" if skipped else ""))
    out = args.out or args.runs_dir
    os.makedirs(out, exist_ok=True)
    write_curves(runs, os.path.join(out, "curves.csv"))
    datasets = sorted({run["dataset"] for run in runs})
    methods = list(args.methods) or list(
        dict.fromkeys(run["method"] for run in sorted(runs, key=lambda run: run["phase"] != "offline"))
    )
    unknown = sorted(set(methods) - {run["method"] for run in runs})
    if unknown:
        fail(
            f"no runs of {', '.join(unknown)} in {source}; methods found: "
            f"{', '.join(sorted({run['method'] for run in runs}))}"
        )
    runs = [run for run in runs if run["method"] in methods]

    # The table in the paper's layout: rows datasets, columns methods, mean +- std over seeds, and
    # a total row (the sum of the means; only for a method with every dataset).
    cells = {(run["dataset"], run["method"]): [] for run in runs}
    for run in runs:
        cells[(run["dataset"], run["method"])].append(run["score"])
    rows = [
        [
            dataset,
            *[
                mean_std_over_seeds(cells[(dataset, method)]) if (dataset, method) in cells else "-"
                for method in methods
            ],
        ]
        for dataset in datasets
    ]
    totals = [
        f"{sum(np.mean(cells[(d, method)]) for d in datasets):.1f}"
        if all((d, method) in cells for d in datasets)
        else "-"
        for method in methods
    ]
    table = markdown_table(["dataset", *methods], rows + [["total", *totals]])
    seeds = {key: len(values) for key, values in cells.items()}
    lines = [
        f"# Report: {source}",
        "",
        "Normalized score (mean +- sample std over seeds) of what each run deploys at its end: online runs, the "
        "fine-tuned sub-policy; offline runs, the offline choice (mean over sub-policies without OPE).",
        "",
        table,
        "",
        "Seeds per cell: " + ", ".join(f"{d} / {m}: {k}" for (d, m), k in sorted(seeds.items())),
    ]
    if skipped:  # the report says what it left out, not only the terminal
        lines += ["", f"Checkpoints left out ({len(skipped)}):", ""] + [
            "- " + line.removeprefix("skipped: ") for line in skipped
        ]

    # Learning curves: one figure per dataset and phase; per method the mean over seeds and a band
    # of +- one std. Evaluations fall at the first iteration past each multiple of --eval-every, so
    # seeds differ by a few steps: they are aligned by evaluation index, at their mean step.
    for dataset in datasets:
        for phase in ("offline", "online"):
            curves = {}
            for run in runs:
                if run["dataset"] == dataset and run["phase"] == phase and run["curve"] is not None:
                    curves.setdefault(run["method"], []).append(run["curve"])
            if not curves:
                continue
            figure, axis = plt.subplots(figsize=(6, 4))
            for method in [method for method in methods if method in curves]:  # the table's column order
                method_curves = curves[method]
                count = min(len(steps) for steps, _ in method_curves)
                steps = np.mean([steps[:count] for steps, _ in method_curves], axis=0)
                values = np.array([values[:count] for _, values in method_curves])
                mean, std = values.mean(0), values.std(0)
                seed_count = f"{len(method_curves)} seed{'s' * (len(method_curves) > 1)}"
                axis.plot(steps, mean, marker="o", markersize=3, label=f"{method} ({seed_count})")
                axis.fill_between(steps, mean - std, mean + std, alpha=0.2)
            axis.set_xlabel("environment steps" if phase == "online" else "gradient steps")
            axis.set_ylabel("normalized score" if phase == "online" else "normalized score, mean over sub-policies")
            axis.set_title(f"{dataset}, {phase}")
            axis.grid(alpha=0.3)
            axis.legend()
            figure.tight_layout()
            # A Minari id that is no D4RL-style name (`test/hopper/random-v0`) has slashes: not in a file name.
            file_name = re.sub(r"[^\w.-]", "-", dataset)
            png = os.path.join(out, f"curves_{file_name}_{phase}.png")
            figure.savefig(png, dpi=120)
            plt.close(figure)
            lines += ["", f"![{dataset} {phase}]({os.path.basename(png)})"]
    report = "\n".join(lines) + "\n"
    with open(os.path.join(out, "report.md"), "w") as file:
        file.write(report)
    print(report)
    print(f"report: {os.path.join(out, 'report.md')}")
    return report


if __name__ == "__main__":
    report_command(tyro.cli(ReportArgs))
