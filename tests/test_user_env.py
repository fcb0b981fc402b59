"""An environment a user writes and registers works through collect, SFT and eval without touching spa-rl:
everything the agent needs (its rules, its actions, a random action) comes from the env class."""

from __future__ import annotations

import json

import pytest
from conftest import collect_data, register_corridors

from spa_rl import envs
from spa_rl.cli import main
from spa_rl.evaluation import EvalConfig, evaluate
from spa_rl.io import read_jsonl
from spa_rl.sft import SFTConfig, train_sft


@pytest.fixture(scope="module", autouse=True)
def corridor():
    register_corridors()
    yield
    envs.VARIANTS.pop("corridor", None)
    envs.VARIANTS.pop("corridor-right", None)


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
