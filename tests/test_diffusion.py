"""Tests of diffusion.py: noise schedule, denoiser shapes, the multi-seed DiffusionPolicy (sampling,
fixed seeds, checkpoints, adaptive perturbation) and a toy two-mode fit (docs/design.md, "Diffusion policy")."""

import io
import math

import numpy as np
import pytest
import torch
import torch.nn as nn

from diffusion import (
    DiffusionPolicy,
    MLPDenoiser,
    PolicyConfig,
    UNetTransformerDenoiser,
    cosine_alpha_bars,
    ddim_timesteps,
)


@pytest.fixture(scope="module", autouse=True)
def single_thread():
    """These networks are tiny: one thread is faster and immune to a busy 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_policy(obs_dim=3, act_dim=2, seed=0, **overrides):
    """A small policy with non-trivial state statistics and action bounds."""
    torch.manual_seed(seed)
    kwargs = dict(
        obs_dim=obs_dim,
        act_dim=act_dim,
        chunk_size=4,
        history_size=2,
        denoiser="mlp",
        mlp_hidden=64,
        unet_dims=(16, 32),
        diffusion_steps=20,
        ddim_steps=5,
        n_subpolicies=4,
        noise_seed=0,
        tau=0.1,
        eta=0.1,
        min_std=0.1,
    )
    kwargs.update(overrides)
    config = PolicyConfig(**kwargs)
    return DiffusionPolicy(
        config,
        state_mean=0.5 * np.ones(obs_dim),
        state_std=2.0 * np.ones(obs_dim),
        action_low=-2.0 * np.ones(act_dim),
        action_high=np.linspace(1, 3, act_dim),
    )


def random_states(policy, batch, seed=1):
    generator = torch.Generator().manual_seed(seed)
    config = policy.config
    return torch.randn(batch, config.history_size, config.obs_dim, generator=generator)


# ---- schedule ---------------------------------------------------------------------------------
@pytest.mark.parametrize("num_steps", [1, 2, 5, 20, 100, 1000])
def test_cosine_alpha_bars(num_steps):
    """abar has length K, lies in (0, 1] and is strictly decreasing."""
    abar = cosine_alpha_bars(num_steps)
    assert abar.shape == (num_steps,)
    assert (abar > 0).all() and (abar <= 1).all()
    assert (abar[1:] < abar[:-1]).all()


def test_cosine_alpha_bars_formula():
    """Before the beta clip bites, abar_k = f(k+1)/f(0) with f the cosine of Nichol & Dhariwal."""
    K, s = 20, 0.008
    f = lambda t: math.cos((t / K + s) / (1 + s) * math.pi / 2) ** 2
    expected = torch.tensor([f(k + 1) / f(0) for k in range(K - 1)])
    torch.testing.assert_close(cosine_alpha_bars(K)[:-1], expected)


def test_cosine_alpha_bars_last_step_clipped():
    """The last beta (1 at t = 1) is clipped to 0.999, so abar_{K-1} = 0.001 * abar_{K-2}."""
    abar = cosine_alpha_bars(20)
    assert abar[-1].item() == pytest.approx(1e-3 * abar[-2].item(), rel=1e-4)


@pytest.mark.parametrize("train_steps,sample_steps", [(20, 5), (20, 2), (20, 20), (100, 7), (1000, 50), (7, 6)])
def test_ddim_timesteps(train_steps, sample_steps):
    """DDIM steps descend strictly from K-1 to 0 with the requested count."""
    steps = ddim_timesteps(train_steps, sample_steps)
    assert len(steps) == sample_steps
    assert steps[0] == train_steps - 1 and steps[-1] == 0
    assert all(a > b for a, b in zip(steps, steps[1:]))
    assert all(isinstance(k, int) for k in steps)


def test_ddim_timesteps_example_and_single_step():
    """The documented example holds; one step visits only the noisiest step."""
    assert ddim_timesteps(20, 5) == [19, 14, 10, 5, 0]
    assert ddim_timesteps(20, 1) == [19]


@pytest.mark.parametrize("sample_steps", [0, -1, 21])
def test_ddim_timesteps_out_of_range(sample_steps):
    """A DDIM step count outside [1, K] is a ValueError."""
    with pytest.raises(ValueError):
        ddim_timesteps(20, sample_steps)


# ---- denoisers ----------------------------------------------------------------------------------
@pytest.mark.parametrize("chunk_size", [1, 3, 4, 5])
@pytest.mark.parametrize("history_size", [1, 2])
def test_mlp_denoiser_shape(chunk_size, history_size):
    """MLPDenoiser maps (B, H, A) to (B, H, A)."""
    torch.manual_seed(0)
    net = MLPDenoiser(obs_dim=3, act_dim=2, chunk_size=chunk_size, history_size=history_size, hidden=64)
    x = torch.randn(5, chunk_size, 2)
    out = net(x, torch.randint(0, 20, (5,)), torch.randn(5, history_size, 3))
    assert out.shape == x.shape
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("dims", [(16, 32), (8, 16, 32)])
@pytest.mark.parametrize("chunk_size", [1, 3, 4, 5])
@pytest.mark.parametrize("history_size", [1, 2])
def test_unet_denoiser_shape(dims, chunk_size, history_size):
    """UNetTransformerDenoiser maps (B, H, A) to (B, H, A) for odd/even/unit chunk sizes."""
    torch.manual_seed(0)
    net = UNetTransformerDenoiser(obs_dim=3, act_dim=2, chunk_size=chunk_size, history_size=history_size, dims=dims)
    x = torch.randn(5, chunk_size, 2)
    out = net(x, torch.randint(0, 20, (5,)), torch.randn(5, history_size, 3))
    assert out.shape == x.shape
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("denoiser", ["mlp", "unet"])
def test_denoiser_conditions_on_step_and_state(denoiser):
    """The predicted noise changes with the diffusion step, with the states and per batch row."""
    policy = make_policy(denoiser=denoiser)
    net = policy.denoiser
    torch.manual_seed(3)
    x, states = torch.randn(4, 4, 2), torch.randn(4, 2, 3)
    steps = torch.full((4,), 3)
    with torch.no_grad():
        base = net(x, steps, states)
        assert not torch.allclose(base, net(x, steps + 10, states), atol=1e-4)
        assert not torch.allclose(base, net(x, steps, states + 1.0), atol=1e-4)
        # Batch rows are independent: changing row 0's state leaves rows 1.. unchanged.
        other = states.clone()
        other[0] += 1.0
        changed = net(x, steps, other)
        torch.testing.assert_close(changed[1:], base[1:])
        assert not torch.allclose(changed[0], base[0], atol=1e-4)


class OracleDenoiser(nn.Module):
    """eps_theta that knows the clean chunk: eps = (x_k - sqrt(abar_k) target) / sqrt(1 - abar_k)."""

    def __init__(self, alpha_bars, target):
        super().__init__()
        self.alpha_bars, self.target = alpha_bars, target

    def forward(self, noisy_chunks, steps, states):
        abar = self.alpha_bars[steps][:, None, None]
        return (noisy_chunks - abar.sqrt() * self.target) / (1 - abar).sqrt()


def test_loss_is_zero_for_oracle_and_respects_mask():
    """The epsilon loss is 0 for a denoiser that knows the chunk; masked positions do not count."""
    policy = make_policy(chunk_size=4)
    torch.manual_seed(6)
    target = 0.5 * torch.rand(4, 2) - 0.25
    policy.denoiser = OracleDenoiser(policy.alpha_bars, target)
    states = random_states(policy, 64)
    chunks = target.expand(64, 4, 2).clone()
    mask = torch.ones(64, 4)
    assert policy.loss(states, chunks, mask).item() < 1e-8
    chunks[:, 2:] += 0.5  # wrong chunk ends ...
    assert policy.loss(states, chunks, mask).item() > 1e-3
    mask[:, 2:] = 0.0  # ... that are padding: no longer counted
    assert policy.loss(states, chunks, mask).item() < 1e-8


def test_ddim_with_oracle_recovers_target():
    """With an exact denoiser, DDIM (eta 0) returns the clean chunk from every seed and state."""
    policy = make_policy(eta=0.0, n_subpolicies=5)
    torch.manual_seed(7)
    target = 0.5 * torch.rand(4, 2) - 0.25
    policy.denoiser = OracleDenoiser(policy.alpha_bars, target)
    states = random_states(policy, 3)
    with torch.no_grad():
        actions = policy.sample(states).actions
    torch.testing.assert_close(actions, target.expand(3, 5, 4, 2), atol=1e-4, rtol=0)
    # DDIM eta 0 keeps the implied noise fixed: x_k = sqrt(abar_k) target + sqrt(1 - abar_k) e,
    # with the same e at every intermediate step.
    with torch.no_grad():
        x, implied = policy.initial_noise(3), []
        for i, k in enumerate(policy.timesteps[1:]):
            x = policy._step_mean(x, i, states)
            abar = policy.alpha_bars[k]
            implied.append((x - abar.sqrt() * target) / (1 - abar).sqrt())
    for e in implied[1:]:
        torch.testing.assert_close(e, implied[0], atol=1e-4, rtol=1e-4)


def test_perturbation_with_oracle_is_eta_times_seed_noise():
    """Identical estimates (d = 0) get sigma = eta: x0_hat = target + eta * xi_i, then the DDIM update from it."""
    eta = 0.05
    policy = make_policy(eta=eta, tau=0.5, n_subpolicies=5)
    torch.manual_seed(8)
    target = 0.5 * torch.rand(4, 2) - 0.25
    policy.denoiser = OracleDenoiser(policy.alpha_bars, target)
    states = random_states(policy, 3)
    x = torch.randn(3, 5, 4, 2)  # any x_k: the oracle's estimate is the target for all of them
    for i, k in enumerate(policy.timesteps):
        with torch.no_grad():
            mean = policy._step_mean(x, i, states)
        x0 = (target + eta * policy.perturbation_noise[:, i]).clamp(-1, 1)
        abar = policy.alpha_bars[k]
        abar_prev = policy.alpha_bars[policy.timesteps[i + 1]] if i + 1 < len(policy.timesteps) else torch.tensor(1.0)
        eps = (x - abar.sqrt() * x0) / (1 - abar).sqrt()  # the noise implied by the moved x0
        expected = abar_prev.sqrt() * x0 + (1 - abar_prev).sqrt() * eps
        torch.testing.assert_close(mean, expected, atol=1e-4, rtol=1e-4)
    # At the last step the output is the moved estimate itself.
    torch.testing.assert_close(mean, x0.expand(3, -1, -1, -1), atol=1e-4, rtol=0)


# ---- sampling ---------------------------------------------------------------------------------
@pytest.mark.parametrize("denoiser", ["mlp", "unet"])
@pytest.mark.parametrize("chunk_size", [1, 3, 4])
def test_sample_shapes(denoiser, chunk_size):
    """sample gives (B, n, H, A) in [-1, 1]."""
    policy = make_policy(denoiser=denoiser, chunk_size=chunk_size, ddim_steps=4, n_subpolicies=3)
    states = random_states(policy, 6)
    with torch.no_grad():
        actions = policy.sample(states).actions
    assert actions.shape == (6, 3, chunk_size, 2)
    assert actions.abs().max().item() <= 1.0


def test_sample_actions_clipped_for_large_outputs():
    """Even with a denoiser whose outputs are huge, actions stay in [-1, 1]."""
    policy = make_policy()
    with torch.no_grad():
        policy.denoiser.net[-1].bias.fill_(50.0)
        actions = policy.sample(random_states(policy, 5)).actions
    assert actions.abs().max().item() <= 1.0
    assert actions.abs().max().item() > 0.99


def test_sample_unrolls_the_step_means_from_the_seeds():
    """Unrolling `_step_mean` from the fixed seeds and clipping reproduces sample()'s actions."""
    policy = make_policy(eta=0.2, tau=10.0)
    states = random_states(policy, 5)
    with torch.no_grad():
        x = policy.initial_noise(5)
        for i in range(policy.config.ddim_steps):
            x = policy._step_mean(x, i, states)
        torch.testing.assert_close(x.clamp(-1, 1), policy.sample(states).actions)


def test_start_noise_replaces_the_seeds():
    """start_noise = the fixed seeds reproduces sample(states); negating sub-policy 1's start noise
    changes its chunk and no other (eta 0: with the perturbation on, the partners would move with it)."""
    policy = make_policy(eta=0.0)
    states = random_states(policy, 5)
    with torch.no_grad():
        expected = policy.sample(states).actions
        start = policy.initial_noise(5).clone()
        torch.testing.assert_close(policy.sample(states, start_noise=start).actions, expected, atol=0, rtol=0)
        start[:, 1] = -start[:, 1]
        moved = policy.sample(states, start_noise=start).actions
    assert (moved[:, 1] - expected[:, 1]).abs().amax((-1, -2)).min().item() > 1e-3
    others = [0, 2, 3]
    torch.testing.assert_close(moved[:, others], expected[:, others], atol=0, rtol=0)


# ---- fixed seeds, checkpoints, units -------------------------------------------------------------
@pytest.mark.parametrize("denoiser", ["mlp", "unet"])
def test_deterministic_subpolicies(denoiser):
    """Deterministic sampling repeats exactly, sub-policies differ pairwise, rows depend on their state only."""
    policy = make_policy(denoiser=denoiser, n_subpolicies=5)
    states = random_states(policy, 6)
    with torch.no_grad():
        first = policy.sample(states).actions
        second = policy.sample(states).actions
        single = policy.sample(states[2:3]).actions
    assert torch.equal(first, second)
    torch.testing.assert_close(single[0], first[2], atol=1e-5, rtol=0)
    n = policy.config.n_subpolicies
    for i in range(n):
        for j in range(i + 1, n):
            gap = (first[:, i] - first[:, j]).abs().amax((-1, -2))
            assert (gap > 1e-3).all(), (i, j)


def test_seeds_come_from_noise_seed():
    """The sub-policy seeds are a function of noise_seed only (same seed, same noise; new seed, new noise)."""
    a = make_policy(seed=0, noise_seed=7)
    b = make_policy(seed=1, noise_seed=7)
    c = make_policy(seed=0, noise_seed=8)
    assert torch.equal(a.sub_policy_noise, b.sub_policy_noise)
    assert torch.equal(a.perturbation_noise, b.perturbation_noise)
    assert not torch.allclose(a.sub_policy_noise, c.sub_policy_noise)
    assert a.sub_policy_noise.shape == (4, 4, 2)
    assert a.perturbation_noise.shape == (4, 5, 4, 2)


@pytest.mark.parametrize("denoiser", ["mlp", "unet"])
def test_checkpoint_roundtrip(denoiser):
    """from_checkpoint(to_checkpoint()) (also through torch.save/torch.load) gives identical actions."""
    policy = make_policy(denoiser=denoiser, eta=0.2, tau=10.0, noise_seed=3)
    states = random_states(policy, 4)
    buffer = io.BytesIO()
    torch.save(policy.to_checkpoint(), buffer)
    buffer.seek(0)
    # A differently seeded construction: everything must come from the checkpoint.
    torch.manual_seed(123)
    reloaded = DiffusionPolicy.from_checkpoint(policy.to_checkpoint())
    from_disk = DiffusionPolicy.from_checkpoint(torch.load(buffer))
    with torch.no_grad():
        expected = policy.sample(states).actions
        for other in (reloaded, from_disk):
            assert other.config == policy.config
            assert torch.equal(other.sample(states).actions, expected)
            assert torch.equal(other.state_mean, policy.state_mean)
            assert torch.equal(other.action_high, policy.action_high)


def test_scale_unscale_inverse_and_act():
    """scale/unscale are inverse maps between env bounds and [-1, 1]; act = unscale(sample(normalize))."""
    policy = make_policy()
    low, high = policy.action_low, policy.action_high
    torch.testing.assert_close(policy.scale_actions(low), -torch.ones(2))
    torch.testing.assert_close(policy.scale_actions(high), torch.ones(2))
    torch.manual_seed(5)
    env_actions = low + torch.rand(10, 4, 2) * (high - low)
    torch.testing.assert_close(policy.unscale_actions(policy.scale_actions(env_actions)), env_actions)
    unit = torch.rand(10, 4, 2) * 2 - 1
    torch.testing.assert_close(policy.scale_actions(policy.unscale_actions(unit)), unit)
    raw = random_states(policy, 3).numpy() * 3 + 1
    acted = policy.act(raw)
    assert isinstance(acted, np.ndarray) and acted.shape == (3, 4, 4, 2)
    with torch.no_grad():
        expected = policy.unscale_actions(policy.sample(policy.normalize_states(torch.as_tensor(raw))).actions)
    np.testing.assert_allclose(acted, expected.numpy(), atol=1e-6)
    assert (acted >= low.numpy() - 1e-6).all() and (acted <= high.numpy() + 1e-6).all()


# ---- adaptive perturbation inside the sampler -------------------------------------------------
def test_perturbation_changes_actions_deterministically():
    """eta > 0 with a large tau moves the deterministic actions; a tiny tau leaves them as eta = 0."""
    plain = make_policy(eta=0.0, n_subpolicies=6)
    states = random_states(plain, 5)
    pushed = make_policy(eta=0.3, tau=100.0, n_subpolicies=6)
    inactive = make_policy(eta=0.3, tau=1e-6, n_subpolicies=6)
    pushed.load_state_dict(plain.state_dict())
    inactive.load_state_dict(plain.state_dict())
    with torch.no_grad():
        base = plain.sample(states).actions
        moved = pushed.sample(states).actions
        assert torch.equal(moved, pushed.sample(states).actions)
        assert torch.equal(inactive.sample(states).actions, base)
    assert (moved - base).abs().amax((-1, -2)).min().item() > 1e-3


# ---- toy two-mode data --------------------------------------------------------------------------
HORIZON, ACT_DIM = 4, 1
RISING = torch.linspace(-0.6, 0.6, HORIZON)[:, None].expand(HORIZON, ACT_DIM)
MODES = torch.stack([RISING, RISING.flip(0)])  # (2, H, A): rising and falling ramp


def two_mode_batch(batch, generator):
    """States ~ U(-1, 1)^2 (history_size 1); chunks = rising or falling ramp, 50/50, independent of s."""
    states = torch.rand(batch, 1, 2, generator=generator) * 2 - 1
    which = torch.randint(0, 2, (batch,), generator=generator)
    return states, MODES[which]


@pytest.fixture(scope="module")
def two_mode_fit():
    """An MLP diffusion policy (8 seeds, eta 0) and an MSE regressor trained on the two-mode data."""
    torch.manual_seed(0)
    config = PolicyConfig(
        obs_dim=2,
        act_dim=ACT_DIM,
        chunk_size=HORIZON,
        history_size=1,
        denoiser="mlp",
        mlp_hidden=128,
        diffusion_steps=20,
        ddim_steps=20,
        n_subpolicies=8,
        noise_seed=0,
        eta=0.0,
    )
    policy = DiffusionPolicy(config, np.zeros(2), np.ones(2), -np.ones(ACT_DIM), np.ones(ACT_DIM))
    steps, batch = 2000, 256
    optimizer = torch.optim.Adam(policy.parameters(), lr=2e-3)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    generator = torch.Generator().manual_seed(0)
    mask = torch.ones(batch, HORIZON)
    losses = []
    for _ in range(steps):
        states, chunks = two_mode_batch(batch, generator)
        loss = policy.loss(states, chunks, mask)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        losses.append(loss.item())

    regressor = nn.Sequential(
        nn.Linear(2, 64), nn.Mish(), nn.Linear(64, 64), nn.Mish(), nn.Linear(64, HORIZON * ACT_DIM)
    )
    optimizer = torch.optim.Adam(regressor.parameters(), lr=2e-3)
    for _ in range(500):
        states, chunks = two_mode_batch(batch, generator)
        loss = ((regressor(states.flatten(1)) - chunks.flatten(1)) ** 2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    test_states, _ = two_mode_batch(128, torch.Generator().manual_seed(99))
    return dict(policy=policy, losses=losses, regressor=regressor, states=test_states)


def test_diffusion_loss_falls(two_mode_fit):
    """The epsilon-prediction loss on the two-mode data falls well below its starting level."""
    losses = two_mode_fit["losses"]
    first, last = np.mean(losses[:100]), np.mean(losses[-100:])
    assert last < 0.7 * first, (first, last)
    assert last < 0.15


def side_of_boundary(seeds):
    """Signed position of seeds (n, H, A) along the rising-minus-falling direction (N(0,1) units).

    The two modes are +m and -m, so the exact probability-flow ODE keeps the sign of <x, m>:
    a seed with a positive value ends at the rising ramp (mode 0), a negative one at the falling
    ramp (mode 1). Seeds close to the boundary are ambiguous for a learned, finite-step model.
    """
    return (seeds * RISING).sum((-1, -2)) / RISING.norm()


def test_subpolicies_reach_modes_where_mse_averages(two_mode_fit):
    """Each fixed-seed sub-policy outputs the mode on its seed's side, both are reached; MSE
    regression averages them."""
    policy, states = two_mode_fit["policy"], two_mode_fit["states"]
    with torch.no_grad():
        actions = policy.sample(states).actions  # (B, 8, H, A)
        regressed = two_mode_fit["regressor"](states.flatten(1)).view(-1, HORIZON, ACT_DIM)
    # Precondition (why noise_seed 0): its 8 seeds are clear of the ambiguous band at the boundary.
    side = side_of_boundary(policy.sub_policy_noise)
    assert side.abs().min().item() > 0.25, side
    distance = (actions[:, :, None] - MODES).abs().amax((-1, -2))  # (B, 8, 2)
    nearest = distance.min(-1)
    assert nearest.values.max().item() < 0.2, nearest.values.amax(0)
    # A sub-policy is one object: the same mode at every state (the mode is independent of s),
    # and it is the mode on its seed's side of the boundary.
    mode_of = nearest.indices  # (B, 8)
    assert torch.equal(mode_of, (side < 0).long().expand_as(mode_of))
    assert set(mode_of[0].tolist()) == {0, 1}
    # The MSE regressor lands between the modes, at their mean (the zero chunk).
    regressed_distance = (regressed[:, None] - MODES).abs().amax((-1, -2))  # (B, 2)
    assert regressed_distance.min().item() > 0.3
    assert regressed.abs().max().item() < 0.15


def test_many_seeds_clear_of_boundary_reach_their_mode(two_mode_fit):
    """Beyond the 8 stored seeds: 128 fresh seeds with margin > 0.4 all end at the mode on their side."""
    policy, states = two_mode_fit["policy"], two_mode_fit["states"][:32]
    seeds = torch.randn(128, HORIZON, ACT_DIM, generator=torch.Generator().manual_seed(7))
    side = side_of_boundary(seeds)
    clear = side.abs() > 0.4
    assert clear.sum().item() > 80
    stored = policy.sub_policy_noise
    policy.sub_policy_noise = seeds  # eta = 0: the seeds are the only per-sub-policy input
    try:
        with torch.no_grad():
            actions = policy.sample(states).actions[:, clear]  # (B, n_clear, H, A)
    finally:
        policy.sub_policy_noise = stored  # the fixture is shared
    target = MODES[(side[clear] < 0).long()]  # (n_clear, H, A)
    assert (actions - target).abs().max().item() < 0.2


# ---- the clean-chunk ("sample") prediction ----------------------------------------------------
class ConstantDenoiser(nn.Module):
    """A denoiser whose output is the same chunk c for every input."""

    def __init__(self, chunk: torch.Tensor):
        super().__init__()
        self.chunk = chunk

    def forward(self, noisy_chunks, steps, states):
        return self.chunk.expand_as(noisy_chunks)


def test_sample_prediction_learns_the_chunk_and_deploys_its_estimate_for_every_seed():
    """With --prediction sample the loss target is the data chunk: a denoiser that outputs the data
    chunk has zero loss. Sampling takes its output as the clean estimate at every DDIM step, so a
    denoiser that always says c makes every sub-policy deploy clamp(c, -1, 1), whatever its seed
    (eta 0: no perturbation); under epsilon prediction the same denoiser gives seed-dependent chunks."""
    chunk = torch.tensor([[0.5, -0.25], [1.5, 0.0], [-0.1, 0.2], [0.3, -2.0]])
    policy = make_policy(prediction="sample", eta=0.0)
    policy.denoiser = ConstantDenoiser(chunk)
    states = random_states(policy, 3)
    loss = policy.loss(states, chunk.expand(3, -1, -1), torch.ones(3, 4))
    assert loss.item() == pytest.approx(0.0, abs=1e-12)
    actions = policy.sample(states).actions
    assert torch.allclose(actions, chunk.clamp(-1, 1).expand_as(actions), atol=1e-6)
    epsilon = make_policy(prediction="epsilon", eta=0.0)
    epsilon.denoiser = ConstantDenoiser(chunk)
    seeds = epsilon.sample(states).actions
    assert not torch.allclose(seeds[:, 0], seeds[:, 1])
