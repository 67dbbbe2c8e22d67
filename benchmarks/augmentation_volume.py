"""The diffusion augmentation at several volumes: the dynamics model's hold-out NLL and AM-Q's
ranking of the sub-policies when the buffer holds 0, 0.5, 1 or 2 x |D| synthetic transitions.

For each offline checkpoint (a `uepo_offline.py` run with `--ope`) and each ratio, a fresh dynamics
ensemble is trained exactly as the offline loop trains it (`dynamics_update` on real + synthetic
batches, elites re-chosen every `--elite-every`, the buffer refreshed by `refresh_augmentation`
after `--dynamics-warmup` and every `--augment-every`), with two differences: the buffer is
filled up to its cap (`--augment-starts` = 2 x cap / `--augment-horizon` start states, so the
disagreement filter cannot keep it below the cap), and its actions come from the checkpoint's
final sub-policies (the loop uses the sub-policies of the step it refreshes at). The critics are
the checkpoint's (they learn from real data only), so AM-Q differs only through the model.
Reported per run: the buffer's size, the elites' NLL and MSE on the real hold-out split, and
Spearman(AM-Q, real scores) with the real scores saved in the checkpoint.

    MINARI_DATASETS_PATH=<folder> python benchmarks/augmentation_volume.py \\
        --checkpoints runs/<run seed 1>/offline.pt runs/<run seed 2>/offline.pt runs/<run seed 3>/offline.pt
"""

import json
import math
import os
import sys
import time
from dataclasses import dataclass, replace

import numpy as np
import torch
import tyro

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import uepo_offline as offline  # noqa: E402
from eval import fail, load_or_fail, mean_std_over_seeds, spearman_correlation  # noqa: E402


@dataclass
class Args:
    checkpoints: list[str]
    """offline checkpoints (uepo_offline.py with --ope), one per seed"""
    ratios: tuple[float, ...] = (0.0, 0.5, 1.0, 2.0)
    """buffer caps to measure, in multiples of the dataset's size |D|"""
    steps: int | None = None
    """dynamics updates per run (default: the checkpoint's --total-steps, as in its loop)"""
    json: str | None = None
    """also write every run's numbers to this JSON file"""


def starts_for_volume(ratio: float, num_transitions: int, horizon: int) -> int:
    """Start states that let a refresh fill a buffer of ratio x |D|: twice the cap over the
    rollout length, so that rollouts cut short by the disagreement filter still reach it."""
    return math.ceil(2 * ratio * num_transitions / horizon)


def train_dynamics(run: offline.Args, policy, models, tensors, train_index, holdout, augmented, is_terminal):
    """The offline loop's dynamics part alone (the same update, elite choice and refresh schedule),
    from `offline_models`' empty augmentation buffer; returns the buffer's size after each refresh."""
    sizes = []
    for step in range(1, run.total_steps + 1):
        offline.dynamics_update(models, tensors.transitions, augmented, train_index, step, run)
        refresh = offline.augment_now(step, run)
        if refresh or step % run.elite_every == 0:
            models.dynamics.select_elites(*holdout)
        if refresh:
            augmented, _ = offline.refresh_augmentation(
                policy, models, holdout, tensors.raw_histories, is_terminal, run
            )
            sizes.append(len(augmented["states"]))
    return sizes


def measure(checkpoint: dict, ratios, steps: int | None, **overrides) -> list[dict]:
    """One checkpoint: a fresh dynamics model per ratio, its hold-out NLL/MSE and AM-Q ranking.
    `overrides`: offline arguments to change from the checkpoint's (e.g. `aug_kl_quantile`)."""
    run = replace(offline.Args(**checkpoint["args"]), **overrides)
    if steps is not None:
        run = replace(run, total_steps=steps)
    policy, tensors, is_terminal = offline.saved_run_data(checkpoint, run)
    real = np.asarray(checkpoint["history"]["scores"][-1]).mean(1)
    results = []
    for ratio in ratios:
        start = time.time()
        run_r = replace(
            run,
            augment_ratio=ratio,
            augment_starts=max(1, starts_for_volume(ratio, len(tensors.chunks), run.augment_horizon)),
        )
        models, train_index, holdout, ope, augmented = offline.offline_models(
            run_r, policy.config, tensors, is_terminal, torch.device("cpu")
        )
        models.critics.load_state_dict(checkpoint["critics"]["state_dict"])
        sizes = train_dynamics(run_r, policy, models, tensors, train_index, holdout, augmented, is_terminal)
        scores = ope.scores(policy, holdout)
        results.append(
            {
                "seed": run.seed,
                "ratio": ratio,
                "cap": int(ratio * len(tensors.chunks)),
                "buffer_sizes": sizes,
                "holdout_nll": scores["dynamics_holdout_nll"],
                "holdout_mse": scores["dynamics_holdout_mse"],
                "ope_scores": scores["ope_scores"],
                "real_scores": real.tolist(),
                "spearman": spearman_correlation(scores["ope_scores"], real),
                "pick_real": float(real[int(np.argmax(scores["ope_scores"]))]),
                "minutes": (time.time() - start) / 60,
            }
        )
        row = results[-1]
        print(
            f"seed {run.seed} ratio {ratio}: buffer {sizes} (cap {row['cap']}), hold-out NLL "
            f"{row['holdout_nll']:.3f}, MSE {row['holdout_mse']:.4f}, Spearman {row['spearman']:.2f}, "
            f"AM-Q's pick scores {row['pick_real']:.1f} ({row['minutes']:.1f} min)",
            flush=True,
        )
    return results


if __name__ == "__main__":
    args = tyro.cli(Args)
    torch.set_num_threads(1)
    runs = []
    for path in args.checkpoints:
        checkpoint = load_or_fail(path)
        if "critics" not in checkpoint:
            fail(f"{path} has no critics and dynamics model: run uepo_offline.py with --ope")
        runs += measure(checkpoint, args.ratios, args.steps)
    print("| buffer cap (x |D|) | hold-out NLL | Spearman(AM-Q, real) | AM-Q's pick (real) |")
    print("|---|---|---|---|")
    for ratio in args.ratios:
        rows = [run for run in runs if run["ratio"] == ratio]
        print(
            f"| {ratio} | {mean_std_over_seeds([r['holdout_nll'] for r in rows], 2)} | "
            f"{mean_std_over_seeds([r['spearman'] for r in rows], 2)} | "
            f"{mean_std_over_seeds([r['pick_real'] for r in rows])} |"
        )
    if args.json:
        with open(args.json, "w") as file:
            json.dump(runs, file, indent=1)
