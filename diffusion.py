"""Multi-seed diffusion policy over action sequences (UEPO paper component 1), as fixed in docs/design.md.

Reading order: `cosine_alpha_bars` (noise schedule); the denoisers eps_theta(x_k, k, s) (`MLPDenoiser`,
`UNetTransformerDenoiser`); `DiffusionPolicy`, one denoiser + n fixed noise seeds = n sub-policies; `OnlineActor`, the
Gaussian that online fine-tuning trains; `bppo_loss`, `qgrad_loss`, the offline improvement of one sub-policy (its gate,
`BestSnapshot`, is in dynamics.py). Actions live in [-1, 1] inside the policy; states are normalized with frozen dataset
statistics held as buffers. Shapes: B = states, n = sub-policies, H = chunk length, A = act_dim, To = `history_size`.
"""

import math
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn as nn

from divergence import adaptive_perturbation_std, gaussian_kl, gaussian_log_prob, nearest_divergence


# ---- Noise schedule -------------------------------------------------------------------------------------------------
def cosine_alpha_bars(num_steps: int, s: float = 0.008) -> torch.Tensor:
    """abar_k for k = 0 (least noisy) .. K-1 of the cosine schedule (Nichol & Dhariwal 2021, eq. 17), betas clipped to
    0.999 as there: abar(t) = cos^2(((t/K + s) / (1 + s)) * pi/2) / cos^2(s/(1+s) * pi/2)."""
    t = torch.arange(num_steps + 1, dtype=torch.float64) / num_steps
    f = torch.cos((t + s) / (1 + s) * math.pi / 2) ** 2
    betas = torch.clamp(1 - f[1:] / f[:-1], max=0.999)
    return torch.cumprod(1 - betas, dim=0).float()


def ddim_timesteps(num_train_steps: int, num_sample_steps: int) -> list[int]:
    """The descending subsequence of train steps that DDIM visits, e.g. K=20, 5 steps -> [19, 14, 10, 5, 0]."""
    if not 1 <= num_sample_steps <= num_train_steps:
        raise ValueError(f"ddim steps must be in [1, {num_train_steps}], got {num_sample_steps}")
    return [int(round(v)) for v in np.linspace(num_train_steps - 1, 0, num_sample_steps)]


def sinusoidal_embedding(steps: torch.Tensor, dim: int) -> torch.Tensor:
    """Transformer-style sinusoidal embedding of integer diffusion steps: (B,) -> (B, dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=steps.device) / (half - 1))
    angles = steps.float()[:, None] * freqs[None, :]
    return torch.cat([angles.sin(), angles.cos()], dim=-1)


class StepEmbedding(nn.Module):
    """Diffusion step k -> a learned vector (sinusoidal features, then a small MLP)."""

    def __init__(self, dim: int):
        super().__init__()
        self.dim = dim
        self.mlp = nn.Sequential(nn.Linear(dim, dim * 2), nn.Mish(), nn.Linear(dim * 2, dim))

    def forward(self, steps: torch.Tensor) -> torch.Tensor:
        return self.mlp(sinusoidal_embedding(steps, self.dim))


# ---- Denoisers: eps_theta(x_k (B,H,A), k (B,), states (B,To,S)) -> (B,H,A) ------------------------------------------
class MLPDenoiser(nn.Module):
    """Diffusion-QL's denoiser (3 x 256, Mish) on [flat chunk, flat states, step embedding] (`--denoiser mlp`)."""

    def __init__(self, obs_dim, act_dim, chunk_size, history_size, hidden=256, layers=3, step_dim=32):
        super().__init__()
        self.step_embedding = StepEmbedding(step_dim)
        blocks, width = [], chunk_size * act_dim + history_size * obs_dim + step_dim
        for _ in range(layers):
            blocks += [nn.Linear(width, hidden), nn.Mish()]
            width = hidden
        self.net = nn.Sequential(*blocks, nn.Linear(width, chunk_size * act_dim))

    def forward(self, noisy_chunks, steps, states):
        batch = noisy_chunks.shape[0]
        inputs = (noisy_chunks.reshape(batch, -1), states.reshape(batch, -1), self.step_embedding(steps))
        return self.net(torch.cat(inputs, dim=-1)).view_as(noisy_chunks)


def conv_block(in_channels: int, out_channels: int, groups: int) -> nn.Sequential:
    """Conv1d (kernel 3) over the chunk axis, GroupNorm, Mish."""
    return nn.Sequential(
        nn.Conv1d(in_channels, out_channels, 3, padding=1), nn.GroupNorm(groups, out_channels), nn.Mish()
    )


class FiLMResidualBlock(nn.Module):
    """Conv blocks over the chunk with a FiLM scale/shift in between (Diffusion Policy's ConditionalResidualBlock1D)."""

    def __init__(self, in_channels: int, out_channels: int, cond_dim: int, groups: int = 8):
        super().__init__()
        self.conv1 = conv_block(in_channels, out_channels, groups)
        self.conv2 = conv_block(out_channels, out_channels, groups)
        self.film = nn.Sequential(nn.Mish(), nn.Linear(cond_dim, 2 * out_channels))
        self.skip = nn.Conv1d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def forward(self, x, cond):
        scale, shift = self.film(cond).unsqueeze(-1).chunk(2, dim=1)
        h = self.conv1(x) * (1 + scale) + shift
        return self.conv2(h) + self.skip(x)


class StateCrossAttention(nn.Module):
    """The paper's Transformer block at the U-Net bottleneck: queries from the features, keys/values state tokens."""

    def __init__(self, channels: int, token_dim: int, heads: int):
        super().__init__()
        self.norm_query = nn.LayerNorm(channels)
        self.attention = nn.MultiheadAttention(channels, heads, kdim=token_dim, vdim=token_dim, batch_first=True)
        self.norm_ff = nn.LayerNorm(channels)
        self.feed_forward = nn.Sequential(
            nn.Linear(channels, 4 * channels), nn.GELU(), nn.Linear(4 * channels, channels)
        )

    def forward(self, features, state_tokens):
        h = features.transpose(1, 2)  # (B, C, L) -> (B, L, C): one query per chunk position
        h = h + self.attention(self.norm_query(h), state_tokens, state_tokens, need_weights=False)[0]
        h = h + self.feed_forward(self.norm_ff(h))
        return h.transpose(1, 2)


class UNetTransformerDenoiser(nn.Module):
    """The paper's "U-Net and Transformer": a 1-D U-Net over the chunk axis (channels = action dims), FiLM-conditioned
    on [step, state] embeddings, cross-attending at its bottleneck to the last `history_size` states (one token each).
    Each level halves the length (ceil); the decoder crops to the skip's length, so any H >= 1 works."""

    def __init__(self, obs_dim, act_dim, chunk_size, history_size, dims=(128, 256), cond_dim=128, heads=4):
        super().__init__()
        self.step_embedding = StepEmbedding(cond_dim)
        self.state_tokens = nn.Linear(obs_dim, cond_dim)
        self.token_position = nn.Parameter(torch.zeros(1, history_size, cond_dim))
        self.cond = nn.Sequential(nn.Linear(cond_dim * (1 + history_size), cond_dim), nn.Mish())
        channels = [act_dim, *dims]
        self.down = nn.ModuleList()
        for level, (c_in, c_out) in enumerate(zip(channels[:-1], channels[1:])):
            first, second = FiLMResidualBlock(c_in, c_out, cond_dim), FiLMResidualBlock(c_out, c_out, cond_dim)
            downsample = nn.Identity() if level == len(dims) - 1 else nn.Conv1d(c_out, c_out, 3, stride=2, padding=1)
            self.down.append(nn.ModuleList([first, second, downsample]))
        mid = dims[-1]
        self.mid_in = FiLMResidualBlock(mid, mid, cond_dim)
        self.mid_attention = StateCrossAttention(mid, cond_dim, heads)
        self.mid_out = FiLMResidualBlock(mid, mid, cond_dim)
        self.up = nn.ModuleList()
        for c_deep, c_out in zip(reversed(dims[1:]), reversed(dims[:-1])):  # upsample, concatenate the skip, mix
            upsample = nn.ConvTranspose1d(c_deep, c_deep, 4, stride=2, padding=1)
            merge = FiLMResidualBlock(c_deep + c_out, c_out, cond_dim)
            self.up.append(nn.ModuleList([upsample, merge, FiLMResidualBlock(c_out, c_out, cond_dim)]))
        self.head = nn.Sequential(nn.Conv1d(dims[0], dims[0], 3, padding=1), nn.Mish(), nn.Conv1d(dims[0], act_dim, 1))

    def forward(self, noisy_chunks, steps, states):
        tokens = self.state_tokens(states) + self.token_position  # (B, To, cond_dim)
        cond = self.cond(torch.cat([self.step_embedding(steps), tokens.flatten(1)], dim=-1))
        x = noisy_chunks.transpose(1, 2)  # (B, A, H)
        skips = []
        for block1, block2, downsample in self.down:
            x = block2(block1(x, cond), cond)
            skips.append(x)
            x = downsample(x)
        x = self.mid_out(self.mid_attention(self.mid_in(x, cond), tokens), cond)
        skips.pop()  # the bottleneck level has no skip partner
        for upsample, block1, block2 in self.up:
            skip = skips.pop()
            x = upsample(x)[..., : skip.shape[-1]]
            x = block2(block1(torch.cat([x, skip], dim=1), cond), cond)
        return self.head(x).transpose(1, 2)


# ---- The multi-seed diffusion policy --------------------------------------------------------------------------------
@dataclass
class PolicyConfig:
    """Everything needed to rebuild a DiffusionPolicy (in checkpoints); uepo_offline.py fills it from its `Args`."""

    obs_dim: int
    act_dim: int
    chunk_size: int = 4
    history_size: int = 2
    denoiser: str = "mlp"
    mlp_hidden: int = 256
    unet_dims: tuple[int, ...] = (128, 256)
    diffusion_steps: int = 20
    ddim_steps: int = 5
    prediction: str = "epsilon"  # not the scripts' default, so that checkpoints older than the field load as they are
    n_subpolicies: int = 8
    noise_seed: int = 0
    zero_seed: bool = False  # sub-policy 0 starts from x_K = 0 (False in checkpoints older than the field)
    tau: float = 0.7
    eta: float = 0.1
    min_std: float = 0.1  # std of bppo's Gaussian around mu_i(s); the old name is kept so that checkpoints load


DENOISERS = ("mlp", "unet")


def make_denoiser(config: PolicyConfig) -> nn.Module:
    shape = {name: getattr(config, name) for name in ("obs_dim", "act_dim", "chunk_size", "history_size")}
    if config.denoiser == "mlp":
        return MLPDenoiser(**shape, hidden=config.mlp_hidden)
    if config.denoiser == "unet":
        return UNetTransformerDenoiser(**shape, dims=tuple(config.unet_dims))
    raise ValueError(f"unknown denoiser {config.denoiser!r}; valid: {', '.join(DENOISERS)}")


@dataclass
class SampleOutput:
    actions: torch.Tensor  # (B, n, H, A) in [-1, 1]


class DiffusionPolicy(nn.Module):
    """n sub-policies = one denoiser + n fixed initial noises (docs/design.md, "Diffusion policy", Sub-policies),
    drawn once from `noise_seed` and kept as buffers: sub-policy i is the same in every phase and checkpoint."""

    def __init__(self, config: PolicyConfig, state_mean, state_std, action_low, action_high):
        super().__init__()
        self.config = config
        self.denoiser = make_denoiser(config)
        self.timesteps = ddim_timesteps(config.diffusion_steps, config.ddim_steps)
        self.register_buffer("alpha_bars", cosine_alpha_bars(config.diffusion_steps))
        units = {"state_mean": state_mean, "state_std": state_std, "action_low": action_low, "action_high": action_high}
        for name, value in units.items():
            self.register_buffer(name, torch.as_tensor(np.asarray(value), dtype=torch.float32))
        # Fixed seeds: eps_i starts the chain; xi_i, the perturbation's own noise, keeps sub-policy i deterministic.
        generator = torch.Generator().manual_seed(config.noise_seed)
        n, h, a = config.n_subpolicies, config.chunk_size, config.act_dim
        self.register_buffer("sub_policy_noise", torch.randn(n, h, a, generator=generator))
        if config.zero_seed:  # sub-policy 0 is the chain from x_K = 0, the others keep their draws
            self.sub_policy_noise[0] = 0.0
        self.register_buffer("perturbation_noise", torch.randn(n, config.ddim_steps, h, a, generator=generator))

    # ---- units: H and To per decision (evaluation reads them from any deployable policy) ----
    @property
    def chunk_size(self) -> int:
        return self.config.chunk_size

    @property
    def history_size(self) -> int:
        return self.config.history_size

    def normalize_states(self, states: torch.Tensor) -> torch.Tensor:
        return (states - self.state_mean) / self.state_std

    def scale_actions(self, actions: torch.Tensor) -> torch.Tensor:
        """Environment units -> [-1, 1]."""
        return 2 * (actions - self.action_low) / (self.action_high - self.action_low) - 1

    def unscale_actions(self, actions: torch.Tensor) -> torch.Tensor:
        """[-1, 1] -> environment units."""
        return self.action_low + (actions + 1) * 0.5 * (self.action_high - self.action_low)

    def loss(self, states: torch.Tensor, chunks: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """DDPM loss E || eps - eps_theta(sqrt(abar_k) a + sqrt(1 - abar_k) eps, k, s) ||^2 (target a if prediction ==
        "sample") on normalized states (B,To,S), scaled chunks (B,H,A); padded positions (mask 0) do not count."""
        steps = torch.randint(0, self.config.diffusion_steps, (chunks.shape[0],), device=chunks.device)
        noise = torch.randn_like(chunks)
        abar = self.alpha_bars[steps][:, None, None]
        noisy = abar.sqrt() * chunks + (1 - abar).sqrt() * noise
        target = chunks if self.config.prediction == "sample" else noise
        squared_error = (self.denoiser(noisy, steps, states) - target) ** 2 * mask[..., None]
        return squared_error.sum() / (mask.sum() * chunks.shape[-1])

    def _step_mean(self, x: torch.Tensor, step_index: int, states: torch.Tensor) -> torch.Tensor:
        """x_{k'} = mu_theta(x_k, k, s) for all sub-policies (B, n, H, A) at states (B, To, S): one deterministic DDIM
        step with the paper's adaptive perturbation ("dynamic divergence regularization") on the estimate x0_hat."""
        batch, n = x.shape[:2]
        k = self.timesteps[step_index]
        abar = self.alpha_bars[k]
        last = step_index + 1 == len(self.timesteps)
        abar_prev = torch.ones_like(abar) if last else self.alpha_bars[self.timesteps[step_index + 1]]
        steps = torch.full((batch * n,), k, device=x.device, dtype=torch.long)
        output = self.denoiser(x.flatten(0, 1), steps, states.repeat_interleave(n, dim=0)).view_as(x)
        if self.config.prediction == "sample":
            x0_hat = output.clamp(-1, 1)
        else:
            x0_hat = ((x - (1 - abar).sqrt() * output) / abar.sqrt()).clamp(-1, 1)
        # x0_hat_i += sigma_i xi_i where its nearest kinematic divergence d_i < tau; sigma is a control (no gradient).
        if self.config.eta > 0 and n >= 2:
            sigma = adaptive_perturbation_std(nearest_divergence(x0_hat.detach()), self.config.tau, self.config.eta)
            xi = self.perturbation_noise[:n, step_index]
            x0_hat = (x0_hat + sigma[..., None, None] * xi).clamp(-1, 1)
        eps = (x - abar.sqrt() * x0_hat) / (1 - abar).sqrt()  # eps of the clipped, perturbed estimate; DDIM update
        return abar_prev.sqrt() * x0_hat + (1 - abar_prev).sqrt() * eps

    def initial_noise(self, batch: int) -> torch.Tensor:
        """x_K for every (state, sub-policy): the fixed seeds, the same for every state."""
        return self.sub_policy_noise.unsqueeze(0).expand(batch, -1, -1, -1)

    def sample(self, states: torch.Tensor, start_noise: torch.Tensor | None = None) -> SampleOutput:
        """All n sub-policies at normalized `states` (B, To, S) in one batched deterministic DDIM pass: x_K = eps_i,
        x_{k'} = `_step_mean`(x_k), mu_i(s) = clip(x_0, -1, 1); differentiable in the denoiser. `start_noise`
        (B, n, H, A) replaces the fixed seeds as x_K (the noise-space online actor steers one seed)."""
        x = self.initial_noise(states.shape[0]) if start_noise is None else start_noise
        for step_index in range(len(self.timesteps)):
            x = self._step_mean(x, step_index, states)
        return SampleOutput(actions=x.clamp(-1, 1))

    @torch.no_grad()
    def act(self, state_history: np.ndarray) -> np.ndarray:
        """Deployment: raw states (B, To, S) -> deterministic chunks (B, n, H, A) in env units."""
        states = torch.as_tensor(state_history, dtype=torch.float32, device=self.state_mean.device)
        return self.unscale_actions(self.sample(self.normalize_states(states)).actions).cpu().numpy()

    def to_checkpoint(self) -> dict:
        return {"config": asdict(self.config), "state_dict": self.state_dict()}

    @classmethod
    def from_checkpoint(cls, saved: dict) -> "DiffusionPolicy":
        config = PolicyConfig(**saved["config"])
        state = saved["state_dict"]
        policy = cls(config, state["state_mean"], state["state_std"], state["action_low"], state["action_high"])
        policy.load_state_dict(state)
        return policy


# ---- The online actor (docs/design.md, "Online fine-tuning") --------------------------------------------------------
ONLINE_ACTORS = ("residual", "noise", "mlp")
LOG_STD_MIN, LOG_STD_MAX = math.log(1e-3), math.log(2.0)  # std bounds: exploration never vanishes nor swamps the mean


def ppo_mlp(in_dim: int, out_dim: int, hidden: int = 64, last_std: float = 0.01) -> nn.Sequential:
    """CleanRL's PPO MLP: 2 x 64 tanh, orthogonal init (gain sqrt 2), zero bias; last gain `last_std` (0: output 0)."""
    layers = [nn.Linear(in_dim, hidden), nn.Tanh(), nn.Linear(hidden, hidden), nn.Tanh(), nn.Linear(hidden, out_dim)]
    for layer in layers[::2]:
        nn.init.orthogonal_(layer.weight, math.sqrt(2) if layer is not layers[-1] else last_std)
        nn.init.zeros_(layer.bias)
    return nn.Sequential(*layers)


class OnlineActor(nn.Module):
    """What online fine-tuning trains: z ~ N(mean(s), diag sigma^2) over a decision z (H, A), sigma a learned std per
    entry, independent of the state (CleanRL's `actor_logstd`, bounded); deployed: the mean's chunk. `kind` is one of
    "residual" (TD3's default; Policy Decorator, arXiv 2412.13630): z is the chunk, mean = frozen sub-policy i's chunk +
    an MLP starting at 0; "noise" (PPO's default; DSRL, arXiv 2506.15799): z is sub-policy i's initial noise x_K, mean =
    its fixed seed + that MLP, decoded by the frozen DDIM chain; "mlp": the baseline from scratch, z a chunk of
    `mlp_chunk_size` actions of one state. The environment gets z clipped to [-1, 1] (or decoded); the likelihood is the
    unclipped z's."""

    def __init__(self, kind: str, policy: DiffusionPolicy, sub_policy: int, init_std: float, mlp_chunk_size: int = 1):
        super().__init__()
        if kind not in ONLINE_ACTORS:
            raise ValueError(f"unknown online actor {kind!r}; valid: {', '.join(ONLINE_ACTORS)}")
        self.kind, self.sub_policy, self.init_std = kind, sub_policy, init_std
        config = self.policy_config = policy.config
        sizes = (mlp_chunk_size, 1) if kind == "mlp" else (config.chunk_size, config.history_size)
        self.chunk_size, self.history_size = sizes
        self.act_dim = config.act_dim
        for name in ("state_mean", "state_std", "action_low", "action_high"):
            self.register_buffer(name, getattr(policy, name).clone())
        self.policy = None if kind == "mlp" else policy.requires_grad_(False)  # the offline policy stays as it is
        chunk_dim = self.chunk_size * self.act_dim
        self.head = ppo_mlp(self.history_size * config.obs_dim, chunk_dim, last_std=0.01 if kind == "mlp" else 0.0)
        self.log_std = nn.Parameter(torch.full((self.chunk_size, self.act_dim), math.log(init_std)))

    def std(self) -> torch.Tensor:
        return self.log_std.clamp(LOG_STD_MIN, LOG_STD_MAX).exp()

    @torch.no_grad()
    def anchor_mean(self, states: torch.Tensor) -> torch.Tensor:
        """The offline policy's z at normalized state histories (B, To, S): (B, H, A) (zeros for mlp)."""
        if self.kind == "residual":
            return self.policy.sample(states).actions[:, self.sub_policy]
        if self.kind == "noise":
            return self.policy.sub_policy_noise[self.sub_policy].expand(states.shape[0], -1, -1)
        return torch.zeros(states.shape[0], self.chunk_size, self.act_dim, device=states.device)

    def mean(self, states: torch.Tensor, anchor: torch.Tensor) -> torch.Tensor:
        """The mean of z (B, H, A), differentiable; `anchor` = `anchor_mean(states)`, kept from the rollout."""
        offset = self.head(states.flatten(1)).view(-1, self.chunk_size, self.act_dim)
        return offset if self.kind == "mlp" else anchor + offset

    def chunk(self, states: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """What the environment executes for z: a chunk (B, H, A) in [-1, 1]."""
        if self.kind == "noise":
            start = self.policy.initial_noise(states.shape[0]).clone()
            start[:, self.sub_policy] = z
            return self.policy.sample(states, start_noise=start).actions[:, self.sub_policy]
        return z.clamp(-1, 1)

    # ---- units and deployment: the interface of DiffusionPolicy that evaluation uses ----
    normalize_states, scale_actions = DiffusionPolicy.normalize_states, DiffusionPolicy.scale_actions
    unscale_actions = DiffusionPolicy.unscale_actions

    @torch.no_grad()
    def act(self, state_history: np.ndarray) -> np.ndarray:
        """Raw state histories (B, To, S) -> the mean's chunks (B, 1, H, A) in env units (one "sub-policy")."""
        states = self.normalize_states(torch.as_tensor(state_history, dtype=torch.float32, device=self.log_std.device))
        z = self.mean(states, self.anchor_mean(states))
        return self.unscale_actions(self.chunk(states, z)).unsqueeze(1).cpu().numpy()

    def to_checkpoint(self) -> dict:
        """The kind, the sub-policy, the sizes and every tensor (the frozen diffusion policy included)."""
        chunk_size = self.chunk_size if self.kind == "mlp" else 1
        fields = dict(kind=self.kind, sub_policy=self.sub_policy, init_std=self.init_std, mlp_chunk_size=chunk_size)
        return fields | {"policy_config": asdict(self.policy_config), "state_dict": self.state_dict()}

    @classmethod
    def from_checkpoint(cls, saved: dict) -> "OnlineActor":
        config, state = PolicyConfig(**saved["policy_config"]), saved["state_dict"]
        units = [state[name] for name in ("state_mean", "state_std", "action_low", "action_high")]  # as saved:
        policy = DiffusionPolicy(config, *units)  # none sized by the config, which may be corrupt (eval.build_saved)
        actor = cls(saved["kind"], policy, saved["sub_policy"], saved["init_std"], saved["mlp_chunk_size"])
        actor.load_state_dict(state)  # the weights
        return actor


# ---- Improvement of one sub-policy (docs/design.md, "The offline loop, critics and improvement") --------------------
def bppo_loss(
    policy: DiffusionPolicy,
    reference: DiffusionPolicy,
    states: torch.Tensor,
    sub_policy: int,
    advantage_fn,
    clip_coef: float,
    kl_coef: float,
    generator: torch.Generator | None = None,
) -> dict:
    """Uni-O4's behaviour-proximal step (`--improvement bppo`) with online PPO's likelihood, a Gaussian over the (H, A)
    chunk around the deterministic one, pi(.|s) = N(mu_i(s), std^2 I), std = `policy.config.min_std`: so the improved
    policy is the deployed mean, not a noisy chain. At dataset `states` (B, To, S), a = mu_ref(s) + std * xi from the
    frozen `reference`, xi ~ N(0, I) (`generator`, on the policy's device); `advantage_fn((B, H, A) chunks) -> (B,)`
    scores clip(a, -1, 1), A = Q - V normalized per batch; mu(s) = mu_i(s) of `policy`, with gradient through its chain:

        r    = N(a; mu(s), std^2 I) / N(a; mu_ref(s), std^2 I)        (product over H x A)
        KL   = KL(N(mu(s), std^2 I) || N(mu_ref(s), std^2 I)) = ||mu(s) - mu_ref(s)||^2 / (2 std^2)   (sequence level)
        loss = -E[min(r A, clip(r, 1 - c, 1 + c) A)] + kl_coef * E[KL]

    Returns {"loss", "ratio" (B,), "kl", "advantage_mean"}; only "loss" carries gradients.
    """
    std = policy.config.min_std
    with torch.no_grad():
        reference_mean = reference.sample(states).actions[:, sub_policy]  # mu_ref(s), (B, H, A)
        noise = torch.randn(reference_mean.shape, generator=generator, device=reference_mean.device)
        sampled_chunks = reference_mean + std * noise
        raw_advantages = advantage_fn(sampled_chunks.clamp(-1, 1))
        advantages = (raw_advantages - raw_advantages.mean()) / (raw_advantages.std() + 1e-8)
    mean = policy.sample(states).actions[:, sub_policy]  # mu(s): back-propagates through the DDIM chain
    log_prob = gaussian_log_prob(sampled_chunks, mean, std, event_dims=2)
    ratio = torch.exp(log_prob - gaussian_log_prob(sampled_chunks, reference_mean, std, event_dims=2))
    std_t = torch.tensor(std, device=states.device)
    kl = gaussian_kl(mean, std_t, reference_mean, std_t, event_dims=2)
    surrogate = torch.min(ratio * advantages, ratio.clamp(1 - clip_coef, 1 + clip_coef) * advantages)
    losses = {"loss": -surrogate.mean() + kl_coef * kl.mean(), "ratio": ratio.detach(), "kl": kl.mean().detach()}
    return losses | {"advantage_mean": raw_advantages.mean()}


def qgrad_loss(
    policy: DiffusionPolicy,
    states: torch.Tensor,
    chunks: torch.Tensor,
    mask: torch.Tensor,
    sub_policy: int,
    q_fn,
    q_weight: float,
) -> dict:
    """Diffusion-QL's step (`--improvement qgrad`): diffusion loss + q_weight * (-Q(s, pi_i(s)) / mean|Q|), pi_i(s) the
    deterministic chunk of `sub_policy` through its whole chain, `q_fn((B, H, A)) -> (B,)`; the division (no gradient)
    makes `q_weight` independent of the reward scale. Returns {"loss", "diffusion", "q"}; only "loss" has gradients."""
    diffusion = policy.loss(states, chunks, mask)
    q = q_fn(policy.sample(states).actions[:, sub_policy])
    loss = diffusion + q_weight * (-q.mean() / q.abs().mean().detach().clamp(min=1e-6))
    return {"loss": loss, "diffusion": diffusion.detach(), "q": q.mean().detach()}
