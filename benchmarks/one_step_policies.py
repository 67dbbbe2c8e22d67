"""One-step policies per fixed seed, trained with a Q term and a distillation term (flow
Q-learning's actor, FQL), from a saved run: are they better sub-policies than the chains they
are distilled from, and does the offline scorer find the best of them?

    MINARI_DATASETS_PATH=<folder> python benchmarks/one_step_policies.py \\
        --checkpoint runs/<run>/offline.pt --q-weights 0 0.3 1 3

For every weight w of `--q-weights`, one network mu(s, z) (3 x 256 ReLU, tanh; FQL's one-step
policy) is trained for `--steps` steps on `--distill-states` dataset states with

    L = ||mu(s, eps_i) - pi_i(s)||^2  +  w * (-Q(s, mu(s, eps_i)) / mean|Q|)

where i is drawn uniformly per row among the run's n sub-policies, eps_i is sub-policy i's fixed
seed, pi_i(s) its deterministic DDIM chunk (the teacher: the run's diffusion policy, frozen, its
chunks computed once per state), and Q the run's chunk critics (frozen; the division by mean|Q| without gradient makes w
independent of the reward scale, as the improvement stage's `qgrad`). FQL writes the same loss as
alpha * distillation - Q with alpha = 1 / w. Sub-policy i of the result is mu(., eps_i): a
deterministic function of the state like the chain, one network evaluation instead of a DDIM chain.
w = 0 is pure distillation, a check that the student reproduces its teacher.

For each w, every student is scored by the run's AM-Q (its start states, model noise, critics and
model), by the model's return over the time limit from `--episode-starts` dataset episode starts,
plain and penalized by the gate's uncertainty (the scorers in benchmarks/scorers.py), and on
`--episodes` real episodes (reset seeds `seed * 1000 + e`; the teachers' scores are the run's
last evaluation, the same episodes where `--seed` is the run's); prints a row per sub-policy and each
scorer's Spearman and regret, and writes everything to `--json`.
"""

import os
import sys
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import tyro

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from scorers import load_saved_run, model_scores, ranking_summary  # noqa: E402  (this folder is on the path when run as a script)

from diffusion import DiffusionPolicy, SampleOutput  # noqa: E402
from eval import (  # noqa: E402
    check_output_file,
    evaluate_saved_task,
    fail,
    write_json,
)

SCORERS = ("am_q", "model_return", "mopo_return")


@dataclass
class Args:
    checkpoint: str
    """offline checkpoint with critics and a model (uepo_offline.py with --ope)"""
    q_weights: tuple[float, ...] = (0.0, 0.3, 1.0, 3.0)
    """weights w of the Q term, one set of students each (0: distillation only)"""
    steps: int = 10_000
    """gradient steps per set of students"""
    distill_states: int = 65_536
    """dataset states at which the teacher's chunks are computed once and distilled"""
    batch_size: int = 256
    """dataset states per step"""
    learning_rate: float = 3e-4
    """Adam's learning rate"""
    hidden: int = 256
    """width of the one-step policy's 3 hidden layers"""
    episodes: int = 10
    """real episodes per student"""
    episode_starts: int = 64
    """dataset episode starts of the model returns"""
    penalty: float = 1.0
    """lambda of the penalized model return"""
    seed: int = 1
    """seed of the networks, the batches and the real episodes"""
    json: str | None = None
    """also write the scores and the summary to this file"""


class OneStepPolicies(nn.Module):
    """mu(s, z): normalized state history (B, To, S) and a seed (B, H, A) -> a chunk (B, H, A) in
    [-1, 1]. Holds its teacher's seeds and units, and offers the teacher's interface (`sample`,
    `act`, `normalize_states`, `scale_actions`, `unscale_actions`, `horizon`, `obs_horizon`), so that the run's
    evaluation and scorers use it as they use the diffusion policy: sub-policy i = mu(., eps_i)."""

    def __init__(self, teacher: DiffusionPolicy, hidden: int):
        super().__init__()
        config = teacher.config
        self.horizon, self.obs_horizon, self.n_subpolicies = config.horizon, config.obs_horizon, config.n_subpolicies
        chunk_dim = config.horizon * config.act_dim
        self.net = nn.Sequential(
            nn.Linear(config.obs_horizon * config.obs_dim + chunk_dim, hidden),
            nn.ReLU(),
            nn.Linear(hidden, hidden),
            nn.ReLU(),
            nn.Linear(hidden, hidden),
            nn.ReLU(),
            nn.Linear(hidden, chunk_dim),
            nn.Tanh(),
        )
        for name in ("sub_policy_noise", "state_mean", "state_std", "action_low", "action_high"):
            self.register_buffer(name, getattr(teacher, name).detach().clone())

    def forward(self, states: torch.Tensor, seeds: torch.Tensor) -> torch.Tensor:
        return self.net(torch.cat([states.flatten(1), seeds.flatten(1)], dim=-1)).view_as(seeds)

    def sample(self, states: torch.Tensor) -> SampleOutput:
        """Every sub-policy's chunk at every state, (B, n, H, A), as `DiffusionPolicy.sample`."""
        batch, n = states.shape[0], self.n_subpolicies
        seeds = self.sub_policy_noise.unsqueeze(0).expand(batch, -1, -1, -1)
        chunks = self(states.repeat_interleave(n, dim=0), seeds.flatten(0, 1))
        return SampleOutput(actions=chunks.view(seeds.shape))

    normalize_states = DiffusionPolicy.normalize_states
    scale_actions = DiffusionPolicy.scale_actions
    unscale_actions = DiffusionPolicy.unscale_actions
    act = DiffusionPolicy.act


def one_step_loss(students: OneStepPolicies, critics, states, targets, index, q_weight: float) -> dict:
    """FQL's actor loss (the module docstring) at dataset `states` (B, To, S) for the seeds `index`
    (B,), with the teacher's chunks `targets` (B, H, A) = pi_index(s). Returns {"loss",
    "distillation", "q"}; only "loss" carries gradients."""
    chunks = students(states, students.sub_policy_noise[index])
    distillation = ((chunks - targets) ** 2).mean()
    q = critics.q(states[:, -1], chunks)
    loss = distillation + q_weight * (-q.mean() / q.abs().mean().detach().clamp(min=1e-6))
    return {"loss": loss, "distillation": distillation.detach(), "q": q.mean().detach()}


@torch.no_grad()
def teacher_chunks(teacher: DiffusionPolicy, states: torch.Tensor, batch_size: int = 1024) -> torch.Tensor:
    """Every sub-policy's DDIM chunk at `states`, (N, n, H, A), computed once: the teacher is frozen."""
    return torch.cat([teacher.sample(states[i : i + batch_size]).actions for i in range(0, len(states), batch_size)])


def train_students(critics, states, targets, q_weight: float, args: Args, teacher) -> OneStepPolicies:
    """`--steps` Adam steps of `one_step_loss` on random (state, seed) pairs of the precomputed teacher chunks."""
    torch.manual_seed(args.seed)
    generator = torch.Generator().manual_seed(args.seed)
    students = OneStepPolicies(teacher, args.hidden)
    optimizer = torch.optim.Adam(students.parameters(), lr=args.learning_rate)
    for step in range(1, args.steps + 1):
        rows = torch.randint(0, len(states), (args.batch_size,), generator=generator)
        index = torch.randint(0, students.n_subpolicies, (args.batch_size,), generator=generator)
        log = one_step_loss(students, critics, states[rows], targets[rows, index], index, q_weight)
        if not torch.isfinite(log["loss"]):
            fail(f"w = {q_weight:g}, step {step}: the loss is {log['loss'].item()}")
        optimizer.zero_grad()
        log["loss"].backward()
        optimizer.step()
        if step % 2000 == 0 or step == args.steps:
            print(
                f"w = {q_weight:g}, step {step}/{args.steps}: distillation {log['distillation']:.4f}, Q {log['q']:.1f}",
                flush=True,
            )
    return students.eval()


if __name__ == "__main__":
    args = tyro.cli(Args)
    if not args.q_weights or not all(0 <= w <= 100 for w in args.q_weights):
        fail(f"--q-weights must be in [0, 100], got {args.q_weights}")
    limits = (("steps", 1, 1_000_000), ("distill_states", 1, 1_000_000), ("batch_size", 1, 65_536), ("hidden", 1, 4096))
    for name, low, high in limits:
        if not low <= getattr(args, name) <= high:
            fail(f"--{name.replace('_', '-')} must be in [{low}, {high}], got {getattr(args, name)}")
    for name in ("episodes", "episode_starts"):
        if not 1 <= getattr(args, name) <= 10_000:
            fail(f"--{name.replace('_', '-')} must be in [1, 10000], got {getattr(args, name)}")
    if not (0 < args.learning_rate <= 1 and 0 <= args.penalty <= 1e6 and 0 <= args.seed <= 2**31 - 1):
        fail("--learning-rate must be in (0, 1], --penalty in [0, 1e6] and --seed in [0, 2^31 - 1]")
    if (problem := check_output_file("--json", args.json, inputs={"--checkpoint": args.checkpoint})) is not None:
        fail(problem)
    torch.set_num_threads(1)
    checkpoint, teacher, tensors, ope = load_saved_run(args.checkpoint)
    ope.critics.requires_grad_(False)
    starts_generator = torch.Generator().manual_seed(args.seed)
    starts = tensors.episode_starts[torch.randperm(len(tensors.episode_starts), generator=starts_generator)]
    starts = starts[: args.episode_starts]
    time_limit = checkpoint["max_episode_steps"] or 1000
    sub_policies = list(range(teacher.config.n_subpolicies))
    teacher_real = np.asarray(checkpoint["history"]["scores"][-1]).mean(1)  # the run's last evaluation
    print(f"teachers (the run's sub-policies, as the run evaluated them): {np.round(teacher_real, 1).tolist()}")
    distill_states = tensors.states[torch.randperm(len(tensors.states), generator=starts_generator)]
    distill_states = distill_states[: args.distill_states]
    targets = teacher_chunks(teacher, distill_states)
    results = []
    for q_weight in args.q_weights:
        students = train_students(ope.critics, distill_states, targets, q_weight, args, teacher)
        real = evaluate_saved_task(students, checkpoint, args.episodes, args.seed, sub_policies=sub_policies)
        real = real["scores"].mean(1)
        per_student = [
            model_scores(ope, students, i, starts, time_limit, args.penalty, args.seed) for i in sub_policies
        ]
        scores = {name: [row[name] for row in per_student] for name in SCORERS}
        summary = ranking_summary(scores, real)
        print(f"w = {q_weight:g}: real {np.round(real, 1).tolist()}, mean {real.mean():.1f}, best {real.max():.1f}")
        for name, values in summary.items():
            print(
                f"  {name}: picks {values['pick']} ({values['pick_real']:.1f}), Spearman {values['spearman']:+.2f}, "
                f"regret {values['regret']:.1f}",
                flush=True,
            )
        results.append({"q_weight": q_weight, "real": real.tolist(), "scores": scores, "summary": summary})
    if args.json:
        write_json(
            args.json,
            {
                "checkpoint": args.checkpoint,
                "episodes": args.episodes,
                "teacher_real": teacher_real.tolist(),
                "results": results,
            },
        )
