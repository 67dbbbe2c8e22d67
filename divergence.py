"""Divergence regularization of UEPO (paper component 2; docs/design.md, "Divergence regularization").

1. `kinematic_divergence` (velocity and acceleration of two action sequences), `pairwise_divergence`.
2. `adaptive_perturbation_std`: the negative-feedback noise scale used inside the diffusion sampler.
3. `gaussian_kl` and the sub-policy objective J(pi_i) (Uni-O4's, with whole sequences), its disagreement
   term read on dataset sequences (`subpolicy_terms`) or on each sub-policy's own (`own_sequence_repulsion`).

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
    """Paper's dynamic divergence, (..., H, A) x (..., H, A) -> (...) (broadcasts over leading dims):

        div(a_i, a_j) = mean_t ||da_i,t - da_j,t||_2  +  mean_t (1 - cos(dda_i,t, dda_j,t))

    with da the velocity and dda the acceleration; the constant env time step is left out (it would only rescale tau).
    Choice (paper silent): each term is averaged over its own entries (H-1, H-2); H < 3 drops the terms it lacks.
    Choice (paper silent): cos = (x.y + eps) / (|x||y| + eps): the term is ~0 (not 1) where an acceleration is zero.
    A measurement only: its gradient is NaN where an acceleration is zero, so callers detach its inputs.
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
    """Mean divergence over the n(n-1) ordered pairs, (..., n, H, A) -> (...): the logged diversity (0 if n = 1)."""
    n = chunks.shape[-3]
    return pairwise_divergence(chunks).sum((-1, -2)) / max(n * (n - 1), 1)


def nearest_divergence(chunks: torch.Tensor) -> torch.Tensor:
    """d_i = min_{j != i} div(a_i, a_j) for every sub-policy i: (..., n, H, A) -> (..., n).
    Choice (paper silent): the min, so one close pair cannot hide among far ones as in a mean."""
    matrix = pairwise_divergence(chunks)
    n = matrix.shape[-1]
    if n < 2:
        raise ValueError("the divergence between sub-policies needs at least 2 of them")
    eye = torch.eye(n, dtype=torch.bool, device=matrix.device)
    return matrix.masked_fill(eye, float("inf")).amin(-1)


def adaptive_perturbation_std(nearest: torch.Tensor, tau: float, eta: float) -> torch.Tensor:
    """Paper's sigma_div = eta * max(tau - d_i, 0) / tau, d_i from `nearest_divergence`: the closer, the harder."""
    if tau <= 0:
        raise ValueError(f"tau must be > 0, got {tau}")
    return eta * torch.clamp(tau - nearest, min=0.0) / tau


def gaussian_kl(
    mean_p: torch.Tensor, std_p: torch.Tensor, mean_q: torch.Tensor, std_q: torch.Tensor, event_dims: int
) -> torch.Tensor:
    """KL(p || q) of two diagonal Gaussians, summed over the last `event_dims` dims; `std_*` broadcast.
    Sequence-level KL: the event is a whole sequence (event_dims = 2: H x A), not one action as in Uni-O4."""
    var_p, var_q = std_p**2, std_q**2
    kl = torch.log(std_q / std_p) + (var_p + (mean_p - mean_q) ** 2) / (2.0 * var_q) - 0.5
    kl = torch.broadcast_to(kl, torch.broadcast_shapes(kl.shape, mean_p.shape, mean_q.shape))
    return kl.sum(dim=tuple(range(-event_dims, 0)))


def gaussian_log_prob(value: torch.Tensor, mean: torch.Tensor, std, event_dims: int, mask=None) -> torch.Tensor:
    """log N(value; mean, diag std^2) summed over the last `event_dims` dims; `std` a float or broadcastable
    tensor; `mask` (broadcastable to `value`, 1 = counted) drops padded chunk positions."""
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
    """The two expectations of J(pi_i), each (n,), per valid action entry (so the scale does not depend on H or A):

        likelihood_i   = E_D[log pi_i(a|s)]
        disagreement_i = E_D[log pi_i(a|s) - max_j log pi_j(a|s)]     (<= 0)

    with the Gaussian surrogate pi_i(.|s) = N(mu_i(s), std^2 I) (the diffusion likelihood is intractable).
    The max is NOT stop-gradient (docs/design.md): with one, the disagreement term is only a rescaled likelihood term.
    subpolicy_chunks: (B, n, H, A), differentiable; data_chunks: (B, H, A); mask: (B, H) valid positions.
    """
    log_probs = gaussian_log_prob(
        data_chunks.unsqueeze(1), subpolicy_chunks, std, event_dims=2, mask=mask[:, None, :, None]
    )  # (B, n)
    entries = mask.sum(-1, keepdim=True) * data_chunks.shape[-1]  # (B, 1)
    log_probs = log_probs / entries
    best = log_probs.max(dim=1, keepdim=True).values
    return log_probs.mean(0), (log_probs - best).mean(0)


def own_sequence_repulsion(subpolicy_chunks: torch.Tensor, std: float, margin: float) -> torch.Tensor:
    """J's disagreement term read on each sub-policy's own sequence (the `own-sequence` reading), (n,):

        E_s[log pi_i(mu_i(s)) - max_{j != i} log pi_j(mu_i(s))]
          = E_s[min_{j != i} ||mu_i(s) - mu_j(s)||^2 / (2 std^2)]     (Gaussian surrogates, equal std)

    per action entry (divided by H x A). Choice (paper silent): min(., margin) per state, so only
    collapsed pairs are pushed apart and none is driven off the data.
    subpolicy_chunks: (B, n, H, A), differentiable; n >= 2.
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
    """Sub-policy objective (Uni-O4's equation with whole sequences), (n,); shapes as `subpolicy_terms`:

        J(pi_i) = E_D[log pi_i(a|s)] + alpha * E_D[log pi_i(a|s) - max_j log pi_j(a|s)]

    uepo_offline.py maximizes the first term through the diffusion loss (its bound); only the second uses the surrogate.
    """
    likelihood, disagreement = subpolicy_terms(subpolicy_chunks, data_chunks, mask, std)
    return likelihood + alpha * disagreement
