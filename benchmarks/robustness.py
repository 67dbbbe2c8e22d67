"""The deployed policy of a checkpoint under perturbations, each at a few strengths: normalized
scores and the relative drop from the clean score (docs/experiments.md, "Robustness under
perturbations").

    python benchmarks/robustness.py --checkpoint runs/<run>/online.pt   # noise, mass, friction, pushes

The paper measures no robustness; these are the usual perturbations of robust-RL benchmarks.
"""

import os
import sys
import time
from dataclasses import dataclass
from typing import Literal

import gymnasium as gym
import numpy as np
import torch
import tyro

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from eval import (  # noqa: E402
    EPISODE_RANGES,
    SUB_POLICY_OF_ONLINE,
    built_or_fail,
    check_policy_args,
    deployed_choice,
    fail,
    fail_unless_finite,
    load_or_fail,
    markdown_table,
    normalized_score,
    run_chunk_episodes,
    write_json,
)


# ------------------------------------------------------------------------------------------------
# Perturbations. Each is a Gymnasium wrapper built with a strength; at
# strength 0 it changes nothing, so that row reproduces the clean score exactly. Random ones draw
# from their own generator, seeded per episode, so the environment's own random stream (its
# reset noise) is the clean run's and every sub-policy or strength meets the same noise draws.
# ------------------------------------------------------------------------------------------------
class ObservationNoise(gym.ObservationWrapper):
    """The policy sees s + N(0, (strength * scale)^2), with `scale` the dataset's per-dimension
    state std (so a strength is a fraction of the data's own spread). Rewards are the clean ones."""

    def __init__(self, env: gym.Env, strength: float, scale: np.ndarray, seed: int):
        super().__init__(env)
        self.std, self.rng = strength * np.asarray(scale, dtype=np.float64), np.random.default_rng(seed)

    def observation(self, observation):
        return observation + self.std * self.rng.standard_normal(observation.shape)


class ActionNoise(gym.ActionWrapper):
    """The robot executes a + N(0, (strength * half the action range)^2), clipped to the bounds."""

    def __init__(self, env: gym.Env, strength: float, seed: int):
        super().__init__(env)
        low, high = env.action_space.low, env.action_space.high
        self.std, self.rng = strength * (high - low) / 2, np.random.default_rng(seed)

    def action(self, action):
        noisy = action + self.std * self.rng.standard_normal(np.shape(action))
        return np.clip(noisy, self.action_space.low, self.action_space.high).astype(self.action_space.dtype)


class ScaledModel(gym.Wrapper):
    """Scales physical parameters of the environment's MuJoCo model by (1 + strength), and puts
    them back on `close`. `mass`: every body's mass and rotational inertia (the same shapes,
    denser or lighter, so inertia scales with mass). `friction`: the sliding friction of every geom (column 0 of
    geom_friction; torsional and rolling friction unchanged). Each `gym.make` owns its model, so
    other environments are untouched."""

    FIELDS = {
        "mass": (("body_mass", slice(None)), ("body_inertia", slice(None))),
        "friction": (("geom_friction", (slice(None), 0)),),
    }

    def __init__(self, env: gym.Env, quantity: Literal["mass", "friction"], strength: float):
        super().__init__(env)
        if 1 + strength <= 0:
            raise ValueError(f"a {quantity} change of {strength} would make it non-positive")
        model = env.unwrapped.model
        self.originals = [(name, index, getattr(model, name)[index].copy()) for name, index in self.FIELDS[quantity]]
        for name, index, original in self.originals:
            getattr(model, name)[index] = original * (1 + strength)

    def close(self):
        model = self.env.unwrapped.model
        for name, index, original in self.originals:
            getattr(model, name)[index] = original
        super().close()


class RandomPush(gym.Wrapper):
    """One push per episode: a horizontal force on the root body (the torso; body 1 of the model)
    of strength x the robot's weight, forwards or backwards at random, held for `duration`
    seconds from a step drawn uniformly in `window`. A push of strength s held 0.1 s changes the
    robot's speed by about s x 1 m/s. Episodes that end before their push are not pushed."""

    def __init__(
        self, env: gym.Env, strength: float, seed: int, duration: float = 0.1, window: tuple[int, int] = (50, 250)
    ):
        super().__init__(env)
        model = env.unwrapped.model
        self.force = strength * float(model.body_mass.sum()) * float(np.linalg.norm(model.opt.gravity))
        self.push_steps = max(1, round(duration / env.unwrapped.dt))
        self.window, self.rng = window, np.random.default_rng(seed)

    def reset(self, **kwargs):
        self.step_count = 0
        self.push_start = int(self.rng.integers(*self.window))
        self.direction = float(self.rng.choice([-1.0, 1.0]))
        return self.env.reset(**kwargs)  # MuJoCo's reset clears any applied force

    def step(self, action):
        pushing = self.push_start <= self.step_count < self.push_start + self.push_steps
        self.env.unwrapped.data.xfrc_applied[1, 0] = self.direction * self.force if pushing else 0.0
        self.step_count += 1
        return self.env.step(action)


# name -> (what the strength means, how to wrap an env at a strength)
PERTURBATIONS = {
    "observation_noise": "Gaussian observation noise, std = strength x the dataset's state std",
    "action_noise": "Gaussian action noise, std = strength x half the action range",
    "mass": "every body's mass and inertia x (1 + strength)",
    "friction": "sliding friction x (1 + strength)",
    "push": "one 0.1 s horizontal push of strength x the robot's weight",
}


def perturbed_env(env: gym.Env, perturbation: str, strength: float, seed: int, state_std: np.ndarray) -> gym.Env:
    if perturbation in ("observation_noise", "action_noise", "push") and strength < 0:
        raise ValueError(f"a {perturbation} strength must be >= 0, got {strength}")
    if perturbation == "observation_noise":
        return ObservationNoise(env, strength, state_std, seed)
    if perturbation == "action_noise":
        return ActionNoise(env, strength, seed)
    if perturbation in ("mass", "friction"):
        return ScaledModel(env, perturbation, strength)
    if perturbation == "push":
        return RandomPush(env, strength, seed)
    raise ValueError(f"unknown perturbation {perturbation!r}; valid: {', '.join(PERTURBATIONS)}")


@dataclass
class RobustnessArgs:
    """The deployed policy of a checkpoint under perturbations, each at a few strengths (an empty
    list skips one): normalized scores and the relative drop from the clean score. All conditions
    run as one batch of environments, episode e of every condition from the same start state."""

    checkpoint: str
    """an offline checkpoint (its offline choice is evaluated) or an online one (its fine-tuned sub-policy)"""
    sub_policy: int | None = None
    """evaluate this base sub-policy instead of the deployed one"""
    episodes: int = 10
    """episodes per condition"""
    seed: int = 1
    """episode e is reset with seed `seed * 1000 + e`; the perturbation's own noise with `seed * 1000 + e` too"""
    observation_noise: tuple[float, ...] = (0.05, 0.1, 0.2)
    """strengths: observation noise std as a fraction of the dataset's state std"""
    action_noise: tuple[float, ...] = (0.1, 0.2, 0.3)
    """strengths: action noise std as a fraction of half the action range"""
    mass: tuple[float, ...] = (-0.3, -0.15, 0.15, 0.3)
    """strengths: relative change of every body's mass (and inertia)"""
    friction: tuple[float, ...] = (-0.3, -0.15, 0.15, 0.3)
    """strengths: relative change of the sliding friction"""
    push: tuple[float, ...] = (0.25, 0.5, 1.0)
    """strengths: one 0.1 s horizontal push per episode, in units of the robot's weight"""
    json: str | None = None
    """also write the results to this JSON file"""
    cuda: bool = True
    """if toggled, use a GPU when there is one"""


# A mass or friction change is > -1 (the quantity stays positive); noise and push strengths are >= 0.
ROBUSTNESS_RANGES = {
    **EPISODE_RANGES,
    "observation_noise": "[0, 100]",
    "action_noise": "[0, 100]",
    "mass": "(-1, 100]",
    "friction": "(-1, 100]",
    "push": "[0, 100]",
}


def check_robustness_args(args: RobustnessArgs) -> str | None:
    """eval.py's checks (the checkpoint, every number, the JSON output) with these ranges."""
    return check_policy_args(args, ROBUSTNESS_RANGES)


def robustness_command(args: RobustnessArgs) -> dict:
    if (problem := check_robustness_args(args)) is not None:
        fail(problem)
    device = torch.device("cuda" if torch.cuda.is_available() and args.cuda else "cpu")
    checkpoint = load_or_fail(args.checkpoint)
    if args.sub_policy is None:
        label, saved, sub_policy = deployed_choice(checkpoint)
        policy = built_or_fail(args.checkpoint, saved, f"the saved policy of {label}", device)
    elif checkpoint.get("phase") == "online":
        fail(SUB_POLICY_OF_ONLINE)
    else:
        policy = built_or_fail(args.checkpoint, checkpoint["policy"], "the saved policy", device)
        if not 0 <= args.sub_policy < policy.config.n_subpolicies:
            fail(f"--sub-policy must be in [0, {policy.config.n_subpolicies - 1}], got {args.sub_policy}")
        label, sub_policy = f"sub-policy {args.sub_policy}", args.sub_policy
    policy.eval()
    state_std = policy.state_std.cpu().numpy()
    conditions = [("none", 0.0)] + [
        (name, float(strength)) for name in PERTURBATIONS for strength in getattr(args, name)
    ]
    envs, seeds = [], []
    for name, strength in conditions:
        for episode in range(args.episodes):
            seed = args.seed * 1000 + episode
            env = gym.make(checkpoint["gym_id"], max_episode_steps=checkpoint["max_episode_steps"])
            try:
                envs.append(env if name == "none" else perturbed_env(env, name, strength, seed, state_std))
            except ValueError as error:
                fail(f"--{name.replace('_', '-')}: {error}")
            seeds.append(seed)
    start = time.time()
    try:
        returns, _ = run_chunk_episodes(policy, envs, np.full(len(envs), sub_policy), seeds)
    finally:
        for env in envs:
            env.close()  # ScaledModel puts the model back
    scores = normalized_score(returns, checkpoint["ref_min_score"], checkpoint["ref_max_score"])
    scores = scores.reshape(len(conditions), args.episodes)
    for (name, strength), condition_scores in zip(conditions, scores):
        fail_unless_finite(args.checkpoint, f"{label} under {name} at strength {strength:g}", condition_scores)
    clean = scores[0].mean()
    rows = [
        {
            "perturbation": name,
            "strength": strength,
            "scores": condition_scores.tolist(),
            "mean": float(condition_scores.mean()),
            "std": float(condition_scores.std()),
            "relative_drop": float((clean - condition_scores.mean()) / abs(clean)) if clean != 0 else float("nan"),
        }
        for (name, strength), condition_scores in zip(conditions, scores)
    ]
    print(
        f"{args.checkpoint}: {label}, {checkpoint['gym_id']}, {args.episodes} episodes per condition "
        f"({time.time() - start:.0f} s)\n"
    )
    print(
        markdown_table(
            ["perturbation", "strength", "normalized score", "drop from clean"],
            [
                [
                    row["perturbation"],
                    f"{row['strength']:g}",
                    f"{row['mean']:.1f} +- {row['std']:.1f}",
                    "-" if row["perturbation"] == "none" else f"{100 * row['relative_drop']:.1f}%",
                ]
                for row in rows
            ],
        )
    )
    print("\nstrengths: " + "; ".join(f"{name}: {meaning}" for name, meaning in PERTURBATIONS.items()))
    result = {
        "checkpoint": args.checkpoint,
        "policy": label,
        "gym_id": checkpoint["gym_id"],
        "episodes": args.episodes,
        "seed": args.seed,
        "perturbations": PERTURBATIONS,
        "rows": rows,
    }
    if args.json:
        write_json(args.json, result)
    return result


if __name__ == "__main__":
    robustness_command(tyro.cli(RobustnessArgs))
