"""benchmarks/benchmark.py: the job list (--dry-run), one tiny real benchmark ending in the report,
a failed job skipping its dependants, and bad arguments."""

import json
import os
import re
import shlex
import subprocess
import sys

import pytest
import torch
import tyro
from test_offline import TINY_MODEL, TINY_POLICY

from conftest import ROOT, TINY_DATASET_ID
from eval import load_checkpoint


def run_benchmark(arguments, cwd, minari_path=None, timeout=300):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    if minari_path is not None:
        env["MINARI_DATASETS_PATH"] = minari_path
    return subprocess.run(
        [sys.executable, os.path.join(ROOT, "benchmarks", "benchmark.py"), *arguments],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def run_tool(script: str, arguments: list, minari_path: str):
    """A script of benchmarks/ on the tiny dataset's folder, its output captured."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "MINARI_DATASETS_PATH": minari_path}
    return subprocess.run(
        [sys.executable, os.path.join(ROOT, "benchmarks", script), *map(str, arguments)],
        env=env,
        capture_output=True,
        text=True,
    )


def test_dry_run_lists_the_jobs_with_their_dependencies(tmp_path):
    """--dry-run prints one command per job, dependencies added and placed before their dependants,
    each with --exp-name <method>, the extra flags and the method's flags last (they win); it runs nothing."""
    result = run_benchmark(
        [
            "--dry-run",
            "--methods",
            "uepo-online",
            "diffusion-bc",
            "--seeds",
            "1",
            "2",
            "--env-ids",
            "hopper-medium",
            "walker2d-medium",
            "--runs-dir",
            "out",
            "--extra-offline-flags=--total-steps 30 --n-subpolicies 4",
            "--extra-online-flags=--total-timesteps 300",
        ],
        tmp_path,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert not (tmp_path / "out").exists()
    jobs = []  # (dataset, seed, method, command, the job it runs after)
    for line in result.stdout.strip().splitlines():
        command, _, after = line.partition("  # after ")
        words = shlex.split(command)
        flag = lambda name: words[len(words) - 1 - words[::-1].index(name) + 1]  # the last value given
        jobs.append((flag("--env-id"), int(flag("--seed")), flag("--exp-name"), words, after))
    assert len(jobs) == 2 * 2 * 4  # uepo-online needs uepo, which needs uepo-no-improvement
    order = [(dataset, seed, method) for dataset, seed, method, _, _ in jobs]
    for dataset in ("hopper-medium", "walker2d-medium"):
        for seed in (1, 2):
            chain = [order.index((dataset, seed, method)) for method in ("uepo-no-improvement", "uepo", "uepo-online")]
            assert chain == sorted(chain)
    # Longest chains first: every offline loop (3 jobs from it on), then every improvement stage (2).
    assert [method for _, _, method in order[:8]] == ["uepo-no-improvement"] * 4 + ["uepo"] * 4
    for dataset, seed, method, words, after in jobs:
        script = os.path.basename(words[1])
        assert words[0] == sys.executable and os.path.dirname(words[1]) == ROOT
        if method == "uepo-online":
            assert script == "uepo_online.py" and after == f"{dataset}__uepo__{seed}"
            assert words[words.index("--checkpoint") + 1] == os.path.join(
                str(tmp_path), "out", "runs", f"{dataset}__uepo__{seed}__*", "offline.pt"
            )
            assert "--total-timesteps 300" in shlex.join(words) and "--total-steps" not in words
            continue
        assert script == "uepo_offline.py" and "--total-steps 30" in shlex.join(words)
        assert "--total-timesteps" not in words
        if method == "uepo":
            assert after == f"{dataset}__uepo-no-improvement__{seed}"
            assert words[-2:] == [
                "--init-checkpoint",
                os.path.join(str(tmp_path), "out", "runs", f"{dataset}__uepo-no-improvement__{seed}__*", "offline.pt"),
            ]
        else:
            assert after == "" and "--init-checkpoint" not in words
        if method == "diffusion-bc":
            # The extra --n-subpolicies 4 comes first; the method's --n-subpolicies 1 is the last one, so it counts.
            assert words[-9:] == [
                "--no-ope",
                "--num-qualified",
                "0",
                "--n-subpolicies",
                "1",
                "--eta",
                "0",
                "--kl-coef",
                "0",
            ]
    assert {method for _, _, method, _, _ in jobs} == {"diffusion-bc", "uepo-no-improvement", "uepo", "uepo-online"}


def test_tiny_benchmark_runs_the_improvement_from_its_dependency_and_reports(minari_path, tmp_path):
    """`--methods uepo` trains uepo-no-improvement first, then runs uepo's improvement from that
    run's checkpoint; both land in <runs-dir>/runs/ named as the scripts name them, with a log per
    job, and the report ends the benchmark with the uepo column."""
    flags = shlex.join(TINY_POLICY + TINY_MODEL)  # TINY_POLICY carries --dataset-id
    result = run_benchmark(
        [
            "--methods",
            "uepo",
            "--seeds",
            "1",
            "--workers",
            "2",
            "--runs-dir",
            "bench",
            f"--extra-offline-flags={flags}",
        ],
        tmp_path,
        minari_path,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    runs = tmp_path / "bench" / "runs"
    prefix = TINY_DATASET_ID.replace("/", "-")
    folders = {name.split("__")[1]: runs / name for name in os.listdir(runs) if (runs / name).is_dir()}
    assert sorted(folders) == ["uepo", "uepo-no-improvement"]
    for method, folder in folders.items():
        assert re.fullmatch(rf"{re.escape(prefix)}__{method}__1__\d+", folder.name)
        assert (folder / "offline.pt").is_file()
        assert (tmp_path / "bench" / "logs" / f"hopper-medium__{method}__1.log").is_file()
    improved = load_checkpoint(str(folders["uepo"] / "offline.pt"))
    assert improved["args"]["init_checkpoint"] == str(folders["uepo-no-improvement"] / "offline.pt")
    assert improved["improved"]  # the improvement stage ran
    assert "2 done, 0 failed, 0 skipped" in result.stdout
    assert "| dataset | uepo |" in result.stdout and (runs / "report.md").is_file()
    assert "| dataset | uepo |" in (runs / "report.md").read_text()


def test_failed_job_skips_its_dependants_and_exits_non_zero(minari_path, tmp_path):
    """A job that fails (here refused by uepo_offline.py's own check) skips the job that starts from
    it; no report is made and the benchmark exits non-zero."""
    result = run_benchmark(
        ["--methods", "uepo", "--seeds", "1", "--runs-dir", "bench", "--extra-offline-flags=--total-steps 0"],
        tmp_path,
        minari_path,
    )
    assert result.returncode == 1
    assert "skip   hopper-medium__uepo__1 (hopper-medium__uepo-no-improvement__1 did not finish)" in result.stdout
    assert "0 done, 1 failed, 1 skipped" in result.stdout
    assert (
        "--total-steps must be >= 1"
        in (tmp_path / "bench" / "logs" / "hopper-medium__uepo-no-improvement__1.log").read_text()
    )
    assert not (tmp_path / "bench" / "runs" / "report.md").exists()


@pytest.mark.parametrize(
    "arguments, message",
    [
        (["--workers", "0"], "--workers must be in [1, 64], got 0"),
        (["--seeds", "-1"], "--seeds must be in [0, 4294967295], got -1"),
        (["--env-ids", "foo-bar"], "--env-ids takes datasets named `<env>-<quality>` with env in hopper"),
        (["--runs-dir", "a_file"], "--runs-dir a_file cannot be written: "),
        (["--methods", "uepo", "ppo"], "unknown method ppo; valid methods: diffusion-bc, uepo-no-improvement, uepo"),
        (["--seeds", "1", "1"], "--env-ids, --seeds and --methods must not repeat a value"),
    ],
)
def test_bad_arguments_are_refused_before_any_work(tmp_path, monkeypatch, arguments, message):
    """Numbers out of range, a dataset name that is none, an unwritable --runs-dir (a file), an unknown
    method and a repeated value are refused by the check with the valid values named."""
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    import benchmark

    monkeypatch.chdir(tmp_path)
    (tmp_path / "a_file").write_text("")
    problem = benchmark.check_args(tyro.cli(benchmark.Args, args=arguments))
    assert problem is not None and problem.startswith(message), problem


def test_a_refused_benchmark_exits_2_with_one_line_and_writes_nothing(tmp_path):
    """The command line's side of the check, also with --dry-run: exit 2, one line, nothing written."""
    result = run_benchmark(["--env-ids", "foo-bar", "--dry-run", "--runs-dir", "bench"], tmp_path, timeout=60)
    assert result.returncode == 2 and result.stderr.startswith("error: --env-ids takes datasets named")
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr
    assert not (tmp_path / "bench").exists()


def test_gate_replay_records_every_snapshot_and_replays_the_runs_own_decisions(
    offline_checkpoint, minari_path, tmp_path
):
    """benchmarks/gate_replay.py: `record` runs the improvement stage (two copies, snapshots at
    steps 0, 3, 6) and scores every snapshot on real episodes; replaying the run's own gate rule
    on the recorded OPE gives the steps its gate kept and the copy its offline choice took."""
    output = tmp_path / "recorded.pt"
    flags = shlex.join(TINY_POLICY + TINY_MODEL + ["--num-qualified", "2"])
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "MINARI_DATASETS_PATH": minari_path}
    script = os.path.join(ROOT, "benchmarks", "gate_replay.py")
    record = [sys.executable, script, "record", str(offline_checkpoint), str(output), "--episodes", "2"]
    result = subprocess.run(
        record + ["--same-stream", f"--offline-flags={flags}"], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr[-3000:]
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    from gate_replay import replayed_choice

    copies = torch.load(output, weights_only=True)
    run = load_checkpoint(str(output) + ".run.pt")
    assert [len(copy["snapshots"]) for copy in copies] == [3, 3]
    assert all(len(snapshot["real"]) == 2 for copy in copies for snapshot in copy["snapshots"])
    args = run["args"]
    kept_steps, choice = replayed_choice(copies, args["gate_confidence"], args["gate_margin"])
    by_sub_policy = {entry["sub_policy"]: entry for entry in run["improved"]}
    assert kept_steps == [by_sub_policy[copy["sub_policy"]]["best_step"] for copy in copies]
    assert copies[choice]["sub_policy"] == run["improved"][0]["sub_policy"]  # the run's offline choice
    table = subprocess.run(
        [sys.executable, script, "replay", str(output)], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert table.returncode == 0 and "| no improvement (AM-Q's pick) |" in table.stdout


def test_augmentation_volume_fills_each_buffer_to_its_cap_and_scores_the_model(
    offline_checkpoint, minari_path, monkeypatch
):
    """benchmarks/augmentation_volume.py: the start states it chooses let every refresh fill the
    buffer to ratio x |D| when nothing cuts the rollouts short (the tiny run's policy is too far
    from its data for the real filter to keep any step, and its random data terminates within a
    few steps: both are switched off here), none at ratio 0; each model gets a finite hold-out
    NLL and an AM-Q score per sub-policy, and the synthetic data changes the model (the NLLs differ)."""
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    from augmentation_volume import measure, starts_for_volume

    import uepo_offline

    assert starts_for_volume(2.0, 1000, 20) == 200 and starts_for_volume(0.5, 1001, 20) == 51
    monkeypatch.setattr(uepo_offline, "disagreement_threshold", lambda *args: float("inf"))
    monkeypatch.setattr(
        uepo_offline, "termination_fn", lambda task: lambda states: torch.zeros(len(states), dtype=torch.bool)
    )
    checkpoint = load_checkpoint(str(offline_checkpoint))
    runs = measure(checkpoint, (0.0, 1.0), steps=None)
    assert [run["ratio"] for run in runs] == [0.0, 1.0]
    assert runs[0]["buffer_sizes"] == [] and runs[0]["cap"] == 0
    assert len(runs[1]["buffer_sizes"]) == 2 and all(size == runs[1]["cap"] > 0 for size in runs[1]["buffer_sizes"])
    for run in runs:
        assert torch.isfinite(torch.tensor(run["holdout_nll"]))
        assert len(run["ope_scores"]) == len(run["real_scores"]) == checkpoint["policy"]["config"]["n_subpolicies"]
    assert runs[0]["holdout_nll"] != runs[1]["holdout_nll"]


def test_ope_diagnosis_recomputes_the_runs_am_q_beside_the_model_and_the_real_episode(offline_checkpoint, minari_path):
    """benchmarks/ope_diagnosis.py: one row per sub-policy whose AM-Q is the one the run recorded
    at its last evaluation (the same start states, model noise, elites and critics), with the
    model's and the real episode's reward per step and the model's one-step error (>= 0)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "MINARI_DATASETS_PATH": minari_path}
    script = os.path.join(ROOT, "benchmarks", "ope_diagnosis.py")
    result = subprocess.run(
        [sys.executable, script, "--checkpoint", str(offline_checkpoint)], env=env, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr[-3000:]
    checkpoint = load_checkpoint(str(offline_checkpoint))
    rows = [line.split("|")[1:-1] for line in result.stdout.splitlines() if re.match(r"\| \d+ \|", line)]
    recorded = checkpoint["history"]["ope_scores"][-1]
    assert len(rows) == len(recorded) == checkpoint["policy"]["config"]["n_subpolicies"]
    for row, ope in zip(rows, recorded):
        assert float(row[2]) == pytest.approx(ope, abs=0.051)
        assert float(row[6]) >= 0
    assert "Spearman with the real scores: AM-Q" in result.stdout
    missing = subprocess.run(
        [sys.executable, script, "--checkpoint", "no_such.pt"], env=env, capture_output=True, text=True
    )
    assert missing.returncode == 2 and "Traceback" not in missing.stderr


def test_loop_speed_times_each_learner_for_each_variant(minari_path):
    """benchmarks/loop_speed.py: one row per variant with a positive time for each learner."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "MINARI_DATASETS_PATH": minari_path}
    script = os.path.join(ROOT, "benchmarks", "loop_speed.py")
    arguments = ["--dataset-id", TINY_DATASET_ID, "--variants", "plain", "fused", "--steps", "3", "--warmup", "1"]
    result = subprocess.run([sys.executable, script, *arguments], env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [line.split("|")[1:-1] for line in result.stdout.splitlines() if re.match(r"\| (plain|fused) \|", line)]
    assert [row[0].strip() for row in rows] == ["plain", "fused"]
    assert all(float(value) > 0 for row in rows for value in row[1:5])
    refused = subprocess.run([sys.executable, script, "--variants", "jit"], env=env, capture_output=True, text=True)
    assert refused.returncode == 2 and "plain, fused, compile" in refused.stderr and "Traceback" not in refused.stderr


def test_choice_rescore_reproduces_the_runs_gated_scores_on_its_own_starts(offline_checkpoint, minari_path):
    """benchmarks/choice_rescore.py: on the run's own start states and noise the kept copy's gated
    AM-Q is the one its gate recorded, its model return the one the run recorded, and the choice
    by the model return is the run's; on fresh start states the same table is printed with other
    AM-Q scores; --ope-states 0 is refused without a traceback."""
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    import choice_rescore

    checkpoint = load_checkpoint(str(offline_checkpoint))
    own = choice_rescore.rescored_choice(checkpoint, *choice_rescore.rescored_ope(checkpoint, 8, None))
    recorded = sorted(checkpoint["improved"], key=lambda entry: -entry["base_ope_score"])
    assert [row["sub_policy"] for row in own["copies"]] == [entry["sub_policy"] for entry in recorded]
    for row, entry in zip(own["copies"], recorded):
        assert row["copy"] == pytest.approx(entry["ope_score"], rel=1e-4, abs=1e-3)
        assert row["model_return"] == pytest.approx(entry["model_return"], rel=1e-4, abs=1e-3)
    assert recorded[own["choice"]]["choice_rank"] == 0
    fresh = choice_rescore.rescored_choice(checkpoint, *choice_rescore.rescored_ope(checkpoint, 16, 100))
    assert fresh["copies"][0]["copy"] != pytest.approx(own["copies"][0]["copy"], rel=1e-6)
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    script = os.path.join(ROOT, "benchmarks", "choice_rescore.py")
    result = subprocess.run(
        [sys.executable, script, "--checkpoint", str(offline_checkpoint), "--ope-states", "16"],
        env=env,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert (
        "gated AM-Q on 16 fresh start states" in result.stdout and "offline choice here (model return)" in result.stdout
    )
    refused = subprocess.run(
        [sys.executable, script, "--checkpoint", str(offline_checkpoint), "--ope-states", "0"],
        env=env,
        capture_output=True,
        text=True,
    )
    assert refused.returncode == 2 and "--ope-states" in refused.stderr and "Traceback" not in refused.stderr


def test_seed_temperature_at_one_reproduces_the_runs_scores_and_at_zero_makes_one_policy(
    offline_checkpoint, minari_path, tmp_path
):
    """benchmarks/seed_temperature.py: at temperature 1 every sub-policy scores what the run's last
    evaluation recorded (the same episodes); at 0 every sub-policy starts from x_K = 0 with no
    perturbation noise, so all of them are one policy with one score."""
    out = tmp_path / "temperature.json"
    checkpoint = load_checkpoint(str(offline_checkpoint))
    episodes = len(checkpoint["history"]["scores"][-1][0])
    arguments = ["--checkpoint", offline_checkpoint, "--temperatures", 0, 1, "--episodes", episodes]
    seed = checkpoint["args"]["seed"]
    result = run_tool("seed_temperature.py", arguments + ["--seed", seed, "--json", out], minari_path)
    assert result.returncode == 0, result.stderr[-3000:]
    zero, one = json.loads(out.read_text())["rows"]
    recorded = [sum(scores) / len(scores) for scores in checkpoint["history"]["scores"][-1]]
    assert one["scores"] == pytest.approx(recorded, abs=1e-6)
    assert zero["best"] == pytest.approx(zero["worst"], abs=1e-6)


def test_scorers_rank_a_saved_runs_sub_policies_and_price_the_choice(offline_checkpoint, minari_path, tmp_path):
    """benchmarks/scorers.py: one score per sub-policy and scorer, AM-Q as the run recorded it, the
    penalized return never above the plain one (the penalty is >= 0), and per scorer a Spearman in
    [-1, 1] and a regret that is the best real score minus that of its first-ranked sub-policy."""
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    from scorers import SCORERS, regret

    assert regret([3.0, 1.0, 2.0], [10.0, 20.0, 5.0]) == 10.0 and regret([1.0, 3.0], [10.0, 20.0]) == 0.0
    out = tmp_path / "scorers.json"
    arguments = ["--critic-states", 64, "--episode-starts", 4, "--short-states", 16, "--short-steps", 8]
    result = run_tool("scorers.py", ["--checkpoint", offline_checkpoint, *arguments, "--json", out], minari_path)
    assert result.returncode == 0, result.stderr[-3000:]
    saved = json.loads(out.read_text())
    checkpoint = load_checkpoint(str(offline_checkpoint))
    n = checkpoint["policy"]["config"]["n_subpolicies"]
    assert all(len(saved["scores"][name]) == n for name in SCORERS)
    assert saved["scores"]["am_q"] == pytest.approx(checkpoint["history"]["ope_scores"][-1])
    assert all(p <= m + 1e-4 for p, m in zip(saved["scores"]["mopo_return"], saved["scores"]["model_return"]))
    for name in SCORERS:
        assert -1 <= saved["summary"][name]["spearman"] <= 1
        assert saved["summary"][name]["regret"] == pytest.approx(regret(saved["scores"][name], saved["real"]))


def test_dry_run_runs_the_baselines_with_their_own_flags(tmp_path):
    """The baseline methods run benchmarks/baselines.py with --algo <method>, the dataset, seed and
    --exp-name, the baseline extra flags and none of the offline script's."""
    result = run_benchmark(
        [
            "--dry-run",
            "--methods",
            "mse-bc",
            "td3-bc",
            "--seeds",
            "3",
            "--extra-offline-flags=--total-steps 30",
            "--extra-baseline-flags=--hidden 64",
        ],
        tmp_path,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    commands = [shlex.split(line) for line in result.stdout.strip().splitlines()]
    assert len(commands) == 2
    for words, method in zip(commands, ("mse-bc", "td3-bc")):
        assert words[1].endswith(os.path.join("benchmarks", "baselines.py"))
        assert words[2:] == [
            "--env-id", "hopper-medium", "--seed", "3", "--hidden", "64", "--exp-name", method, "--algo", method
        ]  # fmt: skip


def test_one_step_policies_loss_by_hand_and_a_run_on_a_saved_checkpoint(offline_checkpoint, minari_path, tmp_path):
    """benchmarks/one_step_policies.py. The loss by hand: with every Q > 0 the normalized Q term is
    exactly -w, so the loss is the distillation error minus w; sub-policy i of the students is
    mu(., eps_i) (column i of `sample`). Then a run on a saved checkpoint: one score per student and
    scorer, and w = 0 (distillation only) brings the students' chunks closer to the teacher's than
    an untrained network's."""
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    from one_step_policies import Args, OneStepPolicies, one_step_loss, teacher_chunks, train_students

    from diffusion import DiffusionPolicy

    checkpoint = load_checkpoint(str(offline_checkpoint))
    teacher = DiffusionPolicy.from_checkpoint(checkpoint["policy"]).eval()
    torch.manual_seed(0)
    students = OneStepPolicies(teacher, hidden=16)
    states = torch.randn(5, teacher.obs_horizon, teacher.config.obs_dim)
    chunks = students.sample(states).actions
    n = teacher.config.n_subpolicies
    assert chunks.shape == (5, n, teacher.horizon, teacher.config.act_dim)
    last = n - 1
    assert torch.allclose(chunks[:, last], students(states, teacher.sub_policy_noise[last].expand(5, -1, -1)))

    class PositiveCritic:  # Q(s, a) = 2 + sum(a^2): positive everywhere
        def q(self, s, a):
            return 2 + (a**2).flatten(1).sum(-1)

    targets = torch.zeros(5, teacher.horizon, teacher.config.act_dim)
    index = torch.arange(5) % n
    log = one_step_loss(students, PositiveCritic(), states, targets, index, q_weight=0.7)
    expected = (students(states, teacher.sub_policy_noise[index]) ** 2).mean() - 0.7
    assert log["loss"].item() == pytest.approx(expected.item(), abs=1e-6)

    targets = teacher_chunks(teacher, states, batch_size=2)
    assert torch.allclose(targets, teacher.sample(states).actions, atol=1e-6)
    untrained = ((OneStepPolicies(teacher, hidden=64).sample(states).actions - targets) ** 2).mean()
    trained = train_students(
        PositiveCritic(), states, targets, 0.0, Args(checkpoint="", steps=300, batch_size=5, hidden=64), teacher
    )
    assert ((trained.sample(states).actions - targets) ** 2).mean() < 0.5 * untrained

    out = tmp_path / "one_step.json"
    arguments = ["--q-weights", 0, 1, "--steps", 20, "--distill-states", 64, "--episodes", 1, "--episode-starts", 2]
    result = run_tool(
        "one_step_policies.py", ["--checkpoint", offline_checkpoint, *arguments, "--json", out], minari_path
    )
    assert result.returncode == 0, result.stderr[-3000:]
    saved = json.loads(out.read_text())
    assert [row["q_weight"] for row in saved["results"]] == [0, 1]
    for row in saved["results"]:
        assert len(row["real"]) == n and all(len(row["scores"][name]) == n for name in row["summary"])
    refused = run_tool("one_step_policies.py", ["--checkpoint", offline_checkpoint, "--q-weights", -1], minari_path)
    assert refused.returncode == 2 and "--q-weights" in refused.stderr and "Traceback" not in refused.stderr


def test_seed_bank_group_zero_is_the_run_and_the_bank_grows_by_fresh_groups(offline_checkpoint, minari_path, tmp_path):
    """benchmarks/seed_bank.py: group 0 is the run's own sub-policies (its real scores and AM-Q as
    the run's last evaluation recorded them, on the same episodes), each further group adds n
    sub-policies with fresh seeds, and the bank's summary picks the argmax of each scorer."""
    out = tmp_path / "bank.json"
    checkpoint = load_checkpoint(str(offline_checkpoint))
    episodes = len(checkpoint["history"]["scores"][-1][0])
    arguments = ["--groups", 2, "--episodes", episodes, "--seed", checkpoint["args"]["seed"], "--episode-starts", 2]
    result = run_tool("seed_bank.py", ["--checkpoint", offline_checkpoint, *arguments, "--json", out], minari_path)
    assert result.returncode == 0, result.stderr[-3000:]
    saved = json.loads(out.read_text())
    n = checkpoint["policy"]["config"]["n_subpolicies"]
    recorded = [sum(scores) / len(scores) for scores in checkpoint["history"]["scores"][-1]]
    assert len(saved["real"]) == 2 * n and saved["real"][:n] == pytest.approx(recorded, abs=1e-6)
    assert saved["scores"]["am_q"][:n] == pytest.approx(checkpoint["history"]["ope_scores"][-1], rel=1e-4)
    assert saved["scores"]["am_q"][n:] != pytest.approx(saved["scores"]["am_q"][:n], rel=1e-4)
    for name, values in saved["scores"].items():
        pick = max(range(2 * n), key=lambda i: values[i])
        assert saved["bank"][name]["pick"] == pick and saved["bank"][name]["pick_real"] == saved["real"][pick]
