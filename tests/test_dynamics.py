"""Tests of dynamics.py: the probabilistic ensemble (training, elites, units, sampling,
disagreement) and the termination rules, checked against the real Gymnasium v5 environments
(docs/design.md, "Dynamics model and diffusion augmentation")."""

import copy
from types import SimpleNamespace

import gymnasium as gym
import numpy as np
import pytest
import torch
from torch.distributions import Independent, Normal, kl_divergence

from dynamics import (
    MOBILE_WEIGHT_DECAYS,
    TERMINATION_RULES,
    EnsembleDynamics,
    holdout_split,
    task_of_gym_id,
    termination_fn,
)

TRAIN_STEPS = 250


# ---- data and a trained model (shared by the ensemble tests) --------------------------------
def predict(model, states, actions) -> SimpleNamespace:
    """Every member's Gaussian over (s', r) in raw units: means and stds of next states and rewards."""
    with torch.no_grad():
        mean, logvar = model(states, actions)
    std, s = torch.exp(0.5 * logvar), model.obs_dim
    return SimpleNamespace(
        next_states=states + mean[..., :s], rewards=mean[..., s], next_state_std=std[..., :s], reward_std=std[..., s]
    )


@pytest.fixture(scope="module")
def transitions(tiny_dataset):
    """(s, a, s', r) of every step of the tiny Hopper dataset, float32, and a hold-out split."""
    parts = {"states": [], "actions": [], "next_states": [], "rewards": []}
    for episode in tiny_dataset.iterate_episodes():
        parts["states"].append(episode.observations[:-1])
        parts["actions"].append(episode.actions)
        parts["next_states"].append(episode.observations[1:])
        parts["rewards"].append(episode.rewards)
    data = {k: torch.as_tensor(np.concatenate(v), dtype=torch.float32) for k, v in parts.items()}
    train, holdout = holdout_split(len(data["states"]), torch.Generator().manual_seed(0))
    return data, train, holdout


def rows(data, indices):
    return data["states"][indices], data["actions"][indices], data["next_states"][indices], data["rewards"][indices]


@pytest.fixture(scope="module")
def trained(transitions):
    """The default ensemble (7 x 4 x 200) after TRAIN_STEPS Adam steps (lr 1e-3, batch 256) on the
    training split, elites chosen on the hold-out split; with its NLLs before and after."""
    data, train, holdout = transitions
    torch.manual_seed(0)
    model = EnsembleDynamics(obs_dim=11, act_dim=3)
    model.set_input_statistics(data["states"][train], data["actions"][train])
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)

    def nll(indices):
        with torch.no_grad():
            return model.member_nll(*rows(data, indices))

    record = {"train_before": nll(train), "holdout_before": nll(holdout)}
    with torch.no_grad():
        record["loss_before"] = model.loss(*rows(data, train)).item()
    generator = torch.Generator().manual_seed(1)
    for _ in range(TRAIN_STEPS):
        batch = train[torch.randint(len(train), (256,), generator=generator)]
        loss = model.loss(*rows(data, batch))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    record.update(train_after=nll(train), holdout_after=nll(holdout))
    with torch.no_grad():
        record["loss_after"] = model.loss(*rows(data, train)).item()
    model.select_elites(*rows(data, holdout))
    return model, record


# ---- training and elites -----------------------------------------------------------------------
def test_training_lowers_train_and_holdout_nll(trained):
    """A few hundred Adam steps lower the training objective and the NLL on train and hold-out
    transitions by more than 1 nat per target entry, for every member."""
    _, record = trained
    assert record["loss_after"] < record["loss_before"] - 1.0
    assert (record["train_after"] < record["train_before"] - 1.0).all()
    assert (record["holdout_after"] < record["holdout_before"] - 1.0).all()


def test_elites_are_the_best_holdout_members(trained, transitions):
    """elite_indices = the num_elites members with the lowest hold-out MSE of the raw mean
    prediction, best first (MSE recomputed here from `predict`, in float64)."""
    model, _ = trained
    data, _, holdout = transitions
    s, a, s2, r = rows(data, holdout)
    prediction = predict(model, s, a)
    errors = torch.cat(
        [(prediction.next_states - s2).double(), (prediction.rewards - r).double().unsqueeze(-1)], dim=-1
    )
    mse = (errors**2).mean(dim=(1, 2))
    torch.testing.assert_close(mse, model.holdout_mse(s, a, s2, r).double(), rtol=1e-4, atol=0.0)
    assert model.elite_indices.tolist() == torch.argsort(mse)[: model.num_elites].tolist()
    assert model.num_elites == 5 and model.num_members == 7


def test_corrupted_elite_leaves_the_elites(trained, transitions):
    """Ruining the best elite's weights and re-selecting drops it; the others move up in order."""
    model = copy.deepcopy(trained[0])
    data, _, holdout = transitions
    order = torch.argsort(model.holdout_mse(*rows(data, holdout))).tolist()
    victim = order[0]
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for layer in model.layers:
            layer.weight[victim] += torch.randn(layer.weight[victim].shape, generator=generator)
    mse = model.select_elites(*rows(data, holdout))
    assert victim not in model.elite_indices.tolist()
    assert model.elite_indices.tolist() == [m for m in order if m != victim][: model.num_elites]
    assert mse[victim] == mse.max()


def test_loss_is_gaussian_nll_plus_mobile_regularizers(transitions):
    """member_nll is -log N(y; mu, var) averaged per entry (checked with torch.distributions);
    loss = mean NLL + (per-layer weight decay + 0.01 * logvar bounds) / (2 M)."""
    data, train, _ = transitions
    torch.manual_seed(1)
    model = EnsembleDynamics(obs_dim=11, act_dim=3)
    model.set_input_statistics(data["states"][train], data["actions"][train])
    s, a, s2, r = rows(data, train[:64])
    mean, logvar = model(s, a)
    target = torch.cat([s2 - s, r.unsqueeze(-1)], dim=-1)
    expected_nll = -Normal(mean, torch.exp(0.5 * logvar)).log_prob(target).mean(dim=(1, 2))
    torch.testing.assert_close(model.member_nll(s, a, s2, r), expected_nll)
    decay = sum(w * 0.5 * (layer.weight**2).sum() for w, layer in zip(MOBILE_WEIGHT_DECAYS, model.layers))
    bounds = 0.01 * (model.max_logvar.sum() - model.min_logvar.sum())
    torch.testing.assert_close(
        model.loss(s, a, s2, r), expected_nll.mean() + (decay + bounds) / (2 * model.num_members)
    )


def test_logvar_soft_clamp_stays_inside_bounds():
    """The soft clamp keeps log-variances in [min_logvar, max_logvar + softplus(min - max)] for
    extreme inputs, is monotone, and is close to the identity well inside the bounds."""
    torch.manual_seed(2)
    model = EnsembleDynamics(obs_dim=11, act_dim=3, num_members=3, num_elites=2)
    with torch.no_grad():
        model.min_logvar.copy_(torch.linspace(-12.0, -6.0, 12))
        model.max_logvar.copy_(torch.linspace(-1.0, 2.0, 12))
    upper = model.max_logvar + torch.nn.functional.softplus(model.min_logvar - model.max_logvar)
    upper = upper + 1e-5  # float32 rounding of the two softplus steps (values up to 12)
    _, logvar = model(1e4 * torch.randn(32, 11), 1e4 * torch.randn(32, 3))
    assert (logvar <= upper).all() and (logvar >= model.min_logvar).all()
    assert (logvar > model.max_logvar - 1e-3).any() and (logvar < model.min_logvar + 1e-3).any()
    raw = torch.linspace(-1e3, 1e3, 2001).unsqueeze(-1).expand(-1, 12)
    bounded = model.bounded_logvar(raw)
    assert (bounded <= upper).all() and (bounded >= model.min_logvar).all()
    assert (bounded[1:] >= bounded[:-1]).all()
    middle = ((model.min_logvar + model.max_logvar) / 2).detach()  # >= 4 from either bound
    assert (model.bounded_logvar(middle) - middle).abs().max() < 0.05


# ---- units, shapes, sampling ---------------------------------------------------------------------
def test_shapes_and_per_member_batches():
    """predict/sample_step/disagreement shapes; (M, B, .) inputs give member m its own rows."""
    torch.manual_seed(3)
    model = EnsembleDynamics(obs_dim=11, act_dim=3)
    s, a = torch.randn(9, 11), torch.randn(9, 3)
    p = predict(model, s, a)
    assert p.next_states.shape == (7, 9, 11) and p.next_state_std.shape == (7, 9, 11)
    assert p.rewards.shape == (7, 9) and p.reward_std.shape == (7, 9)
    next_states, rewards = model.sample_step(s, a)
    assert next_states.shape == (9, 11) and rewards.shape == (9,)
    assert model.disagreement(s, a).shape == (9,)
    per_member_s, per_member_a = torch.randn(7, 9, 11), torch.randn(7, 9, 3)
    mean, logvar = model(per_member_s, per_member_a)
    assert mean.shape == logvar.shape == (7, 9, 12)
    for m in range(7):
        mean_m, logvar_m = model(per_member_s[m], per_member_a[m])
        torch.testing.assert_close(mean[m], mean_m[m])
        torch.testing.assert_close(logvar[m], logvar_m[m])


def test_predictions_are_in_raw_units(transitions):
    """Inputs are standardized inside with the data's mean and std + 1e-3, and predict returns
    raw units: next_state = state + predicted delta (checked against a copy with identity
    statistics fed pre-standardized inputs)."""
    data, train, _ = transitions
    torch.manual_seed(4)
    model = EnsembleDynamics(obs_dim=11, act_dim=3)
    model.set_input_statistics(data["states"][train].numpy(), data["actions"][train].numpy())
    inputs = torch.cat([data["states"][train], data["actions"][train]], dim=-1).double()
    torch.testing.assert_close(model.input_mean, inputs.mean(0).float())
    torch.testing.assert_close(model.input_std, (inputs.std(0, correction=0) + 1e-3).float())

    plain = copy.deepcopy(model)
    plain.input_mean.zero_()
    plain.input_std.fill_(1.0)
    s, a = data["states"][:50], data["actions"][:50]
    standardized = (torch.cat([s, a], -1) - model.input_mean) / model.input_std
    delta_and_reward, logvar = plain(standardized[:, :11], standardized[:, 11:])
    p = predict(model, s, a)
    torch.testing.assert_close(p.next_states, s + delta_and_reward[..., :11])
    torch.testing.assert_close(p.rewards, delta_and_reward[..., 11])
    torch.testing.assert_close(p.next_state_std, torch.exp(0.5 * logvar[..., :11]))
    torch.testing.assert_close(p.reward_std, torch.exp(0.5 * logvar[..., 11]))


def test_deterministic_step_is_the_chosen_members_mean(trained, transitions):
    """sample_step(deterministic=True) returns the chosen member's mean; by default each row's
    member is a random elite, every elite gets used and no other member does."""
    model, _ = trained
    data, _, holdout = transitions
    s, a = data["states"][holdout[:150]], data["actions"][holdout[:150]]
    s, a = s.repeat(4, 1), a.repeat(4, 1)  # 600 rows
    p = predict(model, s, a)
    members = torch.randint(model.num_members, (len(s),), generator=torch.Generator().manual_seed(5))
    rows_ = torch.arange(len(s))
    next_states, rewards = model.sample_step(s, a, deterministic=True, members=members)
    torch.testing.assert_close(next_states, p.next_states[members, rows_])
    torch.testing.assert_close(rewards, p.rewards[members, rows_])

    next_states, rewards = model.sample_step(s, a, torch.Generator().manual_seed(6), deterministic=True)
    outcome = torch.cat([next_states, rewards[:, None]], -1)
    all_means = torch.cat([p.next_states, p.rewards[..., None]], -1)  # (M, B, S + 1)
    distance = (all_means - outcome).abs().amax(-1)  # (M, B)
    chosen = distance.argmin(0)
    assert (distance[chosen, rows_] < 1e-6).all()
    assert set(chosen.tolist()) == set(model.elite_indices.tolist())


def test_stochastic_step_samples_the_members_gaussian(trained, transitions):
    """With one member and one state repeated, sample_step's draws have the member's mean and
    std (within sampling error), and the same generator seed reproduces them."""
    model, _ = trained
    data, _, holdout = transitions
    n = 8000
    s, a = data["states"][holdout[:1]].expand(n, -1), data["actions"][holdout[:1]].expand(n, -1)
    member = int(model.elite_indices[0])
    members = torch.full((n,), member)
    next_states, rewards = model.sample_step(s, a, torch.Generator().manual_seed(7), members=members)
    p = predict(model, s[:1], a[:1])
    mean = torch.cat([p.next_states[member, 0], p.rewards[member, :1]])
    std = torch.cat([p.next_state_std[member, 0], p.reward_std[member, :1]])
    samples = torch.cat([next_states, rewards[:, None]], -1)
    assert ((samples.mean(0) - mean).abs() < 5 * std / n**0.5).all()
    assert ((samples.std(0) / std - 1).abs() < 0.05).all()
    again, _ = model.sample_step(s, a, torch.Generator().manual_seed(7), members=members)
    assert torch.equal(again, next_states)
    other, _ = model.sample_step(s, a, torch.Generator().manual_seed(8), members=members)
    assert not torch.equal(other, next_states)


def test_disagreement_is_mean_pairwise_kl_over_elites(trained, transitions):
    """disagreement = mean over ordered elite pairs of KL(T_m || T_m') (summed over entries,
    checked with torch.distributions); positive for a trained ensemble; non-elites do not count."""
    model = copy.deepcopy(trained[0])
    data, _, holdout = transitions
    s, a = data["states"][holdout[:40]], data["actions"][holdout[:40]]
    d = model.disagreement(s, a)
    mean, logvar = model(s, a)
    gaussians = [Independent(Normal(mean[m], torch.exp(0.5 * logvar[m])), 1) for m in range(7)]
    elites = model.elite_indices.tolist()
    pairs = [kl_divergence(gaussians[i], gaussians[j]) for i in elites for j in elites if i != j]
    torch.testing.assert_close(d, torch.stack(pairs).mean(0).detach())
    assert (d > 0).all()

    outsider = next(m for m in range(7) if m not in elites)
    with torch.no_grad():
        model.layers[-1].bias[outsider] += 5.0
    torch.testing.assert_close(model.disagreement(s, a), d)
    with torch.no_grad():
        model.layers[-1].bias[elites[0]] += 5.0
    assert (model.disagreement(s, a) > d).all()


def test_disagreement_vanishes_for_identical_members(trained, transitions):
    """With every member of the trained ensemble given member 0's weights, the disagreement is
    ~0 at every state (it is > 0.1 nats with the trained, independently initialized members)."""
    model = copy.deepcopy(trained[0])
    data, _, holdout = transitions
    s, a = data["states"][holdout[:30]], data["actions"][holdout[:30]]
    assert (model.disagreement(s, a) > 0.1).all()
    with torch.no_grad():
        for layer in model.layers:
            layer.weight.copy_(layer.weight[:1].expand_as(layer.weight))
            layer.bias.copy_(layer.bias[:1].expand_as(layer.bias))
    assert model.disagreement(s, a).abs().max() < 1e-6


def test_constructor_and_holdout_split_sizes():
    """The constructor refuses inconsistent sizes; holdout_split holds out min(20%, 1000)
    transitions, disjoint from the training indices and covering all of them."""
    with pytest.raises(ValueError, match="num_elites"):
        EnsembleDynamics(11, 3, num_members=3, num_elites=5)
    with pytest.raises(ValueError, match="weight_decays"):
        EnsembleDynamics(11, 3, num_layers=2)
    small = EnsembleDynamics(11, 3, num_layers=2, weight_decays=(1e-5, 2e-5, 3e-5))
    assert len(small.layers) == 3
    for n, expected in [(100, 20), (4999, 999), (10000, 1000), (50000, 1000)]:
        train, holdout = holdout_split(n, torch.Generator().manual_seed(0))
        assert len(holdout) == expected and len(train) == n - expected
        assert torch.equal(torch.sort(torch.cat([train, holdout])).values, torch.arange(n))
    with pytest.raises(ValueError, match="hold-out"):
        holdout_split(4)


# ---- termination rules against the real environments ---------------------------------------------
ROLLOUT_STEPS = 1500  # per action scale


def rollout(env_id: str, scale: float, seed: int, kick: bool = False):
    """Random policy (actions scaled by `scale`) on the real v5 env: every next observation, its
    `terminated`, and whether the hidden (unclipped) qvel reached 100. `kick` gives the ant a
    random vertical velocity at every reset, so that it leaves the healthy height range."""
    env = gym.make(env_id)
    env.action_space.seed(seed)
    rng = np.random.default_rng(seed)
    unwrapped = env.unwrapped
    observations, terminated, fast = [], [], []
    env.reset(seed=seed)
    episode = 0
    for _ in range(ROLLOUT_STEPS):
        obs, _, term, truncated, _ = env.step(scale * env.action_space.sample())
        observations.append(obs)
        terminated.append(term)
        fast.append(np.abs(unwrapped.data.qvel).max() >= 100.0)
        if term or truncated:
            episode += 1
            env.reset(seed=seed + episode)
            if kick:
                qvel = unwrapped.data.qvel.copy()
                qvel[2] = rng.uniform(-6.0, 6.0)  # vertical velocity of the free torso joint
                unwrapped.set_state(unwrapped.data.qpos.copy(), qvel)
    env.close()
    return np.array(observations), np.array(terminated), np.array(fast)


@pytest.mark.parametrize("env_id, min_terminations", [("Hopper-v5", 100), ("Walker2d-v5", 100), ("Ant-v5", 30)])
def test_termination_rule_matches_gymnasium_on_rollouts(env_id, min_terminations):
    """On random and scaled-random rollouts of the real env (ant: also kicked upward and
    downward), the rule on every next observation equals Gymnasium's `terminated`, for numpy
    and torch inputs. The only exception allowed is hopper's documented one (unclipped
    |qvel| >= 100), and it must then be exactly that case."""
    task = task_of_gym_id(env_id)
    rule = termination_fn(task)
    runs = [rollout(env_id, scale, seed=10 * i) for i, scale in enumerate((0.1, 0.5, 1.0))]
    if task == "ant":  # random actions rarely leave [0.2, 1.0]: kick the torso as well
        runs.append(rollout(env_id, 1.0, seed=99, kick=True))
    observations, terminated, fast = (np.concatenate(part) for part in zip(*runs))
    predicted = rule(observations)
    assert predicted.dtype == bool and predicted.shape == terminated.shape
    predicted_torch = rule(torch.as_tensor(observations))
    assert predicted_torch.dtype == torch.bool
    assert np.array_equal(predicted_torch.numpy(), predicted)

    documented_gap = fast & terminated & ~predicted if task == "hopper" else np.zeros_like(fast)
    assert np.array_equal(predicted[~documented_gap], terminated[~documented_gap])
    assert terminated.sum() >= min_terminations and (~terminated).sum() >= 1000


@pytest.mark.parametrize("env_id", ["Hopper-v5", "Walker2d-v5", "Ant-v5"])
def test_termination_rule_matches_is_healthy_at_the_bounds(env_id):
    """For states set directly around and exactly on the v5 health bounds (heights, angles,
    hopper's +-100 range on joint angles, ant's lower height bound and a NaN velocity), the rule
    on the env's observation equals `not is_healthy` (strict vs inclusive bounds included)."""
    env = gym.make(env_id)
    env.reset(seed=0)
    unwrapped = env.unwrapped
    rng = np.random.default_rng(1)
    # (height bounds, a range of random heights, angle bounds, a range of random angles)
    bounds = {
        "Hopper-v5": ((0.7,), (0.4, 1.6), (-0.2, 0.2), (-0.3, 0.3)),
        "Walker2d-v5": ((0.8, 2.0), (0.5, 2.3), (-1.0, 1.0), (-1.3, 1.3)),
        "Ant-v5": ((0.2, 1.0), (0.0, 1.3), (), ()),
    }[env_id]
    z_index = 2 if env_id == "Ant-v5" else 1
    rule = termination_fn(task_of_gym_id(env_id))
    checked = {True: 0, False: 0}
    for trial in range(400):
        qpos = unwrapped.init_qpos + rng.uniform(-0.1, 0.1, unwrapped.model.nq)
        qvel = rng.uniform(-9.0, 9.0, unwrapped.model.nv)  # below the observation's clip at 10
        z_choices = list(bounds[0]) + [rng.uniform(*bounds[1])] * 2
        qpos[z_index] = z_choices[trial % len(z_choices)] + rng.choice([0.0, 0.0, 1e-9, -1e-9])
        if env_id != "Ant-v5":
            angle_choices = list(bounds[2]) + [rng.uniform(*bounds[3])] * 2
            qpos[2] = angle_choices[trial % len(angle_choices)] + rng.choice([0.0, 1e-9, -1e-9])
        if env_id == "Hopper-v5" and trial % 7 == 0:
            qpos[3 + trial % 3] = rng.choice([100.0, -100.0, 99.9, 100.1])
        if env_id == "Ant-v5" and trial % 50 == 0:
            qvel[5] = np.nan
        unwrapped.set_state(qpos, qvel)
        unhealthy = not unwrapped.is_healthy
        assert bool(rule(unwrapped._get_obs())) == unhealthy, (trial, qpos, qvel)
        checked[unhealthy] += 1
    env.close()
    assert checked[True] >= 50 and checked[False] >= 50


def test_hopper_gap_hidden_fast_velocity():
    """The documented gap: Hopper-v5 terminates on an unclipped |qvel| >= 100 that the
    observation (clipped to +-10) cannot show, so the rule says healthy there."""
    env = gym.make("Hopper-v5")
    env.reset(seed=0)
    unwrapped = env.unwrapped
    qvel = unwrapped.data.qvel.copy()
    qvel[0] = 300.0  # forward speed of the torso; height and angle stay healthy for a step
    unwrapped.set_state(unwrapped.data.qpos.copy(), qvel)
    obs, _, terminated, _, _ = env.step(np.zeros(3))
    env.close()
    assert terminated and unwrapped.data.qvel[0] >= 100.0
    assert obs[5] == 10.0  # the observation holds the clipped x velocity
    assert 0.7 < obs[0] and abs(obs[1]) < 0.2
    assert not termination_fn("hopper")(obs)


def test_halfcheetah_never_terminates():
    """HalfCheetah-v5 never terminates on a random rollout, and neither does the rule, even on
    NaN or huge observations; the output has the batch shape, for numpy and torch."""
    observations, terminated, _ = rollout("HalfCheetah-v5", 1.0, seed=0)
    rule = termination_fn("halfcheetah")
    assert not terminated.any() and not rule(observations).any()
    garbage = np.full((4, 5, 17), np.nan)
    garbage[0] = 1e9
    assert rule(garbage).shape == (4, 5) and not rule(garbage).any()
    assert rule(torch.as_tensor(garbage)).dtype == torch.bool


def test_unknown_task_and_wrong_layout_are_refused():
    """An unknown task raises with the supported tasks and how to add one; an observation of the
    wrong size (e.g. positions included) raises instead of reading the wrong entries."""
    with pytest.raises(ValueError) as error:
        termination_fn("pen")
    for task in TERMINATION_RULES:
        assert task in str(error.value)
    assert "TERMINATION_RULES" in str(error.value)
    assert set(TERMINATION_RULES) == {"hopper", "walker2d", "ant", "halfcheetah"}
    with pytest.raises(ValueError, match="size 11"):
        termination_fn("hopper")(np.zeros((3, 12)))


def test_task_of_gym_id():
    """Gymnasium ids map to the rules' task names (namespace and version dropped)."""
    assert task_of_gym_id("Hopper-v5") == "hopper"
    assert task_of_gym_id("Walker2d-v5") == "walker2d"
    assert task_of_gym_id("HalfCheetah-v5") == "halfcheetah"
    assert task_of_gym_id("Ant-v5") == "ant"
    assert task_of_gym_id("gymnasium/Hopper-v4") == "hopper"
