"""Offline scorers of a saved run's sub-policies beside AM-Q: which one ranks them, and what its
choice would cost.

    MINARI_DATASETS_PATH=<folder> python benchmarks/scorers.py --checkpoint runs/<run>/offline.pt

For every sub-policy of an offline checkpoint (`uepo_offline.py` with `--ope`), with the run's
critics and dynamics model (elites re-chosen on the same real hold-out split):
- `am_q`: AM-Q as the run scored it at its last evaluation (recorded);
- `critic`: the mean Q(s, pi_i(s)) of the sub-policy's chunks at `--critic-states` dataset states,
  no model (a critic-only score);
- `model_return`: the model's return over the data's time limit from `--episode-starts` dataset
  episode starts (the offline choice's score);
- `mopo_return`: the same rollouts' rewards penalized by the gate's uncertainty, r - lambda u(s, a)
  with lambda = `--penalty` (MOPO's penalized MDP);
- `short_return`: the model's return over `--short-steps` steps from `--short-states` dataset
  states (short rollouts from many states, where the model stays near its data).
Each is compared with the real scores the run recorded at its last evaluation: Spearman, and the
regret of its choice (the best real score minus the real score of the sub-policy it ranks first).
"""

import os
import sys
from dataclasses import dataclass

import numpy as np
import torch
import tyro

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import uepo_offline as offline  # noqa: E402
from dynamics import am_q_ratio, model_rollout  # noqa: E402
from eval import check_output_file, fail, load_or_fail, spearman_correlation, write_json  # noqa: E402

SCORERS = ("am_q", "critic", "model_return", "mopo_return", "short_return")


@dataclass
class Args:
    checkpoint: str
    """offline checkpoint (uepo_offline.py with --ope)"""
    critic_states: int = 4096
    """dataset states of the critic-only score"""
    episode_starts: int = 64
    """dataset episode starts of the whole-episode model returns"""
    penalty: float = 1.0
    """lambda of the penalized return (the gate's --ope-penalty)"""
    short_states: int = 1024
    """dataset states of the short model rollouts"""
    short_steps: int = 48
    """environment steps of each short rollout"""
    seed: int = 0
    """seed of the state draws and the model's noise"""
    json: str | None = None
    """also write the scores and the summary to this file"""


@torch.no_grad()
def rollout_returns(ope: offline.SubPolicyOPE, policy, sub_policy: int, starts, steps: int, penalty: float, seed: int):
    """(the model's return, its uncertainty-penalized return) per start, one model rollout."""
    generator = torch.Generator().manual_seed(seed)
    chunk_policy = ope.chunk_policy(policy, sub_policy)
    rollout = model_rollout(chunk_policy, ope.dynamics, ope.is_terminal, starts, steps, generator)
    alive = torch.stack(rollout["alive"]).float()
    rewards = torch.stack(rollout["rewards"])
    uncertainty = torch.stack([ope.dynamics.uncertainty(s, a) for s, a in zip(rollout["states"], rollout["actions"])])
    return (rewards * alive).sum(0), ((rewards - penalty * uncertainty) * alive).sum(0)


def regret(scores, real) -> float:
    """The best real score minus the real score of the candidate `scores` ranks first."""
    return float(np.max(real) - real[int(np.argmax(scores))])


def ranking_summary(scores: dict, real) -> dict:
    """Per scorer (name -> one score per candidate): its pick, the pick's real score, Spearman with
    the real scores and the regret of the pick."""
    real = np.asarray(real)
    return {
        name: {
            "pick": int(np.argmax(values)),
            "pick_real": float(real[int(np.argmax(values))]),
            "spearman": spearman_correlation(values, real),
            "regret": regret(values, real),
        }
        for name, values in scores.items()
    }


def model_scores(ope: offline.SubPolicyOPE, policy, sub_policy: int, starts, steps: int, penalty: float, seed: int):
    """One sub-policy's AM-Q as the run scores it, and its mean model return from `starts` over
    `steps`, plain and penalized (`rollout_returns`): {"am_q", "model_return", "mopo_return"}."""
    whole, penalized = rollout_returns(ope, policy, sub_policy, starts, steps, penalty, seed)
    return {
        "am_q": am_q_ratio(*ope.rollouts(policy, sub_policy)).item(),
        "model_return": whole.mean().item(),
        "mopo_return": penalized.mean().item(),
    }


def load_saved_run(path: str):
    """An offline checkpoint with critics and a model, its run's policy and data, and its AM-Q as the
    run scored it (`uepo_offline.saved_run_ope`); any other file ends the script with one line.
    Returns (checkpoint, policy, tensors, ope)."""
    checkpoint = load_or_fail(path)
    if "critics" not in checkpoint or checkpoint.get("phase") == "online":
        fail(f"{path} is not an offline checkpoint with critics and a model (uepo_offline.py --ope)")
    run = offline.Args(**checkpoint["args"])
    policy, tensors, is_terminal = offline.saved_run_data(checkpoint, run)
    ope, _ = offline.saved_run_ope(checkpoint, run, policy, tensors, is_terminal)
    return checkpoint, policy, tensors, ope


if __name__ == "__main__":
    args = tyro.cli(Args)
    for name in ("critic_states", "episode_starts", "short_states", "short_steps"):
        if not 1 <= getattr(args, name) <= 100_000:
            fail(f"--{name.replace('_', '-')} must be in [1, 100000], got {getattr(args, name)}")
    if not 0 <= args.penalty <= 1e6:
        fail(f"--penalty must be in [0, 1e6], got {args.penalty}")
    if (problem := check_output_file("--json", args.json, inputs={"--checkpoint": args.checkpoint})) is not None:
        fail(problem)
    torch.set_num_threads(1)
    checkpoint, policy, tensors, ope = load_saved_run(args.checkpoint)
    generator = torch.Generator().manual_seed(args.seed)
    draw = lambda count, total: torch.randperm(total, generator=generator)[:count]
    critic_index = draw(args.critic_states, len(tensors.states))
    episode_starts = tensors.episode_starts[draw(args.episode_starts, len(tensors.episode_starts))]
    short_starts = tensors.raw_histories[draw(args.short_states, len(tensors.raw_histories))]
    time_limit = checkpoint["max_episode_steps"] or 1000

    real = np.asarray(checkpoint["history"]["scores"][-1]).mean(1)
    scores = {name: [] for name in SCORERS}
    scores["am_q"] = list(checkpoint["history"]["ope_scores"][-1])
    with torch.no_grad():
        chunks = policy.sample(tensors.states[critic_index]).actions  # (B, n, H, A), every sub-policy at once
    print("| sub-policy | real | AM-Q | critic | model return | penalized return | short return |\n|-|-|-|-|-|-|-|")
    for i in range(policy.config.n_subpolicies):
        with torch.no_grad():
            scores["critic"].append(ope.critics.q(tensors.states[critic_index, -1], chunks[:, i]).mean().item())
        whole, penalized = rollout_returns(ope, policy, i, episode_starts, time_limit, args.penalty, args.seed)
        short, _ = rollout_returns(ope, policy, i, short_starts, args.short_steps, args.penalty, args.seed)
        scores["model_return"].append(whole.mean().item())
        scores["mopo_return"].append(penalized.mean().item())
        scores["short_return"].append(short.mean().item())
        row = " | ".join(f"{scores[name][i]:.1f}" for name in SCORERS)
        print(f"| {i} | {real[i]:.1f} | {row} |", flush=True)
    summary = ranking_summary(scores, real)
    for name, values in summary.items():
        print(f"{name}: Spearman {values['spearman']:+.2f}, regret {values['regret']:.1f}")
    if args.json:
        write_json(
            args.json, {"checkpoint": args.checkpoint, "real": real.tolist(), "scores": scores, "summary": summary}
        )
