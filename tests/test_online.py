"""uepo_online.py: loading and refusing checkpoints, GAE over chunks, the chunk-level environment,
the online actors (ratio 1 and KL 0 at the hand-over, likelihoods, gradients), reward scaling,
tiny end-to-end PPO runs of every actor whose checkpoints reload to their recorded scores, and
--resume (the environments' saved state, a killed run continued to the uninterrupted checkpoint)."""

import math
import os
import subprocess
import sys

import gymnasium as gym
import numpy as np
import pytest
import torch
from test_diffusion import make_policy, random_states
from test_offline import PATCHED_RUN

from conftest import ROOT, TINY_MAX_EPISODE_STEPS, logged_scalars
from diffusion import ONLINE_ACTORS, OnlineActor
from divergence import gaussian_log_prob
from eval import ChunkEnv, evaluate_sub_policies, load_checkpoint
from uepo_online import RewardScaler, actor_losses, chunk_gae, step_info

# A tiny PPO run (the paper's learner; --algo td3 after it in TINY_TD3 overrides it: the last flag wins).
TINY_ONLINE = [
    "--algo",
    "ppo",
    "--total-timesteps",
    "300",
    "--num-envs",
    "2",
    "--num-steps",
    "8",
    "--num-minibatches",
    "2",
    "--update-epochs",
    "2",
    "--eval-every",
    "150",
    "--eval-episodes",
    "2",
    "--selection-episodes",
    "2",
    "--critic-warmup",
    "1",
]


def run_online(arguments, cwd):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, os.path.join(ROOT, "uepo_online.py"), *arguments],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def assert_reloads_to_its_last_evaluation(actor: OnlineActor, checkpoint: dict) -> None:
    """The reloaded actor, on the run's 2 evaluation episodes, scores exactly its last recorded evaluation."""
    replay = evaluate_sub_policies(
        actor,
        checkpoint["gym_id"],
        episodes=2,
        seed=checkpoint["args"]["seed"] * 1000,
        ref_min_score=checkpoint["ref_min_score"],
        ref_max_score=checkpoint["ref_max_score"],
        max_episode_steps=TINY_MAX_EPISODE_STEPS,
        sub_policies=[0],
    )
    np.testing.assert_array_equal(replay["scores"][0], checkpoint["history"]["scores"][-1])


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
    discounts = torch.tensor([[gamma**4], [gamma**3], [gamma**2], [gamma**4]])
    advantages, returns = chunk_gae(rewards, values, next_values, terminations, ended, discounts, lam)
    delta3 = 4 + gamma**4 * 50 - 40
    delta2 = 3 + gamma**2 * 7 - 30
    delta1 = 2 - 20  # terminated: no bootstrap
    delta0 = 1 + gamma**4 * 20 - 10
    expected = [delta0 + gamma**4 * lam * delta1, delta1, delta2, delta3]  # the chain stops at ended chunks
    torch.testing.assert_close(advantages[:, 0], torch.tensor(expected))
    torch.testing.assert_close(returns, advantages + values)


# ---- the chunk-level environment -------------------------------------------------------------------------
def test_chunk_env_executes_a_chunk_until_the_episode_ends():
    """A chunk's reward is the discounted sum of its steps; a time limit inside a chunk ends it
    there (chunk_length < H); the observation is the state history."""
    gamma = 0.9
    env = ChunkEnv(gym.make("Hopper-v5", max_episode_steps=6), chunk_size=4, history_size=2, gamma=gamma)
    reference = gym.make("Hopper-v5", max_episode_steps=6)
    obs, _ = env.reset(seed=3)
    ref_obs, _ = reference.reset(seed=3)
    assert obs.shape == (2, 11) and np.array_equal(obs[0], obs[1]) and np.array_equal(obs[1], ref_obs)
    chunk = np.full((4, 3), 0.1)
    obs, reward, terminated, truncated, info = env.step(chunk)
    ref_rewards = [reference.step(action)[1] for action in chunk]
    assert info["chunk_length"] == 4 and not truncated
    assert reward == pytest.approx(sum(gamma**h * r for h, r in enumerate(ref_rewards)))
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


# ---- the online actor ---------------------------------------------------------------------------------------
def make_actor(kind, sub_policy=2, init_std=0.1):
    return OnlineActor(kind, make_policy(), sub_policy, init_std)


@pytest.mark.parametrize("kind", ONLINE_ACTORS)
def test_at_the_hand_over_the_ratio_is_one_and_the_anchor_kl_zero(kind):
    """Decisions sampled in a rollout, rescored in a minibatch of another size and order by the
    unchanged actor: ratio 1 (the stored likelihood is recomputed exactly) and KL 0 to the anchor."""
    actor = make_actor(kind)
    states = random_states(actor.policy or make_policy(), 24)[:, -actor.history_size :]
    torch.manual_seed(0)
    with torch.no_grad():
        anchors = actor.anchor_mean(states)
        mean = actor.mean(states, anchors)
        decisions = mean + actor.std() * torch.randn(mean.shape)
        log_probs = gaussian_log_prob(decisions, mean, actor.std(), event_dims=2)
    minibatch = torch.randperm(24)[:10]
    out = actor_losses(
        actor,
        states[minibatch],
        decisions[minibatch],
        anchors[minibatch],
        log_probs[minibatch],
        torch.randn(10),
        clip_coef=0.2,
        init_std=0.1,
    )
    assert abs(out["approx_kl"].item()) < 1e-6 and out["clipfrac"] == 0.0
    if kind != "mlp":  # the mlp baseline has no offline policy to start at (anchor coef 0)
        assert abs(out["anchor_kl"].item()) < 1e-6


@pytest.mark.parametrize("kind", ["residual", "noise"])
def test_the_deployed_mean_starts_as_the_selected_sub_policy(kind):
    """The actor's deterministic chunk at the hand-over is exactly sub-policy 2's DDIM chunk."""
    actor, policy = make_actor(kind), make_policy()
    history = np.random.default_rng(0).standard_normal((5, 2, 3))
    np.testing.assert_allclose(actor.act(history)[:, 0], policy.act(history)[:, 2], rtol=0, atol=1e-6)


def test_the_decision_log_likelihood_equals_a_hand_computation():
    """log N(z; mean, diag std^2) summed over a 1 x 2 chunk with one learned std per entry, written out."""
    z, mean, std = torch.tensor([[[0.5, -1.0]]]), torch.tensor([[[0.0, 0.0]]]), torch.tensor([[0.5, 2.0]])
    expected = sum(
        -0.5 * (v / s) ** 2 - math.log(s) - 0.5 * math.log(2 * math.pi) for v, s in ((0.5, 0.5), (-1.0, 2.0))
    )
    assert gaussian_log_prob(z, mean, std, event_dims=2).item() == pytest.approx(expected, abs=1e-6)


def test_the_actor_loss_moves_the_head_and_leaves_the_denoiser_frozen():
    """residual and noise: the surrogate's gradient reaches the head and the log-std, never the frozen
    denoiser, also through the noise actor's DDIM chain. (An untrained denoiser's chunks sit on the
    clamp at +-1, where no gradient passes, so the seeds and the output layer are zeroed and the
    perturbation is off: every step then stays inside the bounds.)"""
    for kind in ("residual", "noise"):
        policy = make_policy(eta=0.0)
        with torch.no_grad():
            policy.sub_policy_noise.zero_()
            policy.denoiser.net[-1].weight.zero_()
            policy.denoiser.net[-1].bias.zero_()
        actor = OnlineActor(kind, policy, 2, 0.1)
        states = random_states(policy, 16)
        anchors = actor.anchor_mean(states)
        assert anchors.abs().max() < 1  # inside the clamp
        decisions = anchors + 0.1 * torch.randn(anchors.shape)
        out = actor_losses(actor, states, decisions, anchors, torch.zeros(16), torch.randn(16), 0.2, 0.1)
        out["policy"].backward()
        output_layer = actor.policy.denoiser.net[-1].weight
        assert output_layer.grad is None and actor.head[-1].weight.grad.abs().sum() > 0
        assert actor.log_std.grad.abs().sum() > 0


def test_a_zero_advantage_leaves_the_actor_unchanged():
    """With every advantage 0 the surrogate is 0 whatever the ratio: one Adam step changes nothing."""
    actor = make_actor("residual")
    states = random_states(actor.policy, 16)
    anchors = actor.anchor_mean(states)
    decisions = anchors + 0.1 * torch.randn(anchors.shape)
    before = {name: value.clone() for name, value in actor.state_dict().items()}
    optimizer = torch.optim.Adam([p for p in actor.parameters() if p.requires_grad], lr=1e-2)
    out = actor_losses(actor, states, decisions, anchors, torch.full((16,), -3.0), torch.zeros(16), 0.2, 0.1)
    optimizer.zero_grad()
    out["policy"].backward()
    optimizer.step()
    for name, value in actor.state_dict().items():
        torch.testing.assert_close(value, before[name], rtol=0, atol=0)


def test_the_reward_scaler_matches_a_hand_computation():
    """Two environments, three chunks: G <- d G + R (reset after an end), running variance of G by
    Welford's parallel update from (mean 0, var 1, count 1e-4), rewards / sqrt(var + 1e-8), clip 10."""
    scaler = RewardScaler(2, clip=10.0)
    rewards = [np.array([1.0, 2.0]), np.array([3.0, -1.0]), np.array([100.0, 0.5])]
    discounts = [np.array([0.9, 0.9]), np.array([0.81, 0.9]), np.array([0.9, 0.9])]
    ended = [np.array([False, True]), np.array([False, False]), np.array([False, False])]
    returns, seen = np.zeros(2), []
    for r, d, e in zip(rewards, discounts, ended):
        returns = returns * d + r
        seen.extend(returns.tolist())
        scaled = scaler(r, d, e)
        # The prior (count 1e-4, mean 0, var 1) pooled with every return seen so far:
        count = 1e-4 + len(seen)
        mean = sum(seen) / count
        var = (1e-4 * 1.0 + sum(v**2 for v in seen) - count * mean**2) / count
        np.testing.assert_allclose(scaled, np.clip(r / np.sqrt(var + 1e-8), -10, 10), rtol=1e-9)
        returns[e] = 0.0
    assert scaler.returns[1] == pytest.approx(-1.0 * 0.9 + 0.5)  # env 1 restarted after its first chunk


# ---- end to end ----------------------------------------------------------------------------------------------
def test_online_run_selects_fine_tunes_and_writes_a_checkpoint_that_reloads(online_run):
    """The tiny offline checkpoint loads, the selection table is printed, PPO iterations run with a
    progress bar and evaluations, and the online checkpoint's policy reproduces its last evaluation."""
    result, path = online_run
    assert result.returncode == 0, result.stderr[-3000:]
    assert "| candidate | offline OPE | real normalized score | chosen |" in result.stdout
    assert "online (ppo):" in result.stderr and "value=" in result.stderr and "eval step 0" in result.stdout
    logged = logged_scalars(path.parent)
    value_steps = [step for step, _ in logged["losses/value_loss"]]
    policy_steps = [step for step, _ in logged["losses/policy_loss"]]
    assert len(value_steps) >= 3 and policy_steps == value_steps[1:]  # --critic-warmup 1: the actor waits once
    assert all(epochs == 2 for _, epochs in logged["losses/update_epochs"])  # --target-kl None: every epoch
    checkpoint = load_checkpoint(str(path), expected_gym_id="Hopper-v5")
    assert checkpoint["phase"] == "online" and checkpoint["global_step"] >= 300
    assert checkpoint["history"]["step"][0] == 0 and len(checkpoint["history"]["step"]) >= 3
    actor = OnlineActor.from_checkpoint(checkpoint["actor"])
    assert actor.kind == "noise"  # the default
    assert actor.head[-1].weight.abs().sum() > 0  # it learned: the head started at exactly 0
    assert_reloads_to_its_last_evaluation(actor, checkpoint)
    assert list((path.parent / "runs").iterdir()), "no TensorBoard run folder under runs/"


def test_online_refuses_another_environment_or_a_corrupt_checkpoint(offline_checkpoint, tmp_path):
    result = run_online(["--checkpoint", str(offline_checkpoint), "--env-id", "walker2d-medium"], tmp_path)
    assert result.returncode == 2 and "made for Hopper-v5, not Walker2d-v5" in result.stderr
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(offline_checkpoint.read_bytes()[:1000])
    result = run_online(["--checkpoint", str(corrupt)], tmp_path)
    assert result.returncode == 2 and "not a readable checkpoint" in result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "runs").exists()


@pytest.mark.parametrize("actor", ["residual", "mlp"])
def test_the_other_actors_and_the_baselines_run_and_reload(offline_checkpoint, tmp_path, actor):
    """--actor residual and the mlp baseline (per step, or with --mlp-chunk-size in chunks) run under
    PPO, keep their own --init-std, and reload to the recorded score.
    A --target-kl that the first epoch exceeds stops every update after that epoch."""
    flags = [
        "--actor",
        actor,
        "--init-std",
        "0.05",
        "--target-kl",
        "1e-9",
        "--anchor-coef",
        "0.5",
        "--anchor-floor",
        "0",
    ]
    extras = {"mlp": [[], ["--mlp-chunk-size", "2"]]}.get(actor, [[]])
    for extra in extras:
        folder = tmp_path / f"{actor}{len(extra)}"
        folder.mkdir()
        path = folder / "online.pt"
        result = run_online(
            ["--checkpoint", str(offline_checkpoint), "--checkpoint-path", str(path), *flags, *extra]
            + TINY_ONLINE
            + ["--learning-rate", "1e-3"],
            folder,
        )
        assert result.returncode == 0, result.stderr[-3000:]
        assert ("from scratch: no selection" in result.stdout) == (actor == "mlp")
        epochs = [value for _, value in logged_scalars(folder)["losses/update_epochs"]]
        assert epochs and all(value == 1 for value in epochs)  # --target-kl 1e-9 stops after one epoch
        checkpoint = load_checkpoint(str(path))
        loaded = OnlineActor.from_checkpoint(checkpoint["actor"])
        assert loaded.kind == actor and loaded.init_std == 0.05
        assert loaded.chunk_size == (4 if actor != "mlp" else 2 if extra else 1)  # mlp: per step by default
        assert_reloads_to_its_last_evaluation(loaded, checkpoint)


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--init-std", "0"], "--init-std must be in (0, 2], got 0"),
        (["--actor", "diffusion"], "invalid choice"),
        (["--num-envs", "0"], "--num-envs must be in [1, 256], got 0"),
        (["--num-minibatches", "0"], "--num-minibatches must be in [1, 65536], got 0"),
        (["--num-envs", "2", "--num-steps", "4", "--num-minibatches", "9"], "--num-minibatches (9) must be at most"),
        (["--eval-every", "0"], "--eval-every must be in [1, 100000000], got 0"),
        (["--selection-top", "0"], "--selection-top must be in [1, 64], got 0"),
        (["--anchor-coef", "-1"], "--anchor-coef must be in [0, 1000], got -1"),
        (["--target-kl", "0"], "--target-kl must be in (0, 100], got 0"),
    ],
)
def test_online_refuses_an_argument_out_of_range_before_any_work(offline_checkpoint, tmp_path, flags, message):
    refused = run_online(["--checkpoint", str(offline_checkpoint), *flags], tmp_path)
    assert refused.returncode == 2 and message in refused.stderr, refused.stderr[-2000:]
    assert "Traceback" not in refused.stderr and not (tmp_path / "runs").exists()


NAN_KL_AFTER_TWO_CALLS = """
import divergence
real_kl, kl_calls = divergence.gaussian_kl, []
def kl_goes_nan(*args, **kwargs):
    kl_calls.append(1)
    value = real_kl(*args, **kwargs)
    return value * float("nan") if len(kl_calls) > 2 else value
divergence.gaussian_kl = kl_goes_nan
"""


def test_a_diverging_run_stops_with_the_step_named_and_keeps_the_last_good_checkpoint(offline_checkpoint, tmp_path):
    """A loss that turns NaN in the first PPO update (the anchor's KL made NaN from its third call on):
    the run stops with the step and the loss named (no traceback), and the hand-over's checkpoint, the
    last good one, is still there, loads and is finite."""
    path = tmp_path / "online.pt"
    arguments = ["--checkpoint", str(offline_checkpoint), "--checkpoint-path", str(path), "--actor", "residual"]
    result = run_online_patched(NAN_KL_AFTER_TWO_CALLS, arguments + TINY_ONLINE, tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert "global step" in result.stderr and "loss is nan" in result.stderr, result.stderr[-2000:]
    saved = load_checkpoint(str(path))
    assert saved["global_step"] == 0 and all(
        torch.isfinite(value).all() for value in saved["actor"]["state_dict"].values() if value.is_floating_point()
    )


# ---- --resume ---------------------------------------------------------------------------------------------------
def run_online_patched(patch, arguments, cwd):
    """uepo_online.py with `patch` applied to eval.py first (test_offline's PATCHED_RUN)."""
    script = cwd / "patched_online.py"
    script.write_text(PATCHED_RUN.format(root=ROOT, script=os.path.join(ROOT, "uepo_online.py"), patch=patch))
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, str(script), *arguments], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )


KILL_AFTER_SAVE = """
real_save, saves = eval_module.save_checkpoint, []
def save_then_die(checkpoint, path):
    real_save(checkpoint, path)
    saves.append(path)
    if len(saves) == {saves}:
        os._exit(137)  # killed right after that checkpoint: no cleanup, nothing flushed
eval_module.save_checkpoint = save_then_die
"""


def test_resume_after_a_kill_continues_the_learners_and_counters(offline_checkpoint, tmp_path):
    """A run killed right after the hand-over's checkpoint and continued with --resume ends with the
    uninterrupted run's checkpoint bit for bit (same seed, CPU: the resumed run makes the same first
    reset). Killed after its second checkpoint, it goes on from that checkpoint's counters in new
    episodes: its history begins with the uninterrupted run's up to the cut and reaches the budget.
    Flags given beside --resume are named and ignored: the saved arguments win and the run goes on
    writing to the resumed file."""
    # Five checkpoints (steps 0, 112, 226, 339, 454); at the second one an environment is mid-episode.
    budget = ["--total-timesteps", "450", "--eval-every", "100"]
    arguments = ["--checkpoint", str(offline_checkpoint), *TINY_ONLINE, *budget]
    whole = run_online(arguments + ["--checkpoint-path", str(tmp_path / "whole.pt")], tmp_path)
    assert whole.returncode == 0, whole.stderr[-3000:]
    a = load_checkpoint(str(tmp_path / "whole.pt"))
    assert a["global_step"] >= 450 and len(a["history"]["step"]) >= 4
    for saves in (2, 1):
        cut_path = tmp_path / f"cut{saves}.pt"
        killed = run_online_patched(
            KILL_AFTER_SAVE.format(saves=saves), arguments + ["--checkpoint-path", str(cut_path)], tmp_path
        )
        assert killed.returncode == 137, killed.stderr[-3000:]
        cut = load_checkpoint(str(cut_path))
        assert (cut["global_step"] > 0) == (saves == 2) and cut["resume"]["global_step"] == cut["global_step"]
        resumed = run_online(["--resume", str(cut_path), "--checkpoint", "elsewhere.pt", "--seed", "7"], tmp_path)
        assert resumed.returncode == 0, resumed.stderr[-3000:]
        assert f"after step {cut['global_step']}" in resumed.stdout
        assert "ignored beside --resume: --checkpoint, --seed" in resumed.stdout
        b = load_checkpoint(str(cut_path))
        assert a["args"] == {**b["args"], "resume": None, "checkpoint_path": str(tmp_path / "whole.pt")}
        cut_evaluations = len(cut["history"]["step"])
        assert {key: values[:cut_evaluations] for key, values in b["history"].items()} == {
            key: values[:cut_evaluations] for key, values in a["history"].items()
        }
        assert b["global_step"] >= 450 and b["resume"]["iteration"] > cut["resume"]["iteration"]
        if saves == 1:  # from the hand-over: the uninterrupted run, bit for bit
            assert a["global_step"] == b["global_step"] and a["history"] == b["history"]
            for part_a, part_b in ((a["actor"]["state_dict"], b["actor"]["state_dict"]), (a["value"], b["value"])):
                for name, tensor in part_a.items():
                    assert torch.equal(tensor, part_b[name]), (saves, name)
            assert torch.equal(a["resume"]["torch_rng"], b["resume"]["torch_rng"])


@pytest.mark.parametrize("which", ["no training state", "offline", "missing"])
def test_resume_refuses_what_it_cannot_continue(offline_checkpoint, online_run, tmp_path, which):
    """An online checkpoint without training state (an older version's), an offline checkpoint and a
    missing file: exit code 2, one line naming the file, no traceback, nothing started."""
    if which == "no training state":
        path = tmp_path / "old.pt"
        checkpoint = torch.load(str(online_run[1]), weights_only=True)
        checkpoint.pop("resume")
        torch.save(checkpoint, path)
        message = "holds no training state"
    else:
        path = offline_checkpoint if which == "offline" else tmp_path / "none.pt"
        message = {"offline": "is an offline checkpoint", "missing": "no checkpoint at"}[which]
    result = run_online(["--resume", str(path)], tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert result.stderr.startswith("error: ") and str(path) in result.stderr and message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and not (tmp_path / "runs").exists()
