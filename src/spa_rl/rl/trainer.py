"""`spa train`: multi-turn PPO with a critic (or GRPO, or turn-level GAE) for LLM agents, from any checkpoint
(docs/method.md §6). The loop reads top to bottom in `train_rl` and one step in `rl_step`; the settings are
`config.py`'s `RLConfig`, the maths is in `core.py`, the advantage estimators in `advantages.py`.

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
from spa_rl.rl.advantages import ESTIMATORS, AdvantageInputs
from spa_rl.rl.config import STAGE, RLConfig
from spa_rl.rl.episodes import Trajectory, build_trajectory, dataset_groups, group_diversity, per_turn_bonuses
from spa_rl.rl.models import PolicyModel, ValueModel, load_backbone
from spa_rl.rollout import Episode, RolloutEngine
from spa_rl.seeds import validation_seeds
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
    old_logprobs: torch.Tensor = dataclasses.field(init=False)
    """[N, T-1] the actor's log-probs before the update: from the scoring pass, or filled by the update's own
    first pass (one pass)."""
    values: torch.Tensor = dataclasses.field(init=False)
    """[N, T-1] the critic's values before the update (zeros without a critic)."""
    ref_logprobs: torch.Tensor = dataclasses.field(init=False)
    """[N, T-1] the reference policy's log-probs (zeros without a KL term)."""
    advantages: torch.Tensor = dataclasses.field(init=False)
    returns: torch.Tensor = dataclasses.field(init=False)
    """[N, T-1] the critic's targets (zeros without a critic)."""

    def __post_init__(self) -> None:  # every per-token field exists from the start, zero until a phase fills it
        for name in ("old_logprobs", "values", "ref_logprobs", "advantages", "returns"):
            setattr(self, name, torch.zeros_like(self.mask))

    def advantage_inputs(self, rows: torch.Tensor | None = None, width: int | None = None) -> AdvantageInputs:
        """What an advantage estimator reads, of every row (or of `rows`, cut to `width` token columns)."""
        cut = (lambda x: x) if rows is None else (lambda x: x[rows, :width])
        pick = (lambda x: x) if rows is None else (lambda x: x[rows])
        return AdvantageInputs(cut(self.rewards), cut(self.values), cut(self.mask), pick(self.scores),
                               pick(self.groups))

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


# ------------------------------------------------------------------------------------------ the models
@dataclass
class Learners:
    """What a run trains and plays with, and where: the actor (a `Trainable` policy), the critic (a `Trainable`
    value model; None without one), the frozen reference policy (None without a KL term), the language model the
    rollout engine decodes with (the actor's own, or a whole copy refreshed after each update when the weights are
    sharded), and the accelerator that places them and sums over processes."""

    actor: Trainable
    critic: Trainable | None
    reference: PolicyModel | None
    rollout_lm: Any
    tokenizer: Any
    accelerator: Any
    sharded: bool

    @property
    def device(self) -> Any:
        return self.accelerator.device

    @property
    def world(self) -> int:
        return self.accelerator.num_processes

    @property
    def rank(self) -> int:
        return self.accelerator.process_index

    @property
    def main(self) -> bool:
        return self.accelerator.is_main_process

    def sum(self, values: dict[str, float]) -> dict[str, float]:
        """`values` summed over the processes (as they are, in one process)."""
        if self.world == 1:
            return dict(values)
        keys = sorted(values)
        t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=self.device)
        torch.distributed.all_reduce(t)
        return dict(zip(keys, t.tolist(), strict=True))

    def states(self) -> dict[str, Any]:
        """The optimizers' states (a collective when they are sharded)."""
        return {"actor": self.actor.state_dict(), **({"critic": self.critic.state_dict()} if self.critic else {})}

    def load_states(self, states: dict[str, Any]) -> None:
        self.actor.load_state_dict(states["actor"])
        if self.critic is not None:
            self.critic.load_state_dict(states["critic"])

    def weights(self) -> dict[str, Any]:
        """The models' weights (every process calls it: sharded weights are gathered on the main one)."""
        return {"actor": self.actor.weights(), "critic": self.critic.weights() if self.critic else None}

    def write(self, directory: Path, weights: dict[str, Any], meta: dict) -> None:
        """The actor (HF format) into `directory/actor` and the critic into `directory/critic`."""
        (directory / "actor").mkdir()
        save_model(self.actor.model.lm, self.tokenizer, directory / "actor", meta, _strip(weights["actor"], "lm."))
        if self.critic is not None:
            (directory / "critic").mkdir()
            self.critic.model.save(directory / "critic", weights["critic"])

    def refresh_rollout_copy(self, metrics: dict[str, float]) -> None:
        """After an update that moved the actor, the sharded run's whole copy for generation takes its weights."""
        if self.sharded and metrics.get("rollout/actor_updated", 1.0):
            self.actor.copy_into(self.rollout_lm, prefix="lm.")


def build_learners(config: RLConfig, ckpt: Checkpointer) -> Learners:
    """The models of a run, from the checkpoint when there is one, else from `config.model.model` (an adapter is
    merged into its base; `--lora` trains a new one on top); the reference first, so that a wrong path fails before
    the big loads. With sharded weights the models are loaded whole on the CPU and `fully_shard` moves each
    process's shards to its device, so a model too large for one device never is on one."""
    device = pick_device(config.model.device)
    accelerator = make_accelerator(device)
    world = accelerator.num_processes
    if config.puzzles_per_step % world or config.kept_groups % world or config.minibatch_size % world:
        raise SpaError(f"puzzles_per_step, the kept groups ({config.kept_groups}) and minibatch_size must divide "
                       f"evenly over the {world} processes")
    precision = resolve_precision(config.model.dtype, device, training=True)
    dev = str(accelerator.device)
    reference = None
    if config.uses_reference:
        ref_path = config.model.model if config.reference == "init" else config.reference
        ref_lm = load_model(ref_path, dev, "bf16" if precision.name == "bf16" else "fp32").model.eval()
        reference = PolicyModel(ref_lm.requires_grad_(False), config.rollout.sampling.temperature)
    resume = ckpt.exists()
    sharded = config.shard_weights and world > 1
    load_to = "cpu" if sharded else dev
    lm = load_model(str(ckpt.dir / "actor") if resume else config.model.model, load_to, "fp32",
                    merge_adapter=not resume)
    policy = PolicyModel(apply_lora(for_training(lm.model), config.lora).eval(), config.rollout.sampling.temperature)
    rollout_lm = (copy.deepcopy(policy.lm).to(dev, precision.weights).requires_grad_(False) if sharded
                  else policy.lm)
    if config.gradient_checkpointing:
        checkpoint_layers(policy.lm)
    optim = {"schedule": "constant", "total_steps": config.steps, "max_grad_norm": config.max_grad_norm,
             "shard": config.shard_optimizer, "shard_weights": config.shard_weights}
    actor = Trainable(policy, precision, accelerator, lr=config.actor_lr, **optim)
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
        critic = Trainable(value_model.to(load_to).eval(), precision, accelerator, lr=config.critic_lr, **optim)
    return Learners(actor, critic, reference, rollout_lm, lm.tokenizer, accelerator, sharded)


def plan_memory(config: RLConfig, learners: Learners, quiet: bool = False) -> RLConfig:
    """`config` with micro-batches sized from the memory this machine has, before any work (a pass that cannot fit
    is refused with the estimate)."""
    precision, actor, critic = learners.actor.precision, learners.actor, learners.critic
    state = (model_state_bytes(actor.model, precision) + (model_state_bytes(critic.model, precision) if critic else 0)
             + (model_state_bytes(learners.reference, precision, trained=False) if learners.reference else 0)
             + (model_state_bytes(learners.rollout_lm, precision, trained=False) if learners.sharded else 0))
    plan = plan_micro_batch_tokens(config.micro_batch_tokens, config.memory_gib, str(learners.device),
                                   state // (learners.world if learners.sharded else 1),
                                   activation_bytes_per_token(actor.model.lm.config, precision,
                                                              config.gradient_checkpointing), "spa train")
    say(f"memory: {plan.describe()}", quiet or not learners.main)
    return dataclasses.replace(config, micro_batch_tokens=plan.tokens)


def save_checkpoint(ckpt: Checkpointer, step: int, learners: Learners, meta: dict) -> None:
    """An atomic checkpoint of every model and optimizer at `step` (every process calls it)."""
    states, weights = learners.states(), learners.weights()
    if learners.main:
        ckpt.save(step, lambda directory: learners.write(directory, weights, meta), states)
    learners.accelerator.wait_for_everyone()


def save_final(out: Path, step: int, final: dict[str, float], learners: Learners, meta: dict) -> None:
    """The trained actor into `out/model` (HF format), the critic into `out/critic`, `result.json` last."""
    weights = learners.weights()
    if learners.main:
        result = {"steps": step, **{k: v for k, v in final.items() if isinstance(v, int | float)}}
        meta = {**meta, "result": result}
        atomic_dir(out / "model", lambda d: save_model(learners.actor.model.lm, learners.tokenizer, d, meta,
                                                       _strip(weights["actor"], "lm.")))
        if learners.critic is not None:
            atomic_dir(out / "critic", lambda d: learners.critic.model.save(d, weights["critic"]))
        atomic_write_json(out / "result.json", result)
    learners.accelerator.wait_for_everyone()


# ------------------------------------------------------------------------------------------ the loop
def train_rl(config: RLConfig, quiet: bool = False) -> dict:
    """Run (or resume) PPO into `config.out`; return the final metrics."""
    out = claim_output(config.out, STAGE, config, done="result.json")
    if out.finished:
        say(f"{out.path} already holds this finished RL run: nothing to do", quiet)
        return read_json(out.path / "result.json", "result")
    ckpt = Checkpointer(out.path / "checkpoint")
    learners = build_learners(config, ckpt)
    config = plan_memory(config, learners, quiet)
    engine = RolloutEngine(config.rollout, make_backend(config.rollout.backend, learners.rollout_lm,
                                                        learners.tokenizer), learners.tokenizer)
    data = (dataset_groups(config.dpo_data, learners.tokenizer, config.rollout.env, config.rollout.format,
                           config.rollout.render) if config.dpo_data else None)
    step = resume(ckpt, learners, config.steps, quiet)
    log = RunLogger(out.path, config.log, to_dict(config), resume_step=step) if learners.main else None
    meta = {"stage": "rl", "config": to_dict(config), "precision": learners.actor.precision.name,
            "base_model": config.model.model}
    with progress_bar(transient=quiet or not learners.main) as bar:
        if step == 0 and config.eval_before and log is not None:
            log.log(step, evaluate_policy(engine, config, bar))
        task = bar.add_task(config.algorithm.upper(), total=config.steps, completed=step, unit="steps")
        while step < config.steps:
            metrics = rl_step(step, config, engine, learners) if data is None else offline_step(step, config, data,
                                                                                                   learners)
            learners.refresh_rollout_copy(metrics)
            step += 1
            if config.eval_every and step % config.eval_every == 0 and step < config.steps and learners.main:
                metrics.update(evaluate_policy(engine, config, bar))
                release_free_memory()
            if log is not None:
                log.log(step, metrics)
            bar.advance(task)
            check_finite(metrics, step, ckpt)
            if config.save_every and step % config.save_every == 0 and step < config.steps:
                save_checkpoint(ckpt, step, learners, meta)
        final = {**(evaluate_policy(engine, config, bar) if learners.main else {}), **consistency_checks(learners)}
    finish(out.path, step, final, ckpt, learners, log, meta)
    return read_json(out.path / "result.json", "result")


def resume(ckpt: Checkpointer, learners: Learners, steps: int, quiet: bool = False) -> int:
    """The step to start from: the checkpoint's (its optimizer states loaded), or 0."""
    if not ckpt.exists():
        return 0
    state = ckpt.load()
    learners.load_states(state.states)
    say(f"resuming {ckpt.dir.parent} from its checkpoint at step {state.step} of {steps}", quiet or not learners.main)
    return state.step


def finish(out: Path, step: int, final: dict[str, float], ckpt: Checkpointer, learners: Learners,
           log: RunLogger | None, meta: dict) -> None:
    """Log the final validation, checkpoint, then write the trained models and `result.json` (last: its presence
    marks the run finished), drop the checkpoint and plot the curves."""
    if log is not None:
        log.log(step, final)
    save_checkpoint(ckpt, step, learners, meta)
    save_final(out, step, final, learners, meta)
    if log is not None:  # the main process
        ckpt.discard()
        log.close()
        plot_rl(out)
    learners.accelerator.wait_for_everyone()


def check_finite(metrics: dict[str, float], step: int, ckpt: Checkpointer) -> None:
    """Stop at the first step whose losses are not finite, pointing at the last good checkpoint."""
    bad = {k: v for k, v in metrics.items() if k.startswith("losses/") and not math.isfinite(v)}
    if bad:
        raise SpaError(f"the losses became {', '.join(f'{k} = {v}' for k, v in sorted(bad.items()))} at step {step}: "
                       f"stopped; the last good checkpoint is in {ckpt.dir} (lower the learning rates and rerun in "
                       f"another directory)")


def consistency_checks(learners: Learners) -> dict[str, float]:
    """With several processes: every one must have made the same updates (sharded: gathered the same whole
    weights). `dist/weight_spread` is 0 when they did."""
    if learners.world == 1:
        return {}
    actor, critic = learners.actor, learners.critic
    params = list(learners.rollout_lm.parameters()) if learners.sharded else actor.params + (
        critic.params if critic else [])
    return {"dist/weight_spread": weight_spread(params, learners.device),
            "dist/optimizer_state_share": actor.state_share}


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


# ------------------------------------------------------------------------------------------ one step
def rl_step(step: int, config: RLConfig, engine: RolloutEngine, learners: Learners) -> dict[str, float]:
    """One step: rollouts, rewards, the group filter, scoring, then PPO's advantages and update (or DPO's pairs and
    update). Returns its metrics."""
    # 1. rollouts with the current weights: this process plays its share of the step's puzzles
    t0 = time.perf_counter()
    seeds = config.step_seeds(step)
    episodes = engine.run(seeds[learners.rank::learners.world], group_size=config.samples_per_puzzle,
                          seed=config.seed * 1_000_003 + step * 97 + learners.rank)
    engine.backend.reset()
    release_free_memory()  # the rollouts' caches go back to the system before the update allocates its own
    t_generate = time.perf_counter() - t0
    # 2. rewards: the environment's per turn plus the bonuses; the episodes as token sequences
    t0 = time.perf_counter()
    trajectories, bonus_stats = to_trajectories(episodes, seeds, config, learners)
    # 3. the groups whose rewards vary most, chosen over all processes; each process takes an equal share
    everything, kept, stds, chosen = choose_groups(trajectories, config, learners)
    batch = Batch.of(kept, learners.tokenizer.pad_token_id)
    # 4. score the kept episodes with the training forward pass (the same code the update runs), unless the update
    # is one pass over them: then its own forwards give the same numbers before any weight moves (`one_pass`)
    score(batch, config, learners)
    t_score = time.perf_counter() - t0
    t0 = time.perf_counter()
    if config.algorithm == "dpo":  # 5-6. DPO: pairs within the groups, epochs over them (no advantages, no critic)
        stats = dpo_update(batch, config, learners)
        train_actor = stats["dpo/pairs"] > 0
    else:
        # 5. advantages (one pass with a critic: the critic's forward and backward run now, and give the values)
        critic_stats = estimate_advantages(batch, config, learners)
        # 6. PPO epochs over minibatches, actor and critic (the actor sits out the critic's warm-up, and a step
        # whose kept groups all scored uniformly: a cold model that never follows the format, or one always winning)
        train_actor = step >= config.critic_warmup and (float(stds[chosen].max()) > 0
                                                        or not config.skip_uniform_steps)
        stats = update(batch, kept, config, learners, step, train_actor, critic_stats)
    t_update = time.perf_counter() - t0
    # 7. what happened, over all processes
    metrics = {**stats, **bonus_stats,
               **step_metrics(episodes, trajectories, everything, batch, stds, chosen, train_actor, config, learners),
               "time/generate": t_generate, "time/score": t_score, "time/update": t_update}
    metrics["perf/generated_tokens_per_s"] = metrics["perf/generated_tokens"] / learners.world / max(t_generate, 1e-9)
    return metrics


def offline_step(step: int, config: RLConfig, data: list[list[Trajectory]], learners: Learners) -> dict[str, float]:
    """One step of offline DPO: the next `puzzles_per_step` groups of the dataset (cycled; this process its share),
    the group filter, scoring, DPO's update. Returns its metrics (`data/...` in place of `rollout/...`)."""
    t0 = time.perf_counter()
    picked = [(step * config.puzzles_per_step + i) % len(data) for i in range(config.puzzles_per_step)]
    trajectories = [dataclasses.replace(t, group=i) for i in range(learners.rank, len(picked), learners.world)
                    for t in data[picked[i]]]
    everything, kept, stds, chosen = choose_groups(trajectories, config, learners)
    batch = Batch.of(kept, learners.tokenizer.pad_token_id)
    score(batch, config, learners)
    t_score = time.perf_counter() - t0
    t0 = time.perf_counter()
    stats = dpo_update(batch, config, learners)
    return {**stats, "data/success": float(torch.tensor([t.score for t in everything]).mean()),
            "data/episodes": float(len(everything)), "rollout/kept_group_std": float(stds[chosen].mean()),
            "rollout/actor_updated": float(stats["dpo/pairs"] > 0), "time/score": t_score,
            "time/update": time.perf_counter() - t0,
            "perf/peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}


def to_trajectories(episodes: list[Episode], seeds: list[int], config: RLConfig,
                    learners: Learners) -> tuple[list[Trajectory], dict[str, float]]:
    """The episodes as token sequences with their rewards (the environment's per turn plus the bonuses), each in the
    group of its puzzle; and the bonuses' statistics."""
    group_of = {seed: g for g, seed in enumerate(seeds)}
    groups = [group_of[e.seed] for e in episodes]
    tokenizer, rc = learners.tokenizer, config.rollout
    bonuses, stats = per_turn_bonuses(
        episodes, config, lambda states: state_novelty(learners.rollout_lm, tokenizer, rc, states), learners.sum)
    trajectories = [build_trajectory(e, tokenizer, g, placement=config.reward_placement, loss_tokens=config.loss_tokens,
                                     bonuses=b, world_model=config.world_model_coef > 0, fmt=rc.format,
                                     render=rc.render)
                    for e, g, b in zip(episodes, groups, bonuses, strict=True)]
    return trajectories, stats


def choose_groups(trajectories: list[Trajectory], config: RLConfig, learners: Learners
                  ) -> tuple[list[Trajectory], list[Trajectory], torch.Tensor, torch.Tensor]:
    """(every process's trajectories, this process's share of the kept ones, each group's reward standard deviation
    [G], the indices of the kept groups): the `keep_ratio` of groups whose rewards vary most (DPO: every group
    whose rewards vary)."""
    everything = gather_object(trajectories) if learners.world > 1 else trajectories
    group_scores: dict[int, list[float]] = {}
    for t in everything:
        group_scores.setdefault(t.group, []).append(t.score)
    group_ids = sorted(group_scores)
    stds = torch.tensor([torch.tensor(group_scores[g]).std(unbiased=False).item() for g in group_ids])
    if config.algorithm == "dpo":  # every group whose scores differ gives pairs (one group at least, for the batch)
        chosen = (stds > 0).nonzero().flatten() if (stds > 0).any() else torch.tensor([0])
    else:
        chosen = core.keep_most_varied_groups(stds, config.keep_ratio)
    mine = {group_ids[i] for i in chosen.tolist()[learners.rank::learners.world]}
    return everything, [t for t in everything if t.group in mine], stds, chosen


def score(batch: Batch, config: RLConfig, learners: Learners) -> None:
    """Fill the batch's old log-probs and values (unless the update is one pass, which computes them itself) and the
    reference's log-probs (with a KL term)."""
    if not config.one_pass:
        batch.old_logprobs = score_rows(learners.actor, batch, config, learners.device)
        if learners.critic is not None:
            batch.values = score_rows(learners.critic, batch, config, learners.device, values=True)
    if learners.reference is not None:
        batch.ref_logprobs = score_rows(learners.reference, batch, config, learners.device,
                                        autocast=learners.actor.autocast)


def estimate_advantages(batch: Batch, config: RLConfig, learners: Learners) -> dict[str, float] | None:
    """Fill the batch's advantages and returns with the configured estimator (`rl/advantages.py`), whitened over
    every process's batch if it uses a critic and `whiten_advantages` is set. One pass with a critic: the critic's
    forward and backward run now and give the values on the way; their statistics are returned (else None)."""
    estimator = ESTIMATORS[config.advantage]
    critic_stats = None
    if estimator.uses_critic and config.one_pass:
        critic_stats = _critic_first(batch, list(range(len(batch.lengths))), config, learners)
    else:
        batch.advantages, batch.returns = estimator.compute(batch.advantage_inputs(), config)
    if estimator.uses_critic and config.whiten_advantages:
        moments = core.masked_moments(batch.advantages, batch.mask)
        summed = learners.sum({str(i): float(m) for i, m in enumerate(moments)})
        batch.advantages = core.masked_whiten(batch.advantages, batch.mask, tuple(
            torch.tensor(summed[str(i)], dtype=torch.float64) for i in range(len(moments))))
    return critic_stats


def step_metrics(episodes: list[Episode], trajectories: list[Trajectory], everything: list[Trajectory], batch: Batch,
                 stds: torch.Tensor, chosen: torch.Tensor, train_actor: bool, config: RLConfig,
                 learners: Learners) -> dict[str, float]:
    """What a step's rollouts and batch show, over every process (`rollout/...`, `critic/...`, `perf/...`):
    `episodes` and `trajectories` are this process's, `everything` every process's trajectories."""
    n_turns = sum(len(e.turns) for e in episodes)
    wm = world_model_metrics([(t.parsed.observation, t.parsed.prediction, t.state_before, t.state_after)
                              for e in episodes for t in e.turns])
    diversity = group_diversity(episodes, [t.group for t in trajectories])
    one_pass = config.one_pass
    s = learners.sum({
        "successes": sum(float(e.success) for e in episodes), "episodes": float(len(episodes)),
        "tokens": float(sum(len(t.response_ids) for e in episodes for t in e.turns)), "turns": float(n_turns),
        "distinct_actions": diversity["distinct_actions"], "distinct_responses": diversity["distinct_responses"],
        "mismatch": float(core.masked_sum((batch.rollout_logprobs - batch.old_logprobs).abs(), batch.sampled)),
        "sampled": float(batch.sampled.sum()) if train_actor or not one_pass else 0.0,
        "trained": float(sum(batch.lengths) * config.ppo_epochs),
        "observation_exact": wm["observation_exact"] * n_turns, "prediction_exact": wm["prediction_exact"] * n_turns,
        "game_reward": sum(e.total_reward for e in episodes)})
    n_episodes, turns, world = max(s["episodes"], 1), max(s["turns"], 1), learners.world
    metrics = {
        "rollout/reward_mean": float(torch.tensor([t.score for t in everything]).mean()),
        "rollout/game_reward_mean": s["game_reward"] / n_episodes,
        "rollout/success": s["successes"] / n_episodes,
        "rollout/kept_group_std": float(stds[chosen].mean()),
        "rollout/actor_updated": float(train_actor),
        "rollout/group_std": float(stds.mean()),
        "rollout/response_tokens": s["tokens"] / turns,
        "rollout/turns": s["turns"] / n_episodes,
        # one pass: the actor's own forward gave the old log-probs (none when the actor sat out)
        **({"rollout/logprob_mismatch": s["mismatch"] / s["sampled"]} if s["sampled"] else {}),
        "rollout/distinct_actions": s["distinct_actions"] / world,
        "rollout/distinct_responses": s["distinct_responses"] / world,
        "rollout/observation_exact": s["observation_exact"] / turns,
        "rollout/prediction_exact": s["prediction_exact"] / turns,
        "perf/generated_tokens": s["tokens"],
        "perf/trained_tokens": s["trained"],
        "perf/peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
    }
    for name in ("prediction",) if config.curiosity_center else ("prediction", "novelty"):  # centred: 0 by design
        values = [v for t in everything for v in t.bonuses.get(name, [])]
        if values:
            metrics[f"rollout/{name}_bonus"] = sum(values) / len(values)
    if learners.critic is not None:
        mask = batch.mask
        explained = float(core.explained_variance(batch.values, batch.returns, mask))
        if math.isfinite(explained):  # undefined when every return is the same
            metrics["losses/explained_variance"] = explained
        for name, x in (("value", batch.values), ("return", batch.returns)):  # what the critic is fitting, and how far
            mean = core.masked_mean(x, mask)
            metrics[f"critic/{name}_mean"] = float(mean)
            metrics[f"critic/{name}_std"] = float(core.masked_mean((x - mean) ** 2, mask).sqrt())
    return metrics


# ------------------------------------------------------------------------------------------ the update
def update(batch: Batch, kept: list[Trajectory], config: RLConfig, learners: Learners, step: int,
           train_actor: bool = True, critic_stats: dict[str, float] | None = None) -> dict[str, float]:
    """PPO epochs over minibatches: the actor's clipped loss (with entropy, KL and world-model terms; not when
    `train_actor` is False) and the critic's clipped value loss, gradients summed over processes (`critic_stats`:
    the critic's one pass already ran, `_critic_first`, and only its optimizer step is left). Returns the mean
    statistics."""
    actor, critic = learners.actor if train_actor else None, learners.critic
    per_process = config.minibatch_size // learners.world
    generator = torch.Generator().manual_seed(config.seed * 7919 + step)
    totals: dict[str, float] = {}
    count = 0
    for _ in range(config.ppo_epochs):
        order = torch.randperm(len(kept), generator=generator).tolist()
        for start in range(0, len(kept), per_process):
            minibatch = order[start:start + per_process]
            weights = token_weights(batch.mask, minibatch, config.loss_agg, learners)
            stats = {"weight": float(weights[minibatch].sum())}  # the critic's stats' weight if the actor sits out
            if actor is not None:
                stats = _actor_minibatch(batch, kept, minibatch, weights, config, learners)
            if critic_stats is not None:
                stats.update(critic_stats)
            elif critic is not None:
                stats.update(_critic_minibatch(batch, minibatch, weights, config, learners))
            stats = learners.sum(stats)
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


def token_weights(mask: torch.Tensor, minibatch: list[int], agg: str, learners: Learners) -> torch.Tensor:
    """`core.token_weights` of a minibatch, its totals counted over every process."""
    rows = torch.tensor(minibatch)
    tokens = mask[rows].sum(-1)
    totals = learners.sum({"tokens": float(tokens.sum()), "rows": float((tokens > 0).sum())})
    return core.token_weights(mask, rows, agg, totals["tokens"], totals["rows"])


def _weighted(loss_and_stats: tuple[torch.Tensor, dict], weight: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """A loss computed as a token-mean under fractional weights, turned into the weighted sum (the micro-batch's
    share of the minibatch's loss); its statistics likewise, to be divided by the total weight later."""
    loss, stats = loss_and_stats
    total = weight.sum()
    return loss * total, {k: float(v) * float(total) for k, v in stats.items()}


def _actor_minibatch(batch: Batch, kept: list[Trajectory], minibatch: list[int], weights: torch.Tensor,
                     config: RLConfig, learners: Learners) -> dict[str, float]:
    actor, reference, device = learners.actor, learners.reference, learners.device
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
        sums["losses/world_model"] = _world_model_loss(kept, minibatch, config, learners)
    return sums


def _world_model_loss(kept: list[Trajectory], minibatch: list[int], config: RLConfig, learners: Learners) -> float:
    """Cross-entropy (at temperature 1, as SFT trains) on the true states of the minibatch's episodes rewritten as
    self-play data, weighted by `world_model_coef` and normalised by the state tokens over all processes, into the
    actor's gradients. Returns this process's share of the mean NLL per state token."""
    actor = learners.actor
    sequences = [kept[i].world_model for i in minibatch if kept[i].world_model is not None]
    total = learners.sum({"tokens": float(sum(sum(mask[1:]) for _, mask in sequences))})["tokens"]
    if total == 0:
        return 0.0
    wm = Batch.of_sequences(sequences, pad_id=0) if sequences else None
    nll_sum = 0.0
    for idx in actor.in_lockstep(wm.micro(list(range(len(sequences))), config) if wm else []):
        ids, attention, keep, _ = wm.rows(idx, learners.device)
        with actor.autocast():
            logp, _ = actor.model(ids, attention, keep, temperature=1.0)
        nll = -logp.sum()
        actor.backward(config.world_model_coef * nll / total)
        nll_sum += float(nll.detach())
    return nll_sum / total


def _critic_first(batch: Batch, minibatch: list[int], config: RLConfig, learners: Learners) -> dict[str, float]:
    """The critic's one pass when the update is one pass (`RLConfig.one_pass`): its forward gives the old values,
    from which each micro-batch's rows get their advantages and returns before the value loss's backward (GAE is
    per row). Fills `batch.values`, `.advantages` and `.returns`; returns the critic's statistics."""
    weights = token_weights(batch.mask, minibatch, config.loss_agg, learners)
    return _critic_minibatch(batch, minibatch, weights, config, learners, first=True)


def _critic_minibatch(batch: Batch, minibatch: list[int], weights: torch.Tensor, config: RLConfig,
                      learners: Learners, first: bool = False) -> dict[str, float]:
    critic, device = learners.critic, learners.device
    estimator = ESTIMATORS[config.advantage]
    sums = {"losses/value_loss": 0.0, "losses/value_clipfrac": 0.0}
    for idx in critic.in_lockstep(batch.micro(minibatch, config)):
        ids, attention, keep, width = batch.rows(idx, device)
        rows = torch.tensor(idx)
        w = weights[rows, :width - 1].to(device)
        with critic.autocast():
            values_flat = critic.model(ids, attention, keep)
        values = torch.zeros(w.shape, device=device, dtype=values_flat.dtype).masked_scatter(keep, values_flat)
        if first:  # these are the old values: the rows' advantages and returns follow from them
            batch.values[rows, :width - 1] = values.detach().float().cpu()
            advantages, returns = estimator.compute(batch.advantage_inputs(rows, width - 1), config)
            batch.advantages[rows, :width - 1], batch.returns[rows, :width - 1] = advantages, returns
        old = batch.values[rows, :width - 1].to(device)
        returns = batch.returns[rows, :width - 1].to(device)
        loss, stats = _weighted(core.value_loss(values, old, returns, w, config.value_clip), w)
        critic.backward(loss)
        sums["losses/value_loss"] += float(loss.detach())
        sums["losses/value_clipfrac"] += stats["clipfrac"]
    return sums


# ------------------------------------------------------------------------------------------ DPO
def dpo_update(batch: Batch, config: RLConfig, learners: Learners) -> dict[str, float]:
    """DPO epochs over the step's pairs (`core.preference_pairs` within each kept group), one optimizer step an
    epoch over all of them. The loss depends on each episode only through its log-probability, so its gradient is
    taken in two passes that hold one micro-batch at a time: a pass without gradients gives every episode's
    log-probability (the scoring pass, for the first epoch) and so dL/dlog p of each episode; then each micro-batch's
    backward runs on sum_i (dL/dlog p_i) log p_i, plus the NLL term on the chosen episodes (`dpo_sft_coef`).
    Returns the statistics under TRL's names (`rewards/chosen`, `rewards/accuracies`, `logps/chosen`, ...)."""
    actor, device = learners.actor, learners.device
    pairs = core.preference_pairs(batch.scores, batch.groups, config.dpo_pairs_per_group)
    chosen_rows = torch.zeros(len(batch.lengths), dtype=torch.bool)
    chosen_rows[pairs[:, 0]] = True
    totals = learners.sum({"pairs": float(len(pairs)), "chosen_tokens": float(batch.mask[chosen_rows].sum())})
    out = {"dpo/pairs": totals["pairs"]}
    if totals["pairs"] == 0:  # no group's scores varied, on any process: nothing to prefer
        return out
    ipo = config.dpo_loss == "ipo"
    per = batch.mask.sum(-1).clamp(min=1) if ipo else torch.ones(len(batch.lengths))  # IPO: mean log-probs
    reference = core.masked_sum(batch.ref_logprobs, batch.mask, -1) / per
    rows = sorted(set(pairs.flatten().tolist()))
    sums: dict[str, float] = {}
    for epoch in range(config.ppo_epochs):
        logp_tokens = batch.old_logprobs if epoch == 0 else score_rows(actor, batch, config, device)
        logp = (core.masked_sum(logp_tokens, batch.mask, -1) / per).requires_grad_(True)
        losses, chosen, rejected = core.dpo_loss(logp[pairs[:, 0]], logp[pairs[:, 1]], reference[pairs[:, 0]],
                                                 reference[pairs[:, 1]], config.dpo_beta, config.dpo_loss)
        (losses.sum() / totals["pairs"]).backward()
        coef = logp.grad / per  # dL/dlog p of each token of each episode (0 for episodes in no pair)
        seq = logp.detach()
        stats = {"losses/dpo_loss": float(losses.detach().sum()), "rewards/chosen": float(chosen.sum()),
                 "rewards/rejected": float(rejected.sum()), "rewards/accuracies": float((chosen > rejected).sum()),
                 "rewards/margins": float((chosen - rejected).sum()),
                 "logps/chosen": float(seq[pairs[:, 0]].sum()), "logps/rejected": float(seq[pairs[:, 1]].sum())}
        nll = 0.0
        for idx in actor.in_lockstep(batch.micro(rows, config)):
            ids, attention, keep, width = batch.rows(idx, device)
            index = torch.tensor(idx)
            with actor.autocast():
                logp_flat, _ = actor.model(ids, attention, keep)
            token_coef = coef[index, None].expand(-1, width - 1).to(device)[keep]
            loss = (token_coef * logp_flat.float()).sum()
            if config.dpo_sft_coef > 0:
                on_chosen = chosen_rows[index, None].expand(-1, width - 1).to(device)[keep]
                chosen_logp = (logp_flat.float() * on_chosen).sum()
                loss = loss - config.dpo_sft_coef * chosen_logp / max(totals["chosen_tokens"], 1.0)
                nll -= float(chosen_logp.detach())
            actor.backward(loss)
        if config.dpo_sft_coef > 0:
            stats["losses/sft_nll"] = nll
        stats = learners.sum(stats)
        for k, v in stats.items():
            sums[k] = sums.get(k, 0.0) + v / (max(totals["chosen_tokens"], 1.0) if k == "losses/sft_nll"
                                              else totals["pairs"])
        sums["losses/grad_norm"] = sums.get("losses/grad_norm", 0.0) + actor.step()
    return {**out, **{k: v / config.ppo_epochs for k, v in sums.items()}}


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
