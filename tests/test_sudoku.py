from __future__ import annotations

import pytest

from spa_rl.envs.sudoku import Grid
from spa_rl.errors import LayoutError


def _valid_full(board, n=4):
    grid = Grid(n)
    return all(board) and grid.masks(list(board)) is not None


@pytest.mark.parametrize("name,blanks", [("sudoku", 6), ("sudoku-hard", 10)])
def test_generated_puzzles_have_exactly_one_solution(make, name, blanks):
    env = make(name)
    grid = Grid(4)
    for seed in range(300):
        env.reset(seed=seed)
        assert env.board.count(0) == blanks
        sols = grid.solutions(list(env.board), limit=3)
        assert len(sols) == 1 and tuple(sols[0]) == env.solution
        assert _valid_full(env.solution)
        assert all(g == 0 or g == s for g, s in zip(env.board, env.solution, strict=True))


@pytest.mark.parametrize("holes", [
    (0, 1, 4, 5, 10, 11, 14, 15),
    (0, 1, 8, 9),            # a "deadly rectangle": two solutions
    (0, 1, 8, 9, 3, 6, 12, 15),
    (2, 3, 6, 7, 9, 12, 13),
])
def test_solution_counter_matches_brute_force(holes):
    import itertools

    grid = Grid(4)
    full = [1, 2, 3, 4, 3, 4, 1, 2, 2, 1, 4, 3, 4, 3, 2, 1]
    blanked = [0 if i in holes else v for i, v in enumerate(full)]
    brute = 0
    for values in itertools.product(range(1, 5), repeat=len(holes)):
        cand = list(blanked)
        for i, v in zip(holes, values, strict=True):
            cand[i] = v
        brute += grid.masks(cand) is not None
    assert brute >= 1
    assert len(grid.solutions(blanked, limit=100)) == brute


def test_render_and_moves(make):
    env = make("sudoku", render="grid+coords")
    obs, _ = env.reset(options={"layout": "1 2 3 4\n3 4 1 2\n2 1 . 3\n4 3 . ."})
    assert obs == "1 2 3 4\n3 4 1 2\n2 1 . 3\n4 3 . .\nEmpty cells are at (3,3), (4,3), (4,4)."
    for bad in ("3,3,3", "1,1,1", "5,1,1", "3,3", "x", "3,3,0", ""):
        obs2, r, term, _, info = env.step(bad)
        assert obs2 == obs and r == 0 and not info["action_is_valid"] and not term, bad
    obs, r, term, _, info = env.step("(3, 3, 4)")
    assert info["action_is_valid"] and info["action_is_effective"] and r == 0 and not term
    obs, r, term, _, info = env.step("4,3,2")
    assert obs.splitlines()[-1] == "Empty cell is at (4,4)."
    obs, r, term, _, info = env.step("4,4,1")
    assert (r, term, info["success"]) == (1.0, True, True)
    assert obs.splitlines()[-1] == "There are no empty cells."


def test_solve_fills_every_blank(make):
    env = make("sudoku-hard")
    for seed in range(50):
        env.reset(seed=seed)
        for move in env.solve():
            _, _, term, _, info = env.step(move)
        assert term and info["success"] and _valid_full(env.board)


def test_nine_by_nine(make):
    env = make("sudoku", size=9, blanks=30)
    obs, _ = env.reset(seed=0)
    assert len(obs.splitlines()) == 9 and env.board.count(0) == 30
    assert len(Grid(9).solutions(list(env.board), limit=2)) == 1


@pytest.mark.parametrize("layout,where", [
    ("1 2 3 4\n3 4 1 2\n2 1 x 3\n4 3 . .", "line 3, character 5"),
    ("1 2 3 4\n3 4 1 2\n2 1 . 3", "3 rows"),
    ("1 2 3 4\n3 4 1\n2 1 . 3\n4 3 . .", "line 2 has 3 cells"),
    ("1 1 3 4\n3 4 . 2\n2 . . 3\n4 3 . .", "repeats a value"),
])
def test_malformed_layouts(make, layout, where):
    with pytest.raises(LayoutError, match=where):
        make("sudoku").reset(options={"layout": layout})
