"""uepo_online.py --algo td3: the chunk critic's target by hand (summed discounted rewards, gamma^L
bootstrap, none after a termination, one after a time-limit truncation), RLPD's mixed batches, the
replay's ring buffer, the actor step's direction, --free-actor's trial rounds, and tiny end-to-end
runs whose first evaluation is exactly the selected sub-policy's score and whose checkpoint reloads to
its last evaluation."""

import re

import numpy as np
import pytest
import torch
from test_diffusion import make_policy
from test_online import TINY_ONLINE, assert_reloads_to_its_last_evaluation, run_online

from conftest import logged_scalars
from diffusion import OnlineActor
from dynamics import ChunkCritics
from eval import load_checkpoint
from uepo_online import (
    Args,
    ChunkReplay,
    Gate,
    anchor_weight_at,
    gate_decisions,
    history_view,
    mixed_sample,
    td3_actor_update,
    td3_critic_update,
    warmup_actor_name,
    with_algo_defaults,
)


def constant_critics(q1: float, q2: float) -> ChunkCritics:
    """Chunk critics whose two heads output the constants q1 and q2 everywhere."""
    critics = ChunkCritics(obs_dim=3, act_dim=2, chunk_size=4)
    for head, value in ((critics.q1, q1), (critics.q2, q2)):
        torch.nn.init.zeros_(head[-1].weight)
        torch.nn.init.constant_(head[-1].bias, value)
    return critics


def replay_rows(count: int, start: float = 0.0) -> dict:
    """`count` decisions of a 3-dim state, 2-step history, 4 x 2 chunks; rewards start, start + 1, ..."""
    return {
        "states": torch.zeros(count, 2, 3),
        "anchors": torch.zeros(count, 4, 2),
        "chunks": torch.zeros(count, 4, 2),
        "rewards": start + torch.arange(count, dtype=torch.float32),
        "lengths": torch.full((count,), 4.0),
        "terminals": torch.zeros(count),
        "next_states": torch.zeros(count, 2, 3),
        "next_anchors": torch.zeros(count, 4, 2),
    }


def test_the_chunk_critic_target_equals_a_hand_computation():
    """Three decisions: a full chunk (R = 1.5, L = 4), one that terminated after 2 steps (R = 2.0) and
    one cut by the time limit after 3 steps (R = 0.5). Target critics output 10 and 7 (min 7), the
    critics 3 and 4, gamma 0.9, no target noise:
        y = 1.5 + 0.9^4 * 7,  2.0,  0.5 + 0.9^3 * 7;  loss = mean (3 - y)^2 + mean (4 - y)^2."""
    actor = OnlineActor("residual", make_policy(), sub_policy=2, init_std=0.1)
    batch = replay_rows(3)
    batch["rewards"] = torch.tensor([1.5, 2.0, 0.5])
    batch["lengths"] = torch.tensor([4.0, 2.0, 3.0])
    batch["terminals"] = torch.tensor([0.0, 1.0, 0.0])  # the third was truncated: not a termination
    critics, target_critics = constant_critics(3.0, 4.0), constant_critics(10.0, 7.0)
    optimizer = torch.optim.SGD(critics.parameters(), lr=0.0)
    log, q1 = td3_critic_update(critics, target_critics, optimizer, actor, batch, gamma=0.9, policy_noise=0.0)
    y = np.array([1.5 + 0.9**4 * 7, 2.0, 0.5 + 0.9**3 * 7])
    expected = ((3.0 - y) ** 2).mean() + ((4.0 - y) ** 2).mean()
    assert log["losses/critic_loss"] == pytest.approx(expected, rel=1e-6)
    np.testing.assert_allclose(q1.numpy(), 3.0)


class ChunkSumTarget:
    """Target critics whose min over heads is the sum of the chunk's entries."""

    def q(self, states, chunks):
        return chunks.sum(dim=(1, 2))


def test_a_mixed_batch_takes_the_offline_share_and_all_offline_before_online_data():
    offline_rows, online_rows = replay_rows(50), replay_rows(20, start=1000.0)  # online rewards >= 1000
    offline, online = ChunkReplay(50, offline_rows), ChunkReplay(30, online_rows)
    offline.add(offline_rows)
    batch, num_offline = mixed_sample(offline, online, 64, offline_ratio=0.25)
    assert num_offline == 64 and (batch["rewards"] < 50).all()  # the online replay is still empty
    online.add(online_rows)
    batch, num_offline = mixed_sample(offline, online, 64, offline_ratio=0.25)
    assert num_offline == 16 and len(batch["rewards"]) == 64
    assert (batch["rewards"][:16] < 50).all() and (batch["rewards"][16:] >= 1000).all()


def test_the_replay_is_a_ring_buffer():
    replay = ChunkReplay(3, replay_rows(1))
    replay.add(replay_rows(2))  # rewards 0, 1
    replay.add(replay_rows(2, start=10.0))  # 10 overwrites nothing, 11 overwrites row 0
    assert replay.size == 3 and replay.position == 1
    np.testing.assert_array_equal(replay.data["rewards"].numpy(), [11.0, 1.0, 10.0])


class LinearQ:
    """A critic whose Q is w . chunk (both heads), for the direction of the actor's step."""

    def __init__(self, weight: torch.Tensor):
        self.weight = weight

    def q_heads(self, states, chunks):
        q = (chunks * self.weight).flatten(1).sum(1) + 10.0
        return q, q


def test_the_anchor_weight_decays_linearly_to_its_floor_and_stays_there():
    args = Args(total_timesteps=1000, anchor_coef=2.0, anchor_floor=1.0)
    assert [anchor_weight_at(step, args) for step in (0, 500, 1000)] == [2.0, 2.0, 2.0]  # no decay
    args = Args(total_timesteps=1000, anchor_coef=2.0, anchor_floor=0.0)
    assert [anchor_weight_at(step, args) for step in (0, 500, 1000)] == [2.0, 1.0, 0.0]
    args = Args(total_timesteps=1000, anchor_coef=2.0, anchor_floor=0.25)
    weights = [anchor_weight_at(step, args) for step in (0, 500, 750, 900, 1000)]
    assert weights == pytest.approx([2.0, 1.0, 0.5, 0.5, 0.5])


def test_the_actor_step_raises_q_and_starts_from_the_anchor():
    """At the hand-over z = anchor, so the distance term and its gradient are 0; one step with a
    linear Q moves the deployed chunks along w (Q rises), and q_weight 0 leaves the actor where it is."""
    torch.manual_seed(0)
    weight = torch.randn(4, 2)
    states = torch.randn(32, 2, 3)
    for q_weight in (0.0, 1.0):
        actor = OnlineActor("residual", make_policy(), sub_policy=2, init_std=0.1)
        anchors = actor.anchor_mean(states)
        batch = {"states": states, "anchors": anchors}
        optimizer = torch.optim.Adam(actor.head.parameters(), lr=1e-2)
        before = LinearQ(weight).q_heads(states, actor.chunk(states, actor.mean(states, anchors)))[0].mean()
        log = td3_actor_update(actor, LinearQ(weight), optimizer, batch, q_weight, anchor_weight=1.0)
        assert log["charts/distance_to_offline"] == 0.0
        with torch.no_grad():
            after = LinearQ(weight).q_heads(states, actor.chunk(states, actor.mean(states, anchors)))[0].mean()
        assert (after > before + 1e-3) if q_weight > 0 else after == pytest.approx(before.item(), abs=1e-6)


def test_each_learner_fills_the_flags_left_unset_with_its_own_defaults():
    """td3 is the default learner, with the residual actor and a fresh one beside it (--free-actor, not
    beside any other actor) on one environment for 250k steps, the anchor decayed to a tenth; PPO keeps
    its 16 environments, the noise actor, 1M steps and a constant anchor; a flag given stays as given."""
    args = with_algo_defaults(Args())
    assert (args.algo, args.actor, args.num_envs, args.total_timesteps) == ("td3", "residual", 1, 250_000)
    assert args.anchor_floor == 0.1 and args.free_actor and not with_algo_defaults(Args(actor="mlp")).free_actor
    args = with_algo_defaults(Args(algo="ppo"))
    assert not args.free_actor
    assert (args.actor, args.num_envs, args.total_timesteps, args.anchor_floor) == ("noise", 16, 1_000_000, 1.0)
    args = with_algo_defaults(Args(algo="ppo", actor="residual", num_envs=4, anchor_floor=0.0))
    assert (args.actor, args.num_envs, args.total_timesteps, args.anchor_floor) == ("residual", 4, 1_000_000, 0.0)


def test_a_trial_round_deploys_a_frozen_copy_only_when_its_mean_return_beats_the_deployed_ones_pooled_mean():
    """Two environments, 2 trial episodes per candidate, candidates stand-in linear layers. The hand-over's
    round (returns 10 and 30: mean 20) sets the bar. Each later round replays the deployed copy first, and
    its score pools all its trial episodes: the hand-over's (16, 18) lower it to 18.5. The residual's round
    (15, 24: 19.5) beats that, though not the first round's 20; the fresh actor's (50, 0: 25) beats the
    residual, and the copy taken at scheduling is what is deployed, not the actor that went on learning.
    A lucky round regresses: the fresh copy's replay (5, 10) brings its score to 16.25, which the next
    residual's 17 beats. Rows whose episode is no trial's explore (None)."""
    hand_over, residual, fresh = (torch.nn.Linear(1, 1) for _ in range(3))
    gate = Gate(num_envs=2, hand_over=hand_over, episodes=2)
    assert [trial["name"] for trial in gate.players] == ["hand-over", "hand-over"] and gate.queue == []
    assert gate.deployed is not hand_over and torch.equal(gate.deployed.weight, hand_over.weight)
    assert gate.record == -np.inf
    gate.record_episodes(np.array([True, False]), np.array([10.0, np.nan]))
    assert gate.players[0] is None and gate.record == 10.0
    gate.record_episodes(np.array([False, True]), np.array([np.nan, 30.0]))
    assert gate.players == [None, None] and gate.record == 20.0 and gate.deployed_name == "hand-over"
    gate.schedule({"residual": residual, "fresh": fresh})
    scheduled = fresh.weight.detach().clone()
    with torch.no_grad():
        fresh.weight += 1.0  # it goes on learning after the copy
    assert gate.players == [None, None]  # episodes under way are not cut
    gate.record_episodes(np.array([True, True]), np.array([5.0, 6.0]))  # exploring: not counted
    assert [trial["name"] for trial in gate.players] == ["hand-over", "hand-over"]  # the deployed copy first
    gate.record_episodes(np.array([True, True]), np.array([16.0, 18.0]))
    assert gate.record == 18.5 and [trial["name"] for trial in gate.players] == ["residual", "residual"]
    gate.record_episodes(np.array([True, True]), np.array([15.0, 24.0]))
    assert gate.deployed_name == "residual" and gate.record == 19.5 and gate.candidate_scores == {"residual": 19.5}
    assert [trial["name"] for trial in gate.players] == ["fresh", "fresh"]
    gate.record_episodes(np.array([True, True]), np.array([50.0, 0.0]))
    assert gate.deployed_name == "fresh" and gate.record == 25.0 and gate.players == [None, None]
    assert torch.equal(gate.deployed.weight, scheduled) and not gate.deployed.weight.requires_grad
    gate.schedule({"residual": residual})
    gate.record_episodes(np.array([True, True]), np.array([5.0, 6.0]))  # exploring
    assert [trial["name"] for trial in gate.players] == ["fresh", "fresh"]
    gate.record_episodes(np.array([True, True]), np.array([5.0, 10.0]))
    assert gate.deployed_name == "fresh" and gate.record == 16.25
    gate.record_episodes(np.array([True, True]), np.array([16.0, 18.0]))
    assert gate.deployed_name == "residual" and gate.record == 17.0


def test_without_a_first_round_the_fresh_actor_explores_from_step_0_and_a_candidate_waits_for_a_bar():
    """first_round=False (the fresh actor's values first): no row plays the hand-over at step 0, and the
    hand-over, still deployed, plays first in the next round. A candidate whose episode ends before the
    deployed copy has any return is judged once it has one: 5 against the hand-over's 3 wins, where judged
    against no bar at all (-inf) any candidate would have won; 2 against 3 does not."""
    for fresh_return, winner in ((5.0, "fresh"), (2.0, "hand-over")):
        hand_over, fresh = torch.nn.Linear(1, 1), torch.nn.Linear(1, 1)
        gate = Gate(num_envs=2, hand_over=hand_over, episodes=1, first_round=False)
        assert gate.players == [None, None] and gate.queue == [] and gate.deployed_name == "hand-over"
        gate.schedule({"fresh": fresh})
        gate.record_episodes(np.array([True, True]), np.array([7.0, 8.0]))  # exploring: not counted
        assert [trial["name"] for trial in gate.players] == ["hand-over", "fresh"]
        gate.record_episodes(np.array([False, True]), np.array([np.nan, fresh_return]))  # the candidate first
        assert gate.deployed_name == "hand-over" and gate.candidate_scores == {} and gate.record == -np.inf
        gate.record_episodes(np.array([True, False]), np.array([3.0, np.nan]))
        assert gate.candidate_scores == {"fresh": fresh_return} and gate.deployed_name == winner
        assert gate.players == [None, None]


def test_auto_warmup_learns_the_hand_overs_values_only_above_the_datas_mean_plus_one_std():
    """--free-actor-warmup auto on hand-computed data scores: mean 20 and std sqrt(200/3) = 8.165 put the bar
    at 28.165; a named warm-up is kept whatever the scores."""
    data_scores = np.array([10.0, 20.0, 30.0])
    assert warmup_actor_name("auto", 28.2, data_scores) == "hand-over"
    assert warmup_actor_name("auto", 28.1, data_scores) == "fresh"
    assert warmup_actor_name("auto", 20.0, np.array([20.0, 20.0])) == "fresh"  # at the data's level
    assert warmup_actor_name("hand-over", 0.0, data_scores) == "hand-over"
    assert warmup_actor_name("fresh", 100.0, data_scores) == "fresh"


def test_a_trial_copy_plays_its_mean_and_the_fresh_actor_explores_with_noise():
    residual = OnlineActor("residual", make_policy(), sub_policy=2, init_std=0.1)
    fresh = OnlineActor("mlp", make_policy(), 0, 1.0, mlp_chunk_size=4)
    gate = Gate(num_envs=2, hand_over=residual, episodes=1)  # row 0 plays the hand-over, row 1 explores
    config = residual.policy_config
    states = torch.randn(2, config.history_size, config.obs_dim)
    anchors = residual.anchor_mean(states)
    with torch.no_grad():
        z = gate_decisions(gate, fresh, states, anchors, torch.ones_like(anchors))
        assert torch.allclose(z[0], anchors[0])  # the hand-over's residual is 0: its chunk, no noise
        assert torch.allclose(z[1], fresh.mean(states[1:, -1:], anchors[1:])[0] + 1.0)


def test_each_actor_sees_its_own_history_length():
    batch = {"states": torch.randn(5, 2, 3), "next_states": torch.randn(5, 2, 3), "chunks": torch.randn(5, 4, 2)}
    fresh = OnlineActor("mlp", make_policy(), 0, 1.0, mlp_chunk_size=4)
    view = history_view(batch, fresh)
    assert view["states"].shape == (5, 1, 3) and torch.equal(view["next_states"][:, 0], batch["next_states"][:, -1])
    residual = OnlineActor("residual", make_policy(), 0, 0.1)
    assert view["chunks"] is batch["chunks"] and torch.equal(history_view(batch, residual)["states"], batch["states"])


# The online tests' tiny run (its PPO-only flags are unused by td3) with td3's own sizes.
TINY_TD3 = [
    *TINY_ONLINE,
    "--algo",
    "td3",
    "--batch-size",
    "32",
    "--offline-critic-updates",
    "20",
]


def assert_starts_at_the_selection_score(stdout: str, checkpoint: dict) -> None:
    """The step-0 evaluation equals the chosen candidate's real score in the printed selection table (1 decimal)."""
    chosen = [line for line in stdout.splitlines() if line.endswith("| yes |")]
    selection_score = float(chosen[0].split("|")[3].split("+-")[0])
    assert np.mean(checkpoint["history"]["scores"][0]) == pytest.approx(selection_score, abs=0.051)


@pytest.mark.parametrize(
    "actor_kind, flags, chunk_size",
    [
        ("residual", ["--free-actor", "False"], 4),
        ("mlp", ["--mlp-chunk-size", "2"], 2),
    ],
)
def test_a_td3_run_starts_at_the_selected_sub_policy_learns_and_reloads(
    offline_checkpoint, tmp_path, actor_kind, flags, chunk_size
):
    """The first evaluation of the residual actor is the selected candidate's selection score (same
    policy, same episodes): deployment starts exactly at the hand-over. The actor learns (the residual
    from exactly 0; `mlp`, the actor from scratch, in chunks of 2), the checkpoint holds the critics
    (RLPD's LayerNorm ones), and its actor reproduces the last evaluation."""
    path = tmp_path / "online.pt"
    flags = ["--actor", actor_kind, *flags]
    result = run_online(
        ["--checkpoint", str(offline_checkpoint), "--checkpoint-path", str(path), *TINY_TD3, *flags], tmp_path
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "offline critic updates: 100%" in result.stderr and "20/20" in result.stderr
    assert "online (td3):" in result.stderr and "critic_loss=" in result.stderr
    checkpoint = load_checkpoint(str(path), expected_gym_id="Hopper-v5")
    assert "critics" in checkpoint and "value" not in checkpoint and checkpoint["resume"] is None
    layer_norms = [key for key, value in checkpoint["critics"].items() if key.endswith(".1.weight") and value.ndim == 1]
    assert layer_norms  # RLPD's LayerNorm critics
    assert checkpoint["history"]["step"][0] == 0 and checkpoint["global_step"] >= 300
    actor = OnlineActor.from_checkpoint(checkpoint["actor"])
    assert actor.kind == actor_kind and actor.chunk_size == chunk_size
    if actor_kind == "residual":
        assert_starts_at_the_selection_score(result.stdout, checkpoint)
        assert actor.head[-1].weight.abs().sum() > 0  # it started at exactly 0
    else:
        assert "from scratch: no selection" in result.stdout
        assert checkpoint["history"]["scores"][0] != checkpoint["history"]["scores"][-1]
    assert_reloads_to_its_last_evaluation(actor, checkpoint)


@pytest.mark.parametrize("warmup", ["auto", "hand-over", "fresh"])
def test_a_free_actor_run_starts_at_the_hand_over_and_saves_the_deployed_copy_and_both_actors(
    offline_checkpoint, tmp_path, warmup
):
    """--free-actor: the step-0 evaluation is still the selected sub-policy, the fresh actor learns, the
    hand-over's trial round ends within the run, and the checkpoint holds the deployed copy (which reproduces
    the last evaluation, and is of the kind the last log names) beside the residual and the fresh actor."""
    path = tmp_path / "online.pt"
    arguments = ["--checkpoint", str(offline_checkpoint), "--checkpoint-path", str(path), *TINY_TD3]  # td3's default
    result = run_online([*arguments, "--free-actor-warmup", warmup], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    checkpoint = load_checkpoint(str(path), expected_gym_id="Hopper-v5")
    assert_starts_at_the_selection_score(result.stdout, checkpoint)
    said = re.search(
        r"the critics learn the (\S+) actor's values first \(hand-over (\S+), the data's episodes "
        r"(\S+) \+- (\S+)\)",
        result.stdout,
    )
    hand_over, mean, std = (float(said[group]) for group in (2, 3, 4))
    assert hand_over == pytest.approx(np.mean(checkpoint["history"]["scores"][0]), abs=0.051)
    if warmup != "auto":
        assert said[1] == warmup
    elif abs(hand_over - (mean + std)) > 0.1:  # the printed numbers are rounded to 0.1
        assert said[1] == ("hand-over" if hand_over > mean + std else "fresh")
    logged = logged_scalars(tmp_path)
    assert "free_actor/actor_loss" in logged and "free_actor/deployed_trial_return" in logged
    actor, residual, fresh = (
        OnlineActor.from_checkpoint(checkpoint[key]) for key in ("actor", "residual_actor", "fresh_actor")
    )
    assert (residual.kind, fresh.kind) == ("residual", "mlp") and fresh.chunk_size == residual.chunk_size == 4
    assert (actor.kind == "mlp") == (logged["free_actor/deployed_fresh"][-1][1] == 1.0)
    assert fresh.head[-1].weight.abs().sum() > 0
    # The residual (it starts at exactly 0) learns only beside the hand-over's values: nothing to refine else.
    assert (residual.head[-1].weight.abs().sum() > 0) == (said[1] == "hand-over")
    assert_reloads_to_its_last_evaluation(actor, checkpoint)


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--free-actor", "True", "--actor", "noise"], "--free-actor trains beside --algo td3 --actor residual"),
        (["--free-actor", "False", "--free-actor-warmup", "fresh"], "--free-actor-warmup fresh names one of the"),
        (["--offline-ratio", "1.5"], "--offline-ratio must be in [0, 1]"),
        (["--utd-ratio", "0"], "--utd-ratio must be in [1, 1000], got 0"),
        (["--q-weight", "0"], "--q-weight must be in (0, 1000000], got 0"),
        (["--anchor-floor", "2"], "--anchor-floor must be in [0, 1]"),
        (["--mlp-chunk-size", "0"], "--mlp-chunk-size must be in [1, 64], got 0"),
    ],
)
def test_td3_refuses_an_argument_out_of_range_before_any_work(offline_checkpoint, tmp_path, flags, message):
    refused = run_online(["--checkpoint", str(offline_checkpoint), "--algo", "td3", *flags], tmp_path)
    assert refused.returncode == 2 and message in refused.stderr, refused.stderr[-2000:]
    assert "Traceback" not in refused.stderr and not (tmp_path / "runs").exists()
