"""The shared contract of spa-rl's text puzzle environments.

`PuzzleEnv` is a `gymnasium.Env` whose observations and actions are text. It fixes what every puzzle must
offer to the rest of the project: seeded generation, loading a custom level from its `grid` text,
stepping with one action given as text, the step info (`success`, `action_is_valid`,
`action_is_effective`), rendering in both render modes, an optimal solver, and snapshot/restore of the full
state (puzzle, dynamic state and random generator) so exploration can branch from any state.

Subclasses implement the puzzle; this module must never know about a particular puzzle, and no method
here may raise on action text: anything unusable is an invalid action that changes nothing.
"""

from __future__ import annotations

import copy
import re
import string
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, get_args

import gymnasium as gym
import numpy as np
from gymnasium import spaces

from spa_rl.errors import LayoutError, SpaError

Render = Literal["grid", "grid+coords"]
RENDERS: tuple[str, ...] = get_args(Render)
"""The two render modes: the raw symbol grid, and the grid followed by a line of entity coordinates."""

_BASE_CHARSET = frozenset(string.printable) | {"√"}
COORDS_SENTENCE = re.compile(r"\b(?:is|are) (?:at|no)\b")


@dataclass(frozen=True)
class EnvSnapshot:
    """Everything needed to put an env back exactly where it was (see `PuzzleEnv.snapshot`)."""

    env_class: str
    state: Any
    rng_state: dict
    done: bool
    num_steps: int


class PuzzleEnv(gym.Env[str, str]):
    """Base class of the text puzzles. See the subclasses' docstrings for each puzzle's rules."""

    metadata: ClassVar[dict] = {"render_modes": ["ansi"], "render_fps": 4}

    def __init__(self, render: str = "grid", render_mode: str | None = None,
                 extra_symbols: str = "") -> None:
        if render not in RENDERS:
            raise SpaError(f"unknown render {render!r}: use one of {', '.join(RENDERS)}")
        if render_mode is not None and render_mode not in self.metadata["render_modes"]:
            raise SpaError(f"unknown render_mode {render_mode!r}: use 'ansi' or leave it unset")
        self.render_kind = render
        self.render_mode = render_mode
        charset = _BASE_CHARSET | set(extra_symbols)
        self.observation_space = spaces.Text(max_length=16384, min_length=1, charset=charset)
        self.action_space = spaces.Text(max_length=64, min_length=1, charset=charset)
        self._done = False
        self.num_steps = 0
        self._has_state = False

    # ----------------------------------------------------------------- subclass hooks
    def _generate(self) -> dict:
        """Create a new puzzle from `self.np_random` only; return extra reset info."""
        raise NotImplementedError

    def _load_layout(self, text: str) -> dict:
        """Load a puzzle from `grid` render text (raise `LayoutError`); return extra reset info."""
        raise NotImplementedError

    def _parse_action(self, text: str) -> Any | None:
        """Turn action text into an internal action, or None if it is not one."""
        raise NotImplementedError

    def _apply(self, action: Any) -> tuple[float, bool, bool]:
        """Execute a parsed action: return (reward, valid, changed). Invalid means nothing changed."""
        raise NotImplementedError

    def _is_success(self) -> bool:
        raise NotImplementedError

    def _is_terminal(self) -> bool:
        raise NotImplementedError

    def _get_state(self) -> Any:
        """The complete puzzle state as an immutable value."""
        raise NotImplementedError

    def _set_state(self, state: Any) -> None:
        raise NotImplementedError

    def grid_text(self) -> str:
        """The state as the symbol grid (the `grid` render)."""
        raise NotImplementedError

    def coords_text(self) -> str:
        """The one-line coordinate description of the key entities (added by `grid+coords`)."""
        raise NotImplementedError

    def solve(self) -> list[str] | None:
        """An optimal action sequence from the current state, or None if there is none."""
        raise NotImplementedError

    def optimal_action(self) -> str | None:
        """The next action of an optimal policy from the current state (None if the puzzle cannot be won)."""
        plan = self.solve()
        return plan[0] if plan else None

    @property
    def action_names(self) -> list[str]:
        """The action words, as an agent should write them (Sudoku gives the pattern `r,c,v`)."""
        raise NotImplementedError

    # ----------------------------------------------------------------- what the agent is told
    def rules(self, render: str) -> list[str]:
        """The lines of the agent's instruction that explain the game and its symbols for `render` (a
        subclass must say what its puzzle is; `instruction` adds the actions and the per-turn limit)."""
        raise NotImplementedError(f"{type(self).__name__} must implement rules(render) to be played by an agent")

    def listed_actions(self) -> list[str] | None:
        """The action words the instruction lists, in the order shown (None: the rules explain the actions)."""
        return self.action_names

    def instruction(self, render: str, max_actions_per_turn: int) -> str:
        """The game description of the agent's first message: rules, symbols, actions, the per-turn limit."""
        lines = list(self.rules(render))
        listed = self.listed_actions()
        if listed:
            lines += ["Your available actions are:", ", ".join(listed)]
        lines.append(f'You can make up to {max_actions_per_turn} actions, separated by the action separator " || ".')
        return "\n".join(lines)

    def random_action(self, rng: np.random.Generator) -> str:
        """A uniformly random action text drawn from `rng` (the `random` behaviour policy); the env's state and
        own generator are left untouched."""
        names = self.action_names
        return names[int(rng.integers(len(names)))]

    # ----------------------------------------------------------------- gymnasium API
    def reset(self, *, seed: int | None = None, options: dict | None = None) -> tuple[str, dict]:
        """Generate the puzzle for `seed`, or load `options["layout"]` (a `grid` render text)."""
        super().reset(seed=seed)
        options = options or {}
        layout = options.get("layout")
        extra = self._load_layout(layout) if layout is not None else self._generate()
        self._has_state = True
        self._done = False
        self.num_steps = 0
        info = {"success": self._is_success(), "action_is_valid": True, "action_is_effective": False}
        info.update(extra)
        return self.render_text(), info

    def step(self, action: str) -> tuple[str, float, bool, bool, dict]:
        """Take one action given as text. Unusable text is an invalid action: nothing changes."""
        if not self._has_state:
            raise gym.error.ResetNeeded("call reset() before step()")
        parsed = None if self._done else self._parse_action(action)
        if parsed is None:
            reward, valid, changed = 0.0, False, False
        else:
            reward, valid, changed = self._apply(parsed)
            if valid:
                self.num_steps += 1
        terminated = self._is_terminal()
        self._done = terminated
        info = {"success": self._is_success(), "action_is_valid": valid, "action_is_effective": changed}
        return self.render_text(), float(reward), terminated, False, info

    def render(self) -> str | None:
        if self.render_mode == "ansi":
            return self.render_text()
        return None

    # ----------------------------------------------------------------- text
    def render_text(self, render: str | None = None) -> str:
        """The current state in `render` mode (the env's own mode by default)."""
        render = render or self.render_kind
        if render == "grid":
            return self.grid_text()
        if render == "grid+coords":
            return self.grid_text() + "\n" + self.coords_text()
        raise SpaError(f"unknown render {render!r}: use one of {', '.join(RENDERS)}")

    # ----------------------------------------------------------------- state
    def snapshot(self) -> EnvSnapshot:
        """The full state: puzzle, dynamic state, episode flags and the random generator."""
        if not self._has_state:
            raise gym.error.ResetNeeded("call reset() before snapshot()")
        return EnvSnapshot(type(self).__name__, self._get_state(),
                           copy.deepcopy(self.np_random.bit_generator.state), self._done, self.num_steps)

    def restore(self, snap: EnvSnapshot) -> str:
        """Put the env back into `snap`'s state and return the observation text."""
        if snap.env_class != type(self).__name__:
            raise SpaError(f"snapshot of {snap.env_class} cannot be restored into {type(self).__name__}")
        self._set_state(snap.state)
        rng = np.random.Generator(np.random.PCG64())
        rng.bit_generator.state = copy.deepcopy(snap.rng_state)
        self._np_random = rng
        self._on_rng_replaced()
        self._done = snap.done
        self.num_steps = snap.num_steps
        self._has_state = True
        return self.render_text()

    def _on_rng_replaced(self) -> None:
        """Hook for envs that hand `self.np_random` to an inner object."""

    @property
    def success(self) -> bool:
        """Whether the puzzle is solved."""
        return self._has_state and self._is_success()

    @property
    def done(self) -> bool:
        """Whether the episode has ended (further actions are invalid until `reset` or `restore`)."""
        return self._done


def join_coords(cells: list[tuple[int, int]]) -> str:
    """`(r,c), (r,c)` in the given order."""
    return ", ".join(f"({r},{c})" for r, c in cells)


def entity_clause(singular: str, plural: str, symbol: str, cells: list[tuple[int, int]]) -> str:
    """`box (X) is at (3,3)` / `boxes (X) are at (3,3), (4,2)` / `no boxes (X)`."""
    if not cells:
        return f"no {plural} ({symbol})"
    if len(cells) == 1:
        return f"{singular} ({symbol}) is at {join_coords(cells)}"
    return f"{plural} ({symbol}) are at {join_coords(cells)}"


def layout_lines(text: str, name: str) -> list[str]:
    """The grid lines of a layout text: surrounding blank lines and a trailing coordinate line dropped."""
    if not isinstance(text, str):
        raise LayoutError(f"{name} layout must be text, got {type(text).__name__}")
    lines = [ln.rstrip("\r") for ln in text.strip("\n").split("\n")]
    while lines and not lines[-1].strip():
        lines.pop()
    if len(lines) > 1 and COORDS_SENTENCE.search(lines[-1]):
        lines.pop()  # a grid+coords render: its sentence of coordinates is derived, so ignore it
    if not lines:
        raise LayoutError(f"{name} layout is empty: give the grid, one row per line")
    return lines
