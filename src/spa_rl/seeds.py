"""Which puzzle seeds train and which validate: the one place that decides.

Training stages (self-play collection, RL) draw puzzles from seeds below `VALIDATION_SEED_OFFSET`; evaluation
uses the fixed seeds from it on, the same at every evaluation, so no validation puzzle is ever trained on.
This module must never draw a seed itself: it only names the ranges and checks requests against them.
"""

from __future__ import annotations

from spa_rl.errors import SpaError

VALIDATION_SEED_OFFSET = 1_000_000_000
"""Validation puzzles use seeds from here on; training uses seeds below it, so the two never overlap."""


def validation_seeds(n: int) -> list[int]:
    """The first `n` fixed validation puzzle seeds (the same at every evaluation)."""
    return [VALIDATION_SEED_OFFSET + i for i in range(n)]


def training_seeds(first: int, n: int) -> list[int]:
    """`n` training puzzle seeds from `first`, or a one-line error if they would reach the validation range."""
    check_training_range(first, n)
    return list(range(first, first + n))


def check_training_range(first: int, n: int) -> None:
    if first < 0 or first + n > VALIDATION_SEED_OFFSET:
        raise SpaError(f"training puzzle seeds {first}..{first + n - 1} must lie in [0, {VALIDATION_SEED_OFFSET}): "
                       f"the seeds from {VALIDATION_SEED_OFFSET} on are the validation puzzles")
