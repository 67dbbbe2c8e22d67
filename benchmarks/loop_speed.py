"""Milliseconds per offline loop step, by learner, and what two same-computation speed-ups give.

Times `uepo_offline.py`'s three updates (`policy_update`, `critic_update`, `dynamics_update`) on
the real dataset with the script's defaults, one thread unless `--threads`, after a warm-up, for:
- `plain`: the script as it is (Adam's per-tensor implementation, eager PyTorch);
- `fused`: the three Adam optimizers with `fused=True` (one kernel per step instead of a few per
  parameter tensor; the same update up to the order of float operations);
- `compile`: the denoiser's and the dynamics ensemble's forward passes through `torch.compile`
  (needs a C++ compiler; the first steps compile, excluded from the timing like every warm-up).

    MINARI_DATASETS_PATH=<folder> python benchmarks/loop_speed.py --env-id hopper-medium
"""

import os
import sys
import time
from dataclasses import asdict, dataclass

import torch
import tyro

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import uepo_offline as offline  # noqa: E402
from diffusion import DiffusionPolicy  # noqa: E402
from dynamics import task_of_env_id, termination_fn  # noqa: E402
from eval import fail  # noqa: E402


@dataclass
class Args:
    env_id: str = "hopper-medium"
    """dataset name, as uepo_offline.py's --env-id"""
    dataset_id: str | None = None
    """any Minari dataset id instead (as uepo_offline.py's --dataset-id)"""
    variants: tuple[str, ...] = ("plain", "fused", "compile")
    """what to time: plain, fused (Adam fused=True), compile (torch.compile of the two hot forwards)"""
    steps: int = 300
    """timed loop steps per variant"""
    warmup: int = 30
    """untimed loop steps before (compilation happens here)"""
    threads: int = 1
    """torch threads"""


def time_loop(variant: str, run: offline.Args, tensors, policy_state, is_terminal, steps: int, warmup: int) -> dict:
    """Milliseconds per step of each learner's update, from freshly built learners."""
    torch.manual_seed(run.seed)
    policy = DiffusionPolicy.from_checkpoint(policy_state).train()
    options = {"fused": True} if variant == "fused" else {}
    optimizer = torch.optim.Adam(policy.parameters(), lr=run.learning_rate, **options)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=run.total_steps)
    models, train_index, _, _, augmented = offline.offline_models(
        run, policy.config, tensors, is_terminal, torch.device("cpu")
    )
    models.critic_optimizer = torch.optim.Adam(models.critics.parameters(), lr=run.critic_learning_rate, **options)
    models.dynamics_optimizer = torch.optim.Adam(models.dynamics.parameters(), lr=run.dynamics_learning_rate, **options)
    if variant == "compile":
        policy.denoiser.forward = torch.compile(policy.denoiser.forward)
        models.dynamics.forward = torch.compile(models.dynamics.forward)
    seconds = {"policy": 0.0, "critics": 0.0, "dynamics": 0.0}
    for step in range(1, warmup + steps + 1):
        if step == warmup + 1:
            seconds = dict.fromkeys(seconds, 0.0)
        batch = torch.randint(len(tensors.chunks), (run.batch_size,))
        start = time.perf_counter()
        offline.policy_update(policy, optimizer, scheduler, tensors, batch, step, run)
        middle = time.perf_counter()
        offline.critic_update(models, tensors, step, run)
        late = time.perf_counter()
        offline.dynamics_update(models, tensors.transitions, augmented, train_index, step, run)
        seconds["policy"] += middle - start
        seconds["critics"] += late - middle
        seconds["dynamics"] += time.perf_counter() - late
    return {name: 1000 * value / steps for name, value in seconds.items()}


if __name__ == "__main__":
    args = tyro.cli(Args)
    unknown = set(args.variants) - {"plain", "fused", "compile"}
    if unknown:
        fail(f"unknown --variants {sorted(unknown)}; choose from plain, fused, compile")
    torch.set_num_threads(args.threads)
    run = offline.Args(env_id=args.env_id, dataset_id=args.dataset_id)
    try:
        dataset, _, _, _ = offline.load_dataset(run.env_id, run.dataset_id)
    except offline.DatasetError as error:
        fail(str(error))
    data = offline.chunk_dataset(dataset, run.horizon, run.obs_horizon, run.gamma)
    mean, std = offline.state_statistics(data["all_states"])
    config = offline.policy_config(run, obs_dim=mean.shape[0], act_dim=dataset.action_space.shape[0])
    template = DiffusionPolicy(config, mean, std, dataset.action_space.low, dataset.action_space.high)
    policy_state = {"config": asdict(config), "state_dict": template.state_dict()}
    tensors = offline.training_tensors(data, template, torch.device("cpu"))
    is_terminal = termination_fn(task_of_env_id(dataset.spec.env_spec.id))
    print("| variant | policy ms/step | critics ms/step | dynamics ms/step | total ms/step | vs plain |")
    print("|---|---|---|---|---|---|")
    plain_total = None
    for variant in args.variants:
        ms = time_loop(variant, run, tensors, policy_state, is_terminal, args.steps, args.warmup)
        total = sum(ms.values())
        plain_total = total if variant == "plain" else plain_total
        ratio = f"{plain_total / total:.2f}x" if plain_total else "-"
        print(
            f"| {variant} | {ms['policy']:.1f} | {ms['critics']:.1f} | {ms['dynamics']:.1f} | {total:.1f} | {ratio} |",
            flush=True,
        )
