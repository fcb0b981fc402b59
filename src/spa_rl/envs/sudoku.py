"""Sudoku (4×4 by default) as a text environment, with a generator of uniquely solvable puzzles.

No maintained library generates small Sudokus with a guaranteed unique solution from a seeded generator,
so the generator is here: fill a grid by randomised backtracking, then blank cells in random order, keeping
a blank only while the puzzle still has exactly one solution (counted by a bitmask backtracking solver).

This module must never use any randomness but the env's own generator.
"""

from __future__ import annotations

import math
import re

import numpy as np

from spa_rl.envs.base import PuzzleEnv, join_coords, layout_lines
from spa_rl.errors import LayoutError, SpaError

_MOVE = re.compile(r"^\s*\(?\s*(\d+)\s*,\s*(\d+)\s*,\s*(\d+)\s*\)?\s*$")


class Grid:
    """Row, column and box bookkeeping of an n×n Sudoku (n = k², cells row-major, 0 = empty)."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.k = math.isqrt(n)
        self.full = (1 << (n + 1)) - 2  # bits 1..n

    def box(self, i: int) -> int:
        r, c = divmod(i, self.n)
        return (r // self.k) * self.k + c // self.k

    def masks(self, cells: list[int]) -> tuple[list[int], list[int], list[int]] | None:
        """Used-value bitmasks per row, column and box; None if two equal values already clash."""
        rows, cols, boxes = [0] * self.n, [0] * self.n, [0] * self.n
        for i, v in enumerate(cells):
            if v:
                r, c, b, bit = i // self.n, i % self.n, self.box(i), 1 << v
                if (rows[r] | cols[c] | boxes[b]) & bit:
                    return None
                rows[r] |= bit
                cols[c] |= bit
                boxes[b] |= bit
        return rows, cols, boxes

    def solutions(self, cells: list[int], limit: int = 2, rng: np.random.Generator | None = None) -> list[list[int]]:
        """Up to `limit` completions of `cells` (values tried in random order when `rng` is given)."""
        m = self.masks(cells)
        if m is None:
            return []
        rows, cols, boxes = m
        cells = list(cells)
        found: list[list[int]] = []
        n = self.n

        def search() -> None:
            best, best_free, best_count = -1, 0, n + 1
            for i, v in enumerate(cells):
                if v == 0:
                    free = self.full & ~(rows[i // n] | cols[i % n] | boxes[self.box(i)])
                    count = free.bit_count()
                    if count < best_count:
                        best, best_free, best_count = i, free, count
                        if count <= 1:
                            break
            if best < 0:
                found.append(list(cells))
                return
            values = [v for v in range(1, n + 1) if best_free >> v & 1]
            if rng is not None:
                values = [values[j] for j in rng.permutation(len(values))]
            r, c, b = best // n, best % n, self.box(best)
            for v in values:
                bit = 1 << v
                cells[best] = v
                rows[r] |= bit
                cols[c] |= bit
                boxes[b] |= bit
                search()
                rows[r] ^= bit
                cols[c] ^= bit
                boxes[b] ^= bit
                cells[best] = 0
                if len(found) >= limit:
                    return

        search()
        return found


def generate(rng: np.random.Generator, n: int, blanks: int,
             max_tries: int = 200) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(puzzle, solution) with exactly `blanks` empty cells and a unique solution."""
    grid = Grid(n)
    for _ in range(max_tries):
        solution = grid.solutions([0] * (n * n), limit=1, rng=rng)[0]
        puzzle = list(solution)
        removed = 0
        for i in rng.permutation(n * n):
            if removed == blanks:
                break
            keep = puzzle[i]
            puzzle[i] = 0
            if len(grid.solutions(puzzle, limit=2)) == 1:
                removed += 1
            else:
                puzzle[i] = keep
        if removed == blanks:
            return tuple(puzzle), tuple(solution)
    raise SpaError(f"could not generate a {n}x{n} Sudoku with {blanks} blanks and a unique solution: "
                   f"use fewer blanks")


class SudokuEnv(PuzzleEnv):
    """Sudoku: fill the grid so every row, column and box holds each value once.

    ## Action space
    One move per step as text `r,c,v` (1-indexed row, column, value; spaces and parentheses allowed, e.g.
    `(2, 3, 4)`). A move is invalid, and changes nothing, if the text does not parse, a number is out of range,
    the cell is not empty, or the value already appears in the cell's row, column or box.

    ## Observation
    One row per line, cells separated by single spaces, `.` for empty, e.g. `1 . 3 4`. With
    `render="grid+coords"` a line follows: `Empty cells are at (1,1), (1,2), (2,3).` (1-indexed, row-major;
    `Empty cell is at (r,c).` for one, `There are no empty cells.` for none).

    ## Rewards
    +1 when the last empty cell is filled (the board is then a correct solution, since every move obeys the
    rules), 0 otherwise.

    ## Episode end
    Terminated when the board is full. A board can reach a dead end (an empty cell with no legal value);
    the episode then runs until the agent's action budget is spent.

    ## Arguments
    `size` of the board, a square number, default 4 (boxes of 2×2); `blanks`, empty cells in a generated
    puzzle, default 6 (the puzzle always has exactly one solution; at most 12 for 4×4);
    `render` (`grid` or `grid+coords`); `render_mode` (`ansi` or None).
    """

    def __init__(self, blanks: int = 6, size: int = 4, render: str = "grid", render_mode: str | None = None) -> None:
        super().__init__(render=render, render_mode=render_mode)
        if size not in (4, 9):
            raise SpaError(f"Sudoku size must be 4 or 9, got {size!r}")
        max_blanks = 12 if size == 4 else 64
        if not isinstance(blanks, int) or not 1 <= blanks <= max_blanks:
            raise SpaError(f"Sudoku blanks must be an integer from 1 to {max_blanks} for size {size}, got {blanks!r}")
        self.size, self.blanks = size, blanks
        self._grid = Grid(size)
        self.given: tuple[int, ...] = ()
        self.board: tuple[int, ...] = ()
        self.solution: tuple[int, ...] | None = None

    def _generate(self) -> dict:
        self.given, self.solution = generate(self.np_random, self.size, self.blanks)
        self.board = self.given
        return {}

    def _load_layout(self, text: str) -> dict:
        lines = layout_lines(text, "Sudoku")
        n = len(lines)
        if n != self.size:
            raise LayoutError(f"Sudoku layout has {n} rows, expected {self.size}")
        cells: list[int] = []
        for r, line in enumerate(lines):
            tokens = [(m.start(), m.group()) for m in re.finditer(r"\S+", line)]
            if len(tokens) != n:
                raise LayoutError(f"Sudoku layout line {r + 1} has {len(tokens)} cells, "
                                  f"expected {n} separated by spaces")
            for pos, tok in tokens:
                if tok == ".":
                    cells.append(0)
                elif tok.isdigit() and 1 <= int(tok) <= n:
                    cells.append(int(tok))
                else:
                    raise LayoutError(f"Sudoku layout line {r + 1}, character {pos + 1}: unexpected {tok!r}; "
                                      f"use 1..{n} or '.'")
        if self._grid.masks(cells) is None:
            raise LayoutError("Sudoku layout repeats a value in a row, column or box")
        found = self._grid.solutions(cells, limit=2)
        if not found:
            raise LayoutError("Sudoku layout has no solution")
        self.given = self.board = tuple(cells)
        self.solution = tuple(found[0]) if len(found) == 1 else None
        return {"unique_solution": len(found) == 1}

    def _parse_action(self, text: str) -> tuple[int, int] | None:
        if not isinstance(text, str):
            return None
        m = _MOVE.match(text)
        if m is None:
            return None
        r, c, v = (int(x) for x in m.groups())
        n = self.size
        if not (1 <= r <= n and 1 <= c <= n and 1 <= v <= n):
            return None
        return (r - 1) * n + (c - 1), v

    def _apply(self, move: tuple[int, int]) -> tuple[float, bool, bool]:
        i, v = move
        if self.board[i]:
            return 0.0, False, False
        board = list(self.board)
        board[i] = v
        if self._grid.masks(board) is None:
            return 0.0, False, False
        self.board = tuple(board)
        return (1.0 if self._is_success() else 0.0), True, True

    def _is_success(self) -> bool:
        return bool(self.board) and all(self.board)

    _is_terminal = _is_success

    def _get_state(self) -> tuple:
        return (self.given, self.board, self.solution)

    def _set_state(self, state: tuple) -> None:
        self.given, self.board, self.solution = state

    @property
    def action_names(self) -> list[str]:
        return ["r,c,v"]

    def rules(self, render: str) -> list[str]:
        n, k = self.size, int(self.size ** 0.5)
        lines = [f"You are solving a {n}x{n} Sudoku. Fill every empty cell (.) with a number from 1 to {n} so that "
                 f"each row, each column and each {k}x{k} box contains every number exactly once.",
                 "An action is row,col,value with 1-indexed row and column: 2,3,4 writes 4 in row 2, column 3. "
                 "A move that breaks a rule or targets a filled cell is invalid and changes nothing."]
        if render == "grid+coords":
            lines.append("After the grid, a line gives the (row,col) positions of the empty cells, counted from "
                         "(1,1) at the top-left.")
        return lines

    def listed_actions(self) -> None:
        return None  # the rules explain the action pattern

    def random_action(self, rng: np.random.Generator) -> str:
        """A uniformly random value for a uniformly random empty cell (it sees which cells are blank, not which
        values are legal)."""
        n = self.size
        empty = [i for i, v in enumerate(self.board) if v == 0] or list(range(n * n))
        i = empty[int(rng.integers(len(empty)))]
        return f"{i // n + 1},{i % n + 1},{int(rng.integers(1, n + 1))}"

    def grid_text(self) -> str:
        n = self.size
        return "\n".join(" ".join(str(v) if v else "." for v in self.board[r * n:(r + 1) * n]) for r in range(n))

    def coords_text(self) -> str:
        empty = [(i // self.size + 1, i % self.size + 1) for i, v in enumerate(self.board) if v == 0]
        if not empty:
            return "There are no empty cells."
        if len(empty) == 1:
            return f"Empty cell is at {join_coords(empty)}."
        return f"Empty cells are at {join_coords(empty)}."

    def solve(self) -> list[str] | None:
        found = self._grid.solutions(list(self.board), limit=1)
        if not found:
            return None
        n = self.size
        return [f"{i // n + 1},{i % n + 1},{found[0][i]}" for i, v in enumerate(self.board) if v == 0]
