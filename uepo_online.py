"""UEPO online phase (arXiv 2511.10087), CleanRL style: read top to bottom.

    python uepo_online.py --checkpoint runs/<offline run>/offline.pt                 # 1M env steps
    python uepo_online.py --checkpoint ... --total-timesteps 100000 --eval-every 10000 \\
        --eval-episodes 5                                                           # quick CPU run
    python uepo_online.py --checkpoint ... --from-scratch                          # PPO baseline

1. Load the offline checkpoint of uepo_offline.py; a corrupt one, or (with `--env-id`) one made
   for another environment, is refused with the reason.
2. Selection, Uni-O4's rule (DESIGN.md, "Online fine-tuning"): the top `--selection-top`
   candidates by their offline OPE score (the improved copies when the offline run made them,
   else the base sub-policies), then the best of them over real episodes. The table that led
   to the choice is printed and logged to TensorBoard.
3. PPO on the chunk-level MDP (`eval.ChunkEnv`): one decision = one chunk of H actions, its
   reward the discounted sum of its rewards; vectorized Gymnasium environments; GAE over
   chunks with the discount gamma^L of each chunk's length L; time-limit truncations bootstrap
   from the final observation; the value network starts from the offline V; states keep the
   frozen offline statistics. The actor is the selected sub-policy of its DiffusionPolicy: its
   stochastic sampler (std floor `min_std` at every denoising step) explores, ratios are of
   whole chain likelihoods, and a sequence-level KL to the offline policy (`--kl-coef`) keeps
   the hand-over from collapsing. Rollouts are large (32 envs x 64 chunks) and an update stops
   its epochs once the approximate KL of the ratios passes `--target-kl`.
4. The deterministic sub-policy is evaluated every `--eval-every` environment steps (and at
   step 0, the hand-over); TensorBoard under runs/ with CleanRL's names plus
   `charts/normalized_score`; an atomic checkpoint runs/{run_name}/online.pt.
"""

import copy
import os
import random
import time
from dataclasses import asdict, dataclass, replace

import gymnasium as gym
import numpy as np
import torch
import tyro
from torch.utils.tensorboard import SummaryWriter

from diffusion import DiffusionPolicy, sub_policy_chain_terms
from dynamics import ChunkCritics
from eval import (GYM_ENV_IDS, CheckpointError, ChunkEnv, evaluate_sub_policies, fail, load_checkpoint,
                  offline_candidates, save_checkpoint)


@dataclass
class Args:
    checkpoint: str
    """the offline checkpoint to fine-tune (runs/<offline run>/offline.pt)"""
    exp_name: str = os.path.basename(__file__)[: -len(".py")]
    """the name of this experiment"""
    seed: int = 1
    """seed of the experiment (environments, exploration noise, minibatches, evaluation episodes)"""
    torch_deterministic: bool = True
    """if toggled, `torch.backends.cudnn.deterministic=True`"""
    cuda: bool = True
    """if toggled, use a GPU when there is one"""
    env_id: str | None = None
    """if given (`hopper-medium` or a Gymnasium id such as `Hopper-v5`), the checkpoint must be for this environment"""
    from_scratch: bool = False
    """the baseline: the same PPO from a freshly initialized actor (same architecture) and value network, no KL"""

    # Selection (Uni-O4's rule)
    selection_top: int = 3
    """candidates kept by offline OPE score before the real-episode comparison"""
    selection_episodes: int = 10
    """real episodes per candidate in the selection"""

    # PPO on the chunk-level MDP
    total_timesteps: int = 1_000_000
    """environment steps (actions executed, not chunks)"""
    num_envs: int = 32
    """parallel Gymnasium environments (gym.vector.SyncVectorEnv)"""
    num_steps: int = 64
    """chunk decisions per environment per rollout (64 x 32 envs x H = 4: about 8192 environment steps). A large
    rollout: the gradient of a whole-chain likelihood ratio is noisy, and 1024 steps per rollout (8 x 32) let the
    policy drift into falls (README, "Online fine-tuning")"""
    learning_rate: float = 3e-5
    """Adam learning rate of the actor (the denoiser), annealed with `--anneal-lr`. With `--target-kl` most updates
    stop after their first epoch, so this is about the size of one epoch's step"""
    value_learning_rate: float = 3e-4
    """Adam learning rate of the value network"""
    anneal_lr: bool = True
    """anneal both learning rates linearly to 0 over `--total-timesteps`"""
    gae_lambda: float = 0.95
    """lambda of GAE over chunks"""
    num_minibatches: int = 8
    """minibatches per epoch (256 chunks each with the default rollout)"""
    update_epochs: int = 5
    """epochs over every rollout, at most (`--target-kl` stops earlier)"""
    clip_coef: float = 0.2
    """PPO clip range of the chain-likelihood ratio"""
    min_std: float | None = None
    """std of the Gaussian noise the stochastic sampler adds at every denoising step, i.e. the exploration noise
    (default: the offline run's `--min-std`). The deterministic sub-policy that is evaluated does not depend on it"""
    kl_coef: float = 0.1
    """weight of the sequence-level KL of the actor's chain to the offline policy's (0 with --from-scratch)"""
    vf_coef: float = 0.5
    """weight of the value loss"""
    max_grad_norm: float = 0.5
    """gradient clipping (actor and value together)"""
    target_kl: float | None = 1.0
    """stop the epochs of an update early when the approximate KL of the ratios exceeds this (nats per chain of
    5 steps x H x A Gaussian entries, so larger than the usual 0.01-0.02 per action); None: always all epochs"""

    # Evaluation and checkpoint
    eval_every: int = 20_000
    """evaluate the deterministic sub-policy every `eval_every` environment steps (and at step 0 and the end)"""
    eval_episodes: int = 10
    """episodes per evaluation (the same start states every time)"""
    checkpoint_path: str | None = None
    """where to write the online checkpoint (default: runs/{run_name}/online.pt)"""


def gym_env_id(name: str) -> str:
    """`hopper-medium` -> `Hopper-v5`; a Gymnasium id passes through."""
    task = name.split("-")[0]
    return GYM_ENV_IDS[task] if task in GYM_ENV_IDS else name


def chunk_gae(rewards, values, next_values, terminations, ended, discounts, gae_lambda: float):
    """GAE over chunk decisions, arrays (T, N) (DESIGN.md, "Online fine-tuning").

        delta_t = R_t + d_t (1 - terminated_t) V'_t - V(s_t)
        A_t     = delta_t + d_t lambda (1 - ended_t) A_{t+1}

    R_t: discounted chunk reward; d_t = gamma^{L_t} for a chunk of L_t executed steps; V'_t the
    value of the state the chunk ended in: V(s_{t+1}), or V(final observation) where the episode
    was truncated by its time limit (bootstrapped, not a termination). `ended` (terminated or
    truncated) cuts the recursion at episode boundaries. Returns (advantages, returns).
    """
    advantages = torch.zeros_like(rewards)
    last = torch.zeros_like(rewards[0])
    for t in reversed(range(len(rewards))):
        delta = rewards[t] + discounts[t] * (1 - terminations[t]) * next_values[t] - values[t]
        last = delta + discounts[t] * gae_lambda * (1 - ended[t]) * last
        advantages[t] = last
    return advantages, advantages + values


def step_info(infos: dict, key: str, ended: np.ndarray) -> np.ndarray:
    """A per-env info entry after a vector step in SAME_STEP autoreset mode: rows whose episode
    ended carry it in infos["final_info"] (their top-level info is the reset's)."""
    values = np.array(infos.get(key, np.zeros(len(ended))), dtype=np.float64)
    if ended.any():
        final = infos["final_info"]
        values[ended] = np.asarray(final[key], dtype=np.float64)[ended]
    return values


if __name__ == "__main__":
    args = tyro.cli(Args)
    if args.min_std is not None and not args.min_std > 0:
        fail(f"--min-std must be > 0 (the chain likelihood is a Gaussian of that std), got {args.min_std}")
    try:
        checkpoint = load_checkpoint(args.checkpoint, expected_env_id=gym_env_id(args.env_id) if args.env_id else None)
    except CheckpointError as error:
        fail(str(error))
    if checkpoint.get("phase") == "online" or "history" not in checkpoint:
        fail(f"{args.checkpoint} is not an offline checkpoint of uepo_offline.py")
    env_id, max_episode_steps = checkpoint["env_id"], checkpoint["max_episode_steps"]
    ref_min_score, ref_max_score = checkpoint["ref_min_score"], checkpoint["ref_max_score"]
    gamma = checkpoint["args"]["gamma"]
    env_name = args.env_id or checkpoint["dataset_id"].replace("/", "-")
    run_name = f"{env_name}__{args.exp_name}__{args.seed}__{int(time.time())}"
    checkpoint_path = args.checkpoint_path or f"runs/{run_name}/online.pt"
    writer = SummaryWriter(f"runs/{run_name}")
    writer.add_text("hyperparameters", "|param|value|\n|-|-|\n%s" % (
        "\n".join([f"|{key}|{value}|" for key, value in vars(args).items()])))

    # TRY NOT TO MODIFY: seeding
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    torch.backends.cudnn.deterministic = args.torch_deterministic
    device = torch.device("cuda" if torch.cuda.is_available() and args.cuda else "cpu")

    # ---- selection: top-k by offline OPE, then the best over real episodes (Uni-O4) ---------
    base = DiffusionPolicy.from_checkpoint(checkpoint["policy"]).to(device)
    config = base.config
    evaluate = lambda policy, sub_policy, episodes: evaluate_sub_policies(
        policy, env_id, episodes, seed=args.seed * 1000, ref_min_score=ref_min_score, ref_max_score=ref_max_score,
        max_episode_steps=max_episode_steps, sub_policies=[sub_policy])["scores"][0]
    if args.from_scratch:
        # Same architecture, same frozen statistics and seeds, fresh weights; sub-policy 0.
        state = checkpoint["policy"]["state_dict"]
        actor = DiffusionPolicy(config, state["state_mean"], state["state_std"], state["action_low"],
                                state["action_high"]).to(device)
        sub_policy, selection_table = 0, "from scratch: no selection"
        args.kl_coef = 0.0  # a KL to a random initialization would only slow learning
    else:
        # The improved copies scored by the gate's OPE, else the base sub-policies by AM-Q; best first.
        candidates = offline_candidates(checkpoint, device)
        rows = []
        for label, policy, i, ope_score in candidates[: args.selection_top]:
            scores = evaluate(policy, i, args.selection_episodes)
            rows.append((label, policy, i, ope_score, scores.mean(), scores.std()))
        chosen = max(range(len(rows)), key=lambda r: rows[r][4])
        selection_table = "| candidate | offline OPE | real normalized score | chosen |\n|-|-|-|-|\n" + "\n".join(
            f"| {label} | {ope_score:.1f} | {mean:.1f} +- {std:.1f} | {'yes' if r == chosen else ''} |"
            for r, (label, _, _, ope_score, mean, std) in enumerate(rows))
        actor, sub_policy = copy.deepcopy(rows[chosen][1]), rows[chosen][2]
    print(selection_table)
    writer.add_text("selection", selection_table)
    if args.min_std is not None:
        # The exploration noise of the chain (DESIGN.md: N(mu_theta, min_std^2) at every step); the
        # anchor gets the same std, so the sequence-level KL compares the two chains' means.
        actor.config = replace(actor.config, min_std=args.min_std)
    offline_actor = copy.deepcopy(actor).requires_grad_(False)  # the KL anchor, frozen

    # ---- value network: the offline V(s) (chunk-level IQL), on the current normalized state ----
    critics = ChunkCritics(config.obs_dim, config.act_dim, config.horizon)
    if "critics" in checkpoint and not args.from_scratch:
        critics.load_state_dict(checkpoint["critics"]["state_dict"])
    else:
        print("value network: fresh initialization" + ("" if args.from_scratch else
                                                         " (the checkpoint has no critics: it was made with --no-ope)"))
    value_net = critics.v.to(device)
    optimizer = torch.optim.Adam([{"params": actor.parameters(), "lr": args.learning_rate},
                                  {"params": value_net.parameters(), "lr": args.value_learning_rate}], eps=1e-5)
    value = lambda normalized_histories: value_net(normalized_histories[:, -1]).squeeze(-1)

    # ---- vectorized chunk-level environments ------------------------------------------------
    # SAME_STEP autoreset: an episode that ends returns its final observation in the infos and is
    # reset in the same call; a chunk never crosses an episode boundary (ChunkEnv), so the next
    # decision of that environment starts the new episode cleanly.
    def make_env():
        env = gym.wrappers.RecordEpisodeStatistics(gym.make(env_id, max_episode_steps=max_episode_steps))
        return ChunkEnv(env, config.horizon, config.obs_horizon, gamma)

    envs = gym.vector.SyncVectorEnv([make_env for _ in range(args.num_envs)],
                                    autoreset_mode=gym.vector.AutoresetMode.SAME_STEP)
    n, steps = config.n_subpolicies, len(base.timesteps)
    shape = (args.num_steps, args.num_envs)
    obs = torch.zeros(shape + (config.obs_horizon, config.obs_dim), device=device)  # normalized histories
    chains = torch.zeros(shape + (n, steps + 1, config.horizon, config.act_dim), device=device)
    log_probs, rewards, values, next_values, terminations, ended, discounts = (
        torch.zeros(shape, device=device) for _ in range(7))

    history = {"step": [], "scores": [], "returns": []}

    def evaluate_and_save(step: int) -> float:
        """The deterministic sub-policy's normalized score (fixed start states), then the checkpoint."""
        actor.eval()
        scores = evaluate(actor, sub_policy, args.eval_episodes)
        actor.train()
        history["step"].append(step)
        history["scores"].append(scores.tolist())
        writer.add_scalar("charts/normalized_score", scores.mean(), step)
        print(f"eval step {step}: normalized score {scores.mean():.1f} +- {scores.std():.1f}", flush=True)
        save_checkpoint({
            "phase": "online", "args": asdict(args), "global_step": step, "env_id": env_id,
            "max_episode_steps": max_episode_steps, "dataset_id": checkpoint["dataset_id"],
            "ref_min_score": ref_min_score, "ref_max_score": ref_max_score, "offline_checkpoint": args.checkpoint,
            "policy": actor.to_checkpoint(), "sub_policy": sub_policy, "selection": selection_table,
            "value": value_net.state_dict(), "history": history}, checkpoint_path)
        return scores.mean()

    # ---- PPO ---------------------------------------------------------------------------------------
    global_step, next_eval, iteration = 0, args.eval_every, 0
    evaluate_and_save(0)  # the hand-over
    start_time = time.time()
    next_obs, _ = envs.reset(seed=args.seed)
    while global_step < args.total_timesteps:
        iteration += 1
        if args.anneal_lr:
            fraction = 1.0 - global_step / args.total_timesteps
            optimizer.param_groups[0]["lr"] = fraction * args.learning_rate
            optimizer.param_groups[1]["lr"] = fraction * args.value_learning_rate

        # Rollout: num_steps chunk decisions in every environment.
        for t in range(args.num_steps):
            with torch.no_grad():
                obs[t] = actor.normalize_states(torch.as_tensor(next_obs, dtype=torch.float32, device=device))
                sample = actor.sample(obs[t], stochastic=True)  # all n sub-policies (they are coupled)
                chains[t], log_probs[t], values[t] = sample.chain, sample.log_prob[:, sub_policy], value(obs[t])
            chunk = actor.unscale_actions(sample.actions[:, sub_policy]).cpu().numpy()
            next_obs, reward, terminated, truncated, infos = envs.step(chunk)
            done = terminated | truncated
            lengths = step_info(infos, "chunk_length", done)
            global_step += int(lengths.sum())
            rewards[t] = torch.as_tensor(reward, dtype=torch.float32, device=device)
            discounts[t] = torch.as_tensor(gamma ** lengths, dtype=torch.float32, device=device)
            terminations[t] = torch.as_tensor(terminated, dtype=torch.float32, device=device)
            ended[t] = torch.as_tensor(done, dtype=torch.float32, device=device)
            # The state each chunk ended in: the next observation, or for an episode that ended
            # (autoreset already replaced its observation) the final one kept in the infos.
            final_obs = np.array(next_obs)
            if done.any():
                final_obs[done] = np.stack(infos["final_obs"][done])
                episode = infos["final_info"]["episode"]
                for row in np.flatnonzero(done & infos["final_info"]["_episode"]):
                    writer.add_scalar("charts/episodic_return", episode["r"][row], global_step)
                    writer.add_scalar("charts/episodic_length", episode["l"][row], global_step)
            with torch.no_grad():
                next_values[t] = value(actor.normalize_states(torch.as_tensor(final_obs, dtype=torch.float32,
                                                                              device=device)))

        advantages, returns = chunk_gae(rewards, values, next_values, terminations, ended, discounts,
                                        args.gae_lambda)

        # Update: clipped surrogate on chain-likelihood ratios + KL to the offline policy + value loss.
        flat = lambda x: x.reshape((-1,) + x.shape[2:])
        b_obs, b_chains, b_log_probs = flat(obs), flat(chains), flat(log_probs)
        b_advantages, b_returns, b_values = flat(advantages), flat(returns), flat(values)
        batch_size = args.num_steps * args.num_envs
        minibatch_size = batch_size // args.num_minibatches
        clipfracs = []
        for epoch in range(args.update_epochs):
            permutation = torch.randperm(batch_size, device=device)
            for start in range(0, batch_size, minibatch_size):
                mb = permutation[start:start + minibatch_size]
                new_log_prob, kl_to_offline = sub_policy_chain_terms(actor, offline_actor, b_obs[mb], b_chains[mb],
                                                                     sub_policy)
                logratio = new_log_prob - b_log_probs[mb]
                ratio = logratio.exp()
                with torch.no_grad():
                    old_approx_kl = (-logratio).mean()
                    approx_kl = ((ratio - 1) - logratio).mean()
                    clipfracs.append(((ratio - 1.0).abs() > args.clip_coef).float().mean().item())
                mb_advantages = b_advantages[mb]
                mb_advantages = (mb_advantages - mb_advantages.mean()) / (mb_advantages.std() + 1e-8)
                pg_loss = torch.max(-mb_advantages * ratio,
                                    -mb_advantages * ratio.clamp(1 - args.clip_coef, 1 + args.clip_coef)).mean()
                v_loss = 0.5 * ((value(b_obs[mb]) - b_returns[mb]) ** 2).mean()
                kl_loss = kl_to_offline.mean()
                loss = pg_loss + args.kl_coef * kl_loss + args.vf_coef * v_loss
                for name, term in (("policy", pg_loss), ("value", v_loss), ("kl_to_offline", kl_loss)):
                    if not torch.isfinite(term):
                        raise FloatingPointError(f"iteration {iteration} (global step {global_step}): the {name} "
                                                 f"loss is {term.item()}; stopping (last checkpoint: {checkpoint_path})")
                optimizer.zero_grad()
                loss.backward()
                torch.nn.utils.clip_grad_norm_(list(actor.parameters()) + list(value_net.parameters()),
                                               args.max_grad_norm)
                optimizer.step()
            if args.target_kl is not None and approx_kl > args.target_kl:
                break
        epochs_run = epoch + 1

        variance = b_returns.var()
        explained_variance = float("nan") if variance == 0 else (1 - (b_returns - b_values).var() / variance).item()
        steps_per_second = global_step / (time.time() - start_time)
        writer.add_scalar("charts/learning_rate", optimizer.param_groups[0]["lr"], global_step)
        writer.add_scalar("losses/value_loss", v_loss.item(), global_step)
        writer.add_scalar("losses/policy_loss", pg_loss.item(), global_step)
        writer.add_scalar("losses/kl_to_offline", kl_loss.item(), global_step)
        writer.add_scalar("losses/old_approx_kl", old_approx_kl.item(), global_step)
        writer.add_scalar("losses/approx_kl", approx_kl.item(), global_step)
        writer.add_scalar("losses/clipfrac", np.mean(clipfracs), global_step)
        writer.add_scalar("losses/update_epochs", epochs_run, global_step)
        writer.add_scalar("losses/explained_variance", explained_variance, global_step)
        writer.add_scalar("charts/SPS", steps_per_second, global_step)
        eta_seconds = max(args.total_timesteps - global_step, 0) / steps_per_second
        print(f"iteration {iteration} step {global_step}/{args.total_timesteps} | policy {pg_loss.item():.4f} | "
              f"value {v_loss.item():.4f} | kl_to_offline {kl_loss.item():.3f} | approx_kl {approx_kl.item():.4f} | "
              f"clipfrac {np.mean(clipfracs):.3f} | epochs {epochs_run} | {steps_per_second:.0f} env steps/s | "
              f"ETA {time.strftime('%H:%M:%S', time.gmtime(eta_seconds))}", flush=True)
        if global_step >= next_eval or global_step >= args.total_timesteps:
            evaluate_and_save(global_step)
            next_eval = (global_step // args.eval_every + 1) * args.eval_every

    envs.close()
    writer.close()
