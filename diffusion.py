"""Multi-seed diffusion policy over action sequences (UEPO paper component 1), as fixed in docs/design.md.

Reading order:
1. `cosine_alpha_bars`      - the noise schedule (Nichol & Dhariwal cosine).
2. `MLPDenoiser`, `UNetTransformerDenoiser` - eps_theta(x_k, k, s): the network that predicts
   the noise in a noisy action chunk x_k at diffusion step k, given recent states s.
3. `DiffusionPolicy`        - one denoiser + n fixed noise seeds = n sub-policies:
   - `loss`: the DDPM epsilon-prediction loss
         E || eps - eps_theta(sqrt(abar_k) a_{t:t+H} + sqrt(1 - abar_k) eps, k, s_t) ||^2;
   - `sample`: all n sub-policies in one batched reverse pass, deterministic DDIM (no sampling noise) started from
     sub-policy i's fixed noise eps_i, so sub-policy i is a deterministic function of the state,
     mu_i(s); at every step the adaptive perturbation of divergence.py pushes apart sub-policies
     whose denoising estimates are too close.
4. `OnlineActor`            - the Gaussian N(mu_i(s), diag sigma^2) that online fine-tuning trains.
5. `bppo_loss`, `qgrad_loss` - the offline improvement of one sub-policy (its gate,
   `BestSnapshot`, is in dynamics.py beside AM-Q). bppo scores a sub-policy with the same
   likelihood as online PPO, a Gaussian around its deterministic chunk mu_i(s): the policy that
   is improved is the one that is deployed.

Conventions: actions live in [-1, 1] inside the policy (scaled from the action space bounds);
states are normalized with frozen dataset statistics held as buffers, so they travel with the
checkpoint. Shapes: B = batch of states, n = sub-policies, H = chunk length, A = act_dim,
To = number of conditioning states (`history_size`).
"""

import math
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn as nn

from divergence import adaptive_perturbation_std, gaussian_kl, gaussian_log_prob, nearest_divergence


# --------------------------------------------------------------------------------------------
# Noise schedule
# --------------------------------------------------------------------------------------------
def cosine_alpha_bars(num_steps: int, s: float = 0.008) -> torch.Tensor:
    """abar_k for k = 0..K-1 of the cosine schedule (Nichol & Dhariwal 2021, eq. 17).

    abar(t) = cos^2(((t/K + s) / (1 + s)) * pi/2) / cos^2(s/(1+s) * pi/2); the per-step betas are
    clipped to 0.999 as in that paper so that the last step is not a pure division by zero.
    Index k = 0 is the least noisy step, k = K-1 the noisiest.
    """
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


# --------------------------------------------------------------------------------------------
# Denoisers: eps_theta(x_k (B,H,A), k (B,), states (B,To,S)) -> (B,H,A)
# --------------------------------------------------------------------------------------------
class MLPDenoiser(nn.Module):
    """Small MLP on [flattened chunk, flattened states, step embedding] (`--denoiser mlp`).

    Diffusion-QL's denoiser (3 hidden layers of 256, Mish) widened to a chunk. Fast on a CPU;
    the comparison point for the paper's U-Net + Transformer.
    """

    def __init__(self, obs_dim, act_dim, chunk_size, history_size, hidden=256, layers=3, step_dim=32):
        super().__init__()
        self.step_embedding = StepEmbedding(step_dim)
        in_dim = chunk_size * act_dim + history_size * obs_dim + step_dim
        blocks, width = [], in_dim
        for _ in range(layers):
            blocks += [nn.Linear(width, hidden), nn.Mish()]
            width = hidden
        self.net = nn.Sequential(*blocks, nn.Linear(width, chunk_size * act_dim))

    def forward(self, noisy_chunks, steps, states):
        batch = noisy_chunks.shape[0]
        inputs = (noisy_chunks.reshape(batch, -1), states.reshape(batch, -1), self.step_embedding(steps))
        features = torch.cat(inputs, dim=-1)
        return self.net(features).view_as(noisy_chunks)


def conv_block(in_channels: int, out_channels: int, groups: int) -> nn.Sequential:
    """Conv1d (kernel 3) over the chunk axis, GroupNorm, Mish."""
    return nn.Sequential(
        nn.Conv1d(in_channels, out_channels, 3, padding=1), nn.GroupNorm(groups, out_channels), nn.Mish()
    )


class FiLMResidualBlock(nn.Module):
    """Two 1-D convolutions over the chunk; the conditioning vector sets a per-channel scale
    and shift in between (FiLM, as in Diffusion Policy's ConditionalResidualBlock1D)."""

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
    """Transformer cross-attention block at the U-Net bottleneck (paper: "U-Net and Transformer",
    queries from the bottleneck features, keys and values from the state tokens)."""

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
        q = self.norm_query(h)
        h = h + self.attention(q, state_tokens, state_tokens, need_weights=False)[0]
        h = h + self.feed_forward(self.norm_ff(h))
        return h.transpose(1, 2)


class UNetTransformerDenoiser(nn.Module):
    """The paper's denoiser (docs/design.md): a 1-D temporal U-Net over the action chunk with FiLM
    conditioning on [step embedding, state embedding], and a Transformer cross-attention block
    at the bottleneck whose keys/values are the last `history_size` states, one token each.

    The chunk axis is the convolution axis (channels = action dims at the input). Each level
    halves the length (stride-2 conv, ceil for odd lengths); the decoder upsamples and crops
    to the skip connection's length, so any H >= 1 works.
    """

    def __init__(self, obs_dim, act_dim, chunk_size, history_size, dims=(128, 256), cond_dim=128, heads=4):
        super().__init__()
        self.step_embedding = StepEmbedding(cond_dim)
        self.state_tokens = nn.Linear(obs_dim, cond_dim)
        self.token_position = nn.Parameter(torch.zeros(1, history_size, cond_dim))
        self.cond = nn.Sequential(nn.Linear(cond_dim * (1 + history_size), cond_dim), nn.Mish())
        channels = [act_dim, *dims]
        self.down = nn.ModuleList()
        for level, (c_in, c_out) in enumerate(zip(channels[:-1], channels[1:])):
            is_last = level == len(dims) - 1
            first, second = FiLMResidualBlock(c_in, c_out, cond_dim), FiLMResidualBlock(c_out, c_out, cond_dim)
            downsample = nn.Identity() if is_last else nn.Conv1d(c_out, c_out, 3, stride=2, padding=1)
            self.down.append(nn.ModuleList([first, second, downsample]))
        mid = dims[-1]
        self.mid_in = FiLMResidualBlock(mid, mid, cond_dim)
        self.mid_attention = StateCrossAttention(mid, cond_dim, heads)
        self.mid_out = FiLMResidualBlock(mid, mid, cond_dim)
        self.up = nn.ModuleList()
        # Decoder: upsample the deeper features (c_deep channels), concatenate the skip of the
        # level above (c_out channels), and mix back down to c_out.
        for c_deep, c_out in zip(reversed(dims[1:]), reversed(dims[:-1])):
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


# --------------------------------------------------------------------------------------------
# The multi-seed diffusion policy
# --------------------------------------------------------------------------------------------
@dataclass
class PolicyConfig:
    """Everything needed to rebuild a DiffusionPolicy (saved in checkpoints). uepo_offline.py fills
    it from its `Args` fields of the same names (`policy_config`); the defaults here serve tests and
    tools that build a policy directly."""

    obs_dim: int
    act_dim: int
    chunk_size: int = 4
    history_size: int = 2
    denoiser: str = "mlp"
    mlp_hidden: int = 256
    unet_dims: tuple[int, ...] = (128, 256)
    diffusion_steps: int = 20
    ddim_steps: int = 5
    # "epsilon" here (not the scripts' default) so that checkpoints saved before the field existed
    # load as what they are.
    prediction: str = "epsilon"
    n_subpolicies: int = 8
    noise_seed: int = 0
    # sub-policy 0 starts from x_K = 0 (False in checkpoints saved before the field existed).
    zero_seed: bool = False
    tau: float = 0.7
    eta: float = 0.1
    # std of the action-level Gaussian N(mu_i(s), min_std^2 I) around the deterministic chunk that
    # bppo samples from (`bppo_loss`); the name is kept so that existing checkpoints load.
    min_std: float = 0.1


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
    """n sub-policies = one denoiser + n fixed initial noises (docs/design.md, "Diffusion policy", Sub-policies).

    The noises are drawn once from a generator seeded with `noise_seed` and kept as buffers, so
    sub-policy i is the same object in training, evaluation, the checkpoint and fine-tuning.
    Why fixed seeds: only a fixed seed makes a sub-policy a distinct object that can be scored,
    selected and improved; fresh noise at every call would make all of them one distribution.
    """

    def __init__(self, config: PolicyConfig, state_mean, state_std, action_low, action_high):
        super().__init__()
        self.config = config
        self.denoiser = make_denoiser(config)
        self.timesteps = ddim_timesteps(config.diffusion_steps, config.ddim_steps)
        as_tensor = lambda v: torch.as_tensor(np.asarray(v), dtype=torch.float32)
        self.register_buffer("alpha_bars", cosine_alpha_bars(config.diffusion_steps))
        self.register_buffer("state_mean", as_tensor(state_mean))
        self.register_buffer("state_std", as_tensor(state_std))
        self.register_buffer("action_low", as_tensor(action_low))
        self.register_buffer("action_high", as_tensor(action_high))
        # The fixed seeds: eps_i for the start of the reverse process, and xi_i for the
        # adaptive perturbation at every DDIM step (its own fixed noise, so that a perturbed
        # sub-policy is still a deterministic function of the state).
        generator = torch.Generator().manual_seed(config.noise_seed)
        n, h, a = config.n_subpolicies, config.chunk_size, config.act_dim
        self.register_buffer("sub_policy_noise", torch.randn(n, h, a, generator=generator))
        if config.zero_seed:  # sub-policy 0 is the chain from x_K = 0, the others keep their draws
            self.sub_policy_noise[0] = 0.0
        self.register_buffer("perturbation_noise", torch.randn(n, config.ddim_steps, h, a, generator=generator))

    # ---- units -------------------------------------------------------------------------------
    @property
    def chunk_size(self) -> int:
        """H, the actions per decision (evaluation reads it from any deployable policy)."""
        return self.config.chunk_size

    @property
    def history_size(self) -> int:
        """To, the states per decision."""
        return self.config.history_size

    def normalize_states(self, states: torch.Tensor) -> torch.Tensor:
        return (states - self.state_mean) / self.state_std

    def scale_actions(self, actions: torch.Tensor) -> torch.Tensor:
        """Environment units -> [-1, 1]."""
        return 2 * (actions - self.action_low) / (self.action_high - self.action_low) - 1

    def unscale_actions(self, actions: torch.Tensor) -> torch.Tensor:
        """[-1, 1] -> environment units."""
        return self.action_low + (actions + 1) * 0.5 * (self.action_high - self.action_low)

    # ---- training -----------------------------------------------------------------------------
    def loss(self, states: torch.Tensor, chunks: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """DDPM epsilon-prediction loss on normalized states (B,To,S) and scaled chunks (B,H,A);
        padded chunk positions (mask 0) do not count."""
        batch = chunks.shape[0]
        steps = torch.randint(0, self.config.diffusion_steps, (batch,), device=chunks.device)
        noise = torch.randn_like(chunks)
        abar = self.alpha_bars[steps][:, None, None]
        noisy = abar.sqrt() * chunks + (1 - abar).sqrt() * noise
        target = chunks if self.config.prediction == "sample" else noise
        squared_error = (self.denoiser(noisy, steps, states) - target) ** 2 * mask[..., None]
        return squared_error.sum() / (mask.sum() * chunks.shape[-1])

    # ---- sampling -------------------------------------------------------------------------------
    def _step_mean(self, x: torch.Tensor, step_index: int, states: torch.Tensor) -> torch.Tensor:
        """x_{k'} = mu_theta(x_k, k, s) for all sub-policies: one deterministic DDIM step (no sampling noise),
        with the adaptive perturbation applied to the denoising estimate x0_hat.

        x: (B, n, H, A); states: (B, To, S). Returns (B, n, H, A).
        """
        batch, n = x.shape[:2]
        k = self.timesteps[step_index]
        abar = self.alpha_bars[k]
        last = step_index + 1 == len(self.timesteps)
        abar_prev = torch.ones_like(abar) if last else self.alpha_bars[self.timesteps[step_index + 1]]
        states_per_chain = states.repeat_interleave(n, dim=0)
        steps = torch.full((batch * n,), k, device=x.device, dtype=torch.long)
        output = self.denoiser(x.flatten(0, 1), steps, states_per_chain).view_as(x)
        if self.config.prediction == "sample":
            x0_hat = output.clamp(-1, 1)
        else:
            x0_hat = ((x - (1 - abar).sqrt() * output) / abar.sqrt()).clamp(-1, 1)
        # Adaptive perturbation (paper: "diffusion-sampling-guided dynamic divergence
        # regularization"): sub-policy i's estimate moves by sigma_i * xi_i where its nearest
        # kinematic divergence d_i < tau. sigma is treated as a control signal (no gradient).
        if self.config.eta > 0 and n >= 2:
            sigma = adaptive_perturbation_std(nearest_divergence(x0_hat.detach()), self.config.tau, self.config.eta)
            xi = self.perturbation_noise[:n, step_index]
            x0_hat = (x0_hat + sigma[..., None, None] * xi).clamp(-1, 1)
        # Re-derive eps from the (clipped, perturbed) estimate, then the deterministic DDIM update.
        eps = (x - abar.sqrt() * x0_hat) / (1 - abar).sqrt()
        return abar_prev.sqrt() * x0_hat + (1 - abar_prev).sqrt() * eps

    def initial_noise(self, batch: int) -> torch.Tensor:
        """x_K for every (state, sub-policy): the fixed seeds, the same for every state."""
        return self.sub_policy_noise.unsqueeze(0).expand(batch, -1, -1, -1)

    def sample(self, states: torch.Tensor, start_noise: torch.Tensor | None = None) -> SampleOutput:
        """All n sub-policies at every state in one batched reverse pass: deterministic DDIM,

            x_K = eps_i,   x_{k'} = mu_theta(x_k, k, s)   (`_step_mean`),   a_i(s) = clip(x_0, -1, 1),

        so sub-policy i is a deterministic function of the state, mu_i(s). states: (B, To, S)
        normalized. `start_noise` (B, n, H, A) replaces the fixed seeds as x_K (the noise-space
        online actor steers one sub-policy's seed). Differentiable in the denoiser.
        """
        x = self.initial_noise(states.shape[0]) if start_noise is None else start_noise
        for step_index in range(len(self.timesteps)):
            x = self._step_mean(x, step_index, states)
        return SampleOutput(actions=x.clamp(-1, 1))

    @torch.no_grad()
    def act(self, state_history: np.ndarray) -> np.ndarray:
        """Deployment: raw states (B, To, S) -> deterministic chunks (B, n, H, A) in env units."""
        states = torch.as_tensor(state_history, dtype=torch.float32, device=self.state_mean.device)
        actions = self.sample(self.normalize_states(states)).actions
        return self.unscale_actions(actions).cpu().numpy()

    # ---- checkpoints ----------------------------------------------------------------------------
    def to_checkpoint(self) -> dict:
        return {"config": asdict(self.config), "state_dict": self.state_dict()}

    @classmethod
    def from_checkpoint(cls, saved: dict) -> "DiffusionPolicy":
        config = PolicyConfig(**saved["config"])
        state = saved["state_dict"]
        policy = cls(config, state["state_mean"], state["state_std"], state["action_low"], state["action_high"])
        policy.load_state_dict(state)
        return policy


# --------------------------------------------------------------------------------------------
# The online actor (docs/design.md, "Online fine-tuning")
# --------------------------------------------------------------------------------------------
ONLINE_ACTORS = ("residual", "noise", "mlp")
# Bounds of the learned log-std (std 1e-3 .. 2): exploration never vanishes nor swamps the mean.
LOG_STD_MIN, LOG_STD_MAX = math.log(1e-3), math.log(2.0)


def ppo_mlp(in_dim: int, out_dim: int, hidden: int = 64, last_std: float = 0.01) -> nn.Sequential:
    """CleanRL's PPO network (ppo_continuous_action.py): two tanh layers of 64, orthogonal weights
    (gain sqrt 2) and zero biases; the last layer's gain is `last_std` (0: the output starts at 0)."""
    layers = [nn.Linear(in_dim, hidden), nn.Tanh(), nn.Linear(hidden, hidden), nn.Tanh(), nn.Linear(hidden, out_dim)]
    for layer in layers[::2]:
        nn.init.orthogonal_(layer.weight, math.sqrt(2) if layer is not layers[-1] else last_std)
        nn.init.zeros_(layer.bias)
    return nn.Sequential(*layers)


class OnlineActor(nn.Module):
    """What online fine-tuning trains: a Gaussian N(mean(s), diag sigma^2) over a decision z of shape
    (H, A), sigma = exp(log_std) a learned state-independent parameter per entry (CleanRL's
    `actor_logstd`, bounded). The deployed policy is the mean's chunk. `kind` says what z is:

    - "residual" (TD3's default): z is the chunk in [-1, 1]; mean = the frozen sub-policy i's chunk +
      a small MLP of the state whose output starts at 0 (Policy Decorator, arXiv 2412.13630).
    - "noise" (PPO's default; DSRL, arXiv 2506.15799): z is sub-policy i's initial noise x_K; mean =
      its fixed seed + a small MLP starting at 0; the chunk is the frozen DDIM chain from z. Online
      RL steers which seed acts in each state: the continuation of "a sub-policy is a seed".
    - "mlp": the baseline from scratch, no diffusion policy: z is a chunk of `mlp_chunk_size` actions of
      one state (1: the per-step MDP of plain PPO); only `policy`'s statistics and bounds are used.

    The environment gets z clipped to [-1, 1] (or the chunk decoded from z); the likelihood is the
    unclipped z's. `anchor_mean` is the offline policy's z (where the actor starts; the anchor).
    """

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
        """The current mean of z (B, H, A), differentiable; `anchor` = `anchor_mean(states)`, kept from
        the rollout so that an update never runs the frozen chain again."""
        offset = self.head(states.flatten(1)).view(-1, self.chunk_size, self.act_dim)
        return offset if self.kind == "mlp" else anchor + offset

    def chunk(self, states: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """What the environment executes for z: a chunk (B, H, A) in [-1, 1]."""
        if self.kind == "noise":
            start = self.policy.initial_noise(states.shape[0]).clone()
            start[:, self.sub_policy] = z
            return self.policy.sample(states, start_noise=start).actions[:, self.sub_policy]
        return z.clamp(-1, 1)

    # ---- units and deployment (the interface of DiffusionPolicy that evaluation uses) ---------------
    def normalize_states(self, states: torch.Tensor) -> torch.Tensor:
        return (states - self.state_mean) / self.state_std

    def unscale_actions(self, actions: torch.Tensor) -> torch.Tensor:
        return self.action_low + (actions + 1) * 0.5 * (self.action_high - self.action_low)

    def scale_actions(self, actions: torch.Tensor) -> torch.Tensor:
        return 2 * (actions - self.action_low) / (self.action_high - self.action_low) - 1

    @torch.no_grad()
    def act(self, state_history: np.ndarray) -> np.ndarray:
        """Deployment: raw state histories (B, To, S) -> the mean's chunks (B, 1, H, A) in env units
        (one "sub-policy", so that evaluation code written for DiffusionPolicy runs it unchanged)."""
        states = self.normalize_states(torch.as_tensor(state_history, dtype=torch.float32, device=self.log_std.device))
        z = self.mean(states, self.anchor_mean(states))
        return self.unscale_actions(self.chunk(states, z)).unsqueeze(1).cpu().numpy()

    def to_checkpoint(self) -> dict:
        """The kind, the sub-policy, the sizes and every tensor (the frozen diffusion policy included)."""
        chunk_size = self.chunk_size if self.kind == "mlp" else 1
        fields = {
            "kind": self.kind,
            "sub_policy": self.sub_policy,
            "init_std": self.init_std,
            "mlp_chunk_size": chunk_size,
        }
        return fields | {"policy_config": asdict(self.policy_config), "state_dict": self.state_dict()}

    @classmethod
    def from_checkpoint(cls, saved: dict) -> "OnlineActor":
        config = PolicyConfig(**saved["policy_config"])
        zeros, ones = np.zeros(config.obs_dim), np.ones(config.obs_dim)
        policy = DiffusionPolicy(config, zeros, ones, -np.ones(config.act_dim), np.ones(config.act_dim))
        actor = cls(saved["kind"], policy, saved["sub_policy"], saved["init_std"], saved["mlp_chunk_size"])
        actor.load_state_dict(saved["state_dict"])  # the real statistics, bounds and weights
        return actor


# --------------------------------------------------------------------------------------------
# Improvement of one sub-policy (docs/design.md, "The offline loop, critics and improvement")
# --------------------------------------------------------------------------------------------
# A copy of the whole DiffusionPolicy (denoiser + the same n seeds) is improved for one of its
# sub-policies, `sub_policy`. Its partners (the other seeds) stay in every chain because the
# adaptive perturbation couples them: they move with the copy's denoiser, and only sub-policy
# `sub_policy` is scored, improved and deployed from that copy.
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
    """Uni-O4's behaviour-proximal step with the action-level Gaussian (`--improvement bppo`).

    A sub-policy's likelihood is that of the Gaussian over the (H, A) chunk around its
    deterministic DDIM chunk, pi(.|s) = N(mu_i(s), std^2 I) with std = `policy.config.min_std`,
    the same form of likelihood as online PPO's (`OnlineActor`). Why: one likelihood for both
    phases, and the policy that is improved is the deterministic sub-policy that is deployed
    (its mean), not a noisy denoising chain that is never executed.

    At dataset `states` (B, To, S), chunks are sampled from the frozen `reference`,

        a = mu_ref(s) + std * xi,   xi ~ N(0, I)   (`generator` on the policy's device),

    and `advantage_fn((B, H, A) chunks in [-1, 1]) -> (B,)` scores clip(a, -1, 1) with
    A = Q - V, normalized per batch. With gradient through the copy's deterministic chain,
    mu(s) = mu_i(s) of `policy`:

        r    = N(a; mu(s), std^2 I) / N(a; mu_ref(s), std^2 I)        (product over H x A)
        KL   = KL(N(mu(s), std^2 I) || N(mu_ref(s), std^2 I)) = ||mu(s) - mu_ref(s)||^2 / (2 std^2)
        loss = -E[min(r A, clip(r, 1 - c, 1 + c) A)] + kl_coef * E[KL]

    (the sequence-level KL: the event is the whole chunk). Returns {"loss", "ratio" (B,), "kl",
    "advantage_mean"}; only "loss" carries gradients.
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
    log_ratio = log_prob - gaussian_log_prob(sampled_chunks, reference_mean, std, event_dims=2)
    ratio = torch.exp(log_ratio)
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
    """Diffusion-QL's step (`--improvement qgrad`): the diffusion loss on data chunks plus

        q_weight * (-Q(s, pi_i(s)) / mean|Q|)

    with pi_i(s) sub-policy `sub_policy`'s deterministic chunk, back-propagated through the
    whole DDIM chain from its fixed seed. `q_fn((B, H, A) chunks in [-1, 1]) -> (B,)`. The
    division by mean|Q| (no gradient) makes `q_weight` independent of the reward scale.
    Returns {"loss", "diffusion", "q"}; only "loss" carries gradients.
    """
    diffusion = policy.loss(states, chunks, mask)
    q = q_fn(policy.sample(states).actions[:, sub_policy])
    loss = diffusion + q_weight * (-q.mean() / q.abs().mean().detach().clamp(min=1e-6))
    return {"loss": loss, "diffusion": diffusion.detach(), "q": q.mean().detach()}
