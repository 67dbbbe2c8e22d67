"""The improvement operators and the gate (diffusion.py: bppo_loss, qgrad_loss; dynamics.py:
BestSnapshot, paired_gain_bound, confident_choice;
docs/design.md, "The offline loop, critics and improvement")."""

import copy

import pytest
import torch
from test_diffusion import make_policy, random_states

from diffusion import bppo_loss, qgrad_loss
from dynamics import BestSnapshot, confident_choice, paired_gain_bound


@pytest.fixture(autouse=True)
def single_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def first_action_advantage(chunks):
    """A stand-in A(s, a): the first entry of the chunk's first action (prefers pushing it up)."""
    return chunks[:, 0, 0]


def train_on_zero_chunks(policy, states, steps=300):
    """Fit the diffusion loss to all-zero chunks so that the chains sit inside [-1, 1]
    (an untrained denoiser saturates the clip, where no gradient passes)."""
    optimizer = torch.optim.Adam(policy.parameters(), lr=3e-3)
    chunks, mask = torch.zeros(len(states), 4, 2), torch.ones(len(states), 4)
    for _ in range(steps):
        loss = policy.loss(states, chunks, mask)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return chunks, mask


def trained_reference(batch):
    """A frozen reference whose chunks sit inside [-1, 1] (eta 0, fit to zero chunks), and its states."""
    reference = make_policy(eta=0.0)
    states = random_states(reference, batch)
    train_on_zero_chunks(reference, states)
    return reference.requires_grad_(False), states


def bppo_step(policy, reference, states, advantage_fn, seed=0, lr=1e-3):
    optimizer = torch.optim.Adam(policy.parameters(), lr=lr)
    out = bppo_loss(
        policy,
        reference,
        states,
        1,
        advantage_fn,
        clip_coef=0.25,
        kl_coef=0.1,
        generator=torch.Generator().manual_seed(seed),
    )
    optimizer.zero_grad()
    out["loss"].backward()
    optimizer.step()
    return out


def test_first_ratio_of_a_fresh_copy_is_one_and_its_kl_zero():
    """A copy equal to its reference has the same deterministic chunk mu_i(s), so the Gaussian
    likelihood ratios of the sampled chunks are exactly 1 and the KL is 0."""
    reference = make_policy()
    improved = copy.deepcopy(reference)
    states = random_states(reference, 32)
    out = bppo_loss(
        improved,
        reference,
        states,
        2,
        first_action_advantage,
        clip_coef=0.25,
        kl_coef=0.1,
        generator=torch.Generator().manual_seed(0),
    )
    torch.testing.assert_close(out["ratio"], torch.ones(32), rtol=0, atol=1e-5)
    assert out["kl"].item() == pytest.approx(0.0, abs=1e-8)


def test_bppo_step_leaves_the_policy_unchanged_when_every_advantage_is_zero():
    """No advantage, no KL gradient (the copy is its reference): the update is exactly zero. The
    same step with a real advantage does move the copy (so the comparison can fail)."""
    reference, states = trained_reference(32)
    unchanged = copy.deepcopy(reference).requires_grad_(True)
    bppo_step(unchanged, reference, states, lambda chunks: torch.zeros(len(chunks)))
    for before, after in zip(reference.parameters(), unchanged.parameters()):
        assert torch.equal(before, after)
    moved = copy.deepcopy(reference).requires_grad_(True)
    bppo_step(moved, reference, states, first_action_advantage)
    assert any(not torch.equal(before, after) for before, after in zip(reference.parameters(), moved.parameters()))


def test_bppo_steps_raise_the_likelihood_of_chunks_with_positive_advantage():
    """On the same sampled chunks a = mu_ref(s) + std * xi, a few steps make the ratio larger where
    A > 0 than where A < 0 (the copy's chunk mu(s) moves towards the better samples: the surrogate
    E[r A], 0 for a fresh copy, becomes positive), and the KL to the reference grows."""
    reference, states = trained_reference(64)
    improved = copy.deepcopy(reference).requires_grad_(True)
    for _ in range(10):
        bppo_step(improved, reference, states, first_action_advantage, seed=0, lr=3e-4)
    with torch.no_grad():
        out = bppo_loss(
            improved,
            reference,
            states,
            1,
            first_action_advantage,
            clip_coef=0.25,
            kl_coef=0.1,
            generator=torch.Generator().manual_seed(0),
        )
        # The chunks bppo_loss sampled, reproduced: the reference's chunk + std * the seed-0 noise.
        reference_mean = reference.sample(states).actions[:, 1]
        noise = torch.randn(reference_mean.shape, generator=torch.Generator().manual_seed(0))
        sampled_chunks = reference_mean + reference.config.min_std * noise
    advantage = first_action_advantage(sampled_chunks.clamp(-1, 1))
    positive = advantage > advantage.median()
    assert out["ratio"][positive].mean() > out["ratio"][~positive].mean()
    assert out["kl"].item() > 0


def test_qgrad_steps_raise_the_sub_policys_q():
    """With Q(s, a) = -||a - 0.5||^2, qgrad steps move the improved sub-policy's deterministic chunk
    towards 0.5 through the whole DDIM chain; the same steps with q_weight 0 (diffusion loss on
    zero chunks alone) do not."""
    torch.manual_seed(0)
    policy = make_policy(eta=0.0)
    states = random_states(policy, 32)
    chunks, mask = train_on_zero_chunks(policy, states)
    q_fn = lambda chunk: -((chunk - 0.5) ** 2).sum((1, 2))

    def q_after(q_weight):
        improved = copy.deepcopy(policy)
        optimizer = torch.optim.Adam(improved.parameters(), lr=1e-3)
        for _ in range(30):
            out = qgrad_loss(improved, states, chunks, mask, 3, q_fn, q_weight=q_weight)
            optimizer.zero_grad()
            out["loss"].backward()
            optimizer.step()
        with torch.no_grad():
            return q_fn(improved.sample(states).actions[:, 3]).mean().item()

    with torch.no_grad():
        before = q_fn(policy.sample(states).actions[:, 3]).mean().item()
    assert before < -1.0  # near the zero chunk: about -8 * 0.25
    assert q_after(q_weight=1.0) > before + 0.5
    assert q_after(q_weight=0.0) < before + 0.2


def rollouts(per_start_q, counts=None):
    """`am_q_rollouts`-shaped input: per-start Q sums and visited-chunk counts (1 chunk each by default)."""
    q = torch.as_tensor(per_start_q, dtype=torch.float32)
    return q, torch.ones_like(q) if counts is None else torch.as_tensor(counts, dtype=torch.float32)


def test_gate_keeps_the_best_by_ope_snapshot_when_a_later_one_scores_lower():
    """Without confidence (any gain): scores 1 (start), 3, 2: the kept parameters are those offered
    with 3, and restore brings them back over the later, worse ones."""
    model = torch.nn.Linear(2, 1)
    gate = BestSnapshot(model, rollouts([1.0, 1.0]), step=0, confidence=0.0)
    with torch.no_grad():
        model.weight.fill_(3.0)
    assert gate.offer(model, rollouts([3.0, 3.0]), step=100)
    with torch.no_grad():
        model.weight.fill_(2.0)
    assert not gate.offer(model, rollouts([2.0, 2.0]), step=200)
    assert gate.best_score == 3.0 and gate.best_step == 100
    assert [accepted for _, _, accepted, _ in gate.history] == [True, True, False]
    gate.restore(model)
    assert torch.equal(model.weight, torch.full((1, 2), 3.0))
    # A tie is not an improvement: the earlier snapshot stays.
    assert not gate.offer(model, rollouts([3.0, 3.0]), step=300)


def test_gate_refuses_a_gain_inside_the_ope_noise_and_keeps_a_clear_one():
    """256 start states whose Q spreads with std 10. A candidate that is the kept one plus a paired
    difference of mean +0.3 and spread 7 per start is refused at confidence 0.9 though its mean is
    higher; any-gain (confidence 0) would take it. A candidate that is +3 on every start is kept."""
    generator = torch.Generator().manual_seed(0)
    base = 100 + 10 * torch.randn(256, generator=generator)
    noise = 7 * torch.randn(256, generator=generator)
    noisy = base + 0.3 + (noise - noise.mean())  # mean gain exactly 0.3, paired standard error ~0.44
    model = torch.nn.Linear(2, 1)
    assert noisy.mean() > base.mean()
    gate = BestSnapshot(model, rollouts(base), confidence=0.9)
    assert not gate.offer(model, rollouts(noisy), step=100)
    assert gate.best_step == 0 and gate.history[-1][3] < 0  # the bound, logged
    assert BestSnapshot(model, rollouts(base), confidence=0.0).offer(model, rollouts(noisy), step=100)
    assert gate.offer(model, rollouts(base + 3.0), step=200)
    assert gate.best_step == 200 and gate.history[-1][3] > 0


def test_paired_gain_bound_is_the_ratio_gain_and_pairs_the_starts():
    """The gain is that of the ratio estimates (sum Q / visited chunks); a constant shift on every
    start has no spread, so its bound equals the gain, while the same mean gain with unpaired noise
    has a bound below it."""
    kept = rollouts([10.0, 20.0, 30.0, 40.0], counts=[1, 2, 3, 4])  # ratio 100 / 10 = 10
    new = rollouts([20.0, 40.0, 60.0, 80.0], counts=[1, 2, 3, 4])  # ratio 20
    gain, bound = paired_gain_bound(new, kept, confidence=0.9)
    assert gain == pytest.approx(10.0) and bound == pytest.approx(10.0)
    spread = rollouts([30.0, 20.0, 90.0, 60.0], counts=[1, 2, 3, 4])  # ratio 20 as well
    gain, bound = paired_gain_bound(spread, kept, confidence=0.9)
    assert gain == pytest.approx(10.0) and bound < 10.0


def test_offline_choice_breaks_ties_towards_the_earlier_candidate():
    """Candidates in qualification order: a later one replaces the choice only with a confident
    gain; inside the noise the earlier one stays (the documented tie rule)."""
    generator = torch.Generator().manual_seed(1)
    first = 100 + 10 * torch.randn(256, generator=generator)
    noise = 8 * torch.randn(256, generator=generator)
    tie = first + 0.3 + (noise - noise.mean())  # higher mean by 0.3, standard error ~0.5: inside the noise
    clear = first + 5.0
    choice, comparisons = confident_choice([rollouts(first), rollouts(tie)], confidence=0.9)
    assert choice == 0 and comparisons[0][0] == 1 and comparisons[0][1] > 0 and comparisons[0][2] <= 0
    assert comparisons[0][3] == 0.0  # no margin asked
    choice, _ = confident_choice([rollouts(first), rollouts(tie)], confidence=0.0)
    assert choice == 1  # any-gain takes the higher mean
    choice, _ = confident_choice([rollouts(first), rollouts(tie), rollouts(clear)], confidence=0.9)
    assert choice == 2


def test_the_gate_margin_refuses_a_confident_gain_smaller_than_its_share_of_the_score():
    """Kept score 100 on every start; a candidate +1.5 on every start has no spread, so its bound
    is +1.5: kept without a margin, refused at margin 0.02 (needs > 2.0), and +3 passes it. The
    offline choice applies the same rule and reports the bound each comparison needed."""
    base = torch.full((256,), 100.0)
    model = torch.nn.Linear(2, 1)
    assert BestSnapshot(model, rollouts(base), confidence=0.95).offer(model, rollouts(base + 1.5), step=100)
    gate = BestSnapshot(model, rollouts(base), confidence=0.95, margin=0.02)
    assert not gate.offer(model, rollouts(base + 1.5), step=100)
    assert gate.history[-1][3] == pytest.approx(1.5)  # confident, but below 2% of 100
    assert gate.offer(model, rollouts(base + 3.0), step=200) and gate.best_step == 200
    choice, comparisons = confident_choice([rollouts(base), rollouts(base + 1.5)], confidence=0.95, margin=0.02)
    assert choice == 0 and comparisons[0][3] == pytest.approx(2.0)
    choice, _ = confident_choice([rollouts(base), rollouts(base + 1.5), rollouts(base + 3.0)], 0.95, margin=0.02)
    assert choice == 2
