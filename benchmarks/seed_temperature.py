"""The sub-policies of a saved run with their fixed noises scaled by a temperature s.

    MINARI_DATASETS_PATH=<folder> python benchmarks/seed_temperature.py --checkpoint runs/<run>/offline.pt \\
        --temperatures 0 0.1 0.3 0.5 1

Sub-policy i starts its deterministic DDIM chain at s * eps_i (and its adaptive perturbation uses
s * xi_i): s = 1 is the run as trained, s = 0 makes every sub-policy the chain from x_K = 0.
Every (temperature, sub-policy) is evaluated on the same `--episodes` real episodes (reset seeds
`seed * 1000 + e`, the run's time limit); prints one row per temperature (mean, best, worst of
the sub-policies) and writes them to `--json` if given.
"""

import os
import sys
from dataclasses import dataclass

import numpy as np
import torch
import tyro

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from eval import (  # noqa: E402
    CheckpointError,
    build_saved,
    check_output_file,
    evaluate_saved_task,
    fail,
    load_checkpoint,
    write_json,
)


@dataclass
class Args:
    checkpoint: str
    """an offline checkpoint (offline.pt)"""
    temperatures: tuple[float, ...] = (0.0, 0.1, 0.3, 0.5, 1.0)
    """scales of the fixed noises"""
    episodes: int = 5
    """real episodes per sub-policy and temperature"""
    seed: int = 1
    """episodes are reset with seeds seed * 1000 + e"""
    json: str | None = None
    """also write the rows to this file"""


def scaled(policy, temperature: float):
    """A copy of `policy` whose sub-policies start from temperature * eps_i (perturbation: temperature * xi_i)."""
    copy = build_saved(policy.to_checkpoint(), "the saved policy")
    with torch.no_grad():
        copy.sub_policy_noise.mul_(temperature)
        copy.perturbation_noise.mul_(temperature)
    return copy.eval()


if __name__ == "__main__":
    args = tyro.cli(Args)
    if not args.temperatures or not all(0 <= t <= 10 for t in args.temperatures):
        fail(f"--temperatures must be in [0, 10], got {args.temperatures}")
    if not 1 <= args.episodes <= 1000 or not 0 <= args.seed <= 2**31 - 1:
        fail("--episodes must be in [1, 1000] and --seed in [0, 2^31 - 1]")
    if (problem := check_output_file("--json", args.json, inputs={"--checkpoint": args.checkpoint})) is not None:
        fail(problem)
    try:
        checkpoint = load_checkpoint(args.checkpoint)
        if checkpoint.get("phase") == "online":
            raise CheckpointError(f"{args.checkpoint} is an online checkpoint; an offline one is needed")
        policy = build_saved(checkpoint["policy"], "the saved policy")
    except CheckpointError as error:
        fail(str(error))
    rows = []
    for temperature in args.temperatures:
        scores = evaluate_saved_task(scaled(policy, temperature), checkpoint, args.episodes, args.seed)["scores"]
        per_policy = scores.mean(1)
        rows.append(
            {
                "temperature": temperature,
                "scores": per_policy.tolist(),
                "mean": float(per_policy.mean()),
                "best": float(per_policy.max()),
                "worst": float(per_policy.min()),
            }
        )
        print(
            f"temperature {temperature:g}: mean {per_policy.mean():.1f}, best {per_policy.max():.1f}, "
            f"worst {per_policy.min():.1f}  ({' '.join(f'{s:.1f}' for s in per_policy)})",
            flush=True,
        )
    if args.json:
        write_json(args.json, {"checkpoint": args.checkpoint, "episodes": args.episodes, "rows": rows})
    print(f"the sub-policies' mean over temperatures: {np.round([row['mean'] for row in rows], 1).tolist()}")
