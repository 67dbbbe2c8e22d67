"""Shared fixtures. The tests need no downloaded dataset: they build a tiny Hopper-v5 Minari dataset
themselves, from a random policy, under a temporary MINARI_DATASETS_PATH."""

import os
import sys

import gymnasium as gym
import numpy as np
import pytest

# Tests import the project's modules (diffusion, divergence, eval, uepo_offline) from the root.
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

TINY_DATASET_ID = "test/hopper/random-v0"
# D4RL's hopper reference scores, so normalized scores read on the familiar scale.
HOPPER_REF_MIN, HOPPER_REF_MAX = -20.272305, 3234.3
TINY_MAX_EPISODE_STEPS = 50  # short episodes: the data has terminations and time-limit truncations


def random_episode_buffers(num_episodes: int, seed: int = 0):
    from minari.data_collector import EpisodeBuffer

    env = gym.make("Hopper-v5", max_episode_steps=TINY_MAX_EPISODE_STEPS)
    env.action_space.seed(seed)
    buffers = []
    for episode in range(num_episodes):
        obs, _ = env.reset(seed=seed + episode)
        observations, actions, rewards, terminations, truncations = [obs], [], [], [], []
        while True:
            # A weak random policy (scaled down) so that some episodes reach the time limit.
            action = 0.3 * env.action_space.sample()
            obs, reward, terminated, truncated, _ = env.step(action)
            observations.append(obs)
            actions.append(action)
            rewards.append(reward)
            terminations.append(terminated)
            truncations.append(truncated)
            if terminated or truncated:
                break
        buffers.append(
            EpisodeBuffer(
                id=episode,
                observations=np.array(observations),
                actions=np.array(actions),
                rewards=rewards,
                terminations=terminations,
                truncations=truncations,
            )
        )
    return buffers, env


@pytest.fixture(scope="session")
def minari_path(tmp_path_factory):
    """A temporary MINARI_DATASETS_PATH holding the tiny dataset TINY_DATASET_ID (60 episodes)."""
    import minari

    path = tmp_path_factory.mktemp("minari_datasets")
    previous = os.environ.get("MINARI_DATASETS_PATH")
    os.environ["MINARI_DATASETS_PATH"] = str(path)
    buffers, env = random_episode_buffers(60)
    minari.create_dataset_from_buffers(
        TINY_DATASET_ID,
        buffers,
        env=env,
        algorithm_name="random policy (tests)",
        author="UEPO tests",
        author_email="none",
        code_permalink="tests/conftest.py",
        eval_env=env.spec,
        description="Tiny random-policy Hopper-v5 dataset made by the tests.",
        ref_min_score=HOPPER_REF_MIN,
        ref_max_score=HOPPER_REF_MAX,
    )
    yield str(path)
    if previous is None:
        os.environ.pop("MINARI_DATASETS_PATH", None)
    else:
        os.environ["MINARI_DATASETS_PATH"] = previous


@pytest.fixture(scope="session")
def tiny_dataset(minari_path):
    import minari

    return minari.load_dataset(TINY_DATASET_ID)


# ---- tiny runs shared by test_online.py and test_eval.py (each made once per test run) -----------------
@pytest.fixture(scope="session")
def offline_checkpoint(minari_path, tmp_path_factory):
    """A tiny offline checkpoint with critics, dynamics and one improved copy."""
    from test_offline import TINY_MODEL, TINY_POLICY, run_offline

    folder = tmp_path_factory.mktemp("offline_for_online")
    path = folder / "offline.pt"
    result = run_offline(
        TINY_POLICY + TINY_MODEL + ["--num-qualified", "1", "--checkpoint-path", str(path)], minari_path, folder
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return path


@pytest.fixture(scope="session")
def online_run(offline_checkpoint, tmp_path_factory):
    """A tiny online run from `offline_checkpoint`: (the finished process, its checkpoint path)."""
    from test_online import TINY_ONLINE, run_online

    folder = tmp_path_factory.mktemp("online")
    path = folder / "online.pt"
    # No --env-id: the tiny dataset has no D4RL-style name (`hopper-medium` would be refused).
    return run_online(
        [
            "--checkpoint",
            str(offline_checkpoint),
            "--checkpoint-path",
            str(path),
            "--target-kl",
            "None",
        ]
        + TINY_ONLINE,
        folder,
    ), path


def logged_scalars(folder) -> dict:
    """Every TensorBoard scalar written under `folder` (all runs in it): {tag: [(step, value), ...]}."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    scalars = {}
    for run in sorted(os.listdir(os.path.join(folder, "runs"))):
        accumulator = EventAccumulator(os.path.join(folder, "runs", run), size_guidance={"scalars": 0})
        accumulator.Reload()
        for tag in accumulator.Tags()["scalars"]:
            scalars.setdefault(tag, []).extend((event.step, event.value) for event in accumulator.Scalars(tag))
    return scalars
