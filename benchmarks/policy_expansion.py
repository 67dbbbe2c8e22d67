"""Policy expansion (PEX, arXiv 2302.00935) of the offline choice beside a fresh SAC actor: a probe, not kept.

    MINARI_DATASETS_PATH=<folder> python benchmarks/policy_expansion.py --checkpoint runs/<run>/offline.pt

The set: the sub-policy that `uepo_online.py` selects (frozen, deployed as in evaluation: open-loop chunks
planned from its state history, re-planned every chunk_size steps whichever member acted) and a fresh
per-step SAC actor (`benchmarks/sac_online.py`'s networks and update, no dataset rows in its batches).
Every step each member proposes an action and the critic, min(Q1, Q2), picks one:
- `--collect set`: Boltzmann over the two Q values at inverse temperature `--inv-temperature` (PEX's);
  `--collect new`: the SAC actor alone (SAC from scratch's data; the set is used in evaluation only);
- before `--learning-starts`: `--warmup mix` the sub-policy or a uniform random action, 50/50 (PEX's),
  `--warmup sub-policy` the sub-policy alone, `--warmup random` a uniform random action (SAC's);
- `--set-target`: the critic's target bootstraps from the set, max(Q'(s', a' ~ pi) - alpha log pi,
  Q'(s', the sub-policy's next action)), instead of from the SAC actor alone.
Evaluation: the larger Q every step (the sub-policy alone at step 0, which is the hand-over), on
`--eval-episodes` episodes reset with seeds `seed * 1000 + e`, printed with the share of steps that
took the SAC actor's action; TensorBoard and scores.json in runs/{run_name}/. Results and the reason
it is not kept: docs/experiments.md, "Policy expansion".
"""

import json
import os
import random
import sys
import time
from collections import deque
from dataclasses import asdict, dataclass
from typing import Literal

import gymnasium as gym
import numpy as np
import torch
import tyro
from torch.utils.tensorboard import SummaryWriter

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import eval  # noqa: E402
import uepo_online  # noqa: E402
from benchmarks.sac_online import min_q, mixed_batch, sac_nets, sac_update  # noqa: E402


@dataclass
class Args:
    checkpoint: str = ""
    """the offline checkpoint whose selected sub-policy joins the set"""
    exp_name: str = "policy_expansion"
    """the run's method name (its folder)"""
    seed: int = 1
    """seed of the selection episodes, the networks, the environment and the evaluation episodes"""
    total_timesteps: int = 250_000
    """environment steps"""
    learning_starts: int = 5000
    """warm-up steps (--warmup) before the first update"""
    collect: Literal["set", "new"] = "set"
    """who acts while collecting: the Q pick of the set, or the SAC actor alone"""
    warmup: Literal["mix", "sub-policy", "random"] = "mix"
    """who acts before --learning-starts"""
    inv_temperature: float = 10.0
    """inverse temperature of the Boltzmann pick while collecting"""
    set_target: bool = False
    """if toggled, the critic's target bootstraps from the better member of the set"""
    eval_every: int = 25_000
    """environment steps between evaluations (and one at step 0)"""
    eval_episodes: int = 10
    """episodes per evaluation"""


class FrozenSubPolicy:
    """The selected sub-policy as deployed, for `count` environments in lockstep: every env's state
    history, and the chunk planned for all of them at the last re-plan."""

    def __init__(self, policy, sub_policy: int, count: int):
        self.policy, self.sub_policy = policy, sub_policy
        self.histories = [deque(maxlen=policy.history_size) for _ in range(count)]
        self.plans, self.planned_for, self.position = None, [], 0

    def reset(self, k: int, obs) -> None:
        self.histories[k].extend([obs] * self.policy.history_size)

    def actions(self, ids) -> np.ndarray:
        """The sub-policy's action in every env of `ids` (a new plan at the start of every chunk)."""
        if self.position == 0:
            histories = np.stack([np.stack(self.histories[k]) for k in ids])
            self.plans, self.planned_for = self.policy.act(histories)[:, self.sub_policy], list(ids)
        return self.plans[[self.planned_for.index(k) for k in ids], self.position]

    def step(self, observations: dict) -> None:
        """After one environment step: the new observation of every env in `observations`, the next position."""
        for k, obs in observations.items():
            self.histories[k].append(obs)
        self.position = (self.position + 1) % self.policy.chunk_size


@torch.no_grad()
def evaluate(nets: dict, frozen_args: tuple, task: dict, episodes: int, seed: int, sub_policy_only: bool):
    """Normalized scores of the set (the larger Q every step), or of the sub-policy alone; the SAC actor's share."""
    envs = [gym.make(task["gym_id"], max_episode_steps=task["max_episode_steps"]) for _ in range(episodes)]
    frozen = FrozenSubPolicy(*frozen_args, episodes)
    obs = [env.reset(seed=seed + e)[0] for e, env in enumerate(envs)]
    for k in range(episodes):
        frozen.reset(k, obs[k])
    live, returns, new_shares = np.ones(episodes, bool), np.zeros(episodes), []
    while live.any():
        ids = np.flatnonzero(live)
        actions = torch.as_tensor(frozen.actions(ids), dtype=torch.float32)
        if not sub_policy_only:
            states = torch.as_tensor(np.stack([obs[k] for k in ids]), dtype=torch.float32)
            new = nets["actor"].mean_action(states)
            pick_new = min_q(nets["q1"], nets["q2"], states, new) > min_q(nets["q1"], nets["q2"], states, actions)
            actions = torch.where(pick_new[:, None], new, actions)
            new_shares.append(pick_new.float().mean().item())
        for row, k in enumerate(ids):
            obs[k], reward, terminated, truncated, _ = envs[k].step(actions[row].numpy())
            returns[k] += reward
            live[k] = not (terminated or truncated)
        frozen.step({k: obs[k] for k in ids})
    for env in envs:
        env.close()
    scores = eval.normalized_score(returns, task["ref_min_score"], task["ref_max_score"])
    return scores, float(np.mean(new_shares)) if new_shares else 0.0


def choose_action(args: Args, global_step: int, nets: dict, env, state: torch.Tensor, sub_policy_action) -> tuple:
    """The collected action (env units) and whether the SAC actor's (or the random) proposal was taken."""
    if global_step < args.learning_starts:  # the SAC actor is untrained: a uniform random action instead
        new = torch.as_tensor(env.action_space.sample(), dtype=torch.float32)[None]
        take_new = args.warmup == "random" or (args.warmup == "mix" and np.random.rand() < 0.5)
    else:
        new = nets["actor"].sample(state)[0]
        draw = np.random.rand()  # drawn in both modes: the numpy stream, so the runs, stay as measured
        if args.collect == "new":
            return new[0].numpy(), True
        q = torch.stack([min_q(nets["q1"], nets["q2"], state, a) for a in (sub_policy_action, new)], -1)[0]
        take_new = draw < torch.softmax(args.inv_temperature * q, 0)[1].item()
    return (new if take_new else sub_policy_action)[0].numpy(), take_new


if __name__ == "__main__":
    args = tyro.cli(Args)
    try:
        checkpoint = eval.load_checkpoint(args.checkpoint, "offline")
    except eval.CheckpointError as error:
        eval.fail(str(error))
    task = {key: checkpoint[key] for key in ("gym_id", "max_episode_steps", "ref_min_score", "ref_max_score")}
    online_args = uepo_online.with_algo_defaults(uepo_online.Args(checkpoint=args.checkpoint, seed=args.seed))
    policy, sub_policy, table = uepo_online.select_sub_policy(online_args, checkpoint, "cpu")
    print(table, flush=True)
    run_name = f"{checkpoint['args']['env_id']}__{args.exp_name}__{args.seed}__{int(time.time())}"
    writer = SummaryWriter(os.path.join("runs", run_name))

    # seeding
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)

    env = gym.make(task["gym_id"], max_episode_steps=task["max_episode_steps"])
    env.action_space.seed(args.seed)
    nets = sac_nets(env)
    obs_dim, act_dim = env.observation_space.shape[0], env.action_space.shape[0]
    # The replay: (s, a, r, s', terminated) and, for --set-target, the sub-policy's action at s'.
    buffer = [torch.zeros(args.total_timesteps, dim) for dim in (obs_dim, act_dim, 1, obs_dim, 1, act_dim)]
    curve = {"step": [], "scores": [], "new_share": []}
    frozen = FrozenSubPolicy(policy, sub_policy, 1)
    obs, _ = env.reset(seed=args.seed)
    frozen.reset(0, obs)
    sub_policy_action = torch.as_tensor(frozen.actions([0]), dtype=torch.float32)
    start, log, taken = time.time(), {}, deque(maxlen=1000)
    for global_step in range(args.total_timesteps + 1):
        if global_step % args.eval_every == 0 or global_step == args.total_timesteps:
            scores, new_share = evaluate(
                nets, (policy, sub_policy), task, args.eval_episodes, args.seed * 1000, global_step == 0
            )
            curve["step"].append(global_step)
            curve["scores"].append(scores.tolist())
            curve["new_share"].append(new_share)
            writer.add_scalar("charts/normalized_score", scores.mean(), global_step)
            writer.add_scalar("charts/new_share", new_share, global_step)
            for tag, number in log.items():
                writer.add_scalar(f"losses/{tag}", number, global_step)
            rate = global_step / (time.time() - start)
            eta = (args.total_timesteps - global_step) / rate / 60 if rate > 0 else float("nan")
            print(
                f"step {global_step}: normalized score {scores.mean():.1f} +- {scores.std():.1f} | SAC actor's share: "
                f"evaluation {new_share:.2f}, collection {np.mean(taken) if taken else 0:.2f} | "
                f"{' | '.join(f'{k} {v:.3f}' for k, v in log.items())} | {rate:.0f} SPS | ETA {eta:.1f} min",
                flush=True,
            )
        if global_step == args.total_timesteps:
            break
        state = torch.as_tensor(obs, dtype=torch.float32)[None]
        with torch.no_grad():
            action, take_new = choose_action(args, global_step, nets, env, state, sub_policy_action)
        taken.append(float(take_new))
        next_obs, reward, terminated, truncated, _ = env.step(action)
        frozen.step({0: next_obs})
        sub_policy_action = torch.as_tensor(frozen.actions([0]), dtype=torch.float32)  # at s' (the final obs)
        row = (obs, action, [reward], next_obs, [float(terminated)], sub_policy_action[0].numpy())
        for part, value in zip(buffer, row):
            part[global_step] = torch.as_tensor(np.asarray(value, dtype=np.float32))
        obs = next_obs
        if terminated or truncated:
            obs, _ = env.reset()
            frozen.reset(0, obs)
            frozen.position = 0
            sub_policy_action = torch.as_tensor(frozen.actions([0]), dtype=torch.float32)
        if global_step >= args.learning_starts:
            *batch, next_sub_policy_actions = mixed_batch(buffer, global_step + 1, None, 256, 0.0)
            alternative = next_sub_policy_actions if args.set_target else None
            log = sac_update(nets, batch, global_step % 2 == 0, next_alternative=alternative)
            if not all(np.isfinite(value) for value in log.values()):
                eval.fail(f"step {global_step}: a loss is not finite ({log})")
    writer.close()
    with open(os.path.join("runs", run_name, "scores.json"), "w") as f:
        json.dump({"args": asdict(args), **curve}, f, indent=1)
