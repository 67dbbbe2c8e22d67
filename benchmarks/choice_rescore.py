"""The offline choice of a saved run taken again, by the model's episode return and by the gate's
AM-Q on more, fresh start states (docs/experiments.md, "The offline choice").

The offline choice compares the kept copies by their return in the model over whole episodes from
the dataset's episode starts (`uepo_offline.choice_evaluator`), by the gate's confidence rule
(`dynamics.confident_choice`). This takes that choice again on a saved run with the current code
(for a run saved before the choice was made this way, it is the choice the current script makes
from the same copies, which the gate alone decides), and beside it the comparison the gates' own
score makes: every kept copy, and the sub-policy it was copied from, scored with the penalized
AM-Q on `--ope-states` fresh start states with fresh model noise (`--ope-seed`), the choice taken
by the same rule on those scores. If an AM-Q choice was decided by the OPE's noise, fresh and more
start states change it; if they do not, what limits it is the OPE's bias.

    MINARI_DATASETS_PATH=<folder> python benchmarks/choice_rescore.py --checkpoint runs/<run>/offline.pt

`--ope-seed None` reuses the run's own AM-Q start states and noise (it reproduces the recorded
gated scores).
"""

import os
import sys
from dataclasses import dataclass

import numpy as np
import torch
import tyro

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import uepo_offline as offline  # noqa: E402
from diffusion import DiffusionPolicy  # noqa: E402
from dynamics import am_q_ratio, confident_choice, paired_gain_bound  # noqa: E402
from eval import fail, load_or_fail  # noqa: E402


@dataclass
class Args:
    checkpoint: str
    """offline checkpoint with improved copies (uepo_offline.py with --ope and --num-qualified > 0)"""
    ope_states: int = 1024
    """fresh dataset start states (the run's --ope-states is 256 by default)"""
    ope_seed: int | None = 100
    """start states drawn with this seed, model noise with ope_seed + 1; None: the run's own starts and noise"""


def rescored_ope(
    checkpoint: dict, ope_states: int, ope_seed: int | None
) -> tuple[offline.SubPolicyOPE, offline.SubPolicyOPE]:
    """The run's AM-Q (its critics, dynamics and elites) from fresh start states and model noise, or,
    with `ope_seed` None, exactly the run's own; and the run's offline-choice evaluator."""
    run = offline.Args(**checkpoint["args"])
    policy, tensors, is_terminal = offline.saved_run_data(checkpoint, run)
    ope, _ = offline.saved_run_ope(checkpoint, run, policy, tensors, is_terminal)
    choice_ope = offline.choice_evaluator(ope, tensors, run, checkpoint["max_episode_steps"] or 1000)
    if ope_seed is None:
        return ope, choice_ope
    generator = torch.Generator().manual_seed(ope_seed)
    starts = torch.randperm(len(tensors.raw_histories), generator=generator)[:ope_states]
    fresh = offline.SubPolicyOPE(
        ope.critics, ope.dynamics, is_terminal, tensors.raw_histories[starts], run.ope_horizon, ope_seed + 1, run.gamma
    )
    return fresh, choice_ope


def rescored_choice(checkpoint: dict, ope: offline.SubPolicyOPE, choice_ope: offline.SubPolicyOPE) -> dict:
    """Every kept copy (in the order its sub-policy qualified) scored by its model return
    (`choice_ope`) and, with its base sub-policy, by the gate's penalized AM-Q (`ope`); the offline
    choice taken on each. Returns {"copies": [{sub_policy, best_step, real_before, real_after,
    recorded, base, copy, gain, lower_bound, model_return}], "choice" and "comparisons" (by the
    model return: index into copies and confident_choice's comparisons), "ope_choice" and
    "ope_comparisons" (the same by AM-Q)}."""
    run = offline.Args(**checkpoint["args"])
    base_policy = DiffusionPolicy.from_checkpoint(checkpoint["policy"]).eval()
    copies, candidate_rollouts, candidate_returns = [], [], []
    for entry in sorted(checkpoint["improved"], key=lambda entry: -entry["base_ope_score"]):
        copy_policy = DiffusionPolicy.from_checkpoint(entry["policy"]).eval()
        copy_rollouts = ope.rollouts(copy_policy, entry["sub_policy"], run.ope_penalty)
        base_rollouts = ope.rollouts(base_policy, entry["sub_policy"], run.ope_penalty)
        gain, lower_bound = paired_gain_bound(copy_rollouts, base_rollouts, run.gate_confidence)
        returns = choice_ope.returns(copy_policy, entry["sub_policy"])
        candidate_rollouts.append(copy_rollouts)
        candidate_returns.append((returns, torch.ones_like(returns)))
        copies.append(
            {
                "sub_policy": entry["sub_policy"],
                "best_step": entry["best_step"],
                "real_before": entry["base_score"],
                "real_after": float(np.mean(entry["scores"])),
                "recorded": entry["ope_score"],
                "base": am_q_ratio(*base_rollouts).item(),
                "copy": am_q_ratio(*copy_rollouts).item(),
                "gain": gain,
                "lower_bound": lower_bound,
                "model_return": returns.mean().item(),
            }
        )
    choice, comparisons = confident_choice(candidate_returns, run.gate_confidence, run.gate_margin)
    ope_choice, ope_comparisons = confident_choice(candidate_rollouts, run.gate_confidence, run.gate_margin)
    return {
        "copies": copies,
        "choice": choice,
        "comparisons": comparisons,
        "ope_choice": ope_choice,
        "ope_comparisons": ope_comparisons,
    }


if __name__ == "__main__":
    args = tyro.cli(Args)
    torch.set_num_threads(1)
    if args.ope_states < 1:
        fail(f"--ope-states must be at least 1, got {args.ope_states}")
    checkpoint = load_or_fail(args.checkpoint)
    if not checkpoint.get("improved") or "critics" not in checkpoint:
        fail(f"{args.checkpoint} has no improved copies: run uepo_offline.py with --ope and --num-qualified > 0")
    result = rescored_choice(checkpoint, *rescored_ope(checkpoint, args.ope_states, args.ope_seed))
    where = "the run's own start states" if args.ope_seed is None else f"{args.ope_states} fresh start states"
    print(f"gated AM-Q on {where}")
    print(
        "| sub-policy | real before -> after (kept step) | gated OPE recorded | base -> copy here "
        "| copy's gain over its base (lower bound) | model return |"
    )
    print("|---|---|---|---|---|---|")
    for row in result["copies"]:
        print(
            f"| {row['sub_policy']} | {row['real_before']:.1f} -> {row['real_after']:.1f} ({row['best_step']}) | "
            f"{row['recorded']:.1f} | {row['base']:.1f} -> {row['copy']:.1f} | "
            f"{row['gain']:+.1f} ({row['lower_bound']:+.1f}) | {row['model_return']:.1f} |"
        )
    copies = result["copies"]
    for score, key in (("model return", "comparisons"), ("gated AM-Q", "ope_comparisons")):
        for index, gain, lower_bound, required in result[key]:
            verdict = "it replaces it" if lower_bound > required else "a tie, the earlier stays"
            print(
                f"by the {score}: sub-policy {copies[index]['sub_policy']} vs the choice so far: gain {gain:+.1f}, "
                f"lower bound {lower_bound:+.1f}, needs > {required:+.1f} ({verdict})"
            )
    chosen, by_ope = copies[result["choice"]], copies[result["ope_choice"]]
    recorded = next((entry for entry in checkpoint["improved"] if entry.get("choice_rank") == 0), None)
    print(
        f"offline choice here (model return): sub-policy {chosen['sub_policy']} (real {chosen['real_after']:.1f}); "
        f"by the gated AM-Q here: sub-policy {by_ope['sub_policy']} (real {by_ope['real_after']:.1f}); "
        + (
            "the run stopped before its choice"
            if recorded is None
            else f"the run chose sub-policy {recorded['sub_policy']} (real {np.mean(recorded['scores']):.1f})"
        )
    )
