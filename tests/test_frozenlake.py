from __future__ import annotations

import numpy as np
import pytest
from gymnasium.envs.toy_text.frozen_lake import FrozenLakeEnv as GymFrozenLake

from spa_rl.envs.frozenlake import ACTIONS, connected
from spa_rl.errors import LayoutError


def test_render_exact_and_coords(make):
    env = make("frozenlake-det", render="grid+coords")
    layout = "_O__\nO___\nG___\n__P_"
    obs, _ = env.reset(options={"layout": layout})
    assert obs == layout + "\nPlayer (P) is at (3,2); holes (O) are at (0,1), (1,0); goal (G) is at (2,0)."
    assert env.desc == ("FHFF", "HFFF", "GFFF", "FFSF")


def test_player_in_hole_and_on_goal_symbols(make):
    env = make("frozenlake-det", render="grid+coords")
    env.reset(options={"layout": "P_\nOG"})
    obs, r, term, _, info = env.step("Down")
    assert obs == "__\nXG\nPlayer (P) is at (1,0); hole (O) is at (1,0); goal (G) is at (1,1)."
    assert (r, term, info["success"]) == (0.0, True, False)
    env.reset(options={"layout": "P_\nOG"})
    env.step("Right")
    obs, r, term, _, info = env.step("down")
    assert obs.splitlines()[:2] == ["__", "O√"] and (r, term, info["success"]) == (1.0, True, True)


def test_start_tile_shows_as_frozen_and_edge_moves_are_not_effective(make):
    env = make("frozenlake-det")
    env.reset(options={"layout": "P__\n___\n__G"})
    obs, _, _, _, info = env.step("Up")
    assert info["action_is_valid"] and not info["action_is_effective"]
    obs, _, _, _, _ = env.step("Right")
    assert obs == "_P_\n___\n__G"


@pytest.mark.parametrize("name", ["frozenlake", "frozenlake-det", "frozenlake-6x6"])
def test_dynamics_identical_to_gymnasium(make, name):
    """Same map, same generator state, same actions: same positions, rewards and terminations."""
    env = make(name)
    rng = np.random.default_rng(0)
    for seed in range(40):
        env.reset(seed=seed)
        ref = GymFrozenLake(desc=list(env.desc), is_slippery=env.slippery)
        ref.reset(seed=0)
        ref.s = env.position
        ref.np_random.bit_generator.state = env.np_random.bit_generator.state
        for _ in range(30):
            a = int(rng.integers(4))
            _, r, term, _, _ = env.step(ACTIONS[a])
            s_ref, r_ref, term_ref, _, _ = ref.step(a)
            assert (env.position, r, term) == (s_ref, r_ref, term_ref)
            if term:
                break


def test_generated_maps_have_random_start_goal_and_a_path(make):
    env = make("frozenlake")
    starts, goals = set(), set()
    for seed in range(300):
        env.reset(seed=seed)
        flat = "".join(env.desc)
        assert flat.count("S") == 1 and flat.count("G") == 1
        frozen = np.array([[t != "H" for t in row] for row in env.desc])
        assert connected(frozen, flat.index("S"), flat.index("G"))
        starts.add(flat.index("S"))
        goals.add(flat.index("G"))
    assert len(starts) > 10 and len(goals) > 10


def test_solver_plan_reaches_goal_when_not_slippery(make):
    env = make("frozenlake-6x6-det")
    for seed in range(100):
        env.reset(seed=seed)
        for a in env.solve():
            _, _, term, _, info = env.step(a)
        assert term and info["success"]


def test_slippery_optimal_policy_beats_following_the_plan(make):
    env = make("frozenlake")

    def success_rate(use_policy: bool) -> float:
        wins = 0
        for seed in range(300):
            env.reset(seed=seed)
            for _ in range(30):
                action = env.optimal_action() if use_policy else (env.solve() or ["Up"])[0]
                _, _, term, _, info = env.step(action)
                if term:
                    break
            wins += info["success"]
        return wins / 300

    assert success_rate(True) > success_rate(False) + 0.05


@pytest.mark.parametrize("layout,where", [
    ("P_\n_Q", "line 2, character 2"),
    ("P__\n_G", "line 2 has 2 characters"),
    ("__\n_G", "no player"),
    ("PP\n_G", "second player"),
    ("P_\n__", "exactly one goal"),
])
def test_malformed_layouts(make, layout, where):
    with pytest.raises(LayoutError, match=where):
        make("frozenlake").reset(options={"layout": layout})
