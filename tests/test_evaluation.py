"""`spa eval`: scripted and model policies measured on the validation puzzles, and its errors."""

from __future__ import annotations

import json

import pytest

from spa_rl.cli import main
from spa_rl.evaluation import EvalConfig, evaluate
from spa_rl.metrics import compute_metrics
from spa_rl.seeds import VALIDATION_SEED_OFFSET, validation_seeds

METRIC_KEYS = {"pass@1", "any@8", "success_per_puzzle", "action_valid_rate", "action_effective_rate",
               "mean_actions", "mean_response_tokens", "format_rate", "observation_exact", "observation_cell_acc",
               "prediction_exact", "prediction_cell_acc", "prediction_exact_changed", "prediction_cell_acc_changed",
               "copy_exact_baseline", "copy_cell_acc_baseline", "changed_turns"}


def test_validation_seeds_are_disjoint_from_training():
    assert min(validation_seeds(128)) == VALIDATION_SEED_OFFSET


def test_solver_scores_perfectly(tmp_path):
    for env in ("sokoban", "frozenlake-det"):
        m = evaluate(EvalConfig.make(env=env, policy="solver", puzzles=8, samples=4, out=str(tmp_path / env)),
                     quiet=True)
        assert m["pass@1"] == 1.0 and m["prediction_exact"] == 1.0 and m["observation_exact"] == 1.0
        assert m["pass@4"] == 1.0 and m["format_rate"] == 1.0
        saved = json.loads((tmp_path / env / "metrics.json").read_text())
        assert METRIC_KEYS - {"any@8"} <= set(saved) and saved["any@4"] == 1.0 and saved["pass@2"] == 1.0
        lines = (tmp_path / env / "trajectories.jsonl").read_text().splitlines()
        assert len(lines) == 32 and json.loads(lines[0])["seed"] == VALIDATION_SEED_OFFSET


def test_random_policy_pass_at_k_is_consistent_with_its_success_rates():
    m = evaluate(EvalConfig.make(env="frozenlake-det", policy="random", puzzles=16, samples=8), quiet=True)
    per = m["success_per_puzzle"].values()
    assert m["pass@1"] == pytest.approx(sum(per) / len(per))
    assert m["pass@1"] <= m["pass@2"] <= m["pass@4"] <= m["pass@8"] == m["any@8"]
    assert 0.0 < m["pass@1"] < 1.0


def test_metrics_of_broken_responses(tokenizer):
    from test_rollout import ScriptedBackend

    from spa_rl.rollout import RolloutConfig, RolloutEngine

    eng = RolloutEngine(RolloutConfig(env="sokoban"), ScriptedBackend(tokenizer, ["no format here"]), tokenizer)
    m = compute_metrics(eng.run([1, 2], group_size=2), samples=2)
    assert m["format_rate"] == 0.0 and m["pass@1"] == 0.0 and m["mean_actions"] == 0.0
    assert m["prediction_exact"] == 0.0 and m["mean_reward"] == pytest.approx(-0.5)


def test_eval_cli_scripted_and_errors(tmp_path, capsys):
    assert main(["eval", "--env", "sudoku", "--policy", "solver", "--puzzles", "3", "--samples", "2",
                 "--out", str(tmp_path / "e")]) == 0
    assert json.loads((tmp_path / "e" / "metrics.json").read_text())["pass@1"] == 1.0
    assert main(["eval", "--env", "nope", "--policy", "solver"]) == 2
    assert "valid names are" in capsys.readouterr().err
    assert main(["eval", "--env", "sokoban", "--model", "no/such-model-anywhere"]) == 2
    err = capsys.readouterr().err
    assert "not available offline" in err and "Traceback" not in err
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert main(["eval", "--env", "sokoban", "--policy", "solver", "--out", str(blocker / "sub")]) == 2
    assert "cannot write to" in capsys.readouterr().err
    assert main(["eval", "--env", "sokoban", "--temperature", "-1"]) == 2
    err = capsys.readouterr().err
    assert "temperature must be >= 0" in err and err.count("\n") == 1
    with pytest.raises(SystemExit) as e:  # not a number at all: argparse's usage message
        main(["eval", "--env", "sokoban", "--temperature", "warm"])
    assert e.value.code == 2


def test_eval_with_a_tiny_model_directory(tiny_model_dir, tmp_path):
    m = evaluate(EvalConfig.make(env="sokoban", model=str(tiny_model_dir), puzzles=2, samples=2, max_new_tokens=8,
                                 out=str(tmp_path / "tiny")), quiet=True)
    assert m["format_rate"] == 0.0 and m["mean_response_tokens"] > 0 and m["config"]["path"] == str(tiny_model_dir)


@pytest.mark.integration
def test_spa_eval_with_the_real_embedded_model(tmp_path):
    out = tmp_path / "real"
    assert main(["eval", "--env", "frozenlake", "--puzzles", "2", "--samples", "2", "--max-new-tokens", "24",
                 "--out", str(out)]) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert METRIC_KEYS - {"any@8"} <= set(m) and m["episodes"] == 4 and m["mean_response_tokens"] > 0
    assert m["config"]["model"] == "smollm2-135m"
