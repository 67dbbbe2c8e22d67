"""The checkpoint tools on tiny checkpoints: eval.py (every sub-policy of a checkpoint) and
benchmarks/robustness.py (with its perturbation wrappers), report.py and speed.py."""

import json
import os
import subprocess
import sys

import gymnasium as gym
import numpy as np
import pytest
from test_diffusion import make_policy
from torch.utils.tensorboard import SummaryWriter

from conftest import HOPPER_REF_MAX, HOPPER_REF_MIN, ROOT
from diffusion import OnlineActor
from eval import load_checkpoint, save_checkpoint

sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
from robustness import ActionNoise, ObservationNoise, RandomPush, ScaledModel  # noqa: E402

# The tools by the name the tests give them: `policy` is eval.py, the others live in benchmarks/.
TOOLS = {
    "policy": ["eval.py"],
    "robustness": ["benchmarks", "robustness.py"],
    "report": ["benchmarks", "report.py"],
    "speed": ["benchmarks", "speed.py"],
}


def run_eval(arguments, cwd, extra_env=None):
    """`arguments[0]` names the tool (`TOOLS`), the rest are its command line."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", **(extra_env or {})}
    tool, *rest = arguments
    return subprocess.run(
        [sys.executable, os.path.join(ROOT, *TOOLS[tool]), *rest],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


# ---- policy ------------------------------------------------------------------------------------------
def test_policy_replays_the_recorded_scores_and_measures_the_divergence(offline_checkpoint, tmp_path):
    """With the training run's episodes and seed, every row reproduces the score the offline run
    recorded (base sub-policies at the last evaluation, the improved copy at its end); the OPE
    sits beside it; the divergence matrix is symmetric with a zero diagonal; the deployed row is
    the offline choice."""
    out = tmp_path / "policy.json"
    result = run_eval(
        ["policy", "--checkpoint", str(offline_checkpoint), "--episodes", "2", "--json", str(out)], tmp_path
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "| candidate | normalized score | offline OPE | deployed |" in result.stdout
    report = json.loads(out.read_text())
    checkpoint = load_checkpoint(str(offline_checkpoint))
    n = checkpoint["policy"]["config"]["n_subpolicies"]
    base_rows, improved_rows = report["rows"][:n], report["rows"][n:]
    for i, row in enumerate(base_rows):
        np.testing.assert_array_equal(row["scores"], checkpoint["history"]["scores"][-1][i])
        assert row["ope"] == pytest.approx(checkpoint["history"]["ope_scores"][-1][i])
    (entry,) = checkpoint["improved"]
    (improved,) = improved_rows
    np.testing.assert_array_equal(improved["scores"], entry["scores"])
    assert improved["ope"] == pytest.approx(entry["ope_score"]) and improved["deployed"]
    assert [row["deployed"] for row in report["rows"]].count(True) == 1
    matrix = np.array(report["divergence"]["matrix"])
    assert matrix.shape == (n, n) and np.allclose(matrix, matrix.T, atol=1e-5)
    assert np.all(np.diag(matrix) == 0) and (matrix[~np.eye(n, dtype=bool)] > 0).all()


def test_policy_on_an_online_checkpoint_evaluates_the_fine_tuned_actor(online_run, tmp_path):
    _, path = online_run
    out = tmp_path / "policy.json"
    result = run_eval(
        ["policy", "--checkpoint", str(path), "--episodes", "2", "--no-divergence", "--json", str(out)], tmp_path
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(out.read_text())
    checkpoint = load_checkpoint(str(path))
    (deployed,) = report["rows"]
    assert deployed["deployed"] and deployed["sub_policy"] == checkpoint["sub_policy"]
    assert "fine-tuned online (noise actor)" in deployed["label"]
    np.testing.assert_array_equal(deployed["scores"], checkpoint["history"]["scores"][-1])
    assert all(row["ope"] is None for row in report["rows"]) and report["divergence"] is None


def test_policy_says_how_to_get_a_missing_dataset_and_refuses_a_bad_sub_policy(offline_checkpoint, tmp_path):
    empty = tmp_path / "no_datasets"
    empty.mkdir()
    result = run_eval(
        ["policy", "--checkpoint", str(offline_checkpoint), "--episodes", "1"],
        tmp_path,
        {"MINARI_DATASETS_PATH": str(empty)},
    )
    assert result.returncode == 2 and "minari download" in result.stderr and "--no-divergence" in result.stderr
    result = run_eval(["policy", "--checkpoint", str(offline_checkpoint), "--sub-policy", "9"], tmp_path)
    assert result.returncode == 2 and "--sub-policy must be in [0, 3]" in result.stderr
    assert "Traceback" not in result.stderr


def test_policy_action_steps_re_plans_within_the_chunk_and_refuses_more(offline_checkpoint, tmp_path):
    """--action-steps H is the default whole-chunk execution (the recorded scores); 1 re-plans at
    every step and runs; 0 and more than the checkpoint's H (4) are refused with one line."""
    checkpoint = load_checkpoint(str(offline_checkpoint))
    common = ["policy", "--checkpoint", str(offline_checkpoint), "--episodes", "2", "--no-divergence"]
    for steps in ("4", "1"):
        out = tmp_path / f"policy{steps}.json"
        result = run_eval(common + ["--action-steps", steps, "--json", str(out)], tmp_path)
        assert result.returncode == 0, result.stderr[-3000:]
        rows = json.loads(out.read_text())["rows"]
        if steps == "4":
            for i, row in enumerate(rows[: checkpoint["policy"]["config"]["n_subpolicies"]]):
                np.testing.assert_array_equal(row["scores"], checkpoint["history"]["scores"][-1][i])
        assert all(np.isfinite(row["scores"]).all() for row in rows)
    for steps, message in (
        ("0", "--action-steps must be in [1, 64]"),
        ("5", "at most the checkpoint's chunk size H = 4"),
    ):
        result = run_eval(common + ["--action-steps", steps], tmp_path)
        assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr


# ---- robustness ---------------------------------------------------------------------------------------
def test_robustness_at_strength_zero_reproduces_the_clean_score(offline_checkpoint, tmp_path):
    """Every perturbation at strength 0 gives the clean returns exactly (same seeds); action noise
    and mass at a real strength change them. (The tiny policy's chunks are saturated, so it
    ignores observation noise; its short falls hardly slide, and end before the push window: those
    wrappers are tested on their own below.)"""
    out = tmp_path / "robustness.json"
    result = run_eval(
        [
            "robustness",
            "--checkpoint",
            str(offline_checkpoint),
            "--episodes",
            "2",
            "--observation-noise",
            "0",
            "0.5",
            "--action-noise",
            "0",
            "0.5",
            "--mass",
            "0",
            "0.5",
            "--friction",
            "0",
            "-0.5",
            "--push",
            "0",
            "--json",
            str(out),
        ],
        tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "| perturbation | strength | normalized score | drop from clean |" in result.stdout
    rows = json.loads(out.read_text())["rows"]
    clean = rows[0]
    assert clean["perturbation"] == "none" and len(rows) == 1 + 2 + 2 + 2 + 2 + 1
    for row in rows[1:]:
        if row["strength"] == 0:
            assert row["scores"] == clean["scores"] and row["relative_drop"] == 0, row["perturbation"]
        elif row["perturbation"] in ("action_noise", "mass"):
            assert row["scores"] != clean["scores"], row["perturbation"]
            assert row["relative_drop"] == pytest.approx((clean["mean"] - row["mean"]) / abs(clean["mean"]))


def test_robustness_refuses_impossible_strengths(offline_checkpoint, tmp_path):
    result = run_eval(["robustness", "--checkpoint", str(offline_checkpoint), "--mass", "-1"], tmp_path)
    assert result.returncode == 2 and "--mass must be in (-1, 100], got -1.0" in result.stderr
    result = run_eval(["robustness", "--checkpoint", str(offline_checkpoint), "--action-noise", "-0.1"], tmp_path)
    assert result.returncode == 2 and "must be in [0, 100]" in result.stderr and "Traceback" not in result.stderr


def rollout(env, steps=150):
    """Observations under a fixed open-loop action sequence from a fixed start."""
    env.reset(seed=0)
    actions = np.random.default_rng(0).uniform(-1, 1, (steps, 3))
    return np.array([env.step(action)[0] for action in actions])


def test_mass_and_friction_scaling_change_the_mujoco_model_and_are_undone_on_close():
    """The scaled fields of the environment's own MjModel change (and with them the motion), and
    return to their values on close."""
    clean = rollout(gym.make("Hopper-v5", terminate_when_unhealthy=False))
    for quantity in ("mass", "friction"):
        scaled = ScaledModel(gym.make("Hopper-v5", terminate_when_unhealthy=False), quantity, -0.5)
        assert np.abs(rollout(scaled) - clean).max() > 1e-2, quantity
        scaled.close()
    env = gym.make("Hopper-v5")
    model = env.unwrapped.model
    mass, inertia, friction = model.body_mass.copy(), model.body_inertia.copy(), model.geom_friction.copy()
    scaled = ScaledModel(env, "mass", 0.5)
    np.testing.assert_allclose(model.body_mass, 1.5 * mass)
    np.testing.assert_allclose(model.body_inertia, 1.5 * inertia)
    scaled.close()
    np.testing.assert_array_equal(model.body_mass, mass)
    np.testing.assert_array_equal(model.body_inertia, inertia)
    env = gym.make("Hopper-v5")
    model = env.unwrapped.model
    scaled = ScaledModel(env, "friction", -0.5)
    np.testing.assert_allclose(model.geom_friction[:, 0], 0.5 * friction[:, 0])
    np.testing.assert_array_equal(model.geom_friction[:, 1:], friction[:, 1:])  # torsional, rolling unchanged
    scaled.close()
    np.testing.assert_array_equal(model.geom_friction, friction)
    with pytest.raises(ValueError, match="non-positive"):
        ScaledModel(gym.make("Hopper-v5"), "mass", -1.0)


def test_push_applies_a_force_in_its_window_only_and_moves_the_robot():
    env = RandomPush(gym.make("Hopper-v5"), strength=1.0, seed=0, window=(2, 3))
    reference = gym.make("Hopper-v5")
    env.reset(seed=0)
    reference.reset(seed=0)
    weight = env.unwrapped.model.body_mass.sum() * 9.81
    forces, positions = [], []
    for _ in range(2 + env.push_steps + 2):
        obs = env.step(np.zeros(3))[0]
        ref_obs = reference.step(np.zeros(3))[0]
        forces.append(env.unwrapped.data.xfrc_applied[1, 0])
        positions.append(np.abs(obs - ref_obs).max())
    pushing = np.abs(forces) > 0
    assert not pushing[:2].any() and pushing[2 : 2 + env.push_steps].all() and not pushing[2 + env.push_steps :].any()
    assert np.abs(forces[2]) == pytest.approx(weight, rel=1e-3)
    assert positions[1] == 0 and positions[-1] > 1e-3  # identical until the push, different after


def test_noise_wrappers_draw_their_own_seeded_noise():
    """Same seed, same noise; the environment's own random stream is untouched (same reset)."""
    observations = []
    for _ in range(2):
        env = ObservationNoise(gym.make("Hopper-v5"), 0.1, np.ones(11), seed=5)
        observations.append(env.reset(seed=0)[0])
    clean = gym.make("Hopper-v5").reset(seed=0)[0]
    np.testing.assert_array_equal(observations[0], observations[1])
    assert 0 < np.abs(observations[0] - clean).max() < 1
    env = ActionNoise(gym.make("Hopper-v5"), 10.0, seed=0)
    noisy = env.action(np.zeros(3, dtype=np.float32))
    assert np.all(np.abs(noisy) <= 1) and np.abs(noisy).max() == 1  # clipped to the bounds


# ---- report ---------------------------------------------------------------------------------------------
def complete_checkpoint(phase, n_subpolicies=2, **fields):
    """A hand-made checkpoint of this phase with every field `load_checkpoint` requires (a tiny policy
    or actor of n sub-policies, one evaluation), `fields` replacing any of them."""
    common = {
        "phase": phase,
        "args": {"seed": 1, "gamma": 0.99},
        "gym_id": "Hopper-v5",
        "dataset_id": "mujoco/hopper/medium-v0",
        "max_episode_steps": 1000,
        "ref_min_score": HOPPER_REF_MIN,
        "ref_max_score": HOPPER_REF_MAX,
    }
    if phase == "offline":
        return {
            **common,
            "step": 0,
            "policy": make_policy(n_subpolicies=n_subpolicies).to_checkpoint(),
            "improved": [],
            "history": {"step": [0], "scores": [[[0.0]] * n_subpolicies]},
            **fields,
        }
    actor = OnlineActor("noise", make_policy(n_subpolicies=n_subpolicies), 0, 0.3)
    return {
        **common,
        "global_step": 0,
        "offline_checkpoint": "none",
        "actor": actor.to_checkpoint(),
        "sub_policy": 0,
        "selection": "",
        "value": {},
        "history": {"step": [0], "scores": [[0.0]]},
        **fields,
    }


def hand_made_run(runs_dir, name, phase, seed, scores, curve, dataset_id="mujoco/hopper/medium-v0", **extra):
    """A run folder as the scripts write it: a checkpoint with the parts the report reads (and the
    rest of what `load_checkpoint` requires), and TensorBoard logs with the curve."""
    folder = runs_dir / name
    history = {"step": [step for step, _ in curve], "scores": scores, **extra.pop("history", {})}
    save_checkpoint(
        complete_checkpoint(phase, dataset_id=dataset_id, args={"seed": seed, "gamma": 0.99}, history=history, **extra),
        str(folder / f"{phase}.pt"),
    )
    writer = SummaryWriter(str(folder))
    tag = "charts/normalized_score" if phase == "online" else "charts/normalized_score_mean"
    for step, value in curve:
        writer.add_scalar(tag, value, step)
    writer.close()


def test_report_table_matches_hand_made_runs(tmp_path):
    runs = tmp_path / "runs"
    # Online, hopper-medium: final scores 90 and 100 -> 95.0 +- 7.1 (sample std); walker2d-medium: 60.
    hand_made_run(runs, "hopper-medium__ft__1__1", "online", 1, [[50.0], [80.0, 100.0]], [(0, 50.0), (1000, 90.0)])
    hand_made_run(runs, "hopper-medium__ft__2__1", "online", 2, [[50.0], [90.0, 110.0]], [(0, 60.0), (1010, 100.0)])
    hand_made_run(
        runs, "walker2d-medium__ft__1__1", "online", 1, [[60.0]], [(0, 60.0)], dataset_id="mujoco/walker2d/medium-v0"
    )
    # Offline, hopper-medium only: the improved copy with the best gated OPE (70) counts, not the
    # better-scoring one (90); a run without improvement counts its AM-Q pick (sub-policy 1: 40).
    base_policy = make_policy(n_subpolicies=2).to_checkpoint()
    hand_made_run(
        runs,
        "hopper-medium__off__1__1",
        "offline",
        1,
        [[[10.0], [20.0]]],
        [(100, 15.0)],
        policy=base_policy,
        improved=[
            {"sub_policy": 0, "operator": "qgrad", "policy": base_policy, "ope_score": 5.0, "scores": [70.0]},
            {"sub_policy": 1, "operator": "qgrad", "policy": base_policy, "ope_score": 4.0, "scores": [90.0]},
        ],
    )
    hand_made_run(
        runs,
        "hopper-medium__off__2__1",
        "offline",
        2,
        [[[10.0], [40.0]]],
        [(100, 25.0)],
        policy=base_policy,
        history={"ope_scores": [[1.0, 2.0]]},
    )
    result = run_eval(["report", str(runs), "--out", str(tmp_path / "report")], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    report = (tmp_path / "report" / "report.md").read_text()
    assert "| dataset | off | ft |" in report
    assert "| hopper-medium | 55.0 +- 21.2 | 95.0 +- 7.1 |" in report
    assert "| walker2d-medium | - | 60.0 +- 0.0 |" in report
    assert "| total | - | 155.0 |" in report
    for png in (
        "curves_hopper-medium_online.png",
        "curves_hopper-medium_offline.png",
        "curves_walker2d-medium_online.png",
    ):
        assert (tmp_path / "report" / png).stat().st_size > 1000
    # curves.csv keeps every run's evaluations and score: read back alone, the same table and curves.
    csv_file = tmp_path / "report" / "curves.csv"
    csv_path, curves = str(csv_file), csv_file.read_text().splitlines()
    assert curves[0] == "dataset,method,phase,seed,step,score,final_score"
    assert "hopper-medium,ft,online,2,1010,100.0,100.0" in curves and len(curves) == 1 + 2 + 2 + 1 + 1 + 1
    result = run_eval(["report", "--curves", csv_path, "--out", str(tmp_path / "back")], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    back = (tmp_path / "back" / "report.md").read_text()
    assert "| hopper-medium | 55.0 +- 21.2 | 95.0 +- 7.1 |" in back and "| total | - | 155.0 |" in back
    assert (tmp_path / "back" / "curves_hopper-medium_online.png").stat().st_size > 1000
    result = run_eval(["report", "--curves", csv_path], tmp_path)
    assert result.returncode == 2 and "--out is needed" in result.stderr
    result = run_eval(["report", "--out", str(tmp_path / "back")], tmp_path)
    assert result.returncode == 2 and "nothing to report" in result.stderr
    result = run_eval(["report", str(runs), "--out", str(tmp_path / "ordered"), "--methods", "ft", "off"], tmp_path)
    assert result.returncode == 0 and "| dataset | ft | off |" in (tmp_path / "ordered" / "report.md").read_text()
    result = run_eval(["report", str(runs), "--methods", "ft", "sac"], tmp_path)
    assert result.returncode == 2 and "no runs of sac" in result.stderr and "methods found: ft, off" in result.stderr
    result = run_eval(["report", str(tmp_path / "nothing_here")], tmp_path)
    assert result.returncode == 2 and "no folder" in result.stderr


# ---- speed ------------------------------------------------------------------------------------------------
def test_speed_prints_every_figure_for_the_diffusion_policy_and_the_reference(tmp_path):
    out = tmp_path / "speed.json"
    result = run_eval(
        [
            "speed",
            "--denoisers",
            "mlp",
            "--gradient-steps",
            "2",
            "--decisions",
            "2",
            "--online-timesteps",
            "100",
            "--json",
            str(out),
        ],
        tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    speed = json.loads(out.read_text())
    assert set(speed["policies"]) == {"diffusion (mlp denoiser)", "MLP Gaussian (reference)"}
    for figures in speed["policies"].values():
        for key in ("gradient_steps_per_second", "decision_latency_ms_batch_1", "decision_latency_ms_batch_64"):
            assert figures[key] > 0, key
    diffusion_online = speed["policies"]["diffusion (mlp denoiser)"]["online_env_steps_per_second"]
    assert set(diffusion_online) == {"noise", "residual"} and min(diffusion_online.values()) > 0
    assert speed["policies"]["MLP Gaussian (reference)"]["online_env_steps_per_second"] > 0
    assert speed["policies"]["diffusion (mlp denoiser)"]["actions_per_decision"] == 4
    assert not list(tmp_path.glob("runs"))  # the online measurement leaves nothing behind
