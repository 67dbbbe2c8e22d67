"""UEPO offline phase (arXiv 2511.10087), CleanRL style: read top to bottom.

    python uepo_offline.py --env-id hopper-medium                  # the CPU setting (about 22 min, 2 cores)
    python uepo_offline.py --env-id hopper-medium --paper-scale    # the paper's budgets (GPU)

1. Data: a Minari dataset cut into chunks (s_t, a_{t:t+H}, R_t^H, s_{t+H}, done).
2. Phase 1, `--total-steps` steps: the multi-seed diffusion policy with J's disagreement term, the
   chunk-level IQL critics, the dynamics ensemble on real and diffusion-augmented transitions; every
   `--eval-every` steps each sub-policy's real score (reported only), divergence and AM-Q.
3. Phase 2: the top `--num-qualified` sub-policies by AM-Q get a copy improved under a gate on
   penalized AM-Q; the offline choice among the copies is by their return in the model.
4. The atomic checkpoint runs/{run_name}/offline.pt. Design: docs/design.md; numbers: docs/experiments.md.
"""

import copy
import functools
import os
import random
import sys
from dataclasses import asdict, dataclass, fields
from typing import Literal

import numpy as np
import torch
import tyro
from tqdm import tqdm

import eval
from diffusion import DiffusionPolicy, PolicyConfig, bppo_loss, qgrad_loss
from divergence import mean_pairwise_divergence, own_sequence_repulsion, subpolicy_terms
from dynamics import (
    BestSnapshot,
    ChunkCritics,
    EnsembleDynamics,
    am_q_ratio,
    am_q_rollouts,
    confident_choice,
    diffusion_augmentation,
    disagreement_threshold,
    holdout_split,
    iql_losses,
    mixed_batch,
    model_returns,
    soft_update,
    task_of_gym_id,
    termination_fn,
)


@dataclass
class Args:
    exp_name: str = os.path.basename(__file__)[: -len(".py")]
    """the name of this experiment"""
    seed: int = 1
    """seed of the experiment (network init, batches, evaluation episodes)"""
    torch_deterministic: bool = True
    """if toggled, `torch.backends.cudnn.deterministic=True`"""
    cuda: bool = True
    """if toggled, use a GPU when there is one"""
    paper_scale: bool = False
    """if toggled, start from the paper's budgets (`PAPER_SCALE`; sized for a GPU)"""

    # Data
    env_id: str = "hopper-medium"
    """dataset `<env>-<quality>`, the Minari id `mujoco/<env>/<quality>-v0`"""
    dataset_id: str | None = None
    """any Minari dataset id (e.g. `D4RL/pen/human-v2`); overrides `--env-id`"""
    chunk_size: int = 4
    """H, actions per chunk: the policy models and executes a_{t:t+H}"""
    history_size: int = 2
    """To, states per decision: the last To states condition the policy"""
    gamma: float = 0.99
    """discount (the chunk reward R_t^H = sum_h gamma^h r_{t+h})"""

    # Diffusion policy
    denoiser: Literal["unet", "mlp"] = "mlp"
    """`mlp`: a small, fast MLP; `unet`: the paper's U-Net + Transformer"""
    mlp_hidden: int = 256
    """width of the MLP denoiser's 3 hidden layers"""
    diffusion_steps: int = 20
    """K, DDPM training steps (cosine schedule)"""
    ddim_steps: int = 5
    """DDIM steps when sampling (a subsequence of the K training steps)"""
    prediction: Literal["epsilon", "sample"] = "sample"
    """what the denoiser predicts: the noise (eps) or the clean chunk (x0)"""
    n_subpolicies: int = 8
    """n fixed noise seeds = n sub-policies; 1 turns the ensemble off"""
    zero_seed: bool = True
    """sub-policy 0 starts from x_K = 0 (the others from drawn noises)"""

    # Divergence regularization (docs/design.md)
    tau: float = 0.7
    """a sub-policy closer than tau to its nearest partner is perturbed"""
    eta: float = 0.1
    """largest perturbation std (at divergence 0); 0 turns it off"""
    disagreement_coef: float = 0.1
    """alpha, weight of J's disagreement term (Uni-O4's 0.1); 0 turns it off"""
    disagreement_every: int = 10
    """add J's disagreement term to the loss every this many steps"""
    j_reading: Literal["dataset-sequence", "own-sequence"] = "own-sequence"
    """the sequence J's disagreement term scores: the dataset's or each own"""

    # Optimization
    total_steps: int = 20_000
    """gradient steps of the offline loop"""
    batch_size: int = 256
    """chunks per gradient step"""
    learning_rate: float = 3e-4
    """Adam learning rate of the policy, cosine-annealed to 0"""

    # Critics and dynamics model: AM-Q, the offline evaluation of sub-policies
    ope: bool = True
    """train the critics and the dynamics model, score with AM-Q"""
    ope_states: int = 256
    """dataset start states of every model evaluation (AM-Q, the choice)"""
    ope_steps: int = 400
    """environment steps of every AM-Q rollout in the model"""

    # Diffusion augmentation of the dynamics model's data (paper component 3)
    augment_ratio: float = 2.0
    """at most this x |D| synthetic transitions; 0 turns augmentation off"""
    dynamics_warmup: int = 5000
    """steps on real data only before the first augmentation"""
    augment_every: int = 5000
    """replace the augmentation buffer every this many steps"""
    augment_starts: int = 10_000
    """dataset start states per augmentation (start b: sub-policy b mod n)"""

    # Improvement of the best sub-policies, after the loop, gated by AM-Q
    num_qualified: int = 2
    """the top sub-policies by AM-Q that are improved; 0 turns it off"""
    improvement: Literal["bppo", "qgrad"] = "qgrad"
    """Diffusion-QL's Q gradient (`qgrad`) or Uni-O4's clipped ratio (`bppo`)"""
    improvement_steps: int = 2000
    """gradient steps of every improved copy"""
    ope_every: int = 250
    """the gate scores the copy every this many steps"""
    gate_confidence: float = 0.95
    """confidence of the lower bound on a snapshot's gain (0: the gain)"""
    gate_margin: float = 0.02
    """keep a snapshot if that bound exceeds this fraction of the kept score"""
    q_weight: float = 0.05
    """qgrad: weight of -Q / mean|Q| beside the diffusion loss"""
    init_checkpoint: str | None = None
    """skip the loop: improve the networks of this checkpoint"""

    # Evaluation, logging, checkpoint
    eval_every: int = 10_000
    """evaluate every sub-policy in the environment every this many steps"""
    eval_episodes: int = 5
    """episodes per sub-policy and evaluation"""
    checkpoint_path: str | None = None
    """where to write the checkpoint (default: runs/{run_name}/offline.pt)"""
    resume: str | None = None
    """continue the interrupted run of this checkpoint, with its arguments"""


# Fixed settings (reasons in docs/design.md): Uni-O4's expectile, IQL's Polyak rate, MOBILE's dynamics
# learning rate, MOPO's penalty lambda, the augmentation filter, bppo's clip and KL weight.
MAX_GRAD_NORM = 1.0
CRITIC_LEARNING_RATE, EXPECTILE, CRITIC_TARGET_RATE = 3e-4, 0.7, 0.005
DYNAMICS_LEARNING_RATE, ELITE_EVERY = 1e-3, 1000  # elites re-chosen on real hold-out data
OPE_PENALTY = 1.0  # lambda: the gate's AM-Q is Q minus lambda x the model's uncertainty-to-go
AUGMENT_HORIZON, AUGMENT_KL_QUANTILE = 20, 0.9  # model steps per augmentation; the filter's quantile
IMPROVEMENT_LEARNING_RATE = {"bppo": 3e-5, "qgrad": 1e-4}
BPPO_CLIP, BPPO_KL_COEF = 0.25, 0.1  # Uni-O4's ratio clip; weight of the sequence-level KL
DISAGREEMENT_BATCH, REPULSION_MARGIN = 64, 0.05  # J's states per step; own-sequence: no push beyond
DIVERGENCE_STATES, LOG_EVERY = 256, 1000  # states of the logged divergence; TensorBoard every


# `--paper-scale`: the paper's budgets (Uni-O4's 400k steps, the U-Net); flags given beside it still win.
PAPER_SCALE = {"denoiser": "unet", "total_steps": 400_000, "eval_every": 50_000, "eval_episodes": 10}
PAPER_SCALE |= {"dynamics_warmup": 50_000, "augment_every": 50_000, "improvement_steps": 10_000, "ope_every": 1000}


# Every numeric flag's range (`eval.out_of_range`), far above every setting used: checked before any work.
RANGES = {
    **{"seed": eval.SEED_RANGE, "chunk_size": "[1, 64]", "history_size": "[1, 64]", "gamma": "(0, 1]"},
    **{"mlp_hidden": "[1, 4096]", "diffusion_steps": "[2, 1000]", "ddim_steps": "[1, 1000]", "tau": "(0, 1000]"},
    **{"n_subpolicies": "[1, 64]", "disagreement_coef": "[0, 1000]", "disagreement_every": "[1, 1000000]"},
    **{"total_steps": "[0, 10000000]", "batch_size": "[1, 65536]", "learning_rate": "(0, 1]", "eta": "[0, 10]"},
    **{"ope_states": "[1, 4096]", "ope_steps": "[1, 1000]", "augment_ratio": "[0, 100]"},
    **{"dynamics_warmup": "[0, 10000000]", "augment_every": "[1, 10000000]", "augment_starts": "[1, 10000000]"},
    **{"num_qualified": "[0, 64]", "improvement_steps": "[1, 1000000]", "ope_every": "[1, 1000000]"},
    **{"gate_confidence": "[0, 1)", "gate_margin": "[0, 1)", "q_weight": "[0, 1000000]"},
    **{"eval_every": "[1, 10000000]", "eval_episodes": "[1, 1000]"},
}


def check_args(args: Args) -> str | None:
    """The first bad argument, as a message naming the flag (None if all are valid)."""
    if (problem := eval.out_of_range(args, RANGES)) is not None:
        return problem
    if args.total_steps == 0 and args.init_checkpoint is None:
        return "--total-steps must be >= 1 (0 only with --init-checkpoint, which skips the loop)"
    if not args.ddim_steps <= args.diffusion_steps:
        return f"--ddim-steps must be at most --diffusion-steps ({args.diffusion_steps}), got {args.ddim_steps}"
    if args.eta > 0 and args.n_subpolicies > 1 and args.chunk_size < 3:
        return "the kinematic divergence needs --chunk-size >= 3 (an acceleration); use --eta 0 for shorter chunks"
    if args.num_qualified > 0 and not args.ope:
        return "the improvement stage needs the critics and the dynamics model: drop --no-ope or pass --num-qualified 0"
    if args.init_checkpoint is not None and not args.ope:
        return "--init-checkpoint runs the improvement stage, which needs --ope"
    if args.num_qualified > args.n_subpolicies:
        return f"--num-qualified ({args.num_qualified}) cannot exceed --n-subpolicies ({args.n_subpolicies})"
    if (problem := eval.unwritable("runs")) is not None:
        return f"runs/ (the TensorBoard logs and the default checkpoint folder) cannot be written: {problem}"
    return eval.check_output_file(
        "--checkpoint-path", args.checkpoint_path, {"--init-checkpoint": args.init_checkpoint}
    )


def parse_args(argv: list[str] | None = None) -> Args:
    """The command line; `--paper-scale` swaps the defaults before parsing."""
    argv = sys.argv[1:] if argv is None else argv
    defaults = Args(paper_scale=True, **PAPER_SCALE) if "--paper-scale" in argv else Args()
    return tyro.cli(Args, default=defaults, args=argv)


def policy_config(args: Args, obs_dim: int, act_dim: int) -> PolicyConfig:
    names = [field.name for field in fields(PolicyConfig) if hasattr(args, field.name)]
    return PolicyConfig(obs_dim=obs_dim, act_dim=act_dim, **{name: getattr(args, name) for name in names})


# The checkpoint's "history": one entry per evaluation (AM-Q and the model's error with --ope) or augmentation.
HISTORY_KEYS = ("step", "scores", "returns", "mean_divergence", "ope_scores", "ope_spearman", "augmentation")
HISTORY_KEYS += ("dynamics_holdout_mse", "dynamics_holdout_nll")


# ---- What the run trains on, and what it is evaluated against ------------------------------------------------------
def training_tensors(data: dict, policy: DiffusionPolicy, device: torch.device) -> dict:
    """`chunk_dataset`'s arrays on the device: states normalized (B, To, S), chunks in [-1, 1] (B, H, A),
    the raw one-step `transitions` of the dynamics model, raw histories for model rollouts."""
    to_device = functools.partial(torch.as_tensor, dtype=torch.float32, device=device)
    tensors = {"states": policy.normalize_states(to_device(data["states"])), "masks": to_device(data["mask"])}
    tensors["chunks"] = policy.scale_actions(to_device(data["chunks"])).clamp(-1, 1)
    tensors |= {"chunk_rewards": to_device(data["rewards"]), "dones": to_device(data["dones"])}
    tensors["next_states"] = policy.normalize_states(to_device(data["next_states"]))
    steps = (data["states"][:, -1], data["chunks"][:, 0], data["step_next_states"], data["step_rewards"])
    tensors["transitions"] = tuple(to_device(part) for part in steps)
    tensors["raw_histories"] = to_device(data["states"])
    tensors["episode_starts"] = to_device(data["states"][data["episode_start"]])
    return tensors


@dataclass
class ModelLearners:
    """The IQL critics and the dynamics ensemble (--ope), their optimizers and their own random stream
    (so that switching them on leaves the policy's training as it is without them)."""

    critics: ChunkCritics
    target_critics: ChunkCritics
    critic_optimizer: torch.optim.Optimizer
    dynamics: EnsembleDynamics
    dynamics_optimizer: torch.optim.Optimizer
    generator: torch.Generator


# ---- The learners' updates: each takes its batch, steps its optimizer and returns a log dict -----------------------
def policy_update(policy, optimizer, scheduler, tensors: dict, batch, step: int, args: Args) -> dict:
    """One step of the multi-seed diffusion policy (paper part 2): the diffusion loss plus, every
    --disagreement-every steps, the disagreement term of the sub-policy objective

        J(pi_i) = E[log pi_i] + alpha * E[log pi_i - max_{j != i} log pi_j]     (alpha = --disagreement-coef)

    The diffusion loss maximizes J's first term (through its bound); the disagreement term is read on
    the dataset's sequence or each sub-policy's own (--j-reading), through the DDIM chain."""
    states, chunks, masks = tensors["states"][batch], tensors["chunks"][batch], tensors["masks"][batch]
    losses = {"diffusion": policy.loss(states, chunks, masks)}
    if args.disagreement_coef > 0 and args.n_subpolicies > 1 and step % args.disagreement_every == 0:
        sub_batch = slice(0, DISAGREEMENT_BATCH)
        subpolicy_chunks = policy.sample(states[sub_batch]).actions
        if args.j_reading == "dataset-sequence":
            _, disagreement = subpolicy_terms(subpolicy_chunks, chunks[sub_batch], masks[sub_batch], std=1.0)
        else:
            disagreement = own_sequence_repulsion(subpolicy_chunks, 1.0, REPULSION_MARGIN)
        losses["subpolicy"] = -args.disagreement_coef * disagreement.mean()
    eval.check_finite(losses, f"step {step}")
    optimizer.zero_grad()
    sum(losses.values()).backward()
    torch.nn.utils.clip_grad_norm_(policy.parameters(), MAX_GRAD_NORM)
    optimizer.step()
    scheduler.step()
    return {name: value.item() for name, value in losses.items()}


def critic_update(models: ModelLearners, tensors: dict, step: int, args: Args) -> dict:
    """Chunk-level IQL: Q(s_t, a_{t:t+H}) towards R_t^H + gamma^L (1 - done) V(s_{t+L}), V(s_t) by
    expectile regression on the target Q (the current state, not the history); then Polyak."""
    generator = models.generator
    rows = torch.randint(len(tensors["chunks"]), (args.batch_size,), device=generator.device, generator=generator)
    batch = {"states": tensors["states"][rows, -1], "chunks": tensors["chunks"][rows], "dones": tensors["dones"][rows]}
    batch |= {"rewards": tensors["chunk_rewards"][rows], "next_states": tensors["next_states"][rows, -1]}
    batch["chunk_lengths"] = tensors["masks"][rows].sum(1)
    losses = iql_losses(models.critics, models.target_critics, batch, args.gamma, EXPECTILE)
    losses = {"critic_q": losses["q"], "critic_v": losses["value"]}
    eval.check_finite(losses, f"step {step}")
    models.critic_optimizer.zero_grad()
    (losses["critic_q"] + losses["critic_v"]).backward()
    models.critic_optimizer.step()
    soft_update(models.target_critics, models.critics, CRITIC_TARGET_RATE)
    return {name: value.item() for name, value in losses.items()}


def dynamics_update(models: ModelLearners, real: tuple, augmented: dict, train_index, step: int, args: Args) -> dict:
    """The dynamics ensemble's Gaussian NLL -E log T(s'|s, a) on real and augmented transitions mixed
    in proportion to their sizes (paper part 3)."""
    synthetic = (augmented["states"], augmented["actions"], augmented["next_states"], augmented["rewards"])
    batch = mixed_batch(real, synthetic, train_index, args.batch_size, models.generator)
    losses = {"dynamics": models.dynamics.loss(*batch)}
    eval.check_finite(losses, f"step {step}")
    models.dynamics_optimizer.zero_grad()
    losses["dynamics"].backward()
    models.dynamics_optimizer.step()
    return {"dynamics": losses["dynamics"].item()}


def improvement_update(policy, reference, optimizer, critics, tensors, sub_policy: int, step: int, args: Args) -> dict:
    """One step of the improvement operator for one sub-policy: `qgrad` (Diffusion-QL's Q gradient through
    the DDIM chain) or `bppo` (Uni-O4's clipped ratio against `reference`, the gate's last kept snapshot)."""
    batch = torch.randint(len(tensors["chunks"]), (args.batch_size,), device=tensors["chunks"].device)
    states, chunks, masks = tensors["states"][batch], tensors["chunks"][batch], tensors["masks"][batch]
    if args.improvement == "bppo":
        advantage_fn = lambda chunk: critics.q(states[:, -1], chunk) - critics.value(states[:, -1])
        out = bppo_loss(policy, reference, states, sub_policy, advantage_fn, BPPO_CLIP, BPPO_KL_COEF)
    else:
        q_fn = lambda chunk: critics.q(states[:, -1], chunk)
        out = qgrad_loss(policy, states, chunks, masks, sub_policy, q_fn, args.q_weight)
    eval.check_finite({args.improvement: out["loss"]}, f"improvement of sub-policy {sub_policy}, step {step}")
    optimizer.zero_grad()
    out["loss"].backward()
    torch.nn.utils.clip_grad_norm_(policy.parameters(), MAX_GRAD_NORM)
    optimizer.step()
    return {name: value.float().mean().item() for name, value in out.items()}


def augment_now(step: int, args: Args) -> bool:
    """First after the warm-up on real data, then every --augment-every (not at the last step)."""
    due = (step - args.dynamics_warmup) % args.augment_every == 0
    return args.augment_ratio > 0 and args.dynamics_warmup <= step < args.total_steps and due


@torch.no_grad()
def refresh_augmentation(policy, models: ModelLearners, holdout: tuple, raw_histories, is_terminal, args: Args):
    """Diffusion augmentation (paper part 3): a fresh buffer of model transitions driven by the sub-policies
    (start b by sub-policy b mod n), kept while the ensemble disagreement stays below epsilon."""
    epsilon = disagreement_threshold(models.dynamics, holdout[0], holdout[1], AUGMENT_KL_QUANTILE)
    device, generator = raw_histories.device, models.generator
    index = torch.randint(len(raw_histories), (args.augment_starts,), device=device, generator=generator)
    rows = torch.arange(args.augment_starts, device=device)
    chunk_policy = SubPolicyOPE.chunk_policy(policy, rows % args.n_subpolicies, rows)
    starts, size = raw_histories[index], int(args.augment_ratio * len(raw_histories))
    model_parts = (models.dynamics, is_terminal, starts, AUGMENT_HORIZON, epsilon, size, generator)
    return diffusion_augmentation(chunk_policy, *model_parts), epsilon


# ---- Scoring sub-policies: AM-Q in the model (offline, decides) and the real environment (reported) ----------------
@dataclass
class SubPolicyOPE:
    """AM-Q of one sub-policy (`dynamics.am_q_rollouts`) or its return in the model (`returns`): its chunks
    rolled through the elites from fixed starts with fixed model noise (`seed`). All n sub-policies are
    sampled together (the perturbation couples them) and the column of `sub_policy` is kept."""

    critics: ChunkCritics
    dynamics: EnsembleDynamics
    is_terminal: object  # the task's termination rule on raw next states
    start_histories: torch.Tensor  # (N, To, S) raw dataset state histories
    rollout_steps: int
    seed: int
    gamma: float

    @staticmethod
    def chunk_policy(model: DiffusionPolicy, sub_policy, rows=slice(None)):
        """Raw histories -> the chunks of `sub_policy` (per row where it is a tensor), environment units."""
        sample = lambda histories: model.sample(model.normalize_states(histories)).actions[rows, sub_policy]
        return lambda histories: model.unscale_actions(sample(histories))

    @torch.no_grad()
    def rollouts(self, model: DiffusionPolicy, sub_policy: int, uncertainty_penalty: float = 0.0):
        q_function = lambda states, chunks: self.critics.q(model.normalize_states(states), model.scale_actions(chunks))
        policy = self.chunk_policy(model, sub_policy)
        return am_q_rollouts(policy, q_function, *self.model_parts(), uncertainty_penalty, self.gamma)

    def model_parts(self) -> tuple:
        generator = torch.Generator(device=self.start_histories.device).manual_seed(self.seed)
        return self.dynamics, self.is_terminal, self.start_histories, self.rollout_steps, generator

    @torch.no_grad()
    def returns(self, model: DiffusionPolicy, sub_policy: int) -> torch.Tensor:
        return model_returns(self.chunk_policy(model, sub_policy), *self.model_parts())

    @torch.no_grad()
    def scores(self, model: DiffusionPolicy, holdout: tuple) -> dict:
        """Plain AM-Q of every sub-policy after re-choosing the elites on the real hold-out; their error."""
        holdout_mse = self.dynamics.select_elites(*holdout)
        elites = self.dynamics.elite_indices
        return {
            "dynamics_holdout_mse": holdout_mse[elites].mean().item(),
            "dynamics_holdout_nll": self.dynamics.member_nll(*holdout)[elites].mean().item(),
            "ope_scores": [am_q_ratio(*self.rollouts(model, i)).item() for i in range(model.config.n_subpolicies)],
        }


def offline_models(args: Args, config: PolicyConfig, tensors: dict, is_terminal, device):
    """--ope: the critics and the dynamics ensemble (seed + 1), the real hold-out split for the elites,
    the AM-Q evaluator and the empty augmentation buffer."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(args.seed + 1)
        critics = ChunkCritics(config.obs_dim, config.act_dim, args.chunk_size).to(device)
        model = EnsembleDynamics(config.obs_dim, config.act_dim).to(device)
    critic_optimizer = torch.optim.Adam(critics.parameters(), lr=CRITIC_LEARNING_RATE)
    dynamics_optimizer = torch.optim.Adam(model.parameters(), lr=DYNAMICS_LEARNING_RATE)
    generator = torch.Generator(device=device).manual_seed(args.seed + 1)
    models = ModelLearners(critics, copy.deepcopy(critics), critic_optimizer, model, dynamics_optimizer, generator)
    num_chunks = len(tensors["chunks"])
    split_generator = torch.Generator().manual_seed(args.seed + 1)
    train_index, holdout_index = (index.to(device) for index in holdout_split(num_chunks, split_generator))
    holdout = tuple(part[holdout_index] for part in tensors["transitions"])
    model.set_input_statistics(tensors["transitions"][0][train_index], tensors["transitions"][1][train_index])
    # AM-Q start states: fixed dataset state histories (raw units), fixed model noise.
    ope_index = torch.randperm(num_chunks, generator=split_generator)[: args.ope_states].to(device)
    starts = tensors["raw_histories"][ope_index]
    ope = SubPolicyOPE(critics, model, is_terminal, starts, args.ope_steps, args.seed + 2, args.gamma)
    empty = (part[:0] for part in tensors["transitions"])
    augmented = dict(zip(("states", "actions", "next_states", "rewards"), empty))
    return models, train_index, holdout, ope, augmented


def choice_evaluator(ope: SubPolicyOPE, tensors: dict, args: Args, time_limit: int) -> SubPolicyOPE:
    """The offline choice's evaluator: `ope`'s model, rolled for one time limit from --ope-states episode starts."""
    generator = torch.Generator().manual_seed(args.seed + 3)
    index = torch.randperm(len(tensors["episode_starts"]), generator=generator)[: args.ope_states]
    starts = tensors["episode_starts"][index.to(tensors["episode_starts"].device)]
    return SubPolicyOPE(ope.critics, ope.dynamics, ope.is_terminal, starts, time_limit, args.seed + 3, args.gamma)


def log_evaluation(writer, record: dict, step: int, history: dict) -> None:
    """An evaluation: printed, written to TensorBoard and appended to the checkpoint's `history`."""
    for key, value in {"step": step, **record}.items():
        history[key].append(value)
    scores = np.array(record["scores"]).mean(1)
    for i, score in enumerate(scores):
        writer.add_scalar(f"charts/normalized_score_sub_policy_{i}", score, step)
    writer.add_scalar("charts/normalized_score_mean", scores.mean(), step)
    writer.add_scalar("charts/normalized_score_best", scores.max(), step)
    writer.add_scalar("charts/mean_pairwise_divergence", record["mean_divergence"], step)
    tqdm.write(
        f"eval step {step}: normalized score per sub-policy "
        f"[{', '.join(f'{s:.1f}' for s in scores)}] mean {scores.mean():.1f} best {scores.max():.1f}; "
        f"mean pairwise divergence {record['mean_divergence']:.3f}"
    )
    if "ope_scores" in record:
        ope = np.array(record["ope_scores"])
        writer.add_scalar("charts/ope_spearman", record["ope_spearman"], step)
        writer.add_scalar("losses/dynamics_holdout_mse", record["dynamics_holdout_mse"], step)
        writer.add_scalar("losses/dynamics_holdout_nll", record["dynamics_holdout_nll"], step)
        tqdm.write(
            f"  AM-Q per sub-policy [{', '.join(f'{q:.1f}' for q in ope)}]; Spearman with real scores "
            f"{record['ope_spearman']:.2f}; AM-Q's pick: sub-policy {int(ope.argmax())} "
            f"(real {scores[ope.argmax()]:.1f}); dynamics hold-out NLL {record['dynamics_holdout_nll']:.3f}"
        )


# ---- Progress, checkpoints and the state --resume needs ------------------------------------------------------------
class LossMeans:
    """Each loss's mean since the last `log`: written to TensorBoard under `prefix` and shown on the bar."""

    def __init__(self, writer, prefix: str):
        self.writer, self.prefix, self.sums, self.counts = writer, prefix, {}, {}

    def add(self, logs: dict) -> None:
        for name, value in logs.items():
            self.sums[name], self.counts[name] = self.sums.get(name, 0.0) + value, self.counts.get(name, 0) + 1

    def log(self, step: int, progress) -> None:
        means = {name: self.sums[name] / self.counts[name] for name in self.sums}
        for name, value in means.items():
            self.writer.add_scalar(f"{self.prefix}/{name}", value, step)
        progress.set_postfix({name: f"{value:.4f}" for name, value in means.items()}, refresh=False)
        self.sums, self.counts = {}, {}


def training_state(step, run_name, optimizer, scheduler, models, augmented, device) -> dict:
    """What --resume needs to continue after `step` as if never stopped: optimizers, buffer, random streams."""
    state = {"step": step, "run_name": run_name, "optimizer": optimizer.state_dict()}
    state["scheduler"] = scheduler.state_dict()
    if models is not None:
        state |= {"target_critics": models.target_critics.state_dict(), "model_generator": models.generator.get_state()}
        state |= {"critic_optimizer": models.critic_optimizer.state_dict(), "augmented": augmented}
        state["dynamics_optimizer"] = models.dynamics_optimizer.state_dict()
    return state | eval.rng_state(device)


def write_checkpoint(path, step, args, task: dict, policy, models, history, improved, resume) -> None:
    """The atomic checkpoint (docs/design.md); never a non-finite one: the run stops, the previous one stays."""
    tensors = [*policy.state_dict().values()] + [t for e in improved for t in e["policy"]["state_dict"].values()]
    if models is not None:
        tensors += [*models.critics.state_dict().values(), *models.dynamics.state_dict().values()]
    scores = (history["scores"][-1:] + [e["scores"] for e in improved]) if history["scores"] else []
    finite = all(torch.isfinite(t).all() for t in tensors if t.is_floating_point())
    if not (finite and all(np.isfinite(np.asarray(row, dtype=float)).all() for row in scores)):
        problem = "a network's parameters or the evaluation are not finite"
        eval.fail(f"step {step}: {problem}; stopped without saving ({path})")
    model_parts = {}
    if models is not None:
        sizes = {name: getattr(policy.config, name) for name in ("obs_dim", "act_dim", "chunk_size")}
        model_parts["critics"] = {"config": sizes, "state_dict": models.critics.state_dict()}
        model = models.dynamics
        model_parts["dynamics"] = {"config": model.constructor_kwargs(), "state_dict": model.state_dict()}
    run = {"args": asdict(args), "step": step, **task, "policy": policy.to_checkpoint(), "history": history}
    eval.save_checkpoint(run | {"improved": improved, **model_parts, "resume": resume}, path)
    tqdm.write(f"checkpoint: {path}")


def evaluate(policy, task: dict, args: Args, divergence_states, ope, holdout) -> dict:
    """Real scores (reported only), mean pairwise divergence and, with --ope, AM-Q and its rank correlation."""
    policy.eval()
    with torch.no_grad():
        record = {"mean_divergence": mean_pairwise_divergence(policy.sample(divergence_states).actions).mean().item()}
    result = eval.evaluate_saved_task(policy, task, args.eval_episodes, args.seed)  # reported, never used to decide
    record.update(scores=result["scores"].tolist(), returns=result["returns"].tolist())
    if ope is not None:
        record.update(ope.scores(policy, holdout))
        ope_scores, scores = np.array(record["ope_scores"]), result["scores"].mean(1)
        ranked = args.n_subpolicies > 2  # a rank correlation of 2 is always +-1
        record["ope_spearman"] = eval.spearman_correlation(ope_scores, scores) if ranked else float("nan")
    policy.train()
    return record


def improve_sub_policy(policy, sub_policy: int, models, ope, tensors, args: Args, writer):
    """Improvement of one qualified sub-policy: a copy of the whole policy improved for `sub_policy` by
    --improvement under the gate (`dynamics.BestSnapshot`: every --ope-every steps, penalized AM-Q; a
    snapshot is kept only for a confident gain). Returns the copy at its best kept snapshot, and the gate."""
    improved_policy = copy.deepcopy(policy)
    reference = copy.deepcopy(policy).requires_grad_(False)  # bppo: pi_ref, moved only by the gate
    learning_rate = IMPROVEMENT_LEARNING_RATE[args.improvement]
    optimizer = torch.optim.Adam(improved_policy.parameters(), lr=learning_rate)
    start = ope.rollouts(improved_policy, sub_policy, OPE_PENALTY)
    gate = BestSnapshot(improved_policy, start, step=0, confidence=args.gate_confidence, margin=args.gate_margin)
    print(f"sub-policy {sub_policy}: gated OPE at the start {gate.best_score:.1f}")
    means, critics = LossMeans(writer, f"improvement_{sub_policy}"), models.critics
    progress = tqdm(range(1, args.improvement_steps + 1), f"improving sub-policy {sub_policy}", **eval.BAR)
    for step in progress:
        means.add(improvement_update(improved_policy, reference, optimizer, critics, tensors, sub_policy, step, args))
        if step % LOG_EVERY == 0 or step % args.ope_every == 0 or step == args.improvement_steps:
            means.log(step, progress)
        if step % args.ope_every == 0 or step == args.improvement_steps:
            required = args.gate_margin * abs(gate.best_score)  # what the gain's lower bound must exceed
            accepted = gate.offer(improved_policy, ope.rollouts(improved_policy, sub_policy, OPE_PENALTY), step)
            _, score, _, lower_bound = gate.history[-1]
            if accepted and args.improvement == "bppo":
                reference.load_state_dict(improved_policy.state_dict())
            writer.add_scalar(f"improvement_{sub_policy}/gated_ope", score, step)
            tqdm.write(
                f"  sub-policy {sub_policy} step {step}: gated OPE {score:.1f}, gain bound {lower_bound:+.1f} "
                f"(needs > {required:+.1f}: {'kept' if accepted else 'rejected'}; best {gate.best_score:.1f} "
                f"at step {gate.best_step})"
            )
    gate.restore(improved_policy)
    improved_policy.eval()
    return improved_policy, gate


def init_checkpoint(args: Args, task: dict, state_mean, action_space) -> dict:
    """--init-checkpoint, refused unless it is a --ope run of this dataset with these policy settings."""
    try:
        saved = eval.load_checkpoint(args.init_checkpoint, expected_gym_id=task["gym_id"], phase="offline")
    except eval.CheckpointError as error:
        eval.fail(str(error))
    config = asdict(policy_config(args, obs_dim=state_mean.shape[0], act_dim=action_space.shape[0]))
    if saved["dataset_id"] != task["dataset_id"] or "critics" not in saved or saved["policy"]["config"] != config:
        eval.fail(
            f"{args.init_checkpoint} is not a --ope checkpoint of {task['dataset_id']} with these policy settings "
            f"(it has {saved['dataset_id']}, policy {saved['policy']['config']}); pass the arguments it was "
            "trained with"
        )
    return saved


def resumed_run(args: Args) -> tuple[Args, dict | None]:
    """--resume: the run's own arguments and its checkpoint (with the loop's training state)."""
    if args.resume is None:
        return args, None
    try:
        resumed = eval.load_checkpoint(args.resume, phase="offline")
    except eval.CheckpointError as error:
        eval.fail(str(error))
    if eval.unfinished_stage(resumed) is None:
        eval.fail(f"{args.resume} is a finished run: nothing to resume (its checkpoint is the result)")
    if not resumed.get("resume"):
        eval.fail(
            f"{args.resume} holds no training state to resume from (an improvement-only run, or an older "
            "version): run its command again"
        )
    try:
        args = Args(**{**resumed["args"], "resume": args.resume, "checkpoint_path": args.resume})
    except TypeError as error:
        eval.fail(f"{args.resume} was written by another version of this script ({error}); run its command again")
    print(f"resuming {args.resume} after step {resumed['resume']['step']} with the arguments saved in it")
    return args, resumed


# ---- The run's inputs and its stages, out of the main block's way --------------------------------------------------
def load_task(args: Args):
    """The dataset, the `task` it was recorded on (checkpoint fields) and its termination rule (with --ope)."""
    try:
        dataset, dataset_id, ref_min_score, ref_max_score = eval.load_dataset(args.env_id, args.dataset_id)
    except eval.DatasetError as error:
        eval.fail(str(error))
    if (problem := eval.spaces_problem(dataset_id, dataset.observation_space, dataset.action_space)) is not None:
        eval.fail(problem)
    spec = dataset.spec.env_spec
    task = {"gym_id": spec.id, "dataset_id": dataset_id, "max_episode_steps": spec.max_episode_steps}
    task |= {"ref_min_score": ref_min_score, "ref_max_score": ref_max_score}
    is_terminal = None
    if args.ope:
        try:  # the model's rollouts (AM-Q) need the task's termination rule
            is_terminal = termination_fn(task_of_gym_id(task["gym_id"]))
        except ValueError as error:
            eval.fail(str(error))
    return dataset, task, is_terminal


def read_chunks(dataset, task: dict, args: Args, device) -> dict:
    """`chunk_dataset`, a dataset that cannot be read ending the script in one line."""
    try:
        data = eval.chunk_dataset(dataset, args.chunk_size, args.history_size, args.gamma)
        shapes = f"{len(data['chunks'])} chunks, obs {data['all_states'].shape[1]}, act {data['chunks'].shape[2]}"
        print(f"{task['dataset_id']}: {dataset.total_episodes} episodes, {shapes}, device {device}")
        return data
    except eval.DatasetError as error:
        eval.fail(str(error))
    except (OSError, KeyError, ValueError) as error:  # a truncated or damaged file inside the dataset
        problem = f"{type(error).__name__}: {error}"
        eval.fail(f"dataset {task['dataset_id']!r} could not be read ({problem}); download it again")


def restore_loop(resumed: dict, policy, optimizer, scheduler, models, device):
    """--resume: every state the loop carries, as after the saved step; returns (history, first step, buffer, state)."""
    resume = resumed["resume"]
    policy.load_state_dict(resumed["policy"]["state_dict"])
    optimizer.load_state_dict(resume["optimizer"])
    scheduler.load_state_dict(resume["scheduler"])
    augmented = {}
    if models is not None:
        models.critics.load_state_dict(resumed["critics"]["state_dict"])
        models.target_critics.load_state_dict(resume["target_critics"])
        models.dynamics.load_state_dict(resumed["dynamics"]["state_dict"])
        models.critic_optimizer.load_state_dict(resume["critic_optimizer"])
        models.dynamics_optimizer.load_state_dict(resume["dynamics_optimizer"])
        models.generator.set_state(resume["model_generator"])
        augmented = resume["augmented"]
    eval.set_rng_state(resume, device)
    return resumed["history"], resume["step"] + 1, augmented, resume


def improved_entry(sub_policy, improved_policy, gate, returns, scores, history: dict, args) -> dict:
    """One improved copy as the checkpoint keeps it (its real scores reported only)."""
    base_ope, base_scores = history["ope_scores"][-1][sub_policy], np.mean(history["scores"][-1][sub_policy])
    print(
        f"sub-policy {sub_policy}: kept step {gate.best_step} (gated OPE {gate.history[0][1]:.1f} -> "
        f"{gate.best_score:.1f}; model return {returns.mean():.1f}); real normalized score "
        f"{base_scores:.1f} -> {scores.mean():.1f}"
    )
    entry = {"sub_policy": sub_policy, "operator": args.improvement, "policy": improved_policy.to_checkpoint()}
    entry |= {"ope_history": gate.history, "ope_rollouts": [part.cpu() for part in gate.best_rollouts]}
    entry |= {"ope_score": gate.best_score, "best_step": gate.best_step, "base_ope_score": float(base_ope)}
    entry |= {"base_score": float(base_scores), "model_returns": returns.cpu()}
    return entry | {"model_return": returns.mean().item(), "scores": scores.tolist()}


def offline_choice(improved: list[dict], args: Args) -> None:
    """The offline choice: the copies compared by their return in the model by the gate's rule (an untrusted
    gain is a tie, won by the higher base AM-Q). Puts the chosen copy first and ranks them all."""
    returns = [(entry["model_returns"], torch.ones_like(entry["model_returns"])) for entry in improved]
    choice, comparisons = confident_choice(returns, args.gate_confidence, args.gate_margin)
    for index, gain, lower_bound, required in comparisons:
        verdict = "it replaces it" if lower_bound > required else "not a trusted gain: a tie, the earlier stays"
        print(
            f"offline choice: sub-policy {improved[index]['sub_policy']} vs the choice so far: model return gain "
            f"{gain:+.1f}, lower bound {lower_bound:+.1f}, needs > {required:+.1f} ({verdict})"
        )
    improved.insert(0, improved.pop(choice))
    for rank, entry in enumerate(improved):
        entry["choice_rank"] = rank
    chosen, step = improved[0]["sub_policy"], improved[0]["best_step"]
    unimproved = " (unimproved)" if step == 0 else ""
    print(f"offline choice: sub-policy {chosen}, its copy as kept at step {step}{unimproved}")
    print("| sub-policy | AM-Q | real before | gated OPE start -> kept (step) | model return | real after |")
    print("|-|-|-|-|-|-|")
    for e in improved:
        before = f"{e['sub_policy']} | {e['base_ope_score']:.1f} | {e['base_score']:.1f} | {e['ope_history'][0][1]:.1f}"
        after = f"{e['ope_score']:.1f} ({e['best_step']}) | {e['model_return']:.1f} | {np.mean(e['scores']):.1f}"
        print(f"| {before} -> {after} |")


if __name__ == "__main__":
    args, resumed = resumed_run(parse_args())
    if (problem := check_args(args)) is not None:
        eval.fail(problem)
    dataset, task, is_terminal = load_task(args)

    # TRY NOT TO MODIFY: seeding
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    torch.backends.cudnn.deterministic = args.torch_deterministic
    device = torch.device("cuda" if torch.cuda.is_available() and args.cuda else "cpu")
    if device.type == "cpu" and (args.denoiser == "unet" or args.total_steps > 100_000):
        print("warning: the U-Net or a paper-scale budget is sized for a GPU; the defaults are the CPU setting")

    # ---- data: chunks (s_t, a_{t:t+H}, R_t^H, s_{t+H}), masks, frozen state statistics ----------
    data = read_chunks(dataset, task, args, device)
    state_mean, state_std = eval.state_statistics(data["all_states"])
    action_space = dataset.action_space
    saved = None if args.init_checkpoint is None else init_checkpoint(args, task, state_mean, action_space)
    env_name = args.env_id if args.dataset_id is None else task["dataset_id"].replace("/", "-")
    how = "continue with --resume {path}"
    run_name, checkpoint_path, writer = eval.start_run(args, env_name, resumed, "offline.pt", how)

    # ---- the multi-seed diffusion policy: n fixed noise seeds = n sub-policies (paper part 1) ----
    config = policy_config(args, obs_dim=state_mean.shape[0], act_dim=action_space.shape[0])
    policy = DiffusionPolicy(config, state_mean, state_std, action_space.low, action_space.high).to(device)
    optimizer = torch.optim.Adam(policy.parameters(), lr=args.learning_rate)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=args.total_steps)
    tensors = training_tensors(data, policy, device)
    num_chunks = len(tensors["chunks"])
    divergence_states = tensors["states"][torch.randperm(num_chunks, device=device)[:DIVERGENCE_STATES]]

    # ---- chunk-level IQL critics and the dynamics ensemble (--ope), on their own random stream --
    models = ope = holdout = train_index = None
    augmented = {}
    if args.ope:
        models, train_index, holdout, ope, augmented = offline_models(args, config, tensors, is_terminal, device)
    history = {key: [] for key in HISTORY_KEYS}
    improved = []  # the improved copies (phase 2)
    resume = None  # the loop's training state at its last evaluation (`training_state`)

    if args.init_checkpoint is None:
        # ---- phase 1: the offline loop (docs/design.md, "The offline loop, critics and improvement")
        first_step = 1
        if resumed is not None:
            history, first_step, augmented, resume = restore_loop(resumed, policy, optimizer, scheduler, models, device)
        means = LossMeans(writer, "losses")
        progress = tqdm(range(first_step, args.total_steps + 1), "offline loop", initial=first_step - 1, **eval.BAR)
        progress.total = args.total_steps
        for step in progress:
            # the diffusion loss + J's disagreement term (part 2); IQL critics; the dynamics model (part 3)
            batch = torch.randint(num_chunks, (args.batch_size,), device=device)
            try:
                logs = policy_update(policy, optimizer, scheduler, tensors, batch, step, args)
                if args.ope:
                    logs |= critic_update(models, tensors, step, args)
                    logs |= dynamics_update(models, tensors["transitions"], augmented, train_index, step, args)
            except eval.NonFiniteLoss as error:
                last = checkpoint_path if history["step"] else "none yet"
                eval.fail(f"{error}; stopped (the last checkpoint is untouched: {last})")
            means.add(logs)
            # diffusion augmentation of the dynamics model's data (part 3), elites on real hold-out data
            refresh = args.ope and augment_now(step, args)
            if refresh or (args.ope and step % ELITE_EVERY == 0):
                models.dynamics.select_elites(*holdout)
            if refresh:
                policy.eval()
                augmented, epsilon = refresh_augmentation(
                    policy, models, holdout, tensors["raw_histories"], is_terminal, args
                )
                policy.train()
                size = len(augmented["states"])
                history["augmentation"].append((step, size, epsilon))
                writer.add_scalar("charts/augmentation_size", size, step)
                tqdm.write(f"augmentation at step {step}: {size} synthetic transitions (epsilon {epsilon:.3f})")
            if step % LOG_EVERY == 0 or step == args.total_steps:
                means.log(step, progress)
                writer.add_scalar("charts/learning_rate", scheduler.get_last_lr()[0], step)
                writer.add_scalar("charts/SPS", progress.format_dict["rate"] or 0.0, step)
            # evaluation: real scores (reported only), divergence, AM-Q; the checkpoint and --resume state
            if step % args.eval_every == 0 or step == args.total_steps:
                log_evaluation(writer, evaluate(policy, task, args, divergence_states, ope, holdout), step, history)
                resume = training_state(step, run_name, optimizer, scheduler, models, augmented, device)
                write_checkpoint(checkpoint_path, step, args, task, policy, models, history, improved, resume)
    else:
        # ---- phase 1 ran in an earlier run (--init-checkpoint): take its networks, evaluate them --
        policy.load_state_dict(saved["policy"]["state_dict"])
        models.critics.load_state_dict(saved["critics"]["state_dict"])
        models.dynamics.load_state_dict(saved["dynamics"]["state_dict"])
        log_evaluation(writer, evaluate(policy, task, args, divergence_states, ope, holdout), saved["step"], history)
        write_checkpoint(checkpoint_path, saved["step"], args, task, policy, models, history, improved, resume)
        # The loop's random stream where it stopped (same seed): the same copies as the one-command run.
        if saved.get("resume") and saved["args"]["seed"] == args.seed:
            eval.set_rng_state(saved["resume"], device)

    # ---- phase 2: improvement of the best sub-policies by AM-Q under the gate, then the offline choice ----
    if args.num_qualified > 0:
        models.critics.requires_grad_(False)
        last_step, base_ope = history["step"][-1], np.array(history["ope_scores"][-1])
        qualified = [int(i) for i in np.argsort(-base_ope)[: args.num_qualified]]
        print(f"improvement ({args.improvement}): sub-policies {qualified} qualify by AM-Q")
        choice_ope = choice_evaluator(ope, tensors, args, task["max_episode_steps"] or 1000)
        for sub_policy in qualified:
            try:
                improved_policy, gate = improve_sub_policy(policy, sub_policy, models, ope, tensors, args, writer)
            except eval.NonFiniteLoss as error:
                eval.fail(f"{error}; stopped (the last checkpoint is untouched: {checkpoint_path})")
            returns = choice_ope.returns(improved_policy, sub_policy)
            scores = eval.evaluate_saved_task(improved_policy, task, args.eval_episodes, args.seed)["scores"]
            improved.append(
                improved_entry(sub_policy, improved_policy, gate, returns, scores[sub_policy], history, args)
            )
            write_checkpoint(checkpoint_path, last_step, args, task, policy, models, history, improved, resume)
        offline_choice(improved, args)
        write_checkpoint(checkpoint_path, last_step, args, task, policy, models, history, improved, resume)

    writer.close()
