"""uepo_offline.py: data, bad input, the end-to-end offline run and its checkpoint."""

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import ROOT, TINY_DATASET_ID, TINY_MAX_EPISODE_STEPS, logged_scalars
from diffusion import DiffusionPolicy, PolicyConfig
from dynamics import ChunkCritics, EnsembleDynamics, confident_choice
from eval import (
    ENV_IDS,
    CheckpointError,
    DatasetError,
    chunk_dataset,
    chunk_episode,
    deployed_choice,
    evaluate_sub_policies,
    load_checkpoint,
    load_dataset,
    minari_ids,
    save_checkpoint,
    spearman_correlation,
    state_statistics,
)
from uepo_offline import PAPER_SCALE, LossMeans, check_args, parse_args

# Small, fast settings for the end-to-end runs: the diffusion policy alone (TINY_RUN), and the
# whole offline phase with critics, dynamics, augmentation and the gated improvement (FULL_RUN).
TINY_POLICY = [
    "--dataset-id",
    TINY_DATASET_ID,
    "--denoiser",
    "mlp",
    "--mlp-hidden",
    "64",
    "--total-steps",
    "30",
    "--batch-size",
    "32",
    "--disagreement-every",
    "5",
    "--eval-every",
    "30",
    "--eval-episodes",
    "2",
    "--n-subpolicies",
    "4",
]
TINY_RUN = TINY_POLICY + ["--no-ope", "--num-qualified", "0"]
TINY_MODEL = [
    "--ope-states",
    "8",
    "--ope-steps",
    "8",
    "--dynamics-warmup",
    "10",
    "--augment-every",
    "10",
    "--augment-starts",
    "16",
    "--augment-ratio",
    "0.02",
    "--improvement-steps",
    "6",
    "--ope-every",
    "3",
]
FULL_RUN = TINY_POLICY + TINY_MODEL


def run_offline(arguments, minari_path, cwd, extra_env=None):
    env = {**os.environ, "MINARI_DATASETS_PATH": minari_path, "HF_HUB_OFFLINE": "1", **(extra_env or {})}
    return subprocess.run(
        [sys.executable, os.path.join(ROOT, "uepo_offline.py"), *arguments],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


# ---- data ------------------------------------------------------------------------------------------
def test_chunk_episode_matches_hand_computed_example():
    """Chunks pad with the last action and mask it; histories repeat the first state; the
    chunk reward is discounted; next states and dones follow the chunk's end."""
    observations = np.arange(6, dtype=np.float32)[:, None] * np.ones((1, 2), np.float32)  # s_t = (t, t)
    actions = np.arange(5, dtype=np.float32)[:, None] + 10  # a_t = 10 + t
    rewards = np.array([1, 2, 3, 4, 5], dtype=np.float32)
    terminations = np.array([0, 0, 0, 0, 1], dtype=bool)
    out = chunk_episode(observations, actions, rewards, terminations, chunk_size=3, history_size=2, gamma=0.5)
    assert out["chunks"].shape == (5, 3, 1) and out["states"].shape == (5, 2, 2)
    np.testing.assert_array_equal(out["chunks"][0, :, 0], [10, 11, 12])
    np.testing.assert_array_equal(out["chunks"][3, :, 0], [13, 14, 14])  # padded with the last action
    np.testing.assert_array_equal(out["mask"][3], [1, 1, 0])
    np.testing.assert_array_equal(out["mask"][4], [1, 0, 0])
    np.testing.assert_array_equal(out["states"][0, :, 0], [0, 0])  # first state repeated
    np.testing.assert_array_equal(out["states"][2, :, 0], [1, 2])
    np.testing.assert_allclose(out["rewards"][0], 1 + 0.5 * 2 + 0.25 * 3)
    np.testing.assert_allclose(out["rewards"][3], 4 + 0.5 * 5)  # padding earns nothing
    np.testing.assert_array_equal(out["next_states"][0, :, 0], [2, 3])  # history at s_{t+H}
    np.testing.assert_array_equal(out["next_states"][4, :, 0], [4, 5])  # clipped at the final state
    np.testing.assert_array_equal(out["dones"], [0, 0, 1, 1, 1])  # chunks that reach the termination
    np.testing.assert_array_equal(out["step_next_states"][:, 0], [1, 2, 3, 4, 5])  # one-step transitions
    np.testing.assert_array_equal(out["step_rewards"], rewards)
    np.testing.assert_array_equal(out["episode_start"], [True, False, False, False, False])


def test_truncation_is_not_a_termination():
    """An episode cut by its time limit has no done chunk (values bootstrap through it)."""
    observations = np.zeros((5, 3), np.float32)
    out = chunk_episode(
        observations,
        np.zeros((4, 2), np.float32),
        np.ones(4, np.float32),
        np.zeros(4, bool),
        chunk_size=4,
        history_size=1,
        gamma=0.99,
    )
    assert out["dones"].sum() == 0


def test_chunk_dataset_on_tiny_minari_dataset(tiny_dataset):
    """One chunk per dataset step, with frozen statistics of the right shapes."""
    data = chunk_dataset(tiny_dataset, chunk_size=4, history_size=2, gamma=0.99)
    assert len(data["chunks"]) == tiny_dataset.total_steps
    assert data["chunks"].shape[1:] == (4, 3) and data["states"].shape[1:] == (2, 11)
    assert data["mask"][:, 0].all()  # the first action of every chunk is real
    episodes = tiny_dataset.total_episodes
    assert (data["mask"][:, -1] == 0).sum() == 3 * episodes  # the last 3 steps of every episode pad
    assert data["dones"].sum() > 0
    # One start per episode, at its first state (the history repeats it), where the offline
    # choice's model episodes begin.
    starts = data["states"][data["episode_start"]]
    assert len(starts) == episodes and (starts == starts[:, :1]).all()
    first_states = np.stack([episode.observations[0] for episode in tiny_dataset.iterate_episodes()])
    np.testing.assert_array_equal(starts[:, -1], first_states.astype(np.float32))
    mean, std = state_statistics(data["all_states"])
    assert mean.shape == (11,) and (std >= 1e-3).all()


# ---- bad input -------------------------------------------------------------------------------------
def test_unknown_env_name_lists_the_valid_ones():
    """A name Minari does not have is refused with the valid names."""
    with pytest.raises(DatasetError) as error:
        minari_ids("hopper-medium-replay")
    for name in ("hopper-medium", "walker2d-expert", "halfcheetah-medium-expert", "--dataset-id"):
        assert name in str(error.value)
    assert minari_ids("walker2d-medium-expert") == ["mujoco/walker2d/medium-v0", "mujoco/walker2d/expert-v0"]
    assert all(len(minari_ids(name)) in (1, 2) for name in ENV_IDS)


def test_missing_dataset_names_minari_datasets_path(minari_path, monkeypatch):
    """A dataset that is neither local nor downloadable says where datasets are looked for."""
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # no network, fail fast
    with pytest.raises(DatasetError) as error:
        load_dataset("hopper-medium", None)
    assert "MINARI_DATASETS_PATH" in str(error.value) and minari_path in str(error.value)
    assert TINY_DATASET_ID in str(error.value)  # lists what is local


def test_command_line_refuses_bad_names(minari_path, tmp_path):
    """The script exits with status 2 and the message, without a traceback."""
    result = run_offline(["--env-id", "hopper-medium-replay"], minari_path, tmp_path)
    assert result.returncode == 2 and "Valid names: hopper-simple" in result.stderr
    assert "Traceback" not in result.stderr
    result = run_offline(["--ddim-steps", "30"], minari_path, tmp_path)  # checked before any data is read
    assert result.returncode == 2 and "--ddim-steps must be at most --diffusion-steps (20)" in result.stderr
    result = run_offline(["--dataset-id", "mujoco/walker2d/medium-v0"], minari_path, tmp_path)
    assert result.returncode == 2 and "MINARI_DATASETS_PATH" in result.stderr
    assert not (tmp_path / "runs").exists()  # nothing started


NAN_DIFFUSION_LOSS_FROM_STEP_3 = """
import diffusion
real_loss, loss_calls = diffusion.DiffusionPolicy.loss, []
def loss_goes_nan(self, *args, **kwargs):
    loss_calls.append(1)
    value = real_loss(self, *args, **kwargs)
    return value * float("nan") if len(loss_calls) >= 3 else value
diffusion.DiffusionPolicy.loss = loss_goes_nan
"""


def test_nan_loss_stops_the_run_naming_step_and_loss(minari_path, tmp_path):
    """A run whose diffusion loss turns NaN at step 3 stops there, saying which loss and at which step."""
    result = run_offline_patched(
        NAN_DIFFUSION_LOSS_FROM_STEP_3, TINY_RUN + ["--disagreement-coef", "0"], minari_path, tmp_path
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert "error: step 3:" in result.stderr and "the diffusion loss is nan" in result.stderr, result.stderr[-2000:]


# Fault injection without hooks in the script: a wrapper patches one function of eval.py (which
# uepo_offline.py imports by name at its start) and runs the script as __main__.
PATCHED_RUN = """
import os, runpy, sys
sys.path.insert(0, {root!r})
import torch
import eval as eval_module
{patch}
sys.argv = [{script!r}] + sys.argv[1:]
runpy.run_path({script!r}, run_name="__main__")
"""

NAN_AT_SECOND_EVALUATION = """
real_evaluate, calls = eval_module.evaluate_sub_policies, []
def evaluate_after_nan(policy, *args, **kwargs):
    calls.append(1)
    if len(calls) == 2:  # the weights go NaN between the first and the second checkpoint
        with torch.no_grad():
            next(policy.parameters()).fill_(float("nan"))
    return real_evaluate(policy, *args, **kwargs)
eval_module.evaluate_sub_policies = evaluate_after_nan
"""


def run_offline_patched(patch, arguments, minari_path, tmp_path):
    """uepo_offline.py with `patch` applied to eval.py first (see PATCHED_RUN)."""
    script = tmp_path / "patched_run.py"
    script.write_text(PATCHED_RUN.format(root=ROOT, script=os.path.join(ROOT, "uepo_offline.py"), patch=patch))
    env = {**os.environ, "MINARI_DATASETS_PATH": minari_path, "HF_HUB_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, str(script), *arguments], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )


def test_non_finite_weights_stop_before_the_save_and_keep_the_last_checkpoint(minari_path, tmp_path):
    """Weights that turn NaN after the step-10 checkpoint stop the run at the next save, naming the
    step; the checkpoint on disk is still the step-10 one, loadable and finite."""
    path = tmp_path / "offline.pt"
    arguments = TINY_RUN + ["--eval-every", "10", "--checkpoint-path", str(path)]
    result = run_offline_patched(NAN_AT_SECOND_EVALUATION, arguments, minari_path, tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "step 20" in result.stderr and "not finite; stopped without saving" in result.stderr
    checkpoint = load_checkpoint(str(path))  # refuses non-finite weights itself
    assert checkpoint["step"] == 10


def test_spearman_correlation_on_hand_made_scores():
    """Rank correlation: 1 for the same order, -1 for the reverse, ties share their average rank."""
    assert spearman_correlation([1, 2, 3, 4], [10, 20, 30, 45]) == pytest.approx(1.0)
    assert spearman_correlation([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    # ranks (0, 1.5, 1.5, 3) against (0, 1, 2, 3): Pearson of the ranks
    expected = np.corrcoef([0, 1.5, 1.5, 3], [0, 1, 2, 3])[0, 1]
    assert spearman_correlation([1, 5, 5, 9], [1, 2, 3, 4]) == pytest.approx(expected)
    assert np.isnan(spearman_correlation([1, 1, 1], [1, 2, 3]))  # no ranking to compare
    assert np.isnan(spearman_correlation([np.nan, np.nan, np.nan, 1.0], [4, 3, 2, 1]))  # nor with NaN scores


# ---- checkpoints -------------------------------------------------------------------------------------
def small_policy(denoiser="mlp"):
    config = PolicyConfig(obs_dim=11, act_dim=3, denoiser=denoiser, mlp_hidden=32, unet_dims=(16, 32), n_subpolicies=3)
    return DiffusionPolicy(config, np.zeros(11), np.ones(11), -np.ones(3), np.ones(3))


def test_checkpoint_write_is_atomic_and_load_refuses_bad_files(tmp_path, monkeypatch):
    """A failed write leaves the previous checkpoint intact; corrupt, foreign or other-env
    checkpoints are refused."""
    from test_eval import complete_checkpoint  # every field load_checkpoint requires

    path = str(tmp_path / "offline.pt")
    save_checkpoint(complete_checkpoint("offline", n_subpolicies=3, policy=small_policy().to_checkpoint()), path)
    before = open(path, "rb").read()

    def broken_save(obj, file):
        open(file, "wb").write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError):
        save_checkpoint({"gym_id": "Hopper-v5"}, path)
    monkeypatch.undo()
    assert open(path, "rb").read() == before and os.listdir(tmp_path) == ["offline.pt"]
    assert load_checkpoint(path, expected_gym_id="Hopper-v5")["gym_id"] == "Hopper-v5"
    with pytest.raises(CheckpointError, match="made for Hopper-v5, not Walker2d-v5"):
        load_checkpoint(path, expected_gym_id="Walker2d-v5")
    (tmp_path / "corrupt.pt").write_bytes(before[: len(before) // 2])
    with pytest.raises(CheckpointError, match="not a readable checkpoint"):
        load_checkpoint(str(tmp_path / "corrupt.pt"))
    torch.save({"weights": torch.zeros(2)}, tmp_path / "foreign.pt")
    with pytest.raises(CheckpointError, match="not a UEPO checkpoint"):
        load_checkpoint(str(tmp_path / "foreign.pt"))


@pytest.mark.parametrize("denoiser", ["mlp", "unet"])
def test_policy_reloads_to_the_same_actions(tmp_path, denoiser):
    """Saved and reloaded, a policy (weights, seeds, statistics, config) acts identically."""
    policy = small_policy(denoiser)
    from test_eval import complete_checkpoint  # every field load_checkpoint requires

    path = str(tmp_path / "policy.pt")
    save_checkpoint(complete_checkpoint("offline", n_subpolicies=3, policy=policy.to_checkpoint()), path)
    reloaded = DiffusionPolicy.from_checkpoint(load_checkpoint(path)["policy"])
    states = np.random.default_rng(0).normal(size=(5, 2, 11))
    np.testing.assert_array_equal(policy.act(states), reloaded.act(states))


@pytest.fixture(scope="module")
def tiny_run(minari_path, tmp_path_factory):
    """The tiny offline run, once for the tests below: (completed process, checkpoint path)."""
    folder = tmp_path_factory.mktemp("tiny_run")
    path = folder / "offline.pt"
    return run_offline(TINY_RUN + ["--checkpoint-path", str(path)], minari_path, folder), path


def test_end_to_end_offline_run_writes_a_checkpoint_that_reproduces_its_evaluation(tiny_run):
    """The tiny run trains, shows progress, evaluates, and writes a checkpoint whose reloaded
    policy reproduces the recorded evaluation returns exactly (same actions, same episodes)."""
    result, path = tiny_run
    assert result.returncode == 0, result.stderr[-3000:]
    # the progress bar (stderr): steps done of all, elapsed<remaining, and the losses' means
    assert "offline loop: 100%" in result.stderr and "30/30 [" in result.stderr and "subpolicy=" in result.stderr
    assert "eval step 30" in result.stdout
    assert list((path.parent / "runs").iterdir()), "no TensorBoard run folder under runs/"
    checkpoint = load_checkpoint(str(path), expected_gym_id="Hopper-v5")
    assert checkpoint["dataset_id"] == TINY_DATASET_ID and checkpoint["step"] == 30
    assert checkpoint["max_episode_steps"] == TINY_MAX_EPISODE_STEPS
    policy = DiffusionPolicy.from_checkpoint(checkpoint["policy"])
    assert policy.config.n_subpolicies == 4 and policy.config.denoiser == "mlp"
    replay = evaluate_sub_policies(
        policy,
        checkpoint["gym_id"],
        episodes=2,
        seed=checkpoint["args"]["seed"] * 1000,
        ref_min_score=checkpoint["ref_min_score"],
        ref_max_score=checkpoint["ref_max_score"],
        max_episode_steps=checkpoint["max_episode_steps"],
    )
    np.testing.assert_array_equal(replay["returns"], np.array(checkpoint["history"]["returns"][-1]))
    assert len(checkpoint["history"]["mean_divergence"]) == 1
    assert "critics" not in checkpoint and "dynamics" not in checkpoint


@pytest.fixture(scope="module")
def full_run(minari_path, tmp_path_factory):
    """The tiny run of the whole offline phase (qgrad), once: (completed process, checkpoint path)."""
    folder = tmp_path_factory.mktemp("full_run")
    path = folder / "offline.pt"
    return run_offline(FULL_RUN + ["--checkpoint-path", str(path)], minari_path, folder), path


def test_full_run_scores_augments_and_leaves_the_policy_training_unchanged(tiny_run, full_run, tiny_dataset):
    """The critics and the dynamics model train in the same loop, every sub-policy gets an AM-Q
    score, the augmentation buffer is refreshed after the warm-up within its cap, and the base
    policy is bit-identical to the run without any of this (its own random stream)."""
    result, path = full_run
    assert result.returncode == 0, result.stderr[-3000:]
    assert "critic_q=" in result.stderr and "dynamics=" in result.stderr and "AM-Q per sub-policy" in result.stdout
    checkpoint = load_checkpoint(str(path))
    history = checkpoint["history"]
    ope_scores = np.array(history["ope_scores"][-1])
    assert ope_scores.shape == (4,) and np.isfinite(ope_scores).all()
    assert np.isfinite(history["dynamics_holdout_nll"][-1])
    # Refreshed at steps 10 and 20 (not at the last step, 30); never above --augment-ratio x |D|.
    assert [step for step, _, _ in history["augmentation"]] == [10, 20]
    cap = int(0.02 * tiny_dataset.total_steps)
    assert all(0 <= size <= cap for _, size, _ in history["augmentation"])
    assert all(epsilon > 0 for _, _, epsilon in history["augmentation"])
    # (The tiny policy's saturated chunks are far outside the random data, so the filter keeps few
    # or none of them here; what it keeps and the mixing are tested in test_critics.py.)
    plain = load_checkpoint(str(tiny_run[1]))["policy"]["state_dict"]
    for name, tensor in checkpoint["policy"]["state_dict"].items():
        assert torch.equal(tensor, plain[name]), name


def test_full_run_checkpoint_reloads_with_all_parts(full_run):
    """Critics, dynamics and every improved copy reload; each copy is the best-by-OPE snapshot of
    its gate and reproduces its recorded real evaluation; the copies are the top sub-policies by AM-Q."""
    result, path = full_run
    assert result.returncode == 0, result.stderr[-3000:]
    checkpoint = load_checkpoint(str(path), expected_gym_id="Hopper-v5")
    critics = ChunkCritics(**checkpoint["critics"]["config"])
    critics.load_state_dict(checkpoint["critics"]["state_dict"])
    dynamics = EnsembleDynamics(**checkpoint["dynamics"]["config"])
    dynamics.load_state_dict(checkpoint["dynamics"]["state_dict"])
    ope_scores = np.array(checkpoint["history"]["ope_scores"][-1])
    improved = checkpoint["improved"]
    # The copies are the top two by AM-Q; the saved order is the offline choice first.
    assert sorted(entry["sub_policy"] for entry in improved) == sorted(np.argsort(-ope_scores)[:2])
    assert [entry["choice_rank"] for entry in improved] == [0, 1]
    assert "offline choice: sub-policy" in result.stdout
    assert deployed_choice(checkpoint)[2] == improved[0]["sub_policy"]  # what eval and online deploy
    for entry in improved:
        assert entry["operator"] == "qgrad"
        steps = [step for step, _, _, _ in entry["ope_history"]]
        assert steps == [0, 3, 6]
        # The kept snapshot is the last accepted one, and every acceptance had a gain bound above
        # --gate-margin times the score it replaced.
        accepted = [(step, score, bound) for step, score, ok, bound in entry["ope_history"] if ok]
        assert entry["best_step"] == accepted[-1][0] and entry["ope_score"] == accepted[-1][1]
        margin = checkpoint["args"]["gate_margin"]
        assert all(new[2] > margin * abs(old[1]) for old, new in zip(accepted, accepted[1:]))
        sums, counts = entry["ope_rollouts"]
        assert torch.isclose(sums.sum() / counts.sum(), torch.tensor(entry["ope_score"]))
        policy = DiffusionPolicy.from_checkpoint(entry["policy"])
        replay = evaluate_sub_policies(
            policy,
            checkpoint["gym_id"],
            episodes=2,
            seed=checkpoint["args"]["seed"] * 1000,
            ref_min_score=checkpoint["ref_min_score"],
            ref_max_score=checkpoint["ref_max_score"],
            max_episode_steps=checkpoint["max_episode_steps"],
        )
        np.testing.assert_array_equal(replay["scores"][entry["sub_policy"]], entry["scores"])
    # The offline choice: the copies' model returns over whole episodes from the same episode
    # starts, compared by the gate's rule; the checkpoint lists them in that order.
    returns = [entry["model_returns"] for entry in improved]
    assert all(r.shape == returns[0].shape and r.isfinite().all() for r in returns)
    rule = (checkpoint["args"]["gate_confidence"], checkpoint["args"]["gate_margin"])
    by_qualification = sorted(range(len(improved)), key=lambda k: -improved[k]["base_ope_score"])
    choice, _ = confident_choice([(returns[k], torch.ones_like(returns[k])) for k in by_qualification], *rule)
    assert by_qualification[choice] == 0
    assert "offline choice: sub-policy" in result.stdout and "model return gain" in result.stdout
    assert "| sub-policy | AM-Q | real before |" in result.stdout


def test_improvement_from_the_loops_checkpoint_equals_the_one_command_run(full_run, minari_path, tmp_path):
    """--init-checkpoint with the loop's own seed continues its random stream, so the loop and the
    improvement run as two commands give the one-command run's improved copies, bit for bit."""
    _, path = full_run
    out = tmp_path / "split.pt"
    result = run_offline(
        FULL_RUN + ["--init-checkpoint", str(path), "--checkpoint-path", str(out)], minari_path, tmp_path
    )
    assert result.returncode == 0, result.stderr[-3000:]
    one_command, split = load_checkpoint(str(path)), load_checkpoint(str(out))
    assert [e["sub_policy"] for e in split["improved"]] == [e["sub_policy"] for e in one_command["improved"]]
    for a, b in zip(one_command["improved"], split["improved"]):
        assert a["best_step"] == b["best_step"] and a["ope_history"][1:] == b["ope_history"][1:]
        for name, tensor in a["policy"]["state_dict"].items():
            assert torch.equal(tensor, b["policy"]["state_dict"][name]), name


def test_init_checkpoint_runs_only_the_improvement(full_run, minari_path, tmp_path):
    """--init-checkpoint skips the loop, re-evaluates the loaded policy to the same scores, and
    improves with the other operator (bppo); it refuses a checkpoint of another environment or
    one trained with other policy settings, with the reason."""
    _, path = full_run
    out = tmp_path / "bppo.pt"
    result = run_offline(
        FULL_RUN
        + [
            "--init-checkpoint",
            str(path),
            "--improvement",
            "bppo",
            "--num-qualified",
            "1",
            "--checkpoint-path",
            str(out),
        ],
        minari_path,
        tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "step 10/30" not in result.stdout and "improvement (bppo)" in result.stdout
    original, rerun = load_checkpoint(str(path)), load_checkpoint(str(out))
    assert rerun["history"]["scores"][-1] == original["history"]["scores"][-1]
    assert [entry["operator"] for entry in rerun["improved"]] == ["bppo"]
    ratio = [tag for tag in logged_scalars(tmp_path) if tag.startswith("improvement_") and tag.endswith("/ratio")]
    assert ratio, "bppo logs its likelihood ratio"
    # Refusals: another environment; other policy settings.
    foreign = load_checkpoint(str(path))
    foreign["gym_id"] = "Walker2d-v5"
    save_checkpoint(foreign, str(tmp_path / "walker.pt"))
    result = run_offline(FULL_RUN + ["--init-checkpoint", str(tmp_path / "walker.pt")], minari_path, tmp_path)
    assert result.returncode == 2 and "made for Walker2d-v5, not Hopper-v5" in result.stderr
    result = run_offline(FULL_RUN + ["--init-checkpoint", str(path), "--tau", "0.3"], minari_path, tmp_path)
    assert result.returncode == 2 and "pass the arguments it was trained with" in result.stderr


def test_improvement_without_the_models_is_refused(minari_path, tmp_path):
    """--no-ope with the default --num-qualified says what to pass instead, before any training."""
    result = run_offline(TINY_POLICY + ["--no-ope"], minari_path, tmp_path)
    assert result.returncode == 2 and "--num-qualified 0" in result.stderr
    assert not (tmp_path / "runs").exists()


def test_each_component_switches_off(minari_path, tmp_path):
    """Plain diffusion BC (--n-subpolicies 1 --eta 0 --kl-coef 0) runs, with no sub-policy loss."""
    path = tmp_path / "bc.pt"
    switches = ["--n-subpolicies", "1", "--eta", "0", "--disagreement-coef", "0"]
    result = run_offline(TINY_RUN + switches + ["--checkpoint-path", str(path)], minari_path, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "subpolicy" not in result.stdout
    checkpoint = load_checkpoint(str(path))
    assert checkpoint["policy"]["config"]["n_subpolicies"] == 1
    assert np.array(checkpoint["history"]["scores"][-1]).shape == (1, 2)


def test_paper_scale_swaps_the_defaults_and_flags_beside_it_still_win():
    """The default command is the CPU setting; --paper-scale starts from PAPER_SCALE, and a flag
    given beside it overrides that preset."""
    quick = parse_args([])
    assert quick.denoiser == "mlp" and quick.total_steps == 20_000 and not quick.paper_scale
    paper = parse_args(["--paper-scale", "--total-steps", "7"])
    assert paper.paper_scale and paper.total_steps == 7
    for name, value in PAPER_SCALE.items():
        if name != "total_steps":
            assert getattr(paper, name) == value, name


def test_loss_means_are_per_loss_since_the_last_log_and_reach_tensorboard_and_the_bar():
    """A loss logged every step and one logged every other step: each is averaged over its own
    entries since the last log, written under the prefix, shown on the bar, and then reset."""
    written, shown = [], {}

    class Writer:
        def add_scalar(self, tag, value, step):
            written.append((tag, value, step))

    class Bar:
        def set_postfix(self, values, refresh):
            shown.update(values)

    means = LossMeans(Writer(), "losses")
    for logs in [{"a": 1.0, "b": 10.0}, {"a": 3.0}, {"a": 5.0, "b": 20.0}]:
        means.add(logs)
    means.log(3, Bar())
    assert written == [("losses/a", 3.0, 3), ("losses/b", 15.0, 3)] and shown == {"a": "3.0000", "b": "15.0000"}
    means.add({"a": 7.0})
    means.log(4, Bar())
    assert written[-1] == ("losses/a", 7.0, 4) and len(written) == 3


@pytest.mark.parametrize(
    "argv, flag",
    [
        (["--total-steps", "0"], "--total-steps"),
        (["--batch-size", "0"], "--batch-size"),
        (["--n-subpolicies", "0", "--no-ope", "--num-qualified", "0"], "--n-subpolicies"),
        (["--total-steps", "0", "--no-ope", "--num-qualified", "0"], "--total-steps"),
        (["--eval-every", "0"], "--eval-every"),
        (["--disagreement-every", "0"], "--disagreement-every"),
        (["--history-size", "0"], "--history-size"),
        (["--diffusion-steps", "1"], "--diffusion-steps"),
        (["--ddim-steps", "0"], "--ddim-steps"),
        (["--ddim-steps", "21"], "--ddim-steps"),
        (["--eval-episodes", "0"], "--eval-episodes"),
        (["--disagreement-coef", "nan"], "--disagreement-coef"),
        (["--tau", "0"], "--tau"),
        (["--gamma", "1.5"], "--gamma"),
        (["--gate-confidence", "1"], "--gate-confidence"),
        (["--gate-margin", "nan"], "--gate-margin"),
        (["--num-qualified", "9"], "--num-qualified"),
        (["--init-checkpoint", "a.pt", "--checkpoint-path", "a.pt"], "--checkpoint-path"),
        (["--checkpoint-path", "/proc/no/offline.pt"], "--checkpoint-path"),
    ],
)
def test_check_args_names_the_flag_out_of_range(argv, flag):
    """Every argument out of its range is refused before any work, the flag named."""
    message = check_args(parse_args(argv))
    assert message is not None and flag in message
    assert check_args(parse_args([])) is None


def test_bad_argument_exits_with_one_line_and_no_traceback():
    result = subprocess.run(
        [sys.executable, os.path.join(ROOT, "uepo_offline.py"), "--ddim-steps", "0"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode != 0 and "--ddim-steps" in result.stderr and "Traceback" not in result.stderr


def make_dataset(dataset_id, num_episodes, seed=0, rewards_nan=False):
    """A tiny random-policy Hopper-v5 dataset under the current MINARI_DATASETS_PATH."""
    import minari

    from conftest import HOPPER_REF_MAX, HOPPER_REF_MIN, random_episode_buffers

    buffers, env = random_episode_buffers(num_episodes, seed=seed)
    if rewards_nan:
        buffers[0].rewards[0] = float("nan")
    minari.create_dataset_from_buffers(
        dataset_id,
        buffers,
        env=env,
        algorithm_name="random",
        author="tests",
        author_email="none",
        code_permalink="tests",
        eval_env=env.spec,
        description="tiny",
        ref_min_score=HOPPER_REF_MIN,
        ref_max_score=HOPPER_REF_MAX,
    )


def test_medium_expert_is_built_whole_and_a_partial_one_is_refused(tmp_path, monkeypatch):
    """medium-expert is combined in a temporary folder and renamed into place: it has every episode
    of both sources and no temporary folder is left; a local medium-expert with fewer episodes
    than its sources (what an interrupted in-place build leaves) is refused with the fix named."""
    import minari

    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path))
    make_dataset("mujoco/hopper/medium-v0", 3, seed=0)
    make_dataset("mujoco/hopper/expert-v0", 2, seed=10)
    dataset, dataset_id, _, _ = load_dataset("hopper-medium-expert", None)
    assert dataset_id == "mujoco/hopper/medium-expert-v0" and dataset.total_episodes == 5
    assert not [name for name in os.listdir(tmp_path) if name.startswith(".building-")]
    # A partial one: only the medium episodes under the combined id.
    (tmp_path / "mujoco/hopper/medium-expert-v0").rename(tmp_path / ".complete")  # hidden: minari skips it
    minari.combine_datasets([minari.load_dataset("mujoco/hopper/medium-v0")], "mujoco/hopper/medium-expert-v0")
    with pytest.raises(DatasetError, match="incomplete.*Delete"):
        load_dataset("hopper-medium-expert", None)


def test_non_finite_dataset_is_refused_with_its_name(tmp_path, monkeypatch):
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path))
    make_dataset("test/hopper/nan-v0", 2, rewards_nan=True)
    dataset, *_ = load_dataset("hopper-medium", "test/hopper/nan-v0")
    with pytest.raises(DatasetError, match="test/hopper/nan-v0.*non-finite rewards"):
        chunk_dataset(dataset, 4, 2, 0.99)


KILL_AFTER_FIRST_SAVE = """
real_save = eval_module.save_checkpoint
def save_then_die(checkpoint, path):
    real_save(checkpoint, path)
    os._exit(137)  # killed right after the first checkpoint: no cleanup, nothing flushed
eval_module.save_checkpoint = save_then_die
"""


def test_resume_after_a_kill_gives_the_uninterrupted_checkpoint(minari_path, tmp_path):
    """A run killed right after its step-20 checkpoint and continued with --resume ends with the
    same policy, critics, dynamics model, improved copies and history as the same run never
    interrupted (same seed, CPU)."""
    arguments = FULL_RUN + ["--total-steps", "40", "--eval-every", "20"]
    whole = run_offline(arguments + ["--checkpoint-path", str(tmp_path / "whole.pt")], minari_path, tmp_path)
    assert whole.returncode == 0, whole.stderr[-3000:]
    cut = ["--checkpoint-path", str(tmp_path / "cut.pt")]
    killed = run_offline_patched(KILL_AFTER_FIRST_SAVE, arguments + cut, minari_path, tmp_path)
    assert killed.returncode == 137, killed.stderr[-3000:]
    cut = load_checkpoint(str(tmp_path / "cut.pt"))
    assert cut["step"] == 20 and cut["resume"]["step"] == 20 and not cut["improved"]
    resumed = run_offline(["--resume", str(tmp_path / "cut.pt")], minari_path, tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming" in resumed.stdout and "after step 20" in resumed.stdout
    a, b = load_checkpoint(str(tmp_path / "whole.pt")), load_checkpoint(str(tmp_path / "cut.pt"))
    assert a["step"] == b["step"] == 40
    for part in ("policy", "critics", "dynamics"):
        for name, tensor in a[part]["state_dict"].items():
            assert torch.equal(tensor, b[part]["state_dict"][name]), (part, name)
    assert len(a["improved"]) == len(b["improved"]) == 2
    for x, y in zip(a["improved"], b["improved"]):
        assert x["sub_policy"] == y["sub_policy"] and x["ope_score"] == y["ope_score"]
        for name, tensor in x["policy"]["state_dict"].items():
            assert torch.equal(tensor, y["policy"]["state_dict"][name]), name
    assert a["history"]["scores"] == b["history"]["scores"] and a["history"]["ope_scores"] == b["history"]["ope_scores"]


def test_resume_refuses_a_checkpoint_without_training_state(minari_path, tmp_path, full_run):
    """A run cut off in its improvement stage whose checkpoint holds no loop state (as an improvement-only
    run's) has nothing to continue from; the message says what to do."""
    _, path = full_run
    checkpoint = load_checkpoint(str(path))
    checkpoint["resume"], checkpoint["improved"] = None, []
    save_checkpoint({key: value for key, value in checkpoint.items() if key != "format"}, str(tmp_path / "x.pt"))
    result = run_offline(["--resume", str(tmp_path / "x.pt")], minari_path, tmp_path)
    assert result.returncode != 0 and "no training state" in result.stderr and "Traceback" not in result.stderr


def test_j_reading_chooses_the_sub_policy_term(minari_path, tmp_path):
    """The default reads J on each sub-policy's own sequence (a repulsion: the loss term is -alpha x a
    non-negative gap, <= 0); `--j-reading dataset-sequence` scores the data (the term is -alpha x a
    non-positive disagreement, >= 0). The two readings train different policies."""
    logged = {}
    for reading in ("own-sequence", "dataset-sequence"):
        folder = tmp_path / reading
        folder.mkdir()
        path = folder / "offline.pt"
        result = run_offline(TINY_RUN + ["--j-reading", reading, "--checkpoint-path", str(path)], minari_path, folder)
        assert result.returncode == 0, result.stderr[-3000:]
        logged[reading] = [value for _, value in logged_scalars(folder)["losses/subpolicy"]]
    assert logged["own-sequence"] and all(value <= 0 for value in logged["own-sequence"])
    assert all(value >= 0 for value in logged["dataset-sequence"])
    assert parse_args([]).j_reading == "own-sequence"
    own = load_checkpoint(str(tmp_path / "own-sequence" / "offline.pt"))["policy"]["state_dict"]
    data = load_checkpoint(str(tmp_path / "dataset-sequence" / "offline.pt"))["policy"]["state_dict"]
    assert any(not torch.equal(own[name], data[name]) for name in own)
