"""SAC from scratch, per step: the online baseline a user would run instead of fine-tuning UEPO.

    MINARI_DATASETS_PATH=<folder> python benchmarks/sac_online.py --env-id hopper-medium --total-timesteps 250000

CleanRL's `sac_continuous_action.py` recipe: 256 x 2 ReLU actor (tanh-squashed Gaussian, log-std
in [-5, 2]) and twin critics, Adam 3e-4 (actor) and 1e-3 (critics), batch 256, gamma 0.99,
Polyak 0.005, the entropy weight tuned towards -|A|, 5000 random steps first, the actor updated
every 2nd step (twice, so it gets as many steps as the critics). No offline data by default: the
dataset gives only the environment, its time limit and its reference scores (`--offline-ratio r`
draws that share of every batch from the dataset's transitions instead, RLPD's symmetric
sampling without its other changes). The scores are
uepo_online.py's: the deterministic policy (tanh of the mean) every `--eval-every` environment
steps on `--eval-episodes` episodes reset with seeds `seed * 1000 + e`. The curve goes to
`runs/{env_id}__{exp_name}__{seed}__{time}/scores.json` and TensorBoard in the same folder.
"""

import json
import os
import random
import sys
import time
from dataclasses import asdict, dataclass

import gymnasium as gym
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import tyro
from torch.utils.tensorboard import SummaryWriter

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from eval import (  # noqa: E402
    SEED_RANGE,
    DatasetError,
    chunk_dataset,
    evaluate_sub_policies,
    fail,
    load_dataset,
    out_of_range,
)


@dataclass
class Args:
    env_id: str = "hopper-medium"
    """dataset whose environment, time limit and reference scores are used (its data is not)"""
    dataset_id: str | None = None
    """any Minari dataset id instead of --env-id"""
    exp_name: str = "sac"
    """the run's method name (its folder)"""
    seed: int = 1
    """seed of the networks, the environment and the evaluation episodes"""
    total_timesteps: int = 250_000
    """environment steps"""
    learning_starts: int = 5000
    """random actions before the first update"""
    buffer_size: int = 1_000_000
    """transitions kept"""
    eval_every: int = 25_000
    """environment steps between evaluations (and one at step 0)"""
    eval_episodes: int = 10
    """episodes per evaluation"""
    threads: int = 1
    """torch intra-op threads"""
    offline_ratio: float = 0.0
    """share of every batch drawn from the dataset's transitions (0: SAC from scratch)"""


# Every numeric flag's range (eval.out_of_range, as in the training scripts).
RANGES = {
    "seed": SEED_RANGE,
    "total_timesteps": "[1, 100000000]",
    "learning_starts": "[0, 100000000]",
    "buffer_size": "[1, 10000000]",
    "eval_every": "[1, 100000000]",
    "eval_episodes": "[1, 1000]",
    "threads": "[1, 256]",
    "offline_ratio": "[0, 1]",
}


class Actor(nn.Module):
    """CleanRL's SAC actor; `act` is the evaluation interface of `eval.evaluate_sub_policies`
    (one action per decision, one state: raw (B, 1, S) -> (B, 1, 1, A), tanh of the mean)."""

    chunk_size = history_size = 1

    def __init__(self, obs_dim: int, act_dim: int, low, high):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(obs_dim, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU())
        self.mean, self.log_std = nn.Linear(256, act_dim), nn.Linear(256, act_dim)
        self.register_buffer("scale", torch.as_tensor((high - low) / 2, dtype=torch.float32))
        self.register_buffer("bias", torch.as_tensor((high + low) / 2, dtype=torch.float32))

    def sample(self, states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """A reparameterized action in env units and its log-likelihood (tanh-corrected)."""
        hidden = self.net(states)
        mean, log_std = self.mean(hidden), torch.tanh(self.log_std(hidden))
        std = (-5 + 0.5 * 7 * (log_std + 1)).exp()
        u = mean + std * torch.randn_like(mean)
        y = torch.tanh(u)
        log_prob = (-0.5 * ((u - mean) / std) ** 2 - std.log() - 0.5 * np.log(2 * np.pi)).sum(-1)
        log_prob = log_prob - torch.log(self.scale * (1 - y**2) + 1e-6).sum(-1)
        return y * self.scale + self.bias, log_prob

    def mean_action(self, states: torch.Tensor) -> torch.Tensor:
        """The deterministic action in env units: tanh of the mean."""
        return torch.tanh(self.mean(self.net(states))) * self.scale + self.bias

    @torch.no_grad()
    def act(self, state_history: np.ndarray) -> np.ndarray:
        return self.mean_action(torch.as_tensor(state_history[:, -1], dtype=torch.float32))[:, None, None].numpy()


def soft_q(obs_dim: int, act_dim: int) -> nn.Module:
    return nn.Sequential(
        nn.Linear(obs_dim + act_dim, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 1)
    )


def min_q(q1: nn.Module, q2: nn.Module, states: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
    """The smaller of the twin critics' values of (s, a), (B,)."""
    pair = torch.cat([states, actions], -1)
    return torch.min(q1(pair), q2(pair)).squeeze(-1)


def sac_nets(env) -> dict:
    """The actor, twin critics and their targets, the entropy weight and the three Adam optimizers."""
    obs_dim, act_dim = env.observation_space.shape[0], env.action_space.shape[0]
    actor = Actor(obs_dim, act_dim, env.action_space.low, env.action_space.high)
    nets = {"actor": actor, "q1": soft_q(obs_dim, act_dim), "q2": soft_q(obs_dim, act_dim)}
    nets.update({f"{name}_target": soft_q(obs_dim, act_dim) for name in ("q1", "q2")})
    for name in ("q1", "q2"):
        nets[f"{name}_target"].load_state_dict(nets[name].state_dict())
    nets["log_alpha"] = torch.zeros(1, requires_grad=True)
    nets["target_entropy"] = -float(act_dim)
    nets["q_optimizer"] = torch.optim.Adam([*nets["q1"].parameters(), *nets["q2"].parameters()], lr=1e-3)
    nets["actor_optimizer"] = torch.optim.Adam(actor.parameters(), lr=3e-4)
    nets["alpha_optimizer"] = torch.optim.Adam([nets["log_alpha"]], lr=1e-3)
    return nets


def dataset_transitions(dataset) -> list[torch.Tensor]:
    """The dataset's steps in the replay's layout: states, actions (env units), rewards, next states, terminated."""
    data = chunk_dataset(dataset, 1, 1, 1.0)
    parts = (data["states"][:, 0], data["chunks"][:, 0], data["step_rewards"], data["step_next_states"], data["dones"])
    return [torch.as_tensor(part, dtype=torch.float32).reshape(len(part), -1) for part in parts]


def mixed_batch(buffer: list, filled: int, offline: list | None, size: int, offline_ratio: float) -> tuple:
    """`round(size * offline_ratio)` rows from `offline` first, the rest from the first `filled` rows of `buffer`."""
    num_offline = 0 if offline is None else round(size * offline_ratio)
    index = torch.randint(filled, (size - num_offline,))  # one row index for every field
    parts = [part[index] for part in buffer]
    if num_offline:
        index = torch.randint(len(offline[0]), (num_offline,))
        parts = [torch.cat([data[index], part]) for data, part in zip(offline, parts)]
    return tuple(part.squeeze(-1) if part.shape[1] == 1 else part for part in parts)


@torch.no_grad()
def sac_target(nets: dict, batch: tuple, gamma: float, alpha: float, next_alternative=None) -> torch.Tensor:
    """r + gamma (1 - terminated) (min Q'(s', a') - alpha log pi(a'|s')), a' ~ pi(s'); with `next_alternative`
    (policy expansion's set) the bootstrap is the larger of that and min Q'(s', next_alternative)."""
    _, _, rewards, next_states, terminated = batch
    next_actions, next_log_prob = nets["actor"].sample(next_states)
    next_q = min_q(nets["q1_target"], nets["q2_target"], next_states, next_actions) - alpha * next_log_prob
    if next_alternative is not None:
        next_q = torch.max(next_q, min_q(nets["q1_target"], nets["q2_target"], next_states, next_alternative))
    return rewards + gamma * (1 - terminated) * next_q


def sac_update(nets: dict, batch: tuple, update_actor: bool, gamma=0.99, tau=0.005, next_alternative=None) -> dict:
    """One SAC step: twin critics to `sac_target`, then (every 2nd step, twice) the actor on
    alpha log pi - min Q and alpha towards entropy -|A|."""
    states, actions = batch[:2]
    q1, q2, alpha = nets["q1"], nets["q2"], nets["log_alpha"].exp().item()
    target = sac_target(nets, batch, gamma, alpha, next_alternative)
    pair = torch.cat([states, actions], 1)
    critic_loss = F.mse_loss(q1(pair).squeeze(-1), target) + F.mse_loss(q2(pair).squeeze(-1), target)
    nets["q_optimizer"].zero_grad()
    critic_loss.backward()
    nets["q_optimizer"].step()
    log = {"critic_loss": critic_loss.item(), "alpha": alpha}
    if update_actor:
        for _ in range(2):
            new_actions, log_prob = nets["actor"].sample(states)
            actor_loss = (nets["log_alpha"].exp().detach() * log_prob - min_q(q1, q2, states, new_actions)).mean()
            nets["actor_optimizer"].zero_grad()
            actor_loss.backward()
            nets["actor_optimizer"].step()
            alpha_loss = -(nets["log_alpha"].exp() * (log_prob.detach() + nets["target_entropy"])).mean()
            nets["alpha_optimizer"].zero_grad()
            alpha_loss.backward()
            nets["alpha_optimizer"].step()
        log["actor_loss"] = actor_loss.item()
    with torch.no_grad():
        for name in ("q1", "q2"):
            for p, p_target in zip(nets[name].parameters(), nets[f"{name}_target"].parameters()):
                p_target.lerp_(p, tau)
    return log


if __name__ == "__main__":
    args = tyro.cli(Args)
    if (problem := out_of_range(args, RANGES)) is not None:
        fail(problem)
    if args.learning_starts > args.total_timesteps:
        fail(f"--learning-starts ({args.learning_starts}) must be at most --total-timesteps ({args.total_timesteps})")
    try:
        dataset, dataset_id, ref_min, ref_max = load_dataset(args.env_id, args.dataset_id)
    except DatasetError as error:
        fail(str(error))
    spec = dataset.recover_environment().spec
    task = dict(gym_id=spec.id, max_episode_steps=spec.max_episode_steps, ref_min_score=ref_min, ref_max_score=ref_max)
    name = args.env_id if args.dataset_id is None else args.dataset_id.replace("/", "-")
    run_name = f"{name}__{args.exp_name}__{args.seed}__{int(time.time())}"
    run_dir = os.path.join("runs", run_name)
    writer = SummaryWriter(run_dir)

    # seeding
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)

    env = gym.wrappers.RecordEpisodeStatistics(gym.make(spec.id, max_episode_steps=spec.max_episode_steps))
    env.action_space.seed(args.seed)
    nets = sac_nets(env)
    actor = nets["actor"]
    obs_dim, act_dim = env.observation_space.shape[0], env.action_space.shape[0]
    capacity = min(args.buffer_size, args.total_timesteps)
    buffer = [torch.zeros(capacity, dim) for dim in (obs_dim, act_dim, 1, obs_dim, 1)]
    offline = dataset_transitions(dataset) if args.offline_ratio > 0 else None

    curve = {"step": [], "scores": []}
    obs, _ = env.reset(seed=args.seed)
    start, log = time.time(), {}
    for global_step in range(args.total_timesteps + 1):
        if global_step % args.eval_every == 0 or global_step == args.total_timesteps:
            scores = evaluate_sub_policies(
                actor, episodes=args.eval_episodes, seed=args.seed * 1000, sub_policies=[0], **task
            )["scores"][0]
            curve["step"].append(global_step)
            curve["scores"].append(scores.tolist())
            writer.add_scalar("charts/normalized_score", scores.mean(), global_step)
            rate = global_step / (time.time() - start)
            eta = (args.total_timesteps - global_step) / rate / 60 if rate > 0 else float("nan")
            print(
                f"step {global_step}: normalized score {scores.mean():.1f} +- {scores.std():.1f} | "
                f"{' | '.join(f'{k} {v:.3f}' for k, v in log.items())} | {rate:.0f} steps/s | ETA {eta:.1f} min",
                flush=True,
            )
        if global_step == args.total_timesteps:
            break
        if global_step < args.learning_starts:
            action = env.action_space.sample()
        else:
            with torch.no_grad():
                action = actor.sample(torch.as_tensor(obs, dtype=torch.float32)[None])[0][0].numpy()
        next_obs, reward, terminated, truncated, info = env.step(action)
        row = global_step % capacity  # the final observation, not the reset one: truncations bootstrap from it
        for part, value in zip(buffer, (obs, action, [reward], next_obs, [float(terminated)])):
            part[row] = torch.as_tensor(np.asarray(value, dtype=np.float32))
        obs = next_obs
        if terminated or truncated:
            writer.add_scalar("charts/episodic_return", info["episode"]["r"], global_step)
            obs, _ = env.reset()
        if global_step >= args.learning_starts:
            batch = mixed_batch(buffer, min(global_step + 1, capacity), offline, 256, args.offline_ratio)
            log = sac_update(nets, batch, update_actor=global_step % 2 == 0)
            if not all(np.isfinite(value) for value in log.values()):
                fail(f"step {global_step}: a loss is not finite ({log})")
    writer.close()
    with open(os.path.join(run_dir, "scores.json"), "w") as f:
        json.dump({"args": asdict(args), "dataset_id": dataset_id, **curve}, f, indent=1)
    print(
        f"sac on {spec.id} ({args.env_id}), seed {args.seed}: {np.mean(curve['scores'][-1]):.1f} "
        f"at step {args.total_timesteps}"
    )
