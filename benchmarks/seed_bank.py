"""A larger bank of fixed seeds for a saved run's diffusion policy, with the offline scorers
choosing among them: does a bigger bank hold better sub-policies, and does the choice find them?

    MINARI_DATASETS_PATH=<folder> python benchmarks/seed_bank.py --checkpoint runs/<run>/offline.pt --groups 4

The bank is `--groups` groups of n seeds (n = the run's sub-policies): group 0 is the run's own
seeds, every further group n fresh draws of the start noise eps_i and the perturbation noise xi_i
(from a generator seeded `--bank-seed * 1000 + g`). Each group is sampled as the run sampled its n
sub-policies (the adaptive perturbation couples the n chains of a group), so group 0 is the run's
sub-policies exactly and every other group is n more sub-policies of the same trained model.

Every sub-policy of the bank is scored by the run's AM-Q (its start states, model noise, critics and
model), by the model's return over the time limit from `--episode-starts` dataset episode starts
penalized by the gate's uncertainty (MOPO; benchmarks/scorers.py), and on `--episodes` real episodes
(reset seeds `seed * 1000 + e`). Prints each scorer's pick, Spearman and regret on the run's own n
seeds and on the whole bank; writes everything to `--json`.
"""

import os
import sys
from dataclasses import dataclass

import numpy as np
import torch
import tyro

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from scorers import load_saved_run, model_scores, ranking_summary  # noqa: E402  (this folder is on the path when run as a script)

from eval import (  # noqa: E402
    build_saved,
    check_output_file,
    evaluate_saved_task,
    fail,
    write_json,
)

SCORERS = ("am_q", "mopo_return")


@dataclass
class Args:
    checkpoint: str
    """offline checkpoint with critics and a model (uepo_offline.py with --ope)"""
    groups: int = 4
    """groups of n seeds in the bank (group 0: the run's own)"""
    bank_seed: int = 1
    """seed of the fresh groups' noises"""
    episodes: int = 10
    """real episodes per sub-policy"""
    episode_starts: int = 64
    """dataset episode starts of the penalized model return"""
    penalty: float = 1.0
    """lambda of the penalized model return"""
    seed: int = 1
    """episodes are reset with seeds seed * 1000 + e; seed of the episode starts and the model's noise"""
    json: str | None = None
    """also write the scores and the summary to this file"""


def seed_group(policy, group: int, bank_seed: int):
    """A copy of `policy` with group `group`'s seeds: its own for group 0, fresh draws otherwise."""
    copy = build_saved(policy.to_checkpoint(), "the saved policy").eval()
    if group > 0:
        generator = torch.Generator().manual_seed(bank_seed * 1000 + group)
        with torch.no_grad():
            copy.sub_policy_noise.copy_(torch.randn(copy.sub_policy_noise.shape, generator=generator))
            copy.perturbation_noise.copy_(torch.randn(copy.perturbation_noise.shape, generator=generator))
    return copy


if __name__ == "__main__":
    args = tyro.cli(Args)
    for name, low, high in (("groups", 1, 64), ("episodes", 1, 1000), ("episode_starts", 1, 10_000)):
        if not low <= getattr(args, name) <= high:
            fail(f"--{name.replace('_', '-')} must be in [{low}, {high}], got {getattr(args, name)}")
    if not (0 <= args.penalty <= 1e6 and 0 <= args.seed <= 2**31 - 1 and 0 <= args.bank_seed <= 2**20):
        fail("--penalty must be in [0, 1e6], --seed in [0, 2^31 - 1] and --bank-seed in [0, 2^20]")
    if (problem := check_output_file("--json", args.json, inputs={"--checkpoint": args.checkpoint})) is not None:
        fail(problem)
    torch.set_num_threads(1)
    checkpoint, policy, tensors, ope = load_saved_run(args.checkpoint)
    generator = torch.Generator().manual_seed(args.seed)
    starts = tensors.episode_starts[torch.randperm(len(tensors.episode_starts), generator=generator)]
    starts = starts[: args.episode_starts]
    time_limit = checkpoint["max_episode_steps"] or 1000
    n = policy.config.n_subpolicies

    real, scores = [], {name: [] for name in SCORERS}
    for group in range(args.groups):
        bank = seed_group(policy, group, args.bank_seed)
        group_real = evaluate_saved_task(bank, checkpoint, args.episodes, args.seed)["scores"].mean(1)
        real.extend(group_real.tolist())
        for i in range(n):
            row = model_scores(ope, bank, i, starts, time_limit, args.penalty, args.seed)
            for name in SCORERS:
                scores[name].append(row[name])
        print(f"group {group}: real {np.round(group_real, 1).tolist()}", flush=True)
    real = np.asarray(real)
    own = ranking_summary({name: values[:n] for name, values in scores.items()}, real[:n])
    whole = ranking_summary(scores, real)
    print(
        f"bank of {len(real)}: mean {real.mean():.1f}, best {real.max():.1f}; "
        f"the run's own {n}: best {real[:n].max():.1f}"
    )
    for name in SCORERS:
        print(
            f"{name}: own seeds pick {own[name]['pick']} ({own[name]['pick_real']:.1f}, Spearman "
            f"{own[name]['spearman']:+.2f}); bank picks {whole[name]['pick']} ({whole[name]['pick_real']:.1f}, "
            f"Spearman {whole[name]['spearman']:+.2f}, regret {whole[name]['regret']:.1f})"
        )
    if args.json:
        write_json(
            args.json,
            {
                "checkpoint": args.checkpoint,
                "episodes": args.episodes,
                "real": real.tolist(),
                "scores": scores,
                "own": own,
                "bank": whole,
            },
        )
