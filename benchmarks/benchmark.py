"""The paper-style results table in one command (as CleanRL's `cleanrl_utils/benchmark.py`).

Runs every dataset x seed x method as its own process, at most `--workers` at a time, then
`python benchmarks/report.py` over the runs. The README's offline table (3 seeds of hopper-medium):

    MINARI_DATASETS_PATH=<folder> python benchmarks/benchmark.py --env-ids hopper-medium \\
        --seeds 1 2 3 --methods diffusion-bc uepo-no-improvement uepo --workers 2

Every job runs with its working directory set to `--runs-dir`, so the scripts write their runs to
`<runs-dir>/runs/{dataset}__{method}__{seed}__{time}/` (the method is the run's `--exp-name`, the
report's column) and each job's output to `<runs-dir>/logs/{dataset}__{method}__{seed}.log`.
Use a fresh `--runs-dir` per benchmark: the report reads every checkpoint under `<runs-dir>/runs`.
The scripts are run as subprocesses, never imported.
"""

import glob
import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass

import tyro

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from eval import GYM_ENV_IDS, SEED_RANGE, is_dataset_name, out_of_range, unwritable  # noqa: E402

# method (= --exp-name = report column) -> (script, the method whose checkpoint it starts from, its flags).
# `uepo` runs only the improvement stage on the same seed's `uepo-no-improvement` checkpoint
# (--init-checkpoint), so the offline loop is trained once for both columns.
METHODS = {
    "diffusion-bc": (
        "uepo_offline.py",
        None,
        ["--no-ope", "--num-qualified", "0", "--n-subpolicies", "1", "--eta", "0", "--disagreement-coef", "0"],
    ),
    "uepo-no-improvement": ("uepo_offline.py", None, ["--num-qualified", "0"]),
    "uepo": ("uepo_offline.py", "uepo-no-improvement", []),
    "uepo-online": ("uepo_online.py", "uepo", []),
    # The per-step baselines a user would run instead (benchmarks/baselines.py).
    "mse-bc": ("benchmarks/baselines.py", None, ["--algo", "mse-bc"]),
    "td3-bc": ("benchmarks/baselines.py", None, ["--algo", "td3-bc"]),
}


@dataclass
class Args:
    env_ids: tuple[str, ...] = ("hopper-medium",)
    """datasets (D4RL-style names, the scripts' `--env-id`): the rows of the table"""
    seeds: tuple[int, ...] = (1, 2, 3)
    """seeds of every dataset and method"""
    methods: tuple[str, ...] = ("diffusion-bc", "uepo-no-improvement", "uepo")
    """methods, the columns of the table in this order (the methods they start from are added and run too)"""
    workers: int = 2
    """jobs running at the same time"""
    threads: int = 1
    """OMP_NUM_THREADS / MKL_NUM_THREADS of every job"""
    runs_dir: str = "benchmark_runs"
    """output folder: the jobs run in it (runs/ and logs/ inside), and the report goes to <runs-dir>/runs/report.md"""
    extra_offline_flags: str = ""
    """flags added to every uepo_offline.py command, one string (`--extra-offline-flags="--total-steps 100"`)"""
    extra_online_flags: str = ""
    """flags added to every uepo_online.py command, one string (`--extra-online-flags="--total-timesteps 1000"`)"""
    extra_baseline_flags: str = ""
    """flags added to every benchmarks/baselines.py command, one string (`--extra-baseline-flags="--hidden 64"`)"""
    dry_run: bool = False
    """print the commands in the order they would start, run nothing"""


@dataclass(frozen=True)
class Job:
    env_id: str
    seed: int
    method: str

    @property
    def name(self) -> str:
        return f"{self.env_id}__{self.method}__{self.seed}"

    @property
    def dependency(self) -> "Job | None":
        parent = METHODS[self.method][1]
        return None if parent is None else Job(self.env_id, self.seed, parent)


def chain_length(method: str, needed: set[str]) -> int:
    """How many jobs of one dataset and seed run one after the other from this method's job on: 1
    plus the longest chain among the needed methods that start from its checkpoint."""
    dependants = [other for other in needed if METHODS[other][1] == method]
    return 1 + max((chain_length(other, needed) for other in dependants), default=0)


def check_args(args: Args) -> str | None:
    """The first argument out of its range, as a one-line message (None if all are valid)."""
    problem = out_of_range(args, {"workers": "[1, 64]", "threads": "[1, 256]", "seeds": SEED_RANGE})
    if problem is not None:
        return problem
    for name in ("env_ids", "seeds", "methods"):
        if not getattr(args, name):
            return f"--{name.replace('_', '-')} needs at least one value"
    unknown = [method for method in args.methods if method not in METHODS]
    if unknown:
        return f"unknown method {', '.join(unknown)}; valid methods: {', '.join(METHODS)}"
    if (
        len(set(args.methods)) < len(args.methods)
        or len(set(args.seeds)) < len(args.seeds)
        or len(set(args.env_ids)) < len(args.env_ids)
    ):
        return "--env-ids, --seeds and --methods must not repeat a value"
    unknown = [env_id for env_id in args.env_ids if not is_dataset_name(env_id)]
    if unknown:
        return (
            f"--env-ids takes datasets named `<env>-<quality>` with env in {', '.join(GYM_ENV_IDS)} "
            f"(e.g. hopper-medium), got {', '.join(unknown)}"
        )
    problem = unwritable(args.runs_dir)
    if problem is not None:
        return f"--runs-dir {args.runs_dir} cannot be written: {problem}"
    for name in ("extra_offline_flags", "extra_online_flags", "extra_baseline_flags"):
        try:
            shlex.split(getattr(args, name))
        except ValueError as error:
            return f"--{name.replace('_', '-')}: {error}"
    return None


def run_prefix(args: Args, env_id: str) -> str:
    """The first part of an offline run's folder name: uepo_offline.py names it after --dataset-id
    (with / replaced by -) when one is given, else after --env-id."""
    flags, dataset_id = shlex.split(args.extra_offline_flags), None
    for flag, value in zip(flags, flags[1:] + [None]):
        if flag == "--dataset-id":
            dataset_id = value
        elif flag.startswith("--dataset-id="):
            dataset_id = flag.split("=", 1)[1]
    return env_id if dataset_id is None else dataset_id.replace("/", "-")


def checkpoint_of(args: Args, job: Job) -> str:
    """The glob of the offline.pt written by the job this one depends on (several matches: the newest run)."""
    parent = job.dependency
    return os.path.join(
        os.path.abspath(args.runs_dir),
        "runs",
        f"{run_prefix(args, parent.env_id)}__{parent.method}__{parent.seed}__*",
        "offline.pt",
    )


def command(args: Args, job: Job, checkpoint: str | None) -> list[str]:
    # Extra flags come before the method's own, so the flags that define a method always win (the last one counts).
    script, _, flags = METHODS[job.method]
    base = [sys.executable, os.path.join(ROOT, script)]
    if script == "uepo_online.py":
        return base + [
            "--checkpoint",
            checkpoint,
            "--env-id",
            job.env_id,
            "--seed",
            str(job.seed),
            *shlex.split(args.extra_online_flags),
            "--exp-name",
            job.method,
            *flags,
        ]
    if script == "benchmarks/baselines.py":
        extra = shlex.split(args.extra_baseline_flags)
        return base + ["--env-id", job.env_id, "--seed", str(job.seed), *extra, "--exp-name", job.method, *flags]
    init = [] if checkpoint is None else ["--init-checkpoint", checkpoint]
    return base + [
        "--env-id",
        job.env_id,
        "--seed",
        str(job.seed),
        *shlex.split(args.extra_offline_flags),
        "--exp-name",
        job.method,
        *flags,
        *init,
    ]


if __name__ == "__main__":
    args = tyro.cli(Args)
    if (problem := check_args(args)) is not None:
        print(f"error: {problem}", file=sys.stderr)
        sys.exit(2)

    # The requested methods plus the ones they start from, in METHODS' order (a dependency comes first).
    needed = set(args.methods)
    for method in args.methods:
        while (method := METHODS[method][1]) is not None:
            needed.add(method)
    jobs = [
        Job(env_id, seed, method)
        for env_id in args.env_ids
        for seed in args.seeds
        for method in METHODS
        if method in needed
    ]
    # Start order: the jobs that head the longest chain of needed jobs first (for the README's table,
    # every seed's offline loop before the improvement stages and behaviour cloning), so the last
    # chain does not start late and leave a worker idle at the end; the sort is stable, so a
    # dependency still comes before its dependants.
    jobs.sort(key=lambda job: -chain_length(job.method, needed))

    if args.dry_run:
        for job in jobs:
            after = f"  # after {job.dependency.name}" if job.dependency else ""
            checkpoint = checkpoint_of(args, job) if job.dependency else None
            print(shlex.join(command(args, job, checkpoint)) + after)
        sys.exit(0)

    runs_dir = os.path.abspath(args.runs_dir)
    os.makedirs(os.path.join(runs_dir, "logs"), exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
    status = {}  # job -> "done" | "failed" | "skipped"
    pending, running, start = list(jobs), {}, time.time()
    print(f"{len(jobs)} jobs, {args.workers} workers, output in {runs_dir}", flush=True)
    while pending or running:
        for job, (process, log, started) in list(running.items()):
            if process.poll() is not None:
                log.close()
                status[job] = "done" if process.returncode == 0 else "failed"
                print(
                    f"[{time.time() - start:7.0f}s] {status[job]:6s} {job.name} (exit code "
                    f"{process.returncode}, {time.time() - started:.0f}s)",
                    flush=True,
                )
                del running[job]
        for job in list(pending):
            if job.dependency is not None and status.get(job.dependency) in ("failed", "skipped"):
                status[job] = "skipped"  # its input was never made
                print(
                    f"[{time.time() - start:7.0f}s] skip   {job.name} ({job.dependency.name} did not finish)",
                    flush=True,
                )
                pending.remove(job)
            elif len(running) < args.workers and (job.dependency is None or status.get(job.dependency) == "done"):
                pending.remove(job)
                checkpoint = None
                if job.dependency is not None:
                    # The newest match is the run the dependency just made (older ones: an earlier benchmark).
                    found = sorted(glob.glob(checkpoint_of(args, job)), key=os.path.getmtime)
                    if not found:
                        status[job] = "failed"
                        print(
                            f"[{time.time() - start:7.0f}s] failed {job.name} (no checkpoint "
                            f"{checkpoint_of(args, job)})",
                            flush=True,
                        )
                        continue
                    checkpoint = found[-1]
                log_path = os.path.join(runs_dir, "logs", f"{job.name}.log")
                log = open(log_path, "w")
                process = subprocess.Popen(
                    command(args, job, checkpoint), cwd=runs_dir, env=env, stdout=log, stderr=subprocess.STDOUT
                )
                running[job] = (process, log, time.time())
                print(f"[{time.time() - start:7.0f}s] start  {job.name} (log: {log_path})", flush=True)
        time.sleep(0.5)

    counts = {state: sum(value == state for value in status.values()) for state in ("done", "failed", "skipped")}
    print(
        f"[{time.time() - start:7.0f}s] {counts['done']} done, {counts['failed']} failed, {counts['skipped']} skipped",
        flush=True,
    )
    # The report's columns: the requested methods, in order, that have at least one finished run.
    columns = [m for m in args.methods if any(status[j] == "done" for j in jobs if j.method == m)]
    report_rc = 0
    if columns:
        report_rc = subprocess.run(
            [
                sys.executable,
                os.path.join(ROOT, "benchmarks", "report.py"),
                os.path.join(runs_dir, "runs"),
                "--methods",
                *columns,
            ],
            cwd=ROOT,
        ).returncode
    sys.exit(1 if counts["failed"] or report_rc else 0)  # a skipped job means a failed one
