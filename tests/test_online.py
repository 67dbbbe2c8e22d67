"""uepo_online.py: loading and refusing checkpoints, GAE over chunks, the chunk-level environment,
chain likelihoods at the hand-over, and a tiny end-to-end PPO run whose checkpoint reloads."""

import os
import subprocess
import sys

import gymnasium as gym
import numpy as np
import pytest
import torch

from conftest import ROOT, TINY_MAX_EPISODE_STEPS
from diffusion import DiffusionPolicy, sub_policy_chain_terms
from eval import ChunkEnv, evaluate_sub_policies, load_checkpoint
from test_diffusion import make_policy, random_states
from uepo_online import chunk_gae, step_info

TINY_ONLINE = ["--total-timesteps", "300", "--num-envs", "2", "--num-steps", "8", "--num-minibatches", "2",
               "--update-epochs", "2", "--eval-every", "150", "--eval-episodes", "2", "--selection-episodes", "2"]


def run_online(arguments, cwd):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, os.path.join(ROOT, "uepo_online.py"), *arguments],
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


# ---- GAE over chunks ----------------------------------------------------------------------------------
def test_chunk_gae_matches_a_hand_computed_example_with_a_termination_and_a_truncation():
    """One environment, 4 chunks: chunk 1 terminates (no bootstrap), chunk 2 is cut by the time
    limit after 2 steps (bootstraps from the final observation's value with gamma^2), chunk 3 runs
    in a new episode and bootstraps from the state after the rollout."""
    gamma, lam = 0.9, 0.5
    rewards = torch.tensor([[1.0], [2.0], [3.0], [4.0]])
    values = torch.tensor([[10.0], [20.0], [30.0], [40.0]])
    next_values = torch.tensor([[20.0], [99.0], [7.0], [50.0]])  # V(s_1), unused, V(final obs), V(s_after)
    terminations = torch.tensor([[0.0], [1.0], [0.0], [0.0]])
    ended = torch.tensor([[0.0], [1.0], [1.0], [0.0]])
    discounts = torch.tensor([[gamma ** 4], [gamma ** 3], [gamma ** 2], [gamma ** 4]])
    advantages, returns = chunk_gae(rewards, values, next_values, terminations, ended, discounts, lam)
    delta3 = 4 + gamma ** 4 * 50 - 40
    delta2 = 3 + gamma ** 2 * 7 - 30
    delta1 = 2 - 20  # terminated: no bootstrap
    delta0 = 1 + gamma ** 4 * 20 - 10
    expected = [delta0 + gamma ** 4 * lam * delta1, delta1, delta2, delta3]  # the chain stops at ended chunks
    torch.testing.assert_close(advantages[:, 0], torch.tensor(expected))
    torch.testing.assert_close(returns, advantages + values)


# ---- the chunk-level environment -------------------------------------------------------------------------
def test_chunk_env_executes_a_chunk_until_the_episode_ends():
    """A chunk's reward is the discounted sum of its steps; a time limit inside a chunk ends it
    there (chunk_length < H); the observation is the state history."""
    gamma = 0.9
    env = ChunkEnv(gym.make("Hopper-v5", max_episode_steps=6), horizon=4, obs_horizon=2, gamma=gamma)
    reference = gym.make("Hopper-v5", max_episode_steps=6)
    obs, _ = env.reset(seed=3)
    ref_obs, _ = reference.reset(seed=3)
    assert obs.shape == (2, 11) and np.array_equal(obs[0], obs[1]) and np.array_equal(obs[1], ref_obs)
    chunk = np.full((4, 3), 0.1)
    obs, reward, terminated, truncated, info = env.step(chunk)
    ref_rewards = [reference.step(action)[1] for action in chunk]
    assert info["chunk_length"] == 4 and not truncated
    assert reward == pytest.approx(sum(gamma ** h * r for h, r in enumerate(ref_rewards)))
    obs, reward, terminated, truncated, info = env.step(chunk)
    assert info["chunk_length"] == 2 and truncated  # the 6-step limit falls inside the second chunk


def test_vector_chunk_envs_report_lengths_and_final_observations_of_ended_episodes():
    """In SAME_STEP autoreset the ended rows' chunk lengths come from final_info (step_info), and
    their final observation differs from the reset observation returned in their place."""
    make = lambda: ChunkEnv(gym.make("Hopper-v5", max_episode_steps=6), 4, 2, 0.99)
    envs = gym.vector.SyncVectorEnv([make, make], autoreset_mode=gym.vector.AutoresetMode.SAME_STEP)
    envs.reset(seed=0)
    chunk = np.zeros((2, 4, 3))
    _, _, _, truncated, infos = envs.step(chunk)
    assert not truncated.any() and list(step_info(infos, "chunk_length", truncated)) == [4, 4]
    next_obs, _, _, truncated, infos = envs.step(chunk)
    assert truncated.all() and list(step_info(infos, "chunk_length", truncated)) == [2, 2]
    final = np.stack(infos["final_obs"][truncated])
    assert final.shape == next_obs.shape and not np.allclose(final, next_obs)
    envs.close()


# ---- the hand-over -----------------------------------------------------------------------------------------
def test_recomputed_chain_likelihoods_equal_the_stored_ones_before_the_first_update():
    """Chains sampled during the rollout, rescored in a minibatch of another size and order by the
    unchanged actor: ratio 1 and KL 0 to the offline policy (the PPO start)."""
    actor = make_policy()
    offline = make_policy()  # same seed: the same weights, a separate object as in uepo_online.py
    states = random_states(actor, 24)
    with torch.no_grad():
        sample = actor.sample(states, stochastic=True, generator=torch.Generator().manual_seed(0))
    minibatch = torch.randperm(24)[:10]
    log_prob, kl = sub_policy_chain_terms(actor, offline, states[minibatch], sample.chain[minibatch], 2)
    torch.testing.assert_close(log_prob, sample.log_prob[minibatch, 2], rtol=0, atol=1e-4)
    torch.testing.assert_close(torch.exp(log_prob - sample.log_prob[minibatch, 2]), torch.ones(10), rtol=0,
                               atol=1e-5)
    assert kl.abs().max().item() < 1e-8


# ---- end to end ----------------------------------------------------------------------------------------------
def test_online_run_selects_fine_tunes_and_writes_a_checkpoint_that_reloads(online_run):
    """The tiny offline checkpoint loads, the selection table is printed, PPO iterations run with
    progress and evaluations, and the online checkpoint's policy reproduces its last evaluation."""
    result, path = online_run
    assert result.returncode == 0, result.stderr[-3000:]
    assert "| candidate | offline OPE | real normalized score | chosen |" in result.stdout
    assert "iteration 2 step" in result.stdout and "ETA" in result.stdout and "eval step 0" in result.stdout
    iterations = [line for line in result.stdout.splitlines() if line.startswith("iteration")]
    assert iterations and all("| epochs 2 |" in line for line in iterations)  # --target-kl None: every epoch
    checkpoint = load_checkpoint(str(path), expected_env_id="Hopper-v5")
    assert checkpoint["phase"] == "online" and checkpoint["global_step"] >= 300
    assert checkpoint["history"]["step"][0] == 0 and len(checkpoint["history"]["step"]) >= 3
    policy = DiffusionPolicy.from_checkpoint(checkpoint["policy"])
    replay = evaluate_sub_policies(policy, checkpoint["env_id"], episodes=2, seed=checkpoint["args"]["seed"] * 1000,
                                   ref_min_score=checkpoint["ref_min_score"],
                                   ref_max_score=checkpoint["ref_max_score"],
                                   max_episode_steps=TINY_MAX_EPISODE_STEPS, sub_policies=[checkpoint["sub_policy"]])
    np.testing.assert_array_equal(replay["scores"][0], checkpoint["history"]["scores"][-1])
    assert list((path.parent / "runs").iterdir()), "no TensorBoard run folder under runs/"


def test_online_refuses_another_environment_or_a_corrupt_checkpoint(offline_checkpoint, tmp_path):
    result = run_online(["--checkpoint", str(offline_checkpoint), "--env-id", "walker2d-medium"], tmp_path)
    assert result.returncode == 2 and "made for Hopper-v5, not Walker2d-v5" in result.stderr
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(offline_checkpoint.read_bytes()[:1000])
    result = run_online(["--checkpoint", str(corrupt)], tmp_path)
    assert result.returncode == 2 and "not a readable checkpoint" in result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "runs").exists()


def test_from_scratch_baseline_runs_with_its_own_exploration_noise_and_kl_stop(offline_checkpoint, tmp_path):
    """--from-scratch: fresh actor and value network, no selection, the same PPO. --min-std sets
    the exploration noise of the saved policy; a --target-kl that the first epoch's large steps
    exceed stops every update after that epoch (of --update-epochs 2)."""
    path = tmp_path / "scratch.pt"
    result = run_online(["--checkpoint", str(offline_checkpoint), "--from-scratch", "--checkpoint-path", str(path),
                         "--min-std", "0.05", "--learning-rate", "1e-3", "--no-anneal-lr", "--target-kl", "1e-6"] + TINY_ONLINE,
                        tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "from scratch: no selection" in result.stdout and "value network: fresh initialization" in result.stdout
    iterations = [line for line in result.stdout.splitlines() if line.startswith("iteration")]
    assert iterations and all("| epochs 1 |" in line for line in iterations)
    assert load_checkpoint(str(path))["policy"]["config"]["min_std"] == 0.05
    refused = run_online(["--checkpoint", str(offline_checkpoint), "--min-std", "0"], tmp_path)
    assert refused.returncode == 2 and "--min-std must be > 0" in refused.stderr
