"""What both UEPO scripts share (data, evaluation, checkpoints, input checks, run folders), and a command:
`python eval.py --checkpoint runs/<run>/offline.pt`, every sub-policy's real score, its OPE score, their divergence."""

import functools
import json
import os
import re
import reprlib
import sys
import tempfile
import time
import warnings
from collections import deque
from dataclasses import dataclass

import gymnasium as gym
import minari
import numpy as np
import torch
import tyro
from torch.utils.tensorboard import SummaryWriter

from diffusion import DiffusionPolicy, OnlineActor
from divergence import pairwise_divergence

CHECKPOINT_FORMAT = "uepo-v1"
# The Gymnasium environment of each task of the D4RL-style names (`hopper-medium` -> Hopper-v5).
GYM_ENV_IDS = {"hopper": "Hopper-v5", "walker2d": "Walker2d-v5", "halfcheetah": "HalfCheetah-v5", "ant": "Ant-v5"}


def spaces_problem(name: str, observation_space, action_space) -> str | None:
    """Why a dataset's or environment's spaces are not flat Boxes (state vectors, continuous actions), or None."""
    if all(isinstance(space, gym.spaces.Box) and len(space.shape) == 1 for space in (observation_space, action_space)):
        return None
    return (
        f"{name} has observation space {observation_space} and action space {action_space}; this implementation "
        "needs flat Box spaces (state vectors, continuous actions)"
    )


def is_dataset_name(name: str) -> bool:
    """`hopper-medium` (a D4RL-style dataset name: an env of GYM_ENV_IDS and a quality), not `Hopper-v5`."""
    task, _, quality = name.partition("-")
    return task in GYM_ENV_IDS and quality != ""


def dataset_name(dataset_id: str) -> str:
    """`mujoco/hopper/medium-v0` -> `hopper-medium` (the D4RL-style row name); other ids as they are."""
    match = re.fullmatch(r"mujoco/([\w]+)/([\w-]+)-v\d+", dataset_id)
    return f"{match.group(1)}-{match.group(2)}" if match else dataset_id


def normalized_score(returns, ref_min_score: float, ref_max_score: float) -> np.ndarray:
    return 100.0 * (np.asarray(returns, dtype=np.float64) - ref_min_score) / (ref_max_score - ref_min_score)


# ---- Data (docs/design.md, "Data"): the qualities Minari has, medium-expert combined locally -------------------------
ENV_IDS = tuple(f"{env}-{q}" for env in GYM_ENV_IDS for q in ("simple", "medium", "expert", "medium-expert"))


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


def datasets_folder() -> str:  # where minari looks for datasets, as the messages name it
    return os.environ.get("MINARI_DATASETS_PATH", "~/.minari/datasets (MINARI_DATASETS_PATH unset)")


def local_dataset(dataset_id: str):
    """The local dataset, or None; a folder minari cannot read is a DatasetError: damaged, never downloaded over."""
    folder = minari.storage.get_dataset_path(dataset_id)
    if not os.path.isdir(os.path.join(folder, "data")):
        return None
    try:
        dataset = minari.load_dataset(dataset_id)
        dataset.total_episodes  # reads the data file's episode index
        return dataset
    except Exception as error:  # minari and h5py raise many types for damaged files
        raise DatasetError(
            f"the local dataset {dataset_id!r} in {folder} cannot be read ({type(error).__name__}: "
            f"{' '.join(str(error).split())[:200]}): delete that folder and download it again"
        ) from None


def load_minari(dataset_id: str) -> minari.MinariDataset:
    """A local dataset, else a download; where neither works, a DatasetError saying where datasets are looked for."""
    if (dataset := local_dataset(dataset_id)) is not None:
        return dataset
    try:
        return minari.load_dataset(dataset_id, download=True)
    except Exception as error:  # network errors, unknown remote ids: all end the same way
        path, local = datasets_folder(), ", ".join(sorted(minari.list_local_datasets())) or "none"
        raise DatasetError(
            f"Minari dataset {dataset_id!r} is not local and could not be downloaded "
            f"({type(error).__name__}: {error}). Datasets are looked for in MINARI_DATASETS_PATH={path} "
            f"(local datasets there: {local}). Download it where there is internet with "
            f"`minari download {dataset_id}` and point MINARI_DATASETS_PATH at that folder."
        ) from error


def load_dataset(env_id: str, dataset_id: str | None) -> tuple[minari.MinariDataset, str, float, float]:
    """The dataset, its id and its reference scores; `<env>-medium-expert` is built once, with its sources' scores."""
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
    """`minari.combine_datasets` in a temporary folder, renamed into place when complete (no partial dataset)."""
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
        os.environ.pop("MINARI_DATASETS_PATH", None)
        if previous is not None:
            os.environ["MINARI_DATASETS_PATH"] = previous


def chunk_episode(observations, actions, rewards, terminations, chunk_size, history_size, gamma) -> dict:
    """One episode (T actions, T + 1 observations) -> one chunked transition per step t (docs/design.md, "Data"):
    states (T, To, S) s_{t-To+1..t}, the first state repeated before the start; chunks (T, H, A) a_{t:t+H}, padded
    with the last action; mask (T, H) 1 where real; rewards (T,) R_t^H = sum_h gamma^h r_{t+h} over real steps;
    next_states (T, To, S) the history at s_{t+H} (or the last state); dones (T,) terminated inside the chunk
    (truncations bootstrap); episode_start (T,) t = 0; step_next_states (T, S), step_rewards (T,) for the dynamics."""
    length = len(actions)
    steps = np.arange(length)
    chunk_steps = steps[:, None] + np.arange(chunk_size)[None, :]
    mask = chunk_steps < length
    clipped = np.minimum(chunk_steps, length - 1)
    history = np.arange(-history_size + 1, 1)[None, :]
    next_steps = np.minimum(steps + chunk_size, length)
    return {
        "states": observations[np.maximum(steps[:, None] + history, 0)],
        "chunks": actions[clipped],
        "mask": mask.astype(np.float32),
        "rewards": (np.where(mask, rewards[clipped], 0.0) * gamma ** np.arange(chunk_size)).sum(1),
        "next_states": observations[np.maximum(next_steps[:, None] + history, 0)],
        "dones": (np.where(mask, terminations[clipped], False)).any(1).astype(np.float32),
        "step_next_states": observations[steps + 1],
        "step_rewards": rewards,
        "episode_start": steps == 0,
    }


def chunk_dataset(dataset: minari.MinariDataset, chunk_size: int, history_size: int, gamma: float) -> dict:
    """All episodes chunked and concatenated, plus the raw states for the normalization."""
    parts, all_states = [], []
    for episode in dataset.iterate_episodes():
        observations = np.asarray(episode.observations, dtype=np.float32)
        actions, rewards = (np.asarray(x, dtype=np.float32) for x in (episode.actions, episode.rewards))
        episode_arrays = (observations, actions, rewards, np.asarray(episode.terminations))
        parts.append(chunk_episode(*episode_arrays, chunk_size, history_size, gamma))
        all_states.append(observations[:-1])
    data = {key: np.concatenate([part[key] for part in parts]) for key in parts[0]}
    data["all_states"] = np.concatenate(all_states)
    for key in ("all_states", "chunks", "step_rewards", "step_next_states"):
        if not np.isfinite(data[key]).all():
            name = {"chunks": "actions", "step_rewards": "rewards"}.get(key, "observations")
            raise DatasetError(
                f"dataset {dataset.spec.dataset_id!r} has non-finite {name} "
                f"({int((~np.isfinite(data[key])).sum())} entries); it cannot be trained on"
            )
    return data


def state_statistics(states: np.ndarray, eps: float = 1e-3) -> tuple[np.ndarray, np.ndarray]:
    """Frozen normalization (docs/design.md): dataset mean and std + eps, used offline, online and in eval."""
    return states.mean(0), states.std(0) + eps


# ---- What both training loops share: progress bars, the non-finite-loss rule, the random streams of --resume -------
BAR = {"mininterval": 5.0, "dynamic_ncols": True}  # the scripts' progress bars (tqdm): steps, rate, ETA, losses


def rng_state(device) -> dict:
    state = {"torch_rng": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda_rng"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict, device) -> None:
    torch.set_rng_state(state["torch_rng"])
    if "cuda_rng" in state and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda_rng"], device)


class NonFiniteLoss(ValueError):
    """A loss that is NaN or infinite: the run stops, naming the step and the loss."""


def check_finite(losses: dict, where: str) -> None:
    for name, value in losses.items():
        if not torch.isfinite(value):
            raise NonFiniteLoss(f"{where}: the {name} loss is {value.item()}")


# ---- Evaluation ------------------------------------------------------------------------------------------------------
class ChunkEnv(gym.Wrapper):
    """The chunk-level MDP (docs/design.md, "Online fine-tuning"). An action is a chunk (H, A), executed until it
    ends or the episode does (never carried into the next one, so vector autoreset is safe); the observation is the
    last `history_size` states (To, S); the reward is R^H = sum_h gamma^h r_h over the executed steps, with
    info["chunk_length"] L (the next decision's discount is gamma^L). Evaluation runs it with gamma 1."""

    def __init__(self, env: gym.Env, chunk_size: int, history_size: int, gamma: float):
        super().__init__(env)
        self.history_size, self.gamma = history_size, gamma
        obs_space, act_space = env.observation_space, env.action_space
        self.observation_space = gym.spaces.Box(-np.inf, np.inf, (history_size, *obs_space.shape), np.float64)
        self.action_space = gym.spaces.Box(
            np.tile(act_space.low, (chunk_size, 1)), np.tile(act_space.high, (chunk_size, 1)), dtype=act_space.dtype
        )
        self.history = deque(maxlen=history_size)

    def reset(self, **kwargs):
        obs, info = self.env.reset(**kwargs)
        self.history.extend([obs] * self.history_size)
        return np.stack(self.history), info

    def step(self, chunk):
        chunk_reward, length = 0.0, 0
        for action in chunk:
            obs, reward, terminated, truncated, info = self.env.step(action)
            chunk_reward += self.gamma**length * reward
            length += 1
            self.history.append(obs)
            if terminated or truncated:
                break
        return np.stack(self.history), chunk_reward, terminated, truncated, {**info, "chunk_length": length}


@torch.no_grad()
def run_chunk_episodes(policy, envs: list, sub_policy_of, seeds, action_steps: int | None = None):
    """One episode in every environment, env k running sub-policy `sub_policy_of[k]` after `reset(seed=seeds[k])`;
    -> (returns, lengths), arrays of len(envs). The live histories are batched into one `policy.act` per decision
    (it samples all n sub-policies: the perturbation couples them); `action_steps` < H re-plans sooner."""
    chunk_size, history_size = policy.chunk_size, policy.history_size
    action_steps = action_steps or chunk_size
    if not 1 <= action_steps <= chunk_size:
        raise ValueError(f"action_steps must be in [1, {chunk_size}], got {action_steps}")
    # gamma 1: a chunk's reward is the plain sum of its rewards, so returns are undiscounted.
    chunk_envs = [ChunkEnv(env, chunk_size, history_size, gamma=1.0) for env in envs]
    histories = [chunk_env.reset(seed=int(seed))[0] for chunk_env, seed in zip(chunk_envs, seeds)]
    live = np.ones(len(envs), dtype=bool)
    returns, lengths = np.zeros(len(envs)), np.zeros(len(envs), dtype=np.int64)
    while live.any():
        live_ids = np.flatnonzero(live)
        chunks = policy.act(np.stack([histories[k] for k in live_ids]))  # (live, n, H, A)
        for row, k in enumerate(live_ids):
            chunk = chunks[row, sub_policy_of[k]][:action_steps]
            histories[k], reward, terminated, truncated, info = chunk_envs[k].step(chunk)
            returns[k] += reward
            lengths[k] += info["chunk_length"]
            live[k] = not (terminated or truncated)
    return returns, lengths


def evaluate_sub_policies(
    policy,
    gym_id: str,
    episodes: int,
    seed: int,
    ref_min_score: float,
    ref_max_score: float,
    max_episode_steps: int | None = None,
    action_steps: int | None = None,
    sub_policies: list[int] | None = None,
) -> dict:
    """Deterministic returns, scores and lengths, each (k, episodes), of the k `sub_policies` (default all n): episode
    e of every one reset with seed `seed + e` (the same start states); `max_episode_steps` None: the registered one."""
    evaluated = list(range(policy.config.n_subpolicies)) if sub_policies is None else list(sub_policies)
    envs = [gym.make(gym_id, max_episode_steps=max_episode_steps) for _ in range(len(evaluated) * episodes)]
    seeds = [seed + e for _ in evaluated for e in range(episodes)]
    try:
        returns, lengths = run_chunk_episodes(policy, envs, np.repeat(evaluated, episodes), seeds, action_steps)
    finally:
        for env in envs:
            env.close()
    returns, lengths = returns.reshape(len(evaluated), episodes), lengths.reshape(len(evaluated), episodes)
    return {"returns": returns, "lengths": lengths, "scores": normalized_score(returns, ref_min_score, ref_max_score)}


def evaluate_saved_task(
    policy, checkpoint: dict, episodes: int, seed: int, sub_policies=None, action_steps: int | None = None
) -> dict:
    """`evaluate_sub_policies` on a checkpoint's task, with the training scripts' seeds `seed * 1000 + e`."""
    task = {key: checkpoint[key] for key in ("ref_min_score", "ref_max_score", "max_episode_steps")}
    task |= {"sub_policies": sub_policies, "action_steps": action_steps}
    return evaluate_sub_policies(policy, checkpoint["gym_id"], episodes, seed * 1000, **task)


def spearman_correlation(x, y) -> float:
    """Spearman's rank correlation (ties share their average rank), e.g. of OPE and real scores; NaN where either
    is constant or not finite (no ranking to compare)."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if not (np.isfinite(x).all() and np.isfinite(y).all()):
        return float("nan")
    rank_x, rank_y = (np.array([np.flatnonzero(np.sort(v) == value).mean() for value in v]) for v in (x, y))
    if rank_x.std() == 0 or rank_y.std() == 0:
        return float("nan")
    return float(np.corrcoef(rank_x, rank_y)[0, 1])


# ---- Files and input checks ------------------------------------------------------------------------------------------
def atomic_write(path: str, write) -> None:
    """`write(temporary)` into a temporary file in the same folder, then rename: a crash mid-write never
    leaves a broken file under `path` (os.replace is atomic on one filesystem), nor the temporary one."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    temporary = f"{path}.tmp.{os.getpid()}"
    try:
        write(temporary)
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)


def save_checkpoint(checkpoint: dict, path: str) -> None:
    atomic_write(path, functools.partial(torch.save, {"format": CHECKPOINT_FORMAT, **checkpoint}))


def fail(message: str):
    """Bad input ends a script with the message alone (no traceback), exit code 2."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


SEED_RANGE = "[0, 4294967295]"  # numpy's seeds: 0 .. 2^32 - 1


def out_of_range(args, ranges: dict[str, str]) -> str | None:
    """The first flag of `ranges` ({field: interval such as "[1, 64]" or "(0, 1]"}) whose value is outside it, as a
    message naming the flag, or None. NaN fails every comparison; a tuple is checked by entry; None passes."""
    for name, interval in ranges.items():
        low, high = (float(bound) for bound in interval[1:-1].split(","))
        value = getattr(args, name)
        for entry in [entry for entry in (value if isinstance(value, (tuple, list)) else [value]) if entry is not None]:
            above = low < entry if interval[0] == "(" else low <= entry
            below = entry < high if interval[-1] == ")" else entry <= high
            if not (above and below):
                return f"--{name.replace('_', '-')} must be in {interval}, got {entry}"
    return None


def start_run(args, env_name: str, resumed: dict | None, filename: str, how: str):
    """A run's name (CleanRL's; a resumed run's own), checkpoint path and TensorBoard writer, made once every input is
    checked; from here Ctrl-C ends the run with one line naming the checkpoint and `how` to continue ("{path}")."""
    run_name = f"{env_name}__{args.exp_name}__{args.seed}__{int(time.time())}"
    run_name = run_name if resumed is None else resumed["resume"]["run_name"]  # the same TensorBoard folder
    path = args.checkpoint_path or f"runs/{run_name}/{filename}"
    message = f"the last checkpoint (if any) is {path}; {how.format(path=path)}"
    sys.excepthook = functools.partial(report_interrupt, message)
    writer = SummaryWriter(f"runs/{run_name}")
    table = "\n".join(f"|{key}|{value}|" for key, value in vars(args).items())
    writer.add_text("hyperparameters", "|param|value|\n|-|-|\n" + table)
    return run_name, path, writer


def report_interrupt(message: str, kind, value, traceback) -> None:
    """`sys.excepthook` of a run: Ctrl-C ends it with one line, `message`; any other exception keeps Python's report."""
    if issubclass(kind, KeyboardInterrupt):
        print(f"interrupted: {message}", file=sys.stderr)
    else:
        sys.__excepthook__(kind, value, traceback)


def unwritable(folder: str) -> str | None:
    """Why files cannot be written into `folder` (made if missing, as the writers do), or None."""
    existing = os.path.abspath(folder or ".")
    while not os.path.exists(existing):  # the writers make the missing folders below the nearest existing one
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        return f"{existing} is a file, not a folder"
    try:
        with tempfile.NamedTemporaryFile(dir=existing):  # a real write: permissions, read-only mounts, full quotas
            pass
    except OSError as error:
        return f"{existing} is not writable ({error.strerror})"
    return None


def same_file(a: str, b: str) -> bool:
    """Whether two paths name one file (the same absolute path, or links to one existing file)."""
    if os.path.abspath(a) == os.path.abspath(b):
        return True
    return os.path.exists(a) and os.path.exists(b) and os.path.samefile(a, b)


def check_output_file(flag: str, path: str | None, inputs: dict | None = None) -> str | None:
    """A file option (`--json`, `--checkpoint-path`) that cannot be written, or that names one of the
    command's `inputs` ({flag: path}: writing it would replace that input), as a message naming the flag."""
    if path is None:
        return None
    for input_flag, input_path in (inputs or {}).items():
        if input_path is not None and same_file(path, input_path):
            return f"{flag} {path} is the {input_flag} file; writing it would replace that input: give another file"
    if os.path.isdir(path):
        return f"{flag} {path} is a folder; give a file name"
    problem = unwritable(os.path.dirname(os.path.abspath(path)))
    return None if problem is None else f"{flag} {path} cannot be written: {problem}"


# ---- Checkpoints (docs/design.md, "Conventions": bad input) ---------------------------------------------------------
class CheckpointError(ValueError):
    """A checkpoint that cannot be used (unreadable, another format, environment or dataset, a field missing...)."""


# The fields the readers use ("improved.*.scores": in every improved copy; "critics" and "dynamics" exist only with
# --ope, "resume" is read by the scripts alone): a file without one is refused on load, never a KeyError later.
REQUIRED = {
    "offline": (
        *("args.gamma", "step", "gym_id", "max_episode_steps", "dataset_id", "ref_min_score", "ref_max_score"),
        *("policy.config", *(f"policy.state_dict.{name}" for name in ("state_mean", "state_std"))),
        *("history.scores", "improved.*.sub_policy", "improved.*.policy.config", "improved.*.policy.state_dict"),
        *("improved.*.operator", "improved.*.ope_score", "improved.*.scores"),
    ),
    "online": (
        *("args", "global_step", "gym_id", "max_episode_steps", "dataset_id", "ref_min_score", "ref_max_score"),
        *("offline_checkpoint", "sub_policy", "selection", "history.step", "history.scores"),
        *("actor.kind", "actor.sub_policy", "actor.init_std", "actor.mlp_chunk_size", "actor.policy_config"),
        "actor.state_dict",
    ),
}


def missing_field(container, path: str, where: str = "") -> str | None:
    """The first field of `path` (see REQUIRED) that `container` lacks, as a dotted name; None if none."""
    head, _, rest = path.partition(".")
    if head == "*":
        items = enumerate(container if isinstance(container, list) else [])
        found = (missing_field(item, rest, f"{where}[{k}]") for k, item in items)
        return next((name for name in found if name), None)
    name = f"{where}.{head}" if where else head
    if not isinstance(container, dict) or head not in container:
        return name
    return missing_field(container[head], rest, name) if rest else None


def non_finite_tensor(value, where: str = "") -> str | None:
    """The name of the first floating-point tensor in `value` (nested dicts and lists) with a NaN or inf entry."""
    if isinstance(value, torch.Tensor):
        return where if value.is_floating_point() and not torch.isfinite(value).all() else None
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, item in items:
        name = f"{where}[{key}]" if isinstance(key, int) else f"{where}.{key}" if where else str(key)
        if (found := non_finite_tensor(item, name)) is not None:
            return found
    return None


def load_checkpoint(path: str, phase: str | None = None, expected_gym_id=None, expected_dataset=None) -> dict:
    """A checkpoint of `save_checkpoint`, read with torch's safe loader (tensors and plain data only); a
    CheckpointError naming the file if it is corrupt or unsafe, of another format or `phase`, without a `REQUIRED`
    field, with non-finite weights, or made for another `expected_gym_id` or `expected_dataset` (an id or name)."""
    if not os.path.isfile(path):
        raise CheckpointError(f"no checkpoint at {path}")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises several types for truncated, foreign or unsafe files
        text = " ".join(str(error).split())
        # torch's own message advises weights_only=False, i.e. running code from the file: never that.
        reason = f"{type(error).__name__}: {text[:300]}" if "weights_only" not in text else "refused by the safe loader"
        if found := re.search(r"Unsupported global: GLOBAL [\w.]+", text):
            reason = f"it holds Python objects ({found.group(0)}), never unpickled since that can run code"
        raise CheckpointError(f"{path} is not a readable checkpoint ({reason})") from None
    if not isinstance(checkpoint, dict) or checkpoint.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path} is not a UEPO checkpoint (format {CHECKPOINT_FORMAT} expected)")
    actual = checkpoint.get("phase", "offline")
    written_by = {"offline": "uepo_offline.py", "online": "uepo_online.py"}
    if actual not in written_by:
        raise CheckpointError(f"{path}: phase must be offline or online, got {reprlib.repr(actual)}")
    if phase is not None and actual != phase:
        raise CheckpointError(
            f"{path} is an {actual} checkpoint (of {written_by[actual]}); this needs an {phase} one "
            f"(of {written_by[phase]})"
        )
    for field in REQUIRED[actual]:
        if (name := missing_field(checkpoint, field)) is not None:
            raise CheckpointError(f"{path} has no field {name}")
    if (name := non_finite_tensor(checkpoint)) is not None:
        raise CheckpointError(f"{path}: {name} has non-finite weights (NaN or inf)")
    if expected_gym_id is not None and checkpoint["gym_id"] != expected_gym_id:
        raise CheckpointError(f"{path} was made for {checkpoint['gym_id']}, not {expected_gym_id}")
    dataset_id = checkpoint["dataset_id"]
    if expected_dataset is not None and expected_dataset not in (dataset_id, dataset_name(dataset_id)):
        raise CheckpointError(
            f"{path} was trained on the dataset {dataset_id} ({dataset_name(dataset_id)}), not {expected_dataset}"
        )
    return checkpoint


def unfinished_stage(checkpoint: dict) -> str | None:
    """The stage an offline checkpoint's run did not finish (its loop, or the improvement stage and offline choice),
    in words, or None: such a run is continued with `uepo_offline.py --resume`, never fine-tuned or reported."""
    args, improved = checkpoint["args"], checkpoint.get("improved") or []
    if args.get("init_checkpoint") is None and checkpoint["step"] < args.get("total_steps", 0):
        return f"the loop (step {checkpoint['step']} of {args['total_steps']})"
    if len(improved) < args.get("num_qualified", 0) or not all("choice_rank" in entry for entry in improved):
        return (
            f"the improvement stage ({len(improved)} of {args.get('num_qualified', 0)} copies improved, "
            "no offline choice made)"
        )
    return None


def build_saved(saved: dict, what: str) -> "DiffusionPolicy | OnlineActor":
    """A saved DiffusionPolicy or OnlineActor (which has a "kind"), built first on the meta device, which allocates
    nothing: networks that do not fit the saved tensors are a CheckpointError naming `what` before any memory."""
    cls = OnlineActor if "kind" in saved else DiffusionPolicy
    try:
        with warnings.catch_warnings(), torch.device("meta"):
            warnings.simplefilter("ignore")  # loading into meta tensors copies nothing, by design here
            cls.from_checkpoint(saved)
        return cls.from_checkpoint(saved)
    except Exception as error:  # load_state_dict: missing, unexpected or mis-shaped tensors; bad config values
        message = " ".join(str(error).split())
        raise CheckpointError(
            f"{what} does not fit its saved config ({type(error).__name__}: {message[:300]})"
        ) from None


def check_environment(checkpoint: dict, path: str) -> None:
    """The checkpoint's gym_id is registered, with flat Box spaces of the sizes its networks take."""
    gym_id = checkpoint["gym_id"]
    if gym_id not in gym.registry:
        raise CheckpointError(f"{path}: gym_id {gym_id!r} is not a registered Gymnasium environment")
    with gym.make(gym_id) as env:
        if (problem := spaces_problem(gym_id, env.observation_space, env.action_space)) is not None:
            raise CheckpointError(f"{path}: {problem}")
        sizes = (env.observation_space.shape[0], env.action_space.shape[0])
    online = checkpoint.get("phase") == "online"
    config = checkpoint["actor"]["policy_config"] if online else checkpoint["policy"]["config"]
    if sizes != (config["obs_dim"], config["act_dim"]):
        raise CheckpointError(
            f"{path} names {gym_id} (states of {sizes[0]}, actions of {sizes[1]}), but its networks take states "
            f"of {config['obs_dim']} and actions of {config['act_dim']}"
        )


# ---- Which policy a checkpoint offers --------------------------------------------------------------------------------
def improved_label(entry: dict) -> str:
    return f"sub-policy {entry['sub_policy']}, improved ({entry['operator']})"


def offline_ranking(checkpoint: dict) -> list[dict]:
    """An offline checkpoint's deployment candidates, unbuilt: dicts of label, saved policy, sub_policy, OPE score and
    last real scores. The improved copies in the run's choice order (docs/design.md, "The offline choice"; without it,
    best gated OPE first), else the base sub-policies, best AM-Q first (NaN without OPE). The first is the offline
    choice; uepo_online.py's selection compares the top few on real episodes."""
    if improved := checkpoint.get("improved"):
        rows = [(improved_label(e), e["policy"], e["sub_policy"], e["ope_score"], e["scores"]) for e in improved]
    else:
        history, n = checkpoint["history"], checkpoint["policy"]["config"]["n_subpolicies"]
        ope = (history.get("ope_scores") or [[float("nan")] * n])[-1]
        rows = [(f"sub-policy {i}", checkpoint["policy"], i, ope[i], history["scores"][-1][i]) for i in range(n)]
    keys = ("label", "policy", "sub_policy", "ope_score", "scores")
    candidates = [dict(zip(keys, row)) | {"ope_score": float(row[3])} for row in rows]
    if improved and all("choice_rank" in entry for entry in improved):
        return [candidates[i] for i in np.argsort([entry["choice_rank"] for entry in checkpoint["improved"]])]
    return sorted(candidates, key=lambda c: -c["ope_score"] if np.isfinite(c["ope_score"]) else np.inf)


def offline_candidates(checkpoint: dict, device="cpu") -> list[tuple[str, DiffusionPolicy, int, float]]:
    """`offline_ranking` as (label, policy, sub_policy, OPE score), each saved policy built once."""
    built, candidates = {}, []
    for candidate in offline_ranking(checkpoint):
        key = id(candidate["policy"])
        if key not in built:
            built[key] = build_saved(candidate["policy"], f"the saved policy of {candidate['label']}").to(device)
        candidates.append((candidate["label"], built[key], candidate["sub_policy"], candidate["ope_score"]))
    return candidates


def deployed_choice(checkpoint: dict) -> tuple[str, dict, int]:
    """(label, saved policy, sub_policy) a checkpoint deploys: online, the fine-tuned actor's mean (an
    OnlineActor, whose one "sub-policy" is 0); offline, the offline choice (`offline_ranking`, first)."""
    if checkpoint.get("phase") == "online":
        kind, sub_policy = checkpoint["actor"]["kind"], checkpoint["sub_policy"]
        label = f"sub-policy {sub_policy}, fine-tuned online ({kind} actor)"
        label = "Gaussian MLP, trained online from scratch" if kind == "mlp" else label
        return label, checkpoint["actor"], 0
    first = offline_ranking(checkpoint)[0]
    return first["label"], first["policy"], first["sub_policy"]


# ---- The command: every sub-policy of a checkpoint on real episodes, its OPE score, their divergence ---------------
def load_or_fail(path: str) -> dict:
    """A checkpoint whose policy is to be run in its environment, or a one-line error naming the file."""
    try:
        checkpoint = load_checkpoint(path)
        check_environment(checkpoint, path)
        return checkpoint
    except CheckpointError as error:
        fail(str(error))


def built_or_fail(path: str, saved: dict, what: str, device):
    """`build_saved`, or a one-line error naming the file."""
    try:
        return build_saved(saved, what).to(device).eval()
    except CheckpointError as error:
        fail(f"{path}: {error}")


def fail_unless_finite(path: str, label: str, values) -> None:
    """NaN actions or returns stop the command: never reported as numbers ("nan +- nan", exit 0)."""
    if not np.isfinite(values).all():
        count = int(np.size(values) - np.isfinite(values).sum())
        fail(
            f"{path}: {label} gave non-finite results ({count} of {np.size(values)} values are NaN or "
            "inf: its actions or returns are not finite); nothing is reported"
        )


def write_json(path: str, data: dict) -> None:
    atomic_write(path, functools.partial(dump_json, data))  # as checkpoints: an interrupted write loses nothing
    print(f"json: {path}")


def dump_json(data: dict, path: str) -> None:
    with open(path, "w") as file:
        json.dump(data, file, indent=2)


def markdown_table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("-" for _ in header) + "|"]
    return "\n".join(lines + ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows])


@dataclass
class PolicyArgs:
    """Every sub-policy of a checkpoint on real episodes, its offline OPE score, and their pairwise divergence."""

    checkpoint: str
    """an offline or online checkpoint (runs/<run>/offline.pt or online.pt)"""
    sub_policy: int | None = None
    """evaluate only this sub-policy (and its improved copy, if any)"""
    episodes: int = 10
    """episodes per sub-policy (the same start states for all)"""
    seed: int = 1
    """episode e is reset with seed `seed * 1000 + e`, the training scripts' evaluation seeds"""
    action_steps: int | None = None
    """actions of each chunk executed before re-planning (default: all H; 1 re-plans at every step)"""
    divergence: bool = True
    """measure the pairwise divergence on dataset states (needs the dataset in MINARI_DATASETS_PATH)"""
    divergence_states: int = 256
    """dataset states of the divergence"""
    json: str | None = None
    """also write the results to this JSON file"""
    cuda: bool = True
    """if toggled, use a GPU when there is one"""


# Every numeric flag's range (`out_of_range`): the upper bounds keep a typo from the memory (every episode is a live
# environment at once; the divergence samples all its states in one batch).
EPISODE_RANGES = {"sub_policy": "[0, 63]", "episodes": "[1, 1000]", "seed": SEED_RANGE}
POLICY_RANGES = {**EPISODE_RANGES, "action_steps": "[1, 64]", "divergence_states": "[1, 100000]"}
SUB_POLICY_OF_ONLINE = "--sub-policy picks a sub-policy of an offline checkpoint; an online one deploys one policy"


def check_policy_args(args, ranges: dict = POLICY_RANGES) -> str | None:
    """The first bad argument, as a message naming the flag, or None (also benchmarks/robustness.py's)."""
    if not os.path.isfile(args.checkpoint):
        return f"--checkpoint {args.checkpoint}: no such file"
    return out_of_range(args, ranges) or check_output_file("--json", args.json, {"--checkpoint": args.checkpoint})


def score_row(args: PolicyArgs, checkpoint: dict, policy, label: str, sub_policy: int, ope=None, kind=None) -> dict:
    """One candidate's real scores (refused if not finite) beside its offline OPE score."""
    scores = evaluate_saved_task(policy, checkpoint, args.episodes, args.seed, [sub_policy], args.action_steps)
    scores = scores["scores"][0]
    fail_unless_finite(args.checkpoint, label, scores)
    row = {"label": label, "sub_policy": sub_policy, "scores": scores.tolist(), "ope": ope, "ope_kind": kind}
    return row | {"mean": float(scores.mean()), "std": float(scores.std())}


def dataset_state_histories(dataset_id: str, count: int, history_size: int, seed: int) -> np.ndarray:
    """`count` state histories (count, To, S) drawn uniformly from the local dataset, as in training."""
    try:
        if (dataset := local_dataset(dataset_id)) is None:
            raise DatasetError(
                f"the dataset {dataset_id!r} of this checkpoint is not in MINARI_DATASETS_PATH={datasets_folder()}; "
                f"get it with `minari download {dataset_id}`"
            )
        states = chunk_dataset(dataset, 1, history_size, 1.0)["states"]
    except DatasetError as error:
        fail(f"{error}, or pass --no-divergence")
    except Exception as error:  # minari and h5py raise many types for a damaged or truncated file
        fail(f"the local dataset {dataset_id!r} cannot be read ({type(error).__name__}), or pass --no-divergence")
    return states[np.random.default_rng(seed).choice(len(states), size=min(count, len(states)), replace=False)]


def policy_command(args: PolicyArgs) -> dict:
    if (problem := check_policy_args(args)) is not None:
        fail(problem)
    device = torch.device("cuda" if torch.cuda.is_available() and args.cuda else "cpu")
    checkpoint = load_or_fail(args.checkpoint)
    online = checkpoint.get("phase") == "online"
    chunk_size = (checkpoint["actor"]["policy_config"] if online else checkpoint["policy"]["config"])["chunk_size"]
    if args.action_steps is not None and args.action_steps > chunk_size:
        fail(f"--action-steps must be at most the checkpoint's chunk size H = {chunk_size}, got {args.action_steps}")
    if online and args.sub_policy is not None:
        fail(SUB_POLICY_OF_ONLINE)
    n, base = 1, None
    if online:  # an online checkpoint deploys one policy, the fine-tuned actor's mean
        deployed, saved, _ = deployed_choice(checkpoint)
        actor = built_or_fail(args.checkpoint, saved, "the online actor", device)
        rows = [score_row(args, checkpoint, actor, deployed, 0) | {"sub_policy": checkpoint["sub_policy"]}]
    else:  # the base sub-policies with their last AM-Q, then the improved copies with their gated OPE
        base = built_or_fail(args.checkpoint, checkpoint["policy"], "the saved policy", device)
        n, deployed = base.config.n_subpolicies, deployed_choice(checkpoint)[0]
        if args.sub_policy is not None and not 0 <= args.sub_policy < n:
            fail(f"--sub-policy must be in [0, {n - 1}] for this checkpoint, got {args.sub_policy}")
        evaluated = list(range(n)) if args.sub_policy is None else [args.sub_policy]
        ope, rows = (checkpoint["history"].get("ope_scores") or [None])[-1], []
        for i in evaluated:
            scored = (None, None) if ope is None else (float(ope[i]), "AM-Q")
            rows.append(score_row(args, checkpoint, base, f"sub-policy {i}", i, *scored))
        for entry in [entry for entry in checkpoint.get("improved") or [] if entry["sub_policy"] in evaluated]:
            i, label, scored = entry["sub_policy"], improved_label(entry), (float(entry["ope_score"]), "gated OPE")
            copy = built_or_fail(args.checkpoint, entry["policy"], f"the improved copy of sub-policy {i}", device)
            rows.append(score_row(args, checkpoint, copy, label, i, *scored))
    rows = [row | {"deployed": row["label"] == deployed} for row in rows]
    result = {"checkpoint": args.checkpoint, "phase": "online" if online else "offline", "gym_id": checkpoint["gym_id"]}
    result |= {"dataset_id": checkpoint["dataset_id"], "episodes": args.episodes, "seed": args.seed}
    result |= {"deployed": deployed, "rows": rows, "divergence": None}
    if len(base_rows := [row for row in rows if row["ope_kind"] == "AM-Q"]) > 2:
        result["ope_spearman"] = spearman_correlation([r["ope"] for r in base_rows], [r["mean"] for r in base_rows])
    if args.divergence and n > 1:  # an offline checkpoint's sub-policies
        states = dataset_state_histories(
            checkpoint["dataset_id"], args.divergence_states, base.config.history_size, args.seed
        )
        with torch.no_grad():  # in the policy's [-1, 1] action units, as logged in training
            chunks = base.sample(base.normalize_states(torch.as_tensor(states, dtype=torch.float32, device=device)))
        matrix = pairwise_divergence(chunks.actions).mean(0).cpu().numpy()
        fail_unless_finite(args.checkpoint, "the divergence of the sub-policies", matrix)
        mean_pairwise = float(matrix.sum() / (n * (n - 1)))
        result["divergence"] = {"states": len(states), "matrix": matrix.tolist(), "mean_pairwise": mean_pairwise}
    print(
        f"{args.checkpoint}: {result['phase']} checkpoint for {checkpoint['gym_id']} ({checkpoint['dataset_id']}), "
        f"{args.episodes} episodes per row, seed {args.seed}\n"
    )
    opes = ["-" if row["ope"] is None else f"{row['ope']:.1f} ({row['ope_kind']})" for row in rows]
    table = [
        [r["label"], f"{r['mean']:.1f} +- {r['std']:.1f}", o, "yes" if r["deployed"] else ""]
        for r, o in zip(rows, opes)
    ]
    print(markdown_table(["candidate", "normalized score", "offline OPE", "deployed"], table))
    if "ope_spearman" in result:
        spearman = result["ope_spearman"]
        shown = f"{spearman:.2f}" if np.isfinite(spearman) else "not defined (an AM-Q is not finite, or all equal)"
        print(f"\nSpearman(AM-Q, real score) over the sub-policies: {shown}")
    if (divergence := result["divergence"]) is not None:
        print(
            f"\nPairwise kinematic divergence of the sub-policies on {divergence['states']} dataset states "
            f"(mean over pairs {divergence['mean_pairwise']:.3f}):\n"
        )
        print(markdown_table(["", *map(str, range(n))], [[str(i), *[f"{v:.3f}" for v in matrix[i]]] for i in range(n)]))
    if args.json:
        write_json(args.json, result)
    return result


if __name__ == "__main__":
    policy_command(tyro.cli(PolicyArgs))
