"""`spa train`'s settings: one documented dataclass, `RLConfig`, whose fields are the command's flags, with the
checks across fields that explain what to change. Defaults are the paper's and its reference code's
(docs/method.md §6). It must never run anything: the trainer reads it, the CLI and `spa run` fill it in.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from spa_rl.config import Seeded, setting
from spa_rl.errors import SpaError
from spa_rl.models import ModelConfig
from spa_rl.rl.advantages import ESTIMATORS
from spa_rl.rollout import RolloutConfig
from spa_rl.seeds import check_training_range, training_seeds
from spa_rl.training import LogConfig, LoRAConfig
from spa_rl.training.precision import check_dtype

STAGE = "train"


@dataclass(kw_only=True)
class RLConfig(Seeded):
    """`spa train`: PPO (defaults: the paper's and its reference code's, docs/method.md §6)."""

    out: str = setting(metavar="DIR")
    """Run directory: model/ (the actor, HF format), critic/, checkpoint/, metrics.jsonl, curves.png."""
    model: ModelConfig = setting(factory=ModelConfig)
    rollout: RolloutConfig = setting(factory=RolloutConfig)
    steps: int = setting(1000, ge=1)
    """PPO steps (each: rollouts, then the update)."""
    puzzles_per_step: int = setting(32, ge=1)
    """Training puzzles played per step (fresh seeds every step, below the validation range)."""
    samples_per_puzzle: int = setting(8, ge=1)
    """Episodes per puzzle: a group, whose reward spread decides whether it is kept and (GRPO) its baseline."""
    first_seed: int = setting(0, ge=0)
    """First training puzzle seed; step s plays first_seed + s * puzzles_per_step and on."""
    puzzle_pool: int = setting(0, ge=0)
    """Train on a fixed pool of this many puzzles (seeds first_seed and on), cycled through in order, each step the
    next puzzles_per_step of them (0: fresh puzzles every step, the paper's). Practising the same puzzles shows
    learning within far fewer episodes; validation stays on the held-out puzzles."""
    keep_ratio: float = setting(0.25, gt=0, le=1)
    """Share of groups kept for the update: those with the highest within-group reward standard deviation
    (1: keep all; dpo: unused, every group whose rewards differ gives pairs)."""
    algorithm: Literal["ppo", "dpo"] = "ppo"
    """ppo: the clipped policy gradient on advantages from --advantage (GRPO is PPO with --advantage grpo); dpo:
    iterated DPO, each step's episodes paired within their puzzle's group (a higher score chosen over a lower) and
    trained with the DPO loss against the reference model (the --dpo-* settings; no critic, --advantage unused)."""
    dpo_beta: float = setting(0.1, gt=0)
    """DPO's beta: how far the policy's log-ratios to the reference are scaled (higher: stay closer to it)."""
    dpo_loss: Literal["sigmoid", "ipo"] = "sigmoid"
    """sigmoid: DPO's -log sigmoid(beta * margin); ipo: IPO's squared distance of the margin (of log-probs averaged
    over the agent's tokens) to 1 / (2 beta)."""
    dpo_pairs_per_group: int = setting(4, ge=0)
    """Pairs a group gives at most: each episode with each that scored lower, largest difference first (0: all)."""
    dpo_data: str | None = setting(None, metavar="DIR")
    """Offline DPO: the pairs come from this `spa collect` dataset (collected with --no-filter, so that failures
    keep their mistakes; its puzzles with both a success and a failure, puzzles_per_step of them a step, cycled)
    instead of the current policy's play (none: iterated, on-policy)."""
    dpo_sft_coef: float = setting(0.0, ge=0)
    """Weight of a negative log-likelihood term on the chosen episodes' agent tokens (RPO; keeps the format the
    warm start taught; 0: off)."""
    advantage: str = setting("gae", metavar="{gae,grpo,bi-level-gae}")
    """gae: token-level GAE with a learned critic, skipping the text between turns; grpo: the episode's score
    normalised within its group (no critic); bi-level-gae: turn-level GAE, then token-level inside each turn (or
    any name registered with `spa_rl.rl.advantages.register_advantage`)."""
    gamma: float = setting(1.0, ge=0, le=1)
    """Discount per token (GAE)."""
    lam: float = setting(1.0, ge=0, le=1)
    """GAE's lambda."""
    turn_gamma: float = setting(0.95, ge=0, le=1)
    """Discount per turn (bi-level-gae)."""
    grpo_norm_by_std: bool = True
    """GRPO: divide by the group's reward standard deviation (--no-grpo-norm-by-std: only subtract its mean)."""
    whiten_advantages: bool = True
    """Shift and scale GAE advantages to mean 0 and variance 1 over the loss tokens of the step."""
    skip_uniform_steps: bool = True
    """Skip the actor's update in a step where no kept group's rewards vary (every sample of every puzzle scored
    the same): there is nothing to compare, and whitened GAE advantages would be the critic's noise scaled up
    (--no-skip-uniform-steps: update anyway, as the reference code does). The critic learns either way."""
    critic_warmup: int = setting(0, ge=0)
    """Steps at the start in which only the critic learns: the actor's first advantages then come from a critic
    that has already regressed on returns, not from a value head that starts at zero (veRL's critic_warmup;
    0: off)."""
    actor_lr: float = setting(1e-6, gt=0)
    """Actor learning rate (constant)."""
    critic_lr: float = setting(1e-5, gt=0)
    """Critic learning rate (constant)."""
    ppo_epochs: int = setting(1, ge=1)
    """Passes over the kept episodes per step (dpo: passes over the step's pairs, one optimizer step each)."""
    minibatch_size: int = setting(64, ge=1)
    """Episodes per optimizer step (over all processes; dpo: unused, every pair of the step is one minibatch)."""
    micro_batch_size: int = setting(8, ge=1)
    """Episodes per forward/backward pass, at most (gradients accumulate to the minibatch)."""
    micro_batch_tokens: int = setting(0, ge=0)
    """Tokens (padding included) per forward/backward pass, at most, which bounds the activations' memory (0: the
    most whose estimated peak fits --memory-gib; a setting that cannot fit the memory available is refused)."""
    memory_gib: float = setting(0.0, ge=0)
    """The peak memory the update may reach, GiB, from which micro-batches are sized (0: the smaller of 8 GiB and
    nine tenths of the memory available at the start; on a GPU, nine tenths of its free memory)."""
    clip_low: float = setting(0.2, ge=0, lt=1)
    """PPO's ratio clip below 1: the ratio is kept above 1 - clip_low."""
    clip_high: float = setting(0.28, ge=0)
    """PPO's ratio clip above 1 (higher than clip_low: clip-higher, more room to raise unlikely tokens)."""
    dual_clip: float | None = setting(3.0, gt=1)
    """Dual clip: for negative advantages the loss is bounded by -A * dual_clip (none: off)."""
    tis_cap: float = setting(0.0, ge=0)
    """Truncated importance sampling: weight each sampled token's policy loss by min(p_trainer / p_sampler, this),
    correcting for the rollout engine's bf16 decode drawing from a slightly different distribution than the
    training forward scores (`rollout/logprob_mismatch`); 2 is the value the field uses (0: off, the paper's)."""
    value_clip: float | None = setting(0.5, gt=0)
    """The critic's new values stay within this of the old ones in its loss (none: off)."""
    entropy_coef: float = setting(0.001, ge=0)
    """Weight of the entropy bonus."""
    kl_coef: float = setting(0.0, ge=0)
    """Weight of the KL penalty to the reference model (0: off, and no reference is loaded)."""
    kl_estimator: Literal["k1", "k3"] = "k3"
    """KL estimator in the loss: k3 (always >= 0, lower variance; its gradient pulls towards the reference) or
    k1 (logp - ref_logp: an unbiased value, but as a loss its expected gradient is 0 on-policy, so it holds the
    policy back only as far as later PPO epochs drift off-policy)."""
    reference: str = "init"
    """The KL penalty's reference model: init (the starting checkpoint), none, or a model path."""
    loss_agg: Literal["token-mean", "seq-mean-token-sum", "seq-mean-token-mean"] = "token-mean"
    """How per-token losses become one number."""
    reward_placement: Literal["final", "per-turn"] = "final"
    """final: the episode's total reward on its last token; per-turn: each turn's reward on the turn's last token."""
    loss_tokens: Literal["assistant", "after-system"] = "assistant"
    """assistant: the loss and GAE cover the agent's own tokens; after-system: every token after the system
    prompt, environment text included (what the reference code did)."""
    max_grad_norm: float = setting(1.0, gt=0)
    """Gradients are clipped to this norm (actor and critic separately)."""
    gradient_checkpointing: bool = False
    """Recompute each decoder layer's activations in the backward pass instead of keeping them: most of the
    update's activation memory for more update time (measured: 8.5 instead of 18.8 GiB, 1.15x the time)."""
    shard_optimizer: bool = False
    """Under `accelerate launch` with N processes, each keeps the AdamW state of 1/N of the parameters (ZeRO
    stage 1): 8 bytes a parameter become 8/N, for the same updates. The weights stay whole in every process."""
    shard_weights: bool = False
    """Under `accelerate launch` with N processes, shard the actor's and the critic's weights, gradients and AdamW
    state over the processes (FSDP, ZeRO stage 3): 16 bytes a trained parameter become 16/N, plus one whole copy
    of the actor at inference precision for generation, refreshed after every update. For models whose training
    state does not fit one device; full fine-tunes only."""
    world_model_coef: float = setting(0.0, ge=0)
    """Weight of a cross-entropy term on the true observation and prediction of each episode rewritten as
    self-play data is, so PPO does not erode what SFT taught (0: off)."""
    prediction_reward: float = setting(0.0, ge=0)
    """Per-turn bonus for a <prediction> that matches the true next state (0: off)."""
    prediction_match: Literal["exact", "cell"] = "exact"
    """How the prediction bonus scores: exact match (1/0) or the share of grid cells right."""
    curiosity_coef: float = setting(0.0, ge=0)
    """Per-turn intrinsic reward beta * N(s'): the novelty of the state the turn reached under the current
    model (docs/method.md §8); a turn that left the state as it was earns none (0: off)."""
    curiosity_center: bool = True
    """Subtract the step's mean N(s') over the turns that moved (all processes): the bonus then pays for reaching
    states less familiar than usual, not for playing more turns, as an always-positive N(s') would
    (--no-curiosity-center: the raw N(s'))."""
    eval_every: int = setting(10, ge=0)
    """Play the validation puzzles every N steps, and after the last (0: only after the last)."""
    eval_puzzles: int = setting(32, ge=1)
    """Validation puzzles per evaluation (the fixed seeds from 1,000,000,000 on)."""
    eval_samples: int = setting(8, ge=1)
    """Episodes per validation puzzle (Pass@k for k up to this)."""
    eval_before: bool = True
    """Also evaluate before the first step (the starting checkpoint's numbers; --no-eval-before skips it)."""
    save_every: int = setting(10, ge=0)
    """Checkpoint every N steps (0: only at the end); a rerun resumes from the last one."""
    lora: LoRAConfig = setting(factory=LoRAConfig)
    log: LogConfig = setting(factory=LogConfig)

    @property
    def kept_groups(self) -> int:
        return max(1, math.floor(self.keep_ratio * self.puzzles_per_step + 1e-9))

    @property
    def uses_critic(self) -> bool:
        return self.algorithm == "ppo" and ESTIMATORS[self.advantage].uses_critic

    @property
    def uses_reference(self) -> bool:
        """A frozen reference policy is loaded: for the KL term, and always for DPO."""
        return self.kl_coef > 0 or self.algorithm == "dpo"

    @property
    def one_pass(self) -> bool:
        """One PPO epoch over one minibatch (the paper's shape): the old log-probs and values are exactly what the
        update's own forward passes compute before any weight moves, so no separate scoring pass runs; the
        critic's pass comes first and its values give the advantages on the way (docs/method.md §6)."""
        return (self.algorithm == "ppo" and self.ppo_epochs == 1
                and self.kept_groups * self.samples_per_puzzle <= self.minibatch_size)

    def step_seeds(self, step: int) -> list[int]:
        """The training puzzles of step `step` (from 0)."""
        start = step * self.puzzles_per_step
        if not self.puzzle_pool:
            return training_seeds(self.first_seed + start, self.puzzles_per_step)
        return [self.first_seed + (start + i) % self.puzzle_pool for i in range(self.puzzles_per_step)]

    def check(self) -> None:
        if self.advantage not in ESTIMATORS:
            raise SpaError(f"unknown advantage estimator {self.advantage!r}: use one of {', '.join(ESTIMATORS)} (or "
                           f"register yours with spa_rl.rl.advantages.register_advantage)")
        kept = self.kept_groups * self.samples_per_puzzle
        if self.dpo_data and self.algorithm != "dpo":
            raise SpaError("dpo_data is offline DPO's data: set --algorithm dpo, or drop --dpo-data")
        if self.algorithm == "dpo":
            self._check_dpo()
        elif kept < self.minibatch_size:
            raise SpaError(f"keep_ratio x puzzles_per_step x samples_per_puzzle leaves {kept} episodes a step, fewer "
                           f"than one minibatch (minibatch_size {self.minibatch_size}): lower --minibatch-size or "
                           f"keep more episodes")
        if self.samples_per_puzzle < 2 and self.algorithm == "ppo" and not self.uses_critic:
            raise SpaError(f"advantage {self.advantage} needs samples_per_puzzle >= 2: without a critic the baseline "
                           f"is the group's, and a group of one has none")
        if self.samples_per_puzzle < 2 and self.keep_ratio < 1 and not self.dpo_data:
            raise SpaError("keep_ratio < 1 needs samples_per_puzzle >= 2: one sample per group has no reward spread "
                           "to rank groups by (set --keep-ratio 1)")
        if self.kl_coef > 0 and self.reference == "none":
            raise SpaError("kl_coef > 0 needs a reference model: set --reference init (or a path), or --kl-coef 0")
        if self.critic_warmup and not self.uses_critic:
            raise SpaError("critic_warmup needs a critic: set --advantage gae or bi-level-gae, or --critic-warmup 0")
        if self.critic_warmup >= self.steps:
            raise SpaError(f"critic_warmup ({self.critic_warmup}) leaves the actor no step of the {self.steps}: "
                           f"lower --critic-warmup or raise --steps")
        if self.shard_weights and self.shard_optimizer:
            raise SpaError("shard_weights already shards the optimizer state with the weights: drop --shard-optimizer")
        if self.shard_weights and self.lora.enabled:
            raise SpaError("shard_weights is for full fine-tunes: a LoRA adapter's training state is small enough to "
                           "keep whole (drop --shard-weights or --lora)")
        check_dtype(self.model.dtype, training=True)
        if self.rollout.format != "world-model" and (self.prediction_reward > 0 or self.world_model_coef > 0):
            raise SpaError("prediction_reward and world_model_coef need --format world-model (plain responses have "
                           "no <prediction>)")
        if self.advantage == "bi-level-gae" and self.loss_tokens == "after-system":
            raise SpaError("advantage bi-level-gae needs --loss-tokens assistant: with after-system the whole "
                           "conversation is one run of loss tokens, so there are no turns to discount between")
        sampling = self.rollout.sampling
        if sampling.temperature <= 0 or sampling.top_p < 1 or sampling.top_k > 0:
            raise SpaError("PPO needs untruncated sampling (temperature > 0, top_p 1, top_k 0): otherwise the "
                           "sampled tokens' log-probs are not the policy's and the ratio is off-policy")
        if self.puzzle_pool and self.puzzle_pool < self.puzzles_per_step:
            raise SpaError(f"puzzle_pool ({self.puzzle_pool}) is smaller than puzzles_per_step "
                           f"({self.puzzles_per_step}): a step would play a puzzle twice; raise --puzzle-pool or lower "
                           f"--puzzles-per-step")
        check_training_range(self.first_seed, self.puzzle_pool or self.steps * self.puzzles_per_step)

    def _check_dpo(self) -> None:
        if self.samples_per_puzzle < 2 and not self.dpo_data:
            raise SpaError("algorithm dpo needs samples_per_puzzle >= 2: its pairs are two episodes of one puzzle")
        if self.reference == "none":
            raise SpaError("algorithm dpo needs a reference model: set --reference init (or a path)")
        for name, off in (("critic_warmup", 0), ("world_model_coef", 0.0), ("kl_coef", 0.0), ("tis_cap", 0.0)):
            if getattr(self, name) != off:
                flag = "--" + name.replace("_", "-")
                raise SpaError(f"{name} is a PPO setting: algorithm dpo does not use it (set {flag} {off} or "
                               f"--algorithm ppo)")
