"""`spa train`'s settings: which puzzles each step plays, and settings that cannot work together."""

from __future__ import annotations

import pytest

from spa_rl.errors import SpaError
from spa_rl.rl.config import RLConfig


def test_fresh_puzzles_every_step_by_default_and_a_cycled_pool_on_request():
    fresh = RLConfig.make(out="x", keep_ratio=1, minibatch_size=24, puzzles_per_step=3, first_seed=10)
    assert [fresh.step_seeds(s) for s in range(3)] == [[10, 11, 12], [13, 14, 15], [16, 17, 18]]
    pool = RLConfig.make(out="x", keep_ratio=1, minibatch_size=24, puzzles_per_step=3, first_seed=10, puzzle_pool=4)
    assert [pool.step_seeds(s) for s in range(4)] == [[10, 11, 12], [13, 10, 11], [12, 13, 10], [11, 12, 13]]
    assert all(len(set(pool.step_seeds(s))) == 3 for s in range(20)), "a step never plays a puzzle twice"


def test_a_pool_smaller_than_a_step_is_refused():
    with pytest.raises(SpaError, match=r"puzzle_pool \(2\) is smaller than puzzles_per_step \(3\)"):
        RLConfig.make(out="x", keep_ratio=1, minibatch_size=24, puzzles_per_step=3, puzzle_pool=2)
