"""UEPO online phase (arXiv 2511.10087), CleanRL style: read top to bottom.

    python uepo_online.py --checkpoint runs/<offline run>/offline.pt                 # TD3, 250k env steps
    python uepo_online.py --checkpoint ... --algo ppo                               # the paper's PPO, 1M
    python uepo_online.py --checkpoint ... --actor mlp --mlp-horizon 4              # RLPD-style: fresh actor
    python uepo_online.py --checkpoint ... --algo ppo --actor diffusion --from-scratch   # diffusion baseline
    python uepo_online.py --resume runs/<run>/online.pt                             # continue a PPO run

1. Load the offline checkpoint of uepo_offline.py; a corrupt or incomplete one, or (with
   `--env-id`) one made for another environment or dataset, is refused with the reason. Where the
   run writes (runs/, `--checkpoint-path`) is checked writable before that.
2. Selection, Uni-O4's rule (docs/design.md, "Online fine-tuning"): the top `--selection-top`
   candidates by their offline OPE score (the improved copies when the offline run made them,
   else the base sub-policies), then the best of them over real episodes. The table that led
   to the choice is printed and logged to TensorBoard.
3. By default (`--algo td3`, `train_td3`) TD3 on chunks: the critics learn the offline data first,
   then every batch mixes offline and online decisions; the actor is a residual on the selected
   sub-policy's chunk, kept near it by an anchor whose weight falls to a tenth over the run.
   With `--algo ppo`, the paper's learner: PPO on the chunk-level MDP (`eval.ChunkEnv`): one
   decision = one chunk of H actions, its reward the discounted sum of its rewards; vectorized
   Gymnasium environments; GAE over chunks with the discount gamma^L of each chunk's length L;
   time-limit truncations bootstrap from the final observation; rewards scaled by the running
   std of a discounted return.
   The actor (`diffusion.OnlineActor`) is a Gaussian over decisions z whose mean is the policy
   that is deployed: by default (PPO) z is the selected sub-policy's initial noise and the frozen
   denoiser decodes it (`--actor noise`); the ratio is the exact Gaussian likelihood ratio. A
   fresh value network is warmed up for `--critic-warmup` rollouts before the actor moves.
4. The deterministic policy (the actor's mean) is evaluated every `--eval-every` environment
   steps (and at step 0, the hand-over); TensorBoard under runs/ with CleanRL's names plus
   `charts/normalized_score` and `charts/sigma`; an atomic checkpoint runs/{run_name}/online.pt
   that also holds the training state after that evaluation (counters, optimizers, reward scaler,
   random stream), from which `--resume` continues a PPO run in new episodes (TD3's keeps no
   replay buffer).
"""

import copy
import functools
import os
import random
import sys
import time
from dataclasses import asdict, dataclass, replace
from typing import Literal

import gymnasium as gym
import numpy as np
import torch
import tyro
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from diffusion import DiffusionPolicy, OnlineActor, ppo_mlp
from divergence import gaussian_kl, gaussian_log_prob
from dynamics import ChunkCritics, chunk_td_target, soft_update
from eval import (
    BAR,
    GYM_ENV_IDS,
    SEED_RANGE,
    CheckpointError,
    ChunkEnv,
    DatasetError,
    NonFiniteLoss,
    build_saved,
    check_environment,
    check_finite,
    check_output_file,
    chunk_dataset,
    evaluate_saved_task,
    fail,
    is_dataset_name,
    load_checkpoint,
    load_dataset,
    missing_field,
    offline_candidates,
    out_of_range,
    report_interrupt,
    rng_state,
    save_checkpoint,
    set_rng_state,
    unfinished_stage,
    unwritable,
)


@dataclass
class Args:
    checkpoint: str | None = None
    """the offline checkpoint to fine-tune (runs/<offline run>/offline.pt); not needed with --resume"""
    exp_name: str = os.path.basename(__file__)[: -len(".py")]
    """the name of this experiment"""
    seed: int = 1
    """seed of the experiment (environments, exploration noise, minibatches, evaluation episodes)"""
    torch_deterministic: bool = True
    """if toggled, `torch.backends.cudnn.deterministic=True`"""
    cuda: bool = True
    """if toggled, use a GPU when there is one"""
    env_id: str | None = None
    """if given, the checkpoint must be for this environment (`Hopper-v5`) or dataset (`hopper-medium`)"""

    # The learner and the actor
    algo: Literal["ppo", "td3"] = "td3"
    """`td3`: off-policy TD3 on chunks with the offline data in every batch, or `ppo` (the paper's)"""
    actor: Literal["diffusion", "residual", "fql", "noise", "mlp"] | None = None
    """what is fine-tuned: a residual (td3's default), the initial noise (ppo's), the denoiser, or an MLP"""
    from_scratch: bool = False
    """with `--actor diffusion`: a freshly initialized denoiser (sub-policy 0, no selection, no anchor)"""
    residual_bound: float | None = None
    """with `--actor residual`: the most the actor may move any chunk entry from the sub-policy's (none: unbounded)"""
    action_steps: int | None = None
    """with `--actor residual`: actions of the sub-policy's chunk per decision, re-planned after them (none: all H)"""
    mlp_horizon: int = 1
    """actions per decision of `--actor mlp` (1: CleanRL's per-step PPO; 4: the chunk-level MDP of the other actors)"""
    init_std: float | None = None
    """initial std of the Gaussian (default: 0.1 for chunks, 0.3 for noise, 1.0 for the mlp baseline)"""

    # Selection (Uni-O4's rule)
    selection_top: int = 3
    """candidates kept by offline OPE score before the real-episode comparison"""
    selection_episodes: int = 10
    """real episodes per candidate in the selection"""

    # Both learners (None: their learner's default, `ALGO_DEFAULTS`)
    total_timesteps: int | None = None
    """environment steps, actions not chunks (default: 250k for td3, 1M for ppo)"""
    num_envs: int | None = None
    """parallel Gymnasium environments (default: 1 for td3, 16 for ppo)"""

    # PPO
    num_steps: int = 64
    """decisions per environment per rollout"""
    learning_rate: float | None = None
    """Adam learning rate of the actor (default: 3e-4 for the MLP heads, 3e-6 for the denoiser)"""
    value_learning_rate: float = 3e-4
    """Adam learning rate of the value network"""
    anneal_lr: bool = True
    """anneal both learning rates linearly down to `lr_floor` times their start"""
    lr_floor: float = 0.1
    """the annealed learning rates end at this fraction of their start"""
    gae_lambda: float = 0.95
    """lambda of GAE over decisions"""
    num_minibatches: int = 8
    """minibatches per epoch"""
    update_epochs: int = 5
    """epochs over every rollout, at most (`--target-kl` stops earlier)"""
    clip_coef: float = 0.2
    """PPO clip range of the likelihood ratio"""
    target_kl: float | None = 0.2
    """stop an update's epochs once the approximate KL of the ratios exceeds this (nats per decision); None: never"""
    anchor_coef: float = 1.0
    """weight of staying at the offline policy: ppo's KL to its Gaussian, td3's |z - anchor|^2 (0 for mlp)"""
    anchor_floor: float | None = None
    """fraction of --anchor-coef the anchor falls to, linearly over the run (td3 0.1; ppo 1: constant)"""
    max_grad_norm: float = 0.5
    """gradient clipping, actor and value network each"""
    reward_scaling: bool = True
    """divide rewards by the running std of a discounted return (clipped to +-10), as CleanRL does"""
    critic_warmup: int = 3
    """rollouts at the start that train only the value network (the actor frozen)"""

    # TD3 on chunks (--algo td3): the offline data in every batch, RLPD-style
    batch_size: int = 256
    """transitions per critic update"""
    offline_ratio: float = 0.5
    """share of every batch drawn from the offline dataset (the rest from the online replay)"""
    offline_rows: int = 100_000
    """dataset chunks kept for the batches (a random subset; the frozen sub-policy is precomputed on them)"""
    buffer_size: int = 1_000_000
    """online decisions kept (a ring buffer)"""
    utd_ratio: int = 1
    """critic updates per decision collected (updates-to-data ratio)"""
    critic_learning_rate: float = 3e-4
    """Adam learning rate of the chunk critics"""
    critic_layer_norm: bool = True
    """LayerNorm in the critics' hidden layers (RLPD); fresh critics (the offline run's have none)"""
    tau: float = 0.005
    """Polyak rate of the target critics"""
    exploration_noise: float = 0.1
    """std of the Gaussian noise added to the actor's z while collecting (z in [-1, 1] units)"""
    policy_noise: float = 0.2
    """std of TD3's target policy smoothing noise"""
    noise_clip: float = 0.5
    """TD3's target noise is clipped to +- this"""
    policy_frequency: int = 2
    """critic updates per actor update (TD3's delayed policy update)"""
    q_weight: float = 0.5
    """td3 actor loss: -q_weight Q / mean|Q| + anchor_coef |z - anchor|^2 (TD3+BC's alpha is 2.5)"""
    actor_learning_starts: int = 0
    """environment steps collected with the actor frozen at the hand-over (the critics learn from the start)"""
    offline_critic_updates: int = 25_000
    """critic updates on the offline data alone before the first online step (the actor frozen)"""

    # Evaluation and checkpoint
    eval_every: int | None = None
    """evaluate the deterministic policy every this many steps, and at 0 and the end (25k td3, 20k ppo)"""
    eval_episodes: int = 10
    """episodes per evaluation (the same start states every time)"""
    checkpoint_path: str | None = None
    """where to write the online checkpoint (default: runs/{run_name}/online.pt)"""
    resume: str | None = None
    """continue the interrupted run of this online checkpoint, with its own arguments (other flags are ignored)"""


# What each learner was measured with (docs/experiments.md), for the flags left at None. TD3 learns from
# one environment; PPO needs 16 for its rollouts and a million steps to move at all.
ALGO_DEFAULTS = {
    "td3": {"actor": "residual", "num_envs": 1, "total_timesteps": 250_000, "eval_every": 25_000, "anchor_floor": 0.1},
    "ppo": {"actor": "noise", "num_envs": 16, "total_timesteps": 1_000_000, "eval_every": 20_000, "anchor_floor": 1.0},
}


def with_algo_defaults(args: Args) -> Args:
    """`args` with every flag left at None in `ALGO_DEFAULTS` set to its learner's default."""
    unset = {name: value for name, value in ALGO_DEFAULTS[args.algo].items() if getattr(args, name) is None}
    return replace(args, **unset)


# Every numeric flag's range (`eval.out_of_range`): upper bounds far above every setting used here, so
# that a request that cannot fit in memory or time is refused before anything is allocated.
RANGES = {
    "seed": SEED_RANGE,
    "residual_bound": "(0, 10]",
    "action_steps": "[1, 64]",
    "mlp_horizon": "[1, 64]",
    "init_std": "(0, 2]",
    "selection_top": "[1, 64]",
    "selection_episodes": "[1, 1000]",
    "total_timesteps": "[1, 100000000]",
    "num_envs": "[1, 256]",
    "num_steps": "[1, 4096]",
    "learning_rate": "(0, 1]",
    "value_learning_rate": "(0, 1]",
    "lr_floor": "[0, 1]",
    "gae_lambda": "[0, 1]",
    "num_minibatches": "[1, 65536]",
    "update_epochs": "[1, 1000]",
    "clip_coef": "(0, 10]",
    "target_kl": "(0, 100]",
    "anchor_coef": "[0, 1000]",
    "anchor_floor": "[0, 1]",
    "max_grad_norm": "(0, 1000000]",
    "critic_warmup": "[0, 1000]",
    "batch_size": "[1, 65536]",
    "offline_ratio": "[0, 1]",
    "offline_rows": "[1, 2000000]",
    "buffer_size": "[1, 2000000]",
    "utd_ratio": "[1, 1000]",
    "critic_learning_rate": "(0, 1]",
    "tau": "[0, 1]",
    "exploration_noise": "[0, 10]",
    "policy_noise": "[0, 10]",
    "noise_clip": "[0, 10]",
    "policy_frequency": "[1, 1000]",
    "q_weight": "(0, 1000000]",
    "actor_learning_starts": "[0, 100000000]",
    "offline_critic_updates": "[0, 10000000]",
    "eval_every": "[1, 100000000]",
    "eval_episodes": "[1, 1000]",
}


def check_args(args: Args) -> str | None:
    """The first argument out of its range, as a message naming the flag (None if all are valid):
    every check is made before any work starts."""
    if args.checkpoint is None:
        return "--checkpoint is required: the offline checkpoint to fine-tune (or --resume an online checkpoint)"
    problem = out_of_range(args, RANGES)
    if problem is not None:
        return problem
    if args.num_minibatches > args.num_envs * args.num_steps:
        return (
            f"--num-minibatches ({args.num_minibatches}) must be at most the decisions per rollout, "
            f"--num-envs x --num-steps = {args.num_envs * args.num_steps}"
        )
    if args.residual_bound is not None and args.actor != "residual":
        return f"--residual-bound bounds the offset of --actor residual (got --actor {args.actor})"
    if args.action_steps is not None and args.actor != "residual":
        return f"--action-steps shortens the decisions of --actor residual (got --actor {args.actor})"
    if args.algo == "td3" and args.actor == "diffusion":
        return "--algo td3 trains --actor residual, fql, noise or mlp (the denoiser is fine-tuned by --algo ppo only)"
    if args.algo == "ppo" and args.actor == "fql":
        return "--actor fql learns from replayed draws of its noise: --algo td3 only"
    if args.from_scratch and args.actor != "diffusion":
        return (
            f"--from-scratch re-initializes the denoiser, so it needs --actor diffusion (got --actor {args.actor}; "
            f"--actor mlp is the Gaussian MLP from scratch)"
        )
    if args.env_id is not None and not (is_dataset_name(args.env_id) or args.env_id in gym.registry):
        return (
            f"--env-id must be `<env>-<quality>` with env in {', '.join(GYM_ENV_IDS)} (e.g. hopper-medium) or a "
            f"Gymnasium id (e.g. Hopper-v5), got {args.env_id}"
        )
    return None


def check_paths(args: Args) -> str | None:
    """Where the run writes, checked writable before any work (the loading, the selection): an
    unwritable path would otherwise fail only at the first save, after the selection's episodes."""
    problem = unwritable("runs")
    if problem is not None:
        return f"runs/ (the TensorBoard logs and the default checkpoint folder) cannot be written: {problem}"
    return check_output_file("--checkpoint-path", args.checkpoint_path, inputs={"--checkpoint": args.checkpoint})


def gym_env_id(name: str) -> str:
    """`hopper-medium` -> `Hopper-v5`; a Gymnasium id passes through."""
    task = name.split("-")[0]
    return GYM_ENV_IDS[task] if task in GYM_ENV_IDS else name


def choose_candidate(labels: list[str], scores: list[float]) -> int:
    """Index of the best real score among the selection's candidates (Uni-O4's choice). A candidate
    whose score is not finite (NaN actions or returns) is skipped with a printed line, never chosen
    (a plain max() keeps a NaN that comes first). ValueError if no score is finite."""
    finite = []
    for index, (label, score) in enumerate(zip(labels, scores)):
        if np.isfinite(score):
            finite.append(index)
        else:
            print(f"selection: skipped {label}: its real normalized score is {score}, not finite")
    if not finite:
        raise ValueError(
            f"no candidate of the selection has a finite real score ({'; '.join(labels)}); nothing to fine-tune"
        )
    return max(finite, key=lambda index: scores[index])


def chunk_gae(rewards, values, next_values, terminations, ended, discounts, gae_lambda: float):
    """GAE over chunk decisions, arrays (T, N) (docs/design.md, "Online fine-tuning").

        delta_t = R_t + d_t (1 - terminated_t) V'_t - V(s_t)
        A_t     = delta_t + d_t lambda (1 - ended_t) A_{t+1}

    R_t: discounted chunk reward; d_t = gamma^{L_t} for a chunk of L_t executed steps; V'_t the
    value of the state the chunk ended in: V(s_{t+1}), or V(final observation) where the episode
    was truncated by its time limit (bootstrapped, not a termination). `ended` (terminated or
    truncated) cuts the recursion at episode boundaries. Returns (advantages, returns).
    """
    advantages = torch.zeros_like(rewards)
    last = torch.zeros_like(rewards[0])
    for t in reversed(range(len(rewards))):
        delta = rewards[t] + discounts[t] * (1 - terminations[t]) * next_values[t] - values[t]
        last = delta + discounts[t] * gae_lambda * (1 - ended[t]) * last
        advantages[t] = last
    return advantages, advantages + values


def step_info(infos: dict, key: str, ended: np.ndarray) -> np.ndarray:
    """A per-env info entry after a vector step in SAME_STEP autoreset mode: rows whose episode
    ended carry it in infos["final_info"] (their top-level info is the reset's)."""
    values = np.array(infos.get(key, np.zeros(len(ended))), dtype=np.float64)
    if ended.any():
        final = infos["final_info"]
        values[ended] = np.asarray(final[key], dtype=np.float64)[ended]
    return values


def make_env(env_id: str, max_episode_steps: int | None, horizon: int, obs_horizon: int, gamma: float):
    """CleanRL's make_env: a thunk for gym.vector.SyncVectorEnv that builds one training environment,
    the chunk-level MDP (`eval.ChunkEnv`) over the dataset's time limit, with episode statistics."""

    def thunk():
        env = gym.wrappers.RecordEpisodeStatistics(gym.make(env_id, max_episode_steps=max_episode_steps))
        return ChunkEnv(env, horizon, obs_horizon, gamma)

    return thunk


class RewardScaler:
    """Running return-std reward scaling (CleanRL's `NormalizeReward`, at the chunk level): each
    environment keeps a discounted sum of its past chunk rewards, G <- d G + R with d = gamma^L of the
    chunk (reset after an episode ends); rewards are divided by the running std of G over every
    update so far (Welford's parallel mean and variance) and clipped to +-`clip`."""

    def __init__(self, num_envs: int, clip: float = 10.0, epsilon: float = 1e-8):
        self.returns = np.zeros(num_envs)
        self.mean, self.var, self.count = 0.0, 1.0, 1e-4
        self.clip, self.epsilon = clip, epsilon

    def __call__(self, rewards: np.ndarray, discounts: np.ndarray, ended: np.ndarray) -> np.ndarray:
        self.returns = self.returns * discounts + rewards
        batch_mean, batch_var, batch_count = self.returns.mean(), self.returns.var(), len(self.returns)
        delta, total = batch_mean - self.mean, self.count + batch_count
        self.var = (
            self.var * self.count + batch_var * batch_count + delta**2 * self.count * batch_count / total
        ) / total
        self.mean, self.count = self.mean + delta * batch_count / total, total
        self.returns[ended] = 0.0
        return np.clip(rewards / np.sqrt(self.var + self.epsilon), -self.clip, self.clip)

    def state_dict(self) -> dict:
        """The running statistics, as a tensor and numbers (for --resume)."""
        return {
            "returns": torch.from_numpy(self.returns.copy()),
            "mean": float(self.mean),
            "var": float(self.var),
            "count": float(self.count),
        }

    def load_state_dict(self, state: dict) -> None:
        self.returns = state["returns"].numpy().copy()
        self.mean, self.var, self.count = state["mean"], state["var"], state["count"]


def actor_losses(
    actor: OnlineActor, states, decisions, anchors, old_log_probs, advantages, clip_coef: float, init_std: float
) -> dict:
    """PPO's clipped surrogate on one minibatch of decisions z (B, H, A), and the anchor.

        r = N(z; mean(s), sigma^2) / N(z; mean_old(s), sigma_old^2)   (the exact Gaussian ratio)
        policy = -E[min(r A, clip(r, 1 - c, 1 + c) A)],  A normalized per minibatch (CleanRL)
        anchor_kl = E[KL(N(mean(s), sigma^2) || N(anchor(s), init_std^2))]   (closed form, over H x A)

    Returns {"policy", "anchor_kl"} (with gradients) and {"approx_kl", "clipfrac"} (CleanRL's
    diagnostics: approximate KL per decision, share of clipped ratios)."""
    mean, std = actor.mean(states, anchors), actor.std()
    logratio = gaussian_log_prob(decisions, mean, std, event_dims=2) - old_log_probs
    ratio = logratio.exp()
    advantages = (advantages - advantages.mean()) / (advantages.std() + 1e-8)
    policy_loss = torch.max(-advantages * ratio, -advantages * ratio.clamp(1 - clip_coef, 1 + clip_coef)).mean()
    anchor_kl = gaussian_kl(mean, std, anchors, torch.tensor(init_std, device=mean.device), event_dims=2).mean()
    with torch.no_grad():
        approx_kl = ((ratio - 1) - logratio).mean()
        clipfrac = ((ratio - 1.0).abs() > clip_coef).float().mean().item()
    return {"policy": policy_loss, "anchor_kl": anchor_kl, "approx_kl": approx_kl, "clipfrac": clipfrac}


# ------------------------------------------------------------------------------------------------
# TD3 on chunks with the offline data in every batch (--algo td3; docs/design.md, "Online fine-tuning")
# ------------------------------------------------------------------------------------------------
class ChunkReplay:
    """Decisions as the critics and the actor learn from them, in preallocated tensors (a ring buffer
    of `capacity` rows): the normalized state history before (`states`) and after (`next_states`)
    the chunk, the executed chunk in [-1, 1] (H, A), its discounted reward R = sum_h gamma^h r_h over
    its L executed steps (`lengths`), whether the episode terminated inside it (a time-limit
    truncation is no termination: the target bootstraps through it), and the offline policy's z at
    both histories (`actor.anchor_mean`: the frozen sub-policy's chunk, or its seed), so that an
    update never runs the diffusion chain."""

    def __init__(self, capacity: int, example: dict):
        self.data = {
            key: torch.zeros((capacity,) + value.shape[1:], device=value.device) for key, value in example.items()
        }
        self.capacity, self.size, self.position = capacity, 0, 0

    def add(self, rows: dict) -> None:
        index = (self.position + torch.arange(len(rows["states"]))) % self.capacity
        for key, value in rows.items():
            self.data[key][index] = value
        self.position = int(index[-1] + 1) % self.capacity
        self.size = min(self.size + len(index), self.capacity)

    def sample(self, count: int) -> dict:
        index = torch.randint(self.size, (count,))
        return {key: value[index] for key, value in self.data.items()}


@torch.no_grad()
def offline_replay(checkpoint: dict, actor: OnlineActor, rows: int, gamma: float, seed: int) -> ChunkReplay:
    """The offline run's dataset chunked as the actor acts (`eval.chunk_dataset` with its H,
    its state history and gamma), a random `rows` of its chunks, with the offline policy's z computed
    once on every history (in batches: the chain is the costly part)."""
    try:
        dataset, *_ = load_dataset(checkpoint["args"]["env_id"], checkpoint["dataset_id"])
    except DatasetError as error:
        fail(str(error))
    data = chunk_dataset(dataset, actor.horizon, actor.obs_horizon, gamma)
    index = torch.randperm(len(data["chunks"]), generator=torch.Generator().manual_seed(seed))[:rows].numpy()
    device = actor.state_mean.device
    part = lambda key: torch.as_tensor(data[key][index], dtype=torch.float32, device=device)
    states, next_states = actor.normalize_states(part("states")), actor.normalize_states(part("next_states"))
    noises, next_noises = draw_noise(actor, len(index)), draw_noise(actor, len(index))
    anchors = lambda histories, eps: torch.cat(
        [actor.anchor_mean(batch, noise) for batch, noise in zip(histories.split(4096), eps.split(4096))]
    )
    rows = {
        "states": states,
        "noises": noises,
        "anchors": anchors(states, noises),
        "chunks": actor.scale_actions(part("chunks")).clamp(-1, 1),
        "rewards": part("rewards"),
        "lengths": part("mask").sum(1),
        "terminals": part("dones"),
        "next_states": next_states,
        "next_noises": next_noises,
        "next_anchors": anchors(next_states, next_noises),
    }
    replay = ChunkReplay(len(index), rows)
    replay.add(rows)
    return replay


def draw_noise(actor: OnlineActor, count: int) -> torch.Tensor:
    """fql's eps ~ N(0, I) for `count` decisions (B, H, A); zeros for the other actors, which ignore it
    (one replay layout for all)."""
    shape = (count, actor.horizon, actor.act_dim)
    device = actor.state_mean.device
    return torch.randn(shape, device=device) if actor.kind == "fql" else torch.zeros(shape, device=device)


def mixed_sample(offline: ChunkReplay, online: ChunkReplay, batch_size: int, offline_ratio: float) -> tuple[dict, int]:
    """RLPD's symmetric sampling: `offline_ratio` of the batch from the offline data, the rest from
    the online replay (all offline while it is empty). Returns the batch, offline rows first, and
    the number of offline rows."""
    num_offline = batch_size if online.size == 0 else round(batch_size * offline_ratio)
    parts = (
        [offline.sample(num_offline), online.sample(batch_size - num_offline)]
        if num_offline < batch_size
        else [offline.sample(batch_size)]
    )
    return {key: torch.cat([part[key] for part in parts]) for key in parts[0]}, num_offline


def td3_critic_update(critics, target_critics, optimizer, actor: OnlineActor, batch: dict, args: Args, gamma: float):
    """TD3's critic step on chunks (Q-chunking: the chunk is the action, the target jumps H steps):

        z'   = mean(s') + clip(N(0, policy_noise^2), -noise_clip, noise_clip),  a' = chunk(z')
        y    = R + gamma^L (1 - terminated) min_k Q'_k(s', a')          (`dynamics.chunk_td_target`)
        loss = sum_k mean (Q_k(s, a) - y)^2

    Q sees the current state (the last of the history) and the chunk in [-1, 1]."""
    with torch.no_grad():
        noise = (torch.randn_like(batch["next_anchors"]) * args.policy_noise).clamp(-args.noise_clip, args.noise_clip)
        next_z = actor.mean(batch["next_states"], batch["next_anchors"], batch["next_noises"])
        next_chunks = actor.chunk(batch["next_states"], next_z + noise)
        next_q = target_critics.q(batch["next_states"][:, -1], next_chunks)
        target = chunk_td_target(batch["rewards"], batch["terminals"], batch["lengths"], next_q, gamma)
    q1, q2 = critics.q_heads(batch["states"][:, -1], batch["chunks"])
    loss = ((q1 - target) ** 2).mean() + ((q2 - target) ** 2).mean()
    check_finite({"critic": loss}, "the critic update")
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return {"losses/critic_loss": loss.item()}, q1.detach()


def td3_actor_update(
    actor: OnlineActor, critics, optimizer, batch: dict, q_weight: float, anchor_weight: float
) -> dict:
    """The actor's step, TD3+BC's form with the offline policy as the reference:

        z = mean(s),  loss = -q_weight Q_1(s, chunk(z)) / mean|Q_1| + anchor_weight mean (z - anchor(s))^2

    The second term keeps z near the selected sub-policy's (`--anchor-coef`, decayed with
    `--anchor-floor`; 0 for the actor from scratch, `mlp`, which has no offline policy); dividing
    Q by its batch magnitude makes q_weight scale-free."""
    z = actor.mean(batch["states"], batch["anchors"], batch["noises"])
    q = critics.q_heads(batch["states"][:, -1], actor.chunk(batch["states"], z))[0]
    distance = ((z - batch["anchors"]) ** 2).mean()
    # The environment gets a chunk-valued z clipped to [-1, 1], and the clip passes no gradient: an
    # entry pushed past the edge would drift there unchecked, out of reach of Q and of the exploration
    # noise. A quadratic penalty on the excess keeps z at the box; it is 0 inside, so 0 at the hand-over.
    excess = torch.zeros(()) if actor.kind == "noise" else ((z.abs() - 1).clamp_min(0) ** 2).mean()
    loss = -q_weight * q.mean() / q.abs().mean().detach().clamp_min(1e-6) + anchor_weight * distance + excess
    check_finite({"actor": loss}, "the actor update")
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return {
        "losses/actor_loss": loss.item(),
        "charts/distance_to_offline": distance.item(),
        "charts/box_excess": excess.item(),
    }


def anchor_weight_at(global_step: int, anchor_coef: float, args: Args) -> float:
    """The weight of staying at the offline policy now: `anchor_coef` falling linearly over
    --total-timesteps until it reaches --anchor-floor of itself (both learners; a floor of 1 keeps
    it constant)."""
    return anchor_coef * max(1.0 - global_step / args.total_timesteps, args.anchor_floor)


def real_scores(policy, sub_policy: int, episodes: int, checkpoint: dict, seed: int, action_steps=None) -> np.ndarray:
    """Normalized scores of one sub-policy (or the online actor, sub-policy 0) on `episodes` real
    episodes reset with fixed seeds, under the dataset's time limit (`eval.evaluate_saved_task`);
    `action_steps`: re-plan after that many actions of each chunk (None: whole chunks)."""
    return evaluate_saved_task(policy, checkpoint, episodes, seed, [sub_policy], action_steps)["scores"][0]


def evaluate(step, actor, history, writer, args, checkpoint, path) -> None:
    """The deterministic policy's normalized score (fixed start states), recorded in `history` and
    logged; never a non-finite one: the run stops, and the previous checkpoint at `path` stays."""
    actor.eval()
    scores = real_scores(actor, 0, args.eval_episodes, checkpoint, args.seed)
    actor.train()
    if not (all(torch.isfinite(p).all() for p in actor.parameters()) and np.isfinite(scores).all()):
        fail(
            f"step {step}: the policy's parameters or its evaluation are not finite; stopped without saving "
            f"(the last checkpoint, if any, is untouched: {path})"
        )
    history["step"].append(step)
    history["scores"].append(scores.tolist())
    writer.add_scalar("charts/normalized_score", scores.mean(), step)
    tqdm.write(f"eval step {step}: normalized score {scores.mean():.1f} +- {scores.std():.1f}")


def training_state(global_step, next_eval, iteration, run_name, gamma, optimizers, reward_scaler, device) -> dict:
    """What --resume needs to continue the loop after an evaluation: the counters, both optimizers,
    the reward scaler and torch's random stream (exploration noise, minibatches). The environments
    are not saved: a resumed run starts new episodes (docs/design.md, "Resume")."""
    actor_optimizer, value_optimizer = optimizers
    return {
        "global_step": global_step,
        "next_eval": next_eval,
        "iteration": iteration,
        "run_name": run_name,
        "gamma": gamma,  # the offline run's, so that --resume needs only this file
        "actor_optimizer": actor_optimizer.state_dict(),
        "value_optimizer": value_optimizer.state_dict(),
        "reward_scaler": reward_scaler.state_dict(),
        **rng_state(device),
    }


def write_checkpoint(step, actor, learner, history, args, checkpoint, selection, path, resume) -> None:
    """The atomic checkpoint: what eval.py reads (`eval.REQUIRED`), and `resume`, the training
    state after this evaluation (`training_state`; None for --algo td3). `learner`: {"value": the
    PPO value network's state dict} or {"critics": TD3's}. `selection`: (the sub-policy, the table)."""
    sub_policy, selection_table = selection
    save_checkpoint(
        {
            "phase": "online",
            "args": asdict(args),
            "global_step": step,
            "env_id": checkpoint["env_id"],
            "max_episode_steps": checkpoint["max_episode_steps"],
            "dataset_id": checkpoint["dataset_id"],
            "ref_min_score": checkpoint["ref_min_score"],
            "ref_max_score": checkpoint["ref_max_score"],
            "offline_checkpoint": args.checkpoint,
            "actor": actor.to_checkpoint(),
            "sub_policy": sub_policy,
            "selection": selection_table,
            **learner,
            "history": history,
            "resume": resume,
        },
        path,
    )


# The fields of the training state that --resume reads.
TRAINING_STATE_FIELDS = (
    "global_step",
    "next_eval",
    "iteration",
    "run_name",
    "gamma",
    "actor_optimizer",
    "value_optimizer",
    "reward_scaler",
    "torch_rng",
)


def resumed_run(args: Args) -> tuple[Args, dict | None]:
    """--resume: the run's own arguments (flags given beside it are named and ignored; the run goes
    on writing to the resumed file) and its checkpoint, with the training state after its last
    evaluation. An unreadable file, an offline checkpoint or one without training state ends the
    script with a one-line message."""
    if args.resume is None:
        return args, None
    try:
        resumed = load_checkpoint(args.resume, phase="online")
        if not resumed.get("resume"):
            raise CheckpointError(
                f"{args.resume} holds no training state to resume from (a --algo td3 run, which keeps no "
                "replay buffer; or an older version): run its command again"
            )
        for field in TRAINING_STATE_FIELDS:
            if (name := missing_field(resumed, f"resume.{field}")) is not None:
                raise CheckpointError(f"{args.resume} has no field {name}")
    except CheckpointError as error:
        fail(str(error))
    defaults = asdict(Args())
    ignored = [name for name, value in asdict(args).items() if name != "resume" and value != defaults[name]]
    try:
        args = Args(**{**resumed["args"], "resume": args.resume, "checkpoint_path": args.resume})
    except TypeError as error:
        fail(f"{args.resume} was written by another version of this script ({error}); run its command again")
    if ignored:
        print(f"ignored beside --resume: {', '.join('--' + name.replace('_', '-') for name in ignored)}")
    print(f"resuming {args.resume} after step {resumed['global_step']} with the arguments saved in it")
    return args, resumed


def train_td3(args: Args, actor: OnlineActor, checkpoint: dict, gamma: float, learning_rate: float, writer, run):
    """--algo td3: the off-policy loop (docs/design.md, "Online fine-tuning"). `run` is (run_name,
    the selection, the checkpoint path, the device). Critics: the offline run's chunk critics (the
    IQL heads, trained on this dataset) when the actor acts in their whole chunks and
    `--critic-layer-norm` is off, else fresh ones; then
    `--offline-critic-updates` TD3 critic updates on the offline data alone, the actor frozen at
    the hand-over. Every decision collected (one chunk per environment, z = mean(s) + exploration
    noise) is followed by `--utd-ratio` critic updates per environment on mixed batches, the actor
    updated every `--policy-frequency` of them. No --resume: the checkpoint keeps the learner,
    not the replay buffer."""
    run_name, selection, checkpoint_path, device = run
    anchor_coef = 0.0 if actor.kind == "mlp" else args.anchor_coef  # no offline policy to stay near
    obs_dim, horizon = actor.policy_config.obs_dim, actor.horizon
    critics = ChunkCritics(obs_dim, actor.act_dim, horizon, layer_norm=args.critic_layer_norm).to(device)
    offline_critics = actor.kind != "mlp" and horizon == actor.policy_config.horizon and not args.critic_layer_norm
    if "critics" in checkpoint and offline_critics:
        critics.load_state_dict(checkpoint["critics"]["state_dict"])
    target_critics = copy.deepcopy(critics).requires_grad_(False)
    critic_optimizer = torch.optim.Adam(critics.parameters(), lr=args.critic_learning_rate)
    actor_optimizer = torch.optim.Adam(actor.head.parameters(), lr=learning_rate)
    history = {"step": [], "scores": []}
    evaluate(0, actor, history, writer, args, checkpoint, checkpoint_path)  # the hand-over
    learner = {"critics": critics.state_dict()}
    write_checkpoint(0, actor, learner, history, args, checkpoint, selection, checkpoint_path, None)

    offline = offline_replay(checkpoint, actor, args.offline_rows, gamma, args.seed)
    warmup = tqdm(range(1, args.offline_critic_updates + 1), "offline critic updates", **BAR)
    for update in warmup:  # the critics learn the hand-over's values first
        try:
            log, _ = td3_critic_update(
                critics, target_critics, critic_optimizer, actor, offline.sample(args.batch_size), args, gamma
            )
        except NonFiniteLoss as error:
            fail(
                f"offline critic update {update}: {error}; stopped (the last checkpoint is untouched: "
                f"{checkpoint_path})"
            )
        soft_update(target_critics, critics, args.tau)
        if update % 1000 == 0 or update == args.offline_critic_updates:
            warmup.set_postfix(critic=f"{log['losses/critic_loss']:.3f}", refresh=False)
    warmup.close()

    envs = gym.vector.SyncVectorEnv(
        [
            make_env(checkpoint["env_id"], checkpoint["max_episode_steps"], horizon, actor.obs_horizon, gamma)
            for _ in range(args.num_envs)
        ],
        autoreset_mode=gym.vector.AutoresetMode.SAME_STEP,
    )
    normalized = lambda observations: actor.normalize_states(
        torch.as_tensor(observations, dtype=torch.float32, device=device)
    )
    next_obs, _ = envs.reset(seed=args.seed)
    states = normalized(next_obs)
    noises = draw_noise(actor, args.num_envs)  # fql: a fresh eps per decision (FQL's mu(s, eps))
    anchors = actor.anchor_mean(states, noises)
    online = None
    global_step, next_eval, updates, start_time, actor_log = 0, args.eval_every, 0, time.time(), {}
    progress = tqdm(total=args.total_timesteps, desc="online (td3)", unit="step", **BAR)
    while global_step < args.total_timesteps:
        # Collect one decision per environment: z = mean(s) + exploration noise, its chunk executed.
        with torch.no_grad():
            z = actor.mean(states, anchors, noises) + args.exploration_noise * torch.randn_like(anchors)
            chunks = actor.chunk(states, z)
        next_obs, reward, terminated, truncated, infos = envs.step(actor.unscale_actions(chunks).cpu().numpy())
        done = terminated | truncated
        lengths = step_info(infos, "chunk_length", done)
        global_step += int(lengths.sum())
        progress.update(int(lengths.sum()))
        final_obs = np.array(next_obs)
        if done.any():  # the state each chunk ended in (autoreset replaced it): the final observation
            final_obs[done] = np.stack(infos["final_obs"][done])
            episode = infos["final_info"]["episode"]
            for row in np.flatnonzero(done & infos["final_info"]["_episode"]):
                writer.add_scalar("charts/episodic_return", episode["r"][row], global_step)
        next_states = normalized(final_obs)
        next_noises = draw_noise(actor, args.num_envs)
        next_anchors = actor.anchor_mean(next_states, next_noises)
        rows = {
            "states": states,
            "noises": noises,
            "anchors": anchors,
            "chunks": chunks,
            "rewards": torch.as_tensor(reward, dtype=torch.float32, device=device),
            "lengths": torch.as_tensor(lengths, dtype=torch.float32, device=device),
            "terminals": torch.as_tensor(terminated, dtype=torch.float32, device=device),
            "next_states": next_states,
            "next_noises": next_noises,
            "next_anchors": next_anchors,
        }
        if online is None:
            online = ChunkReplay(min(args.buffer_size, args.total_timesteps + args.num_envs), rows)
        online.add(rows)
        states = normalized(next_obs)
        noises = next_noises
        anchors = next_anchors if not done.any() else actor.anchor_mean(states, noises)

        # Learn: --utd-ratio critic updates per decision on mixed batches, the actor every --policy-frequency.
        try:
            for _ in range(args.utd_ratio * args.num_envs):
                batch, num_offline = mixed_sample(offline, online, args.batch_size, args.offline_ratio)
                log, q = td3_critic_update(critics, target_critics, critic_optimizer, actor, batch, args, gamma)
                updates += 1
                if updates % args.policy_frequency == 0 and global_step >= args.actor_learning_starts:
                    weight = anchor_weight_at(global_step, anchor_coef, args)
                    actor_log = td3_actor_update(actor, critics, actor_optimizer, batch, args.q_weight, weight)
                soft_update(target_critics, critics, args.tau)
        except NonFiniteLoss as error:
            fail(f"step {global_step}: {error}; stopped (the last checkpoint is untouched: {checkpoint_path})")

        if global_step // 5000 != (global_step - int(lengths.sum())) // 5000 or global_step >= args.total_timesteps:
            steps_per_second = global_step / (time.time() - start_time)
            log.update(
                {
                    **actor_log,
                    "losses/q_offline": q[:num_offline].mean().item(),
                    "losses/q_online": q[num_offline:].mean().item(),
                    "charts/updates_per_step": updates / global_step,
                    "charts/exploration_noise": args.exploration_noise,
                    "charts/SPS": steps_per_second,
                }
            )
            for tag, number in log.items():
                writer.add_scalar(tag, number, global_step)
            progress.set_postfix(
                critic=f"{log['losses/critic_loss']:.3f}",
                q_offline=f"{log['losses/q_offline']:.1f}",
                q_online=f"{log['losses/q_online']:.1f}",
                distance=f"{log.get('charts/distance_to_offline', 0.0):.4f}",
                refresh=False,
            )
        if global_step >= next_eval or global_step >= args.total_timesteps:
            next_eval = (global_step // args.eval_every + 1) * args.eval_every
            evaluate(global_step, actor, history, writer, args, checkpoint, checkpoint_path)
            learner = {"critics": critics.state_dict()}
            write_checkpoint(global_step, actor, learner, history, args, checkpoint, selection, checkpoint_path, None)
    progress.close()
    envs.close()


def train_ppo(args: Args, actor, checkpoint, gamma, learning_rate, writer, run, resumed, init_std, anchor_coef):
    """--algo ppo, the paper's learner (docs/design.md, "Online fine-tuning"): PPO on the chunk-level
    MDP with vectorized environments, GAE over chunks, a fresh value network warmed up for
    `--critic-warmup` rollouts, and the anchor to the offline Gaussian. `run` is (run_name, the
    selection, the checkpoint path, the device); `resumed` the online checkpoint of --resume."""
    run_name, selection, checkpoint_path, device = run
    env_id, max_episode_steps = checkpoint["env_id"], checkpoint["max_episode_steps"]
    obs_dim = actor.policy_config.obs_dim
    # ---- value network: CleanRL's critic on the normalized state history, fitted from scratch ----
    value_net = ppo_mlp(actor.obs_horizon * obs_dim, 1, last_std=1.0).to(device)
    value = lambda states: value_net(states.flatten(1)).squeeze(-1)
    # Separate optimizers and gradient clipping: the actor's and the critic's steps do not compete.
    actor_optimizer = torch.optim.Adam([p for p in actor.parameters() if p.requires_grad], lr=learning_rate, eps=1e-5)
    value_optimizer = torch.optim.Adam(value_net.parameters(), lr=args.value_learning_rate, eps=1e-5)

    # ---- vectorized chunk-level environments ------------------------------------------------
    # SAME_STEP autoreset: an episode that ends returns its final observation in the infos and is
    # reset in the same call; a chunk never crosses an episode boundary (ChunkEnv), so the next
    # decision of that environment starts the new episode cleanly.
    envs = gym.vector.SyncVectorEnv(
        [make_env(env_id, max_episode_steps, actor.horizon, actor.obs_horizon, gamma) for _ in range(args.num_envs)],
        autoreset_mode=gym.vector.AutoresetMode.SAME_STEP,
    )
    reward_scaler = RewardScaler(args.num_envs)
    shape = (args.num_steps, args.num_envs)
    decision_shape = (actor.horizon, actor.act_dim)
    obs = torch.zeros(shape + (actor.obs_horizon, obs_dim), device=device)  # normalized histories
    decisions, anchors = (torch.zeros(shape + decision_shape, device=device) for _ in range(2))
    log_probs, rewards, values, next_values, terminations, ended, discounts = (
        torch.zeros(shape, device=device) for _ in range(7)
    )

    history = {"step": [], "scores": []}

    # ---- PPO ---------------------------------------------------------------------------------------
    global_step, next_eval, iteration = 0, args.eval_every, 0
    optimizers = (actor_optimizer, value_optimizer)
    if resumed is None:
        evaluate(0, actor, history, writer, args, checkpoint, checkpoint_path)  # the hand-over
        resume = training_state(0, next_eval, 0, run_name, gamma, optimizers, reward_scaler, device)
        write_checkpoint(
            0, actor, {"value": value_net.state_dict()}, history, args, checkpoint, selection, checkpoint_path, resume
        )
    else:  # --resume: every state the loop carries, as it was after the saved evaluation
        resume, history = resumed["resume"], resumed["history"]
        global_step, next_eval, iteration = resume["global_step"], resume["next_eval"], resume["iteration"]
        value_net.load_state_dict(resumed["value"])
        actor_optimizer.load_state_dict(resume["actor_optimizer"])
        value_optimizer.load_state_dict(resume["value_optimizer"])
        reward_scaler.load_state_dict(resume["reward_scaler"])
        set_rng_state(resume, device)
    # A resumed run starts new episodes, seeded by its iteration (after the hand-over: the same reset).
    next_obs, _ = envs.reset(seed=args.seed + iteration)
    start_time, start_step = time.time(), global_step
    progress = tqdm(total=args.total_timesteps, desc="online (ppo)", unit="step", initial=global_step, **BAR)
    while global_step < args.total_timesteps:
        iteration += 1
        warming_up = iteration <= args.critic_warmup  # only the value network learns
        anchor_weight = anchor_weight_at(global_step, anchor_coef, args)
        if args.anneal_lr:
            fraction = max(1.0 - global_step / args.total_timesteps, args.lr_floor)
            actor_optimizer.param_groups[0]["lr"] = fraction * learning_rate
            value_optimizer.param_groups[0]["lr"] = fraction * args.value_learning_rate

        # Rollout: num_steps decisions z ~ N(mean(s), sigma^2) in every environment.
        for t in range(args.num_steps):
            with torch.no_grad():
                obs[t] = actor.normalize_states(torch.as_tensor(next_obs, dtype=torch.float32, device=device))
                anchors[t] = actor.anchor_mean(obs[t])
                mean, std = actor.mean(obs[t], anchors[t]), actor.std()
                decisions[t] = mean + std * torch.randn(mean.shape, device=device)
                log_probs[t], values[t] = gaussian_log_prob(decisions[t], mean, std, event_dims=2), value(obs[t])
                chunk = actor.unscale_actions(actor.chunk(obs[t], decisions[t])).cpu().numpy()
            next_obs, reward, terminated, truncated, infos = envs.step(chunk)
            done = terminated | truncated
            lengths = step_info(infos, "chunk_length", done)
            global_step += int(lengths.sum())
            if args.reward_scaling:
                reward = reward_scaler(reward, gamma**lengths, done)
            rewards[t] = torch.as_tensor(reward, dtype=torch.float32, device=device)
            discounts[t] = torch.as_tensor(gamma**lengths, dtype=torch.float32, device=device)
            terminations[t] = torch.as_tensor(terminated, dtype=torch.float32, device=device)
            ended[t] = torch.as_tensor(done, dtype=torch.float32, device=device)
            # The state each chunk ended in: the next observation, or for an episode that ended
            # (autoreset already replaced its observation) the final one kept in the infos.
            final_obs = np.array(next_obs)
            if done.any():
                final_obs[done] = np.stack(infos["final_obs"][done])
                episode = infos["final_info"]["episode"]
                for row in np.flatnonzero(done & infos["final_info"]["_episode"]):
                    writer.add_scalar("charts/episodic_return", episode["r"][row], global_step)
                    writer.add_scalar("charts/episodic_length", episode["l"][row], global_step)
            with torch.no_grad():
                next_values[t] = value(
                    actor.normalize_states(torch.as_tensor(final_obs, dtype=torch.float32, device=device))
                )

        advantages, returns = chunk_gae(rewards, values, next_values, terminations, ended, discounts, args.gae_lambda)

        # Update: clipped surrogate of the Gaussian likelihood ratio (H x A entries) + the KL to the
        # offline Gaussian (the anchor); the value loss with its own optimizer.
        flat = lambda x: x.reshape((-1,) + x.shape[2:])
        b_obs, b_decisions, b_anchors, b_log_probs = flat(obs), flat(decisions), flat(anchors), flat(log_probs)
        b_advantages, b_returns, b_values = flat(advantages), flat(returns), flat(values)
        batch_size = args.num_steps * args.num_envs
        minibatch_size = batch_size // args.num_minibatches
        clipfracs, approx_kl = [], torch.zeros(())
        for epoch in range(args.update_epochs):
            permutation = torch.randperm(batch_size, device=device)
            for start in range(0, batch_size, minibatch_size):
                mb = permutation[start : start + minibatch_size]
                v_loss = 0.5 * ((value(b_obs[mb]) - b_returns[mb]) ** 2).mean()
                if not torch.isfinite(v_loss):
                    fail(
                        f"iteration {iteration} (global step {global_step}): the value loss is {v_loss.item()}; "
                        f"stopped (the last checkpoint is untouched: {checkpoint_path})"
                    )
                value_optimizer.zero_grad()
                v_loss.backward()
                torch.nn.utils.clip_grad_norm_(value_net.parameters(), args.max_grad_norm)
                value_optimizer.step()
                if warming_up:
                    continue
                out = actor_losses(
                    actor,
                    b_obs[mb],
                    b_decisions[mb],
                    b_anchors[mb],
                    b_log_probs[mb],
                    b_advantages[mb],
                    args.clip_coef,
                    init_std,
                )
                approx_kl = out["approx_kl"]
                clipfracs.append(out["clipfrac"])
                for name in ("policy", "anchor_kl"):
                    if not torch.isfinite(out[name]):
                        fail(
                            f"iteration {iteration} (global step {global_step}): the {name} loss is "
                            f"{out[name].item()}; stopped (the last checkpoint is untouched: {checkpoint_path})"
                        )
                actor_optimizer.zero_grad()
                (out["policy"] + anchor_weight * out["anchor_kl"]).backward()
                torch.nn.utils.clip_grad_norm_(actor.parameters(), args.max_grad_norm)
                actor_optimizer.step()
            if not warming_up and args.target_kl is not None and approx_kl > args.target_kl:
                break
        epochs_run = epoch + 1

        variance = b_returns.var()
        explained_variance = float("nan") if variance == 0 else (1 - (b_returns - b_values).var() / variance).item()
        steps_per_second = (global_step - start_step) / (time.time() - start_time)  # this process's steps
        sigma = actor.std().mean().item()
        log = {
            "losses/value_loss": v_loss.item(),
            "losses/explained_variance": explained_variance,
            "charts/sigma": sigma,
            "charts/learning_rate": actor_optimizer.param_groups[0]["lr"],
            "charts/anchor_weight": anchor_weight,
            "charts/SPS": steps_per_second,
        }
        if not warming_up:
            log.update(
                {
                    "losses/policy_loss": out["policy"].item(),
                    "losses/anchor_kl": out["anchor_kl"].item(),
                    "losses/approx_kl": approx_kl.item(),
                    "losses/clipfrac": np.mean(clipfracs),
                    "losses/update_epochs": epochs_run,
                }
            )
        for tag, number in log.items():
            writer.add_scalar(tag, number, global_step)
        shown = {"iteration": iteration, "value": f"{v_loss.item():.4f}", "sigma": f"{sigma:.3f}"}
        if not warming_up:
            shown |= {"policy": f"{out['policy'].item():.4f}", "approx_kl": f"{approx_kl.item():.4f}"}
        progress.update(global_step - progress.n)
        progress.set_postfix(shown, refresh=False)
        if global_step >= next_eval or global_step >= args.total_timesteps:
            next_eval = (global_step // args.eval_every + 1) * args.eval_every
            evaluate(global_step, actor, history, writer, args, checkpoint, checkpoint_path)
            # taken after the evaluation, so that a resumed run continues from here
            resume = training_state(
                global_step, next_eval, iteration, run_name, gamma, optimizers, reward_scaler, device
            )
            write_checkpoint(
                global_step,
                actor,
                {"value": value_net.state_dict()},
                history,
                args,
                checkpoint,
                selection,
                checkpoint_path,
                resume,
            )

    progress.close()
    envs.close()


if __name__ == "__main__":
    args, resumed = resumed_run(tyro.cli(Args))
    args = with_algo_defaults(args)
    if (problem := check_args(args) or check_paths(args)) is not None:
        fail(problem)
    from_scratch = args.from_scratch or args.actor == "mlp"
    init_std = (
        {"diffusion": 0.1, "residual": 0.1, "fql": 0.1, "noise": 0.3, "mlp": 1.0}[args.actor]
        if args.init_std is None
        else args.init_std
    )
    learning_rate = (3e-6 if args.actor == "diffusion" else 3e-4) if args.learning_rate is None else args.learning_rate
    anchor_coef = 0.0 if from_scratch else args.anchor_coef  # no offline policy to stay near
    if resumed is None:
        try:
            # A D4RL-style --env-id names the dataset too: a checkpoint of hopper-expert is no hopper-medium run.
            checkpoint = load_checkpoint(
                args.checkpoint,
                expected_env_id=gym_env_id(args.env_id) if args.env_id else None,
                expected_dataset=args.env_id if args.env_id and is_dataset_name(args.env_id) else None,
                phase="offline",
            )
            check_environment(checkpoint, args.checkpoint)
        except CheckpointError as error:
            fail(str(error))
        if (stage := unfinished_stage(checkpoint)) is not None:
            fail(f"{args.checkpoint} is a run cut off in {stage}: finish it with uepo_offline.py --resume")
        gamma = checkpoint["args"]["gamma"]
        if args.action_steps is not None and args.action_steps > (horizon := checkpoint["policy"]["config"]["horizon"]):
            fail(f"--action-steps must be at most the checkpoint's horizon H = {horizon}, got {args.action_steps}")
    else:
        # --resume: the task (environment, time limit, reference scores) and gamma come from the online
        # checkpoint; the offline one is not read again, its selection was made.
        checkpoint, gamma = resumed, resumed["resume"]["gamma"]
    env_name = args.env_id or checkpoint["dataset_id"].replace("/", "-")
    run_name = f"{env_name}__{args.exp_name}__{args.seed}__{int(time.time())}"
    if resumed is not None:
        run_name = resumed["resume"]["run_name"]  # the same TensorBoard folder
    checkpoint_path = args.checkpoint_path or f"runs/{run_name}/online.pt"
    how = f"continue with --resume {checkpoint_path}" if args.algo == "ppo" else "td3 keeps no replay: start again"
    sys.excepthook = functools.partial(report_interrupt, f"the last checkpoint (if any) is {checkpoint_path}; {how}")

    # TRY NOT TO MODIFY: seeding
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    torch.backends.cudnn.deterministic = args.torch_deterministic
    device = torch.device("cuda" if torch.cuda.is_available() and args.cuda else "cpu")

    # ---- selection: top-k by offline OPE, then the best over real episodes (Uni-O4) ---------
    if resumed is not None:  # --resume: the interrupted run made it; its actor is built below
        sub_policy, selection_table = resumed["sub_policy"], resumed["selection"]
    else:
        try:
            base = build_saved(checkpoint["policy"], "the saved policy").to(device)
            candidates = [] if from_scratch else offline_candidates(checkpoint, device)
        except CheckpointError as error:
            fail(f"{args.checkpoint}: {error}")
        if from_scratch:
            # Same architecture, statistics and seeds, fresh weights; sub-policy 0 (the mlp actor uses
            # only the statistics and action bounds).
            state = checkpoint["policy"]["state_dict"]
            policy = DiffusionPolicy(
                base.config, state["state_mean"], state["state_std"], state["action_low"], state["action_high"]
            ).to(device)
            sub_policy, selection_table = 0, "from scratch: no selection"
        else:
            # The improved copies scored by the gate's OPE, else the base sub-policies by AM-Q; best first.
            rows = []
            for label, candidate, i, ope_score in candidates[: args.selection_top]:
                # With --action-steps the candidates act as the actor will: re-planned after that many actions.
                scores = real_scores(candidate, i, args.selection_episodes, checkpoint, args.seed, args.action_steps)
                rows.append((label, candidate, i, ope_score, scores.mean(), scores.std()))
            try:
                chosen = choose_candidate([row[0] for row in rows], [row[4] for row in rows])
            except ValueError as error:
                fail(f"{args.checkpoint}: {error}")
            selection_table = "| candidate | offline OPE | real normalized score | chosen |\n|-|-|-|-|\n" + "\n".join(
                f"| {label} | {ope_score:.1f} | {mean:.1f} +- {std:.1f} | {'yes' if r == chosen else ''} |"
                for r, (label, _, _, ope_score, mean, std) in enumerate(rows)
            )
            policy, sub_policy = copy.deepcopy(rows[chosen][1]), rows[chosen][2]
    # The inputs are read, checked and the selection made: only now the run gets its folder.
    writer = SummaryWriter(f"runs/{run_name}")
    writer.add_text(
        "hyperparameters",
        "|param|value|\n|-|-|\n%s" % ("\n".join([f"|{key}|{value}|" for key, value in vars(args).items()])),
    )
    print(selection_table)
    writer.add_text("selection", selection_table)

    # ---- actor: a Gaussian over decisions z whose mean is the deployed policy (diffusion.OnlineActor) --
    if resumed is None:
        actor = OnlineActor(
            args.actor,
            policy,
            sub_policy,
            init_std,
            mlp_horizon=args.mlp_horizon,
            residual_bound=args.residual_bound,
            action_steps=args.action_steps,
        ).to(device)
    else:  # the interrupted run's, as saved at its last evaluation
        try:
            actor = build_saved(resumed["actor"], f"{args.resume}: the actor").to(device)
        except CheckpointError as error:
            fail(str(error))
    # ---- fine-tuning: TD3 on chunks with the offline data (the default), or the paper's PPO ------
    run = (run_name, (sub_policy, selection_table), checkpoint_path, device)
    if args.algo == "td3":
        train_td3(args, actor, checkpoint, gamma, learning_rate, writer, run)
    else:
        train_ppo(args, actor, checkpoint, gamma, learning_rate, writer, run, resumed, init_std, anchor_coef)
    writer.close()
