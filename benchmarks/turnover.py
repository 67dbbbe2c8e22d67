"""Does a halfcheetah policy turn onto its back? The stand-in's behaviour policy does it at the start
of every episode (|rooty| > 2.5 rad by step 35 in the median, then it runs on its back); a policy
that does not complete the turn stalls half-turned and scores about 0.

    MINARI_DATASETS_PATH=<folder> python benchmarks/turnover.py --checkpoint runs/<run>/offline.pt
    python benchmarks/turnover.py --actor runs/<mse-bc run>/actor.pt --horizon 4 --obs-horizon 2

For an offline checkpoint: sub-policy `--sub-policy` with its seed scaled by each of
`--temperatures` (deterministic chains, `benchmarks/seed_temperature.py`) and, for comparison,
fresh noise at every decision (the diffusion policy as a sampler). For a baseline's `actor.pt`
(benchmarks/baselines.py), that deterministic policy. Episodes are reset with seeds
1000 + e; a turn counts when |rooty| (observation 1) exceeds 2.5 within the first 200 steps.
"""

import os
import sys
from dataclasses import dataclass

import gymnasium as gym
import numpy as np
import torch
import tyro

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from baselines import ChunkMLP  # noqa: E402
from seed_temperature import scaled  # noqa: E402

from eval import CheckpointError, ChunkEnv, build_saved, fail, load_checkpoint, normalized_score  # noqa: E402

HALFCHEETAH_REF = (-280.178953, 12135.0)  # D4RL's reference returns


@dataclass
class Args:
    checkpoint: str | None = None
    """an offline checkpoint of HalfCheetah-v5"""
    actor: str | None = None
    """or a baseline's actor.pt (benchmarks/baselines.py)"""
    horizon: int = 1
    """--actor: its actions per decision"""
    obs_horizon: int = 1
    """--actor: its states per decision"""
    sub_policy: int = 0
    """--checkpoint: which sub-policy"""
    temperatures: tuple[float, ...] = (0.0, 0.3, 1.0)
    """--checkpoint: scales of its fixed seed"""
    episodes: int = 10
    """episodes per policy"""


def turnover_episodes(act, horizon: int, obs_horizon: int, episodes: int) -> tuple[np.ndarray, np.ndarray]:
    """(turned over within 200 steps, normalized score) per episode of `act`: (1, To, S) -> (H, A)."""
    turned, returns = np.zeros(episodes, dtype=bool), np.zeros(episodes)
    for e in range(episodes):
        env = ChunkEnv(gym.make("HalfCheetah-v5"), horizon, obs_horizon, gamma=1.0)
        history, _ = env.reset(seed=1000 + e)
        steps, done = 0, False
        while not done:
            history, reward, terminated, truncated, info = env.step(act(history[None]))
            returns[e] += reward
            steps += info["chunk_length"]
            turned[e] |= steps <= 200 and abs(history[-1][1]) > 2.5
            done = terminated or truncated
        env.close()
    return turned, normalized_score(returns, *HALFCHEETAH_REF)


def report(label: str, turned: np.ndarray, scores: np.ndarray) -> None:
    print(f"{label}: turned over in {turned.sum()} of {len(turned)} episodes, score {scores.mean():.1f}", flush=True)


if __name__ == "__main__":
    args = tyro.cli(Args)
    if (args.checkpoint is None) == (args.actor is None):
        fail("give one of --checkpoint and --actor")
    if not 1 <= args.episodes <= 1000:
        fail(f"--episodes must be in [1, 1000], got {args.episodes}")
    torch.set_num_threads(1)
    if args.actor is not None:
        dims = (17, 6)  # HalfCheetah-v5's observation and action sizes
        actor = ChunkMLP(*dims, args.horizon, args.obs_horizon, 256, np.zeros(17), np.ones(17), -np.ones(6), np.ones(6))
        try:
            actor.load_state_dict(torch.load(args.actor, weights_only=True))  # its own statistics and bounds
        except Exception as error:
            fail(f"{args.actor} is not a baseline actor of these sizes ({type(error).__name__}: {error})")
        report(
            args.actor, *turnover_episodes(lambda h: actor.act(h)[0, 0], args.horizon, args.obs_horizon, args.episodes)
        )
        sys.exit(0)
    try:
        checkpoint = load_checkpoint(args.checkpoint, expected_env_id="HalfCheetah-v5")
        policy = build_saved(checkpoint["policy"], "the saved policy").eval()
    except CheckpointError as error:
        fail(str(error))
    if not 0 <= args.sub_policy < policy.config.n_subpolicies:
        fail(f"--sub-policy must be in [0, {policy.config.n_subpolicies - 1}], got {args.sub_policy}")
    H, To, i = policy.horizon, policy.obs_horizon, args.sub_policy
    for temperature in args.temperatures:
        chain = scaled(policy, temperature)
        result = turnover_episodes(lambda h: chain.act(h)[0, i], H, To, args.episodes)
        report(f"sub-policy {i}, seed x {temperature:g}", *result)

    def fresh_noise(history: np.ndarray) -> np.ndarray:
        states = policy.normalize_states(torch.as_tensor(history, dtype=torch.float32))
        start = torch.randn(1, policy.config.n_subpolicies, H, policy.config.act_dim)
        with torch.no_grad():
            return policy.unscale_actions(policy.sample(states, start_noise=start).actions[0, i]).numpy()

    torch.manual_seed(0)
    report("fresh noise at every decision", *turnover_episodes(fresh_noise, H, To, args.episodes))
