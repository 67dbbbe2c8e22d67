"""The per-step baselines a user would run instead of UEPO, on the same data, evaluation and seeds.

    MINARI_DATASETS_PATH=<folder> python benchmarks/baselines.py --env-id hopper-medium --algo mse-bc
    MINARI_DATASETS_PATH=<folder> python benchmarks/baselines.py --env-id hopper-medium --algo td3-bc

- `mse-bc`: behaviour cloning by mean squared error, an MLP from the state to the action.
  `--chunk-size H --history-size To` clone chunks instead (the MLP predicts H actions from To states,
  executed open loop like the diffusion policy's chunks): the same learner as the diffusion
  policy's simplest rival on the same decision unit, a probe of what the chunking costs.
- `td3-bc`: TD3+BC (Fujimoto & Gu 2021) with its published recipe: normalized states, actor and
  twin critics of 256x2, alpha 2.5, target policy noise 0.2 clipped at 0.5, delayed actor updates;
  the default 30k steps are a CPU budget (`--total-steps 1000000` is the published one).

Scores: the final policy on `--eval-episodes` real episodes reset with seeds `seed * 1000 + e`
(as the offline script's evaluation), the dataset's time limit, D4RL's normalization. Written to
`runs/{env_id}__{exp_name}__{seed}__{time}/scores.json`, beside the actor's
weights (`actor.pt`) and TensorBoard in the same folder.
"""

import copy
import json
import os
import random
import sys
import time
from dataclasses import asdict, dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import tyro
from torch.utils.tensorboard import SummaryWriter

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from eval import (  # noqa: E402
    DatasetError,
    chunk_dataset,
    evaluate_sub_policies,
    fail,
    load_dataset,
    out_of_range,
    state_statistics,
)


@dataclass
class Args:
    env_id: str = "hopper-medium"
    """dataset (D4RL-style name, as the offline script's --env-id)"""
    dataset_id: str | None = None
    """any Minari dataset id instead of --env-id"""
    algo: Literal["mse-bc", "td3-bc"] = "mse-bc"
    """which baseline"""
    exp_name: str | None = None
    """the run's method name (its folder and the report's column); default: --algo"""
    seed: int = 1
    """seed of the networks, the batches and the evaluation episodes"""
    total_steps: int = 30_000
    """gradient steps"""
    batch_size: int = 256
    """transitions per batch"""
    learning_rate: float = 3e-4
    """Adam learning rate of every network"""
    hidden: int = 256
    """width of the two hidden layers"""
    chunk_size: int = 1
    """mse-bc: actions per decision (executed open loop)"""
    history_size: int = 1
    """mse-bc: states per decision"""
    gamma: float = 0.99
    """td3-bc: discount"""
    alpha: float = 2.5
    """td3-bc: weight of Q against the BC term (lambda = alpha / mean|Q|)"""
    eval_episodes: int = 30
    """real episodes of the final evaluation"""
    eval_every: int = 10_000
    """steps between 5-episode evaluations logged to TensorBoard (0: none)"""
    threads: int = 1
    """torch intra-op threads"""


class ChunkMLP(nn.Module):
    """To states (normalized, flattened) -> H actions in [-1, 1] (tanh). The policy interface of
    `eval.evaluate_sub_policies`: `act` maps raw state histories (B, To, S) to (B, 1, H, A)."""

    def __init__(self, obs_dim, act_dim, chunk_size, history_size, hidden, state_mean, state_std, low, high):
        super().__init__()
        self.chunk_size, self.history_size, self.act_dim = chunk_size, history_size, act_dim
        self.net = nn.Sequential(
            nn.Linear(history_size * obs_dim, hidden),
            nn.ReLU(),
            nn.Linear(hidden, hidden),
            nn.ReLU(),
            nn.Linear(hidden, chunk_size * act_dim),
            nn.Tanh(),
        )
        for name, value in (("state_mean", state_mean), ("state_std", state_std), ("low", low), ("high", high)):
            self.register_buffer(name, torch.as_tensor(value, dtype=torch.float32))

    def forward(self, states: torch.Tensor) -> torch.Tensor:
        """Normalized (B, To, S) -> (B, H, A) in [-1, 1]."""
        return self.net(states.flatten(1)).view(-1, self.chunk_size, self.act_dim)

    @torch.no_grad()
    def act(self, state_history: np.ndarray) -> np.ndarray:
        states = (torch.as_tensor(state_history, dtype=torch.float32) - self.state_mean) / self.state_std
        actions = self.low + (self(states) + 1) * 0.5 * (self.high - self.low)
        return actions.unsqueeze(1).numpy()


def twin_critic(obs_dim: int, act_dim: int, hidden: int) -> nn.ModuleList:
    return nn.ModuleList(
        nn.Sequential(
            nn.Linear(obs_dim + act_dim, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, 1)
        )
        for _ in range(2)
    )


def q_values(critic: nn.ModuleList, states: torch.Tensor, actions: torch.Tensor) -> list[torch.Tensor]:
    features = torch.cat([states, actions], dim=-1)
    return [q(features).squeeze(-1) for q in critic]


def mse_bc_update(actor, optimizer, batch: dict) -> dict:
    """Mean squared error between the predicted and the data's chunk, padded positions masked out."""
    error = ((actor(batch["states"]) - batch["chunks"]) ** 2).mean(-1) * batch["mask"]
    loss = error.sum() / batch["mask"].sum()
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return {"bc": loss.detach()}


def td3_bc_critic_target(target_actor, target_critic, batch: dict, gamma: float, generator=None) -> torch.Tensor:
    """y = r + gamma (1 - done) min_j Q'_j(s', clip(pi'(s') + clip(0.2 xi, -0.5, 0.5), -1, 1))."""
    with torch.no_grad():
        next_states = batch["next_states"]
        noise = (0.2 * torch.randn(batch["chunks"][:, 0].shape, generator=generator)).clamp(-0.5, 0.5)
        next_actions = (target_actor(next_states)[:, 0] + noise).clamp(-1, 1)
        next_q = torch.min(*q_values(target_critic, next_states[:, -1], next_actions))
        return batch["rewards"] + gamma * (1 - batch["dones"]) * next_q


def td3_bc_update(nets: dict, batch: dict, step: int, args: Args) -> dict:
    """One TD3+BC step: the twin critics towards `td3_bc_critic_target`; every 2nd step the actor
    on -lambda Q_1(s, pi(s)) + (pi(s) - a)^2 with lambda = alpha / mean|Q_1| (no gradient), then the
    targets by Polyak averaging (rate 0.005)."""
    target = td3_bc_critic_target(nets["target_actor"], nets["target_critic"], batch, args.gamma)
    states, actions = batch["states"][:, -1], batch["chunks"][:, 0]
    critic_loss = sum(F.mse_loss(q, target) for q in q_values(nets["critic"], states, actions))
    nets["critic_optimizer"].zero_grad()
    critic_loss.backward()
    nets["critic_optimizer"].step()
    log = {"critic": critic_loss.detach()}
    if step % 2 == 0:
        policy_actions = nets["actor"](batch["states"])[:, 0]
        q = q_values(nets["critic"], states, policy_actions)[0]
        lam = args.alpha / q.abs().mean().detach()
        actor_loss = -lam * q.mean() + F.mse_loss(policy_actions, actions)
        nets["actor_optimizer"].zero_grad()
        actor_loss.backward()
        nets["actor_optimizer"].step()
        with torch.no_grad():
            for name in ("actor", "critic"):
                for p, p_target in zip(nets[name].parameters(), nets[f"target_{name}"].parameters()):
                    p_target.lerp_(p, 0.005)
        log["actor"] = actor_loss.detach()
    return log


# Every numeric flag's range (eval.out_of_range, as in the training scripts).
RANGES = {
    "total_steps": "[1, 10000000]",
    "batch_size": "[1, 1000000]",
    "hidden": "[1, 4096]",
    "chunk_size": "[1, 64]",
    "history_size": "[1, 64]",
    "eval_episodes": "[1, 1000]",
    "eval_every": "[0, 10000000]",
    "threads": "[1, 256]",
    "seed": "[0, 2147483647]",
    "learning_rate": "(0, 1]",
    "gamma": "(0, 1]",
    "alpha": "(0, 1000000]",
}


def check_args(args: Args) -> str | None:
    if (problem := out_of_range(args, RANGES)) is not None:
        return problem
    if args.algo == "td3-bc" and (args.chunk_size, args.history_size) != (1, 1):
        return "td3-bc is per step: --chunk-size and --history-size must be 1"
    return None


def evaluate(actor, task: dict, episodes: int, seed: int) -> np.ndarray:
    actor.eval()
    result = evaluate_sub_policies(actor, episodes=episodes, seed=seed * 1000, sub_policies=[0], **task)
    actor.train()
    return result["scores"][0]


if __name__ == "__main__":
    args = tyro.cli(Args)
    problem = check_args(args)
    if problem:
        fail(problem)
    name = args.env_id if args.dataset_id is None else args.dataset_id.replace("/", "-")
    run_name = f"{name}__{args.exp_name or args.algo}__{args.seed}__{int(time.time())}"

    # seeding
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)

    # data: the offline script's chunking (per step when H = To = 1) and its state statistics
    try:
        dataset, dataset_id, ref_min, ref_max = load_dataset(args.env_id, args.dataset_id)
    except DatasetError as error:
        fail(str(error))
    data = chunk_dataset(dataset, args.chunk_size, args.history_size, args.gamma)
    env = dataset.recover_environment()
    low, high = env.action_space.low, env.action_space.high
    task = dict(
        gym_id=env.spec.id,
        max_episode_steps=env.spec.max_episode_steps,
        ref_min_score=ref_min,
        ref_max_score=ref_max,
    )
    state_mean, state_std = state_statistics(data["all_states"])
    normalize = lambda x: torch.as_tensor((x - state_mean) / state_std, dtype=torch.float32)
    tensors = {
        "states": normalize(data["states"]),
        "chunks": torch.as_tensor(2 * (data["chunks"] - low) / (high - low) - 1, dtype=torch.float32).clamp(-1, 1),
        "mask": torch.as_tensor(data["mask"]),
        "rewards": torch.as_tensor(data["rewards"], dtype=torch.float32),
        "dones": torch.as_tensor(data["dones"]),
        "next_states": normalize(data["next_states"]),
    }
    obs_dim, act_dim = data["all_states"].shape[1], data["chunks"].shape[2]

    # networks
    actor = ChunkMLP(
        obs_dim, act_dim, args.chunk_size, args.history_size, args.hidden, state_mean, state_std, low, high
    )
    nets = {"actor": actor, "actor_optimizer": torch.optim.Adam(actor.parameters(), lr=args.learning_rate)}
    if args.algo == "td3-bc":
        nets["critic"] = twin_critic(obs_dim, act_dim, args.hidden)
        nets["critic_optimizer"] = torch.optim.Adam(nets["critic"].parameters(), lr=args.learning_rate)
        nets["target_actor"], nets["target_critic"] = copy.deepcopy(actor), copy.deepcopy(nets["critic"])

    run_dir = os.path.join("runs", run_name)
    writer = SummaryWriter(run_dir)
    writer.add_text("hyperparameters", "\n".join(f"|{k}|{v}|" for k, v in asdict(args).items()))
    start = time.time()
    for step in range(1, args.total_steps + 1):
        index = torch.randint(0, len(tensors["states"]), (args.batch_size,))
        batch = {key: value[index] for key, value in tensors.items()}
        if args.algo == "mse-bc":
            log = mse_bc_update(actor, nets["actor_optimizer"], batch)
        else:
            log = td3_bc_update(nets, batch, step, args)
        if not all(torch.isfinite(value) for value in log.values()):
            fail(f"step {step}: a loss is not finite ({', '.join(f'{k} {v.item()}' for k, v in log.items())})")
        if step % 1000 == 0:
            for key, value in log.items():
                writer.add_scalar(f"losses/{key}", value.item(), step)
            rate = step / (time.time() - start)
            losses = " | ".join(f"{k} {v.item():.4f}" for k, v in log.items())
            eta = (args.total_steps - step) / rate
            print(
                f"step {step}/{args.total_steps} | {losses} | {rate:.0f} steps/s | ETA {eta / 60:.1f} min", flush=True
            )
        if args.eval_every and step % args.eval_every == 0 and step < args.total_steps:
            writer.add_scalar("charts/normalized_score", evaluate(actor, task, 5, args.seed).mean(), step)

    scores = evaluate(actor, task, args.eval_episodes, args.seed)
    writer.add_scalar("charts/normalized_score", scores.mean(), args.total_steps)
    writer.close()
    result = {"args": asdict(args), "dataset_id": dataset_id, "scores": scores.tolist(), "mean": float(scores.mean())}
    with open(os.path.join(run_dir, "scores.json"), "w") as f:
        json.dump(result, f, indent=1)
    torch.save(actor.state_dict(), os.path.join(run_dir, "actor.pt"))
    print(
        f"{args.algo} on {dataset_id}, seed {args.seed}: {scores.mean():.1f} +- {scores.std():.1f} "
        f"over {args.eval_episodes} episodes ({(time.time() - start) / 60:.1f} min)"
    )
