"""Chunk-level IQL critics, AM-Q offline policy evaluation and the diffusion augmentation (dynamics.py)."""

import copy

import pytest
import torch

from dynamics import (
    ChunkCritics,
    EnsembleDynamics,
    am_q_ratio,
    am_q_rollouts,
    chunk_td_target,
    diffusion_augmentation,
    disagreement_threshold,
    expectile_loss,
    iql_losses,
    mixed_batch,
    model_returns,
    soft_update,
)


def am_q_ope(*args, **kwargs) -> torch.Tensor:
    """AM-Q, the scalar: the mean Q over every visited (state, chunk) pair of `am_q_rollouts`."""
    return am_q_ratio(*am_q_rollouts(*args, **kwargs))


def test_expectile_loss_matches_its_definition_on_a_hand_made_example():
    """L_tau(u) = mean |tau - 1(u<0)| u^2: for u = (2, -1, 0.5), tau = 0.7 -> (0.7*4 + 0.3*1 + 0.7*0.25) / 3."""
    differences = torch.tensor([2.0, -1.0, 0.5])
    expected = (0.7 * 4 + 0.3 * 1 + 0.7 * 0.25) / 3
    assert expectile_loss(differences, 0.7).item() == pytest.approx(expected)
    assert expectile_loss(differences, 0.5).item() == pytest.approx(0.5 * (4 + 1 + 0.25) / 3)


def test_expectile_regression_finds_the_upper_expectile():
    """Minimizing the expectile loss over a constant reaches the tau-expectile of the samples
    (above the mean for tau > 0.5), as IQL's V relies on."""
    torch.manual_seed(0)
    samples = torch.randn(4000)
    value = torch.zeros((), requires_grad=True)
    optimizer = torch.optim.Adam([value], lr=0.05)
    for _ in range(600):
        optimizer.zero_grad()
        expectile_loss(samples - value, 0.9).backward()
        optimizer.step()
    # The tau-expectile e solves tau * E[(x-e)+] = (1-tau) * E[(e-x)+].
    e = value.detach()
    upper, lower = (samples - e).clamp(min=0).mean(), (e - samples).clamp(min=0).mean()
    assert 0.9 * upper.item() == pytest.approx(0.1 * lower.item(), rel=0.05)
    assert e.item() > samples.mean().item() + 0.5


def test_td_target_bootstraps_through_truncation_but_not_termination():
    """R + gamma^L (1 - done) V(s'): a terminated chunk's target is R alone; a chunk cut short
    by the episode's end (L = 2) discounts V by gamma^2, a whole one by gamma^4."""
    target = chunk_td_target(
        rewards=torch.tensor([1.0, 2.0, 3.0]),
        dones=torch.tensor([0.0, 1.0, 0.0]),
        chunk_lengths=torch.tensor([4.0, 4.0, 2.0]),
        next_values=torch.tensor([10.0, 10.0, 10.0]),
        gamma=0.9,
    )
    torch.testing.assert_close(target, torch.tensor([1.0 + 0.9**4 * 10, 2.0, 3.0 + 0.9**2 * 10]))


def test_iql_losses_fall_on_a_fixed_batch():
    """Adam steps on one batch halve the Q loss, and V fits the learned Q far better than a fresh V
    does (the losses are wired to the right networks)."""
    torch.manual_seed(0)
    critics = ChunkCritics(obs_dim=3, act_dim=2, chunk_size=4, hidden=32, layers=2)
    target_critics = copy.deepcopy(critics)
    batch = dict(
        states=torch.randn(64, 3),
        chunks=torch.rand(64, 4, 2) * 2 - 1,
        rewards=torch.randn(64),
        next_states=torch.randn(64, 3),
        dones=(torch.rand(64) < 0.1).float(),
        chunk_lengths=torch.full((64,), 4.0),
    )
    optimizer = torch.optim.Adam(critics.parameters(), lr=1e-3)
    first = iql_losses(critics, target_critics, batch, gamma=0.99, expectile=0.7)
    for _ in range(200):
        losses = iql_losses(critics, target_critics, batch, gamma=0.99, expectile=0.7)
        optimizer.zero_grad()
        (losses["q"] + losses["value"]).backward()
        optimizer.step()
        soft_update(target_critics, critics, 0.05)
    assert losses["q"].item() < 0.5 * first["q"].item()
    with torch.no_grad():
        target_q = target_critics.q(batch["states"], batch["chunks"])
        fresh_value = ChunkCritics(obs_dim=3, act_dim=2, chunk_size=4, hidden=32, layers=2).value(batch["states"])
        fresh_loss = expectile_loss(target_q - fresh_value, 0.7).item()
    assert losses["value"].item() < 0.5 * fresh_loss  # V depends on s alone: part of the residual is irreducible


def test_soft_update_moves_the_target_by_the_rate():
    """target <- (1 - rate) target + rate source, parameter by parameter."""
    source, target = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    before = [p.clone() for p in target.parameters()]
    soft_update(target, source, 0.25)
    for old, new, src in zip(before, target.parameters(), source.parameters()):
        torch.testing.assert_close(new, 0.75 * old + 0.25 * src)


# ---- AM-Q on a toy linear system ----------------------------------------------------------------
STEP_SIZE = 0.2  # toy system: s' = s + 0.2 a, reward -|s'|; the origin is the goal


def toy_step(states, actions):
    next_states = states + STEP_SIZE * actions
    return next_states, -next_states.norm(dim=-1)


def toy_chunk_return(states, chunks):
    """The true reward of executing a chunk from a state: a stand-in for a fitted chunk Q."""
    total = torch.zeros(len(states))
    for action in chunks.unbind(dim=1):
        states, reward = toy_step(states, action)
        total += reward
    return total


def toward_origin(histories):  # a good policy: steer to the origin, 2 actions per chunk
    return (-2 * histories[:, -1]).clamp(-1, 1)[:, None].repeat(1, 2, 1)


def away_from_origin(histories):  # a bad one
    return (2 * histories[:, -1]).clamp(-1, 1)[:, None].repeat(1, 2, 1)


@pytest.fixture(scope="module")
def fitted_toy_model():
    """An ensemble fitted once to the toy system; the tests below only read it (no_grad methods)."""
    torch.manual_seed(0)
    states, actions = torch.rand(2000, 2) * 4 - 2, torch.rand(2000, 2) * 2 - 1
    next_states, rewards = toy_step(states, actions)
    model = EnsembleDynamics(obs_dim=2, act_dim=2, num_members=3, num_elites=2, hidden_dim=64)
    model.set_input_statistics(states, actions)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(400):
        batch = torch.randint(2000, (256,))
        loss = model.loss(states[batch], actions[batch], next_states[batch], rewards[batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.select_elites(states[:500], actions[:500], next_states[:500], rewards[:500])
    return model


def test_am_q_ranks_a_good_policy_above_a_bad_one_on_a_toy_linear_system(fitted_toy_model):
    """With a model fitted to s' = s + 0.2a, AM-Q scores steering to the goal above steering away."""
    model = fitted_toy_model
    torch.manual_seed(0)
    start = torch.rand(64, 1, 2) * 2 - 1
    never = lambda next_states: torch.zeros(len(next_states), dtype=torch.bool)
    generator = torch.Generator().manual_seed(0)
    good = am_q_ratio(
        *am_q_rollouts(toward_origin, toy_chunk_return, model, never, start, num_steps=10, generator=generator)
    )
    bad = am_q_ratio(
        *am_q_rollouts(away_from_origin, toy_chunk_return, model, never, start, num_steps=10, generator=generator)
    )
    assert good.item() > bad.item() + 1.0


def test_am_q_stops_counting_at_a_predicted_termination(fitted_toy_model):
    """If every first step terminates, AM-Q is the mean Q of the start states' chunks alone."""
    model = fitted_toy_model
    start = torch.rand(32, 1, 2) * 2 - 1
    always = lambda next_states: torch.ones(len(next_states), dtype=torch.bool)
    score = am_q_ope(away_from_origin, toy_chunk_return, model, always, start, num_steps=10)
    expected = toy_chunk_return(start[:, -1], away_from_origin(start)).mean()
    torch.testing.assert_close(score, expected)


# ---- diffusion augmentation and its KL filter -----------------------------------------------------
class CountingModel:
    """A stand-in model whose disagreement is |s_0| and whose step is s' = s + 1 (reward 1)."""

    def disagreement(self, states, actions):
        return states[:, 0].abs()

    def sample_step(self, states, actions, generator=None):
        return states + 1, torch.ones(len(states))


def test_augmentation_keeps_each_trajectory_until_its_first_step_at_or_above_epsilon():
    """From s_0 = 0 the disagreement runs 0, 1, 2, 3, ...: with epsilon 2.5 every trajectory keeps
    exactly its steps at 0, 1, 2 and nothing after, whatever the horizon allows."""
    start = torch.zeros(5, 1, 2)
    never = lambda next_states: torch.zeros(len(next_states), dtype=torch.bool)
    out = diffusion_augmentation(
        away_from_origin, CountingModel(), never, start, num_steps=10, epsilon=2.5, max_transitions=1000
    )
    assert len(out["states"]) == 5 * 3
    assert sorted(out["states"][:, 0].tolist()) == [0.0] * 5 + [1.0] * 5 + [2.0] * 5
    torch.testing.assert_close(out["next_states"], out["states"] + 1)


def test_augmentation_never_exceeds_its_budget_and_stops_at_terminations():
    """At most max_transitions come back; a predicted termination ends a trajectory after its step."""
    start = torch.zeros(5, 1, 2)
    never = lambda next_states: torch.zeros(len(next_states), dtype=torch.bool)
    always = lambda next_states: torch.ones(len(next_states), dtype=torch.bool)
    unlimited = diffusion_augmentation(
        away_from_origin, CountingModel(), never, start, num_steps=8, epsilon=float("inf"), max_transitions=10_000
    )
    assert len(unlimited["states"]) == 5 * 8
    capped = diffusion_augmentation(
        away_from_origin, CountingModel(), never, start, num_steps=8, epsilon=float("inf"), max_transitions=13
    )
    assert len(capped["states"]) == 13
    terminal = diffusion_augmentation(
        away_from_origin, CountingModel(), always, start, num_steps=8, epsilon=float("inf"), max_transitions=10_000
    )
    assert len(terminal["states"]) == 5


def test_augmentation_filter_on_a_fitted_model_keeps_only_low_disagreement_steps(fitted_toy_model):
    """With a real fitted ensemble and epsilon from the 0.5 quantile of its disagreement on data,
    every kept synthetic step is below epsilon, and the filter drops some."""
    model = fitted_toy_model
    torch.manual_seed(1)
    data_states, data_actions = torch.rand(500, 2) * 4 - 2, torch.rand(500, 2) * 2 - 1
    epsilon = disagreement_threshold(model, data_states, data_actions, quantile=0.5)
    start = torch.rand(64, 1, 2) * 4 - 2
    never = lambda next_states: torch.zeros(len(next_states), dtype=torch.bool)
    generator = torch.Generator().manual_seed(0)
    out = diffusion_augmentation(
        away_from_origin,
        model,
        never,
        start,
        num_steps=10,
        epsilon=epsilon,
        max_transitions=10_000,
        generator=generator,
    )
    assert 0 < len(out["states"]) < 64 * 10
    assert (model.disagreement(out["states"], out["actions"]) < epsilon).all()


def test_mixed_batch_draws_real_and_synthetic_in_proportion():
    """300 real train rows (reward 0) and 100 synthetic ones (reward 1): a quarter of the draws are
    synthetic; rows outside the train split never appear; with no synthetic data the draw is the
    plain real one (the same random numbers)."""
    real = (torch.arange(400.0)[:, None], torch.zeros(400, 1), torch.zeros(400, 1), torch.zeros(400))
    synthetic = (-torch.ones(100, 1), torch.zeros(100, 1), torch.zeros(100, 1), torch.ones(100))
    train_rows = torch.arange(100, 400)
    states, _, _, rewards = mixed_batch(real, synthetic, train_rows, 40_000, torch.Generator().manual_seed(0))
    assert rewards.mean().item() == pytest.approx(0.25, abs=0.01)
    assert (states[rewards == 0] >= 100).all() and (states[rewards == 1] == -1).all()
    empty = tuple(part[:0] for part in synthetic)
    states, *_ = mixed_batch(real, empty, train_rows, 64, torch.Generator().manual_seed(1))
    expected = train_rows[torch.randint(300, (64,), generator=torch.Generator().manual_seed(1))]
    assert torch.equal(states[:, 0], expected.float())


# ---- the model's episode return (the offline choice) ----------------------------------------------
def test_model_return_sums_the_predicted_rewards_up_to_the_first_termination():
    """s' = s + 1 with reward 1, terminal once s'_0 >= 5: from s_0 = 0 the return is 5 (the
    terminating step's reward counts, as the environment pays it), from s_0 = 2 it is 3, and
    nothing after counts though the rollout goes on for the other starts; without a termination
    it is the number of steps, in whole chunks of 2 (8 for num_steps 7)."""
    start = torch.tensor([[[0.0, 0.0]], [[2.0, 0.0]]])
    ends_at_5 = lambda next_states: next_states[:, 0] >= 5
    returns = model_returns(away_from_origin, CountingModel(), ends_at_5, start, num_steps=20)
    assert returns.tolist() == [5.0, 3.0]
    never = lambda next_states: torch.zeros(len(next_states), dtype=torch.bool)
    assert model_returns(away_from_origin, CountingModel(), never, start, num_steps=7).tolist() == [8.0, 8.0]


# ---- the gate's penalized AM-Q ----------------------------------------------------------------------
class ConstantUncertaintyModel(CountingModel):
    """s' = s + 1 with MOPO uncertainty u = 0.5 everywhere."""

    def uncertainty(self, states, actions):
        return torch.full((len(states),), 0.5)


def test_penalized_am_q_subtracts_the_discounted_uncertainty_to_go():
    """With Q = 0, chunks of 2 and 6 steps, the chunks start at t = 0, 2, 4 with 6, 4 and 2 steps
    of penalty ahead: the score is -lambda u mean(S_6, S_4, S_2), S_n = sum_{t<n} gamma^t."""
    start = torch.zeros(3, 1, 2)
    never = lambda next_states: torch.zeros(len(next_states), dtype=torch.bool)
    zero_q = lambda states, chunks: torch.zeros(len(states))
    gamma, penalty = 0.9, 2.0
    score = am_q_ope(
        away_from_origin,
        zero_q,
        ConstantUncertaintyModel(),
        never,
        start,
        num_steps=6,
        penalty=penalty,
        gamma=gamma,
    )
    discounted = lambda n: sum(gamma**t for t in range(n))
    expected = -penalty * 0.5 * (discounted(6) + discounted(4) + discounted(2)) / 3
    assert score.item() == pytest.approx(expected, rel=1e-6)
    plain = am_q_ope(away_from_origin, zero_q, ConstantUncertaintyModel(), never, start, num_steps=6)
    assert plain.item() == 0.0
    # A termination at the first step: only the first chunk counts, with one step of penalty.
    always = lambda next_states: torch.ones(len(next_states), dtype=torch.bool)
    score = am_q_ope(
        away_from_origin,
        zero_q,
        ConstantUncertaintyModel(),
        always,
        start,
        num_steps=6,
        penalty=penalty,
        gamma=gamma,
    )
    assert score.item() == pytest.approx(-penalty * 0.5, rel=1e-6)


def test_penalty_costs_more_for_a_policy_that_leaves_the_data(fitted_toy_model):
    """The model was fitted on |s| <= 2: steering away from the origin leaves that region, so its
    uncertainty penalty (plain minus penalized score) exceeds that of steering to the origin."""
    model = fitted_toy_model
    torch.manual_seed(0)
    start = torch.rand(64, 1, 2) * 2 - 1
    never = lambda next_states: torch.zeros(len(next_states), dtype=torch.bool)

    def penalty_of(policy):
        scores = [
            am_q_ope(
                policy,
                toy_chunk_return,
                model,
                never,
                start,
                num_steps=40,
                generator=torch.Generator().manual_seed(0),
                penalty=penalty,
            )
            for penalty in (0.0, 1.0)
        ]
        return (scores[0] - scores[1]).item()

    assert penalty_of(away_from_origin) > 1.5 * penalty_of(toward_origin) > 0


def test_layer_norm_critics_stay_bounded_far_from_the_data_where_plain_ones_grow():
    """With `layer_norm` every hidden layer's output is normalized, so however far a chunk lies from
    anything seen, |Q| <= |w_last| sqrt(hidden) + |b_last| (ReLU of unit-variance features has norm at
    most sqrt(hidden)); the plain heads grow with the input's scale (ReLU networks are positively
    homogeneous far out)."""
    torch.manual_seed(0)
    states, chunks = torch.randn(64, 3), torch.randn(64, 4, 2)
    bounded = ChunkCritics(obs_dim=3, act_dim=2, chunk_size=4, hidden=32, layers=2, layer_norm=True)
    plain = ChunkCritics(obs_dim=3, act_dim=2, chunk_size=4, hidden=32, layers=2)
    assert any(isinstance(layer, torch.nn.LayerNorm) for layer in bounded.q1)
    last = bounded.q1[-1]
    bound = last.weight.norm().item() * 32**0.5 + last.bias.abs().item()
    with torch.no_grad():
        for scale in (1.0, 1e3, 1e6):
            assert bounded.q_heads(states * scale, chunks * scale)[0].abs().max() <= bound + 1e-4
        near, far = (plain.q_heads(states * scale, chunks * scale)[0].abs().mean() for scale in (1.0, 1e3))
    assert far > 100 * near
