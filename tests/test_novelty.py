"""Novelty N(s): the mean NLL of a state's own tokens given its context."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import build_tiny_model

from spa_rl import envs
from spa_rl.novelty import StateText, perplexity_summary, sample_states, score_states, state_contexts


def test_novelty_equals_a_hand_computed_nll(tokenizer):
    model = build_tiny_model(tokenizer)
    items = [StateText("<|im_start|>user\nState:\n", "#__P#\n#X_O#"),
             StateText("a much longer context before the state:\n", "1 . 3 4"),
             StateText("x", "_P\nG_\nPlayer (P) is at (0,1).")]
    got = score_states(model, tokenizer, items, batch_size=2)
    for item, score in zip(items, got, strict=True):
        ctx = tokenizer(item.context, add_special_tokens=False)["input_ids"]
        full = tokenizer(item.context + item.state, add_special_tokens=False)["input_ids"]
        assert full[:len(ctx)] == ctx, "these contexts end on a token boundary"
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=torch.tensor([full])).logits[0].float(), -1)
        want = -sum(logp[i - 1, full[i]].item() for i in range(len(ctx), len(full))) / (len(full) - len(ctx))
        assert score == pytest.approx(want, abs=1e-4)


def test_state_context_is_the_turn_one_conversation(tokenizer):
    env = envs.make("sokoban", render="grid+coords").unwrapped
    obs, _ = env.reset(seed=0)
    item = state_contexts(env, obs, "grid+coords", "world-model", tokenizer, 5, 10)
    assert item.context.endswith("Turn 1:\nState:\n") and item.context.startswith("<|im_start|>system")


def test_sampled_states_and_summary():
    states = sample_states("frozenlake-det", "grid", puzzles=5, steps=3)
    assert len(states) >= 5 and all("P" in s or "√" in s or "X" in s for s in states)
    s = perplexity_summary([math.log(2.0), math.log(8.0)])
    assert s["perplexity"] == pytest.approx(4.0) and s["mean_state_perplexity"] == pytest.approx(5.0)


def test_novelty_cli_reports_both_renders(tiny_model_dir, tmp_path, capsys):
    import json

    from spa_rl.cli import main

    out = tmp_path / "nov.json"
    assert main(["novelty", "--model", str(tiny_model_dir), "--env", "sudoku", "--puzzles", "2",
                 "--out", str(out)]) == 0
    saved = json.loads(out.read_text())
    (report,) = saved["reports"]
    assert report["env"] == "sudoku" and report["grid"]["states"] > 0 and report["grid+coords"]["perplexity"] > 1
    assert saved["config"]["env"] == ["sudoku"] and saved["config"]["puzzles"] == 2
    assert main(["novelty", "--env", "nope"]) == 2
