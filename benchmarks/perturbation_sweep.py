"""Sweep of the adaptive perturbation (`--tau`, `--eta`) on a trained offline checkpoint.

The perturbation acts only while sampling, so one trained model (best trained with `--eta 0`)
serves every setting. For each (tau, eta): every sub-policy's normalized score over real
episodes and the sub-policies' mean pairwise / nearest kinematic divergence on dataset states.
The tau grid defaults to quantiles of the nearest divergence d_i of the unperturbed
sub-policies, so it adapts to the data's scale.

    MINARI_DATASETS_PATH=<folder> python benchmarks/perturbation_sweep.py \\
        --checkpoint runs/<run>/offline.pt --episodes 5

`<folder>` is your Minari datasets folder, the one that holds the checkpoint's dataset.
"""

import os
import sys
from dataclasses import dataclass

import numpy as np
import torch
import tyro

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from diffusion import DiffusionPolicy  # noqa: E402
from divergence import mean_pairwise_divergence, nearest_divergence  # noqa: E402
from eval import dataset_state_histories, evaluate_saved_task, load_checkpoint  # noqa: E402


@dataclass
class Args:
    checkpoint: str
    """offline checkpoint (uepo_offline.py)"""
    tau_quantiles: tuple[float, ...] = (0.25, 0.5, 0.75)
    """tau values: these quantiles of the unperturbed nearest divergence d_i on dataset states"""
    etas: tuple[float, ...] = (0.1, 0.2, 0.5)
    """eta values (largest perturbation std, [-1, 1] action units)"""
    episodes: int = 5
    """episodes per sub-policy and setting"""
    states: int = 512
    """dataset states for the divergence statistics"""
    seed: int = 0
    """evaluation episodes are reset with seeds seed*1000 + e"""


def divergence_stats(policy, states):
    with torch.no_grad():
        actions = policy.sample(states).actions
    return mean_pairwise_divergence(actions).mean().item(), nearest_divergence(actions)


if __name__ == "__main__":
    args = tyro.cli(Args)
    checkpoint = load_checkpoint(args.checkpoint)
    policy = DiffusionPolicy.from_checkpoint(checkpoint["policy"]).eval()
    config = policy.config
    histories = dataset_state_histories(checkpoint["dataset_id"], args.states, config.obs_horizon, args.seed)
    states = policy.normalize_states(torch.as_tensor(histories, dtype=torch.float32))

    config.eta = 0.0
    base_mean, base_nearest = divergence_stats(policy, states)
    taus = [float(np.quantile(base_nearest.numpy(), q)) for q in args.tau_quantiles]
    print(
        f"unperturbed: mean pairwise divergence {base_mean:.3f}; nearest divergence d_i quantiles "
        + ", ".join(f"q{q:.2f}={t:.3f}" for q, t in zip(args.tau_quantiles, taus))
    )

    settings = [(taus[0], 0.0)] + [(tau, eta) for tau in taus for eta in args.etas]
    print("| tau | eta | mean pairwise div | mean score | best | worst | scores per sub-policy |")
    print("|---|---|---|---|---|---|---|")
    for tau, eta in settings:
        config.tau, config.eta = tau, eta
        mean_divergence, _ = divergence_stats(policy, states)
        result = evaluate_saved_task(policy, checkpoint, args.episodes, args.seed)
        scores = result["scores"].mean(1)
        tau_text = f"{tau:.3f}" if eta > 0 else "-"
        print(
            f"| {tau_text} | {eta} | {mean_divergence:.3f} | {scores.mean():.1f} | {scores.max():.1f} | "
            f"{scores.min():.1f} | {' '.join(f'{s:.0f}' for s in scores)} |",
            flush=True,
        )
