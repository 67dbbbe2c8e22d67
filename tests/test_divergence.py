"""Tests of divergence.py: kinematic divergence, adaptive perturbation, Gaussian KL / log-prob and
the sub-policy objective (docs/design.md, "Divergence regularization")."""

import pytest
import torch
from torch.distributions import Independent, Normal, kl_divergence

from divergence import (
    acceleration,
    adaptive_perturbation_std,
    gaussian_kl,
    gaussian_log_prob,
    kinematic_divergence,
    mean_pairwise_divergence,
    nearest_divergence,
    own_sequence_repulsion,
    pairwise_divergence,
    subpolicy_objective,
    velocity,
)


def ramp(chunk_size, slope, curvature=0.0, act_dim=2, offset=0.0):
    """Chunk (H, A) with a_t = offset + slope * t + curvature * t^2 in every action dimension."""
    t = torch.arange(chunk_size, dtype=torch.float64)[:, None]
    return (offset + slope * t + curvature * t**2).expand(chunk_size, act_dim).clone()


# ---- kinematic divergence ---------------------------------------------------------------------
def test_finite_differences():
    """velocity/acceleration are the first/second differences along the chunk axis."""
    x = torch.tensor([[0.0, 1.0], [1.0, 3.0], [4.0, 2.0], [9.0, 0.0]])
    assert torch.equal(velocity(x), torch.tensor([[1.0, 2.0], [3.0, -1.0], [5.0, -2.0]]))
    assert torch.equal(acceleration(x), torch.tensor([[2.0, -3.0], [2.0, -1.0]]))


@pytest.mark.parametrize("chunk_size", [1, 2, 3, 4, 8])
def test_identical_sequences_have_zero_divergence(chunk_size):
    """div(a, a) = 0 for random, constant (zero acceleration) and linear chunks, batched."""
    torch.manual_seed(0)
    random = torch.randn(5, 3, chunk_size, 2)
    constant = torch.full((5, 3, chunk_size, 2), 0.3)
    linear = ramp(chunk_size, 0.1).float().expand(5, 3, chunk_size, 2)
    for chunks in (random, constant, linear):
        d = kinematic_divergence(chunks, chunks.clone())
        assert d.shape == (5, 3)
        assert d.abs().max().item() < 1e-6


def test_broadcast_shapes():
    """(..., H, A) inputs broadcast over leading dims and each entry equals the unbatched value."""
    torch.manual_seed(1)
    a = torch.randn(4, 1, 5, 3)
    b = torch.randn(1, 6, 5, 3)
    d = kinematic_divergence(a, b)
    assert d.shape == (4, 6)
    for i in range(4):
        for j in range(6):
            torch.testing.assert_close(d[i, j], kinematic_divergence(a[i, 0], b[0, j]))


def test_translation_invariant():
    """Only velocities and accelerations count: a constant offset between chunks gives div = 0."""
    torch.manual_seed(11)
    a = torch.randn(7, 5, 2)
    shifted = a + torch.randn(7, 1, 2)
    assert kinematic_divergence(a, shifted).abs().max().item() < 1e-5
    assert (kinematic_divergence(a, a.flip(-2)) > 0).all()


def test_symmetric():
    """div(a, b) == div(b, a) on random batches."""
    torch.manual_seed(2)
    a, b = torch.randn(16, 6, 3), torch.randn(16, 6, 3)
    torch.testing.assert_close(kinematic_divergence(a, b), kinematic_divergence(b, a))
    assert (kinematic_divergence(a, b) > 0).all()


def test_velocity_term_grows_with_slope_gap():
    """Same curvature, different slopes: div = |slope gap| * sqrt(A), growing with the gap."""
    chunk_size, act_dim = 6, 2
    base = ramp(chunk_size, 0.1, curvature=0.05, act_dim=act_dim)
    gaps = [0.0, 0.05, 0.1, 0.3]
    values = [
        kinematic_divergence(base, ramp(chunk_size, 0.1 + g, curvature=0.05, act_dim=act_dim, offset=0.7)).item()
        for g in gaps
    ]
    for g, v in zip(gaps, values):
        assert v == pytest.approx(g * act_dim**0.5, abs=1e-9)
    assert all(x < y for x, y in zip(values, values[1:]))


def test_acceleration_term_opposite_curvature_adds_two():
    """Opposite accelerations add ~2 over a pair with the same velocity gaps but aligned accelerations."""
    chunk_size, c, v0 = 6, 0.05, 0.1
    # a_t with velocity v0 + c t (acceleration +c) and b_t with velocity v0 - c t (acceleration -c):
    # the same first-step velocity, opposite curvature.
    a = ramp(chunk_size, v0 - c / 2, curvature=c / 2)
    b = ramp(chunk_size, v0 + c / 2, curvature=-c / 2)
    assert torch.allclose(velocity(a)[0], velocity(b)[0])
    assert torch.allclose(acceleration(a), -acceleration(b))
    # Same velocity gaps (|2 c t|) but acceleration 3c, aligned with a's +c: only velocity differs.
    b_aligned = ramp(chunk_size, v0 - 3 * c / 2, curvature=3 * c / 2)
    assert torch.allclose((velocity(a) - velocity(b)).norm(dim=-1), (velocity(a) - velocity(b_aligned)).norm(dim=-1))
    opposite = kinematic_divergence(a, b).item()
    aligned = kinematic_divergence(a, b_aligned).item()
    velocity_term = (velocity(a) - velocity(b)).norm(dim=-1).mean().item()
    assert aligned == pytest.approx(velocity_term, abs=1e-6)
    # ~2 rather than exactly 2: the cosine's eps guard (1e-8 vs |acc|^2 = 5e-3) shaves ~4e-6.
    assert opposite - aligned == pytest.approx(2.0, abs=1e-4)


def test_orthogonal_accelerations_add_one():
    """Orthogonal accelerations with equal velocities at t=0 give a cosine term of 1 per step."""
    t = torch.arange(3, dtype=torch.float64)
    a = torch.stack([t**2, torch.zeros(3, dtype=torch.float64)], -1)  # acceleration (2, 0)
    b = torch.stack([torch.zeros(3, dtype=torch.float64), t**2], -1)  # acceleration (0, 2)
    velocity_term = (velocity(a) - velocity(b)).norm(dim=-1).mean().item()
    assert kinematic_divergence(a, b).item() == pytest.approx(velocity_term + 1.0, abs=1e-6)


# ---- pairwise and nearest -----------------------------------------------------------------------
def test_pairwise_divergence_matrix():
    """pairwise_divergence is (..., n, n), symmetric, zero-diagonal and entry (i,j) = div(chunk i, chunk j)."""
    torch.manual_seed(3)
    chunks = torch.randn(2, 5, 4, 3)
    matrix = pairwise_divergence(chunks)
    assert matrix.shape == (2, 5, 5)
    torch.testing.assert_close(matrix, matrix.transpose(-1, -2))
    assert matrix.diagonal(dim1=-2, dim2=-1).abs().max().item() < 1e-6
    for b in range(2):
        for i in range(5):
            for j in range(5):
                torch.testing.assert_close(matrix[b, i, j], kinematic_divergence(chunks[b, i], chunks[b, j]))


def test_nearest_divergence_is_off_diagonal_min():
    """nearest_divergence = min over j != i of the pairwise matrix (not the zero diagonal)."""
    torch.manual_seed(4)
    chunks = torch.randn(3, 6, 5, 2)
    chunks[:, 1] = chunks[:, 4] + 0.01 * torch.randn(3, 5, 2)  # a close pair: the min is off-diagonal
    matrix = pairwise_divergence(chunks)
    nearest = nearest_divergence(chunks)
    assert nearest.shape == (3, 6)
    for b in range(3):
        for i in range(6):
            others = torch.cat([matrix[b, i, :i], matrix[b, i, i + 1 :]])
            torch.testing.assert_close(nearest[b, i], others.min())
    assert (nearest > 0).all()
    assert torch.equal(nearest[:, 1], matrix[:, 1, 4])


def test_nearest_divergence_needs_two():
    """nearest_divergence raises ValueError with a single sub-policy."""
    with pytest.raises(ValueError):
        nearest_divergence(torch.randn(3, 1, 4, 2))


# ---- adaptive perturbation ----------------------------------------------------------------------
def test_adaptive_perturbation_std():
    """sigma = 0 for d >= tau, eta at d = 0, strictly increasing as d falls below tau."""
    tau, eta = 0.5, 0.3
    assert torch.equal(adaptive_perturbation_std(torch.tensor([0.5, 0.7, 10.0]), tau, eta), torch.zeros(3))
    assert adaptive_perturbation_std(torch.tensor([0.0]), tau, eta).item() == pytest.approx(eta)
    grid = torch.linspace(0.0, tau, 51)[:-1]  # 0 .. just below tau, ascending d
    sigma = adaptive_perturbation_std(grid, tau, eta)
    assert (sigma[:-1] > sigma[1:]).all()
    assert (sigma > 0).all()
    torch.testing.assert_close(sigma, eta * (tau - grid) / tau)


@pytest.mark.parametrize("tau", [0.0, -1.0])
def test_adaptive_perturbation_rejects_bad_tau(tau):
    """tau <= 0 is a ValueError."""
    with pytest.raises(ValueError):
        adaptive_perturbation_std(torch.tensor([0.1]), tau, 0.1)


# ---- Gaussian KL and log-prob -----------------------------------------------------------------
@pytest.mark.parametrize("event_dims", [2, 3])
def test_gaussian_kl_matches_torch(event_dims):
    """gaussian_kl equals torch's KL of Independent(Normal, event_dims); KL(p||p) = 0."""
    torch.manual_seed(5)
    shape = (4, 3, 5, 2)
    mean_p, mean_q = torch.randn(shape), torch.randn(shape)
    std_p, std_q = torch.rand(shape) + 0.2, torch.rand(shape) + 0.2
    ours = gaussian_kl(mean_p, std_p, mean_q, std_q, event_dims)
    p = Independent(Normal(mean_p, std_p), event_dims)
    q = Independent(Normal(mean_q, std_q), event_dims)
    assert ours.shape == shape[:-event_dims]
    torch.testing.assert_close(ours, kl_divergence(p, q), rtol=1e-5, atol=1e-5)
    assert (ours > 0).all()
    assert gaussian_kl(mean_p, std_p, mean_p, std_p, event_dims).abs().max().item() < 1e-5


def test_gaussian_kl_broadcast_scalar_std():
    """A 0-dim std tensor broadcasts and matches torch (shared std, only means differ)."""
    torch.manual_seed(6)
    mean_p, mean_q = torch.randn(3, 4, 2), torch.randn(3, 4, 2)
    std = torch.tensor(0.3)
    ours = gaussian_kl(mean_p, std, mean_q, std, 2)
    ref = kl_divergence(
        Independent(Normal(mean_p, std.expand(3, 4, 2)), 2), Independent(Normal(mean_q, std.expand(3, 4, 2)), 2)
    )
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours, ((mean_p - mean_q) ** 2).sum((-1, -2)) / (2 * 0.09))


@pytest.mark.parametrize("event_dims", [1, 2, 3])
def test_gaussian_log_prob_matches_torch(event_dims):
    """gaussian_log_prob equals Independent(Normal(mean, std), k).log_prob."""
    torch.manual_seed(7)
    value, mean = torch.randn(4, 3, 5, 2), torch.randn(4, 3, 5, 2)
    ours = gaussian_log_prob(value, mean, 0.4, event_dims)
    ref = Independent(Normal(mean, 0.4), event_dims).log_prob(value)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)


def test_gaussian_log_prob_mask():
    """With a mask, the log-prob is the sum over unmasked entries only."""
    torch.manual_seed(8)
    value, mean = torch.randn(6, 5, 2), torch.randn(6, 5, 2)
    mask = (torch.rand(6, 5) > 0.4).float()
    mask[0] = 1.0
    ours = gaussian_log_prob(value, mean, 0.7, 2, mask=mask[..., None])
    per_entry = Normal(mean, 0.7).log_prob(value)
    for b in range(6):
        keep = mask[b].bool()
        torch.testing.assert_close(ours[b], per_entry[b][keep].sum(), rtol=1e-5, atol=1e-5)
    assert ours[0] == pytest.approx(per_entry[0].sum().item(), abs=1e-5)


# ---- sub-policy objective -----------------------------------------------------------------------
def _objective_inputs(seed=9, batch=32, n=4, chunk_size=5, act_dim=2):
    torch.manual_seed(seed)
    sub = (0.5 * torch.randn(batch, n, chunk_size, act_dim)).requires_grad_()
    data = 0.5 * torch.randn(batch, chunk_size, act_dim)
    mask = torch.ones(batch, chunk_size)
    mask[: batch // 2, -2:] = 0.0  # padded chunk ends
    return sub, data, mask


def test_subpolicy_objective_alpha_zero_is_mean_log_prob():
    """J has shape (n,); with alpha = 0 it is the mean per-entry Gaussian log-prob over valid entries."""
    sub, data, mask = _objective_inputs()
    std = 0.5
    j = subpolicy_objective(sub, data, mask, alpha=0.0, std=std)
    assert j.shape == (sub.shape[1],)
    per_entry = Normal(sub.detach(), std).log_prob(data[:, None]) * mask[:, None, :, None]
    entries = mask.sum(-1)[:, None] * data.shape[-1]
    expected = (per_entry.sum((-1, -2)) / entries).mean(0)
    torch.testing.assert_close(j, expected, rtol=1e-5, atol=1e-5)


def test_subpolicy_objective_alpha_term_nonpositive():
    """The alpha term J(alpha) - J(0) is <= 0 and < 0 for sub-policies that are never the best."""
    sub, data, mask = _objective_inputs()
    j0 = subpolicy_objective(sub, data, mask, alpha=0.0, std=0.5)
    j1 = subpolicy_objective(sub, data, mask, alpha=0.3, std=0.5)
    assert (j1 - j0 <= 1e-7).all()
    assert (j1 - j0 < 0).any()
    # One sub-policy equal to every data sequence is always the best: its alpha term is exactly 0.
    sub2 = sub.detach().clone()
    sub2[:, 0] = data
    gap = subpolicy_objective(sub2, data, mask, alpha=0.3, std=0.5) - subpolicy_objective(
        sub2, data, mask, alpha=0.0, std=0.5
    )
    assert gap[0].abs().item() < 1e-6
    assert (gap[1:] < 0).all()


def test_subpolicy_objective_max_is_not_stop_gradient():
    """The max term carries gradient: the best sub-policy's gradient is scaled by 1 - alpha (n - 1)."""
    batch, n, alpha = 8, 4, 0.3
    torch.manual_seed(10)
    data = 0.5 * torch.randn(batch, 5, 2)
    mask = torch.ones(batch, 5)
    base = data[:, None] + 0.3 * torch.randn(batch, n, 5, 2)
    base[:, 0] = data + 0.05 * torch.randn(batch, 5, 2)  # sub-policy 0 is best on every sample
    grads = {}
    for a in (0.0, alpha):
        sub = base.clone().requires_grad_()
        subpolicy_objective(sub, data, mask, alpha=a, std=0.5).sum().backward()
        grads[a] = sub.grad
    best, rest = grads[alpha][:, 0], grads[alpha][:, 1:]
    assert not torch.allclose(best, grads[0.0][:, 0])
    # Stop-gradient max would give (1 + alpha) * g for every sub-policy; the real max gives
    # (1 + alpha - n * alpha) * g for the best one (held back) and (1 + alpha) * g for the others.
    torch.testing.assert_close(best, (1 + alpha - n * alpha) * grads[0.0][:, 0])
    torch.testing.assert_close(rest, (1 + alpha) * grads[0.0][:, 1:])


def test_mean_pairwise_divergence_is_the_off_diagonal_mean():
    """The logged diversity statistic averages the n(n-1) off-diagonal entries; 0 for one sub-policy."""
    torch.manual_seed(0)
    chunks = torch.randn(5, 4, 6, 2)
    matrix = pairwise_divergence(chunks)
    off_diagonal = ~torch.eye(4, dtype=torch.bool)
    expected = torch.stack([m[off_diagonal].mean() for m in matrix])
    torch.testing.assert_close(mean_pairwise_divergence(chunks), expected)
    assert torch.equal(mean_pairwise_divergence(chunks[:, :1]), torch.zeros(5))


def test_own_sequence_repulsion_is_the_nearest_half_squared_gap_and_bounded():
    """Two sub-policies a constant c apart on every entry: log pi_i(mu_i) - log pi_j(mu_i) =
    c^2 / (2 std^2) per entry; a third far away does not change the nearest pair's term. The term
    grows as the pair moves apart and stops at the margin, where its gradient is zero."""
    base = torch.zeros(5, 1, 4, 3)

    def chunks(c, far=5.0):
        return torch.cat([base, base + c, base + far], dim=1)  # (B, 3, H, A)

    small = own_sequence_repulsion(chunks(0.1), std=0.5, margin=100.0)
    larger = own_sequence_repulsion(chunks(0.2), std=0.5, margin=100.0)
    assert torch.allclose(small[:2], torch.full((2,), 0.1**2 / (2 * 0.25)))
    assert torch.allclose(small[2], torch.tensor((5.0 - 0.1) ** 2 / (2 * 0.25)))
    assert (larger[:2] > small[:2]).all()
    bounded = own_sequence_repulsion(chunks(0.2), std=0.5, margin=0.01)
    assert torch.allclose(bounded, torch.full((3,), 0.01))
    moving = chunks(0.2).requires_grad_(True)
    own_sequence_repulsion(moving, std=0.5, margin=0.01).sum().backward()
    assert moving.grad.abs().sum() == 0
    # Below the margin, maximizing it pushes the pair apart: the gradient on sub-policy 1 points away from 0.
    moving = chunks(0.1).requires_grad_(True)
    own_sequence_repulsion(moving, std=0.5, margin=10.0)[:2].sum().backward()
    assert (moving.grad[:, 1] > 0).all() and (moving.grad[:, 0] < 0).all()
    assert own_sequence_repulsion(torch.cat([base, base], 1), std=1.0, margin=1.0).abs().max() == 0
    with pytest.raises(ValueError, match="at least 2"):
        own_sequence_repulsion(base, std=1.0, margin=1.0)
