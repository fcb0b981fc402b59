"""The contract every environment shares: gymnasium API, seeding, snapshots, robustness, the registry."""

from __future__ import annotations

import json
import subprocess
import sys
import warnings

import gymnasium as gym
import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from spa_rl import envs
from spa_rl.envs.sokoban import push
from spa_rl.envs.sudoku import Grid
from spa_rl.errors import SpaError, UnknownNameError

ALL = list(envs.VARIANTS)


@pytest.mark.parametrize("env_id", list(envs.ENV_CLASSES))
@pytest.mark.parametrize("render", envs.RENDERS)
def test_check_env_passes_without_warnings(env_id, render):
    env = gym.make(env_id, render=render, render_mode="ansi")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_env(env.unwrapped, skip_render_check=False)


def test_same_seed_same_puzzle_in_a_fresh_process():
    code = ("import json; from spa_rl import envs\n"
            "print(json.dumps({n: [envs.make(n, render='grid+coords').reset(seed=s)[0] for s in (0, 7, 123456)]"
            " for n in envs.VARIANTS}))")
    outs = [json.loads(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                      check=True).stdout) for _ in range(2)]
    here = {n: [envs.make(n, render="grid+coords").reset(seed=s)[0] for s in (0, 7, 123456)] for n in envs.VARIANTS}
    assert outs[0] == outs[1] == here
    assert len({obs for obs in here["sokoban"]}) == 3, "different seeds give different puzzles"


@pytest.mark.parametrize("name", ALL)
def test_snapshot_restore_replays_exactly(name):
    """Restoring a snapshot brings back puzzle, state and random generator: the same actions replay the same."""
    env = envs.make(name, render="grid+coords").unwrapped
    rng = np.random.default_rng(1)
    for seed in range(10):
        env.reset(seed=seed)
        for _ in range(int(rng.integers(0, 4))):
            env.step(env.random_action(rng))
        snap, obs_at_snap = env.snapshot(), env.render_text()
        actions = [env.random_action(rng) for _ in range(8)]
        first = [env.step(a) for a in actions]
        env.reset(seed=seed + 1000)  # somewhere else entirely
        assert env.restore(snap) == obs_at_snap
        again = [env.step(a) for a in actions]
        assert again == first


@pytest.mark.parametrize("name", ALL)
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.text(max_size=40))
def test_any_action_text_is_safe(name, text):
    env = envs.make(name).unwrapped
    obs, _ = env.reset(seed=3)
    snap = env.snapshot()
    obs2, reward, terminated, truncated, info = env.step(text)
    assert isinstance(obs2, str) and isinstance(reward, float) and not truncated
    if not info["action_is_valid"]:
        assert obs2 == obs and reward == 0.0 and not info["action_is_effective"]
        assert env.snapshot().state == snap.state


@settings(max_examples=200, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), moves=st.lists(st.integers(0, 3), max_size=40))
def test_sokoban_invariants(seed, moves):
    env = envs.make("sokoban").unwrapped
    env.reset(seed=seed)
    room = env.room
    for d in moves:
        before = (env.player, env.boxes)
        _, reward, term, _, info = env.step(env.action_names[d])
        assert len(env.boxes) == len(room.targets)                     # boxes are never lost or merged
        assert env.player in room.floor and env.boxes <= room.floor       # nobody walks into walls
        assert env.player not in env.boxes
        assert info["action_is_effective"] == ((env.player, env.boxes) != before)
        assert (push(room, *before, d) is None) == (not info["action_is_effective"])
        on = len(env.boxes & room.targets) - len(before[1] & room.targets)
        assert reward == pytest.approx(-0.1 + on + (10 if info["success"] else 0))
        if term:
            break


@settings(max_examples=200, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), moves=st.lists(st.text(alphabet="1234,", max_size=6), max_size=30))
def test_sudoku_invariants(seed, moves):
    env = envs.make("sudoku").unwrapped
    env.reset(seed=seed)
    given_cells = env.given
    for m in moves:
        _, _, term, _, info = env.step(m)
        assert all(g == 0 or g == b for g, b in zip(given_cells, env.board, strict=True))  # givens never change
        assert Grid(4).masks(list(env.board)) is not None                                 # never breaks a rule
        if term:
            assert info["success"] and all(env.board)
            break


@settings(max_examples=100, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), size=st.integers(2, 8), p=st.floats(0.3, 1.0),
       moves=st.lists(st.integers(0, 3), max_size=30))
def test_frozenlake_invariants(seed, size, p, moves):
    env = envs.make("frozenlake", size=size, p=p).unwrapped
    obs, _ = env.reset(seed=seed)
    assert obs.count("P") == 1 and obs.count("G") == 1 and env.solve() is not None
    for a in moves:
        obs, reward, term, _, info = env.step(env.action_names[a])
        assert 0 <= env.position < size * size
        assert reward == (1.0 if info["success"] else 0.0)
        if term:
            assert ("X" in obs) != info["success"]
            break


def test_registry_errors_and_overrides():
    with pytest.raises(UnknownNameError, match="valid names are sokoban, "):
        envs.make("sokobn")
    with pytest.raises(SpaError, match="has no option bogus"):
        envs.make("sokoban", bogus=1)
    with pytest.raises(SpaError, match="unknown render"):
        envs.make("sokoban", render="pixels")
    env = envs.make("sokoban", dim=(7, 7))
    assert len(env.reset(seed=0)[0].splitlines()) == 7
    assert envs.get_variant("sudoku").family == "sudoku"


def test_register_a_custom_variant():
    v = envs.Variant("sokoban-7x7-test", "spa/Sokoban-v0", "test", {"dim": (7, 7), "num_boxes": 2})
    envs.register_variant(v)
    try:
        assert envs.make("sokoban-7x7-test").unwrapped.num_boxes == 2
        with pytest.raises(SpaError, match="already exists"):
            envs.register_variant(v)
    finally:
        envs.VARIANTS.pop("sokoban-7x7-test")


def test_gym_make_by_id_and_step_before_reset():
    env = gym.make("spa/FrozenLake-v0", size=5, slippery=False, render="grid+coords")
    obs, _ = env.reset(seed=0)
    assert len(obs.splitlines()) == 6
    with pytest.raises(gym.error.ResetNeeded):
        envs.make("sokoban").unwrapped.step("Up")
