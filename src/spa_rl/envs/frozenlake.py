"""FrozenLake as a text environment on gymnasium's own FrozenLake dynamics.

The transition model (including the slippery mode: intended direction with probability 1/3, each
perpendicular direction 1/3) is gymnasium's `FrozenLakeEnv`, which this module drives; it only adds what
gymnasium lacks: maps with a random start and goal that are guaranteed to be connected, the text renders
of docs/method.md §2, loading a map from its text, snapshots, and an optimal solver.

This module must never reimplement the dynamics or use randomness other than the env's own generator.
"""

from __future__ import annotations

import warnings
from collections import deque

import numpy as np
from gymnasium.envs.toy_text.frozen_lake import FrozenLakeEnv as _GymFrozenLake

from spa_rl.envs.base import PuzzleEnv, entity_clause, layout_lines
from spa_rl.errors import LayoutError, SpaError

SYMBOLS = {"player": "P", "frozen": "_", "hole": "O", "goal": "G", "player_in_hole": "X", "player_on_goal": "√"}
ACTIONS = ("Left", "Down", "Right", "Up")
"""Gymnasium's action order: 0 left, 1 down, 2 right, 3 up."""
_DR = (0, 1, 0, -1)
_DC = (-1, 0, 1, 0)


def connected(frozen: np.ndarray, start: int, goal: int) -> bool:
    n_rows, n_cols = frozen.shape
    seen = {start}
    todo = deque([start])
    while todo:
        r, c = divmod(todo.popleft(), n_cols)
        for d in range(4):
            rr, cc = r + _DR[d], c + _DC[d]
            j = rr * n_cols + cc
            if 0 <= rr < n_rows and 0 <= cc < n_cols and frozen[rr, cc] and j not in seen:
                if j == goal:
                    return True
                seen.add(j)
                todo.append(j)
    return start == goal


def generate_map(rng: np.random.Generator, size: int, p: float, max_tries: int = 10_000) -> tuple[str, ...]:
    """A `size`×`size` map (gymnasium letters S F H G) with random start and goal joined by a frozen path."""
    for _ in range(max_tries):
        frozen = rng.random((size, size)) < p
        start, goal = (int(x) for x in rng.choice(size * size, size=2, replace=False))
        frozen.flat[start] = frozen.flat[goal] = True
        if connected(frozen, start, goal):
            desc = [["F" if f else "H" for f in row] for row in frozen]
            desc[start // size][start % size] = "S"
            desc[goal // size][goal % size] = "G"
            return tuple("".join(row) for row in desc)
    raise SpaError(f"could not generate a connected {size}x{size} FrozenLake map with p={p}: raise p")


class FrozenLakeEnv(PuzzleEnv):
    """FrozenLake: walk from the start to the goal without falling into a hole.

    ## Action space
    One action word per step, case-insensitive: `Left`, `Down`, `Right`, `Up`. On a slippery lake the
    player moves in the intended direction with probability 1/3 and in each perpendicular direction with
    probability 1/3 (gymnasium's dynamics). Moving into the edge leaves the player in place. Any other text
    is an invalid action.

    ## Observation
    The grid as text, one row per line: `P` player, `_` frozen (the start tile too), `O` hole, `G` goal,
    `X` player in a hole, `√` player on the goal. With `render="grid+coords"` a line follows:
    `Player (P) is at (3,2); holes (O) are at (0,1), (1,0); goal (G) is at (2,0).` (zero-indexed (row,col),
    row-major; `hole (O) is at` for one hole, `no holes (O)` for none).

    ## Rewards
    +1 on reaching the goal, 0 otherwise (gymnasium's schedule).

    ## Episode end
    Terminated on reaching the goal or falling into a hole. Never truncated by the env.

    ## Arguments
    `size` of the square map, default 4; `p`, the probability that a generated tile is frozen, default 0.8;
    `slippery`, default True; `render` (`grid` or `grid+coords`); `render_mode` (`ansi` or None).
    Start and goal are drawn at random and a frozen path between them is guaranteed.
    """

    def __init__(self, size: int = 4, p: float = 0.8, slippery: bool = True, render: str = "grid",
                 render_mode: str | None = None) -> None:
        super().__init__(render=render, render_mode=render_mode)
        if not isinstance(size, int) or not 2 <= size <= 64:
            raise SpaError(f"FrozenLake size must be an integer from 2 to 64, got {size!r}")
        if not 0.0 < float(p) <= 1.0:
            raise SpaError(f"FrozenLake p (the frozen-tile probability) must be in (0, 1], got {p!r}")
        self.size, self.p, self.slippery = size, float(p), bool(slippery)
        self.desc: tuple[str, ...] = ()
        self._lake: _GymFrozenLake | None = None
        self._values: np.ndarray | None = None

    # ----------------------------------------------------------------- puzzle
    def _use_map(self, desc: tuple[str, ...], position: int) -> None:
        if desc != self.desc or self._lake is None:
            with warnings.catch_warnings(), np.errstate(divide="ignore", invalid="ignore"):
                warnings.simplefilter("ignore")  # a map whose player stands in a hole has no 'S' tile
                self._lake = _GymFrozenLake(desc=list(desc), is_slippery=self.slippery)
            self.desc = desc
            self._values = None
        self._lake.s = position
        self._lake.lastaction = None
        self._on_rng_replaced()

    def _on_rng_replaced(self) -> None:
        if self._lake is not None:
            self._lake.np_random = self.np_random  # gymnasium's slip draws come from our generator

    def _generate(self) -> dict:
        desc = generate_map(self.np_random, self.size, self.p)
        start = "".join(desc).index("S")
        self._use_map(desc, start)
        return {}

    def _load_layout(self, text: str) -> dict:
        lines = layout_lines(text, "FrozenLake")
        n_cols = len(lines[0])
        letters: list[str] = []
        player = -1
        for r, line in enumerate(lines):
            if len(line) != n_cols:
                raise LayoutError(f"FrozenLake layout line {r + 1} has {len(line)} characters, expected {n_cols} "
                                  f"(every row must be as wide as the first)")
            for c, ch in enumerate(line):
                tile = {"P": "S", "_": "F", "O": "H", "G": "G", "X": "H", "√": "G"}.get(ch)
                if tile is None:
                    raise LayoutError(f"FrozenLake layout line {r + 1}, character {c + 1}: unexpected {ch!r}; "
                                      f"the symbols are {' '.join(SYMBOLS.values())}")
                if ch in "PX√":
                    if player >= 0:
                        raise LayoutError(f"FrozenLake layout line {r + 1}, character {c + 1}: a second player")
                    player = r * n_cols + c
                letters.append(tile)
        if player < 0:
            raise LayoutError("FrozenLake layout has no player (P, X or √)")
        if letters.count("G") != 1:
            raise LayoutError(f"FrozenLake layout needs exactly one goal (G or √), found {letters.count('G')}")
        desc = tuple("".join(letters[r * n_cols:(r + 1) * n_cols]) for r in range(len(lines)))
        self._use_map(desc, player)
        return {}

    # ----------------------------------------------------------------- dynamics
    @property
    def position(self) -> int:
        assert self._lake is not None
        return int(self._lake.s)

    def _tile(self, i: int) -> str:
        n_cols = len(self.desc[0])
        return self.desc[i // n_cols][i % n_cols]

    def _parse_action(self, text: str) -> int | None:
        if not isinstance(text, str):
            return None
        word = text.strip().lower()
        for a, name in enumerate(ACTIONS):
            if name.lower() == word:
                return a
        return None

    def _apply(self, a: int) -> tuple[float, bool, bool]:
        assert self._lake is not None
        before = self.position
        _, reward, _, _, _ = self._lake.step(a)
        return float(reward), True, self.position != before

    def _is_success(self) -> bool:
        return self._lake is not None and self._tile(self.position) == "G"

    def _is_terminal(self) -> bool:
        return self._lake is not None and self._tile(self.position) in "GH"

    def _get_state(self) -> tuple[tuple[str, ...], int]:
        return (self.desc, self.position)

    def _set_state(self, state: tuple[tuple[str, ...], int]) -> None:
        self._use_map(*state)

    # ----------------------------------------------------------------- text
    @property
    def action_names(self) -> list[str]:
        return list(ACTIONS)

    def rules(self, render: str) -> list[str]:
        lines = ["You are walking on a frozen lake. Reach the goal without falling into a hole."]
        if self.slippery:
            lines[0] += " The ice is slippery: you may move perpendicular to the direction you intended."
        lines += ["The meaning of each symbol in the state is:",
                  "P: player, _: frozen, O: hole, G: goal, X: player in hole, √: player on goal"]
        if render == "grid+coords":
            lines.append("After the grid, a line gives the (row,col) positions of the player, holes and goal, "
                         "counted from (0,0) at the top-left.")
        return lines

    def grid_text(self) -> str:
        n_cols = len(self.desc[0])
        pos = self.position
        rows = []
        for r, line in enumerate(self.desc):
            row = []
            for c, tile in enumerate(line):
                if r * n_cols + c == pos:
                    row.append({"H": "X", "G": "√"}.get(tile, "P"))
                else:
                    row.append({"H": "O", "G": "G"}.get(tile, "_"))
            rows.append("".join(row))
        return "\n".join(rows)

    def coords_text(self) -> str:
        n_cols = len(self.desc[0])
        pr, pc = divmod(self.position, n_cols)
        holes = [(r, c) for r, line in enumerate(self.desc) for c, t in enumerate(line) if t == "H"]
        goal = [(r, c) for r, line in enumerate(self.desc) for c, t in enumerate(line) if t == "G"]
        return (f"Player (P) is at ({pr},{pc}); {entity_clause('hole', 'holes', 'O', holes)}; "
                f"{entity_clause('goal', 'goals', 'G', goal)}.")

    def solve(self) -> list[str] | None:
        """The shortest path to the goal if every move went as intended (on a slippery lake it is the plan,
        not a guarantee; `optimal_action` acts optimally under slipping)."""
        n_rows, n_cols = len(self.desc), len(self.desc[0])
        start = self.position
        if self._tile(start) == "G":
            return []
        if self._tile(start) == "H":
            return None
        parent: dict[int, tuple[int, int] | None] = {start: None}
        todo = deque([start])
        while todo:
            i = todo.popleft()
            r, c = divmod(i, n_cols)
            for a in range(4):
                rr = min(max(r + _DR[a], 0), n_rows - 1)
                cc = min(max(c + _DC[a], 0), n_cols - 1)
                j = rr * n_cols + cc
                if j in parent or self._tile(j) == "H":
                    continue
                parent[j] = (i, a)
                if self._tile(j) == "G":
                    plan = []
                    while parent[j] is not None:
                        j, a = parent[j]  # type: ignore[misc]
                        plan.append(ACTIONS[a])
                    return plan[::-1]
                todo.append(j)
        return None

    def optimal_action(self) -> str | None:
        """The action that maximises the discounted probability of reaching the goal (value iteration on
        gymnasium's transition table, discount 0.99 so shorter routes win ties)."""
        if not self.slippery:
            plan = self.solve()
            return plan[0] if plan else None
        assert self._lake is not None
        lake = self._lake

        def q(s: int, a: int, values: np.ndarray) -> float:
            return sum(p * (float(self._tile(s2) == "G") + 0.99 * values[s2]) for p, s2, _, _ in lake.P[s][a])

        if self._values is None:
            n = len(self.desc) * len(self.desc[0])
            values = np.zeros(n)
            for _ in range(1000):
                new = np.array([0.0 if self._tile(s) in "GH" else max(q(s, a, values) for a in range(4))
                                for s in range(n)])
                done = np.max(np.abs(new - values)) < 1e-9
                values = new
                if done:
                    break
            self._values = values
        s = self.position
        if self._tile(s) in "GH":
            return None
        return ACTIONS[int(np.argmax([q(s, a, self._values) for a in range(4)]))]
