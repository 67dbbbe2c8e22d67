"""benchmarks/baselines.py: the MSE BC loss and TD3+BC's critic target on hand-computable cases, a
tiny run of each baseline that the report then reads, and refused arguments; benchmarks/sac_online.py:
its batches' offline share, its target with and without policy expansion's set, and a tiny run;
benchmarks/policy_expansion.py: a tiny run."""

import json
import os
import subprocess
import sys
from types import SimpleNamespace

import gymnasium as gym
import numpy as np
import pytest
import torch

from conftest import ROOT, TINY_DATASET_ID

sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
from baselines import ChunkMLP, mse_bc_update, td3_bc_critic_target, twin_critic  # noqa: E402
from report import collect_runs  # noqa: E402
from sac_online import dataset_transitions, mixed_batch, sac_nets, sac_target  # noqa: E402


def constant_actor(value: float, chunk_size: int = 1, act_dim: int = 2) -> ChunkMLP:
    """A ChunkMLP whose output is tanh(value) everywhere (last layer: zero weights, bias value)."""
    actor = ChunkMLP(3, act_dim, chunk_size, 1, 8, np.zeros(3), np.ones(3), -np.ones(act_dim), np.ones(act_dim))
    with torch.no_grad():
        actor.net[-2].weight.zero_()
        actor.net[-2].bias.fill_(value)
    return actor


def test_mse_bc_loss_averages_the_real_positions_only():
    """Prediction 0 against chunks [[1, 1], [3, 3]] and [[2, 2], [9, 9]] with the second position of
    the second chunk padded: the loss is (1 + 9 + 4) / 3, the padded 81 does not count."""
    actor = constant_actor(0.0, chunk_size=2)
    optimizer = torch.optim.SGD(actor.parameters(), lr=0.0)
    batch = {
        "states": torch.zeros(2, 1, 3),
        "chunks": torch.tensor([[[1.0, 1.0], [3.0, 3.0]], [[2.0, 2.0], [9.0, 9.0]]]),
        "mask": torch.tensor([[1.0, 1.0], [1.0, 0.0]]),
    }
    assert mse_bc_update(actor, optimizer, batch)["bc"].item() == pytest.approx(14 / 3)


def test_td3_bc_target_bootstraps_the_smaller_twin_unless_terminated():
    """Constant target critics Q1 = 2 and Q2 = 5 (so the target policy's smoothing noise cannot move
    them): y = r + gamma * min(Q1, Q2) = 1 + 0.5 * 2 without termination, y = r with it."""
    actor = constant_actor(0.0)
    critic = twin_critic(3, 2, 8)
    with torch.no_grad():
        for q, value in zip(critic, (2.0, 5.0)):
            q[-1].weight.zero_()
            q[-1].bias.fill_(value)
    batch = {
        "chunks": torch.zeros(2, 1, 2),
        "next_states": torch.zeros(2, 1, 3),
        "rewards": torch.tensor([1.0, 1.0]),
        "dones": torch.tensor([0.0, 1.0]),
    }
    target = td3_bc_critic_target(actor, critic, batch, gamma=0.5)
    assert torch.allclose(target, torch.tensor([2.0, 1.0]))


def run_baseline(arguments, cwd, minari_path):
    env = {**os.environ, "MINARI_DATASETS_PATH": minari_path, "HF_HUB_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, os.path.join(ROOT, "benchmarks", "baselines.py"), *arguments],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.parametrize("algo", ["mse-bc", "td3-bc"])
def test_tiny_baseline_run_writes_scores_that_the_report_reads(algo, minari_path, tmp_path):
    """A short run of each baseline writes its scores (one per episode), the actor's weights and a
    TensorBoard log; `report.collect_runs` reads it as one run of its method on the dataset."""
    arguments = ["--dataset-id", TINY_DATASET_ID, "--algo", algo, "--total-steps", "20", "--batch-size", "32"]
    result = run_baseline(arguments + ["--eval-episodes", "2", "--eval-every", "10"], tmp_path, minari_path)
    assert result.returncode == 0, result.stderr[-3000:]
    (folder,) = os.listdir(tmp_path / "runs")
    saved = json.loads((tmp_path / "runs" / folder / "scores.json").read_text())
    assert len(saved["scores"]) == 2 and np.isfinite(saved["scores"]).all()
    assert (tmp_path / "runs" / folder / "actor.pt").is_file()
    runs, skipped = collect_runs(str(tmp_path / "runs"))
    assert not skipped and [(run["method"], run["score"]) for run in runs] == [(algo, pytest.approx(saved["mean"]))]


def test_mse_bc_loss_falls_on_a_fixed_batch():
    """200 Adam steps of MSE BC on one batch of random states and chunks: the loss falls by half."""
    torch.manual_seed(0)
    actor = ChunkMLP(3, 2, 2, 1, 64, np.zeros(3), np.ones(3), -np.ones(2), np.ones(2))
    optimizer = torch.optim.Adam(actor.parameters(), lr=1e-3)
    batch = {"states": torch.randn(64, 1, 3), "chunks": torch.rand(64, 2, 2) * 2 - 1, "mask": torch.ones(64, 2)}
    losses = [mse_bc_update(actor, optimizer, batch)["bc"].item() for _ in range(200)]
    assert losses[-1] < 0.5 * losses[0]


def test_baseline_arguments_are_refused_in_one_line(tmp_path):
    """An out-of-range flag and TD3+BC on chunks exit with code 2 and one line, before any data is read."""
    for arguments, message in (
        (["--total-steps", "0"], "--total-steps must be in [1, 10000000], got 0"),
        (["--algo", "td3-bc", "--chunk-size", "4"], "td3-bc is per step: --chunk-size and --history-size must be 1"),
        (["--learning-rate", "inf"], "--learning-rate must be in (0, 1], got inf"),
    ):
        result = subprocess.run(
            [sys.executable, os.path.join(ROOT, "benchmarks", "baselines.py"), *arguments],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert result.returncode == 2 and result.stderr.strip() == f"error: {message}", arguments
        assert not (tmp_path / "runs").exists()


def run_curve(script: str, arguments: list, minari_path, tmp_path) -> tuple:
    """A finished tiny run of an online benchmark in `tmp_path`: (the process, its scores.json)."""
    env = {**os.environ, "MINARI_DATASETS_PATH": minari_path, "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, os.path.join(ROOT, "benchmarks", script), *arguments]
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    (folder,) = os.listdir(tmp_path / "runs")
    return result, json.loads((tmp_path / "runs" / folder / "scores.json").read_text())


@pytest.mark.parametrize("offline_ratio", ["0", "0.5"])
def test_sac_from_scratch_runs_the_online_protocol_and_learns(offline_ratio, minari_path, tmp_path):
    """benchmarks/sac_online.py: evaluations at step 0, every --eval-every and at the end, in the
    online script's units, and the actor moved from its initialization (updates after the random steps)."""
    arguments = ["--dataset-id", TINY_DATASET_ID, "--total-timesteps", "400", "--learning-starts", "200"]
    arguments += ["--offline-ratio", offline_ratio, "--eval-every", "200", "--eval-episodes", "2"]
    result, saved = run_curve("sac_online.py", arguments, minari_path, tmp_path)
    assert saved["step"] == [0, 200, 400] and all(len(row) == 2 for row in saved["scores"])
    assert "critic_loss" in result.stdout.splitlines()[-2] and saved["scores"][0] != saved["scores"][-1]


def test_sac_batches_mix_the_configured_share_of_dataset_transitions(tiny_dataset):
    """--offline-ratio: round(size x ratio) rows of every batch are dataset steps (first), the rest online rows,
    each row one transition across every field; the dataset's steps are its episodes' (s, a, r, s', terminated)."""
    offline = dataset_transitions(tiny_dataset)
    episode = next(tiny_dataset.iterate_episodes())
    assert len(offline[0]) == tiny_dataset.total_steps and [part.shape[1] for part in offline] == [11, 3, 1, 11, 1]
    assert torch.allclose(offline[0][1], torch.as_tensor(episode.observations[1], dtype=torch.float32))
    assert torch.allclose(offline[3][0], offline[0][1]) and offline[2][0, 0] == np.float32(episode.rewards[0])
    rows = torch.arange(10.0)[:, None]
    buffer = [rows, rows.repeat(1, 3), -rows, rows + 1, torch.zeros(10, 1)]  # row k: state k, next state k + 1
    offline = [part + 100 for part in buffer]
    states, actions, rewards, next_states, _ = mixed_batch(buffer, 4, offline, 8, 0.25)
    assert (states[:2] >= 100).all() and (states[2:] < 4).all()  # 2 dataset rows, then online rows 0..3 only
    assert torch.equal(next_states, states + 1) and torch.equal(rewards, 100 * (states >= 100) * 2 - states)
    assert torch.equal(actions, states[:, None].repeat(1, 3))
    assert (mixed_batch(buffer, 4, None, 8, 0.25)[0] < 4).all()  # no dataset: SAC from scratch


class ActionSum(torch.nn.Module):
    """A stand-in critic: Q(s, a) = sum(a), so every target is computable by hand."""

    def __init__(self, obs_dim: int):
        super().__init__()
        self.obs_dim = obs_dim

    def forward(self, pair: torch.Tensor) -> torch.Tensor:
        return pair[:, self.obs_dim :].sum(-1, keepdim=True)


def test_sac_target_bootstraps_the_better_member_of_the_set_only_when_given_one():
    """sac_target with Q'(s', a) = sum(a): y = r + gamma (1 - d) (sum(a') - alpha log pi(a')), a' ~ pi, as SAC;
    with policy expansion's alternative a_alt, the bootstrap is max(that, sum(a_alt)), never a bootstrap after
    a termination."""
    space = gym.spaces.Box(-1.0, 1.0, (2,))
    nets = sac_nets(SimpleNamespace(observation_space=gym.spaces.Box(-1.0, 1.0, (3,)), action_space=space))
    nets["q1_target"], nets["q2_target"] = ActionSum(3), ActionSum(3)
    batch = (None, None, torch.tensor([1.0, 1.0, 1.0]), torch.zeros(3, 3), torch.tensor([0.0, 0.0, 1.0]))
    alternative = torch.tensor([[1.0, 1.0], [-1.0, -1.0], [1.0, 1.0]])
    torch.manual_seed(0)
    next_actions, log_prob = nets["actor"].sample(torch.zeros(3, 3))
    sac = next_actions.sum(-1) - 0.5 * log_prob
    torch.manual_seed(0)
    assert torch.allclose(sac_target(nets, batch, 0.9, 0.5), torch.tensor([1.0, 1.0, 1.0]) + 0.9 * sac * (1 - batch[4]))
    torch.manual_seed(0)
    expanded = sac_target(nets, batch, 0.9, 0.5, alternative)
    assert torch.allclose(
        expanded, 1 + 0.9 * torch.stack([sac[0].clamp_min(2.0), sac[1].clamp_min(-2.0), torch.tensor(0.0)])
    )
    assert expanded[0] >= 1 + 0.9 * 2.0 and expanded[2] == 1.0


def test_policy_expansion_deploys_the_offline_choice_at_step_0_then_the_set(offline_checkpoint, minari_path, tmp_path):
    """benchmarks/policy_expansion.py: evaluation at step 0 is the selected sub-policy alone (the same
    scores as eval.evaluate_saved_task on the same episodes, the SAC actor's share 0), later ones the set."""
    import uepo_online
    from eval import evaluate_saved_task, load_checkpoint

    arguments = ["--checkpoint", str(offline_checkpoint), "--total-timesteps", "300", "--learning-starts", "150"]
    arguments += ["--eval-every", "150", "--eval-episodes", "2", "--set-target"]
    _, saved = run_curve("policy_expansion.py", arguments, minari_path, tmp_path)
    assert saved["step"] == [0, 150, 300] and saved["new_share"][0] == 0.0
    assert all(0.0 <= share <= 1.0 for share in saved["new_share"])
    checkpoint = load_checkpoint(str(offline_checkpoint), "offline")
    online_args = uepo_online.with_algo_defaults(uepo_online.Args(checkpoint=str(offline_checkpoint)))
    policy, sub_policy, _ = uepo_online.select_sub_policy(online_args, checkpoint, "cpu")
    hand_over = evaluate_saved_task(policy, checkpoint, 2, 1, [sub_policy])["scores"][0]
    assert np.allclose(saved["scores"][0], hand_over)
