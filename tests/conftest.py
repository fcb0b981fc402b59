"""Shared test helpers: building envs by name."""

from __future__ import annotations

import pytest

from spa_rl import envs


@pytest.fixture
def make():
    """`make(name, **kw)` -> the unwrapped env."""
    return lambda name, **kw: envs.make(name, **kw).unwrapped
