"""UEPO online phase (arXiv 2511.10087), CleanRL style: read top to bottom; design: docs/design.md.

    python uepo_online.py --checkpoint runs/<offline run>/offline.pt     # TD3 on chunks, 250k env steps
    python uepo_online.py --checkpoint ... --algo ppo                   # the paper's PPO, 1M
    python uepo_online.py --checkpoint ... --actor mlp --mlp-chunk-size 4  # RLPD-style: a fresh actor
    python uepo_online.py --resume runs/<run>/online.pt                 # continue a PPO run

1. Load the offline checkpoint (refused, with the reason, if corrupt, unfinished or of another `--env-id`).
2. Uni-O4's selection: the top `--selection-top` candidates by offline OPE, then the best on real episodes.
3. Fine-tune `diffusion.OnlineActor`, a Gaussian over decisions z whose mean starts at the selected sub-policy,
   on the chunk-level MDP (`eval.ChunkEnv`): `train_td3` (TD3 + RLPD, the default; a fresh chunk actor explores
   beside it and trial episodes choose which frozen copy is deployed, `Gate`) or `train_ppo` (the paper's).
4. Evaluate every `--eval-every` steps; save runs/{run_name}/online.pt atomically (PPO's can be resumed).
"""

import copy
import functools
import os
import random
import time
from dataclasses import asdict, dataclass, replace
from typing import Literal

import gymnasium as gym
import numpy as np
import torch
import tyro
from gymnasium.wrappers.utils import RunningMeanStd
from tqdm import tqdm

import eval
from diffusion import OnlineActor, ppo_mlp
from divergence import gaussian_kl, gaussian_log_prob
from dynamics import ChunkCritics, chunk_td_target, soft_update


@dataclass
class Args:
    checkpoint: str | None = None
    """the offline checkpoint to fine-tune (not needed with --resume)"""
    exp_name: str = os.path.basename(__file__)[: -len(".py")]
    """the name of this experiment"""
    seed: int = 1
    """seed of the experiment"""
    torch_deterministic: bool = True
    """if toggled, `torch.backends.cudnn.deterministic=True`"""
    cuda: bool = True
    """if toggled, use a GPU when there is one"""
    env_id: str | None = None
    """if given, the checkpoint must be of this dataset (`<env>-<quality>`, e.g. hopper-medium)"""
    # The learner and the actor (None: the learner's default, `ALGO_DEFAULTS`)
    algo: Literal["td3", "ppo"] = "td3"
    """the learner: TD3 on chunks with the offline data, or PPO (the paper's)"""
    actor: Literal["residual", "noise", "mlp"] | None = None
    """what is trained: a residual on the chunk, the initial noise, or a fresh MLP"""
    mlp_chunk_size: int = 1
    """actions per decision of `--actor mlp`"""
    init_std: float | None = None
    """initial std of the actor's Gaussian (default: `INIT_STD` of the actor)"""
    total_timesteps: int | None = None
    """environment steps, actions not chunks (td3 250k, ppo 1M)"""
    num_envs: int | None = None
    """parallel environments (td3 1, ppo 16)"""
    learning_rate: float = 3e-4
    """Adam learning rate of the actor"""
    anchor_coef: float = 1.0
    """weight of staying at the offline policy (0 for mlp)"""
    anchor_floor: float | None = None
    """fraction of --anchor-coef it falls to over the run (td3 0.1, ppo 1)"""
    # Selection (Uni-O4's rule)
    selection_top: int = 3
    """candidates kept by offline OPE score"""
    selection_episodes: int = 10
    """real episodes per candidate"""
    # PPO
    num_steps: int = 64
    """decisions per environment per rollout"""
    gae_lambda: float = 0.95
    """lambda of GAE over decisions"""
    num_minibatches: int = 8
    """minibatches per epoch"""
    update_epochs: int = 5
    """epochs over every rollout, at most"""
    clip_coef: float = 0.2
    """PPO clip range of the likelihood ratio"""
    target_kl: float | None = 0.2
    """stop a rollout's epochs past this approximate KL (None: never)"""
    critic_warmup: int = 3
    """rollouts at the start that train only the value network"""
    # TD3 on chunks
    batch_size: int = 256
    """decisions per critic update"""
    offline_ratio: float = 0.5
    """share of every batch drawn from the offline dataset"""
    utd_ratio: int = 1
    """critic updates per decision collected"""
    exploration_noise: float = 0.1
    """std of the Gaussian noise on z while collecting"""
    q_weight: float = 0.5
    """weight of Q in the actor loss (TD3+BC's alpha is 2.5)"""
    actor_learning_starts: int = 0
    """environment steps collected with the actor frozen"""
    offline_critic_updates: int = 25_000
    """critic updates on the offline data before the first online step"""
    free_actor: bool | None = None
    """a fresh chunk actor explores beside the residual; trials choose the deployed copy (on for td3's residual)"""
    free_actor_warmup: Literal["auto", "hand-over", "fresh"] = "auto"
    """with --free-actor: whose values the critics learn first (auto: `warmup_actor_name`); fresh: no residual"""
    # Evaluation and checkpoint
    eval_every: int | None = None
    """evaluate every this many steps, and at 0 and the end (td3 25k, ppo 20k)"""
    eval_episodes: int = 10
    """episodes per evaluation (the same start states every time)"""
    checkpoint_path: str | None = None
    """where to write the online checkpoint (default: runs/{run_name}/online.pt)"""
    resume: str | None = None
    """continue the PPO run of this online checkpoint, with its own arguments"""


# What each learner was measured with (docs/experiments.md), for the flags left at None.
ALGO_DEFAULTS = {
    "td3": {"actor": "residual", "num_envs": 1, "total_timesteps": 250_000, "eval_every": 25_000, "anchor_floor": 0.1},
    "ppo": {"actor": "noise", "num_envs": 16, "total_timesteps": 1_000_000, "eval_every": 20_000, "anchor_floor": 1.0},
}
INIT_STD = {"residual": 0.1, "noise": 0.3, "mlp": 1.0}  # z in chunk units, noise units, and CleanRL's
# Fixed settings (docs/design.md, "Online fine-tuning"): CleanRL's PPO and TD3, RLPD's critics.
VALUE_LEARNING_RATE, LR_FLOOR, MAX_GRAD_NORM = 3e-4, 0.1, 0.5
CRITIC_LEARNING_RATE, TAU, POLICY_NOISE, NOISE_CLIP, POLICY_FREQUENCY = 3e-4, 0.005, 0.2, 0.5, 2
OFFLINE_ROWS, BUFFER_SIZE = 100_000, 1_000_000
TRIAL_EPISODES = 3  # --free-actor: deterministic episodes each candidate plays in a trial round


def with_algo_defaults(args: Args) -> Args:
    """`args` with every flag left at None set to its learner's or actor's default."""
    unset = {name: value for name, value in ALGO_DEFAULTS[args.algo].items() if getattr(args, name) is None}
    args = replace(args, **unset)
    args = replace(args, init_std=INIT_STD[args.actor]) if args.init_std is None else args
    if args.free_actor is None:  # the fresh actor trains beside TD3's residual only
        args = replace(args, free_actor=(args.algo, args.actor) == ("td3", "residual"))
    return replace(args, anchor_coef=0.0) if args.actor == "mlp" else args  # no offline policy to stay near


# Every numeric flag's range (`eval.out_of_range`), far above every setting used.
RANGES = {
    **{"seed": eval.SEED_RANGE, "mlp_chunk_size": "[1, 64]", "init_std": "(0, 2]", "total_timesteps": "[1, 100000000]"},
    **{"num_envs": "[1, 256]", "learning_rate": "(0, 1]", "anchor_coef": "[0, 1000]", "anchor_floor": "[0, 1]"},
    **{"selection_top": "[1, 64]", "selection_episodes": "[1, 1000]", "num_steps": "[1, 4096]"},
    **{"gae_lambda": "[0, 1]", "num_minibatches": "[1, 65536]", "update_epochs": "[1, 1000]"},
    **{"clip_coef": "(0, 10]", "target_kl": "(0, 100]", "critic_warmup": "[0, 1000]", "batch_size": "[1, 65536]"},
    **{"offline_ratio": "[0, 1]", "utd_ratio": "[1, 1000]", "exploration_noise": "[0, 10]"},
    **{"q_weight": "(0, 1000000]", "actor_learning_starts": "[0, 100000000]"},
    **{"offline_critic_updates": "[0, 10000000]", "eval_every": "[1, 100000000]", "eval_episodes": "[1, 1000]"},
}


def check_args(args: Args) -> str | None:
    """The first bad argument, as a message naming the flag (None if all are valid)."""
    if args.checkpoint is None:
        return "--checkpoint is required: the offline checkpoint to fine-tune (or --resume an online checkpoint)"
    if (problem := eval.out_of_range(args, RANGES)) is not None:
        return problem
    if args.num_minibatches > args.num_envs * args.num_steps:
        return (
            f"--num-minibatches ({args.num_minibatches}) must be at most the decisions per rollout, "
            f"--num-envs x --num-steps = {args.num_envs * args.num_steps}"
        )
    if args.free_actor_warmup != "auto" and not args.free_actor:
        return f"--free-actor-warmup {args.free_actor_warmup} names one of the two actors of --free-actor"
    if args.free_actor and (args.algo, args.actor) != ("td3", "residual"):
        return f"--free-actor trains beside --algo td3 --actor residual, not --algo {args.algo} --actor {args.actor}"
    if args.env_id is not None and not eval.is_dataset_name(args.env_id):
        envs = ", ".join(eval.GYM_ENV_IDS)
        return f"--env-id must be `<env>-<quality>` with env in {envs} (e.g. hopper-medium), got {args.env_id}"
    return None


def check_paths(args: Args) -> str | None:
    """Where the run writes, checked writable before any work (else it would fail at the first save)."""
    if (problem := eval.unwritable("runs")) is not None:
        return f"runs/ (the TensorBoard logs and the default checkpoint folder) cannot be written: {problem}"
    return eval.check_output_file("--checkpoint-path", args.checkpoint_path, inputs={"--checkpoint": args.checkpoint})


def choose_candidate(labels: list[str], scores: list[float]) -> int:
    """Index of the best real score (Uni-O4); a non-finite score is skipped with a printed line, never
    chosen (a plain max() keeps a NaN that comes first). ValueError if none is finite."""
    finite = [index for index, score in enumerate(scores) if np.isfinite(score)]
    for index in sorted(set(range(len(scores))) - set(finite)):
        print(f"selection: skipped {labels[index]}: its real normalized score is {scores[index]}, not finite")
    if not finite:
        raise ValueError(f"no candidate of the selection has a finite real score ({'; '.join(labels)}); none to tune")
    return max(finite, key=lambda index: scores[index])


# ---- the chunk-level environments, evaluation and checkpoint (both learners) ----------------------
def make_envs(checkpoint: dict, actor: OnlineActor, num_envs: int, gamma: float) -> gym.vector.SyncVectorEnv:
    """`num_envs` chunk-level MDPs with episode statistics; SAME_STEP autoreset (final observations in the infos)."""
    make = functools.partial(gym.make, checkpoint["gym_id"], max_episode_steps=checkpoint["max_episode_steps"])
    thunk = functools.partial(chunk_env, make, actor.chunk_size, actor.history_size, gamma)
    return gym.vector.SyncVectorEnv([thunk] * num_envs, autoreset_mode=gym.vector.AutoresetMode.SAME_STEP)


def chunk_env(make, chunk_size: int, history_size: int, gamma: float) -> eval.ChunkEnv:
    return eval.ChunkEnv(gym.wrappers.RecordEpisodeStatistics(make()), chunk_size, history_size, gamma)


def step_info(infos: dict, key: str, ended: np.ndarray) -> np.ndarray:
    """A per-env info entry after a SAME_STEP vector step: an ended row's is in infos["final_info"]."""
    values = np.array(infos.get(key, np.zeros(len(ended))), dtype=np.float64)
    if ended.any():
        values[ended] = np.asarray(infos["final_info"][key], dtype=np.float64)[ended]
    return values


def env_step(envs, chunks: np.ndarray, global_step: int, writer) -> tuple:
    """One decision per environment; `final_obs` is where each chunk ended (the final observation where autoreset
    replaced it in next_obs), `lengths` the actions each chunk executed (a chunk stops where its episode ends),
    `returns` each ended episode's undiscounted return (NaN in the other rows)."""
    next_obs, reward, terminated, truncated, infos = envs.step(chunks)
    done = terminated | truncated
    lengths, final_obs = step_info(infos, "chunk_length", done), np.array(next_obs)
    global_step += int(lengths.sum())
    returns = np.full(len(done), np.nan)
    if done.any():
        final_obs[done] = np.stack(infos["final_obs"][done])
        episode = infos["final_info"]["episode"]
        for row in np.flatnonzero(done & infos["final_info"]["_episode"]):
            returns[row] = episode["r"][row]
            writer.add_scalar("charts/episodic_return", episode["r"][row], global_step)
            writer.add_scalar("charts/episodic_length", episode["l"][row], global_step)
    return next_obs, final_obs, reward, terminated, done, lengths, global_step, returns


def anchor_weight_at(global_step: int, args: Args) -> float:
    return args.anchor_coef * max(1.0 - global_step / args.total_timesteps, args.anchor_floor)


def evaluate(step, actor, history, writer, args, checkpoint, path) -> None:
    """The deterministic policy's score on fixed start states, logged; a non-finite one stops the run unsaved."""
    actor.eval()
    scores = eval.evaluate_saved_task(actor, checkpoint, args.eval_episodes, args.seed, [0])["scores"][0]
    actor.train()
    if not (all(torch.isfinite(p).all() for p in actor.parameters()) and np.isfinite(scores).all()):
        eval.fail(f"step {step}: the policy's parameters or evaluation are not finite; stopped without saving ({path})")
    history["step"].append(step)
    history["scores"].append(scores.tolist())
    writer.add_scalar("charts/normalized_score", scores.mean(), step)
    tqdm.write(f"eval step {step}: normalized score {scores.mean():.1f} +- {scores.std():.1f}")


def write_checkpoint(step, actor, learner: dict, history, args, checkpoint, run, resume=None) -> None:
    """The atomic checkpoint eval.py reads; `learner` the critics or value network, `resume` PPO's training state."""
    task = ("gym_id", "max_episode_steps", "dataset_id", "ref_min_score", "ref_max_score")
    online = {"phase": "online", "args": asdict(args), "global_step": step, **{key: checkpoint[key] for key in task}}
    online["offline_checkpoint"] = args.checkpoint
    selection = {"actor": actor.to_checkpoint(), "sub_policy": run["sub_policy"], "selection": run["selection"]}
    eval.save_checkpoint(online | selection | learner | {"history": history, "resume": resume}, run["path"])


# ---- PPO on chunks (--algo ppo, the paper's learner) ----------------------------------------------
def chunk_gae(rewards, values, next_values, terminations, ended, discounts, gae_lambda: float):
    """GAE over chunk decisions, arrays (T, N); returns (advantages, returns):
        delta_t = R_t + d_t (1 - terminated_t) V'_t - V(s_t),   A_t = delta_t + d_t lambda (1 - ended_t) A_{t+1}
    d_t = gamma^{L_t} for a chunk of L_t executed steps; V'_t the value where the chunk ended (the final
    observation after a time-limit truncation: bootstrapped); `ended` cuts the recursion at episode ends."""
    advantages = torch.zeros_like(rewards)
    last = torch.zeros_like(rewards[0])
    for t in reversed(range(len(rewards))):
        delta = rewards[t] + discounts[t] * (1 - terminations[t]) * next_values[t] - values[t]
        last = delta + discounts[t] * gae_lambda * (1 - ended[t]) * last
        advantages[t] = last
    return advantages, advantages + values


class RewardScaler:
    """CleanRL's `NormalizeReward` per chunk: G <- gamma^L G + R per environment (0 at episode ends);
    rewards divided by the running std of G and clipped to +-`clip`."""

    def __init__(self, num_envs: int, clip: float = 10.0):
        self.returns, self.stats, self.clip = np.zeros(num_envs), RunningMeanStd(), clip

    def __call__(self, rewards: np.ndarray, discounts: np.ndarray, ended: np.ndarray) -> np.ndarray:
        self.returns = self.returns * discounts + rewards
        self.stats.update(self.returns)
        self.returns[ended] = 0.0
        return np.clip(rewards / np.sqrt(self.stats.var + 1e-8), -self.clip, self.clip)

    def state_dict(self) -> dict:
        stats = {"mean": float(self.stats.mean), "var": float(self.stats.var), "count": float(self.stats.count)}
        return {"returns": torch.from_numpy(self.returns.copy())} | stats

    def load_state_dict(self, state: dict) -> None:
        self.returns = state["returns"].numpy().copy()
        self.stats.mean, self.stats.var, self.stats.count = state["mean"], state["var"], state["count"]


def state_value(value_net, states: torch.Tensor) -> torch.Tensor:
    """CleanRL's critic on the flattened normalized state history: (B, To, S) -> (B,)."""
    return value_net(states.flatten(1)).squeeze(-1)


def actor_losses(actor, states, decisions, anchors, old_log_probs, advantages, clip_coef, init_std) -> dict:
    """PPO's clipped surrogate on a minibatch of decisions z (B, H, A), the KL anchor, CleanRL's diagnostics:
    r = N(z; mean(s), sigma^2) / N(z; mean_old(s), sigma_old^2)   (the exact Gaussian ratio)
    policy = -E[min(r A, clip(r, 1 - c, 1 + c) A)],  A normalized per minibatch (CleanRL)
    anchor_kl = E[KL(N(mean(s), sigma^2) || N(anchor(s), init_std^2))]   (closed form, over H x A)"""
    mean, std = actor.mean(states, anchors), actor.std()
    logratio = gaussian_log_prob(decisions, mean, std, event_dims=2) - old_log_probs
    ratio = logratio.exp()
    advantages = (advantages - advantages.mean()) / (advantages.std() + 1e-8)
    policy_loss = torch.max(-advantages * ratio, -advantages * ratio.clamp(1 - clip_coef, 1 + clip_coef)).mean()
    anchor_kl = gaussian_kl(mean, std, anchors, torch.tensor(init_std, device=mean.device), event_dims=2).mean()
    with torch.no_grad():
        approx_kl = ((ratio - 1) - logratio).mean()
        clipfrac = ((ratio - 1.0).abs() > clip_coef).float().mean().item()
    return {"policy": policy_loss, "anchor_kl": anchor_kl, "approx_kl": approx_kl, "clipfrac": clipfrac}


def ppo_update(actor, value_net, optimizers, batch: dict, args: Args, anchor_weight: float, warming_up: bool) -> dict:
    """PPO's epochs over one flattened rollout: the value loss, then (after the warm-up) the surrogate +
    anchor_weight x KL anchor, separate optimizers, gradients clipped; stopped past --target-kl."""
    actor_optimizer, value_optimizer = optimizers
    size = len(batch["returns"])
    minibatch_size = size // args.num_minibatches
    clipfracs, approx_kl, log = [], torch.zeros(()), {}
    for epoch in range(args.update_epochs):
        permutation = torch.randperm(size, device=batch["returns"].device)
        for start in range(0, size, minibatch_size):
            mb = permutation[start : start + minibatch_size]
            v_loss = 0.5 * ((state_value(value_net, batch["obs"][mb]) - batch["returns"][mb]) ** 2).mean()
            eval.check_finite({"value": v_loss}, "the PPO update")
            value_optimizer.zero_grad()
            v_loss.backward()
            torch.nn.utils.clip_grad_norm_(value_net.parameters(), MAX_GRAD_NORM)
            value_optimizer.step()
            if warming_up:
                continue
            minibatch = [batch[key][mb] for key in ("obs", "decisions", "anchors", "log_probs", "advantages")]
            out = actor_losses(actor, *minibatch, args.clip_coef, args.init_std)
            approx_kl = out["approx_kl"]
            clipfracs.append(out["clipfrac"])
            eval.check_finite({"policy": out["policy"], "anchor_kl": out["anchor_kl"]}, "the PPO update")
            actor_optimizer.zero_grad()
            (out["policy"] + anchor_weight * out["anchor_kl"]).backward()
            torch.nn.utils.clip_grad_norm_(actor.parameters(), MAX_GRAD_NORM)
            actor_optimizer.step()
        if not warming_up and args.target_kl is not None and approx_kl > args.target_kl:
            break
    if not warming_up:
        log = {"losses/policy_loss": out["policy"].item(), "losses/anchor_kl": out["anchor_kl"].item()}
        log |= {"losses/approx_kl": approx_kl.item(), "losses/clipfrac": np.mean(clipfracs)}
        log |= {"losses/update_epochs": epoch + 1}
    variance = batch["returns"].var()
    explained = float("nan") if variance == 0 else (1 - (batch["returns"] - batch["values"]).var() / variance).item()
    return log | {"losses/value_loss": v_loss.item(), "losses/explained_variance": explained}


def training_state(global_step, next_eval, iteration, run, gamma, optimizers, reward_scaler, device) -> dict:
    """What --resume continues from: the counters, both optimizers, the reward scaler, torch's random stream."""
    counters = {"global_step": global_step, "next_eval": next_eval, "iteration": iteration, "gamma": gamma}
    optimizer_states = {"actor_optimizer": optimizers[0].state_dict(), "value_optimizer": optimizers[1].state_dict()}
    state = {"run_name": run["name"], "reward_scaler": reward_scaler.state_dict(), **eval.rng_state(device)}
    return counters | optimizer_states | state


# What `training_state` writes and --resume needs.
TRAINING_STATE_FIELDS = ("global_step", "next_eval", "iteration", "run_name", "gamma", "actor_optimizer")
TRAINING_STATE_FIELDS += ("value_optimizer", "reward_scaler", "torch_rng")


def train_ppo(args: Args, actor: OnlineActor, checkpoint: dict, gamma: float, writer, run: dict, resumed):
    """--algo ppo: rollouts of z ~ N(mean(s), sigma^2), GAE over chunks, scaled rewards, a fresh value
    network alone for `--critic-warmup` rollouts; `resumed` the --resume checkpoint (None: the hand-over)."""
    device = run["device"]
    value_net = ppo_mlp(actor.history_size * actor.policy_config.obs_dim, 1, last_std=1.0).to(device)
    # Separate optimizers and gradient clipping: the actor's and the critic's steps do not compete.
    trained = [parameter for parameter in actor.parameters() if parameter.requires_grad]  # the head and log-std
    actor_optimizer = torch.optim.Adam(trained, lr=args.learning_rate, eps=1e-5)
    value_optimizer = torch.optim.Adam(value_net.parameters(), lr=VALUE_LEARNING_RATE, eps=1e-5)
    optimizers = (actor_optimizer, value_optimizer)
    envs = make_envs(checkpoint, actor, args.num_envs, gamma)
    reward_scaler = RewardScaler(args.num_envs)
    shape, decision_shape = (args.num_steps, args.num_envs), (actor.chunk_size, actor.act_dim)
    buffers = {"obs": torch.zeros(shape + (actor.history_size, actor.policy_config.obs_dim), device=device)}
    buffers |= {key: torch.zeros(shape + decision_shape, device=device) for key in ("decisions", "anchors")}
    scalars = ("log_probs", "rewards", "values", "next_values", "terminations", "ended", "discounts")
    buffers |= {key: torch.zeros(shape, device=device) for key in scalars}
    as_tensor = functools.partial(torch.as_tensor, dtype=torch.float32, device=device)

    global_step, next_eval, iteration, history = 0, args.eval_every, 0, {"step": [], "scores": []}
    if resumed is None:
        evaluate(0, actor, history, writer, args, checkpoint, run["path"])  # the hand-over
        resume = training_state(0, next_eval, 0, run, gamma, optimizers, reward_scaler, device)
        write_checkpoint(0, actor, {"value": value_net.state_dict()}, history, args, checkpoint, run, resume)
    else:  # --resume: every state the loop carries, as it was after the saved evaluation
        resume, history = resumed["resume"], resumed["history"]
        global_step, next_eval, iteration = resume["global_step"], resume["next_eval"], resume["iteration"]
        value_net.load_state_dict(resumed["value"])
        actor_optimizer.load_state_dict(resume["actor_optimizer"])
        value_optimizer.load_state_dict(resume["value_optimizer"])
        reward_scaler.load_state_dict(resume["reward_scaler"])
        eval.set_rng_state(resume, device)
    next_obs, _ = envs.reset(seed=args.seed + iteration)  # a resumed run starts new episodes
    start_time, start_step = time.time(), global_step
    progress = tqdm(total=args.total_timesteps, desc="online (ppo)", unit="step", initial=global_step, **eval.BAR)
    while global_step < args.total_timesteps:
        iteration += 1
        warming_up = iteration <= args.critic_warmup  # only the value network learns
        anchor_weight = anchor_weight_at(global_step, args)
        fraction = max(1.0 - global_step / args.total_timesteps, LR_FLOOR)  # annealed, never below LR_FLOOR
        actor_optimizer.param_groups[0]["lr"] = fraction * args.learning_rate
        value_optimizer.param_groups[0]["lr"] = fraction * VALUE_LEARNING_RATE

        # Rollout: num_steps decisions z ~ N(mean(s), sigma^2) in every environment.
        for t in range(args.num_steps):
            with torch.no_grad():
                states = buffers["obs"][t] = actor.normalize_states(as_tensor(next_obs))
                anchors = buffers["anchors"][t] = actor.anchor_mean(states)
                mean, std = actor.mean(states, anchors), actor.std()
                buffers["decisions"][t] = mean + std * torch.randn(mean.shape, device=device)
                buffers["log_probs"][t] = gaussian_log_prob(buffers["decisions"][t], mean, std, event_dims=2)
                buffers["values"][t] = state_value(value_net, states)
                chunk = actor.unscale_actions(actor.chunk(states, buffers["decisions"][t])).cpu().numpy()
            step = env_step(envs, chunk, global_step, writer)
            next_obs, final_obs, reward, terminated, done, lengths, global_step, _ = step
            buffers["rewards"][t] = as_tensor(reward_scaler(reward, gamma**lengths, done))
            buffers["discounts"][t] = as_tensor(gamma**lengths)
            buffers["terminations"][t], buffers["ended"][t] = as_tensor(terminated), as_tensor(done)
            with torch.no_grad():  # V of the state each chunk ended in (bootstraps a time-limit truncation)
                buffers["next_values"][t] = state_value(value_net, actor.normalize_states(as_tensor(final_obs)))
        gae_keys = ("rewards", "values", "next_values", "terminations", "ended", "discounts")
        advantages, returns = chunk_gae(*[buffers[key] for key in gae_keys], args.gae_lambda)

        # Update: the clipped surrogate of the Gaussian likelihood ratio + the KL anchor; the value loss.
        batch = {key: value.reshape((-1,) + value.shape[2:]) for key, value in buffers.items()}
        batch |= {"advantages": advantages.reshape(-1), "returns": returns.reshape(-1)}
        try:
            log = ppo_update(actor, value_net, optimizers, batch, args, anchor_weight, warming_up)
        except eval.NonFiniteLoss as error:
            eval.fail(f"iteration {iteration} (global step {global_step}): {error}; last checkpoint: {run['path']}")
        sigma, steps_per_second = actor.std().mean().item(), (global_step - start_step) / (time.time() - start_time)
        log |= {"charts/sigma": sigma, "charts/learning_rate": actor_optimizer.param_groups[0]["lr"]}
        log |= {"charts/anchor_weight": anchor_weight, "charts/SPS": steps_per_second}
        for tag, number in log.items():
            writer.add_scalar(tag, number, global_step)
        progress.update(global_step - progress.n)
        shown = {"iteration": iteration, "value": f"{log['losses/value_loss']:.4f}", "sigma": f"{sigma:.3f}"}
        progress.set_postfix(shown, refresh=False)
        if global_step >= next_eval or global_step >= args.total_timesteps:
            next_eval = (global_step // args.eval_every + 1) * args.eval_every
            evaluate(global_step, actor, history, writer, args, checkpoint, run["path"])
            # taken after the evaluation, so that a resumed run continues from here
            resume = training_state(global_step, next_eval, iteration, run, gamma, optimizers, reward_scaler, device)
            learner = {"value": value_net.state_dict()}
            write_checkpoint(global_step, actor, learner, history, args, checkpoint, run, resume)
    progress.close()
    envs.close()


# ---- TD3 on chunks with the offline data in every batch (--algo td3) -------------------------------
class ChunkReplay:
    """A ring buffer of decisions: normalized state histories before and after, the chunk in [-1, 1] (H, A),
    its discounted reward over `lengths` executed steps, `terminals` (not truncations), the offline z at both."""

    def __init__(self, capacity: int, example: dict):
        self.data = {key: value.new_zeros((capacity,) + value.shape[1:]) for key, value in example.items()}
        self.capacity, self.size, self.position = capacity, 0, 0

    def add(self, rows: dict) -> None:
        index = (self.position + torch.arange(len(rows["states"]))) % self.capacity
        for key, value in rows.items():
            self.data[key][index] = value
        self.position = int(index[-1] + 1) % self.capacity
        self.size = min(self.size + len(index), self.capacity)

    def sample(self, count: int) -> dict:
        index = torch.randint(self.size, (count,))
        return {key: value[index] for key, value in self.data.items()}


@torch.no_grad()
def offline_replay(checkpoint: dict, actor: OnlineActor, rows: int, gamma: float, seed: int):
    """A random `rows` of the offline data chunked as the actor acts, the offline z precomputed on every history;
    and the normalized score of every episode of the data."""
    try:
        dataset, *_ = eval.load_dataset(checkpoint["args"]["env_id"], checkpoint["dataset_id"])
    except eval.DatasetError as error:
        eval.fail(str(error))
    data = eval.chunk_dataset(dataset, actor.chunk_size, actor.history_size, gamma)
    returns = np.add.reduceat(data["step_rewards"].astype(np.float64), np.flatnonzero(data["episode_start"]))
    data_scores = eval.normalized_score(returns, checkpoint["ref_min_score"], checkpoint["ref_max_score"])
    index = torch.randperm(len(data["chunks"]), generator=torch.Generator().manual_seed(seed))[:rows].numpy()
    device = actor.log_std.device
    keys = ("states", "next_states", "chunks", "rewards", "mask", "dones")
    data = {key: torch.as_tensor(data[key][index], dtype=torch.float32, device=device) for key in keys}
    states, next_states = actor.normalize_states(data["states"]), actor.normalize_states(data["next_states"])
    replay = {"states": states, "anchors": batched_anchors(actor, states)}
    replay |= {"next_states": next_states, "next_anchors": batched_anchors(actor, next_states)}
    replay |= {"chunks": actor.scale_actions(data["chunks"]).clamp(-1, 1), "rewards": data["rewards"]}
    replay |= {"lengths": data["mask"].sum(1), "terminals": data["dones"]}
    buffer = ChunkReplay(len(index), replay)
    buffer.add(replay)
    return buffer, data_scores


def warmup_actor_name(free_actor_warmup: str, hand_over_score: float, data_scores: np.ndarray) -> str:
    """--free-actor-warmup auto: the hand-over's values first where the offline phase beat the data by more than
    the data's own spread (its score above the mean + 1 std of the data's episode scores), else the fresh
    actor's: a hand-over at the data's level is a pace whose values would hold the fresh actor there."""
    if free_actor_warmup != "auto":
        return free_actor_warmup
    return "hand-over" if hand_over_score > np.mean(data_scores) + np.std(data_scores) else "fresh"


def batched_anchors(actor: OnlineActor, states: torch.Tensor) -> torch.Tensor:
    """The offline policy's z at every history, 4096 at a time (the chain is the costly part)."""
    return torch.cat([actor.anchor_mean(batch) for batch in states.split(4096)])


def mixed_sample(offline: ChunkReplay, online: ChunkReplay, batch_size: int, offline_ratio: float) -> tuple[dict, int]:
    """RLPD's symmetric sampling: `offline_ratio` offline (all while online is empty); (batch, offline rows first)."""
    num_offline = batch_size if online.size == 0 else round(batch_size * offline_ratio)
    parts = [offline.sample(num_offline)]
    parts += [online.sample(batch_size - num_offline)] if num_offline < batch_size else []
    return {key: torch.cat([part[key] for part in parts]) for key in parts[0]}, num_offline


def history_view(batch: dict, actor: OnlineActor) -> dict:
    """The batch as `actor` sees it: the last `actor.history_size` states of each history (the fresh actor's one)."""
    return batch | {key: batch[key][:, -actor.history_size :] for key in ("states", "next_states")}


class Gate:
    """--free-actor: who plays each episode and which policy is deployed. The fresh actor explores: it plays every
    episode that is not a trial, with exploration noise. A trial round queues the deployed copy again, then a
    frozen copy of each candidate, for `episodes` deterministic episodes each in the training environments
    (their transitions go to the replay as any other). The deployed copy's score is the mean of all its trial
    episodes, so a lucky round regresses instead of holding the bar for good; once a candidate's episodes are
    in, it is deployed if their mean is above that score (judged once the deployed copy has a return). The
    hand-over is deployed from step 0; `first_round`: it plays its own round first, else only in the next one."""

    def __init__(self, num_envs: int, hand_over: OnlineActor, episodes: int, first_round: bool = True):
        self.episodes, self.queue, self.candidate_scores, self.unjudged = episodes, [], {}, []
        self.deployed_trial = self.frozen_trial("hand-over", hand_over)
        if first_round:
            self.schedule({})
        self.players = [self.next_trial() for _ in range(num_envs)]  # per environment: its episode's trial or None

    @staticmethod
    def frozen_trial(name: str, candidate: OnlineActor) -> dict:
        return {"name": name, "policy": copy.deepcopy(candidate).requires_grad_(False), "returns": [], "to_start": 0}

    @property
    def deployed(self) -> OnlineActor:
        return self.deployed_trial["policy"]

    @property
    def deployed_name(self) -> str:
        return self.deployed_trial["name"]

    @property
    def record(self) -> float:
        """The deployed copy's score: the mean return of all its trial episodes (-inf before the first)."""
        return float(np.mean(self.deployed_trial["returns"])) if self.deployed_trial["returns"] else -np.inf

    def schedule(self, candidates: dict) -> None:
        if self.deployed_trial["to_start"] == 0:  # not still queued from the last round
            self.queue.append(self.deployed_trial)
        self.deployed_trial["to_start"] = self.episodes
        self.queue += [
            self.frozen_trial(name, candidate) | {"to_start": self.episodes} for name, candidate in candidates.items()
        ]

    def next_trial(self) -> dict | None:
        """The trial that plays the next episode (None: the fresh actor explores)."""
        if not self.queue:
            return None
        trial = self.queue[0]
        trial["to_start"] -= 1
        if trial["to_start"] == 0:
            self.queue.pop(0)
        return trial

    def record_episodes(self, done: np.ndarray, returns: np.ndarray) -> None:
        """Ended episodes: a trial's return (a candidate deployed if it wins); the row's next episode's player."""
        for row in np.flatnonzero(done):
            trial = self.players[row]
            if trial is not None:
                trial["returns"].append(float(returns[row]))
                if trial is not self.deployed_trial and len(trial["returns"]) == self.episodes:
                    self.unjudged.append(trial)
            self.players[row] = self.next_trial()
        while self.unjudged and self.deployed_trial["returns"]:  # a bar to beat (other rows may finish first)
            trial = self.unjudged.pop(0)
            score = float(np.mean(trial["returns"]))  # a NaN return never wins
            self.candidate_scores[trial["name"]] = score
            if score > self.record:
                self.deployed_trial = trial


def gate_decisions(gate: Gate, free: OnlineActor, states, anchors, noise) -> torch.Tensor:
    """z of every environment's decision: its trial copy's mean, or the fresh actor's mean + exploration noise."""
    rows = []
    for row, trial in enumerate(gate.players):
        player = free if trial is None else trial["policy"]
        z = player.mean(states[row : row + 1, -player.history_size :], anchors[row : row + 1])
        rows.append(z + noise[row : row + 1] if trial is None else z)
    return torch.cat(rows)


def td3_critic_update(critics, target_critics, optimizer, actor, batch: dict, gamma: float, policy_noise=POLICY_NOISE):
    """TD3's critic step on chunks (Q-chunking: the chunk is the action, the target jumps H steps):
        z' = mean(s') + clip(N(0, policy_noise^2), -NOISE_CLIP, NOISE_CLIP),  a' = chunk(z')
        y = R + gamma^L (1 - terminated) min_k Q'_k(s', a')  (`dynamics.chunk_td_target`)
        loss = sum_k mean (Q_k(s, a) - y)^2
    Q sees the current state (the last of the history) and the chunk in [-1, 1]."""
    with torch.no_grad():
        noise = (torch.randn_like(batch["next_anchors"]) * policy_noise).clamp(-NOISE_CLIP, NOISE_CLIP)
        next_states = history_view(batch, actor)["next_states"]  # the actor's own history of s'
        next_z = actor.mean(next_states, batch["next_anchors"])
        next_q = target_critics.q(batch["next_states"][:, -1], actor.chunk(next_states, next_z + noise))
        target = chunk_td_target(batch["rewards"], batch["terminals"], batch["lengths"], next_q, gamma)
    q1, q2 = critics.q_heads(batch["states"][:, -1], batch["chunks"])
    loss = ((q1 - target) ** 2).mean() + ((q2 - target) ** 2).mean()
    eval.check_finite({"critic": loss}, "the critic update")
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return {"losses/critic_loss": loss.item()}, q1.detach()


def td3_actor_update(actor: OnlineActor, critics, optimizer, batch: dict, q_weight: float, anchor_weight: float):
    """TD3+BC's actor step with the offline policy as the reference (Q / mean|Q| makes q_weight scale-free):
    z = mean(s),  loss = -q_weight Q_1(s, chunk(z)) / mean|Q_1| + anchor_weight mean (z - anchor(s))^2"""
    z = actor.mean(batch["states"], batch["anchors"])
    q = critics.q_heads(batch["states"][:, -1], actor.chunk(batch["states"], z))[0]
    distance = ((z - batch["anchors"]) ** 2).mean()
    # The clip of z to [-1, 1] passes no gradient, so an entry pushed past it would drift unchecked: a
    # quadratic penalty on the excess keeps z at the box (0 inside it, so 0 at the hand-over).
    excess = torch.zeros(()) if actor.kind == "noise" else ((z.abs() - 1).clamp_min(0) ** 2).mean()
    loss = -q_weight * q.mean() / q.abs().mean().detach().clamp_min(1e-6) + anchor_weight * distance + excess
    eval.check_finite({"actor": loss}, "the actor update")
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    log = {"losses/actor_loss": loss.item(), "charts/distance_to_offline": distance.item()}
    return log | {"charts/box_excess": excess.item()}


def train_td3(args: Args, actor: OnlineActor, checkpoint: dict, gamma: float, writer, run: dict, free=None):
    """--algo td3: fresh LayerNorm chunk critics (RLPD) learn the offline data first, the actor frozen; then TD3
    on mixed batches; with a `free` (fresh) actor beside it, it explores, the critics' target follows it, and
    `Gate` deploys a frozen copy of whichever actor wins a trial round. No --resume: the checkpoint keeps the
    learner, not the replay."""
    device = run["device"]
    learner_actor = actor if free is None else free  # the actor the critics' target follows: the explorer
    critics = ChunkCritics(actor.policy_config.obs_dim, actor.act_dim, actor.chunk_size, layer_norm=True).to(device)
    target_critics = copy.deepcopy(critics).requires_grad_(False)
    critic_optimizer = torch.optim.Adam(critics.parameters(), lr=CRITIC_LEARNING_RATE)
    actor_optimizer = torch.optim.Adam(actor.head.parameters(), lr=args.learning_rate)
    free_optimizer = torch.optim.Adam(free.head.parameters(), lr=args.learning_rate) if free is not None else None
    gate, free_log, train_actor = None, {}, True
    history = {"step": [], "scores": []}
    evaluate(0, actor, history, writer, args, checkpoint, run["path"])  # the hand-over
    write_checkpoint(0, actor, {"critics": critics.state_dict()}, history, args, checkpoint, run)

    offline, data_scores = offline_replay(checkpoint, actor, OFFLINE_ROWS, gamma, args.seed)
    warmup_actor = actor
    if free is not None:  # --free-actor: whose values the critics learn first (`warmup_actor_name`)
        hand_over_score = float(np.mean(history["scores"][0]))
        name = warmup_actor_name(args.free_actor_warmup, hand_over_score, data_scores)
        warmup_actor = free if name == "fresh" else actor
        data = f"{np.mean(data_scores):.1f} +- {np.std(data_scores):.1f}"
        tqdm.write(
            f"--free-actor-warmup {args.free_actor_warmup}: the critics learn the {name} actor's values first "
            f"(hand-over {hand_over_score:.1f}, the data's episodes {data})"
        )
        writer.add_text("free_actor/warmup", name)
        # An offline policy no better than the data leaves the anchored residual nothing better to refine: then
        # it is neither trained nor tried, and the fresh actor explores from step 0, the hand-over deployed until
        # a fresh copy beats it in a trial (its data-paced trial episodes held the fresh actor back; design.md).
        train_actor = name == "hand-over"
        gate = Gate(args.num_envs, actor, TRIAL_EPISODES, first_round=train_actor)
        candidates = {"residual": actor, "fresh": free} if train_actor else {"fresh": free}
    warmup = tqdm(range(1, args.offline_critic_updates + 1), "offline critic updates", **eval.BAR)
    for update in warmup:  # the critics learn the values of the hand-over (or of the fresh actor) first
        try:
            batch = offline.sample(args.batch_size)
            log, _ = td3_critic_update(critics, target_critics, critic_optimizer, warmup_actor, batch, gamma)
        except eval.NonFiniteLoss as error:
            eval.fail(f"offline critic update {update}: {error}; stopped (last checkpoint, untouched: {run['path']})")
        soft_update(target_critics, critics, TAU)
        if update % 1000 == 0:
            warmup.set_postfix(critic=f"{log['losses/critic_loss']:.3f}", refresh=False)
    warmup.close()

    envs = make_envs(checkpoint, actor, args.num_envs, gamma)
    as_tensor = functools.partial(torch.as_tensor, dtype=torch.float32, device=device)
    next_obs, _ = envs.reset(seed=args.seed)
    states = actor.normalize_states(as_tensor(next_obs))
    anchors = actor.anchor_mean(states)
    online = ChunkReplay(min(BUFFER_SIZE, args.total_timesteps + args.num_envs), offline.data)
    global_step, next_eval, updates, start_time, actor_log = 0, args.eval_every, 0, time.time(), {}
    progress = tqdm(total=args.total_timesteps, desc="online (td3)", unit="step", **eval.BAR)
    while global_step < args.total_timesteps:
        # Collect one decision per environment: z = mean(s) + exploration noise, its chunk executed.
        with torch.no_grad():
            noise = args.exploration_noise * torch.randn_like(anchors)
            if free is None:
                z = actor.mean(states, anchors) + noise
            else:  # --free-actor: the fresh actor explores, or a trial copy plays its episode
                z = gate_decisions(gate, free, states, anchors, noise)
            chunks = actor.chunk(states, z)
        step = env_step(envs, actor.unscale_actions(chunks).cpu().numpy(), global_step, writer)
        next_obs, final_obs, reward, terminated, done, lengths, global_step, returns = step
        if gate is not None:
            gate.record_episodes(done, returns)
        progress.update(int(lengths.sum()))
        next_states = actor.normalize_states(as_tensor(final_obs))
        next_anchors = actor.anchor_mean(next_states)
        rows = {"states": states, "anchors": anchors, "chunks": chunks, "rewards": as_tensor(reward)}
        rows |= {"lengths": as_tensor(lengths), "terminals": as_tensor(terminated)}
        online.add(rows | {"next_states": next_states, "next_anchors": next_anchors})
        states = actor.normalize_states(as_tensor(next_obs))
        anchors = next_anchors if not done.any() else actor.anchor_mean(states)

        # Learn: --utd-ratio critic updates per decision on mixed batches, the actor every POLICY_FREQUENCY.
        try:
            for _ in range(args.utd_ratio * args.num_envs):
                batch, num_offline = mixed_sample(offline, online, args.batch_size, args.offline_ratio)
                log, q = td3_critic_update(critics, target_critics, critic_optimizer, learner_actor, batch, gamma)
                updates += 1
                if train_actor and updates % POLICY_FREQUENCY == 0 and global_step >= args.actor_learning_starts:
                    weight = anchor_weight_at(global_step, args)
                    actor_log = td3_actor_update(actor, critics, actor_optimizer, batch, args.q_weight, weight)
                if free is not None and updates % POLICY_FREQUENCY == 0:  # the fresh actor: no anchor
                    view = history_view(batch, free)
                    free_log = td3_actor_update(free, critics, free_optimizer, view, args.q_weight, 0.0)
                soft_update(target_critics, critics, TAU)
        except eval.NonFiniteLoss as error:
            eval.fail(f"step {global_step}: {error}; stopped (the last checkpoint is untouched: {run['path']})")
        if global_step // 5000 != (global_step - int(lengths.sum())) // 5000 or global_step >= args.total_timesteps:
            log |= actor_log | {"losses/q_offline": q[:num_offline].mean().item()}
            log |= {"losses/q_online": q[num_offline:].mean().item(), "charts/updates_per_step": updates / global_step}
            log |= {"charts/exploration_noise": args.exploration_noise}
            if free is not None:
                log |= {f"free_actor/{tag.split('/')[1]}": number for tag, number in free_log.items()}
                log |= {"free_actor/deployed_fresh": float(gate.deployed_name == "fresh")}
                log |= {"free_actor/deployed_trial_return": gate.record} if np.isfinite(gate.record) else {}
                log |= {f"free_actor/trial_return_{name}": score for name, score in gate.candidate_scores.items()}
            log |= {"charts/SPS": global_step / (time.time() - start_time)}
            for tag, number in log.items():
                writer.add_scalar(tag, number, global_step)
            shown = {key: f"{log['losses/' + key]:.3f}" for key in ("critic_loss", "q_offline", "q_online")}
            shown["distance"] = f"{log.get('charts/distance_to_offline', 0.0):.4f}"
            shown |= {} if free is None else {"deployed": gate.deployed_name}
            progress.set_postfix(shown, refresh=False)
        if global_step >= next_eval or global_step >= args.total_timesteps:
            next_eval = (global_step // args.eval_every + 1) * args.eval_every
            deployed = actor if gate is None else gate.deployed
            evaluate(global_step, deployed, history, writer, args, checkpoint, run["path"])
            learner = {"critics": critics.state_dict()}  # and, with --free-actor, both actors as they are
            if free is not None:
                learner |= {"residual_actor": actor.to_checkpoint(), "fresh_actor": free.to_checkpoint()}
                gate.schedule(candidates)  # the next trial round
            write_checkpoint(global_step, deployed, learner, history, args, checkpoint, run)
    progress.close()
    envs.close()


# ---- inputs: the offline checkpoint or the run to resume, and the selection ------------------------
def read_offline(args: Args) -> dict:
    """The offline checkpoint, refused with the reason if unreadable, of another `--env-id`, or cut off."""
    try:
        # --env-id names the dataset and its environment: a checkpoint of hopper-expert is no hopper-medium run.
        gym_id = eval.GYM_ENV_IDS[args.env_id.split("-")[0]] if args.env_id else None
        checkpoint = eval.load_checkpoint(args.checkpoint, "offline", gym_id, expected_dataset=args.env_id)
        eval.check_environment(checkpoint, args.checkpoint)
    except eval.CheckpointError as error:
        eval.fail(str(error))
    if (stage := eval.unfinished_stage(checkpoint)) is not None:
        eval.fail(f"{args.checkpoint} is a run cut off in {stage}: finish it with uepo_offline.py --resume")
    return checkpoint


def resumed_run(args: Args) -> tuple[Args, dict | None]:
    """--resume: the run's saved arguments (flags beside it named and ignored; it goes on writing to the
    resumed file) and its checkpoint; a file that cannot be resumed ends the script with one line."""
    if args.resume is None:
        return args, None
    try:
        resumed = eval.load_checkpoint(args.resume, phase="online")
        if not resumed.get("resume"):
            raise eval.CheckpointError(
                f"{args.resume} holds no training state to resume from (a --algo td3 run, which keeps no "
                "replay buffer; or an older version): run its command again"
            )
        for field in TRAINING_STATE_FIELDS:
            if (name := eval.missing_field(resumed, f"resume.{field}")) is not None:
                raise eval.CheckpointError(f"{args.resume} has no field {name}")
        defaults = asdict(Args())
        ignored = [name for name, value in asdict(args).items() if name != "resume" and value != defaults[name]]
        args = Args(**{**resumed["args"], "resume": args.resume, "checkpoint_path": args.resume})
    except eval.CheckpointError as error:
        eval.fail(str(error))
    except TypeError as error:
        eval.fail(f"{args.resume} was written by another version of this script ({error}); run its command again")
    if ignored:
        print(f"ignored beside --resume: {', '.join('--' + name.replace('_', '-') for name in ignored)}")
    print(f"resuming {args.resume} after step {resumed['global_step']} with the arguments saved in it")
    return args, resumed


def select_sub_policy(args: Args, checkpoint: dict, device) -> tuple:
    """Uni-O4's selection: the top --selection-top candidates by offline OPE score (the improved copies, else
    the base sub-policies), then the best over real episodes. Returns (policy, sub_policy, table)."""
    try:
        if args.actor == "mlp":  # the actor from scratch uses only the statistics and action bounds
            policy = eval.build_saved(checkpoint["policy"], "the saved policy").to(device)
            return policy, 0, "from scratch: no selection"
        candidates = eval.offline_candidates(checkpoint, device)[: args.selection_top]
    except eval.CheckpointError as error:
        eval.fail(f"{args.checkpoint}: {error}")
    episodes = args.selection_episodes
    scores = [eval.evaluate_saved_task(c[1], checkpoint, episodes, args.seed, [c[2]])["scores"][0] for c in candidates]
    try:
        chosen = choose_candidate([c[0] for c in candidates], [s.mean() for s in scores])
    except ValueError as error:
        eval.fail(f"{args.checkpoint}: {error}")
    table = "| candidate | offline OPE | real normalized score | chosen |\n|-|-|-|-|\n" + "\n".join(
        f"| {label} | {ope:.1f} | {s.mean():.1f} +- {s.std():.1f} | {'yes' if r == chosen else ''} |"
        for r, ((label, _, _, ope), s) in enumerate(zip(candidates, scores))
    )
    return copy.deepcopy(candidates[chosen][1]), candidates[chosen][2], table


if __name__ == "__main__":
    args, resumed = resumed_run(tyro.cli(Args))
    args = with_algo_defaults(args)
    if (problem := check_args(args) or check_paths(args)) is not None:
        eval.fail(problem)
    # --resume: the task and gamma come from the online checkpoint; the offline one is not read again.
    checkpoint = read_offline(args) if resumed is None else resumed
    gamma = checkpoint["args"]["gamma"] if resumed is None else resumed["resume"]["gamma"]

    # TRY NOT TO MODIFY: seeding
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    torch.backends.cudnn.deterministic = args.torch_deterministic
    device = torch.device("cuda" if torch.cuda.is_available() and args.cuda else "cpu")

    # Selection (Uni-O4); --resume: the run's own.
    if resumed is None:
        policy, sub_policy, selection_table = select_sub_policy(args, checkpoint, device)
    else:  # its actor is rebuilt below
        policy, sub_policy, selection_table = None, resumed["sub_policy"], resumed["selection"]
    how = "continue with --resume {path}" if args.algo == "ppo" else "td3 keeps no replay: start again"
    env_name = args.env_id or checkpoint["dataset_id"].replace("/", "-")
    run_name, checkpoint_path, writer = eval.start_run(args, env_name, resumed, "online.pt", how)
    print(selection_table)
    writer.add_text("selection", selection_table)

    # The actor: a Gaussian over decisions z whose mean is the deployed policy (diffusion.OnlineActor).
    if resumed is None:
        actor = OnlineActor(args.actor, policy, sub_policy, args.init_std, args.mlp_chunk_size).to(device)
    else:  # as saved at its last evaluation
        actor = eval.built_or_fail(args.resume, resumed["actor"], "the actor", device).train()
    # Fine-tuning: TD3 on chunks with the offline data (the default), or the paper's PPO.
    run = dict(name=run_name, sub_policy=sub_policy, selection=selection_table, path=checkpoint_path, device=device)
    if args.algo == "td3":  # --free-actor: a fresh chunk actor (as --actor mlp) beside the offline policy's
        free = OnlineActor("mlp", policy, 0, INIT_STD["mlp"], actor.chunk_size).to(device) if args.free_actor else None
        train_td3(args, actor, checkpoint, gamma, writer, run, free)
    else:
        train_ppo(args, actor, checkpoint, gamma, writer, run, resumed)
    writer.close()
