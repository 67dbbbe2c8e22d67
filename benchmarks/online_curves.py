"""Learning curves of uepo_online.py runs: normalized score against environment steps.

    python benchmarks/online_curves.py --runs "UEPO=runs/a/online.pt,runs/b/online.pt" \\
        "PPO from scratch=runs/c/online.pt" --out docs/online_hopper_medium.png

Each entry of `--runs` is `label=checkpoint[,checkpoint...]` (one checkpoint per seed). Prints a markdown
table (mean +- std over seeds at every evaluation, aligned by evaluation index) and
writes a PNG with the mean and a min-max band per label.
"""

import os
import sys
from dataclasses import dataclass, field

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import tyro  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from eval import load_checkpoint  # noqa: E402


@dataclass
class Args:
    runs: list[str] = field(default_factory=list)
    """entries `label=checkpoint[,checkpoint...]`, one per curve, after a single --runs"""
    out: str = "online_curves.png"
    """where to write the PNG"""
    title: str = "hopper-medium (stand-in), online fine-tuning"
    """figure title"""


if __name__ == "__main__":
    args = tyro.cli(Args)
    figure, axis = plt.subplots(figsize=(6, 4))
    for spec in args.runs:
        label, paths = spec.split("=", 1)
        histories = [load_checkpoint(path)["history"] for path in paths.split(",")]
        # Evaluations fall at the first iteration past each multiple of --eval-every, so seeds
        # differ by a few hundred steps: align them by evaluation index, at their mean step.
        count = min(len(h["step"]) for h in histories)
        steps = np.mean([h["step"][:count] for h in histories], axis=0).round().astype(int)
        scores = np.array([[np.mean(s) for s in h["scores"][:count]] for h in histories])
        mean = scores.mean(0)
        axis.plot(steps, mean, label=f"{label} ({len(histories)} seed{'s' if len(histories) > 1 else ''})")
        axis.fill_between(steps, scores.min(0), scores.max(0), alpha=0.2)
        print(f"\n{label}\n| env steps | normalized score |\n|-|-|")
        for step, m, s in zip(steps, mean, scores.std(0)):
            print(f"| {step} | {m:.1f} +- {s:.1f} |")
    axis.set_xlabel("environment steps")
    axis.set_ylabel("normalized score")
    axis.set_title(args.title)
    axis.grid(alpha=0.3)
    axis.legend()
    figure.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    figure.savefig(args.out, dpi=120)
    print(f"\nfigure: {args.out}")
