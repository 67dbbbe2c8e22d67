"""UEPO offline phase (arXiv 2511.10087), CleanRL style: read top to bottom.

    python uepo_offline.py --env-id hopper-medium                  # the CPU setting (about 30 min, 2 cores)
    python uepo_offline.py --env-id hopper-medium --paper-scale    # the paper's budgets (GPU)

1. Data: a Minari dataset -> chunked transitions (s_t, a_{t:t+H}, R_t^H, s_{t+H}, done) with
   masks, states normalized with frozen dataset statistics.
2. One training loop over `--total-steps` gradient steps (docs/design.md, "The offline loop, critics and improvement"):
   - the diffusion loss of the multi-seed diffusion policy (diffusion.py) plus, every
     `--kl-every` steps, the sub-policy objective J(pi_i) of the divergence regularization
     (divergence.py); the adaptive perturbation acts inside the sampler;
   - the chunk-level IQL critics Q(s, a_{t:t+H}) and V(s) (dynamics.py);
   - the dynamics ensemble on batches that mix real transitions with the diffusion
     augmentation buffer, filled after `--dynamics-warmup` steps and refreshed every
     `--augment-every` steps (dynamics.py, paper component 3);
   - every `--eval-every` steps: the normalized score of every sub-policy on the real
     environment (reported, never used for a decision), their mean pairwise kinematic
     divergence, and their AM-Q scores.
3. Improvement, after the loop: the top `--num-qualified` sub-policies by AM-Q each get a copy
   of the policy, improved by `--improvement qgrad` or `bppo` under one gate that keeps the
   best snapshot by uncertainty-penalized AM-Q.
4. An atomic checkpoint under runs/{run_name}/offline.pt (rewritten at every evaluation and
   after every improved copy) that uepo_online.py and eval.py load.

Design choices are fixed in docs/design.md; measurements are in docs/experiments.md.
"""

import copy
import os
import random
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from typing import Literal

import gymnasium as gym
import minari
import numpy as np
import torch
import tyro
from torch.utils.tensorboard import SummaryWriter

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
    soft_update,
    task_of_env_id,
    termination_fn,
)
from eval import (
    CheckpointError,
    check_output_file,
    evaluate_sub_policies,
    fail,
    load_checkpoint,
    save_checkpoint,
    spearman_correlation,
    unwritable,
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
    """if toggled, start from the paper-scale budgets (`PAPER_SCALE`: U-Net, 400k steps; sized for a GPU)"""

    # Data
    env_id: str = "hopper-medium"
    """D4RL-style name `<env>-<quality>`, mapped to the Minari id `mujoco/<env>/<quality>-v0`"""
    dataset_id: str | None = None
    """any Minari dataset id (e.g. `D4RL/pen/human-v2`); overrides `--env-id`"""
    horizon: int = 4
    """H, actions per chunk: the diffusion policy models a_{t:t+H} (all H are executed, as DPPO does on Gym)"""
    obs_horizon: int = 2
    """conditioning states: the last `obs_horizon` states (the first one repeated at an episode start)"""
    gamma: float = 0.99
    """discount, used for the chunk reward R_t^H = sum_h gamma^h r_{t+h}"""

    # Diffusion policy
    denoiser: Literal["unet", "mlp"] = "mlp"
    """`mlp`: a small, fast MLP; `unet`: the paper's U-Net + Transformer cross-attention"""
    unet_dims: tuple[int, ...] = (128, 256)
    """channels of the U-Net levels (each level halves the chunk length)"""
    mlp_hidden: int = 256
    """width of the MLP denoiser's 3 hidden layers"""
    diffusion_steps: int = 20
    """K, DDPM training steps (cosine schedule)"""
    ddim_steps: int = 5
    """DDIM steps when sampling (a subsequence of the K training steps)"""
    n_subpolicies: int = 8
    """n fixed noise seeds = n sub-policies; 1 turns the multi-seed ensemble off"""
    noise_seed: int = 0
    """seed of the generator that draws the sub-policies' fixed noises"""
    min_std: float = 0.1
    """std of the action-level Gaussian around the deterministic chunk that bppo samples from (its likelihood ratios)"""

    # Divergence regularization
    tau: float = 0.7
    """divergence threshold: a sub-policy closer than tau to another one (min over partners) is perturbed.
    0.7 is about the median nearest divergence of unperturbed sub-policies on hopper-medium; with eta 0.1 it gave
    the best mean sub-policy score in the sweep (docs/experiments.md, "Choosing tau and eta")"""
    eta: float = 0.1
    """largest perturbation std (at divergence 0), in [-1, 1] action units; 0 turns the perturbation off.
    0.5 degraded every sub-policy in the sweep, 0.1-0.2 helped"""
    kl_coef: float = 0.1
    """alpha, weight of the disagreement term of the sub-policy objective J(pi_i) (Uni-O4's 0.1); 0 turns it off"""
    kl_every: int = 10
    """add the sub-policy objective to the loss every `kl_every` steps (it back-propagates through the DDIM chain)"""
    kl_batch_size: int = 64
    """states per sub-policy-objective step (a sub-batch of the diffusion batch)"""
    subpolicy_std: float = 1.0
    """std of the Gaussian surrogate pi_i = N(mu_i(s), std^2 I) in J(pi_i); it only scales the term"""
    j_reading: Literal["dataset-sequence", "own-sequence"] = "own-sequence"
    """the sequence J's disagreement term scores: the dataset's, or each sub-policy's own (a bounded repulsion)"""
    repulsion_margin: float = 0.05
    """own-sequence J: a sub-policy whose nearest partner is this far (half squared gap per entry) is not pushed"""

    # Optimization
    total_steps: int = 20_000
    """gradient steps of the offline loop"""
    batch_size: int = 256
    """chunks per gradient step"""
    learning_rate: float = 3e-4
    """Adam learning rate, cosine-annealed to 0 over the run"""
    max_grad_norm: float = 1.0
    """gradient clipping"""

    # Chunk-level critics and dynamics model: AM-Q offline policy evaluation of the sub-policies
    ope: bool = True
    """train the chunk-level IQL critics and the dynamics ensemble in the same loop and score every sub-policy
    with AM-Q at every evaluation (next to its real score); the improvement stage needs them. `--no-ope
    --num-qualified 0` trains the diffusion policy alone (diffusion BC and its ablations), about 4x faster on a CPU"""
    critic_learning_rate: float = 3e-4
    """Adam learning rate of the chunk-level IQL critics Q(s, a_{t:t+H}) and V(s)"""
    expectile: float = 0.7
    """IQL expectile of V on Q (Uni-O4's 0.7)"""
    critic_target_rate: float = 0.005
    """Polyak rate of the target Q (IQL's 0.005)"""
    dynamics_learning_rate: float = 1e-3
    """Adam learning rate of the dynamics ensemble (MOBILE's 1e-3 on Gym)"""
    elite_every: int = 1000
    """re-choose the dynamics elites on the real hold-out split every `elite_every` steps (and before every OPE)"""
    ope_states: int = 256
    """dataset start states of every AM-Q rollout batch"""
    ope_horizon: int = 400
    """environment steps of every AM-Q rollout (whole chunks; 100 chunks of H = 4)"""
    ope_penalty: float = 1.0
    """lambda of the gate's penalized AM-Q: Q minus lambda times the discounted uncertainty-to-go along the
    model rollout, u = norm of the elites' std of mean predictions (`dynamics.am_q_ope`, MOPO's penalty form).
    The improvement gate uses it; the ranking of the base sub-policies is plain AM-Q (Uni-O4)"""

    # Diffusion augmentation of the dynamics model's data (paper component 3)
    augment_ratio: float = 2.0
    """the augmentation buffer holds at most augment_ratio x |D| synthetic transitions; 0 turns augmentation off"""
    dynamics_warmup: int = 5000
    """steps of dynamics training on real data only before the buffer is first filled"""
    augment_every: int = 5000
    """refresh (replace) the augmentation buffer every `augment_every` steps after the warm-up"""
    augment_starts: int = 10_000
    """dataset start states per refresh; start b is rolled out by sub-policy b mod n, so all sub-policies contribute"""
    augment_horizon: int = 20
    """model steps per augmentation rollout (whole chunks; the KL filter usually stops them sooner far from the data)"""
    aug_kl_quantile: float = 0.9
    """epsilon of the KL filter = this quantile of the ensemble disagreement on real hold-out transitions"""

    # Improvement of the best sub-policies, after the loop (OPE-gated)
    num_qualified: int = 2
    """the top `num_qualified` sub-policies by AM-Q each get a copy of the denoiser to improve; 0 turns it off"""
    improvement: Literal["bppo", "qgrad"] = "qgrad"
    """`qgrad`: Diffusion-QL's diffusion loss + q_weight * normalized -Q through the deterministic chain;
    `bppo`: Uni-O4's clipped ratio of action-level Gaussian likelihoods N(mu_i(s), min_std^2) of the chunk on
    A = Q - V + the sequence-level KL to the reference"""
    improvement_steps: int = 500
    """gradient steps of every copy"""
    improvement_learning_rate: float | None = None
    """Adam learning rate of the copies; default 3e-5 for bppo (docs/design.md: at 1e-4 it collapsed within 1-3k steps
    without a gate, at 3e-5 it held) and 1e-4 for qgrad (its diffusion loss anchors it to the data)"""
    ope_every: int = 100
    """the gate: score the copy with the penalized AM-Q every `ope_every` steps"""
    clip_coef: float = 0.25
    """bppo: clip range of the likelihood ratio of the action-level Gaussian (Uni-O4's 0.25)"""
    improvement_kl_coef: float = 0.1
    """bppo: weight of the sequence-level KL of the copy's action-level Gaussian to its reference's"""
    gate_confidence: float = 0.95
    """the gate keeps a snapshot only if its OPE gain is above 0 at this one-sided confidence (0: any gain)"""
    q_weight: float = 0.05
    """qgrad: weight of -Q / mean|Q| (docs/design.md: 1.0 collapsed to 3, 0.05 reached 94.5 at 2k steps
    without a gate)"""
    init_checkpoint: str | None = None
    """skip the loop: take the policy, critics and dynamics from this checkpoint of the same dataset and
    settings, evaluate them, and run only the improvement stage (to compare operators without retraining)"""

    # Evaluation, logging, checkpoint
    eval_every: int = 10_000
    """evaluate every sub-policy on the real environment every `eval_every` steps (and at the end)"""
    eval_episodes: int = 5
    """episodes per sub-policy and evaluation"""
    action_steps: int | None = None
    """actions of each chunk executed in evaluation before re-planning (default: all H; fewer = receding horizon)"""
    divergence_states: int = 256
    """dataset states on which the mean pairwise divergence of the sub-policies is measured"""
    log_every: int = 1000
    """print progress and write TensorBoard scalars every `log_every` steps"""
    checkpoint_path: str | None = None
    """where to write the checkpoint (default: runs/{run_name}/offline.pt)"""
    resume: str | None = None
    """continue the interrupted run of this checkpoint, with its own arguments (other flags are ignored)"""


# The defaults above finish on a 2-core CPU (docs/experiments.md). `--paper-scale` starts from
# these budgets instead (Uni-O4's 400k behaviour-cloning steps, the paper's U-Net); flags given
# beside it still override them.
PAPER_SCALE = {
    "denoiser": "unet",
    "total_steps": 400_000,
    "eval_every": 50_000,
    "eval_episodes": 10,
    "dynamics_warmup": 50_000,
    "augment_every": 50_000,
    "improvement_steps": 10_000,
    "ope_every": 1000,
}


def check_args(args: Args) -> str | None:
    """The first argument out of its range, as a message naming the flag (None if all are valid):
    every check is made before any work starts. Comparisons are written so that NaN fails them."""
    flag = lambda name: f"--{name.replace('_', '-')}"
    at_least_one = (
        "horizon",
        "obs_horizon",
        "mlp_hidden",
        "n_subpolicies",
        "kl_every",
        "kl_batch_size",
        "total_steps",
        "batch_size",
        "elite_every",
        "ope_states",
        "ope_horizon",
        "augment_every",
        "augment_starts",
        "augment_horizon",
        "improvement_steps",
        "ope_every",
        "eval_every",
        "eval_episodes",
        "divergence_states",
        "log_every",
    )
    for name in at_least_one:
        if not getattr(args, name) >= 1 and not (name == "total_steps" and args.init_checkpoint is not None):
            return f"{flag(name)} must be >= 1, got {getattr(args, name)}"
    if not all(dim >= 1 for dim in args.unet_dims):
        return f"--unet-dims must all be >= 1, got {args.unet_dims}"
    if not args.diffusion_steps >= 2:
        return (
            f"--diffusion-steps must be >= 2 (a diffusion needs at least two noise levels), got {args.diffusion_steps}"
        )
    if not 1 <= args.ddim_steps <= args.diffusion_steps:
        return f"--ddim-steps must be between 1 and --diffusion-steps ({args.diffusion_steps}), got {args.ddim_steps}"
    for name in (
        "dynamics_warmup",
        "num_qualified",
        "kl_coef",
        "eta",
        "ope_penalty",
        "augment_ratio",
        "q_weight",
        "improvement_kl_coef",
    ):
        if not getattr(args, name) >= 0:
            return f"{flag(name)} must be >= 0, got {getattr(args, name)}"
    for name in (
        "tau",
        "min_std",
        "subpolicy_std",
        "repulsion_margin",
        "learning_rate",
        "max_grad_norm",
        "critic_learning_rate",
        "dynamics_learning_rate",
        "clip_coef",
        "improvement_learning_rate",
    ):
        value = getattr(args, name)
        if value is not None and not value > 0:
            return f"{flag(name)} must be > 0, got {value}"
    for name, low, high in (("gamma", 0, 1), ("critic_target_rate", 0, 1), ("aug_kl_quantile", 0, 1)):
        if not low < getattr(args, name) <= high:
            return f"{flag(name)} must be in ({low}, {high}], got {getattr(args, name)}"
    if not 0 < args.expectile < 1:
        return f"--expectile must be in (0, 1), got {args.expectile}"
    if not 0 <= args.gate_confidence < 1:
        return f"--gate-confidence must be in [0, 1), got {args.gate_confidence}"
    if args.eta > 0 and args.n_subpolicies > 1 and args.horizon < 3:
        return (
            "the kinematic divergence needs --horizon >= 3 (velocity and acceleration); use --eta 0 for shorter chunks"
        )
    if args.action_steps is not None and not 1 <= args.action_steps <= args.horizon:
        return f"--action-steps must be between 1 and --horizon ({args.horizon}), got {args.action_steps}"
    if args.num_qualified > 0 and not args.ope:
        return (
            "the improvement stage scores and improves sub-policies with the critics and the dynamics model: "
            "drop --no-ope, or pass --num-qualified 0 to train the diffusion policy alone"
        )
    if args.init_checkpoint is not None and not args.ope:
        return "--init-checkpoint runs the improvement stage, which needs --ope"
    if args.num_qualified > args.n_subpolicies:
        return f"--num-qualified ({args.num_qualified}) cannot exceed --n-subpolicies ({args.n_subpolicies})"
    if (
        args.init_checkpoint is not None
        and args.checkpoint_path is not None
        and os.path.abspath(args.checkpoint_path) == os.path.abspath(args.init_checkpoint)
    ):
        return f"--checkpoint-path {args.checkpoint_path} is the input checkpoint; the run would overwrite it"
    problem = unwritable("runs")
    if problem is not None:
        return f"runs/ (the TensorBoard logs and the default checkpoint folder) cannot be written: {problem}"
    return check_output_file("--checkpoint-path", args.checkpoint_path)


def parse_args(argv: list[str] | None = None) -> Args:
    """The command line; `--paper-scale` swaps the defaults before parsing, so flags given beside it still win."""
    argv = sys.argv[1:] if argv is None else argv
    defaults = Args(paper_scale=True, **PAPER_SCALE) if "--paper-scale" in argv else Args()
    return tyro.cli(Args, default=defaults, args=argv)


# ------------------------------------------------------------------------------------------------
# Cost: what a run will do, and how long that takes here
# ------------------------------------------------------------------------------------------------
# Seconds per unit of work, measured on a 2-core CPU with one thread per run and the MLP
# denoiser (docs/experiments.md, "Speed"); the U-Net multiplies the policy's part. They are a
# first guess: `cost_estimate` is called again with the seconds the run itself measures.
CPU_SECONDS = {
    "loop_step": 0.045,
    "policy_step": 0.012,
    "ope_unit": 1.2e-5,
    "augment_unit": 2.1e-5,
    "eval_unit": 5e-5,
    "improvement_step": 0.075,
}
UNET_CPU_FACTOR = {
    "loop_step": 8.0,
    "policy_step": 30.0,
    "ope_unit": 16.0,
    "augment_unit": 16.0,
    "eval_unit": 16.0,
    "improvement_step": 30.0,
}


def units_per_call(args: "Args", max_episode_steps: int) -> dict:
    """Units of work of one call of each timed phase: one sub-policy's AM-Q rollouts, one
    augmentation refresh, one evaluation of every sub-policy (the units of `CPU_SECONDS`)."""
    n = args.n_subpolicies
    return {
        "OPE": args.ope_states * args.ope_horizon * n,
        "augmentation": args.augment_starts * args.augment_horizon * n,
        "evaluation": n * args.eval_episodes * max_episode_steps,
    }


def phase_counts(args: "Args", max_episode_steps: int) -> dict:
    """How much of each kind of work the run does (the units of `CPU_SECONDS`):
    loop steps; OPE = sub-policy x start state x model step x sub-policies sampled together
    (all n are sampled for each, the perturbation couples them); augmentation = start x model
    step x n; evaluation = sub-policy x episode x step (an upper bound: every episode runs to the
    time limit); improvement steps."""
    n = args.n_subpolicies
    units = units_per_call(args, max_episode_steps)
    loop = args.total_steps if args.init_checkpoint is None else 0
    evaluations = (loop // args.eval_every + (loop % args.eval_every != 0)) if loop else 1
    refreshes = 0
    if args.ope and args.augment_ratio > 0 and loop > args.dynamics_warmup:
        refreshes = (loop - 1 - args.dynamics_warmup) // args.augment_every + 1
    gate_calls = args.improvement_steps // args.ope_every + (args.improvement_steps % args.ope_every != 0) + 1
    copies = args.num_qualified
    return {
        "loop": {"loop_step" if args.ope else "policy_step": loop},
        "augmentation": {"augment_unit": refreshes * units["augmentation"]},
        "OPE": {"ope_unit": (evaluations * n + copies * gate_calls) * units["OPE"] if args.ope else 0},
        "evaluation": {"eval_unit": (evaluations + copies) * units["evaluation"]},
        "improvement": {"improvement_step": copies * args.improvement_steps},
    }


def cost_estimate(counts: dict, seconds: dict) -> dict:
    """Seconds per phase: every unit count of `phase_counts` times its seconds."""
    return {phase: sum(count * seconds[unit] for unit, count in units.items()) for phase, units in counts.items()}


class PhaseClock:
    """Wall time and units of work spent per phase so far (the phases of `phase_counts`)."""

    def __init__(self):
        self.seconds, self.units = {}, {}

    def add(self, phase: str, units: float, seconds: float) -> None:
        self.seconds[phase] = self.seconds.get(phase, 0.0) + seconds
        self.units[phase] = self.units.get(phase, 0.0) + units

    def unit_seconds(self, counts: dict, prior: dict) -> dict:
        """Seconds per unit: measured where the phase has run, else the prior scaled by how much
        faster or slower than its prior the measured phases ran here (the median ratio)."""
        measured = {}
        for phase, units in counts.items():
            (unit,) = units
            if self.units.get(phase, 0) > 0:
                measured[unit] = self.seconds[phase] / self.units[phase]
        ratio = float(np.median([measured[unit] / prior[unit] for unit in measured])) if measured else 1.0
        return {unit: measured.get(unit, prior[unit] * ratio) for unit in prior}


def format_cost(estimate: dict) -> str:
    total = sum(estimate.values())
    return (
        f"about {total / 60:.0f} min: "
        + ", ".join(f"{phase} {value / 60:.1f}" for phase, value in estimate.items())
        + " (min, rough)"
    )


# ------------------------------------------------------------------------------------------------
# Data (docs/design.md, "Data")
# ------------------------------------------------------------------------------------------------
ENVS = ("hopper", "walker2d", "halfcheetah", "ant")
# Qualities the Minari server has for these tasks; medium-expert is combined locally.
QUALITIES = ("simple", "medium", "expert", "medium-expert")
ENV_IDS = tuple(f"{env}-{quality}" for env in ENVS for quality in QUALITIES)


class DatasetError(ValueError):
    """A dataset name that does not exist, or a dataset that cannot be had here."""


def minari_ids(env_id: str) -> list[str]:
    """`hopper-medium` -> [`mujoco/hopper/medium-v0`]; `<env>-medium-expert` -> its two sources."""
    if env_id not in ENV_IDS:
        raise DatasetError(
            f"unknown --env-id {env_id!r}. Valid names: {', '.join(ENV_IDS)}. "
            "Any other Minari dataset: --dataset-id <minari id>."
        )
    env, quality = env_id.split("-", 1)
    qualities = ["medium", "expert"] if quality == "medium-expert" else [quality]
    return [f"mujoco/{env}/{q}-v0" for q in qualities]


def load_minari(dataset_id: str) -> minari.MinariDataset:
    """A local dataset, else a download; where neither works, say where datasets are looked for."""
    if dataset_id in minari.list_local_datasets():
        return minari.load_dataset(dataset_id)
    try:
        return minari.load_dataset(dataset_id, download=True)
    except Exception as error:  # network errors, unknown remote ids: all end the same way
        path = os.environ.get("MINARI_DATASETS_PATH", "~/.minari/datasets (MINARI_DATASETS_PATH unset)")
        local = ", ".join(sorted(minari.list_local_datasets())) or "none"
        raise DatasetError(
            f"Minari dataset {dataset_id!r} is not local and could not be downloaded "
            f"({type(error).__name__}: {error}). Datasets are looked for in MINARI_DATASETS_PATH={path} "
            f"(local datasets there: {local}). Download it where there is internet with "
            f"`minari download {dataset_id}` and point MINARI_DATASETS_PATH at that folder."
        ) from error


def load_dataset(env_id: str, dataset_id: str | None) -> tuple[minari.MinariDataset, str, float, float]:
    """The dataset, its id and its reference scores (D4RL normalization).

    `<env>-medium-expert` is `minari.combine_datasets` of medium and expert, built once and kept
    locally; combining drops the reference scores, so they come from the source datasets.
    """
    ids = [dataset_id] if dataset_id is not None else minari_ids(env_id)
    sources = [load_minari(source_id) for source_id in ids]
    metadata = sources[0].storage.metadata
    ref_min, ref_max = metadata.get("ref_min_score"), metadata.get("ref_max_score")
    if ref_min is None or ref_max is None:
        raise DatasetError(
            f"dataset {ids[0]!r} has no reference scores (ref_min_score/ref_max_score), "
            "so normalized scores cannot be computed"
        )
    if len(sources) == 1:
        return sources[0], ids[0], float(ref_min), float(ref_max)
    combined_id = ids[0].replace("medium-v0", "medium-expert-v0")
    if combined_id not in minari.list_local_datasets():
        build_combined(sources, combined_id)
    combined = minari.load_dataset(combined_id)
    expected = sum(source.total_episodes for source in sources)
    if combined.total_episodes != expected:  # e.g. left by a build that an older version did in place
        raise DatasetError(
            f"the local {combined_id} has {combined.total_episodes} episodes, not the {expected} of "
            f"{' + '.join(ids)}: it is incomplete. Delete {minari.storage.get_dataset_path(combined_id)} "
            "and run again to rebuild it"
        )
    return combined, combined_id, float(ref_min), float(ref_max)


def build_combined(sources: list, combined_id: str) -> None:
    """`minari.combine_datasets` in a temporary folder beside the datasets, renamed into place when
    complete: an interrupted build leaves no partial dataset under the real id."""
    root = minari.storage.get_dataset_path()
    final_path = minari.storage.get_dataset_path(combined_id)
    print(f"building {combined_id} from {' + '.join(source.spec.dataset_id for source in sources)} (once)")
    previous = os.environ.get("MINARI_DATASETS_PATH")
    try:
        with tempfile.TemporaryDirectory(dir=root, prefix=".building-") as folder:
            os.environ["MINARI_DATASETS_PATH"] = folder
            os.makedirs(os.path.dirname(os.path.join(folder, combined_id)), exist_ok=True)  # minari makes only the last
            minari.combine_datasets(sources, combined_id)
            os.makedirs(os.path.dirname(final_path), exist_ok=True)
            os.rename(os.path.join(folder, combined_id), final_path)
    except OSError as error:
        raise DatasetError(
            f"could not build {combined_id} in {root} ({type(error).__name__}: {error}); it must be "
            "writable (MINARI_DATASETS_PATH)"
        ) from error
    finally:
        if previous is None:
            os.environ.pop("MINARI_DATASETS_PATH", None)
        else:
            os.environ["MINARI_DATASETS_PATH"] = previous


def chunk_episode(observations, actions, rewards, terminations, horizon, obs_horizon, gamma) -> dict:
    """One episode -> one chunked transition per time step t (docs/design.md, "Data").

    states      (T, To, S)  s_{t-To+1..t}, the first state repeated before the episode start
    chunks      (T, H, A)   a_{t:t+H}, padded with the episode's last action past its end
    mask        (T, H)      1 where a_{t+h} is real, 0 where it is padding
    rewards     (T,)        R_t^H = sum_h gamma^h r_{t+h} over the real steps
    next_states (T, To, S)  the history at s_{t+H} (at the episode's last state if it ends sooner)
    dones       (T,)        1 if the episode terminated inside the chunk. Truncations (time
                            limits) are not terminations: the value bootstraps through them.
    step_next_states (T, S), step_rewards (T,): the one-step transitions (s_t, a_t, s_{t+1}, r_t)
                            for the dynamics model, which works per environment step.
    """
    length = len(actions)  # T; observations has T + 1 entries (the final one included)
    steps = np.arange(length)
    chunk_steps = steps[:, None] + np.arange(horizon)[None, :]
    mask = chunk_steps < length
    clipped = np.minimum(chunk_steps, length - 1)
    history = np.arange(-obs_horizon + 1, 1)[None, :]
    next_steps = np.minimum(steps + horizon, length)
    return {
        "states": observations[np.maximum(steps[:, None] + history, 0)],
        "chunks": actions[clipped],
        "mask": mask.astype(np.float32),
        "rewards": (np.where(mask, rewards[clipped], 0.0) * gamma ** np.arange(horizon)).sum(1),
        "next_states": observations[np.maximum(next_steps[:, None] + history, 0)],
        "dones": (np.where(mask, terminations[clipped], False)).any(1).astype(np.float32),
        "step_next_states": observations[steps + 1],
        "step_rewards": rewards,
    }


def chunk_dataset(dataset: minari.MinariDataset, horizon: int, obs_horizon: int, gamma: float) -> dict:
    """All episodes chunked and concatenated, plus the raw states for the normalization."""
    parts, all_states = [], []
    for episode in dataset.iterate_episodes():
        observations = np.asarray(episode.observations, dtype=np.float32)
        parts.append(
            chunk_episode(
                observations,
                np.asarray(episode.actions, dtype=np.float32),
                np.asarray(episode.rewards, dtype=np.float32),
                np.asarray(episode.terminations),
                horizon,
                obs_horizon,
                gamma,
            )
        )
        all_states.append(observations[:-1])
    data = {key: np.concatenate([part[key] for part in parts]) for key in parts[0]}
    data["all_states"] = np.concatenate(all_states)
    for key in ("all_states", "chunks", "step_rewards", "step_next_states"):
        if not np.isfinite(data[key]).all():
            name = {
                "all_states": "observations",
                "chunks": "actions",
                "step_rewards": "rewards",
                "step_next_states": "observations",
            }[key]
            raise DatasetError(
                f"dataset {dataset.spec.dataset_id!r} has non-finite {name} "
                f"({int((~np.isfinite(data[key])).sum())} entries); it cannot be trained on"
            )
    return data


def state_statistics(states: np.ndarray, eps: float = 1e-3) -> tuple[np.ndarray, np.ndarray]:
    """Frozen normalization (docs/design.md): dataset mean and std + eps, used offline, online and in eval."""
    return states.mean(0), states.std(0) + eps


if __name__ == "__main__":
    args = parse_args()
    resumed = None
    if args.resume is not None:  # the run's own arguments, and its state at its last checkpoint
        try:
            resumed = load_checkpoint(args.resume)
        except CheckpointError as error:
            fail(str(error))
        if not resumed.get("resume"):
            fail(
                f"{args.resume} holds no training state to resume from (an improvement-only run, or an older "
                "version): run its command again"
            )
        try:
            args = Args(**{**resumed["args"], "resume": args.resume, "checkpoint_path": args.resume})
        except TypeError as error:
            fail(f"{args.resume} was written by another version of this script ({error}); run its command again")
        print(f"resuming {args.resume} after step {resumed['resume']['step']} with the arguments saved in it")
    problem = check_args(args)
    if problem is not None:
        fail(problem)
    try:
        dataset, dataset_id, ref_min_score, ref_max_score = load_dataset(args.env_id, args.dataset_id)
    except DatasetError as error:
        fail(str(error))
    if not (
        isinstance(dataset.observation_space, gym.spaces.Box)
        and isinstance(dataset.action_space, gym.spaces.Box)
        and len(dataset.observation_space.shape) == 1
        and len(dataset.action_space.shape) == 1
    ):
        fail(
            f"{dataset_id} has observation space {dataset.observation_space} and action space "
            f"{dataset.action_space}; this implementation needs flat Box spaces (state vectors, continuous actions)"
        )
    gym_env_id = dataset.spec.env_spec.id
    if args.ope:
        try:  # the model's rollouts (AM-Q) need the task's termination rule
            is_terminal = termination_fn(task_of_env_id(gym_env_id))
        except ValueError as error:
            fail(str(error))
    max_episode_steps = dataset.spec.env_spec.max_episode_steps  # evaluate under the data's time limit
    env_name = args.env_id if args.dataset_id is None else dataset_id.replace("/", "-")
    run_name = f"{env_name}__{args.exp_name}__{args.seed}__{int(time.time())}"
    if resumed is not None:
        run_name = resumed["resume"]["run_name"]  # the same TensorBoard folder
    checkpoint_path = args.checkpoint_path or f"runs/{run_name}/offline.pt"
    writer = SummaryWriter(f"runs/{run_name}")
    writer.add_text(
        "hyperparameters",
        "|param|value|\n|-|-|\n%s" % ("\n".join([f"|{key}|{value}|" for key, value in vars(args).items()])),
    )

    # TRY NOT TO MODIFY: seeding
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    torch.backends.cudnn.deterministic = args.torch_deterministic
    device = torch.device("cuda" if torch.cuda.is_available() and args.cuda else "cpu")

    # ---- data: chunks, masks, frozen state statistics ----------------------------------------
    try:
        data = chunk_dataset(dataset, args.horizon, args.obs_horizon, args.gamma)
    except DatasetError as error:
        fail(str(error))
    except (OSError, KeyError, ValueError) as error:  # a truncated or damaged file inside the dataset
        fail(f"dataset {dataset_id!r} could not be read ({type(error).__name__}: {error}); download it again")
    state_mean, state_std = state_statistics(data["all_states"])
    action_space = dataset.action_space
    print(
        f"{dataset_id}: {dataset.total_episodes} episodes, {len(data['chunks'])} chunks of H={args.horizon} "
        f"({gym_env_id}, obs {state_mean.shape[0]}, act {action_space.shape[0]}), device {device}"
    )

    # ---- the cost of this run, said up front (refined after the first --log-every steps) -------
    cost_counts = phase_counts(args, max_episode_steps or 1000)
    call_units = units_per_call(args, max_episode_steps or 1000)  # what each timed call below adds
    prior_seconds = {
        unit: seconds * (UNET_CPU_FACTOR[unit] if args.denoiser == "unet" else 1.0)
        for unit, seconds in CPU_SECONDS.items()
    }
    clock, run_start = PhaseClock(), time.time()
    print(
        f"cost: --denoiser {args.denoiser}, {sum(cost_counts['loop'].values())} loop steps, "
        f"{args.n_subpolicies} sub-policies, "
        f"--ope {args.ope}, {args.num_qualified} copies x {args.improvement_steps} improvement steps"
    )
    if device.type == "cpu":
        print(f"cost estimate on this CPU: {format_cost(cost_estimate(cost_counts, prior_seconds))}")
        if args.denoiser == "unet" or args.total_steps > 100_000:
            print(
                "warning: these settings are sized for a GPU (the U-Net or a paper-scale budget); the defaults "
                "are the CPU setting"
            )
    else:
        print("cost estimate: after the first --log-every steps (the seconds above are measured on a CPU)")

    # ---- the multi-seed diffusion policy -------------------------------------------------------
    config = PolicyConfig(
        obs_dim=state_mean.shape[0],
        act_dim=action_space.shape[0],
        horizon=args.horizon,
        obs_horizon=args.obs_horizon,
        denoiser=args.denoiser,
        mlp_hidden=args.mlp_hidden,
        unet_dims=tuple(args.unet_dims),
        diffusion_steps=args.diffusion_steps,
        ddim_steps=args.ddim_steps,
        n_subpolicies=args.n_subpolicies,
        noise_seed=args.noise_seed,
        tau=args.tau,
        eta=args.eta,
        min_std=args.min_std,
    )
    policy = DiffusionPolicy(config, state_mean, state_std, action_space.low, action_space.high).to(device)
    optimizer = torch.optim.Adam(policy.parameters(), lr=args.learning_rate)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=args.total_steps)

    # The training tensors, on the device once: normalized states, actions scaled to [-1, 1].
    to_device = lambda array: torch.as_tensor(array, dtype=torch.float32, device=device)
    states = policy.normalize_states(to_device(data["states"]))
    chunks = policy.scale_actions(to_device(data["chunks"])).clamp(-1, 1)
    masks = to_device(data["mask"])
    num_chunks = len(chunks)
    divergence_index = torch.randperm(num_chunks, device=device)[: args.divergence_states]

    # ---- chunk-level IQL critics and the dynamics ensemble (--ope) -----------------------------
    # They draw from their own random stream (init, batches, hold-out split, model noise), so
    # switching them on leaves the policy's training exactly as it is without them.
    if args.ope:
        model_generator = torch.Generator(device=device).manual_seed(args.seed + 1)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(args.seed + 1)
            critics = ChunkCritics(config.obs_dim, config.act_dim, args.horizon).to(device)
            dynamics = EnsembleDynamics(config.obs_dim, config.act_dim).to(device)
        target_critics = copy.deepcopy(critics)
        critic_optimizer = torch.optim.Adam(critics.parameters(), lr=args.critic_learning_rate)
        dynamics_optimizer = torch.optim.Adam(dynamics.parameters(), lr=args.dynamics_learning_rate)
        chunk_rewards, dones, chunk_lengths = to_device(data["rewards"]), to_device(data["dones"]), masks.sum(1)
        next_states = policy.normalize_states(to_device(data["next_states"]))
        # One-step transitions in raw units for the dynamics model (it standardizes internally).
        step_states, step_actions = to_device(data["states"][:, -1]), to_device(data["chunks"][:, 0])
        step_next_states, step_rewards = to_device(data["step_next_states"]), to_device(data["step_rewards"])
        split_generator = torch.Generator().manual_seed(args.seed + 1)
        train_index, holdout_index = (index.to(device) for index in holdout_split(num_chunks, split_generator))
        holdout = (
            step_states[holdout_index],
            step_actions[holdout_index],
            step_next_states[holdout_index],
            step_rewards[holdout_index],
        )
        dynamics.set_input_statistics(step_states[train_index], step_actions[train_index])
        # AM-Q start states: fixed dataset state histories, raw units.
        raw_histories = to_device(data["states"])
        ope_index = torch.randperm(num_chunks, generator=split_generator)[: args.ope_states].to(device)
        ope_start = raw_histories[ope_index]
        # The augmentation buffer (docs/design.md, "Dynamics model and diffusion augmentation"): empty
        # until --dynamics-warmup.
        augmented = {
            "states": step_states[:0],
            "actions": step_actions[:0],
            "next_states": step_next_states[:0],
            "rewards": step_rewards[:0],
        }

    # --init-checkpoint: the loop was run before; take its policy, critics and dynamics model.
    if args.init_checkpoint is not None:
        try:
            saved = load_checkpoint(args.init_checkpoint, expected_env_id=gym_env_id, map_location=device)
        except CheckpointError as error:
            fail(str(error))
        if saved["dataset_id"] != dataset_id or "critics" not in saved or saved["policy"]["config"] != asdict(config):
            fail(
                f"{args.init_checkpoint} is not a --ope checkpoint of {dataset_id} with these policy settings "
                f"(it has {saved['dataset_id']}, policy {saved['policy']['config']}); pass the arguments it was "
                "trained with"
            )
        policy.load_state_dict(saved["policy"]["state_dict"])
        critics.load_state_dict(saved["critics"]["state_dict"])
        dynamics.load_state_dict(saved["dynamics"]["state_dict"])

    history = {
        "step": [],
        "scores": [],
        "returns": [],
        "mean_divergence": [],
        "ope_scores": [],
        "ope_spearman": [],
        "dynamics_holdout_mse": [],
        "dynamics_holdout_nll": [],
        "augmentation": [],
    }
    improved = []  # the improved copies (after the loop)
    resume_state = {}  # "state": the loop's training state at its last evaluation (`training_state`)

    @torch.no_grad()
    def ope_rollouts(model: DiffusionPolicy, sub_policy: int, uncertainty_penalty: float = 0.0):
        """AM-Q of one sub-policy of `model` per start state (`dynamics.am_q_rollouts`): its
        deterministic chunks rolled through the elites from fixed start states with fixed model
        noise, Q summed per rollout (penalized by model uncertainty for the gate). All n
        sub-policies are sampled together (the adaptive perturbation couples them) and column
        `sub_policy` is kept."""
        q_function = lambda raw_states, env_chunks: critics.q(
            policy.normalize_states(raw_states), policy.scale_actions(env_chunks)
        )
        chunk_policy = lambda histories: model.unscale_actions(
            model.sample(model.normalize_states(histories)).actions[:, sub_policy]
        )
        generator = torch.Generator(device=device).manual_seed(args.seed + 2)
        return am_q_rollouts(
            chunk_policy,
            q_function,
            dynamics,
            is_terminal,
            ope_start,
            args.ope_horizon,
            generator=generator,
            uncertainty_penalty=uncertainty_penalty,
            gamma=args.gamma,
        )

    def ope_score(model: DiffusionPolicy, sub_policy: int) -> float:
        """Plain AM-Q (Uni-O4): the mean Q over every visited (state, chunk) pair."""
        return am_q_ratio(*ope_rollouts(model, sub_policy)).item()

    def ope_scores() -> np.ndarray:
        """Plain AM-Q (Uni-O4) of every sub-policy, after re-choosing the elites on the real hold-out."""
        holdout_mse = dynamics.select_elites(*holdout)
        history["dynamics_holdout_mse"].append(holdout_mse[dynamics.elite_indices].mean().item())
        with torch.no_grad():
            holdout_nll = dynamics.member_nll(*holdout)[dynamics.elite_indices].mean().item()
        history["dynamics_holdout_nll"].append(holdout_nll)
        return np.array([ope_score(policy, i) for i in range(args.n_subpolicies)])

    @torch.no_grad()
    def refresh_augmentation(step: int) -> dict:
        """Diffusion augmentation (docs/design.md): a fresh buffer of synthetic transitions from the
        current sub-policies (start b driven by sub-policy b mod n, adaptive perturbation on) and
        the current model, kept while the ensemble disagreement stays below epsilon."""
        epsilon = disagreement_threshold(dynamics, holdout[0], holdout[1], args.aug_kl_quantile)
        starts = raw_histories[
            torch.randint(num_chunks, (args.augment_starts,), device=device, generator=model_generator)
        ]
        rows = torch.arange(args.augment_starts, device=device)
        driver = rows % args.n_subpolicies
        chunk_policy = lambda histories: policy.unscale_actions(
            policy.sample(policy.normalize_states(histories)).actions[rows, driver]
        )
        buffer = diffusion_augmentation(
            chunk_policy,
            dynamics,
            is_terminal,
            starts,
            args.augment_horizon,
            epsilon,
            int(args.augment_ratio * num_chunks),
            generator=model_generator,
        )
        history["augmentation"].append((step, len(buffer["states"]), epsilon))
        writer.add_scalar("charts/augmentation_size", len(buffer["states"]), step)
        print(
            f"augmentation at step {step}: {len(buffer['states'])} synthetic transitions "
            f"(epsilon {epsilon:.3f}, cap {int(args.augment_ratio * num_chunks)})"
        )
        return buffer

    def training_state(step: int) -> dict:
        """What --resume needs to continue the loop after `step` as if it had never stopped: the
        optimizers, the schedule, the augmentation buffer, the loss sums since the last log and
        every random stream the loop draws from."""
        state = {
            "step": step,
            "run_name": run_name,
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "torch_rng": torch.get_rng_state(),
            "loss_sums": dict(loss_sums),
            "loss_counts": dict(loss_counts),
        }
        if device.type == "cuda":
            state["cuda_rng"] = torch.cuda.get_rng_state(device)
        if args.ope:
            state.update(
                target_critics=target_critics.state_dict(),
                critic_optimizer=critic_optimizer.state_dict(),
                dynamics_optimizer=dynamics_optimizer.state_dict(),
                model_generator=model_generator.get_state(),
                augmented=augmented,
            )
        return state

    def write_checkpoint(step: int) -> None:
        """The atomic checkpoint: everything uepo_online.py and eval.py need (docs/design.md). Never
        a non-finite one: the run stops instead, and the previous checkpoint stays as it was."""
        tensors = [*policy.state_dict().values()] + [t for e in improved for t in e["policy"]["state_dict"].values()]
        if args.ope:
            tensors += [*critics.state_dict().values(), *dynamics.state_dict().values()]
        scores = (history["scores"][-1:] + [e["scores"] for e in improved]) if history["scores"] else []
        if not (
            all(torch.isfinite(t).all() for t in tensors if t.is_floating_point())
            and all(np.isfinite(np.asarray(row, dtype=float)).all() for row in scores)
        ):
            fail(
                f"step {step}: a network's parameters or the evaluation are not finite; stopped without saving "
                f"(the last checkpoint, if any, is untouched: {checkpoint_path})"
            )
        model_parts = {}
        if args.ope:
            model_parts = {
                "critics": {
                    "config": {"obs_dim": config.obs_dim, "act_dim": config.act_dim, "horizon": args.horizon},
                    "state_dict": critics.state_dict(),
                },
                "dynamics": {"config": dynamics.constructor_kwargs(), "state_dict": dynamics.state_dict()},
            }
        save_checkpoint(
            {
                "args": asdict(args),
                "step": step,
                "env_id": gym_env_id,
                "max_episode_steps": max_episode_steps,
                "dataset_id": dataset_id,
                "ref_min_score": ref_min_score,
                "ref_max_score": ref_max_score,
                "policy": policy.to_checkpoint(),
                "history": history,
                "improved": improved,
                **model_parts,
                "resume": resume_state.get("state"),
            },
            checkpoint_path,
        )
        print(f"checkpoint: {checkpoint_path}")

    def evaluate_and_save(step: int, in_loop: bool) -> None:
        """Every sub-policy's normalized score and the sub-policies' mean pairwise divergence
        (on fixed dataset states), logged; then the atomic checkpoint."""
        policy.eval()
        with torch.no_grad():
            actions = policy.sample(states[divergence_index]).actions
        mean_divergence = mean_pairwise_divergence(actions).mean().item()
        phase_start = time.time()
        result = evaluate_sub_policies(
            policy,
            gym_env_id,
            args.eval_episodes,
            seed=args.seed * 1000,
            ref_min_score=ref_min_score,
            ref_max_score=ref_max_score,
            max_episode_steps=max_episode_steps,
            action_steps=args.action_steps,
        )
        clock.add("evaluation", call_units["evaluation"], time.time() - phase_start)
        phase_start = time.time()
        with torch.no_grad():
            ope = ope_scores() if args.ope else None
        if args.ope:
            clock.add("OPE", args.n_subpolicies * call_units["OPE"], time.time() - phase_start)
        policy.train()
        scores = result["scores"].mean(1)
        for i, score in enumerate(scores):
            writer.add_scalar(f"charts/normalized_score_sub_policy_{i}", score, step)
        writer.add_scalar("charts/normalized_score_mean", scores.mean(), step)
        writer.add_scalar("charts/normalized_score_best", scores.max(), step)
        writer.add_scalar("charts/mean_pairwise_divergence", mean_divergence, step)
        print(
            f"eval step {step}: normalized score per sub-policy "
            f"[{', '.join(f'{s:.1f}' for s in scores)}] mean {scores.mean():.1f} best {scores.max():.1f}; "
            f"mean pairwise divergence {mean_divergence:.3f}"
        )
        history["step"].append(step)
        history["scores"].append(result["scores"].tolist())
        history["returns"].append(result["returns"].tolist())
        history["mean_divergence"].append(mean_divergence)
        if args.ope:
            history["ope_scores"].append(ope.tolist())
            rank_correlation = spearman_correlation(ope, scores) if args.n_subpolicies > 2 else float("nan")
            history["ope_spearman"].append(rank_correlation)
            writer.add_scalar("charts/ope_spearman", rank_correlation, step)
            writer.add_scalar("losses/dynamics_holdout_mse", history["dynamics_holdout_mse"][-1], step)
            writer.add_scalar("losses/dynamics_holdout_nll", history["dynamics_holdout_nll"][-1], step)
            print(
                f"  AM-Q per sub-policy [{', '.join(f'{q:.1f}' for q in ope)}]; Spearman with real scores "
                f"{rank_correlation:.2f}; AM-Q's pick: sub-policy {int(ope.argmax())} "
                f"(real {scores[ope.argmax()]:.1f}); dynamics hold-out NLL "
                f"{history['dynamics_holdout_nll'][-1]:.3f}"
            )
        if in_loop:  # taken after the evaluation, so a resumed run continues from exactly here
            resume_state["state"] = training_state(step)
        write_checkpoint(step)

    # ---- the offline loop ------------------------------------------------------------------------
    start_time = time.time()  # the loop's own time is the wall time minus the timed phases inside it
    loss_sums, loss_counts = {}, {}
    first_step = 1
    if resumed is not None:  # --resume: every state the loop carries, as it was after the saved step
        state = resumed["resume"]
        policy.load_state_dict(resumed["policy"]["state_dict"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if args.ope:
            critics.load_state_dict(resumed["critics"]["state_dict"])
            target_critics.load_state_dict(state["target_critics"])
            dynamics.load_state_dict(resumed["dynamics"]["state_dict"])
            critic_optimizer.load_state_dict(state["critic_optimizer"])
            dynamics_optimizer.load_state_dict(state["dynamics_optimizer"])
            model_generator.set_state(state["model_generator"])
            augmented = state["augmented"]
        torch.set_rng_state(state["torch_rng"])
        if "cuda_rng" in state and device.type == "cuda":
            torch.cuda.set_rng_state(state["cuda_rng"], device)
        history, loss_sums, loss_counts = resumed["history"], state["loss_sums"], state["loss_counts"]
        resume_state["state"], first_step = state, state["step"] + 1
    loop_steps = range(first_step, args.total_steps + 1) if args.init_checkpoint is None else []  # else: trained
    for step in loop_steps:
        batch = torch.randint(num_chunks, (args.batch_size,), device=device)

        # Diffusion loss (epsilon prediction) on dataset chunks.
        diffusion_loss = policy.loss(states[batch], chunks[batch], masks[batch])
        losses = {"diffusion": diffusion_loss}

        # Sub-policy objective J(pi_i) = E[log pi_i] + alpha * E[log pi_i - max_j log pi_j]
        # (docs/design.md, sequence-level disagreement). Its first term is the diffusion model's own
        # likelihood, which the diffusion loss above already maximizes (through its bound). The
        # Gaussian surrogate pi_i = N(mu_i(s), std^2) around each deterministic sequence enters
        # only the disagreement term, weighted alpha = --kl-coef. Why not also the first term:
        # through a unimodal surrogate it is an MSE pull of every sub-policy towards the
        # conditional mean, which undoes the multimodality that the diffusion policy is for
        # (measured: docs/experiments.md, "Reading of J"). Back-propagates through the deterministic DDIM
        # chain of every sub-policy, with the adaptive perturbation inside.
        if args.kl_coef > 0 and args.n_subpolicies > 1 and step % args.kl_every == 0:
            sub_batch = batch[: args.kl_batch_size]
            subpolicy_chunks = policy.sample(states[sub_batch]).actions
            if args.j_reading == "dataset-sequence":
                _, disagreement = subpolicy_terms(
                    subpolicy_chunks, chunks[sub_batch], masks[sub_batch], std=args.subpolicy_std
                )
            else:
                disagreement = own_sequence_repulsion(subpolicy_chunks, args.subpolicy_std, args.repulsion_margin)
            losses["subpolicy"] = -args.kl_coef * disagreement.mean()

        policy_loss = sum(losses.values())

        if args.ope:
            # Chunk-level IQL critics: Q(s_t, a_{t:t+H}) towards R_t^H + gamma^L (1 - done) V(s_{t+L}),
            # V(s_t) by expectile regression on the target Q (the current state, not the history).
            critic_batch = torch.randint(num_chunks, (args.batch_size,), device=device, generator=model_generator)
            critic_losses = iql_losses(
                critics,
                target_critics,
                states[critic_batch, -1],
                chunks[critic_batch],
                chunk_rewards[critic_batch],
                next_states[critic_batch, -1],
                dones[critic_batch],
                chunk_lengths[critic_batch],
                args.gamma,
                args.expectile,
            )
            losses["critic_q"], losses["critic_v"] = critic_losses["q"], critic_losses["value"]
            # Dynamics ensemble: Gaussian NLL -E log T(s'|s, a) on a batch drawn uniformly from the
            # real one-step transitions (train split) and the augmentation buffer together, so the
            # two mix in proportion to their sizes (docs/design.md).
            dynamics_batch = mixed_batch(
                (step_states, step_actions, step_next_states, step_rewards),
                (augmented["states"], augmented["actions"], augmented["next_states"], augmented["rewards"]),
                train_index,
                args.batch_size,
                model_generator,
            )
            losses["dynamics"] = dynamics.loss(*dynamics_batch)

        for name, value in losses.items():
            if not torch.isfinite(value):
                fail(
                    f"step {step}: the {name} loss is {value.item()}; stopped (the last checkpoint is untouched: "
                    f"{checkpoint_path if history['step'] else 'none yet'})"
                )
            loss_sums[name] = loss_sums.get(name, 0.0) + value.item()
            loss_counts[name] = loss_counts.get(name, 0) + 1
        optimizer.zero_grad()
        policy_loss.backward()
        torch.nn.utils.clip_grad_norm_(policy.parameters(), args.max_grad_norm)
        optimizer.step()
        scheduler.step()
        if args.ope:
            critic_optimizer.zero_grad()
            (losses["critic_q"] + losses["critic_v"]).backward()
            critic_optimizer.step()
            soft_update(target_critics, critics, args.critic_target_rate)
            dynamics_optimizer.zero_grad()
            losses["dynamics"].backward()
            dynamics_optimizer.step()
            # Diffusion augmentation: first after the warm-up on real data, then every --augment-every
            # (not at the last step, where no dynamics update would use it).
            augment_now = (
                args.augment_ratio > 0
                and args.dynamics_warmup <= step < args.total_steps
                and (step - args.dynamics_warmup) % args.augment_every == 0
            )
            if step % args.elite_every == 0 or augment_now:
                dynamics.select_elites(*holdout)  # elites are chosen on real hold-out data only
            if augment_now:
                policy.eval()
                phase_start = time.time()
                augmented = refresh_augmentation(step)
                clock.add("augmentation", call_units["augmentation"], time.time() - phase_start)
                policy.train()

        if step % args.log_every == 0 or step == args.total_steps:
            elapsed = time.time() - start_time
            steps_per_second = (step - first_step + 1) / elapsed  # this process's steps (after a --resume: since it)
            loop_seconds = (
                time.time() - start_time - sum(value for phase, value in clock.seconds.items() if phase != "loop")
            )
            clock.seconds["loop"], clock.units["loop"] = loop_seconds, step - first_step + 1
            remaining = cost_estimate(cost_counts, clock.unit_seconds(cost_counts, prior_seconds))
            remaining = {phase: remaining[phase] - clock.seconds.get(phase, 0.0) for phase in remaining}
            remaining["loop"] = (args.total_steps - step) * loop_seconds / (step - first_step + 1)
            eta_seconds = max(0.0, sum(remaining.values()))
            for phase, seconds in clock.seconds.items():
                writer.add_scalar(f"time/{phase}_minutes", seconds / 60, step)
            if step - first_step + 1 == args.log_every:
                print(
                    f"cost estimate after {step} steps: "
                    f"{format_cost(cost_estimate(cost_counts, clock.unit_seconds(cost_counts, prior_seconds)))}"
                )
            means = {name: loss_sums[name] / loss_counts[name] for name in loss_sums}
            for name, value in means.items():
                writer.add_scalar(f"losses/{name}", value, step)
            writer.add_scalar("charts/learning_rate", scheduler.get_last_lr()[0], step)
            writer.add_scalar("charts/SPS", steps_per_second, step)
            print(
                f"step {step}/{args.total_steps} | "
                + " | ".join(f"{k} {v:.4f}" for k, v in means.items())
                + f" | {steps_per_second:.0f} steps/s | run ETA {time.strftime('%H:%M:%S', time.gmtime(eta_seconds))}"
                + " | minutes: "
                + ", ".join(f"{phase} {seconds / 60:.1f}" for phase, seconds in clock.seconds.items()),
                flush=True,
            )
            loss_sums, loss_counts = {}, {}

        if step % args.eval_every == 0 or step == args.total_steps:
            evaluate_and_save(step, in_loop=True)

    if args.init_checkpoint is not None:  # the loop ran in an earlier run: evaluate what it left
        evaluate_and_save(saved["step"], in_loop=False)

    # ---- improvement of the best sub-policies, after the loop ----------------------------------
    # (docs/design.md, "The offline loop, critics and improvement")
    # The top --num-qualified sub-policies by AM-Q each get a copy of the whole policy (denoiser
    # + the same seeds; the partners stay because the perturbation couples them), improved for
    # that sub-policy by one operator under one gate: every --ope-every steps the copy is scored
    # with the uncertainty-penalized AM-Q and only a better score replaces the kept snapshot.
    # The critics and the dynamics model are frozen from here on.
    if args.num_qualified > 0:
        critics.requires_grad_(False)
        base_ope = np.array(history["ope_scores"][-1])
        base_scores = np.array(history["scores"][-1]).mean(1)
        qualified = [int(i) for i in np.argsort(-base_ope)[: args.num_qualified]]
        improvement_learning_rate = args.improvement_learning_rate or {"bppo": 3e-5, "qgrad": 1e-4}[args.improvement]
        print(f"improvement ({args.improvement}): sub-policies {qualified} qualify by AM-Q")
        for sub_policy in qualified:
            improved_policy = copy.deepcopy(policy)
            reference = copy.deepcopy(policy).requires_grad_(False)  # bppo: pi_ref, moved only by the gate
            improvement_optimizer = torch.optim.Adam(improved_policy.parameters(), lr=improvement_learning_rate)
            gate = BestSnapshot(
                improved_policy,
                ope_rollouts(improved_policy, sub_policy, args.ope_penalty),
                step=0,
                confidence=args.gate_confidence,
            )
            print(f"sub-policy {sub_policy}: gated OPE at the start {gate.best_score:.1f}")
            start_time, loss_sums, last_logged = time.time(), {}, 0
            for step in range(1, args.improvement_steps + 1):
                step_start = time.time()
                batch = torch.randint(num_chunks, (args.batch_size,), device=device)
                batch_states = states[batch, -1]
                if args.improvement == "bppo":
                    advantage_fn = lambda chunk: critics.q(batch_states, chunk) - critics.value(batch_states)
                    out = bppo_loss(
                        improved_policy,
                        reference,
                        states[batch],
                        sub_policy,
                        advantage_fn,
                        args.clip_coef,
                        args.improvement_kl_coef,
                    )
                else:
                    q_fn = lambda chunk: critics.q(batch_states, chunk)
                    out = qgrad_loss(
                        improved_policy, states[batch], chunks[batch], masks[batch], sub_policy, q_fn, args.q_weight
                    )
                if not torch.isfinite(out["loss"]):
                    fail(
                        f"improvement of sub-policy {sub_policy}, step {step}: the {args.improvement} loss is "
                        f"{out['loss'].item()}; stopped (the last checkpoint is untouched: {checkpoint_path})"
                    )
                improvement_optimizer.zero_grad()
                out["loss"].backward()
                torch.nn.utils.clip_grad_norm_(improved_policy.parameters(), args.max_grad_norm)
                improvement_optimizer.step()
                clock.add("improvement", 1, time.time() - step_start)
                for name, value in out.items():
                    loss_sums[name] = loss_sums.get(name, 0.0) + value.float().mean().item()
                if step % args.log_every == 0 or step % args.ope_every == 0 or step == args.improvement_steps:
                    logged_steps, last_logged = step - last_logged, step
                    for name, value in loss_sums.items():
                        writer.add_scalar(f"improvement_{sub_policy}/{name}", value / logged_steps, step)
                    eta_seconds = (args.improvement_steps - step) * (time.time() - start_time) / step
                    print(
                        f"  sub-policy {sub_policy} step {step}/{args.improvement_steps} | "
                        + " | ".join(f"{k} {v / logged_steps:.4f}" for k, v in loss_sums.items())
                        + f" | ETA {time.strftime('%H:%M:%S', time.gmtime(eta_seconds))}",
                        flush=True,
                    )
                    loss_sums = {}
                if step % args.ope_every == 0 or step == args.improvement_steps:
                    phase_start = time.time()
                    accepted = gate.offer(
                        improved_policy, ope_rollouts(improved_policy, sub_policy, args.ope_penalty), step
                    )
                    clock.add("OPE", call_units["OPE"], time.time() - phase_start)
                    _, score, _, lower_bound = gate.history[-1]
                    if accepted and args.improvement == "bppo":
                        reference.load_state_dict(improved_policy.state_dict())
                    writer.add_scalar(f"improvement_{sub_policy}/gated_ope", score, step)
                    print(
                        f"  sub-policy {sub_policy} step {step}: gated OPE {score:.1f}, gain bound {lower_bound:+.1f} "
                        f"({'kept' if accepted else 'rejected'}; best {gate.best_score:.1f} at step {gate.best_step})"
                    )
            gate.restore(improved_policy)  # the best-by-OPE snapshot, never simply the last
            improved_policy.eval()
            result = evaluate_sub_policies(
                improved_policy,
                gym_env_id,
                args.eval_episodes,
                seed=args.seed * 1000,
                ref_min_score=ref_min_score,
                ref_max_score=ref_max_score,
                max_episode_steps=max_episode_steps,
                action_steps=args.action_steps,
            )
            improved.append(
                {
                    "sub_policy": sub_policy,
                    "operator": args.improvement,
                    "policy": improved_policy.to_checkpoint(),
                    "ope_history": gate.history,
                    "ope_rollouts": [part.cpu() for part in gate.best_rollouts],
                    "ope_score": gate.best_score,
                    "best_step": gate.best_step,
                    "base_ope_score": float(base_ope[sub_policy]),
                    "base_score": float(base_scores[sub_policy]),
                    "scores": result["scores"][sub_policy].tolist(),
                }
            )
            print(
                f"sub-policy {sub_policy}: kept step {gate.best_step} (gated OPE {gate.history[0][1]:.1f} -> "
                f"{gate.best_score:.1f}); real normalized score {base_scores[sub_policy]:.1f} -> "
                f"{result['scores'][sub_policy].mean():.1f}"
            )
            write_checkpoint(history["step"][-1])
        # The offline choice: the gated copies compared pairwise on the same OPE rollouts; a gain
        # inside the OPE's noise is a tie, and ties go to the copy whose base AM-Q ranked higher.
        choice, comparisons = confident_choice([entry["ope_rollouts"] for entry in improved], args.gate_confidence)
        for index, gain, lower_bound in comparisons:
            print(
                f"offline choice: sub-policy {improved[index]['sub_policy']} vs the choice so far: gated OPE gain "
                f"{gain:+.1f}, lower bound {lower_bound:+.1f} "
                + (
                    "(confident, it replaces it)"
                    if lower_bound > 0
                    else "(inside the OPE noise: a tie, the earlier stays)"
                )
            )
        improved.insert(0, improved.pop(choice))
        for rank, entry in enumerate(improved):
            entry["choice_rank"] = rank
        print(f"offline choice: sub-policy {improved[0]['sub_policy']}, improved ({args.improvement})")
        write_checkpoint(history["step"][-1])
        print("| sub-policy | AM-Q | real before | gated OPE start -> kept (step) | real after |\n|-|-|-|-|-|")
        for entry in improved:
            start = entry["ope_history"][0][1]
            print(
                f"| {entry['sub_policy']} | {entry['base_ope_score']:.1f} | {entry['base_score']:.1f} | "
                f"{start:.1f} -> {entry['ope_score']:.1f} ({entry['best_step']}) | {np.mean(entry['scores']):.1f} |"
            )

    print(
        "time per phase: "
        + ", ".join(f"{phase} {seconds / 60:.1f} min" for phase, seconds in clock.seconds.items())
        + f"; whole run {(time.time() - run_start) / 60:.1f} min"
    )
    writer.close()
