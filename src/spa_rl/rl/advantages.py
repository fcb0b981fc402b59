"""Advantage estimators by name: what `spa train --advantage NAME` looks up.

An estimator is one function from a step's kept episodes (`AdvantageInputs`: token rewards, the critic's values,
the loss mask, each episode's score and group) and the run's settings to (advantages, returns), both [N, T-1],
registered with `@register_advantage(name, uses_critic=...)`. The maths lives in `rl/core.py`; this module only
names it. To try an estimator of your own, register it before building the `RLConfig` (for example in a script that
then calls `train_rl`); the name becomes a valid `advantage`.

It must never touch a model, an optimizer or the batch's other fields: estimators are pure functions of their inputs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from spa_rl.rl import core


@dataclass(frozen=True)
class AdvantageInputs:
    """What an estimator may read, for N episodes. Token quantities are [N, T-1] (column j describes token j+1)."""

    rewards: torch.Tensor
    """[N, T-1] rewards, on the last token of a turn or of the episode."""
    values: torch.Tensor
    """[N, T-1] the critic's values before the update (zeros for an estimator without a critic)."""
    mask: torch.Tensor
    """[N, T-1] 1 on the tokens the loss covers."""
    scores: torch.Tensor
    """[N] each episode's total reward."""
    groups: torch.Tensor
    """[N] each episode's group (its puzzle)."""


Estimate = Callable[[AdvantageInputs, Any], tuple[torch.Tensor, torch.Tensor]]


@dataclass(frozen=True)
class AdvantageEstimator:
    compute: Estimate
    """(inputs, the RLConfig) -> (advantages, returns), each [N, T-1]; returns are the critic's targets."""
    uses_critic: bool
    """Reads `values` (a critic is trained beside the actor). Its advantages are whitened over the batch when
    `whiten_advantages` is set; an estimator without a critic normalises its own."""


ESTIMATORS: dict[str, AdvantageEstimator] = {}


def register_advantage(name: str, *, uses_critic: bool) -> Callable[[Estimate], Estimate]:
    """Register `fn(inputs, config) -> (advantages, returns)` as the estimator `name`."""
    def register(fn: Estimate) -> Estimate:
        ESTIMATORS[name] = AdvantageEstimator(fn, uses_critic)
        return fn
    return register


@register_advantage("gae", uses_critic=True)
def gae(x: AdvantageInputs, config: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Token-level GAE with the critic's values, skipping the text between turns."""
    return core.gae(x.rewards, x.values, x.mask, config.gamma, config.lam)


@register_advantage("bi-level-gae", uses_critic=True)
def bi_level_gae(x: AdvantageInputs, config: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Turn-level GAE discounted by `turn_gamma`, then token-level inside each turn."""
    return core.bi_level_gae(x.rewards, x.values, x.mask, config.gamma, config.lam, config.turn_gamma)


@register_advantage("grpo", uses_critic=False)
def grpo(x: AdvantageInputs, config: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """The episode's score normalised within its group, on every loss token; no returns (no critic)."""
    adv = core.group_advantages(x.scores, x.groups, config.grpo_norm_by_std)
    return adv[:, None] * x.mask, torch.zeros_like(x.mask)
