"""Scripted behaviour policies: uniformly random actions and the optimal solver.

They are the floor and ceiling every learned agent is compared with, and the cold-start data source for a
model too weak to follow the text protocol. A policy here sees the env (never a model) and returns one
action text; it must never change the env's state.
"""

from __future__ import annotations

import numpy as np

from spa_rl.envs.base import PuzzleEnv
from spa_rl.envs.sudoku import SudokuEnv


def random_action(env: PuzzleEnv, rng: np.random.Generator) -> str:
    """A uniformly random action word; in Sudoku a uniformly random value for a uniformly random empty cell."""
    if isinstance(env, SudokuEnv):
        n = env.size
        empty = [i for i, v in enumerate(env.board) if v == 0] or list(range(n * n))
        i = empty[int(rng.integers(len(empty)))]
        return f"{i // n + 1},{i % n + 1},{int(rng.integers(1, n + 1))}"
    names = env.action_names
    return names[int(rng.integers(len(names)))]


def solver_action(env: PuzzleEnv) -> str | None:
    """The next action of an optimal policy (None when the puzzle can no longer be won)."""
    return env.optimal_action()
