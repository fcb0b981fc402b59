"""Novelty as the model's own surprise (docs/method.md §8): N(s) = −(1/L) Σ log p(x_i | x_<i) over the L tokens of a
state's text, conditioned on the context the agent sees before it.

The context of a state is the conversation up to `State:\\n` of the turn that shows it; the state's tokens are
found by character offsets in the tokenisation of the whole text, so they are the tokens the model really
reads. Scoring is batched (right-padded, one forward pass per batch, the output projection applied to the
state positions only). No library scores spans of chat conversations this way, so it is here. This module
must never change the model's weights or mode.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from spa_rl import envs
from spa_rl.config import Seeded, setting, to_dict
from spa_rl.envs import RENDERS
from spa_rl.errors import SpaError
from spa_rl.io import atomic_write_json, writable_file
from spa_rl.models import LoadedModel, ModelConfig, load_model, next_token_logits, right_padded_batch
from spa_rl.prompts import first_messages
from spa_rl.rollout import RolloutConfig
from spa_rl.seeds import validation_seeds
from spa_rl.training.precision import check_dtype


@dataclass(frozen=True)
class StateText:
    """A state's text and the conversation text the agent reads right before it."""

    context: str
    state: str


def state_contexts(env: Any, state: str, render: str, fmt: str, tokenizer: Any, max_actions_per_turn: int,
                   actions_left: int, max_new_tokens: int = 256) -> StateText:
    """The turn-1 conversation that shows `state`, split at the state (chat template applied)."""
    marker = "\ue000state\ue001"
    messages = first_messages(env, marker, render, fmt, max_actions_per_turn, actions_left, max_new_tokens)
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    before, _, _ = text.partition(marker)
    return StateText(before, state)


@torch.inference_mode()
def score_states(model: Any, tokenizer: Any, items: Sequence[StateText], batch_size: int = 16) -> list[float]:
    """N(s) in nats per token for each item (mean negative log-likelihood of the state's tokens)."""
    if not getattr(tokenizer, "is_fast", False):
        raise SpaError("novelty scoring needs a fast tokenizer (character offsets)")
    device = next(model.parameters()).device
    scores: list[float] = []
    for start in range(0, len(items), batch_size):
        chunk = items[start:start + batch_size]
        samples, counts = [], []
        for it in chunk:
            text = it.context + it.state
            enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
            lo, hi = len(it.context), len(text)
            own = [a >= lo and b <= hi and b > a for a, b in enc["offset_mapping"]]  # the state's own tokens
            if not any(own) or own[0]:
                raise SpaError("a state has no tokens of its own after its context")
            samples.append((enc["input_ids"], own))
            counts.append(sum(own))
        batch = right_padded_batch(samples, tokenizer.pad_token_id)
        labels = batch["labels"][:, 1:].to(device)
        keep = labels != -100  # the position before each state token predicts it
        logits = next_token_logits(model, batch["input_ids"].to(device), batch["attention_mask"].to(device), keep)
        nll = torch.nn.functional.cross_entropy(logits.float(), labels[keep], reduction="none").cpu()
        scores.extend(float(part.mean()) for part in nll.split(counts))
    return scores


def perplexity_summary(scores: Sequence[float]) -> dict:
    """Mean N(s), its exponent (the perplexity of the average state token), and the mean per-state perplexity."""
    arr = np.asarray(scores, dtype=float)
    return {"states": len(arr), "mean_nll": float(arr.mean()), "perplexity": float(math.exp(arr.mean())),
            "mean_state_perplexity": float(np.exp(arr).mean())}


def sample_states(env_name: str, render: str, puzzles: int, steps: int = 3, seed: int = 0) -> list[str]:
    """Validation-puzzle states: each puzzle's start and the states after up to `steps` random actions."""
    rng = np.random.default_rng(seed)
    env = envs.make(env_name, render=render).unwrapped
    out = []
    for s in validation_seeds(puzzles):
        obs, _ = env.reset(seed=s)
        out.append(obs)
        for _ in range(steps):
            obs, _, terminated, _, info = env.step(env.random_action(rng))
            if info["action_is_effective"]:
                out.append(obs)
            if terminated:
                break
    return out


def state_novelty(model: Any, tokenizer: Any, rollout: RolloutConfig, states: Sequence[str]) -> list[float]:
    """N(s) of each state text as the agent of `rollout` (its env, render, format and limits) would read it in a
    first turn: the one way every stage scores novelty (self-play branching, held-out novelty, RL's curiosity)."""
    if not states:
        return []
    env = envs.make(rollout.env, render=rollout.render, **rollout.env_overrides).unwrapped
    _, per_turn, per_episode = rollout.limits()
    items = [state_contexts(env, s, rollout.render, rollout.format, tokenizer, per_turn, per_episode,
                            rollout.sampling.max_new_tokens) for s in states]
    return score_states(model, tokenizer, items)


def heldout_novelty(lm: LoadedModel, env_name: str, render: str, puzzles: int, steps: int = 3,
                    seed: int = 0) -> dict:
    """`perplexity_summary` of validation-puzzle states (`sample_states`) under a loaded model."""
    states = sample_states(env_name, render, puzzles, steps, seed)
    return perplexity_summary(state_novelty(lm.model, lm.tokenizer, RolloutConfig(env=env_name, render=render),
                                            states))


@dataclass(kw_only=True)
class NoveltyConfig(Seeded):
    """`spa novelty`: how unfamiliar validation states are to a model, in both renders (the paper's Table 1)."""

    model: ModelConfig = setting(factory=ModelConfig)
    env: list[str] = setting(factory=lambda: ["sokoban", "frozenlake", "sudoku"], repeat=True, metavar="NAME")
    """Environments to score (repeat the flag for several; default: the paper's three)."""
    puzzles: int = setting(32, ge=1)
    """Validation puzzles per environment."""
    steps: int = setting(3, ge=0)
    """Random actions after each puzzle's start whose states are scored too."""
    out: str | None = setting(None, metavar="FILE")
    """Also write the report (with these settings) as JSON to this file."""

    def check(self) -> None:
        for name in self.env:
            envs.get_variant(name)
        check_dtype(self.model.dtype, training=False)


def novelty_report(config: NoveltyConfig) -> list[dict]:
    """Mean state perplexity of validation states under the model, per env and render (the paper's Table 1);
    with `config.out`, written there as JSON (the location is checked before any work)."""
    if config.out:
        writable_file(config.out)
    lm = load_model(config.model.model, config.model.device, config.model.dtype)
    reports = []
    for name in config.env:
        report: dict = {"model": lm.name, "env": name, "puzzles": config.puzzles}
        for render in RENDERS:
            report[render] = heldout_novelty(lm, name, render, config.puzzles, config.steps, config.seed)
        reports.append(report)
    if config.out:
        atomic_write_json(config.out, {"config": to_dict(config), "reports": reports})
    return reports
