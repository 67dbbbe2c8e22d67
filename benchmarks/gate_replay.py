"""Gate rules compared on the same improvement runs (docs/experiments.md, "The gate's margin").

`record`: runs uepo_offline.py's improvement stage on a loop checkpoint (`--init-checkpoint`) with
a gate that also saves every snapshot it scores (weights and per-start OPE), then scores every
snapshot of every copy on fresh real episodes. With `qgrad` the copies train the same whatever the
gate keeps, so one recorded run answers for every gate rule. `--same-stream` sets torch's random
state to the one saved in the checkpoint for `--resume` before the stage starts: the stage then
draws what the one-command run draws after its loop.

`replay`: for every recorded run and every rule (confidence, margin), the snapshot each copy's
gate keeps and the copy the offline choice takes (`dynamics.BestSnapshot`, `confident_choice`),
and that copy's real score; a markdown table with the mean and the worst run per rule.

    MINARI_DATASETS_PATH=<folder> python benchmarks/gate_replay.py record runs/<run>/offline.pt \\
        b1_s11.pt --seed 11 --env-id hopper-medium    # --offline-flags="..." for a loop's own settings
    python benchmarks/gate_replay.py replay b1_s11.pt b1_s12.pt ...

The offline script runs as a program (`runpy`), as a user runs it; only the gate class is
swapped for one that records.
"""

import os
import runpy
import shlex
import sys
from dataclasses import dataclass

import numpy as np
import torch
import tyro

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import dynamics  # noqa: E402
from diffusion import DiffusionPolicy  # noqa: E402
from eval import evaluate_sub_policies, load_checkpoint  # noqa: E402


@dataclass
class Record:
    """improvement stage of uepo_offline.py with every gate snapshot saved and scored"""

    checkpoint: tyro.conf.Positional[str]
    """a loop checkpoint of uepo_offline.py (made with --ope)"""
    output: tyro.conf.Positional[str]
    """where to write the recorded snapshots (a torch file)"""
    env_id: str = "hopper-medium"
    """the offline script's --env-id"""
    seed: int = 1
    """the improvement stage's --seed (batches, OPE noise)"""
    episodes: int = 10
    """fresh real episodes per snapshot (reset with seeds seed * 1000 + 500 + e)"""
    same_stream: bool = False
    """continue torch's random stream saved in the checkpoint (what the one-command run does)"""
    offline_flags: str = ""
    """more flags for uepo_offline.py, one string (the loop's own settings, if not the defaults)"""


@dataclass
class Replay:
    """every gate rule on recorded runs: the offline choice's real score"""

    recorded: tyro.conf.Positional[tuple[str, ...]]
    """files written by `record`"""
    confidences: tuple[float, ...] = (0.0, 0.95, 0.99, 0.95, 0.95)
    """--gate-confidence of each rule"""
    margins: tuple[float, ...] = (0.0, 0.0, 0.0, 0.01, 0.02)
    """--gate-margin of each rule (paired with --confidences)"""


class RecordingGate(dynamics.BestSnapshot):
    """The offline script's gate, unchanged in its decisions, that also keeps every snapshot."""

    copies = []  # per improved copy: [(step, rollouts, weights or None for the start)]
    resume_rng = None  # torch's random state to start the stage from (--same-stream)

    def __init__(self, model, rollouts, step=0, confidence=0.0, margin=0.0):
        if RecordingGate.resume_rng is not None and not RecordingGate.copies:
            torch.set_rng_state(RecordingGate.resume_rng)
        RecordingGate.copies.append([(step, [part.cpu() for part in rollouts], None)])
        super().__init__(model, rollouts, step, confidence, margin)

    def offer(self, model, rollouts, step):
        weights = {key: value.detach().clone() for key, value in model.state_dict().items()}
        RecordingGate.copies[-1].append((step, [part.cpu() for part in rollouts], weights))
        return super().offer(model, rollouts, step)


def record(args: Record) -> None:
    if args.same_stream:
        RecordingGate.resume_rng = load_checkpoint(args.checkpoint)["resume"]["torch_rng"]
    dynamics.BestSnapshot = RecordingGate  # read by uepo_offline.py's import below
    run_path = args.output + ".run.pt"
    sys.argv = [os.path.join(ROOT, "uepo_offline.py"), "--env-id", args.env_id, "--seed", str(args.seed)]
    sys.argv += shlex.split(args.offline_flags) + ["--init-checkpoint", args.checkpoint, "--checkpoint-path", run_path]
    runpy.run_path(sys.argv[0], run_name="__main__")
    run = load_checkpoint(run_path)
    qualified = [entry["sub_policy"] for entry in sorted(run["improved"], key=lambda e: -e["base_ope_score"])]
    copies = []
    for sub_policy, snapshots in zip(qualified, RecordingGate.copies):
        scored = []
        for step, rollouts, weights in snapshots:
            policy = DiffusionPolicy.from_checkpoint(run["policy"]).eval()
            if weights is not None:
                policy.load_state_dict(weights)
            result = evaluate_sub_policies(
                policy,
                run["env_id"],
                args.episodes,
                seed=args.seed * 1000 + 500,
                ref_min_score=run["ref_min_score"],
                ref_max_score=run["ref_max_score"],
                max_episode_steps=run["max_episode_steps"],
                sub_policies=[sub_policy],
            )
            scored.append({"step": step, "rollouts": rollouts, "real": result["scores"][0].tolist()})
            print(f"sub-policy {sub_policy} step {step}: real {np.mean(scored[-1]['real']):.1f}", flush=True)
        copies.append({"sub_policy": sub_policy, "snapshots": scored})
    torch.save(copies, args.output)


def replayed_choice(copies: list, confidence: float, margin: float) -> tuple[list[int], int]:
    """Under one gate rule: the step each copy's gate keeps, and the index of the copy the offline
    choice takes (`dynamics.BestSnapshot` and `dynamics.confident_choice`, as in the script)."""
    kept = []
    for copy in copies:
        snapshots, holder = copy["snapshots"], torch.nn.Linear(1, 1)
        gate = dynamics.BestSnapshot(holder, snapshots[0]["rollouts"], 0, confidence, margin)
        accepted = [k for k in range(1, len(snapshots)) if gate.offer(holder, snapshots[k]["rollouts"], k)]
        kept.append(max([0] + accepted))
    rollouts = [copy["snapshots"][k]["rollouts"] for copy, k in zip(copies, kept)]
    choice, _ = dynamics.confident_choice(rollouts, confidence, margin)
    return [copy["snapshots"][k]["step"] for copy, k in zip(copies, kept)], choice


def offline_choice_score(copies: list, confidence: float, margin: float) -> float:
    """The real score of the snapshot the offline choice takes under one gate rule."""
    kept_steps, choice = replayed_choice(copies, confidence, margin)
    snapshot = next(s for s in copies[choice]["snapshots"] if s["step"] == kept_steps[choice])
    return float(np.mean(snapshot["real"]))


def replay(args: Replay) -> None:
    runs = [torch.load(path, weights_only=True) for path in args.recorded]
    names = [os.path.basename(path).removesuffix(".pt") for path in args.recorded]
    print("| rule (confidence, margin) | " + " | ".join(names) + " | mean | worst |")
    print("|---" * (len(names) + 3) + "|")
    rows = [("no improvement (AM-Q's pick)", [float(np.mean(run[0]["snapshots"][0]["real"])) for run in runs])]
    for confidence, margin in zip(args.confidences, args.margins):
        rows.append((f"({confidence}, {margin})", [offline_choice_score(run, confidence, margin) for run in runs]))
    for name, scores in rows:
        values = " | ".join(f"{score:.1f}" for score in scores)
        print(f"| {name} | {values} | {np.mean(scores):.1f} | {np.min(scores):.1f} |")


if __name__ == "__main__":
    command = tyro.extras.subcommand_cli_from_dict({"record": Record, "replay": Replay})
    if isinstance(command, Record):
        record(command)
    else:
        replay(command)
