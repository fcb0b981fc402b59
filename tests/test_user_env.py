"""An environment a user writes and registers works through collect, SFT and eval without touching spa-rl:
everything the agent needs (its rules, its actions, a random action) comes from the env class."""

from __future__ import annotations

import json

import gymnasium as gym
import pytest
from conftest import collect_data

from spa_rl import envs
from spa_rl.cli import main
from spa_rl.envs.base import PuzzleEnv, layout_lines
from spa_rl.errors import LayoutError
from spa_rl.evaluation import EvalConfig, evaluate
from spa_rl.io import read_jsonl
from spa_rl.sft import SFTConfig, train_sft


class CorridorEnv(PuzzleEnv):
    """Walk along a corridor to the goal.

    Actions: `Left`, `Right`. Observation: the corridor as one line, `P` player, `G` goal, `_` floor.
    Reward: +1 on reaching the goal, which ends the episode. Arguments: `length`, `render`.
    """

    def __init__(self, length: int = 5, render: str = "grid", render_mode: str | None = None) -> None:
        super().__init__(render=render, render_mode=render_mode)
        self.length = length
        self.player = self.goal = 0

    def _generate(self) -> dict:
        self.player, self.goal = (int(x) for x in self.np_random.choice(self.length, 2, replace=False))
        return {"optimal_moves": abs(self.goal - self.player)}

    def _load_layout(self, text: str) -> dict:
        (line,) = layout_lines(text, "corridor")
        if line.count("P") != 1 or line.count("G") != 1:
            raise LayoutError("a corridor needs one P and one G")
        self.length, self.player, self.goal = len(line), line.index("P"), line.index("G")
        return {}

    def _parse_action(self, text: str) -> int | None:
        return {"left": -1, "right": 1}.get(str(text).strip().lower())

    def _apply(self, d: int) -> tuple[float, bool, bool]:
        new = min(max(self.player + d, 0), self.length - 1)
        moved, self.player = new != self.player, new
        return (1.0 if self.player == self.goal else 0.0), True, moved

    def _is_success(self) -> bool:
        return self.player == self.goal

    def _is_terminal(self) -> bool:
        return self._is_success()

    def _get_state(self) -> tuple[int, int, int]:
        return self.length, self.player, self.goal

    def _set_state(self, state: tuple[int, int, int]) -> None:
        self.length, self.player, self.goal = state

    def grid_text(self) -> str:
        return "".join("P" if i == self.player else "G" if i == self.goal else "_" for i in range(self.length))

    def coords_text(self) -> str:
        return f"Player (P) is at (0,{self.player}); goal (G) is at (0,{self.goal})."

    def solve(self) -> list[str] | None:
        step = "Right" if self.goal > self.player else "Left"
        return [step] * abs(self.goal - self.player)

    @property
    def action_names(self) -> list[str]:
        return ["Left", "Right"]

    def rules(self, render: str) -> list[str]:
        return ["You are in a corridor. Walk to the goal G. P: player, G: goal, _: floor."]


@pytest.fixture(scope="module", autouse=True)
def corridor():
    if "test/Corridor-v0" not in gym.registry:
        gym.register(id="test/Corridor-v0", entry_point=CorridorEnv)
    envs.register_variant(envs.Variant("corridor", "test/Corridor-v0", "a corridor (defined in a test)",
                                       {"length": 5}, max_turns=3, max_actions_per_turn=2,
                                       max_actions_per_episode=6), overwrite=True)
    yield
    envs.VARIANTS.pop("corridor", None)


def test_the_env_writes_its_own_instruction():
    env = envs.make("corridor").unwrapped
    text = env.instruction("grid", 2)
    assert text.startswith("You are in a corridor.") and "Your available actions are:\nLeft, Right" in text
    import numpy as np

    assert env.random_action(np.random.default_rng(0)) in ("Left", "Right")


def test_collect_sft_and_eval_run_on_a_user_env(tmp_path, tiny_model_dir):
    stats = collect_data("corridor", tmp_path / "data", policy="solver", puzzles=6, samples=1, val_fraction=0.0)
    rows = read_jsonl(tmp_path / "data" / "train.jsonl")
    assert stats.trajectories == 6 and rows and all(r["meta"]["env"] == "corridor" for r in rows)
    assert "P" in rows[0]["meta"]["state_before"] and "You are in a corridor" in rows[0]["prompt"][1]["content"]
    collect_data("corridor", tmp_path / "random", policy="random", puzzles=2, samples=2)
    result = train_sft(SFTConfig.make(data=str(tmp_path / "data"), out=str(tmp_path / "sft"), model=str(tiny_model_dir),
                                      epochs=1, tensorboard=False, dtype="fp32", env="corridor"), quiet=True)
    assert result["steps"] >= 1
    solver = evaluate(EvalConfig.make(env="corridor", policy="solver", puzzles=4, samples=2), quiet=True)
    assert solver["pass@1"] == 1.0 and solver["prediction_exact"] == 1.0
    model = evaluate(EvalConfig.make(env="corridor", model=str(tmp_path / "sft" / "model"), puzzles=2, samples=2,
                                     max_new_tokens=8), quiet=True)
    assert model["episodes"] == 4 and model["mean_response_tokens"] > 0


def test_the_cli_knows_a_registered_env(tmp_path, capsys):
    assert main(["eval", "--env", "corridor", "--policy", "solver", "--puzzles", "2", "--samples", "1",
                 "--out", str(tmp_path / "e")]) == 0
    assert json.loads((tmp_path / "e" / "metrics.json").read_text())["pass@1"] == 1.0
    assert main(["env", "show", "corridor", "--seed", "1"]) == 0
    assert "optimal solution" in capsys.readouterr().out
