"""Divergence regularization of UEPO (paper component 2), as fixed in docs/design.md.

Three pieces, all plain functions over tensors:

1. `kinematic_divergence` - the paper's "dynamic divergence" between two action sequences,
   built from their velocities and accelerations (finite differences along the chunk), and
   `pairwise_divergence`, the (n x n) matrix of it over a set of sub-policies.
2. `adaptive_perturbation_std` - the negative-feedback noise scale used *inside* the diffusion
   sampler: sub-policies whose denoising estimate comes closer than `tau` to another one get
   pushed apart, harder the closer they are.
3. `gaussian_kl` and `subpolicy_objective` - the sequence-level KL and the sub-policy
   objective J(pi_i) (Uni-O4's disagreement objective with whole action sequences), with its
   disagreement term read on dataset sequences (`subpolicy_terms`) or on each sub-policy's own
   sequence (`own_sequence_repulsion`).

Shapes: an action sequence (chunk) is (..., H, act_dim), H = chunk length (`--chunk-size`).
"""

import torch

# Guard for the cosine of two acceleration vectors: a zero vector has no direction.
COSINE_EPS = 1e-8


def velocity(chunks: torch.Tensor) -> torch.Tensor:
    """First finite difference along the chunk: (..., H, A) -> (..., H-1, A)."""
    return chunks[..., 1:, :] - chunks[..., :-1, :]


def acceleration(chunks: torch.Tensor) -> torch.Tensor:
    """Second finite difference along the chunk: (..., H, A) -> (..., H-2, A)."""
    return velocity(velocity(chunks))


def kinematic_divergence(chunks_i: torch.Tensor, chunks_j: torch.Tensor) -> torch.Tensor:
    """Paper's dynamic divergence (docs/design.md, "Divergence regularization"):

        div(a_i, a_j) = mean_t ||da_i,t - da_j,t||_2  +  mean_t (1 - cos(dda_i,t, dda_j,t))

    with da the velocity and dda the acceleration of the sequence. The time step of the
    environment is constant, so it is left out (it would only rescale `tau`).

    Choice (paper silent): velocity has H-1 entries and acceleration H-2, so each term is
    averaged over its own entries. A chunk of H = 2 has only the velocity term and H = 1 has
    neither (divergence 0): kinematics need at least 3 actions.

    Choice (paper silent): the cosine is (x.y + eps) / (|x||y| + eps). Where an acceleration
    vector is zero its direction is undefined, and the term is then ~0 instead of an
    arbitrary 1; identical sequences give exactly 0.

    Broadcasts over leading dims: (..., H, A) x (..., H, A) -> (...).
    Used as a measurement and a control signal only: its gradient is undefined (NaN) where an
    acceleration is exactly zero, so callers detach its inputs.
    """
    length = chunks_i.shape[-2]
    shape = torch.broadcast_shapes(chunks_i.shape, chunks_j.shape)[:-2]
    out = torch.zeros(shape, dtype=chunks_i.dtype, device=chunks_i.device)
    if length >= 2:
        velocity_gap = velocity(chunks_i) - velocity(chunks_j)
        out = out + torch.linalg.vector_norm(velocity_gap, dim=-1).mean(-1)
    if length >= 3:
        acc_i, acc_j = acceleration(chunks_i), acceleration(chunks_j)
        dot = (acc_i * acc_j).sum(-1)
        norms = torch.sqrt((acc_i * acc_i).sum(-1) * (acc_j * acc_j).sum(-1))
        cosine = (dot + COSINE_EPS) / (norms + COSINE_EPS)
        out = out + (1.0 - cosine).mean(-1)
    return out


def pairwise_divergence(chunks: torch.Tensor) -> torch.Tensor:
    """All pairs of sub-policies at once: (..., n, H, A) -> (..., n, n), symmetric, zero diagonal."""
    return kinematic_divergence(chunks.unsqueeze(-3), chunks.unsqueeze(-4))


def mean_pairwise_divergence(chunks: torch.Tensor) -> torch.Tensor:
    """Mean divergence over the n(n-1) ordered pairs of distinct sub-policies: (..., n, H, A) -> (...).
    The diversity statistic logged during training (0 for a single sub-policy)."""
    n = chunks.shape[-3]
    return pairwise_divergence(chunks).sum((-1, -2)) / max(n * (n - 1), 1)


def nearest_divergence(chunks: torch.Tensor) -> torch.Tensor:
    """d_i = min_{j != i} div(a_i, a_j) for every sub-policy i: (..., n, H, A) -> (..., n).

    Choice (paper silent): the minimum over partners, so a sub-policy is pushed when it is
    too close to *any* other one (the mean would let one close pair hide among far ones).
    """
    matrix = pairwise_divergence(chunks)
    n = matrix.shape[-1]
    if n < 2:
        raise ValueError("the divergence between sub-policies needs at least 2 of them")
    eye = torch.eye(n, dtype=torch.bool, device=matrix.device)
    return matrix.masked_fill(eye, float("inf")).amin(-1)


def adaptive_perturbation_std(nearest: torch.Tensor, tau: float, eta: float) -> torch.Tensor:
    """Adaptive perturbation scale (paper: sigma_div = eta * (tau - div) / tau where div < tau).

    `nearest` are the d_i of `nearest_divergence`. Zero at d_i >= tau, growing linearly to
    `eta` as d_i falls to 0: the smaller the divergence, the larger the push.
    """
    if tau <= 0:
        raise ValueError(f"tau must be > 0, got {tau}")
    return eta * torch.clamp(tau - nearest, min=0.0) / tau


def gaussian_kl(
    mean_p: torch.Tensor, std_p: torch.Tensor, mean_q: torch.Tensor, std_q: torch.Tensor, event_dims: int
) -> torch.Tensor:
    """KL(p || q) of two diagonal Gaussians, summed over the last `event_dims` dimensions.

    "Sequence-level" KL (docs/design.md): the event is a whole action sequence (event_dims = 2:
    chunk position x action dim), instead of one action as in Uni-O4. `std_*` broadcast (a float
    tensor, or one std per chunk entry, works).
    """
    var_p, var_q = std_p**2, std_q**2
    kl = torch.log(std_q / std_p) + (var_p + (mean_p - mean_q) ** 2) / (2.0 * var_q) - 0.5
    kl = torch.broadcast_to(kl, torch.broadcast_shapes(kl.shape, mean_p.shape, mean_q.shape))
    return kl.sum(dim=tuple(range(-event_dims, 0)))


def gaussian_log_prob(value: torch.Tensor, mean: torch.Tensor, std, event_dims: int, mask=None) -> torch.Tensor:
    """log N(value; mean, diag std^2) summed over the last `event_dims` dims (`std` a float, or a
    tensor that broadcasts, e.g. the online actor's learned std per chunk entry).

    `mask` (broadcastable to `value`, 1 = counted) drops padded chunk positions.
    """
    std_t = torch.as_tensor(std, dtype=value.dtype, device=value.device)
    per_entry = (
        -0.5 * ((value - mean) / std_t) ** 2
        - torch.log(std_t)
        - 0.5 * torch.log(torch.tensor(2.0 * torch.pi, dtype=value.dtype))
    )
    if mask is not None:
        per_entry = per_entry * mask
    return per_entry.sum(dim=tuple(range(-event_dims, 0)))


def subpolicy_terms(
    subpolicy_chunks: torch.Tensor, data_chunks: torch.Tensor, mask: torch.Tensor, std: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """The two expectations of the sub-policy objective J(pi_i) (below), each of shape (n,):

        likelihood_i   = E_D[log pi_i(a|s)]
        disagreement_i = E_D[log pi_i(a|s) - max_j log pi_j(a|s)]     (<= 0)

    with pi_i(.|s) = N(mu_i(s), std^2 I) around sub-policy i's deterministic sequence mu_i(s)
    (the diffusion likelihood itself is intractable; this Gaussian surrogate makes the
    sub-policies distinguishable, which a shared-parameter likelihood would not).

    The max is NOT stop-gradient (as docs/design.md fixes): with a stop-gradient the disagreement
    term is only a rescaling of the likelihood term. Without it, for every data sequence the
    sub-policy that explains it best is pushed back (weight n - 1) and the others pulled in.

    subpolicy_chunks: (B, n, H, A) deterministic sequences, differentiable.
    data_chunks:      (B, H, A) dataset sequences; mask: (B, H) valid chunk positions.
    Log-likelihoods are per action entry (divided by the number of valid entries) so that the
    scale does not depend on H or act_dim.
    """
    log_probs = gaussian_log_prob(
        data_chunks.unsqueeze(1), subpolicy_chunks, std, event_dims=2, mask=mask[:, None, :, None]
    )  # (B, n)
    entries = mask.sum(-1, keepdim=True) * data_chunks.shape[-1]  # (B, 1)
    log_probs = log_probs / entries
    best = log_probs.max(dim=1, keepdim=True).values
    return log_probs.mean(0), (log_probs - best).mean(0)


def own_sequence_repulsion(subpolicy_chunks: torch.Tensor, std: float, margin: float) -> torch.Tensor:
    """J's disagreement term read on each sub-policy's *own* sequence (docs/design.md, "Divergence
    regularization", the `own-sequence` reading), (n,):

        E_s[log pi_i(mu_i(s)) - max_{j != i} log pi_j(mu_i(s))]
          = E_s[min_{j != i} ||mu_i(s) - mu_j(s)||^2 / (2 std^2)]     (Gaussian surrogates, equal std)

    a repulsion of every sub-policy from its nearest partner. Per action entry (divided by H x A)
    as in `subpolicy_terms`. Choice (paper silent): bounded, min(., margin) per state, so that a
    pair already `margin` apart gets no push: the term separates sub-policies that have collapsed
    onto each other without driving any of them off the data.

    subpolicy_chunks: (B, n, H, A) deterministic sequences, differentiable; n >= 2.
    """
    n, entries = subpolicy_chunks.shape[1], subpolicy_chunks.shape[-2] * subpolicy_chunks.shape[-1]
    if n < 2:
        raise ValueError("the repulsion between sub-policies needs at least 2 of them")
    gaps = (subpolicy_chunks.unsqueeze(2) - subpolicy_chunks.unsqueeze(1)).pow(2).sum((-1, -2))  # (B, n, n)
    gaps = gaps / (2.0 * std**2 * entries)
    eye = torch.eye(n, dtype=torch.bool, device=gaps.device)
    nearest = gaps.masked_fill(eye, float("inf")).amin(-1)  # (B, n)
    return nearest.clamp(max=margin).mean(0)


def subpolicy_objective(
    subpolicy_chunks: torch.Tensor, data_chunks: torch.Tensor, mask: torch.Tensor, alpha: float, std: float
) -> torch.Tensor:
    """Sub-policy objective J(pi_i) of docs/design.md (Uni-O4's equation with whole sequences), (n,):

        J(pi_i) = E_D[log pi_i(a|s)] + alpha * E_D[log pi_i(a|s) - max_j log pi_j(a|s)]

    uepo_offline.py maximizes J through the diffusion model: the first term is the model's own
    log-likelihood, whose tractable bound is the diffusion loss, and the Gaussian surrogate
    enters only the second (see `subpolicy_terms`).
    """
    likelihood, disagreement = subpolicy_terms(subpolicy_chunks, data_chunks, mask, std)
    return likelihood + alpha * disagreement
