"""Learned dynamics model of UEPO (paper component 3; docs/design.md, "Dynamics model and diffusion augmentation"),
the offline simulator: `EnsembleDynamics` (MOPO/MOBILE, B.2.5), `termination_fn`, the chunk-level IQL critics
(the Q of AM-Q), AM-Q with the gate (`BestSnapshot`, `confident_choice`), `diffusion_augmentation`, `mixed_batch`.
S = obs_dim, A = act_dim, M = members, E = elites, B = batch; raw env units; one model step per env step."""

import math
import re
from typing import Callable

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from divergence import gaussian_kl

MOBILE_WEIGHT_DECAYS = (2.5e-5, 5e-5, 7.5e-5, 7.5e-5, 1e-4)  # MOBILE's per layer (B.2.5): 4 hidden, then output
LOGVAR_BOUND_COEF = 0.01  # weight of the term that keeps the log-variance bounds tight (MOPO/PETS code)
INITIAL_MAX_LOGVAR, INITIAL_MIN_LOGVAR = 0.5, -10.0  # PETS/MBPO/MOBILE code: std in [exp(-5), exp(0.25)] at start
INPUT_STD_EPS = 1e-3  # as for states (eval.state_statistics): keeps a constant input dimension finite
LOG_2PI = math.log(2.0 * math.pi)


# ---- The probabilistic ensemble ----------------------------------------------------------------
class EnsembleLinear(nn.Module):
    """M independent linear layers in one batched matmul, (M, B, in) -> (M, B, out); MBPO/MOBILE's init."""

    def __init__(self, num_members: int, in_dim: int, out_dim: int):
        super().__init__()
        std = 1.0 / (2.0 * math.sqrt(in_dim))
        self.weight = nn.Parameter(torch.empty(num_members, in_dim, out_dim))
        nn.init.trunc_normal_(self.weight, std=std, a=-2.0 * std, b=2.0 * std)
        self.bias = nn.Parameter(torch.zeros(num_members, 1, out_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.baddbmm(self.bias, x, self.weight)


class EnsembleDynamics(nn.Module):
    """Probabilistic ensemble of M Gaussian MLPs T_m(s' - s, r | s, a) (B.2.5): standardized [s, a] -> mean and
    log-variance of the raw (s' - s, r), log-variance bounds shared (MBPO/MOBILE code). Only `forward`,
    `member_nll` and `loss` carry gradients."""

    def __init__(
        self,
        obs_dim: int,
        act_dim: int,
        num_members: int = 7,
        num_elites: int = 5,
        hidden_dim: int = 200,
        num_layers: int = 4,
        weight_decays: tuple[float, ...] | None = None,
    ):
        super().__init__()
        if not 1 <= num_elites <= num_members:
            raise ValueError(f"need 1 <= num_elites <= num_members, got {num_elites} and {num_members}")
        if weight_decays is None:
            if num_layers != len(MOBILE_WEIGHT_DECAYS) - 1:
                raise ValueError(
                    f"MOBILE's weight decays are for 4 hidden layers; with num_layers="
                    f"{num_layers} pass weight_decays with {num_layers + 1} entries"
                )
            weight_decays = MOBILE_WEIGHT_DECAYS
        if len(weight_decays) != num_layers + 1:
            raise ValueError(f"weight_decays needs one entry per layer ({num_layers + 1}), got {len(weight_decays)}")
        self.obs_dim, self.act_dim = obs_dim, act_dim
        self.num_members, self.num_elites = num_members, num_elites
        self.hidden_dim, self.num_layers = hidden_dim, num_layers
        self.weight_decays = tuple(float(w) for w in weight_decays)
        target_dim = obs_dim + 1  # (s' - s, r)
        widths = [obs_dim + act_dim] + [hidden_dim] * num_layers + [2 * target_dim]
        self.layers = nn.ModuleList(
            EnsembleLinear(num_members, w_in, w_out) for w_in, w_out in zip(widths[:-1], widths[1:])
        )
        self.activation = nn.SiLU()
        # Learnable log-variance bounds (PETS/MOPO): `bounded_logvar` stays inside them, the loss keeps them tight.
        self.max_logvar = nn.Parameter(torch.full((target_dim,), INITIAL_MAX_LOGVAR))
        self.min_logvar = nn.Parameter(torch.full((target_dim,), INITIAL_MIN_LOGVAR))
        # Input standardization (identity until `set_input_statistics`) and the elites, saved in the state dict.
        self.register_buffer("input_mean", torch.zeros(obs_dim + act_dim))
        self.register_buffer("input_std", torch.ones(obs_dim + act_dim))
        self.register_buffer("elite_indices", torch.arange(num_elites))

    def constructor_kwargs(self) -> dict:
        """Everything needed to rebuild the model (for checkpoints), with the state dict."""
        names = ("obs_dim", "act_dim", "num_members", "num_elites", "hidden_dim", "num_layers", "weight_decays")
        return {name: getattr(self, name) for name in names}

    # ---- inputs and targets ----------------------------------------------------------------
    @torch.no_grad()
    def set_input_statistics(self, states, actions) -> None:
        """Freeze the input standardization (B.2.5): mean, std (+ INPUT_STD_EPS) of the real train [s, a] (N, S + A)."""
        inputs = torch.cat([torch.as_tensor(x).to(torch.float64).cpu() for x in (states, actions)], dim=-1)
        self.input_mean.copy_(inputs.mean(0))
        self.input_std.copy_(inputs.std(0, correction=0) + INPUT_STD_EPS)

    def targets(self, states, next_states, rewards) -> torch.Tensor:
        """The regression target (s' - s, r): (..., S + 1), raw units."""
        return torch.cat([next_states - states, rewards.unsqueeze(-1)], dim=-1)

    def bounded_logvar(self, raw_logvar: torch.Tensor) -> torch.Tensor:
        """Soft clamp of PETS/MOPO: smooth, monotone, within [min_logvar, max_logvar] up to a softplus tail."""
        logvar = self.max_logvar - F.softplus(self.max_logvar - raw_logvar)
        return self.min_logvar + F.softplus(logvar - self.min_logvar)

    def forward(self, states: torch.Tensor, actions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and log-variance of (s' - s, r) per member, each (M, B, S + 1); raw inputs (B, .), or (M, B, .)."""
        inputs = (torch.cat([states, actions], dim=-1) - self.input_mean) / self.input_std
        if inputs.dim() == 2:
            inputs = inputs.unsqueeze(0).expand(self.num_members, -1, -1)
        h = inputs
        for layer in self.layers[:-1]:
            h = self.activation(layer(h))
        mean, raw_logvar = self.layers[-1](h).chunk(2, dim=-1)
        return mean, self.bounded_logvar(raw_logvar)

    # ---- training ----------------------------------------------------------------------------
    def member_nll(self, states, actions, next_states, rewards) -> torch.Tensor:
        """Gaussian NLL -log T_m(s' - s, r | s, a) per member (M,), nats per target entry; rewards (B,) or (M, B)."""
        mean, logvar = self(states, actions)
        squared_error = (mean - self.targets(states, next_states, rewards)) ** 2
        nll = 0.5 * (squared_error * torch.exp(-logvar) + logvar + LOG_2PI)
        return nll.mean(dim=(-2, -1))

    def weight_decay_loss(self) -> torch.Tensor:
        """MOBILE's per-layer L2 penalty sum_l decay_l * 0.5 * ||W_l||^2 over all members (biases not decayed)."""
        return sum(decay * 0.5 * (layer.weight**2).sum() for decay, layer in zip(self.weight_decays, self.layers))

    def logvar_bound_loss(self) -> torch.Tensor:
        """0.01 * (sum max_logvar - sum min_logvar) (MOPO/PETS): the variance only as free as the data needs."""
        return LOGVAR_BOUND_COEF * (self.max_logvar.sum() - self.min_logvar.sum())

    def loss(self, states, actions, next_states, rewards) -> torch.Tensor:
        """MOBILE's loss up to scale and constant: mean_m NLL_m + (weight_decay_loss + logvar_bound_loss) / (2 M)."""
        regularizer = self.weight_decay_loss() + self.logvar_bound_loss()
        return self.member_nll(states, actions, next_states, rewards).mean() + regularizer / (2 * self.num_members)

    # ---- elites --------------------------------------------------------------------------------
    @torch.no_grad()
    def holdout_mse(self, states, actions, next_states, rewards) -> torch.Tensor:
        """MOBILE's validation metric, (M,): MSE of each member's mean (s' - s, r), raw units."""
        mean, _ = self(states, actions)
        return ((mean - self.targets(states, next_states, rewards)) ** 2).mean(dim=(-2, -1))

    @torch.no_grad()
    def select_elites(self, states, actions, next_states, rewards) -> torch.Tensor:
        """Set `elite_indices` to the `num_elites` lowest `holdout_mse`, best first; returns the (M,) MSE."""
        mse = self.holdout_mse(states, actions, next_states, rewards)
        self.elite_indices.copy_(torch.argsort(mse)[: self.num_elites])
        return mse

    # ---- using the model -------------------------------------------------------------------------
    @torch.no_grad()
    def sample_step(
        self,
        states: torch.Tensor,
        actions: torch.Tensor,
        generator: torch.Generator | None = None,
        deterministic: bool = False,
        members: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One model step -> next_states (B, S), rewards (B,): row b samples member `members[b]` (default a random
        elite, B.2.5), or takes its mean (`deterministic`). `generator` lives on the model's device."""
        batch = states.shape[0]
        if members is None:
            picks = torch.randint(self.num_elites, (batch,), generator=generator, device=self.elite_indices.device)
            members = self.elite_indices[picks]
        mean, logvar = self(states, actions)  # all members in one pass, then one row each
        rows = torch.arange(batch, device=states.device)
        outcome = mean[members, rows]
        if not deterministic:
            noise = torch.randn(outcome.shape, generator=generator, device=outcome.device, dtype=outcome.dtype)
            outcome = outcome + torch.exp(0.5 * logvar[members, rows]) * noise
        return states + outcome[:, : self.obs_dim], outcome[:, self.obs_dim]

    @torch.no_grad()
    def disagreement(self, states: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        """The augmentation filter's statistic, (B,): mean over ordered elite pairs m != m' of KL(T_m || T_m'),
        diagonal Gaussians over (s' - s, r). Unit-free; 0 with a single elite."""
        mean, logvar = self(states, actions)
        mean, std = mean[self.elite_indices], torch.exp(0.5 * logvar[self.elite_indices])
        num = mean.shape[0]
        if num < 2:
            return torch.zeros(states.shape[0], dtype=mean.dtype, device=mean.device)
        kl = gaussian_kl(mean[:, None], std[:, None], mean[None], std[None], event_dims=1)  # (E, E, B)
        off_diagonal = ~torch.eye(num, dtype=torch.bool, device=kl.device)
        return kl[off_diagonal].sum(0) / (num * (num - 1))

    @torch.no_grad()
    def uncertainty(self, states: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        """The gate's penalty u(s, a) (MOPO's r - lambda u, "ensemble std"), (B,): norm of the elites' mean std."""
        mean, _ = self(states, actions)
        mean = mean[self.elite_indices]
        if mean.shape[0] < 2:
            return torch.zeros(states.shape[0], dtype=mean.dtype, device=mean.device)
        return mean.std(dim=0, correction=0).norm(dim=-1)


def holdout_split(
    num_transitions: int, generator: torch.Generator | None = None, fraction: float = 0.2, max_holdout: int = 1000
) -> tuple[torch.Tensor, torch.Tensor]:
    """B.2.5's split: min(20%, 1000) random transitions held out (elites) -> (train_indices, holdout_indices)."""
    size = min(int(num_transitions * fraction), max_holdout)
    if size < 1:
        raise ValueError(f"{num_transitions} transitions leave no hold-out split (fraction {fraction})")
    order = torch.randperm(num_transitions, generator=generator)
    return order[size:], order[:size]


# ---- Termination rules (Gymnasium v5 defaults) on observations: (..., S) numpy or torch -> bool (...) ----
# obs = (qpos[1:], qvel) for hopper, walker2d and (qpos[2:], qvel, cfrc_ext) for ant: obs[0] is the torso height.
def _backend(next_obs):
    return torch if isinstance(next_obs, torch.Tensor) else np


def _check_obs_dim(next_obs, task: str, dims: tuple[int, ...]) -> None:
    # Another size means another observation layout: the indices below would read the wrong entries.
    if next_obs.shape[-1] not in dims:
        raise ValueError(
            f"{task} termination rule expects observations of size "
            f"{' or '.join(map(str, dims))} (Gymnasium v5 defaults), got {next_obs.shape[-1]}"
        )


def hopper_terminated(next_obs):
    """Hopper-v5: healthy iff (qpos[2:], qvel) in (-100, 100), z = qpos[1] in (0.7, inf), angle = qpos[2] in
    (-0.2, 0.2), strict; exact for |qvel| < 100 (the observation clips qvel to +-10)."""
    _check_obs_dim(next_obs, "hopper", (11,))
    z, angle, rest = next_obs[..., 0], next_obs[..., 1], next_obs[..., 1:]
    healthy_state = ((rest > -100.0) & (rest < 100.0)).all(-1)
    healthy = healthy_state & (z > 0.7) & (z < math.inf) & (angle > -0.2) & (angle < 0.2)
    return ~healthy


def walker2d_terminated(next_obs):
    """Walker2d-v5: healthy iff z = qpos[1] in (0.8, 2.0) and angle = qpos[2] in (-1, 1), strict; exact."""
    _check_obs_dim(next_obs, "walker2d", (17,))
    z, angle = next_obs[..., 0], next_obs[..., 1]
    return ~((z > 0.8) & (z < 2.0) & (angle > -1.0) & (angle < 1.0))


def ant_terminated(next_obs):
    """Ant-v5 (obs 105 or 27): healthy iff the observation is finite and z = qpos[2] in [0.2, 1.0], inclusive."""
    _check_obs_dim(next_obs, "ant", (105, 27))
    z = next_obs[..., 0]
    healthy = _backend(next_obs).isfinite(next_obs).all(-1) & (z >= 0.2) & (z <= 1.0)
    return ~healthy


def halfcheetah_terminated(next_obs):
    """HalfCheetah-v5 never terminates (only the time limit ends an episode)."""
    _check_obs_dim(next_obs, "halfcheetah", (17,))
    if isinstance(next_obs, torch.Tensor):
        return torch.zeros(next_obs.shape[:-1], dtype=torch.bool, device=next_obs.device)
    return np.zeros(next_obs.shape[:-1], dtype=bool)


TERMINATION_RULES: dict[str, Callable] = {
    "hopper": hopper_terminated,
    "walker2d": walker2d_terminated,
    "ant": ant_terminated,
    "halfcheetah": halfcheetah_terminated,
}


def task_of_gym_id(gym_id: str) -> str:
    """Gymnasium id -> task name of TERMINATION_RULES: "HalfCheetah-v5" -> "halfcheetah"."""
    return re.sub(r"-v\d+$", "", gym_id.split("/")[-1]).lower()


def termination_fn(task: str) -> Callable:
    """The termination rule of `task` (see TERMINATION_RULES): next_obs (..., S) -> bool (...)."""
    if task not in TERMINATION_RULES:
        raise ValueError(
            f"no termination rule for task {task!r}; supported tasks: {', '.join(TERMINATION_RULES)}. "
            "To add one, write a function next_obs -> bool that reproduces the environment's "
            "`terminated` from its observation (read its is_healthy / step source) and register "
            "it in TERMINATION_RULES in dynamics.py, with a test against the real environment."
        )
    return TERMINATION_RULES[task]


# ---- Chunk-level IQL critics (docs/design.md, "The offline loop, critics and improvement") -----
def mlp(in_dim: int, hidden: int, layers: int, out_dim: int, layer_norm: bool = False) -> nn.Sequential:
    """`layers` hidden ReLU layers of `hidden` units, each after a LayerNorm with `layer_norm`."""
    blocks, width = [], in_dim
    for _ in range(layers):
        blocks += [nn.Linear(width, hidden), *([nn.LayerNorm(hidden)] if layer_norm else []), nn.ReLU()]
        width = hidden
    return nn.Sequential(*blocks, nn.Linear(width, out_dim))


class ChunkCritics(nn.Module):
    """Q(s_t, a_{t:t+H}) (two heads, min) and V(s_t) on normalized states (no history) and chunks in [-1, 1].
    Choice (paper silent): 3 x 256 ReLU, IQL's. `layer_norm` in the Q heads bounds extrapolation (RLPD)."""

    def __init__(
        self, obs_dim: int, act_dim: int, chunk_size: int, hidden: int = 256, layers: int = 3, layer_norm: bool = False
    ):
        super().__init__()
        chunk_dim = chunk_size * act_dim
        self.q1 = mlp(obs_dim + chunk_dim, hidden, layers, 1, layer_norm)
        self.q2 = mlp(obs_dim + chunk_dim, hidden, layers, 1, layer_norm)
        self.v = mlp(obs_dim, hidden, layers, 1)

    def q_heads(self, states: torch.Tensor, chunks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        inputs = torch.cat([states, chunks.flatten(1)], dim=-1)
        return self.q1(inputs).squeeze(-1), self.q2(inputs).squeeze(-1)

    def q(self, states: torch.Tensor, chunks: torch.Tensor) -> torch.Tensor:
        """min of the two heads (clipped double Q), (B,)."""
        return torch.minimum(*self.q_heads(states, chunks))

    def value(self, states: torch.Tensor) -> torch.Tensor:
        return self.v(states).squeeze(-1)


def expectile_loss(differences: torch.Tensor, expectile: float) -> torch.Tensor:
    """IQL's expectile loss L_tau(u) = |tau - 1(u < 0)| u^2, averaged, u = Q - V (tau > 0.5: an upper expectile)."""
    weight = torch.where(differences < 0, 1.0 - expectile, expectile)
    return (weight * differences**2).mean()


def chunk_td_target(rewards, dones, chunk_lengths, next_values, gamma: float) -> torch.Tensor:
    """R_t^H + gamma^L (1 - done) V(s_{t+L}), L = the chunk's real steps (<= H); truncations bootstrap."""
    return rewards + gamma**chunk_lengths * (1.0 - dones) * next_values


def iql_losses(
    critics: ChunkCritics, target_critics: ChunkCritics, batch: dict, gamma: float, expectile: float
) -> dict:
    """IQL (Kostrikov et al. 2022) on chunks: V by expectile regression on min_k Q_target_k(s, a_{t:t+H}), each
    Q head to `chunk_td_target`. `batch`: states, chunks, rewards, next_states, dones, chunk_lengths.
    Returns {"value": ..., "q": ...}; the caller adds them and steps one optimizer."""
    states, chunks = batch["states"], batch["chunks"]
    with torch.no_grad():
        target_q = target_critics.q(states, chunks)
        next_values = critics.value(batch["next_states"])
        q_target = chunk_td_target(batch["rewards"], batch["dones"], batch["chunk_lengths"], next_values, gamma)
    value_loss = expectile_loss(target_q - critics.value(states), expectile)
    q1, q2 = critics.q_heads(states, chunks)
    q_loss = ((q1 - q_target) ** 2).mean() + ((q2 - q_target) ** 2).mean()
    return {"value": value_loss, "q": q_loss}


@torch.no_grad()
def soft_update(target: nn.Module, source: nn.Module, rate: float) -> None:
    """Polyak averaging of the target critics (IQL: rate 0.005)."""
    for target_param, param in zip(target.parameters(), source.parameters()):
        target_param.lerp_(param, rate)


# ---- AM-Q offline policy evaluation (Uni-O4; docs/design.md, "Dynamics model and diffusion augmentation")
def am_q_ratio(sums: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """AM-Q from `am_q_rollouts`' per-start terms (last dim: starts): summed Q / number of visited pairs."""
    return sums.sum(-1) / counts.sum(-1)


def model_rollout(
    chunk_policy,
    dynamics,
    is_terminal,
    start_histories: torch.Tensor,
    num_steps: int,
    generator: torch.Generator | None = None,
) -> dict:
    """Roll a deterministic chunk policy (N, To, S) -> (N, H, A) through the model (a random elite per row) from
    raw start histories (N, To, S) for `num_steps` steps, each rollout dead after its first predicted termination
    (is_terminal: (N, S) -> (N,) bool). Lists over chunks: "chunk_states" (N, S), "chunks" (N, H, A),
    "chunk_alive" (N,); over steps: "states" (N, S), "actions" (N, A), "alive" (N,) (before it), "rewards" (N,)."""
    histories = start_histories.clone()
    alive = torch.ones(len(histories), dtype=torch.bool, device=histories.device)
    out = {key: [] for key in ("chunk_states", "chunks", "chunk_alive", "states", "actions", "alive", "rewards")}
    steps = 0
    while steps < num_steps and alive.any():
        chunks = chunk_policy(histories)
        out["chunk_states"].append(histories[:, -1])
        out["chunks"].append(chunks)
        out["chunk_alive"].append(alive.clone())
        for action in chunks.unbind(dim=1):
            next_states, rewards = dynamics.sample_step(histories[:, -1], action, generator=generator)
            out["states"].append(histories[:, -1])
            out["actions"].append(action)
            out["alive"].append(alive.clone())
            out["rewards"].append(rewards)
            alive &= ~torch.as_tensor(is_terminal(next_states), device=alive.device)
            histories = torch.cat([histories[:, 1:], next_states[:, None]], dim=1)
        steps += chunks.shape[1]
    return out


def am_q_rollouts(
    chunk_policy, q_function, dynamics, is_terminal, start_histories, num_steps, generator=None, penalty=0.0, gamma=0.99
) -> tuple[torch.Tensor, torch.Tensor]:
    """Uni-O4's AM-Q terms per start (N,): sum of Q over a `model_rollout`'s visited (state, chunk) pairs, and their
    number (`am_q_ratio`); q_function: ((N, S), (N, H, A)) -> (N,). `penalty` lambda > 0 (the gate): MOPO's r - lambda u
        Q(s_k, a_k) - lambda * sum_{t >= k} gamma^(t - k) u(s_t, a_t),   u = `dynamics.uncertainty` along the rollout
    """
    rollout = model_rollout(chunk_policy, dynamics, is_terminal, start_histories, num_steps, generator)
    q = torch.stack([q_function(states, chunks) for states, chunks in zip(rollout["chunk_states"], rollout["chunks"])])
    visited = torch.stack(rollout["chunk_alive"])  # (chunks, N)
    if penalty > 0:
        # Discounted penalty-to-go at every step, read at the chunk starts.
        to_go, penalties_to_go = torch.zeros_like(q[0]), []
        for states, actions, alive in zip(*(reversed(rollout[key]) for key in ("states", "actions", "alive"))):
            to_go = dynamics.uncertainty(states, actions) * alive + gamma * to_go
            penalties_to_go.append(to_go)
        steps = len(rollout["states"]) // len(q)
        q = q - penalty * torch.stack(penalties_to_go[::-1][::steps])
    return torch.where(visited, q, 0.0).sum(0), visited.sum(0).to(q.dtype)


def model_returns(chunk_policy, dynamics, is_terminal, start_histories, num_steps: int, generator=None) -> torch.Tensor:
    """The model's episode return per start (N,) for the offline choice: the undiscounted predicted rewards of a
    `model_rollout`, up to and including its first predicted termination (as the environment pays them)."""
    rollout = model_rollout(chunk_policy, dynamics, is_terminal, start_histories, num_steps, generator)
    return (torch.stack(rollout["rewards"]) * torch.stack(rollout["alive"])).sum(0)


def paired_gain_bound(new: tuple, kept: tuple, confidence: float, num_resamples=2000, seed=0) -> tuple[float, float]:
    """The gate's confidence rule (docs/design.md, "The gate"): the AM-Q gain of `new` over `kept` (`am_q_rollouts`
    from the same starts and model noise) and its one-sided lower bound, the (1 - confidence) quantile of a
    paired bootstrap over start states. Fixed `seed`: a reproducible decision. `confidence` 0: the gain itself."""
    gain = (am_q_ratio(*new) - am_q_ratio(*kept)).item()
    if confidence <= 0:
        return gain, gain
    generator = torch.Generator().manual_seed(seed)
    index = torch.randint(len(new[0]), (num_resamples, len(new[0])), generator=generator).to(new[0].device)
    resampled = am_q_ratio(new[0][index], new[1][index]) - am_q_ratio(kept[0][index], kept[1][index])
    return gain, torch.quantile(resampled, 1.0 - confidence).item()


class BestSnapshot:
    """The improvement gate's memory (docs/design.md, "The gate"): the parameters with the best OPE score so far.
    `offer` keeps a new snapshot only if the lower bound of its `paired_gain_bound` at `confidence` is above
    `margin` times the kept score: the bound covers the OPE's noise, the margin a share of its bias."""

    def __init__(self, model: nn.Module, rollouts: tuple, step: int = 0, confidence: float = 0.0, margin: float = 0.0):
        self.confidence, self.margin = confidence, margin
        self.history = []  # (step, OPE score, accepted, lower bound on the gain over the kept snapshot)
        self._keep(model, rollouts, step, float("nan"))

    def _keep(self, model: nn.Module, rollouts, step: int, lower_bound: float) -> None:
        self.best_rollouts, self.best_step = rollouts, step
        self.best_score = am_q_ratio(*rollouts).item()
        self.best_state = {key: value.detach().clone() for key, value in model.state_dict().items()}
        self.history.append((step, self.best_score, True, lower_bound))

    def offer(self, model: nn.Module, rollouts: tuple[torch.Tensor, torch.Tensor], step: int) -> bool:
        _, lower_bound = paired_gain_bound(rollouts, self.best_rollouts, self.confidence)
        if lower_bound > self.margin * abs(self.best_score):
            self._keep(model, rollouts, step, lower_bound)
            return True
        self.history.append((step, am_q_ratio(*rollouts).item(), False, lower_bound))
        return False

    def restore(self, model: nn.Module) -> None:
        model.load_state_dict(self.best_state)


def confident_choice(candidate_rollouts: list, confidence: float, margin: float = 0.0) -> tuple[int, list]:
    """The offline choice (docs/design.md, "The offline choice") among candidates' rollouts in order of preference:
    a later one replaces the choice only by `BestSnapshot`'s rule, a tie goes to the earlier. Returns the chosen
    index and, per later candidate, (index, gain, lower bound, the bound it needed) against the choice it met."""
    choice, comparisons = 0, []
    for index in range(1, len(candidate_rollouts)):
        new, kept = candidate_rollouts[index], candidate_rollouts[choice]
        gain, lower_bound = paired_gain_bound(new, kept, confidence)
        required = margin * abs(am_q_ratio(*kept).item())
        comparisons.append((index, gain, lower_bound, required))
        if lower_bound > required:
            choice = index
    return choice, comparisons


# ---- Diffusion augmentation of the model's data (paper component 3; docs/design.md) ----------------
@torch.no_grad()
def disagreement_threshold(dynamics: EnsembleDynamics, states, actions, quantile: float) -> float:
    """The filter's epsilon: the `quantile` (`uepo_offline.AUGMENT_KL_QUANTILE`) of disagreement on real hold-out."""
    return torch.quantile(dynamics.disagreement(states, actions), quantile).item()


@torch.no_grad()
def diffusion_augmentation(
    chunk_policy,
    dynamics,
    is_terminal,
    start_histories,
    num_steps: int,
    epsilon: float,
    max_transitions: int,
    generator=None,
) -> dict:
    """Synthetic transitions: data starts (N, To, S), sub-policy chunks (as `model_rollout`), the model's next states
    and rewards. KL filter: a trajectory is cut at its first step with `dynamics.disagreement` >= `epsilon`; a
    predicted terminal step ends it. At most `max_transitions`, earliest first.
    Returns {"states", "actions", "next_states", "rewards"}: (K, S), (K, A), (K, S), (K,)."""
    histories = start_histories.clone()
    alive = torch.ones(len(histories), dtype=torch.bool, device=histories.device)
    kept = {"states": [], "actions": [], "next_states": [], "rewards": []}
    count, steps = 0, 0
    while steps < num_steps and alive.any() and count < max_transitions:
        chunks = chunk_policy(histories)
        for action in chunks.unbind(dim=1):
            states = histories[:, -1]
            alive &= dynamics.disagreement(states, action) < epsilon
            next_states, rewards = dynamics.sample_step(states, action, generator=generator)
            keep = alive.nonzero().squeeze(-1)[: max_transitions - count]
            for key, value in zip(kept, (states, action, next_states, rewards)):
                kept[key].append(value[keep])
            count += len(keep)
            alive &= ~torch.as_tensor(is_terminal(next_states), device=alive.device)
            histories = torch.cat([histories[:, 1:], next_states[:, None]], dim=1)
        steps += chunks.shape[1]
    return {key: torch.cat(values) if values else torch.empty(0) for key, values in kept.items()}


def mixed_batch(
    real: tuple, synthetic: tuple, real_rows: torch.Tensor, batch_size: int, generator: torch.Generator | None = None
) -> tuple:
    """A batch drawn uniformly over the real transitions at `real_rows` and all synthetic ones (proportional mix).
    real, synthetic (may be empty): (states, actions, next_states, rewards); returns those four, real rows first.
    Without synthetic data the draw is exactly `real[k][real_rows[randint(len(real_rows))]]`."""
    num_real = len(real_rows)
    draw = torch.randint(num_real + len(synthetic[0]), (batch_size,), device=real_rows.device, generator=generator)
    is_real = draw < num_real
    rows, synthetic_rows = real_rows[draw[is_real]], draw[~is_real] - num_real
    return tuple(
        torch.cat([real_part[rows], fake_part[synthetic_rows]]) for real_part, fake_part in zip(real, synthetic)
    )
