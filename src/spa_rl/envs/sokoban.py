"""Sokoban as a text environment, with its own generator and optimal solver.

We write the generator and solver ourselves because the maintained option, gym-sokoban, depends on the
retired `gym` package, draws from Python's global `random` state (so a seed does not fix a puzzle), gives
no solution length, and is slow for larger rooms (see `benchmarks/envs.py`). The generator here is the
classic one: carve a random room, put the boxes on their targets, then play backwards (the player walks
and *pulls* boxes away from the targets). The reverse play is an exhaustive breadth-first search from every
solved state, so each state it reaches comes with its exact optimal solution length; a puzzle is drawn
uniformly from the reached states whose boxes are all off their targets and whose optimal length is within
`[min_moves, max_moves]`. Movement follows gym-sokoban's rules: a move into a free cell walks, a move into a
box pushes it when the cell behind it is free (floor or target), anything else leaves the state unchanged.

This module must never use any randomness but the env's own generator (`self.np_random`).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from spa_rl.envs.base import PuzzleEnv, entity_clause, layout_lines
from spa_rl.errors import LayoutError, SpaError

DEFAULT_SYMBOLS = "#_O√XPS"
"""Wall, empty floor, target, box on target, box, player, player on target."""
ALT_SYMBOLS = "W.GCBA@"
"""The paper's alternative (out-of-distribution) grid vocabulary, in the same order."""
DEFAULT_ACTIONS = ("Up", "Down", "Left", "Right")
"""The action word for each direction, in the order up, down, left, right."""

_DR = (-1, 1, 0, 0)
_DC = (0, 0, -1, 1)
_OPPOSITE = (1, 0, 3, 2)

STEP_PENALTY = -0.1
BOX_ON_TARGET = 1.0
BOX_OFF_TARGET = -1.0
ALL_ON_TARGETS = 10.0


@dataclass(frozen=True)
class Room:
    """The fixed part of a level: size, floor cells, targets, and each floor cell's neighbours.

    Cells are flat indices `r * cols + c`. `nbr[i][d]` is the floor cell next to `i` in direction `d`
    (0 up, 1 down, 2 left, 3 right), or -1 for a wall or the edge of the grid.
    """

    rows: int
    cols: int
    floor: frozenset[int]
    targets: frozenset[int]
    nbr: tuple[tuple[int, int, int, int], ...]

    @staticmethod
    def build(rows: int, cols: int, floor: set[int] | frozenset[int], targets: set[int] | frozenset[int]) -> Room:
        floor = frozenset(floor)
        nbr = []
        for i in range(rows * cols):
            r, c = divmod(i, cols)
            row = []
            for d in range(4):
                rr, cc = r + _DR[d], c + _DC[d]
                j = rr * cols + cc
                row.append(j if 0 <= rr < rows and 0 <= cc < cols and j in floor else -1)
            nbr.append(tuple(row))
        return Room(rows, cols, floor, frozenset(targets), tuple(nbr))


State = tuple[int, frozenset[int]]
"""(player cell, box cells)."""


def push(room: Room, player: int, boxes: frozenset[int], d: int) -> tuple[int, frozenset[int], int] | None:
    """One forward move in direction `d`: (player, boxes, change in boxes on target), or None if blocked."""
    q = room.nbr[player][d]
    if q < 0:
        return None
    if q not in boxes:
        return q, boxes, 0
    b = room.nbr[q][d]
    if b < 0 or b in boxes:
        return None
    delta = (b in room.targets) - (q in room.targets)
    return q, (boxes - {q}) | {b}, delta


def solve(room: Room, player: int, boxes: frozenset[int], max_states: int = 3_000_000) -> list[int] | None:
    """Breadth-first search for a shortest sequence of directions that puts every box on a target.

    Returns the directions (0 up, 1 down, 2 left, 3 right), `[]` if already solved, or None if the level is
    unsolvable or the search would visit more than `max_states` states.
    """
    if boxes == room.targets:
        return []
    start = (player, boxes)
    parent: dict[State, tuple[State, int] | None] = {start: None}
    frontier = deque([start])
    while frontier:
        state = frontier.popleft()
        p, bx = state
        for d in range(4):
            moved = push(room, p, bx, d)
            if moved is None:
                continue
            nxt = (moved[0], moved[1])
            if nxt in parent:
                continue
            parent[nxt] = (state, d)
            if moved[1] == room.targets:
                path = []
                cur: State = nxt
                while parent[cur] is not None:
                    prev, dd = parent[cur]  # type: ignore[misc]
                    path.append(dd)
                    cur = prev
                return path[::-1]
            if len(parent) > max_states:
                return None
            frontier.append(nxt)
    return None


def reverse_distances(room: Room, max_moves: int | None) -> dict[State, int]:
    """Play backwards from every solved state: each reached state with its optimal forward solution length.

    A reverse step walks the player to a free neighbour, optionally pulling the box behind it along; it is
    exactly the inverse of a forward walk or push, so breadth-first distance here equals the forward optimal
    number of moves. The search stops at depth `max_moves` (None: exhaustive); distances stay exact.
    """
    boxes = frozenset(room.targets)
    dist: dict[State, int] = {}
    frontier = []
    for p in sorted(room.floor - boxes):
        dist[(p, boxes)] = 0
        frontier.append((p, boxes))
    depth = 0
    while frontier and (max_moves is None or depth < max_moves):
        depth += 1
        nxt_frontier = []
        for p, bx in frontier:
            for d in range(4):
                q = room.nbr[p][d]
                if q < 0 or q in bx:
                    continue
                walked = (q, bx)
                if walked not in dist:
                    dist[walked] = depth
                    nxt_frontier.append(walked)
                behind = room.nbr[p][_OPPOSITE[d]]
                if behind >= 0 and behind in bx:
                    pulled = (q, (bx - {behind}) | {p})
                    if pulled not in dist:
                        dist[pulled] = depth
                        nxt_frontier.append(pulled)
        frontier = nxt_frontier
    return dist


def carve_room(rng: np.random.Generator, rows: int, cols: int, p_turn: float = 0.35) -> set[int]:
    """Floor cells of a random room: a random walk inside the outer walls carves the cells it visits, and
    half of the time one neighbour of each, until a random 45-80% of the interior is floor, so rooms mix
    corridors with open areas."""
    interior = (rows - 2) * (cols - 2)
    target = max(2, int(np.ceil(interior * rng.uniform(0.45, 0.8))))
    r, c = int(rng.integers(1, rows - 1)), int(rng.integers(1, cols - 1))
    d = int(rng.integers(4))
    floor = {r * cols + c}
    for _ in range(50 * interior):
        if len(floor) >= target:
            break
        if rng.random() < p_turn:
            d = int(rng.integers(4))
        r = min(max(r + _DR[d], 1), rows - 2)
        c = min(max(c + _DC[d], 1), cols - 2)
        floor.add(r * cols + c)
        if rng.random() < 0.5:
            k = int(rng.integers(4))
            rr, cc = r + _DR[k], c + _DC[k]
            if 1 <= rr <= rows - 2 and 1 <= cc <= cols - 2:
                floor.add(rr * cols + cc)
    return floor


def generate(rng: np.random.Generator, rows: int, cols: int, num_boxes: int, min_moves: int = 1,
             max_moves: int | None = 10, max_tries: int = 1000) -> tuple[Room, int, frozenset[int], int]:
    """A solvable level drawn with `rng`: (room, player, boxes, optimal number of moves)."""
    for _ in range(max_tries):
        floor = carve_room(rng, rows, cols)
        if len(floor) < num_boxes + 2:
            continue
        cells = sorted(floor)
        targets = frozenset(int(cells[i]) for i in rng.choice(len(cells), size=num_boxes, replace=False))
        room = Room.build(rows, cols, floor, targets)
        dist = reverse_distances(room, max_moves)
        candidates = [(s, n) for s, n in dist.items() if n >= min_moves and not (s[1] & targets)]
        if not candidates:
            continue
        (player, boxes), n = candidates[int(rng.integers(len(candidates)))]
        return room, player, boxes, n
    raise SpaError(f"could not generate a {rows}x{cols} Sokoban level with {num_boxes} boxes solvable in "
                   f"{min_moves}..{max_moves} moves after {max_tries} rooms: enlarge the room or the move range")


class SokobanEnv(PuzzleEnv):
    """Sokoban: push every box onto a target.

    ## Action space
    One action word per step, case-insensitive: `Up`, `Down`, `Left`, `Right` (or the words given in
    `actions`, one per direction in that order: the permuted-action variant relabels them). Moving into a
    box pushes it if the cell behind it is floor or an empty target. Any other text is an invalid action.

    ## Observation
    The grid as text, one row per line, symbols `#` wall, `_` empty, `O` target, `√` box on target, `X` box,
    `P` player, `S` player on target (or the 7 symbols given in `symbols`). With `render="grid+coords"` a line
    follows: `Player (P) is at (4,3); box (X) is at (3,3); target (O) is at (1,4).` (zero-indexed (row,col),
    plural clauses listing cells in row-major order; a box on a target is listed as a box and as a target).

    ## Rewards
    −0.1 per valid action, +1 when a box is pushed onto a target, −1 when one is pushed off, +10 when every
    box is on a target. An invalid action gets 0 and changes nothing.

    ## Episode end
    Terminated when every box is on a target. Never truncated by the env (the agent's action budget is the
    rollout's business; wrap with `gymnasium.wrappers.TimeLimit` for a step limit).

    ## Arguments
    `dim` (rows, cols) of the grid including the outer walls, default (6, 6); `num_boxes`, default 1;
    `min_moves`/`max_moves`, the range of the optimal solution length of generated levels (default 1..10,
    so every level is solvable within the paper's 10-action budget; `max_moves=None` for no limit);
    `symbols`; `actions`; `render` (`grid` or `grid+coords`); `render_mode` (`ansi` or None).

    `reset` info has `optimal_moves`, the optimal solution length (None for an unsolvable custom layout).
    """

    def __init__(self, dim: Sequence[int] = (6, 6), num_boxes: int = 1, render: str = "grid",
                 min_moves: int = 1, max_moves: int | None = 10, symbols: str = DEFAULT_SYMBOLS,
                 actions: Sequence[str] = DEFAULT_ACTIONS, render_mode: str | None = None) -> None:
        if len(symbols) != 7 or len(set(symbols)) != 7 or any(ch.isspace() for ch in symbols):
            raise SpaError(f"Sokoban symbols must be 7 distinct non-space characters "
                           f"(wall, empty, target, box on target, box, player, player on target), got {symbols!r}")
        super().__init__(render=render, render_mode=render_mode, extra_symbols=symbols)
        try:
            rows, cols = (int(x) for x in dim)
        except (TypeError, ValueError):
            raise SpaError(f"Sokoban dim must be (rows, cols), got {dim!r}") from None
        if rows < 3 or cols < 3 or rows * cols > 40_000:
            raise SpaError(f"Sokoban dim must be at least 3x3 (the outer walls included), got {rows}x{cols}")
        if not isinstance(num_boxes, int) or num_boxes < 1 or num_boxes > (rows - 2) * (cols - 2) - 2:
            raise SpaError(f"num_boxes must be between 1 and {(rows - 2) * (cols - 2) - 2} for a {rows}x{cols} "
                           f"room, got {num_boxes!r}")
        if min_moves < 1 or (max_moves is not None and max_moves < min_moves):
            raise SpaError(f"need 1 <= min_moves <= max_moves, got min_moves={min_moves}, max_moves={max_moves}")
        names = [str(a) for a in actions]
        if len(names) != 4 or len({a.lower() for a in names}) != 4:
            raise SpaError(f"actions must be 4 distinct words (for up, down, left, right), got {actions!r}")
        self.dim = (rows, cols)
        self.num_boxes = num_boxes
        self.min_moves, self.max_moves = min_moves, max_moves
        self.symbols = symbols
        self._actions = names
        self._action_index = {a.lower(): d for d, a in enumerate(names)}
        self.room: Room | None = None
        self.player = -1
        self.boxes: frozenset[int] = frozenset()

    # ----------------------------------------------------------------- puzzle
    def _generate(self) -> dict:
        rows, cols = self.dim
        self.room, self.player, self.boxes, n = generate(self.np_random, rows, cols, self.num_boxes,
                                                         self.min_moves, self.max_moves)
        return {"optimal_moves": n}

    def _load_layout(self, text: str) -> dict:
        lines = layout_lines(text, "Sokoban")
        cols = len(lines[0])
        wall, empty, target, box_t, box, player, player_t = self.symbols
        floor, targets, boxes, players = set(), set(), set(), []
        for r, line in enumerate(lines):
            if len(line) != cols:
                raise LayoutError(f"Sokoban layout line {r + 1} has {len(line)} characters, expected {cols} "
                                  f"(every row must be as wide as the first)")
            for c, ch in enumerate(line):
                i = r * cols + c
                if ch not in self.symbols:
                    raise LayoutError(f"Sokoban layout line {r + 1}, character {c + 1}: unexpected {ch!r}; "
                                      f"the symbols are {' '.join(self.symbols)}")
                if ch != wall:
                    floor.add(i)
                if ch in (target, box_t, player_t):
                    targets.add(i)
                if ch in (box, box_t):
                    boxes.add(i)
                if ch in (player, player_t):
                    players.append(i)
        if len(players) != 1:
            raise LayoutError(f"Sokoban layout needs exactly one player ({player} or {player_t}), found {len(players)}")
        if not boxes or len(boxes) != len(targets):
            raise LayoutError(f"Sokoban layout needs as many boxes as targets and at least one, found "
                              f"{len(boxes)} boxes and {len(targets)} targets")
        self.room = Room.build(len(lines), cols, floor, targets)
        self.player, self.boxes = players[0], frozenset(boxes)
        plan = solve(self.room, self.player, self.boxes)
        return {"optimal_moves": None if plan is None else len(plan)}

    # ----------------------------------------------------------------- dynamics
    def _parse_action(self, text: str) -> int | None:
        if not isinstance(text, str):
            return None
        return self._action_index.get(text.strip().lower())

    def _apply(self, d: int) -> tuple[float, bool, bool]:
        assert self.room is not None
        moved = push(self.room, self.player, self.boxes, d)
        reward = STEP_PENALTY
        if moved is None:
            return reward, True, False
        self.player, self.boxes, delta = moved
        if delta > 0:
            reward += BOX_ON_TARGET
        elif delta < 0:
            reward += BOX_OFF_TARGET
        if self._is_success():
            reward += ALL_ON_TARGETS
        return round(reward, 6), True, True

    def _is_success(self) -> bool:
        return self.room is not None and self.boxes == self.room.targets

    _is_terminal = _is_success

    def _get_state(self) -> tuple[Room | None, int, frozenset[int]]:
        return (self.room, self.player, self.boxes)

    def _set_state(self, state: tuple[Room, int, frozenset[int]]) -> None:
        self.room, self.player, self.boxes = state

    # ----------------------------------------------------------------- text
    @property
    def action_names(self) -> list[str]:
        return list(self._actions)

    def rules(self, render: str) -> list[str]:
        wall, empty, target, box_t, box, player, player_t = self.symbols
        lines = [
            "You are solving the Sokoban puzzle. You are the player and you need to push all boxes to targets. "
            "When you are right next to a box, you can push it by moving in the same direction. You cannot push a "
            "box through a wall, and you cannot pull a box.",
            "The meaning of each symbol in the state is:",
            f"{wall}: wall, {empty}: empty, {target}: target, {box_t}: box on target, {box}: box, "
            f"{player}: player, {player_t}: player on target",
        ]
        if render == "grid+coords":
            lines.append("After the grid, a line gives the (row,col) positions of the player, boxes and targets, "
                         "counted from (0,0) at the top-left.")
        return lines

    def listed_actions(self) -> list[str]:
        """The action words in a fixed order, so that a permuted vocabulary is not given away."""
        order = {w.lower(): i for i, w in enumerate(DEFAULT_ACTIONS)}
        return sorted(self.action_names, key=lambda w: order.get(w.lower(), 99))

    def _rc(self, i: int) -> tuple[int, int]:
        assert self.room is not None
        return divmod(i, self.room.cols)

    def grid_text(self) -> str:
        room = self.room
        assert room is not None
        wall, empty, target, box_t, box, player, player_t = self.symbols
        out = []
        for r in range(room.rows):
            row = []
            for c in range(room.cols):
                i = r * room.cols + c
                on_t = i in room.targets
                if i not in room.floor:
                    row.append(wall)
                elif i == self.player:
                    row.append(player_t if on_t else player)
                elif i in self.boxes:
                    row.append(box_t if on_t else box)
                else:
                    row.append(target if on_t else empty)
            out.append("".join(row))
        return "\n".join(out)

    def coords_text(self) -> str:
        assert self.room is not None
        _, _, target, _, box, player, _ = self.symbols
        pr, pc = self._rc(self.player)
        boxes = [self._rc(i) for i in sorted(self.boxes)]
        targets = [self._rc(i) for i in sorted(self.room.targets)]
        return (f"Player ({player}) is at ({pr},{pc}); {entity_clause('box', 'boxes', box, boxes)}; "
                f"{entity_clause('target', 'targets', target, targets)}.")

    def solve(self) -> list[str] | None:
        assert self.room is not None
        plan = solve(self.room, self.player, self.boxes)
        return None if plan is None else [self._actions[d] for d in plan]
