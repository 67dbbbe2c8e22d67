"""benchmarks/benchmark.py: the job list (--dry-run), one tiny real benchmark ending in the report,
a failed job skipping its dependants, and bad arguments."""

import os
import re
import shlex
import subprocess
import sys

import pytest
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
                "--disagreement-coef",
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
