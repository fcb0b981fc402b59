"""Scripted behaviour policies: uniformly random actions and the optimal solver, written in the protocol.

They are the floor and ceiling every learned agent is compared with, and the cold-start data source for a
model too weak to follow the text protocol. The actions themselves come from the env (`env.random_action`,
`env.optimal_action`), so a user's env works here without changes. A policy sees the env (never a model) and
must leave the env's state as it found it.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from spa_rl.envs.base import PuzzleEnv
from spa_rl.prompts import format_response


def _simulate(env: PuzzleEnv, choose: Callable[[], str | None], limit: int) -> tuple[list[str], str]:
    """Pick up to `limit` actions by `choose` on the env, then put it back: (actions, state after them)."""
    snap = env.snapshot()
    actions = []
    for _ in range(limit):
        a = choose()
        if a is None:
            break
        env.step(a)
        actions.append(a)
        if env.done:
            break
    after = env.render_text()
    env.restore(snap)
    return actions, after


def scripted_response(env: PuzzleEnv, policy: str, limit: int, fmt: str, rng: np.random.Generator) -> str:
    """A `random` or `solver` turn written in the protocol, with the true current and predicted states.

    The prediction simulates the actions on a snapshot that includes the env's random generator, so it is the
    state the env will really reach (on a slippery lake the solver also reacts to slips within its turn).
    """
    if policy == "solver":
        actions, after = _simulate(env, env.optimal_action, limit)
        reasoning = ("The optimal next moves are " + ", ".join(actions) + "." if actions
                     else "No move can win from here.")
        actions = actions or [env.action_names[0]]
    elif policy == "random":
        k = int(rng.integers(1, limit + 1))
        actions, after = _simulate(env, lambda: env.random_action(rng), k)
        reasoning = "I will try " + ", ".join(actions) + "."
    else:
        raise ValueError(f"unknown scripted policy {policy!r}")
    return format_response(env.render_text(), reasoning, after, actions, fmt)
