"""Why AM-Q ranks a checkpoint's sub-policies as it does: the model and the critic along the way.

For each sub-policy of an offline checkpoint (`uepo_offline.py` with `--ope`), beside its real
score (saved in the checkpoint):
- AM-Q, recomputed exactly as the run scored it, and the reward per step the **model** predicts
  along those same rollouts; against the reward per step of one **real** episode. A model that
  predicts the data's pace for a policy that does not keep it makes every score built on it blind;
- the model's one-step error along that real episode (the elites' mean prediction of s_{t+1} from
  the real s_t, a_t; MSE per entry, raw units), against its error on the real hold-out split: how
  far off the data the policy's own states are for the model;
- the spread of the mean Q per rollout (AM-Q averages it over the rollouts).
Ends with Spearman(score, real) for AM-Q and for the model's reward per step.

    MINARI_DATASETS_PATH=<folder> python benchmarks/ope_diagnosis.py --checkpoint runs/<run>/offline.pt
"""

import os
import sys
from dataclasses import dataclass

import gymnasium as gym
import numpy as np
import torch
import tyro

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import uepo_offline as offline  # noqa: E402
from diffusion import DiffusionPolicy  # noqa: E402
from dynamics import am_q_ratio  # noqa: E402
from eval import fail, load_or_fail, spearman_correlation  # noqa: E402


@dataclass
class Args:
    checkpoint: str
    """offline checkpoint (uepo_offline.py with --ope)"""
    seed: int | None = None
    """the real episode is reset with seed `seed * 1000` (default: the run's seed, its first evaluation episode)"""


@torch.no_grad()
def model_reward_per_step(ope: offline.SubPolicyOPE, policy: DiffusionPolicy, sub_policy: int) -> float:
    """The mean reward the model predicts per alive step along `ope`'s AM-Q rollouts of one
    sub-policy: the same start states, model noise and stopping rule as `dynamics.am_q_rollouts`."""
    generator = torch.Generator(device=ope.start_histories.device).manual_seed(ope.seed)
    histories = ope.start_histories.clone()
    alive = torch.ones(len(histories), dtype=torch.bool, device=histories.device)
    total, count, steps = 0.0, 0, 0
    while steps < ope.horizon and alive.any():
        chunks = policy.unscale_actions(policy.sample(policy.normalize_states(histories)).actions[:, sub_policy])
        for action in chunks.unbind(dim=1):
            next_states, rewards = ope.dynamics.sample_step(histories[:, -1], action, generator=generator)
            total, count = total + (rewards * alive).sum().item(), count + int(alive.sum())
            alive &= ~torch.as_tensor(ope.is_terminal(next_states), device=alive.device)
            histories = torch.cat([histories[:, 1:], next_states[:, None]], dim=1)
        steps += chunks.shape[1]
    return total / max(count, 1)


@torch.no_grad()
def real_episode(policy: DiffusionPolicy, sub_policy: int, env_id: str, max_steps: int, seed: int) -> dict:
    """One real episode of a sub-policy (whole chunks, as the run evaluates): states, actions,
    next states and rewards, (T, S), (T, A), (T, S), (T,)."""
    env = gym.make(env_id, max_episode_steps=max_steps)
    observation, _ = env.reset(seed=seed)
    history = [observation] * policy.config.obs_horizon
    steps = {"states": [], "actions": [], "next_states": [], "rewards": []}
    done = False
    while not done:
        states = torch.as_tensor(np.array(history[-policy.config.obs_horizon :]), dtype=torch.float32)[None]
        chunk = policy.unscale_actions(policy.sample(policy.normalize_states(states)).actions[:, sub_policy])[0]
        for action in chunk.numpy():
            next_observation, reward, terminated, truncated, _ = env.step(action)
            for key, value in zip(steps, (observation, action, next_observation, reward)):
                steps[key].append(value)
            observation, done = next_observation, terminated or truncated
            history.append(observation)
            if done:
                break
    env.close()
    return {key: torch.as_tensor(np.array(values), dtype=torch.float32) for key, values in steps.items()}


@torch.no_grad()
def one_step_mse(dynamics, states, actions, next_states) -> float:
    """The elites' mean prediction of the next state against the real one, MSE per entry (raw units)."""
    mean, _ = dynamics(states, actions)
    predicted = states[None] + mean[dynamics.elite_indices, :, : dynamics.obs_dim]
    return ((predicted - next_states[None]) ** 2).mean().item()


if __name__ == "__main__":
    args = tyro.cli(Args)
    torch.set_num_threads(1)
    checkpoint = load_or_fail(args.checkpoint)
    if "critics" not in checkpoint:
        fail(f"{args.checkpoint} has no critics and dynamics model: run uepo_offline.py with --ope")
    run = offline.Args(**checkpoint["args"])
    policy, tensors, is_terminal = offline.saved_run_data(checkpoint, run)
    ope, holdout = offline.saved_run_ope(checkpoint, run, policy, tensors, is_terminal)
    holdout_mse = one_step_mse(ope.dynamics, holdout[0], holdout[1], holdout[2])
    real = np.asarray(checkpoint["history"]["scores"][-1]).mean(1)
    seed = (run.seed if args.seed is None else args.seed) * 1000
    print(f"model's one-step MSE on the real hold-out split: {holdout_mse:.4f}")
    print(
        "| sub-policy | real score | AM-Q | mean Q per rollout (min, max) | reward/step: model (AM-Q rollouts) "
        "| reward/step: real episode | one-step MSE along the real episode |"
    )
    print("|---|---|---|---|---|---|---|")
    am_q, model_rewards = [], []
    for i in range(policy.config.n_subpolicies):
        sums, counts = ope.rollouts(policy, i)
        am_q.append(am_q_ratio(sums, counts).item())
        model_rewards.append(model_reward_per_step(ope, policy, i))
        episode = real_episode(policy, i, checkpoint["env_id"], checkpoint["max_episode_steps"], seed)
        error = one_step_mse(ope.dynamics, episode["states"], episode["actions"], episode["next_states"])
        per_start = (sums / counts.clamp(min=1)).numpy()
        print(
            f"| {i} | {real[i]:.1f} | {am_q[-1]:.1f} | {per_start.min():.1f}, {per_start.max():.1f} | "
            f"{model_rewards[-1]:.2f} | {episode['rewards'].mean().item():.2f} | {error:.4f} |",
            flush=True,
        )
    print(
        f"Spearman with the real scores: AM-Q {spearman_correlation(am_q, real):+.2f}, "
        f"model reward per step {spearman_correlation(model_rewards, real):+.2f}"
    )
