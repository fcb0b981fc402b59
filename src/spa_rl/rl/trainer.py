"""`spa train`: multi-turn PPO with a critic (or GRPO, or turn-level GAE) for LLM agents, from any checkpoint
(docs/method.md §6). The algorithm reads top to bottom in `train_rl`; the maths is in `core.py`.

Each step: play `puzzles_per_step` training puzzles × `samples_per_puzzle` episodes with the fast rollout
engine on the actor's current weights; add the per-turn bonuses; keep the groups whose rewards vary most; score
the kept episodes with the training forward pass (old log-probs, values, reference log-probs); compute
advantages; run PPO epochs over minibatches for actor and critic. Every `eval_every` steps the validation
puzzles are played (Pass@1, Pass@k, world-model accuracy); checkpoints are atomic and a rerun resumes exactly.
Every model stays in eval mode (no dropout, e.g. LoRA's), so the ratio of new to old log-probs is exactly 1
before the first update. Several processes (`accelerate launch`) each play their share of the puzzles, keep an
equal share of the chosen groups and sum their gradients (`Trainable.step`).

Why our own trainer: TRL removed its PPO trainer in 2026; veRL, RAGEN, OpenRLHF and SkyRL need Ray and CUDA.
None trains multi-turn agents with a critic on a CPU. This module must never hold RL maths (that is `core.py`)
or plumbing SFT shares (that is `spa_rl.training`).
"""

from __future__ import annotations

import copy
import dataclasses
import math
import resource
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate.utils import gather_object

from spa_rl.config import to_dict
from spa_rl.errors import SpaError
from spa_rl.generation import make_backend
from spa_rl.io import atomic_dir, atomic_write_json, read_json
from spa_rl.metrics import compute_metrics, world_model_metrics
from spa_rl.models import checkpoint_layers, for_training, load_model, pick_device
from spa_rl.novelty import state_novelty
from spa_rl.outputs import claim_output
from spa_rl.plots import plot_rl
from spa_rl.progress import progress_bar, say
from spa_rl.rl import core
from spa_rl.rl.config import STAGE, RLConfig
from spa_rl.rl.episodes import Trajectory, build_trajectory, group_diversity, per_turn_bonuses
from spa_rl.rl.models import PolicyModel, ValueModel, load_backbone
from spa_rl.rollout import RolloutEngine
from spa_rl.seeds import training_seeds, validation_seeds
from spa_rl.training import (
    Checkpointer,
    RunLogger,
    Trainable,
    apply_lora,
    make_accelerator,
    micro_batches,
    resolve_precision,
    save_model,
)
from spa_rl.training.memory import (
    activation_bytes_per_token,
    model_state_bytes,
    plan_micro_batch_tokens,
    release_free_memory,
)


# ------------------------------------------------------------------------------------------ batches
@dataclass
class Batch:
    """The kept episodes of a step as right-padded tensors. Token quantities are [N, T-1] in the frame of the
    predicted tokens: column j describes token j+1 (its log-prob and value come from position j)."""

    ids: torch.Tensor
    """[N, T] token ids, right-padded."""
    lengths: list[int]
    mask: torch.Tensor
    """[N, T-1] 1 where the loss covers the token."""
    sampled: torch.Tensor
    """[N, T-1] 1 where the policy sampled the token."""
    rollout_logprobs: torch.Tensor
    rewards: torch.Tensor
    groups: torch.Tensor
    """[N] group of each episode."""
    scores: torch.Tensor
    """[N] each episode's total reward."""
    old_logprobs: torch.Tensor | None = None
    values: torch.Tensor | None = None
    ref_logprobs: torch.Tensor | None = None
    advantages: torch.Tensor | None = None
    returns: torch.Tensor | None = None

    @classmethod
    def of(cls, trajectories: list[Trajectory], pad_id: int) -> Batch:
        n, width = len(trajectories), max(len(t.ids) for t in trajectories)
        ids = torch.full((n, width), pad_id, dtype=torch.long)
        token = {k: torch.zeros((n, width - 1)) for k in ("mask", "sampled", "rollout_logprobs", "rewards")}
        for r, t in enumerate(trajectories):
            ids[r, :len(t.ids)] = torch.tensor(t.ids)
            for k, values in (("mask", t.mask), ("sampled", t.sampled), ("rollout_logprobs", t.rollout_logprobs),
                              ("rewards", t.rewards)):
                token[k][r, :len(t.ids) - 1] = torch.tensor(values[1:], dtype=torch.float)
        return cls(ids, [len(t.ids) for t in trajectories], token["mask"], token["sampled"],
                   token["rollout_logprobs"], token["rewards"], torch.tensor([t.group for t in trajectories]),
                   torch.tensor([t.score for t in trajectories]))

    @classmethod
    def of_sequences(cls, sequences: list[tuple[list[int], list[int]]], pad_id: int) -> Batch:
        """(ids, loss mask) pairs as a batch with no rewards (the world-model term's sequences)."""
        return cls.of([Trajectory(ids, mask, [0] * len(ids), [0.0] * len(ids), [0.0] * len(ids), 0, 0.0)
                       for ids, mask in sequences], pad_id)

    def rows(self, idx: list[int], device: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
        """(ids [b, L], attention mask [b, L], keep [b, L-1] bool, L) of rows `idx`, cut to their longest."""
        width = max(self.lengths[i] for i in idx)
        index = torch.tensor(idx)
        ids = self.ids[index, :width]
        attention = (torch.arange(width)[None, :] < torch.tensor([self.lengths[i] for i in idx])[:, None]).long()
        return ids.to(device), attention.to(device), self.mask[index, :width - 1].bool().to(device), width

    def micro(self, idx: list[int], config: RLConfig) -> list[list[int]]:
        order = sorted(idx, key=lambda i: self.lengths[i])
        return micro_batches(self.lengths, order, config.micro_batch_size, config.micro_batch_tokens)


@torch.no_grad()
def score_rows(model: Trainable | torch.nn.Module, batch: Batch, config: RLConfig, device: Any,
               values: bool = False, autocast: Any = None) -> torch.Tensor:
    """[N, T-1] the policy's log-probs (or the critic's values) of every kept episode on the loss tokens, from a
    model being trained (in its precision, in step with the other processes when its weights are sharded) or a
    plain one (`autocast`: where its passes run)."""
    out = torch.zeros_like(batch.mask)
    micro: Iterable[list[int]] = batch.micro(list(range(len(batch.lengths))), config)
    if isinstance(model, Trainable):
        micro, autocast, model = model.in_lockstep(micro, train=False), model.autocast, model.model
    for idx in micro:
        ids, attention, keep, width = batch.rows(idx, device)
        with autocast():
            got = model(ids, attention, keep) if values else model(ids, attention, keep)[0]
        dense = torch.zeros((len(idx), width - 1))
        dense[keep.cpu()] = got.float().cpu()
        out[torch.tensor(idx), :width - 1] = dense
    return out


# ------------------------------------------------------------------------------------------ the loop
def train_rl(config: RLConfig, quiet: bool = False) -> dict:
    """Run (or resume) PPO into `config.out`; return the final metrics."""
    out = claim_output(config.out, STAGE, config, done="result.json")
    if out.finished:
        say(f"{out.path} already holds this finished RL run: nothing to do", quiet)
        return read_json(out.path / "result.json", "result")
    device = pick_device(config.model.device)
    accelerator = make_accelerator(device)
    world, main = accelerator.num_processes, accelerator.is_main_process
    if config.puzzles_per_step % world or config.kept_groups % world or config.minibatch_size % world:
        raise SpaError(f"puzzles_per_step, the kept groups ({config.kept_groups}) and minibatch_size must divide "
                       f"evenly over the {world} processes")
    precision = resolve_precision(config.model.dtype, device, training=True)
    dev = str(accelerator.device)
    reference = None
    if config.kl_coef > 0:  # first: a wrong reference path fails before the big loads
        ref_path = config.model.model if config.reference == "init" else config.reference
        ref_lm = load_model(ref_path, dev, "bf16" if precision.name == "bf16" else "fp32").model.eval()
        reference = PolicyModel(ref_lm.requires_grad_(False), config.rollout.sampling.temperature)
    # actor (and critic) from the checkpoint when resuming; else from the starting model, an adapter merged into
    # its base (a new adapter is trained on top with --lora)
    ckpt = Checkpointer(out.path / "checkpoint")
    resume = ckpt.exists()
    # sharded weights: the models are loaded whole on the CPU, and `fully_shard` moves each process's shards to its
    # device, so a model too large for one device never is on one
    sharded = config.shard_weights and world > 1
    load_to = "cpu" if sharded else dev
    lm = load_model(str(ckpt.dir / "actor") if resume else config.model.model, load_to, "fp32",
                    merge_adapter=not resume)
    tokenizer, pad_id = lm.tokenizer, lm.tokenizer.pad_token_id
    policy = PolicyModel(apply_lora(for_training(lm.model), config.lora).eval(), config.rollout.sampling.temperature)
    # with sharded weights, generation (and the curiosity scorer) runs on a whole copy, refreshed after each update
    rollout_lm = (copy.deepcopy(policy.lm).to(dev, precision.weights).requires_grad_(False) if sharded
                  else policy.lm)
    if config.gradient_checkpointing:
        checkpoint_layers(policy.lm)
    actor = Trainable(policy, precision, accelerator, lr=config.actor_lr, total_steps=config.steps,
                      schedule="constant", max_grad_norm=config.max_grad_norm, shard=config.shard_optimizer,
                      shard_weights=config.shard_weights)
    critic = None
    if config.uses_critic:
        if resume:
            value_model = ValueModel(for_training(load_backbone(str(ckpt.dir / "critic"), load_to)),
                                     lm.model.config.hidden_size)
            value_model.load_head(ckpt.dir / "critic")
        else:
            value_model = ValueModel.from_causal_lm(for_training(load_model(config.model.model, load_to,
                                                                            "fp32").model))
        if config.gradient_checkpointing:
            checkpoint_layers(value_model)
        critic = Trainable(value_model.to(load_to).eval(), precision, accelerator, lr=config.critic_lr,
                           total_steps=config.steps, schedule="constant", max_grad_norm=config.max_grad_norm,
                           shard=config.shard_optimizer, shard_weights=config.shard_weights)
    # micro-batches sized from the memory this machine has, before any work (a pass that cannot fit is refused)
    state = (model_state_bytes(actor.model, precision) + (model_state_bytes(critic.model, precision) if critic else 0)
             + (model_state_bytes(reference, precision, trained=False) if reference is not None else 0)
             + (model_state_bytes(rollout_lm, precision, trained=False) if sharded else 0)) // (world if sharded else 1)
    plan = plan_micro_batch_tokens(config.micro_batch_tokens, config.memory_gib, dev, state,
                                   activation_bytes_per_token(lm.model.config, precision,
                                                              config.gradient_checkpointing), "spa train")
    config = dataclasses.replace(config, micro_batch_tokens=plan.tokens)
    say(f"memory: {plan.describe()}", quiet or not main)
    engine = RolloutEngine(config.rollout, make_backend(config.rollout.backend, rollout_lm, tokenizer), tokenizer)
    step = 0
    if resume:
        state = ckpt.load()
        actor.load_state_dict(state.states["actor"])
        if critic is not None:
            critic.load_state_dict(state.states["critic"])
        step = state.step
        say(f"resuming {out.path} from its checkpoint at step {step} of {config.steps}", quiet or not main)
    logger = RunLogger(out.path, config.log, to_dict(config), resume_step=step) if main else None
    meta = {"stage": "rl", "config": to_dict(config), "precision": precision.name, "base_model": config.model.model}

    def write_models(directory: Path, weights: dict) -> None:
        (directory / "actor").mkdir()
        save_model(policy.lm, tokenizer, directory / "actor", meta, _strip(weights["actor"], "lm."))
        if critic is not None:
            (directory / "critic").mkdir()
            critic.model.save(directory / "critic", weights["critic"])

    def gather_weights() -> dict:  # every process: sharded weights are gathered on the main one
        return {"actor": actor.weights(), "critic": critic.weights() if critic else None}

    def checkpoint() -> None:
        states = {"actor": actor.state_dict(), **({"critic": critic.state_dict()} if critic else {})}  # collective
        weights = gather_weights()
        if main:
            ckpt.save(step, lambda directory: write_models(directory, weights), states)
        accelerator.wait_for_everyone()

    def refresh_rollout_copy(metrics: dict) -> None:
        if sharded and metrics.get("rollout/actor_updated", 1.0):
            actor.copy_into(rollout_lm, prefix="lm.")

    def log(values: dict) -> None:
        if logger is not None:
            logger.log(step, values)

    with progress_bar(transient=quiet or not main) as bar:
        if step == 0 and config.eval_before and main:
            log(evaluate_policy(engine, config, bar))
        task = bar.add_task("PPO", total=config.steps, completed=step, unit="steps")
        while step < config.steps:
            metrics = ppo_step(step, config, engine, tokenizer, pad_id, rollout_lm, actor, critic, reference,
                               accelerator)
            refresh_rollout_copy(metrics)
            step += 1
            if config.eval_every and step % config.eval_every == 0 and step < config.steps and main:
                metrics.update(evaluate_policy(engine, config, bar))
                release_free_memory()
            log(metrics)
            bar.advance(task)
            if not math.isfinite(metrics["losses/policy_loss"]) or not math.isfinite(metrics["losses/value_loss"]):
                raise SpaError(f"the losses became {metrics['losses/policy_loss']} / {metrics['losses/value_loss']} at "
                               f"step {step}: stopped; the last good checkpoint is in {ckpt.dir} (lower the learning "
                               f"rates and rerun in another directory)")
            if config.save_every and step % config.save_every == 0 and step < config.steps:
                checkpoint()
        final = evaluate_policy(engine, config, bar) if main else {}
    if world > 1:  # every process must have made the same updates (sharded: gathered the same whole weights)
        params = list(rollout_lm.parameters()) if sharded else actor.params + (critic.params if critic else [])
        final["dist/weight_spread"] = weight_spread(params, accelerator.device)
        final["dist/optimizer_state_share"] = actor.state_share
    log(final)
    checkpoint()
    weights = gather_weights()
    if main:
        result = {"steps": step, **{k: v for k, v in final.items() if isinstance(v, int | float)}}
        meta["result"] = result
        atomic_dir(out.path / "model", lambda d: save_model(policy.lm, tokenizer, d, meta,
                                                            _strip(weights["actor"], "lm.")))
        if critic is not None:
            atomic_dir(out.path / "critic", lambda d: critic.model.save(d, weights["critic"]))
        atomic_write_json(out.path / "result.json", result)
        ckpt.discard()
        logger.close()
        plot_rl(out.path)
    accelerator.wait_for_everyone()
    return read_json(out.path / "result.json", "result")


def weight_spread(params: list[torch.Tensor], device: Any) -> float:
    """The largest difference between processes of a fingerprint of `params` (the sum of their absolute values in
    float64): 0 when every process holds the same weights."""
    fingerprint = torch.tensor([sum(float(p.detach().double().abs().sum()) for p in params)], dtype=torch.float64,
                               device=device)
    gathered = [torch.zeros_like(fingerprint) for _ in range(torch.distributed.get_world_size())]
    torch.distributed.all_gather(gathered, fingerprint)
    return float(max(g.item() for g in gathered) - min(g.item() for g in gathered))


def _strip(state: dict[str, torch.Tensor] | None, prefix: str) -> dict[str, torch.Tensor] | None:
    return None if state is None else {k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)}


def _all_reduce(values: list[float], device: Any, world: int) -> list[float]:
    """`values` summed over the processes (returned as they are in one process)."""
    if world == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    torch.distributed.all_reduce(t)
    return t.tolist()


def ppo_step(step: int, config: RLConfig, engine: RolloutEngine, tokenizer: Any, pad_id: int, rollout_lm: Any,
             actor: Trainable, critic: Trainable | None, reference: PolicyModel | None,
             accelerator: Any) -> dict[str, float]:
    """One PPO step: rollouts, rewards, the group filter, scoring, advantages, the update. Returns its metrics.
    `rollout_lm`: the language model the engine generates with (the actor's, or its whole copy when sharded)."""
    device, rc = accelerator.device, config.rollout
    rank, world = accelerator.process_index, accelerator.num_processes
    # 1. rollouts with the current weights: this process plays its share of the step's puzzles
    t0 = time.perf_counter()
    seeds = training_seeds(config.first_seed + step * config.puzzles_per_step, config.puzzles_per_step)
    episodes = engine.run(seeds[rank::world], group_size=config.samples_per_puzzle,
                          seed=config.seed * 1_000_003 + step * 97 + rank)
    engine.backend.reset()
    release_free_memory()  # the rollouts' caches go back to the system before the update allocates its own
    t_generate = time.perf_counter() - t0
    generated = sum(len(t.response_ids) for e in episodes for t in e.turns)
    # 2. rewards: the environment's per turn plus the bonuses; the episodes as token sequences
    t0 = time.perf_counter()
    group_of = {seed: g for g, seed in enumerate(seeds)}
    groups = [group_of[e.seed] for e in episodes]
    bonuses, bonus_stats = per_turn_bonuses(
        episodes, config, lambda states: state_novelty(rollout_lm, tokenizer, config.rollout, states),
        lambda values: _all_reduce(values, device, world))
    trajectories = [build_trajectory(e, tokenizer, g, placement=config.reward_placement, loss_tokens=config.loss_tokens,
                                     bonuses=b, world_model=config.world_model_coef > 0, fmt=rc.format,
                                     render=rc.render)
                    for e, g, b in zip(episodes, groups, bonuses, strict=True)]
    diversity = group_diversity(episodes, groups)
    # 3. the groups whose rewards vary most, chosen over all processes; each process takes an equal share
    everything = gather_object(trajectories) if world > 1 else trajectories
    group_scores: dict[int, list[float]] = {}
    for t in everything:
        group_scores.setdefault(t.group, []).append(t.score)
    group_ids = sorted(group_scores)
    stds = torch.tensor([torch.tensor(group_scores[g]).std(unbiased=False).item() for g in group_ids])
    chosen = core.keep_most_varied_groups(stds, config.keep_ratio)
    mine = {group_ids[i] for i in chosen.tolist()[rank::world]}
    kept = [t for t in everything if t.group in mine]
    batch = Batch.of(kept, pad_id)
    # 4. score the kept episodes with the training forward pass (the same code the update runs), unless the update
    # is one pass over them: then its own forwards give the same numbers before any weight moves (`one_pass`)
    one_pass = config.one_pass
    if not one_pass:
        batch.old_logprobs = score_rows(actor, batch, config, device)
        if critic is not None:
            batch.values = score_rows(critic, batch, config, device, values=True)
    if reference is not None:
        batch.ref_logprobs = score_rows(reference, batch, config, device, autocast=actor.autocast)
    t_score = time.perf_counter() - t0
    # 5. advantages (one pass with a critic: the critic's forward and backward run now, and give the values)
    t0 = time.perf_counter()
    mask = batch.mask
    critic_stats: dict[str, float] | None = None
    if config.advantage == "grpo":
        adv = core.group_advantages(batch.scores, batch.groups, config.grpo_norm_by_std)
        batch.advantages, batch.returns = adv[:, None] * mask, torch.zeros_like(mask)
    else:
        if one_pass:
            critic_stats = _critic_first(batch, list(range(len(kept))), config, critic, device, world)
        else:
            batch.advantages, batch.returns = advantages_from_values(batch.rewards, batch.values, mask, config)
        if config.whiten_advantages:
            moments = _all_reduce([float(x) for x in core.masked_moments(batch.advantages, mask)], device, world)
            batch.advantages = core.masked_whiten(batch.advantages, mask,
                                               tuple(torch.tensor(m, dtype=torch.float64) for m in moments))
    # 6. PPO epochs over minibatches, actor and critic (the actor sits out the critic's warm-up, and a step whose
    # kept groups all scored uniformly: a cold model that never follows the format, or one that always wins)
    train_actor = step >= config.critic_warmup and (float(stds[chosen].max()) > 0 or not config.skip_uniform_steps)
    if one_pass:
        batch.old_logprobs = torch.zeros_like(mask)  # filled by the actor's pass
    stats = update(batch, kept, config, actor if train_actor else None, critic, reference, device, step, world,
                   critic_stats)
    t_update = time.perf_counter() - t0
    # 7. what happened, over all processes
    n_turns = sum(len(e.turns) for e in episodes)
    wm = world_model_metrics([(t.parsed.observation, t.parsed.prediction, t.state_before, t.state_after)
                              for e in episodes for t in e.turns])
    local = [sum(float(e.success) for e in episodes), float(len(episodes)), float(generated), float(n_turns),
             diversity["distinct_actions"], diversity["distinct_responses"],
             float(core.masked_sum((batch.rollout_logprobs - batch.old_logprobs).abs(), batch.sampled)),
             float(batch.sampled.sum()) if train_actor or not one_pass else 0.0,
             float(sum(batch.lengths) * config.ppo_epochs),
             wm["observation_exact"] * n_turns, wm["prediction_exact"] * n_turns,
             sum(e.total_reward for e in episodes)]
    (successes, n_episodes, tokens, turns, distinct_actions, distinct_responses, mismatch, sampled, trained,
     observation_exact, prediction_exact, game_reward) = _all_reduce(local, device, world)
    metrics = {
        **stats,
        **bonus_stats,
        "rollout/reward_mean": float(torch.tensor([t.score for t in everything]).mean()),
        "rollout/game_reward_mean": game_reward / max(n_episodes, 1),
        "rollout/success": successes / max(n_episodes, 1),
        "rollout/kept_group_std": float(stds[chosen].mean()),
        "rollout/actor_updated": float(train_actor),
        "rollout/group_std": float(stds.mean()),
        "rollout/response_tokens": tokens / max(turns, 1),
        "rollout/turns": turns / max(n_episodes, 1),
        **({"rollout/logprob_mismatch": mismatch / sampled} if sampled else {}),  # one pass: the actor's forward
        "rollout/distinct_actions": distinct_actions / world,
        "rollout/distinct_responses": distinct_responses / world,
        "rollout/observation_exact": observation_exact / max(turns, 1),
        "rollout/prediction_exact": prediction_exact / max(turns, 1),
        "time/generate": t_generate, "time/score": t_score, "time/update": t_update,
        "perf/generated_tokens_per_s": tokens / world / max(t_generate, 1e-9),
        "perf/trained_tokens": trained,
        "perf/peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
    }
    for name in ("prediction",) if config.curiosity_center else ("prediction", "novelty"):  # centred: 0 by design
        values = [v for t in everything for v in t.bonuses.get(name, [])]
        if values:
            metrics[f"rollout/{name}_bonus"] = sum(values) / len(values)
    if critic is not None:
        explained = float(core.explained_variance(batch.values, batch.returns, mask))
        if math.isfinite(explained):  # undefined when every return is the same
            metrics["losses/explained_variance"] = explained
        for name, x in (("value", batch.values), ("return", batch.returns)):  # what the critic is fitting, and how far
            mean = core.masked_mean(x, mask)
            metrics[f"critic/{name}_mean"] = float(mean)
            metrics[f"critic/{name}_std"] = float(core.masked_mean((x - mean) ** 2, mask).sqrt())
    return metrics


def advantages_from_values(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor,
                           config: RLConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """(advantages, returns) [N, T-1] of rows by the configured critic-based estimator (before whitening)."""
    if config.advantage == "gae":
        return core.gae(rewards, values, mask, config.gamma, config.lam)
    return core.bi_level_gae(rewards, values, mask, config.gamma, config.lam, config.turn_gamma)


def update(batch: Batch, kept: list[Trajectory], config: RLConfig, actor: Trainable | None,
           critic: Trainable | None, reference: PolicyModel | None, device: Any, step: int,
           world: int, critic_stats: dict[str, float] | None = None) -> dict[str, float]:
    """PPO epochs over minibatches: the actor's clipped loss (with entropy, KL and world-model terms) and the
    critic's clipped value loss, gradients summed over processes (`actor` None: the critic only;
    `critic_stats`: the critic's one pass already ran, `_critic_first`, and only its optimizer step is left).
    Returns the mean statistics."""
    per_process = config.minibatch_size // world
    generator = torch.Generator().manual_seed(config.seed * 7919 + step)
    totals: dict[str, float] = {}
    count = 0
    for _ in range(config.ppo_epochs):
        order = torch.randperm(len(kept), generator=generator).tolist()
        for start in range(0, len(kept), per_process):
            minibatch = order[start:start + per_process]
            weights = token_weights(batch.mask, minibatch, config.loss_agg, device, world)
            stats = {"weight": float(weights[minibatch].sum())}  # the critic's stats' weight if the actor sits out
            if actor is not None:
                stats = _actor_minibatch(batch, kept, minibatch, weights, config, actor, reference, device, world)
            if critic_stats is not None:
                stats.update(critic_stats)
            elif critic is not None:
                stats.update(_critic_minibatch(batch, minibatch, weights, config, critic, device))
            keys = sorted(stats)
            stats = dict(zip(keys, _all_reduce([stats[k] for k in keys], device, world), strict=True))
            weight = stats.pop("weight")
            stats = {k: v / max(weight, 1e-12) if k in WEIGHTED_STATS else v for k, v in stats.items()}
            if actor is not None:
                stats["losses/grad_norm"] = actor.step()
            if critic is not None:
                stats["losses/critic_grad_norm"] = critic.step()
            for k, v in stats.items():
                totals[k] = totals.get(k, 0.0) + float(v)
            count += 1
    out = {k: v / max(count, 1) for k, v in totals.items()}
    for key in ("losses/policy_loss", "losses/value_loss", "losses/entropy", "losses/approx_kl", "losses/clipfrac",
                "losses/grad_norm"):
        out.setdefault(key, 0.0)
    return out


WEIGHTED_STATS = ("losses/clipfrac", "losses/dual_clipfrac", "losses/approx_kl", "losses/value_clipfrac",
                  "rollout/tis_mean", "rollout/tis_clipfrac")
"""Statistics summed as weight x value over micro-batches and processes, divided by the total weight."""


def token_weights(mask: torch.Tensor, minibatch: list[int], agg: str, device: Any, world: int) -> torch.Tensor:
    """`core.token_weights` of a minibatch, its totals counted over every process."""
    rows = torch.tensor(minibatch)
    tokens = mask[rows].sum(-1)
    total_tokens, total_rows = _all_reduce([float(tokens.sum()), float((tokens > 0).sum())], device, world)
    return core.token_weights(mask, rows, agg, total_tokens, total_rows)


def _weighted(loss_and_stats: tuple[torch.Tensor, dict], weight: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """A loss computed as a token-mean under fractional weights, turned into the weighted sum (the micro-batch's
    share of the minibatch's loss); its statistics likewise, to be divided by the total weight later."""
    loss, stats = loss_and_stats
    total = weight.sum()
    return loss * total, {k: float(v) * float(total) for k, v in stats.items()}


def _actor_minibatch(batch: Batch, kept: list[Trajectory], minibatch: list[int], weights: torch.Tensor,
                     config: RLConfig, actor: Trainable, reference: PolicyModel | None, device: Any,
                     world: int) -> dict[str, float]:
    sums: dict[str, float] = {"weight": 0.0}

    def add(name: str, value: float) -> None:
        sums[name] = sums.get(name, 0.0) + value

    for idx in actor.in_lockstep(batch.micro(minibatch, config)):
        ids, attention, keep, width = batch.rows(idx, device)
        rows = torch.tensor(idx)
        w = weights[rows, :width - 1].to(device)
        with actor.autocast():
            logp_flat, entropy_flat = actor.model(ids, attention, keep)
        logp = torch.zeros(w.shape, device=device, dtype=logp_flat.dtype).masked_scatter(keep, logp_flat)
        entropy = torch.zeros(w.shape, device=device, dtype=entropy_flat.dtype).masked_scatter(keep, entropy_flat)
        if config.one_pass:  # the pass before any weight moves: its log-probs are the old ones (ratio exactly 1)
            old = logp.detach()
            batch.old_logprobs[rows, :width - 1] = old.float().cpu()
        else:
            old = batch.old_logprobs[rows, :width - 1].to(device)
        adv = batch.advantages[rows, :width - 1].to(device)
        if config.tis_cap:  # a constant positive weight per token: scaling A scales the clipped loss alike
            tis, tis_stats = core.truncated_is_weights(old, batch.rollout_logprobs[rows, :width - 1].to(device),
                                                       batch.sampled[rows, :width - 1].to(device), config.tis_cap)
            adv = adv * tis
            for k, v in tis_stats.items():
                add(f"rollout/{k}", float(v) * float(w.sum()))
        pg, stats = _weighted(core.policy_loss(logp, old, adv, w, config.clip_low, config.clip_high,
                                               config.dual_clip), w)
        ent = core.masked_sum(entropy, w)
        loss = pg - config.entropy_coef * ent
        if reference is not None:
            ref = batch.ref_logprobs[rows, :width - 1].to(device)
            kl = core.masked_sum(core.kl_penalty(logp, ref, config.kl_estimator), w)
            loss = loss + config.kl_coef * kl
            add("losses/kl", float(kl.detach()))
        actor.backward(loss)
        add("weight", float(w.sum()))
        add("losses/policy_loss", float(pg.detach()))
        add("losses/entropy", float(ent.detach()))
        for k, v in stats.items():
            add(f"losses/{k}", v)
    if config.world_model_coef > 0:
        sums["losses/world_model"] = _world_model_loss(kept, minibatch, config, actor, device, world)
    return sums


def _world_model_loss(kept: list[Trajectory], minibatch: list[int], config: RLConfig, actor: Trainable,
                      device: Any, world: int) -> float:
    """Cross-entropy (at temperature 1, as SFT trains) on the true states of the minibatch's episodes rewritten as
    self-play data, weighted by `world_model_coef` and normalised by the state tokens over all processes, into the
    actor's gradients. Returns this process's share of the mean NLL per state token."""
    sequences = [kept[i].world_model for i in minibatch if kept[i].world_model is not None]
    local = sum(sum(mask[1:]) for _, mask in sequences)
    (total,) = _all_reduce([float(local)], device, world)
    if total == 0:
        return 0.0
    wm = Batch.of_sequences(sequences, pad_id=0) if sequences else None
    nll_sum = 0.0
    for idx in actor.in_lockstep(wm.micro(list(range(len(sequences))), config) if wm else []):
        ids, attention, keep, _ = wm.rows(idx, device)
        with actor.autocast():
            logp, _ = actor.model(ids, attention, keep, temperature=1.0)
        nll = -logp.sum()
        actor.backward(config.world_model_coef * nll / total)
        nll_sum += float(nll.detach())
    return nll_sum / total


def _critic_first(batch: Batch, minibatch: list[int], config: RLConfig, critic: Trainable, device: Any,
                  world: int) -> dict[str, float]:
    """The critic's one pass when the update is one pass (`RLConfig.one_pass`): its forward gives the old values,
    from which each micro-batch's rows get their advantages and returns before the value loss's backward (GAE is
    per row). Fills `batch.values`, `.advantages` and `.returns`; returns the critic's statistics."""
    batch.values, batch.advantages, batch.returns = (torch.zeros_like(batch.mask) for _ in range(3))
    weights = token_weights(batch.mask, minibatch, config.loss_agg, device, world)
    return _critic_minibatch(batch, minibatch, weights, config, critic, device, first=True)


def _critic_minibatch(batch: Batch, minibatch: list[int], weights: torch.Tensor, config: RLConfig,
                      critic: Trainable, device: Any, first: bool = False) -> dict[str, float]:
    sums = {"losses/value_loss": 0.0, "losses/value_clipfrac": 0.0}
    for idx in critic.in_lockstep(batch.micro(minibatch, config)):
        ids, attention, keep, width = batch.rows(idx, device)
        rows = torch.tensor(idx)
        w = weights[rows, :width - 1].to(device)
        with critic.autocast():
            values_flat = critic.model(ids, attention, keep)
        values = torch.zeros(w.shape, device=device, dtype=values_flat.dtype).masked_scatter(keep, values_flat)
        if first:  # these are the old values: the rows' advantages and returns follow from them
            old_values = values.detach().float().cpu()
            batch.values[rows, :width - 1] = old_values
            advantages, returns = advantages_from_values(batch.rewards[rows, :width - 1], old_values,
                                                         batch.mask[rows, :width - 1], config)
            batch.advantages[rows, :width - 1], batch.returns[rows, :width - 1] = advantages, returns
        old = batch.values[rows, :width - 1].to(device)
        returns = batch.returns[rows, :width - 1].to(device)
        loss, stats = _weighted(core.value_loss(values, old, returns, w, config.value_clip), w)
        critic.backward(loss)
        sums["losses/value_loss"] += float(loss.detach())
        sums["losses/value_clipfrac"] += stats["clipfrac"]
    return sums


# ------------------------------------------------------------------------------------------ evaluation
def evaluate_policy(engine: RolloutEngine, config: RLConfig, bar: Any) -> dict[str, float]:
    """Pass@1, Pass@k and world-model accuracy of the current policy on the validation puzzles (`val/...`),
    with a task on the caller's progress bar."""
    task = bar.add_task("validation", total=config.eval_puzzles * config.eval_samples, unit="episodes")
    episodes = engine.run(validation_seeds(config.eval_puzzles), group_size=config.eval_samples, seed=config.seed,
                          progress=lambda n: bar.advance(task, n))
    bar.remove_task(task)
    engine.backend.reset()
    metrics = compute_metrics(episodes, config.eval_samples)
    keep = [k for k in metrics if k.startswith(("pass@", "any@"))] + [
        "format_rate", "action_valid_rate", "mean_reward", "observation_exact", "prediction_exact",
        "prediction_cell_acc", "prediction_exact_changed", "copy_exact_baseline"]
    return {f"val/{k}": float(metrics[k]) for k in keep if isinstance(metrics.get(k), int | float)}
