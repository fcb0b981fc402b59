"""The puzzle environments and the registry of named variants.

Importing this module registers the gymnasium ids `spa/Sokoban-v0`, `spa/FrozenLake-v0` and `spa/Sudoku-v0`,
and the named variants (`sokoban`, `frozenlake-det`, ...) that the CLI and the training stages refer to.
`make(name, **overrides)` builds either. Users add variants with `register_variant`.

This module must never hold puzzle logic; it only names and builds environments.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import gymnasium as gym

from spa_rl.config import Config, setting
from spa_rl.envs.base import RENDERS, EnvSnapshot, PuzzleEnv, Render
from spa_rl.envs.frozenlake import FrozenLakeEnv
from spa_rl.envs.sokoban import ALT_SYMBOLS, SokobanEnv
from spa_rl.envs.sudoku import SudokuEnv
from spa_rl.errors import SpaError, UnknownNameError

ENV_CLASSES: dict[str, type[PuzzleEnv]] = {
    "spa/Sokoban-v0": SokobanEnv,
    "spa/FrozenLake-v0": FrozenLakeEnv,
    "spa/Sudoku-v0": SudokuEnv,
}

for _env_id, _cls in ENV_CLASSES.items():
    if _env_id not in gym.registry:
        gym.register(id=_env_id, entry_point=f"{_cls.__module__}:{_cls.__name__}")


@dataclass(frozen=True)
class Variant:
    """A named environment configuration plus the agent's episode limits on it (docs/method.md §3)."""

    name: str
    """The name users type (`spa env show sokoban`)."""
    env_id: str
    """The gymnasium id it builds."""
    description: str
    """One line for `spa env list`."""
    kwargs: Mapping[str, Any] = field(default_factory=dict)
    """Constructor arguments of the env (the size options; `render` is chosen per run)."""
    max_turns: int = 5
    """Assistant turns per episode."""
    max_actions_per_turn: int = 5
    """Actions the agent may write in one turn."""
    max_actions_per_episode: int = 10
    """Actions executed per episode in total."""

    @property
    def family(self) -> str:
        """`sokoban`, `frozenlake` or `sudoku`."""
        return self.env_id.split("/")[1].split("-")[0].lower()


VARIANTS: dict[str, Variant] = {}


def register_variant(variant: Variant, overwrite: bool = False) -> Variant:
    """Add a named variant; its env id must be registered with gymnasium (ours or your own)."""
    if variant.name in VARIANTS and not overwrite:
        raise SpaError(f"variant {variant.name!r} already exists: pick another name or pass overwrite=True")
    if variant.env_id not in gym.registry:
        raise UnknownNameError(f"variant {variant.name!r} uses unregistered env id {variant.env_id!r}")
    VARIANTS[variant.name] = variant
    return variant


def get_variant(name: str) -> Variant:
    """The variant called `name`, or an error that lists the valid names."""
    try:
        return VARIANTS[name]
    except KeyError:
        raise UnknownNameError(f"unknown env {name!r}: valid names are {', '.join(VARIANTS)}") from None


def make(name: str, **overrides: Any) -> gym.Env:
    """Build the env for a variant name (or a gymnasium id), with `overrides` of its constructor arguments.

    `render="grid+coords"` selects the coordinate render. Extra methods (`snapshot`, `restore`, `solve`)
    live on `env.unwrapped`.
    """
    if name in VARIANTS:
        variant = VARIANTS[name]
        env_id, kwargs = variant.env_id, {**variant.kwargs, **overrides}
    elif name in ENV_CLASSES:
        env_id, kwargs = name, dict(overrides)
    else:
        raise UnknownNameError(f"unknown env {name!r}: valid names are {', '.join(VARIANTS)} "
                               f"(or the ids {', '.join(ENV_CLASSES)})")
    cls = ENV_CLASSES.get(env_id)
    if cls is not None:
        accepted = [p for p in inspect.signature(cls.__init__).parameters if p != "self"]
        unknown = sorted(set(kwargs) - set(accepted))
        if unknown:
            raise SpaError(f"{name} has no option {', '.join(unknown)}: its options are {', '.join(accepted)}")
    return gym.make(env_id, **kwargs)


_SOKOBAN = "spa/Sokoban-v0"
_FROZENLAKE = "spa/FrozenLake-v0"
_SUDOKU = "spa/Sudoku-v0"

for _variant in (
    Variant("sokoban", _SOKOBAN, "Sokoban 6x6, 1 box (the paper's)", {"dim": (6, 6), "num_boxes": 1}),
    Variant("sokoban-10x10-2box", _SOKOBAN, "Sokoban 10x10, 2 boxes (the paper's 'complex' generalisation test)",
            {"dim": (10, 10), "num_boxes": 2}),
    Variant("sokoban-altvocab", _SOKOBAN, "Sokoban 6x6, 1 box, grid vocabulary W . G C B A @ (OOD relabeling)",
            {"dim": (6, 6), "num_boxes": 1, "symbols": ALT_SYMBOLS}),
    Variant("sokoban-permuted-actions", _SOKOBAN,
            "Sokoban 6x6, 1 box, permuted action words: Right moves up, Left down, Up left, Down right",
            {"dim": (6, 6), "num_boxes": 1, "actions": ("Right", "Left", "Up", "Down")}),
    Variant("frozenlake", _FROZENLAKE, "FrozenLake 4x4, slippery (the paper's)",
            {"size": 4, "p": 0.8, "slippery": True}),
    Variant("frozenlake-det", _FROZENLAKE, "FrozenLake 4x4, not slippery", {"size": 4, "p": 0.8, "slippery": False}),
    Variant("frozenlake-6x6", _FROZENLAKE, "FrozenLake 6x6, slippery", {"size": 6, "p": 0.8, "slippery": True}),
    Variant("frozenlake-6x6-det", _FROZENLAKE, "FrozenLake 6x6, not slippery",
            {"size": 6, "p": 0.8, "slippery": False}),
    Variant("sudoku", _SUDOKU, "Sudoku 4x4, 6 blanks, unique solution (the paper's)", {"blanks": 6},
            max_actions_per_episode=25),
    Variant("sudoku-hard", _SUDOKU, "Sudoku 4x4, 10 blanks, unique solution", {"blanks": 10},
            max_actions_per_episode=25),
):
    register_variant(_variant)

@dataclass(kw_only=True)
class EnvConfig(Config):
    """Which puzzles, and how their states are shown to the agent."""

    env: str = "sokoban"
    """Environment name (see `spa env list`)."""
    render: Render = "grid+coords"
    """State text: grid (the symbols) or grid+coords (the grid and a line of coordinates: the paper's state
    estimation)."""
    env_overrides: dict = setting(factory=dict)
    """Extra constructor arguments of the env as a JSON object, e.g. {"dim": [7, 7]} for Sokoban."""

    def check(self) -> None:
        make(self.env, **self.env_overrides)  # unknown names and options fail here, before any work


__all__ = [
    "ENV_CLASSES",
    "RENDERS",
    "VARIANTS",
    "EnvConfig",
    "EnvSnapshot",
    "FrozenLakeEnv",
    "PuzzleEnv",
    "SokobanEnv",
    "SudokuEnv",
    "Variant",
    "get_variant",
    "make",
    "register_variant",
]
