"""Bad input gets a clear error and loses nothing: every argument of eval.py and benchmarks/ checked
before any work, checkpoints validated on load (fields, sizes before any network is built, finite
weights, environment and dataset), non-finite results never reported as numbers, and uepo_online.py's
output paths checked before training and its selection never choosing a non-finite score."""

import dataclasses
import functools
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
import typing

import pytest
import torch
from test_diffusion import make_policy
from test_eval import hand_made_run, run_eval
from test_online import TINY_ONLINE, run_online

from conftest import ROOT
from eval import (
    CheckpointError,
    PolicyArgs,
    build_saved,
    check_policy_args,
    load_checkpoint,
    save_checkpoint,
)

sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
import robustness  # noqa: E402
import speed  # noqa: E402
from report import ReportArgs, check_report_args  # noqa: E402
from robustness import RobustnessArgs, check_robustness_args  # noqa: E402
from speed import SpeedArgs, check_speed_args  # noqa: E402

from uepo_online import Args, check_args, choose_candidate, with_algo_defaults


def rewritten(source, target, change):
    """A copy of the checkpoint `source` at `target`, with `change(checkpoint)` applied (raw torch.load,
    so that the change is made to the file exactly as written)."""
    checkpoint = torch.load(str(source), weights_only=True)
    change(checkpoint)
    save_checkpoint(checkpoint, str(target))
    return target


def first_denoiser_weight(saved_policy: dict) -> str:
    return next(key for key in saved_policy["state_dict"] if key.startswith("denoiser.") and key.endswith("weight"))


def set_nan_weight(saved_policy: dict) -> None:
    saved_policy["state_dict"][first_denoiser_weight(saved_policy)].view(-1)[0] = float("nan")


def refused(result, *words):
    """A command that stopped on bad input: exit 2, each word in its one-line message, no traceback."""
    assert result.returncode == 2, (result.returncode, result.stderr[-2000:])
    assert "Traceback" not in result.stderr, result.stderr[-2000:]
    for word in words:
        assert word in result.stderr, (word, result.stderr[-2000:])


# ---- eval.py and benchmarks/: every argument checked before any work -----------------------------------------
NAN, INF = float("nan"), float("inf")


@pytest.mark.parametrize(
    "kind, changes, message",
    [
        ("policy", {"episodes": 0}, "--episodes must be in [1, 1000], got 0"),
        ("policy", {"episodes": 10**6}, "--episodes must be in [1, 1000]"),
        ("policy", {"seed": -1}, "--seed must be in [0, 4294967295], got -1"),
        ("policy", {"sub_policy": -1}, "--sub-policy must be in [0, 63], got -1"),
        ("policy", {"divergence_states": 0}, "--divergence-states must be in [1, 100000], got 0"),
        ("policy", {"checkpoint": "no_such.pt"}, "--checkpoint no_such.pt: no such file"),
        ("robustness", {"episodes": 0}, "--episodes must be in [1, 1000], got 0"),
        ("robustness", {"observation_noise": (0.1, NAN)}, "--observation-noise must be in [0, 100], got nan"),
        ("robustness", {"action_noise": (-0.1,)}, "--action-noise must be in [0, 100], got -0.1"),
        ("robustness", {"push": (INF,)}, "--push must be in [0, 100], got inf"),
        ("robustness", {"mass": (NAN,)}, "--mass must be in (-1, 100], got nan"),
        ("robustness", {"friction": (0.1, -1.0)}, "--friction must be in (-1, 100], got -1.0"),
        ("report", {"runs_dir": "no_such_folder"}, "RUNS_DIR: no folder no_such_folder"),
        ("report", {"methods": ("ft", "ft")}, "--methods names a method twice"),
        ("report", {"methods": ("",)}, "--methods: a method name is empty"),
        ("speed", {"batch_size": 0}, "--batch-size must be in [1, 65536], got 0"),
        ("speed", {"gradient_steps": 0}, "--gradient-steps must be in [1, 100000], got 0"),
        ("speed", {"decisions": -3}, "--decisions must be in [1, 100000], got -3"),
        ("speed", {"online_timesteps": 0}, "--online-timesteps must be in [1, 10000000], got 0"),
        ("speed", {"gym_id": "NoSuchEnv-v0"}, "--gym-id NoSuchEnv-v0 is not a registered Gymnasium environment"),
    ],
)
def test_eval_argument_checks_name_the_flag_and_its_range(tmp_path, monkeypatch, kind, changes, message):
    """The defaults pass; each bad value is refused with the flag and its range."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "some.pt").write_bytes(b"")  # the checks look only at the file's existence
    (tmp_path / "runs").mkdir()
    args_type, check, required = {
        "policy": (PolicyArgs, check_policy_args, {"checkpoint": "some.pt"}),
        "robustness": (RobustnessArgs, check_robustness_args, {"checkpoint": "some.pt"}),
        "report": (ReportArgs, check_report_args, {"runs_dir": "runs"}),
        "speed": (SpeedArgs, check_speed_args, {}),
    }[kind]
    assert check(args_type(**required)) is None
    problem = check(args_type(**{**required, **changes}))
    assert problem is not None and message in problem, problem


@pytest.mark.parametrize("kind", ["policy", "robustness", "speed", "report"])
def test_eval_output_paths_are_checked_writable_at_the_start(tmp_path, monkeypatch, kind):
    """An output file under a regular file (no folder can be made there) or an output that is a folder
    is refused, naming the flag; a not-yet-existing folder is fine (the writers make it)."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "some.pt").write_bytes(b"")
    (tmp_path / "a_file").write_text("")
    (tmp_path / "runs").mkdir()
    if kind == "report":
        assert check_report_args(ReportArgs("runs", out="new/folder")) is None
        problem = check_report_args(ReportArgs("runs", out="a_file/report"))
        assert "--out a_file/report" in problem and "a_file is a file, not a folder" in problem
        return
    args_type, check, required = {
        "policy": (PolicyArgs, check_policy_args, {"checkpoint": "some.pt"}),
        "robustness": (RobustnessArgs, check_robustness_args, {"checkpoint": "some.pt"}),
        "speed": (SpeedArgs, check_speed_args, {}),
    }[kind]
    assert check(args_type(**required, json="new/folder/out.json")) is None
    problem = check(args_type(**required, json="a_file/out.json"))
    assert "--json a_file/out.json cannot be written" in problem and "is a file, not a folder" in problem
    assert "is a folder; give a file name" in check(args_type(**required, json="runs"))


@pytest.mark.parametrize(
    "arguments, message",
    [
        (
            ["policy", "--checkpoint", "some.pt", "--episodes", "0", "--json", "out.json"],
            "--episodes must be in [1, 1000]",
        ),
        (
            ["robustness", "--checkpoint", "some.pt", "--observation-noise", "0.1", "nan", "--json", "out.json"],
            "--observation-noise must be in [0, 100], got nan",
        ),
        (["report", "runs", "--out", "a_file/report"], "--out a_file/report"),
        (["speed", "--batch-size", "0", "--json", "out.json"], "--batch-size must be in [1, 65536], got 0"),
    ],
)
def test_each_eval_subcommand_refuses_bad_arguments_on_its_command_line(tmp_path, arguments, message):
    """Through the real command line: exit 2, one line naming the flag, no traceback, nothing written."""
    (tmp_path / "some.pt").write_bytes(b"")
    (tmp_path / "a_file").write_text("")
    (tmp_path / "runs").mkdir()
    result = run_eval(arguments, tmp_path)
    refused(result, message)
    assert len(result.stderr.strip().splitlines()) == 1 and result.stdout == ""
    assert not (tmp_path / "out.json").exists()


# ---- checkpoint validation on load -------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "phase, change, field",
    [
        ("offline", lambda c: c.pop("ref_max_score"), "has no field ref_max_score"),
        ("offline", lambda c: c["args"].pop("gamma"), "has no field args.gamma"),
        ("offline", lambda c: c["policy"]["state_dict"].pop("state_std"), "has no field policy.state_dict.state_std"),
        ("offline", lambda c: c["improved"][0].pop("ope_score"), "has no field improved[0].ope_score"),
        ("offline", lambda c: c["history"].pop("scores"), "has no field history.scores"),
        ("online", lambda c: c.pop("actor"), "has no field actor"),
        ("online", lambda c: c["actor"].pop("policy_config"), "has no field actor.policy_config"),
        ("online", lambda c: c["history"].pop("step"), "has no field history.step"),
    ],
)
def test_a_checkpoint_with_a_missing_field_is_refused_naming_the_file_and_the_field(
    offline_checkpoint, online_run, tmp_path, phase, change, field
):
    source = offline_checkpoint if phase == "offline" else online_run[1]
    load_checkpoint(str(source))  # the complete checkpoint loads
    path = rewritten(source, tmp_path / "incomplete.pt", change)
    with pytest.raises(CheckpointError) as error:
        load_checkpoint(str(path))
    assert str(path) in str(error.value) and field in str(error.value)


@pytest.mark.parametrize(
    "phase, where, change",
    [
        ("offline", "policy", lambda c: c["policy"]["config"].update(mlp_hidden=10**7)),
        (
            "offline",
            "improved",
            lambda c: c["improved"][0]["policy"]["config"].update(denoiser="unet", unet_dims=(64, 2**20)),
        ),
        ("offline", "policy", lambda c: c["policy"]["config"].update(n_subpolicies=10**6)),
        ("offline", "policy", lambda c: c["policy"]["config"].update(chunk_size=4.5)),
        ("offline", "policy", lambda c: c["policy"]["config"].update(diffusion_steps=10**9)),
        ("online", "actor", lambda c: c["actor"]["policy_config"].update(obs_dim=10**9)),
    ],
)
def test_a_config_asking_for_enormous_networks_is_refused_before_anything_is_allocated(
    offline_checkpoint, online_run, tmp_path, phase, where, change
):
    """A saved size changed (to billions of units, or to a fraction) while the tensors stay: building
    the network it describes is refused, naming it, at once: the sizes meet the saved tensors on the
    meta device, which allocates nothing (a real 10^7-wide layer would not fit in memory)."""
    path = rewritten(offline_checkpoint if phase == "offline" else online_run[1], tmp_path / "huge.pt", change)
    checkpoint = load_checkpoint(str(path))
    saved = checkpoint["improved"][0]["policy"] if where == "improved" else checkpoint[where]
    start = time.time()
    with pytest.raises(CheckpointError) as error:
        build_saved(saved, f"the saved {where}")
    assert f"the saved {where} does not fit its saved config" in str(error.value) and time.time() - start < 30


def test_policy_refuses_a_checkpoint_with_an_enormous_width_at_once(offline_checkpoint, tmp_path):
    path = rewritten(offline_checkpoint, tmp_path / "huge.pt", lambda c: c["policy"]["config"].update(mlp_hidden=10**7))
    start = time.time()
    result = run_eval(["policy", "--checkpoint", str(path), "--episodes", "1", "--no-divergence"], tmp_path)
    refused(result, str(path), "does not fit its saved config", "size mismatch")
    assert time.time() - start < 60  # no 10^7-wide layers were allocated (nor episodes run)


@pytest.mark.parametrize("phase", ["offline", "online"])
def test_a_checkpoint_with_a_nan_weight_is_refused_on_load(offline_checkpoint, online_run, tmp_path, phase):
    if phase == "offline":
        source, where = offline_checkpoint, "improved[0].policy.state_dict."
        change = lambda c: set_nan_weight(c["improved"][0]["policy"])
    else:
        source, where = online_run[1], "actor.state_dict.log_std"
        change = lambda c: c["actor"]["state_dict"]["log_std"].view(-1)[1].fill_(float("inf"))
    path = rewritten(source, tmp_path / "nan.pt", change)
    with pytest.raises(CheckpointError) as error:
        load_checkpoint(str(path))
    assert str(path) in str(error.value) and where in str(error.value) and "non-finite weights" in str(error.value)


def test_policy_on_a_checkpoint_with_a_nan_weight_fails_instead_of_printing_nan(offline_checkpoint, tmp_path):
    path = rewritten(offline_checkpoint, tmp_path / "nan.pt", lambda c: set_nan_weight(c["policy"]))
    result = run_eval(["policy", "--checkpoint", str(path), "--episodes", "1", "--no-divergence"], tmp_path)
    refused(result, str(path), "policy.state_dict.denoiser.", "non-finite weights")
    assert "nan" not in result.stdout


def test_policy_and_robustness_fail_on_non_finite_results_from_finite_weights(offline_checkpoint, tmp_path):
    """A zero state std (finite, so the file loads) turns every state into +-inf or NaN and the actions
    into NaN: the episodes' returns are NaN, and the commands say so instead of reporting them."""

    def zero_std(checkpoint):
        for saved in [checkpoint["policy"]] + [entry["policy"] for entry in checkpoint["improved"]]:
            saved["state_dict"]["state_std"].zero_()

    path = rewritten(offline_checkpoint, tmp_path / "zero_std.pt", zero_std)
    out = tmp_path / "policy.json"
    result = run_eval(
        ["policy", "--checkpoint", str(path), "--episodes", "1", "--no-divergence", "--json", str(out)], tmp_path
    )
    refused(result, str(path), "gave non-finite results", "sub-policy 0")
    assert not out.exists() and "nan +- nan" not in result.stdout
    result = run_eval(
        [
            "robustness",
            "--checkpoint",
            str(path),
            "--episodes",
            "1",
            "--mass",
            "--friction",
            "--push",
            "--observation-noise",
            "--action-noise",
            "0.1",
        ],
        tmp_path,
    )
    refused(result, str(path), "gave non-finite results", "under none at strength 0")


def test_a_checkpoint_whose_weights_do_not_fit_its_config_is_refused_when_built(offline_checkpoint, tmp_path):
    """Sizes in bounds and finite weights, but a tensor of the wrong shape: a message, not a traceback."""

    def truncate(checkpoint):
        for saved in [checkpoint["policy"]] + [entry["policy"] for entry in checkpoint["improved"]]:
            key = first_denoiser_weight(saved)
            saved["state_dict"][key] = saved["state_dict"][key][:-1].clone()

    path = rewritten(offline_checkpoint, tmp_path / "misfit.pt", truncate)
    load_checkpoint(str(path))  # nothing to see before building
    result = run_eval(["robustness", "--checkpoint", str(path), "--episodes", "1"], tmp_path)
    refused(result, str(path), "does not fit its saved config", "size mismatch")


class NotATensor:
    pass


def test_an_unsafe_file_is_refused_without_suggesting_weights_only_false(tmp_path):
    torch.save({"format": "uepo-v1", "payload": NotATensor()}, str(tmp_path / "unsafe.pt"))
    with pytest.raises(CheckpointError) as error:
        load_checkpoint(str(tmp_path / "unsafe.pt"))
    message = str(error.value)
    assert "NotATensor" in message and "can run code" in message and "weights_only" not in message
    (tmp_path / "text.pt").write_text("not a checkpoint")
    with pytest.raises(CheckpointError, match="not a readable checkpoint") as error:
        load_checkpoint(str(tmp_path / "text.pt"))
    assert "weights_only" not in str(error.value)


# ---- the dataset of a checkpoint -------------------------------------------------------------------------------
def test_a_checkpoint_of_another_dataset_of_the_same_environment_is_refused(offline_checkpoint, tmp_path):
    path = rewritten(
        offline_checkpoint, tmp_path / "expert.pt", lambda c: c.update(dataset_id="mujoco/hopper/expert-v0")
    )
    for accepted in ("hopper-expert", "mujoco/hopper/expert-v0"):
        load_checkpoint(str(path), expected_gym_id="Hopper-v5", expected_dataset=accepted)
    with pytest.raises(CheckpointError) as error:
        load_checkpoint(str(path), expected_gym_id="Hopper-v5", expected_dataset="hopper-medium")
    assert "mujoco/hopper/expert-v0" in str(error.value) and "not hopper-medium" in str(error.value)
    result = run_online(["--checkpoint", str(path), "--env-id", "hopper-medium"] + TINY_ONLINE, tmp_path)
    refused(result, str(path), "mujoco/hopper/expert-v0", "not hopper-medium")
    assert not (tmp_path / "runs").exists()  # refused before the run folder is made


@pytest.mark.parametrize(
    "env_id, accepted", [("hopper-medium", True), ("Hopper-v5", False), ("hopper", False), ("NoSuchEnv-v0", False)]
)
def test_online_env_id_is_a_dataset_name_as_offline(env_id, accepted):
    problem = check_args(with_algo_defaults(Args(checkpoint="offline.pt", env_id=env_id)))
    assert (problem is None) == accepted and (accepted or "--env-id must be" in problem), problem


# ---- report --------------------------------------------------------------------------------------------------------
def test_report_skips_unusable_checkpoints_says_why_and_reports_the_rest(offline_checkpoint, tmp_path):
    runs = tmp_path / "runs"
    hand_made_run(runs, "hopper-medium__ft__1__1", "online", 1, [[50.0], [80.0, 100.0]], [(0, 50.0), (1000, 90.0)])
    bad = {
        "nan_weight": runs / "hopper-medium__nanweight__1__1" / "offline.pt",
        "missing": runs / "hopper-medium__missing__1__1" / "offline.pt",
        "corrupt": runs / "hopper-medium__corrupt__1__1" / "offline.pt",
    }
    rewritten(offline_checkpoint, bad["nan_weight"], lambda c: set_nan_weight(c["policy"]))
    rewritten(offline_checkpoint, bad["missing"], lambda c: c.pop("dataset_id"))
    bad["corrupt"].parent.mkdir()
    bad["corrupt"].write_bytes(offline_checkpoint.read_bytes()[:2000])
    hand_made_run(runs, "hopper-medium__nanscore__1__1", "online", 1, [[math.nan, 1.0]], [(0, 1.0)])
    nan_score = runs / "hopper-medium__nanscore__1__1" / "online.pt"
    result = run_eval(["report", str(runs), "--out", str(tmp_path / "report")], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    skipped = [line for line in result.stdout.splitlines() if line.startswith("skipped: ")]
    assert len(skipped) == 4, result.stdout
    for path, why in (
        (bad["nan_weight"], "non-finite weights"),
        (bad["missing"], "has no field dataset_id"),
        (bad["corrupt"], "not a readable checkpoint"),
        (nan_score, "final score is nan"),
    ):
        (line,) = [line for line in skipped if str(path) in line]
        assert why in line, line
    report = (tmp_path / "report" / "report.md").read_text()
    # One column (the skipped runs' methods are none) and one row (the nan-weight run's dataset is none).
    assert "| dataset | ft |" in report and "| hopper-medium | 90.0 +- 0.0 |" in report
    assert "| total | 90.0 |" in report and "test/hopper/random-v0 |" not in report
    assert "Checkpoints left out (4)" in report and str(bad["missing"]) in report


# ---- uepo_online.py: output paths and the selection ---------------------------------------------------------------
def test_online_checks_its_output_paths_before_any_work(offline_checkpoint, tmp_path):
    (tmp_path / "a_file").write_text("")
    start = time.time()
    result = run_online(
        ["--checkpoint", str(offline_checkpoint), "--checkpoint-path", "a_file/online.pt"] + TINY_ONLINE, tmp_path
    )
    refused(result, "--checkpoint-path a_file/online.pt cannot be written", "is a file, not a folder")
    assert "eval step" not in result.stdout and not (tmp_path / "runs").exists()
    (tmp_path / "runs").write_text("")  # TensorBoard's folder (and the default checkpoint's) cannot be made
    result = run_online(["--checkpoint", str(offline_checkpoint)] + TINY_ONLINE, tmp_path)
    refused(result, "runs/", "cannot be written", "is a file, not a folder")
    assert "selection" not in result.stdout and time.time() - start < 120


def test_online_refuses_a_checkpoint_with_a_missing_field_by_name(offline_checkpoint, tmp_path):
    path = rewritten(offline_checkpoint, tmp_path / "incomplete.pt", lambda c: c["args"].pop("gamma"))
    result = run_online(["--checkpoint", str(path)] + TINY_ONLINE, tmp_path)
    refused(result, str(path), "has no field args.gamma")
    assert "KeyError" not in result.stderr


def test_the_selection_skips_non_finite_scores_and_takes_the_best_finite_one(capsys):
    labels = ["sub-policy 0", "sub-policy 1", "sub-policy 2", "sub-policy 3"]
    assert choose_candidate(labels, [NAN, 3.0, 7.0, INF]) == 2
    printed = capsys.readouterr().out.splitlines()
    assert printed == [
        "selection: skipped sub-policy 0: its real normalized score is nan, not finite",
        "selection: skipped sub-policy 3: its real normalized score is inf, not finite",
    ]
    assert choose_candidate(labels[:3], [5.0, 5.0, -1.0]) == 0  # ties: the first, by offline OPE order
    assert max(range(2), key=lambda r: [NAN, 1.0][r]) == 0  # why: a plain max keeps a leading NaN
    with pytest.raises(ValueError, match="no candidate of the selection has a finite real score"):
        choose_candidate(labels[:2], [NAN, -INF])


def test_report_writes_the_curves_of_a_dataset_id_with_slashes(tmp_path):
    """A Minari id that is no D4RL-style name keeps its slashes as the row name; its curve file is
    named without them (it used to be written into folders that do not exist, losing the report)."""
    runs = tmp_path / "runs"
    hand_made_run(runs, "run__ft__1__1", "online", 1, [[60.0]], [(0, 60.0)], dataset_id="test/hopper/random-v0")
    result = run_eval(["report", str(runs)], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "| test/hopper/random-v0 | 60.0 +- 0.0 |" in (runs / "report.md").read_text()
    assert (runs / "curves_test-hopper-random-v0_online.png").stat().st_size > 1000


# ---- one rule: no command writes over one of its inputs ----------------------------------------------
OUTPUT_OVER_INPUT = {
    "uepo_online.py": ["--checkpoint", "{input}", "--checkpoint-path", "{output}"],
    "uepo_offline.py": ["--init-checkpoint", "{input}", "--checkpoint-path", "{output}"],
    "eval.py": ["--checkpoint", "{input}", "--json", "{output}"],
    "benchmarks/robustness.py": ["--checkpoint", "{input}", "--json", "{output}"],
}


@pytest.mark.parametrize("command", list(OUTPUT_OVER_INPUT))
@pytest.mark.parametrize("through_link", [False, True])
def test_no_command_writes_over_its_input(offline_checkpoint, minari_path, tmp_path, command, through_link):
    """Every command's output file is checked against its input files before any work: the same
    path, or a link to the input, is refused in one line (exit 2) and the input is left as it was."""
    import os
    import shutil
    import subprocess
    import sys

    from conftest import ROOT

    source = tmp_path / "input.pt"
    shutil.copy(offline_checkpoint, source)
    output = source
    if through_link:
        output = tmp_path / "link.pt"
        output.symlink_to(source)
    before = source.read_bytes()
    script, *subcommand = command.split()
    arguments = [a.format(input=source, output=output) for a in OUTPUT_OVER_INPUT[command]]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "MINARI_DATASETS_PATH": minari_path}
    result = subprocess.run(
        [sys.executable, os.path.join(ROOT, script), *subcommand, *arguments],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2, result.stderr[-2000:]
    assert "would replace that input" in result.stderr and "Traceback" not in result.stderr
    assert source.read_bytes() == before


# ---- the training scripts: one range per numeric flag -----------------------------------------------------------
def numeric_flags(args_class) -> set[str]:
    """The fields of an Args dataclass that hold numbers (int or float, optional, or tuples of them)."""
    hints = typing.get_type_hints(args_class)
    return {name for name, hint in hints.items() if hint in (int, float) or {int, float} & set(typing.get_args(hint))}


def beyond(interval: str, integer: bool) -> list:
    """Values outside an interval written "[low, high]" or "(low, high)": past each end, an open end
    itself, and (for floats) the non-finite ones."""
    low, high = (float(bound) for bound in interval[1:-1].split(","))
    values = [int(high) + 1, int(low) - 1] if integer else [high * 2 + 1, low - 1, NAN, INF, -INF]
    return values + ([low] if interval[0] == "(" else []) + ([high] if interval[-1] == ")" else [])


@pytest.mark.parametrize("script", ["offline", "online", "policy", "robustness", "speed", "baselines", "sac_online"])
def test_every_numeric_flag_has_a_finite_range_checked_before_any_work(script, tmp_path):
    """One rule for every number a user types: each numeric flag of uepo_offline.py, uepo_online.py,
    eval.py and the scripts of benchmarks/ has a finite lower and
    upper bound in its RANGES table, and a value outside it (beyond the upper bound, below the lower
    one, NaN, inf) is refused by the command's check with the flag and the interval named, while the
    defaults pass. The upper bounds refuse requests that cannot fit (`--batch-size 1e12`,
    `--n-subpolicies 1e9`) before anything is allocated; seeds stay in numpy's range."""
    import eval as eval_module

    checkpoint = tmp_path / "some.pt"
    checkpoint.write_bytes(b"")  # the argument checks look only at the file's existence
    if script == "offline":
        import uepo_offline as script_module

        args_class, check, ranges = script_module.Args, script_module.check_args, script_module.RANGES
        defaults = script_module.parse_args([])
    elif script == "online":
        import uepo_online as script_module

        args_class, check, ranges = script_module.Args, script_module.check_args, script_module.RANGES
        defaults = with_algo_defaults(args_class(checkpoint="offline.pt"))
    elif script == "baselines":
        sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
        import baselines as script_module

        args_class, check, ranges = script_module.Args, script_module.check_args, script_module.RANGES
        defaults = args_class()
    elif script == "sac_online":  # its check is the shared rule itself, run before anything else
        sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
        import sac_online as script_module

        args_class, ranges, defaults = script_module.Args, script_module.RANGES, script_module.Args()
        check = functools.partial(eval_module.out_of_range, ranges=ranges)
    else:
        args_class, check, ranges = {
            "policy": (PolicyArgs, check_policy_args, eval_module.POLICY_RANGES),
            "robustness": (RobustnessArgs, check_robustness_args, robustness.ROBUSTNESS_RANGES),
            "speed": (SpeedArgs, check_speed_args, speed.SPEED_RANGES),
        }[script]
        defaults = args_class() if script == "speed" else args_class(checkpoint=str(checkpoint))
    assert check(defaults) is None
    assert numeric_flags(args_class) == set(ranges)
    hints = typing.get_type_hints(args_class)
    for name, interval in ranges.items():
        integer = int in (hints[name], *typing.get_args(hints[name]))
        tuple_flag = typing.get_origin(hints[name]) is tuple
        low, high = (float(bound) for bound in interval[1:-1].split(","))
        assert math.isfinite(low) and math.isfinite(high) and low < high, name
        for value in beyond(interval, integer):
            changed = dataclasses.replace(defaults, **{name: (value,) if tuple_flag else value})
            problem = check(changed)
            flag = "--" + name.replace("_", "-")
            assert problem is not None and problem.startswith(f"{flag} must be in {interval}"), (name, value, problem)


# ---- checkpoints: accepted only for the stage the command needs, and only when that stage finished ------------
def cut_off_in_the_loop(checkpoint):
    checkpoint["step"] = checkpoint["args"]["total_steps"] - 1


def cut_off_in_the_improvement(checkpoint):
    checkpoint["improved"] = []


@pytest.mark.parametrize(
    "script, flag, which, message",
    [
        ("online", "--checkpoint", "online", "is an online checkpoint (of uepo_online.py); this needs an offline one"),
        ("online", "--checkpoint", "loop", "is a run cut off in the loop (step"),
        ("online", "--checkpoint", "improvement", "cut off in the improvement stage (0 of 1 copies improved"),
        ("offline", "--resume", "online", "is an online checkpoint (of uepo_online.py); this needs an offline one"),
        ("offline", "--init-checkpoint", "online", "is an online checkpoint (of uepo_online.py)"),
        ("offline", "--resume", "offline", "is a finished run: nothing to resume"),
    ],
)
def test_a_checkpoint_is_accepted_only_for_a_finished_stage_of_the_phase_the_command_needs(
    minari_path, offline_checkpoint, online_run, tmp_path, script, flag, which, message
):
    """One rule for checkpoints given to a command: one of the other phase (offline vs online) is
    refused by name, and an offline run cut off in its loop or its improvement stage is never
    fine-tuned (it is to be continued with --resume); a finished one is never "resumed" into doing
    nothing. Exit 2, the file named, one line, nothing written."""
    from test_offline import TINY_MODEL, TINY_POLICY, run_offline

    path = {"online": online_run[1], "offline": offline_checkpoint}.get(which)
    if which in ("loop", "improvement"):
        change = cut_off_in_the_loop if which == "loop" else cut_off_in_the_improvement
        path = rewritten(offline_checkpoint, tmp_path / "cut.pt", change)
    if script == "online":
        result = run_online([flag, str(path)], tmp_path)
    else:
        result = run_offline([*TINY_POLICY, *TINY_MODEL, flag, str(path)], minari_path, tmp_path)
    refused(result, str(path), message)
    assert len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "runs").exists()  # no run folder, not even an empty TensorBoard one


def default_sigint() -> None:
    """Popen's preexec_fn: SIGINT as a terminal's Ctrl-C finds it. A shell's background job (`bash .ci/run &`)
    inherits SIGINT ignored, and Python then never raises KeyboardInterrupt."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_ctrl_c_ends_a_run_with_one_line_naming_the_intact_checkpoint_and_how_to_resume(minari_path, tmp_path):
    """SIGINT during the offline loop, after its first checkpoint: no traceback, one line that names the
    checkpoint and the --resume command; the checkpoint on disk loads."""
    from test_offline import ROOT, TINY_RUN

    path = tmp_path / "offline.pt"
    env = {**os.environ, "MINARI_DATASETS_PATH": minari_path, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    env["PYTHONFAULTHANDLER"] = "1"  # a run that does not end dumps every thread's stack on SIGABRT (below)
    arguments = [*TINY_RUN, "--total-steps", "100000", "--eval-every", "10", "--checkpoint-path", str(path)]
    process = subprocess.Popen(
        [sys.executable, os.path.join(ROOT, "uepo_offline.py"), *arguments],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=default_sigint,
    )
    for line in process.stdout:  # wait for the first checkpoint, then interrupt
        if line.startswith("checkpoint:"):
            break
    process.send_signal(signal.SIGINT)
    try:
        _, stderr = process.communicate(timeout=120)
    except subprocess.TimeoutExpired:  # name where it hangs instead of only that it does
        process.send_signal(signal.SIGABRT)
        pytest.fail(f"still running 120 s after SIGINT; its threads:\n{process.communicate()[1][-4000:]}")
    assert "Traceback" not in stderr, stderr[-2000:]
    *bar, last = [line for line in stderr.replace("\r", "\n").splitlines() if line.strip()]
    assert last == f"interrupted: the last checkpoint (if any) is {path}; continue with --resume {path}"
    assert all(line.startswith("offline loop:") for line in bar), bar  # the rest is the progress bar
    assert load_checkpoint(str(path))["step"] >= 10


# ---- datasets and action spaces: one-line errors in every command that reads them -------------------------------
@pytest.mark.parametrize("damage", ["no data file", "corrupt metadata"])
def test_a_damaged_local_dataset_is_one_line_naming_it_in_every_command_that_reads_it(
    minari_path, offline_checkpoint, tmp_path, damage
):
    """A local dataset folder whose data file is missing or whose metadata is not JSON: uepo_offline.py
    and eval.py (its divergence step) stop with one line naming the dataset (never minari's
    traceback, never "could not be downloaded" for a folder that is there)."""
    from test_offline import TINY_DATASET_ID, TINY_RUN, run_offline

    damaged = tmp_path / "datasets"
    shutil.copytree(minari_path, damaged)
    data = damaged / TINY_DATASET_ID / "data"
    if damage == "no data file":
        next(path for path in data.iterdir() if path.suffix == ".hdf5").unlink()
    else:
        (data / "metadata.json").write_text("{not json")
    offline = run_offline(TINY_RUN, str(damaged), tmp_path)
    refused(offline, TINY_DATASET_ID, "cannot be read", "download it again")
    policy = run_eval(
        ["policy", "--checkpoint", str(offline_checkpoint), "--episodes", "1"],
        tmp_path,
        extra_env={"MINARI_DATASETS_PATH": str(damaged)},
    )
    refused(policy, TINY_DATASET_ID, "--no-divergence")
    for result in (offline, policy):
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert not (tmp_path / "runs").exists()


def test_an_environment_without_flat_box_spaces_is_refused_by_name(tmp_path):
    """benchmarks/speed.py on a discrete-action environment: one line naming it and what is needed."""
    result = run_eval(["speed", "--gym-id", "CartPole-v1"], tmp_path)
    refused(result, "--gym-id CartPole-v1 has observation space", "needs flat Box spaces")


@pytest.mark.parametrize("command", ["policy", "robustness"])
def test_sub_policy_of_an_online_checkpoint_is_refused_not_ignored(online_run, tmp_path, command):
    """An online checkpoint deploys one policy: `--sub-policy 0` is refused by both commands (policy
    ignored it and reported the online actor as if it were that sub-policy)."""
    result = run_eval([command, "--checkpoint", str(online_run[1]), "--sub-policy", "0", "--episodes", "1"], tmp_path)
    refused(result, "--sub-policy picks a sub-policy of an offline checkpoint; an online one deploys one policy")


@pytest.mark.parametrize("command", ["eval.py", "uepo_online.py"])
def test_a_checkpoint_relabelled_for_another_environment_is_refused_naming_both_sizes(
    offline_checkpoint, tmp_path, command
):
    """A Hopper checkpoint whose env_id says Walker2d-v5: every command that runs its policy in the
    environment refuses it in one line (state and action sizes named), never a tensor size mismatch."""
    path = rewritten(offline_checkpoint, tmp_path / "relabelled.pt", lambda c: c.update(gym_id="Walker2d-v5"))
    if command == "eval.py":
        result = run_eval(["policy", "--checkpoint", str(path), "--episodes", "1"], tmp_path)
    else:
        result = run_online(["--checkpoint", str(path)], tmp_path)
    refused(result, f"{path} names Walker2d-v5 (states of 17, actions of 6), but its networks take states of 11")


def test_the_report_counts_each_dataset_method_and_seed_once(tmp_path):
    """One seed run twice (two folders) and an offline checkpoint beside an online one of the same
    method and seed: the report counts seed 1 once (the later folder's 80, the online phase's 90 over
    its offline 10), names the files it left out, and averages seeds 1 and 2 only."""
    runs = tmp_path / "runs"
    hand_made_run(runs, "hopper-medium__ft__1__100", "online", 1, [[50.0], [70.0]], [(0, 50.0), (1000, 70.0)])
    hand_made_run(runs, "hopper-medium__ft__1__200", "online", 1, [[50.0], [80.0]], [(0, 50.0), (1000, 80.0)])
    hand_made_run(runs, "hopper-medium__ft__2__100", "online", 2, [[50.0], [90.0]], [(0, 50.0), (1000, 90.0)])
    offline_policy = make_policy(n_subpolicies=1).to_checkpoint()
    hand_made_run(runs, "hopper-medium__ft__2__100", "offline", 2, [[[10.0]]], [(100, 10.0)], policy=offline_policy)
    result = run_eval(["report", str(runs), "--out", str(tmp_path / "report")], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    report = (tmp_path / "report" / "report.md").read_text()
    assert "| hopper-medium | 85.0 +- 7.1 |" in report  # seeds 1 (80) and 2 (90), each once
    for left_out in ("hopper-medium__ft__1__100/online.pt", "hopper-medium__ft__2__100/offline.pt"):
        assert left_out in result.stdout + result.stderr and left_out in report


def test_the_report_scores_an_online_baseline_by_its_last_evaluation(tmp_path):
    """benchmarks/sac_online.py's scores.json is a curve (evaluations at "step"): the report scores it
    by its last evaluation (70), not by the mean over the whole curve (48.3), as an online run."""
    folder = tmp_path / "runs" / "hopper-medium__sac__1__1"
    folder.mkdir(parents=True)
    saved = {"args": {"seed": 1}, "dataset_id": "mujoco/hopper/medium-v0", "step": [0, 1000]}
    (folder / "scores.json").write_text(json.dumps({**saved, "scores": [[5.0], [60.0, 80.0]]}))
    result = run_eval(["report", str(tmp_path / "runs"), "--out", str(tmp_path / "report")], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    report = (tmp_path / "report" / "report.md").read_text()
    assert "| dataset | sac |" in report and "| hopper-medium | 70.0 +- 0.0 |" in report, report
