"""Evaluation and checkpoint I/O shared by uepo_offline.py and uepo_online.py.

- `normalized_score`: D4RL-style score, 100 * (return - ref_min) / (ref_max - ref_min), the
  same formula as `minari.get_normalized_score`, from reference scores stored in the
  checkpoint (so evaluating needs no dataset).
- `evaluate_sub_policies`: every sub-policy of a DiffusionPolicy over real episodes, all in
  one batched policy call per decision, with the same start states for every sub-policy.
- `ChunkEnv`: the chunk-level MDP (one action = one chunk of H actions) for online PPO.
- `save_checkpoint` / `load_checkpoint`: atomic writes; loads that refuse a corrupt file or a
  checkpoint made for another environment.
"""

import os
import sys
from collections import deque

import gymnasium as gym
import numpy as np
import torch

CHECKPOINT_FORMAT = "uepo-v1"
# The Gymnasium environment of each task of the D4RL-style names (`hopper-medium` -> Hopper-v5).
GYM_ENV_IDS = {"hopper": "Hopper-v5", "walker2d": "Walker2d-v5", "halfcheetah": "HalfCheetah-v5", "ant": "Ant-v5"}


def normalized_score(returns, ref_min_score: float, ref_max_score: float) -> np.ndarray:
    return 100.0 * (np.asarray(returns, dtype=np.float64) - ref_min_score) / (ref_max_score - ref_min_score)


@torch.no_grad()
def evaluate_sub_policies(policy, env_id: str, episodes: int, seed: int, ref_min_score: float,
                          ref_max_score: float, max_episode_steps: int | None = None,
                          action_steps: int | None = None, sub_policies: list[int] | None = None) -> dict:
    """Deterministic returns and normalized scores of every sub-policy.

    Environment (i, e) runs sub-policy i on episode e, reset with seed `seed + e`, so every
    sub-policy starts from the same states. At each decision all live environments are batched
    into one `policy.act` call (which samples all n sub-policies together; the adaptive
    perturbation couples them) and environment (i, e) executes sub-policy i's chunk.
    `action_steps` < H re-plans sooner (receding horizon); default: the whole chunk.
    `max_episode_steps`: the dataset's time limit (None: the environment's registered one).
    `sub_policies`: which sub-policies get environments (default: all n, in order); the policy
    still samples all n at every decision.

    Returns {"returns": (k, episodes), "scores": (k, episodes), "lengths": (k, episodes)} for the
    k evaluated sub-policies.
    """
    evaluated = list(range(policy.config.n_subpolicies)) if sub_policies is None else list(sub_policies)
    n = len(evaluated)
    horizon, obs_horizon = policy.config.horizon, policy.config.obs_horizon
    action_steps = action_steps or horizon
    if not 1 <= action_steps <= horizon:
        raise ValueError(f"action_steps must be in [1, {horizon}], got {action_steps}")
    envs = [gym.make(env_id, max_episode_steps=max_episode_steps) for _ in range(n * episodes)]
    sub_policy_of = np.repeat(evaluated, episodes)
    histories, live = [], np.ones(len(envs), dtype=bool)
    returns, lengths = np.zeros(len(envs)), np.zeros(len(envs), dtype=np.int64)
    for index, env in enumerate(envs):
        obs, _ = env.reset(seed=seed + index % episodes)
        # At an episode start the first state fills the whole history (DESIGN.md, "Diffusion policy").
        histories.append(deque([obs] * obs_horizon, maxlen=obs_horizon))
    while live.any():
        live_ids = np.flatnonzero(live)
        chunks = policy.act(np.stack([np.stack(histories[i]) for i in live_ids]))  # (live, n, H, A)
        for row, env_index in enumerate(live_ids):
            chunk = chunks[row, sub_policy_of[env_index]]
            for action in chunk[:action_steps]:
                obs, reward, terminated, truncated, _ = envs[env_index].step(action)
                returns[env_index] += reward
                lengths[env_index] += 1
                histories[env_index].append(obs)
                if terminated or truncated:
                    live[env_index] = False
                    break
    for env in envs:
        env.close()
    returns = returns.reshape(n, episodes)
    return {"returns": returns, "lengths": lengths.reshape(n, episodes),
            "scores": normalized_score(returns, ref_min_score, ref_max_score)}


class ChunkEnv(gym.Wrapper):
    """The chunk-level MDP of online fine-tuning (DESIGN.md, "Online fine-tuning").

    One action is a whole chunk (H, A) in environment units; `step` executes its actions until
    the chunk ends or the episode does (the rest of the chunk is dropped, never carried into the
    next episode). The observation is the history of the last `obs_horizon` states (To, S), the
    first state repeated at an episode start, as the policy was trained. The reward is the
    discounted chunk reward R^H = sum_h gamma^h r_h over the executed steps; `info` adds
    "chunk_length" L (the discount to the next decision is gamma^L).
    Because a chunk never crosses an episode boundary, a vector env's autoreset is safe at the
    chunk level.
    """

    def __init__(self, env: gym.Env, horizon: int, obs_horizon: int, gamma: float):
        super().__init__(env)
        self.obs_horizon, self.gamma = obs_horizon, gamma
        obs_space, act_space = env.observation_space, env.action_space
        self.observation_space = gym.spaces.Box(-np.inf, np.inf, (obs_horizon, *obs_space.shape), np.float64)
        self.action_space = gym.spaces.Box(np.tile(act_space.low, (horizon, 1)), np.tile(act_space.high, (horizon, 1)),
                                           dtype=act_space.dtype)
        self.history = deque(maxlen=obs_horizon)

    def reset(self, **kwargs):
        obs, info = self.env.reset(**kwargs)
        self.history.extend([obs] * self.obs_horizon)
        return np.stack(self.history), info

    def step(self, chunk):
        chunk_reward, length = 0.0, 0
        for action in chunk:
            obs, reward, terminated, truncated, info = self.env.step(action)
            chunk_reward += self.gamma ** length * reward
            length += 1
            self.history.append(obs)
            if terminated or truncated:
                break
        info = {**info, "chunk_length": length}
        return np.stack(self.history), chunk_reward, terminated, truncated, info


def spearman_correlation(x, y) -> float:
    """Rank correlation of two score vectors (ties get their average rank), e.g. OPE against real scores."""
    def ranks(values):
        values = np.asarray(values, dtype=np.float64)
        order = np.argsort(values, kind="stable")
        result = np.empty(len(values))
        result[order] = np.arange(len(values))
        for value in np.unique(values):  # average rank for ties
            tied = values == value
            result[tied] = result[tied].mean()
        return result
    rank_x, rank_y = ranks(x), ranks(y)
    if rank_x.std() == 0 or rank_y.std() == 0:
        return float("nan")
    return float(np.corrcoef(rank_x, rank_y)[0, 1])


def save_checkpoint(checkpoint: dict, path: str) -> None:
    """Write to a temporary file in the same folder, then rename: a crash mid-write never
    leaves a broken checkpoint under `path` (os.replace is atomic on one filesystem)."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    temporary = f"{path}.tmp.{os.getpid()}"
    try:
        torch.save({"format": CHECKPOINT_FORMAT, **checkpoint}, temporary)
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)


def fail(message: str):
    """Bad input ends a script with the message alone (no traceback), exit code 2."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: unreadable, of another format, or for another env."""


def load_checkpoint(path: str, expected_env_id: str | None = None, map_location="cpu") -> dict:
    """Load a checkpoint written by `save_checkpoint`; refuse a corrupt one, one of another
    format, or (with `expected_env_id`) one made for another Gymnasium environment."""
    if not os.path.isfile(path):
        raise CheckpointError(f"no checkpoint at {path}")
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:  # torch raises several types for truncated or foreign files
        raise CheckpointError(f"{path} is not a readable checkpoint ({type(error).__name__}: {error})") from error
    if not isinstance(checkpoint, dict) or checkpoint.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path} is not a UEPO checkpoint (format {CHECKPOINT_FORMAT} expected)")
    if expected_env_id is not None and checkpoint["env_id"] != expected_env_id:
        raise CheckpointError(f"{path} was made for {checkpoint['env_id']}, not {expected_env_id}")
    return checkpoint
