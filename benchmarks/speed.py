"""Speed of the diffusion policy for each denoiser beside a plain MLP Gaussian policy measured in
the same run on the same machine: offline gradient steps/s, decision latency, online environment
steps/s (docs/experiments.md, "Speed"). Prints JSON.

    python benchmarks/speed.py
"""

import glob
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Literal

import gymnasium as gym
import numpy as np
import torch
import tyro

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from report import read_curve  # noqa: E402

from diffusion import DENOISERS, DiffusionPolicy, PolicyConfig  # noqa: E402
from divergence import subpolicy_terms  # noqa: E402
from eval import check_output_file, fail, out_of_range, save_checkpoint, spaces_problem, write_json  # noqa: E402


@dataclass
class SpeedArgs:
    """Speed of the diffusion policy for each denoiser, and of a plain MLP Gaussian policy as a
    reference: offline gradient steps/s, decision latency, online environment steps/s. Prints JSON."""

    gym_id: str = "Hopper-v5"
    """Gymnasium environment (its dimensions size the networks; the online loop runs on it)"""
    denoisers: tuple[Literal["mlp", "unet"], ...] = DENOISERS
    """denoisers to measure, with the default PolicyConfig (uepo_offline.py's defaults) otherwise"""
    batch_size: int = 256
    """batch of the offline gradient steps"""
    gradient_steps: int = 30
    """timed gradient steps (after 3 untimed ones)"""
    decisions: int = 30
    """timed decisions per batch size (the median is reported)"""
    online_timesteps: int = 16384
    """environment steps of each online PPO measurement (uepo_online.py with its defaults)"""
    json: str | None = None
    """also write the JSON to this file"""
    cuda: bool = True
    """if toggled, use a GPU when there is one"""


# One batch of states and chunks in memory at once; the step counts keep a typo from running for days.
SPEED_RANGES = {
    "batch_size": "[1, 65536]",
    "gradient_steps": "[1, 100000]",
    "decisions": "[1, 100000]",
    "online_timesteps": "[1, 10000000]",
}


def check_speed_args(args: SpeedArgs) -> str | None:
    """The first argument out of its range, as a message naming the flag (None if all are valid):
    every check is made before any work starts."""
    if args.gym_id not in gym.registry:
        return f"--gym-id {args.gym_id} is not a registered Gymnasium environment (e.g. Hopper-v5)"
    env = gym.make(args.gym_id)
    problem = spaces_problem(f"--gym-id {args.gym_id}", env.observation_space, env.action_space)
    env.close()
    if problem is not None:
        return problem
    return out_of_range(args, SPEED_RANGES) or check_output_file("--json", args.json)


class GaussianMLPPolicy(torch.nn.Module):
    """The offline reference: a = mean(s) + exp(log_std) * N(0, 1), one action per decision, with two
    256-unit hidden layers (the usual offline-RL actor) and a state-independent log-std. (Its online
    reference is uepo_online.py's `--actor mlp`.)"""

    def __init__(self, obs_dim: int, act_dim: int, hidden: int = 256):
        super().__init__()
        layers = lambda out: torch.nn.Sequential(
            torch.nn.Linear(obs_dim, hidden),
            torch.nn.ReLU(),
            torch.nn.Linear(hidden, hidden),
            torch.nn.ReLU(),
            torch.nn.Linear(hidden, out),
        )
        self.mean = layers(act_dim)
        self.log_std = torch.nn.Parameter(torch.zeros(act_dim))

    def distribution(self, states: torch.Tensor) -> torch.distributions.Normal:
        return torch.distributions.Normal(self.mean(states), self.log_std.exp())


def median_seconds(function, repeats: int) -> float:
    function()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def gradient_steps_per_second(
    loss_function, optimizer: torch.optim.Optimizer, steps: int, device: torch.device
) -> float:
    """Adam steps per second on the loss that `loss_function()` returns (after 3 untimed steps)."""

    def step():
        loss = loss_function()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize()

    for _ in range(3):  # warm-up (allocations, kernel choices)
        step()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return steps / (time.perf_counter() - start)


def diffusion_speed(args: SpeedArgs, denoiser: str, env: gym.Env, device: torch.device) -> dict:
    obs_dim, act_dim = env.observation_space.shape[0], env.action_space.shape[0]
    config = PolicyConfig(obs_dim=obs_dim, act_dim=act_dim, denoiser=denoiser)
    policy = DiffusionPolicy(
        config, np.zeros(obs_dim), np.ones(obs_dim), env.action_space.low, env.action_space.high
    ).to(device)
    optimizer = torch.optim.Adam(policy.parameters(), lr=3e-4)
    states = torch.randn(args.batch_size, config.history_size, obs_dim, device=device)
    chunks = torch.rand(args.batch_size, config.chunk_size, act_dim, device=device) * 2 - 1
    mask = torch.ones(args.batch_size, config.chunk_size, device=device)
    step_count = [0]

    def offline_loss():
        # uepo_offline.py's policy step: the diffusion loss, plus every 10th step (--disagreement-every) the
        # sub-policy objective on 64 states through the whole DDIM chain. The
        # critics and the dynamics model, trained in the same loop, are not counted.
        loss = policy.loss(states, chunks, mask)
        if step_count[0] % 10 == 0:
            _, disagreement = subpolicy_terms(policy.sample(states[:64]).actions, chunks[:64], mask[:64], std=1.0)
            loss = loss - 0.1 * disagreement.mean()
        step_count[0] += 1
        return loss

    def decision(batch: int):
        history = np.random.default_rng(0).standard_normal((batch, config.history_size, obs_dim))
        return lambda: policy.act(history)  # a whole chunk of H actions for all n sub-policies

    result = {
        "parameters": sum(p.numel() for p in policy.denoiser.parameters()),
        "gradient_steps_per_second": gradient_steps_per_second(offline_loss, optimizer, args.gradient_steps, device),
    }
    policy.eval()
    for batch in (1, 64):
        result[f"decision_latency_ms_batch_{batch}"] = 1000 * median_seconds(decision(batch), args.decisions)
    result["actions_per_decision"] = config.chunk_size
    result["online_env_steps_per_second"] = {
        actor: online_speed(args, policy, env, actor) for actor in ("noise", "residual")
    }
    return result


def online_speed(args: SpeedArgs, policy: DiffusionPolicy, env: gym.Env, actor: str) -> float:
    """Environment steps/s of uepo_online.py's own PPO loop with `--actor actor` on a checkpoint of
    this freshly initialized policy, in the offline format (selection and evaluations excluded from
    its timing)."""
    n = policy.config.n_subpolicies
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "fresh.pt")
        save_checkpoint(
            {
                "args": {"gamma": 0.99, "seed": 1},
                "step": 0,
                "gym_id": args.gym_id,
                "max_episode_steps": env.spec.max_episode_steps,
                "dataset_id": "none",
                "ref_min_score": 0.0,
                "ref_max_score": 1.0,
                "policy": policy.to_checkpoint(),
                "history": {"scores": [[[0.0]] * n], "ope_scores": []},
                "improved": [],
            },
            path,
        )
        command = [
            sys.executable,
            os.path.join(ROOT, "uepo_online.py"),
            "--checkpoint",
            path,
            "--algo",
            "ppo",
            "--actor",
            actor,
            "--total-timesteps",
            str(args.online_timesteps),
            "--selection-top",
            "1",
            "--selection-episodes",
            "1",
            "--critic-warmup",
            "0",
            "--eval-every",
            str(10**8),  # the largest --eval-every: no evaluation within the measured steps
            "--eval-episodes",
            "1",
            "--checkpoint-path",
            os.path.join(folder, "online.pt"),
            *([] if args.cuda else ["--no-cuda"]),
        ]
        result = subprocess.run(command, cwd=folder, capture_output=True, text=True)
        runs = glob.glob(os.path.join(folder, "runs", "*"))  # its TensorBoard folder
        curve = read_curve(runs[0], "charts/SPS") if result.returncode == 0 and runs else None
    if curve is None:
        raise RuntimeError(f"uepo_online.py failed:\n{result.stderr[-2000:]}")
    return float(curve[1][-1])  # the loop's steps per second at its end


def gaussian_speed(args: SpeedArgs, env: gym.Env, device: torch.device) -> dict:
    obs_dim, act_dim = env.observation_space.shape[0], env.action_space.shape[0]
    policy = GaussianMLPPolicy(obs_dim, act_dim).to(device)
    optimizer = torch.optim.Adam(policy.parameters(), lr=3e-4)
    states, actions = (
        torch.randn(args.batch_size, obs_dim, device=device),
        torch.randn(args.batch_size, act_dim, device=device),
    )

    def behaviour_cloning_loss():  # maximum likelihood of dataset actions
        return -policy.distribution(states).log_prob(actions).sum(-1).mean()

    def decision(batch: int):
        history = torch.as_tensor(np.random.default_rng(0).standard_normal((batch, obs_dim)), dtype=torch.float32)

        @torch.no_grad()
        def act():
            return policy.mean(history.to(device)).cpu().numpy()  # one action

        return act

    result = {
        "parameters": sum(p.numel() for p in policy.mean.parameters()),
        "gradient_steps_per_second": gradient_steps_per_second(
            behaviour_cloning_loss, optimizer, args.gradient_steps, device
        ),
    }
    for batch in (1, 64):
        result[f"decision_latency_ms_batch_{batch}"] = 1000 * median_seconds(decision(batch), args.decisions)
    result["actions_per_decision"] = 1
    return result


def speed_command(args: SpeedArgs) -> dict:
    if (problem := check_speed_args(args)) is not None:
        fail(problem)
    device = torch.device("cuda" if torch.cuda.is_available() and args.cuda else "cpu")
    env = gym.make(args.gym_id)
    result = {
        "gym_id": args.gym_id,
        "device": str(device),
        "torch_threads": torch.get_num_threads(),
        "batch_size": args.batch_size,
        "policies": {},
    }
    for denoiser in args.denoisers:
        result["policies"][f"diffusion ({denoiser} denoiser)"] = diffusion_speed(args, denoiser, env, device)
    result["policies"]["MLP Gaussian (reference)"] = gaussian_speed(args, env, device)
    # The reference's online loop is uepo_online.py's own with `--actor mlp` (CleanRL's Gaussian MLP, one
    # action per decision); its checkpoint only lends the dimensions, so any denoiser serves.
    fresh = DiffusionPolicy(
        PolicyConfig(obs_dim=env.observation_space.shape[0], act_dim=env.action_space.shape[0], denoiser="mlp"),
        np.zeros(env.observation_space.shape[0]),
        np.ones(env.observation_space.shape[0]),
        env.action_space.low,
        env.action_space.high,
    )
    result["policies"]["MLP Gaussian (reference)"]["online_env_steps_per_second"] = online_speed(
        args, fresh, env, "mlp"
    )
    env.close()
    print(json.dumps(result, indent=2))
    if args.json:
        write_json(args.json, result)
    return result


if __name__ == "__main__":
    speed_command(tyro.cli(SpeedArgs))
