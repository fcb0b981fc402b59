from __future__ import annotations

import pytest

from spa_rl.envs.sokoban import Room, reverse_distances, solve
from spa_rl.errors import LayoutError

PAPER = "######\n#___O#\n#____#\n###X_#\n###P_#\n######"


def test_paper_example_render_exact(make):
    env = make("sokoban", render="grid+coords")
    obs, info = env.reset(options={"layout": PAPER})
    assert obs == PAPER + "\nPlayer (P) is at (4,3); box (X) is at (3,3); target (O) is at (1,4)."
    assert info["optimal_moves"] == len(env.solve())
    env_grid = make("sokoban", render="grid")
    assert env_grid.reset(options={"layout": PAPER})[0] == PAPER


def test_layout_accepts_its_own_coords_render(make):
    env = make("sokoban", render="grid+coords")
    obs, _ = env.reset(seed=5)
    again, _ = make("sokoban", render="grid+coords").reset(options={"layout": obs})
    assert again == obs


def test_plural_clauses_row_major_and_box_on_target_listed_twice(make):
    env = make("sokoban", render="grid+coords", dim=(6, 7), num_boxes=3)
    layout = "#######\n#_O__√#\n#_X___#\n#PX_O_#\n#_____#\n#######"
    obs, _ = env.reset(options={"layout": layout})
    assert obs.splitlines()[-1] == ("Player (P) is at (3,1); boxes (X) are at (1,5), (2,2), (3,2); "
                                    "targets (O) are at (1,2), (1,5), (3,4).")


def test_push_rules_and_rewards(make):
    env = make("sokoban", dim=(5, 7), num_boxes=2)
    env.reset(options={"layout": "#######\n#__X_O#\n#P_X_O#\n#__#__#\n#######"})
    # into a wall: valid, not effective, step penalty
    _, r, term, _, info = env.step("Left")
    assert (r, term, info["action_is_valid"], info["action_is_effective"]) == (-0.1, False, True, False)
    env.step("Right")
    obs, r, _, _, info = env.step("right")  # push a box along the floor
    assert r == -0.1 and info["action_is_effective"]
    assert obs.splitlines()[2] == "#__PXO#"
    obs, r, term, _, _ = env.step("RIGHT")  # onto its target: +1 - 0.1, one box still off
    assert r == pytest.approx(0.9) and not term
    assert obs.splitlines()[2] == "#___P√#"
    obs2, r, _, _, info = env.step(" Right ")  # box against the wall: nothing moves
    assert obs2 == obs and r == -0.1 and not info["action_is_effective"]
    for a in ("Up", "Down", "Left", "Left", "Up", "Right"):
        obs, r, term, _, _ = env.step(a)
    assert obs.splitlines()[1] == "#__PXO#" and not term
    obs, r, term, _, info = env.step("Right")  # last box on target: +1 +10 -0.1
    assert r == pytest.approx(10.9) and term and info["success"]
    assert obs == "#######\n#___P√#\n#____√#\n#__#__#\n#######"


def test_box_against_box_blocks(make):
    env = make("sokoban", dim=(3, 6), num_boxes=2)
    obs, _ = env.reset(options={"layout": "######\n#PXXO√\n######".replace("√", "O")})
    assert obs == "######\n#PXXOO\n######"
    obs2, r, _, _, info = env.step("Right")
    assert obs2 == obs and info["action_is_valid"] and not info["action_is_effective"] and r == -0.1


def test_box_onto_target_and_off_again_rewards(make):
    env = make("sokoban", dim=(3, 7), num_boxes=1)
    env.reset(options={"layout": "#######\n#PX_O_#\n#######"})
    assert env.step("Right")[1] == pytest.approx(-0.1)          # box to (1,3)
    obs, r, term, _, info = env.step("Right")                    # box onto target: +1 +10 -0.1, solved
    assert r == pytest.approx(10.9) and term and info["success"]
    assert obs == "#######\n#__P√_#\n#######"
    # after the end every action is invalid and changes nothing
    obs2, r, term, _, info = env.step("Right")
    assert obs2 == obs and r == 0 and term and not info["action_is_valid"]


def test_box_off_target_penalty_and_player_on_target_symbol(make):
    env = make("sokoban", dim=(4, 7), num_boxes=2)
    env.reset(options={"layout": "#######\n#P√__X#\n#____O#\n#######"})
    obs, r, term, _, _ = env.step("Right")  # pushes the box off its target, player now stands on it
    assert r == pytest.approx(-1.1) and not term
    assert obs.splitlines()[1] == "#_SX_X#"


@pytest.mark.parametrize("name,seeds", [("sokoban", range(400)), ("sokoban-10x10-2box", range(200))])
def test_every_generated_puzzle_is_solved_optimally_by_bfs(make, name, seeds):
    env = make(name)
    for seed in seeds:
        _, info = env.reset(seed=seed)
        n = info["optimal_moves"]
        assert 1 <= n <= 10
        assert not (env.boxes & env.room.targets), "boxes start off their targets"
        plan = env.solve()
        assert plan is not None and len(plan) == n, f"seed {seed}: generator says {n}, BFS says {plan}"
        for action in plan:
            _, _, term, _, info = env.step(action)
        assert term and info["success"]


def test_reverse_distances_equal_forward_bfs_on_every_state():
    room = Room.build(5, 6, {7, 8, 9, 10, 13, 14, 15, 16, 19, 20, 21}, {8})
    dist = reverse_distances(room, max_moves=None)
    assert len(dist) > 20
    for (player, boxes), n in dist.items():
        plan = solve(room, player, boxes)
        assert plan is not None and len(plan) == n


def test_unsolvable_layout_reports_none(make):
    env = make("sokoban")
    _, info = env.reset(options={"layout": "######\n#X___#\n#P__O#\n######"})  # box stuck in a corner
    assert info["optimal_moves"] is None and env.solve() is None


def test_altvocab_and_permuted_actions(make):
    alt = make("sokoban-altvocab", render="grid+coords")
    obs, _ = alt.reset(seed=1)
    ref = make("sokoban", render="grid+coords")
    obs_ref, _ = ref.reset(seed=1)
    table = str.maketrans("#_O√XPS", "W.GCBA@")
    assert obs.splitlines()[:-1] == obs_ref.translate(table).splitlines()[:-1]
    assert obs.splitlines()[-1].startswith("Player (A) is at")
    perm = make("sokoban-permuted-actions")
    perm.reset(options={"layout": "#####\n#___#\n#_P_#\n#_XO#\n#####"})
    perm.step("Right")  # the word "Right" moves up
    assert perm.player == 1 * 5 + 2


@pytest.mark.parametrize("layout,where", [
    ("#####\n#P?O#\n#####", "line 2, character 3"),
    ("#####\n#PXO#\n####", "line 3 has 4 characters"),
    ("#####\n#_XO#\n#####", "exactly one player"),
    ("#####\n#PXX#\n#O__#\n#####", "as many boxes as targets"),
    ("", "empty"),
])
def test_malformed_layouts_say_where(make, layout, where):
    env = make("sokoban")
    with pytest.raises(LayoutError, match=where):
        env.reset(options={"layout": layout})
