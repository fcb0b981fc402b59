"""`spa imagine`: the agent plays inside its own world model."""

from __future__ import annotations


def test_imagine_feeds_predictions_back_as_the_state(tokenizer):
    """In imagination the agent is shown its own prediction of the previous turn, the env keeps the truth, and the
    metrics compare each prediction with the true state."""
    from test_rollout import ScriptedBackend

    from spa_rl.imagine import imagination_metrics
    from spa_rl.rollout import RolloutConfig, RolloutEngine

    text = ("<think> <observation> ##\n#P </observation> go <prediction> IMAGINED\n#P# </prediction> </think> "
            "<answer> Left </answer>")
    engine = RolloutEngine(RolloutConfig(env="sokoban", max_turns=3, imagine=True), ScriptedBackend(tokenizer, [text]),
                           tokenizer)
    (episode,) = engine.run([5])
    first, second = episode.turns[0], episode.turns[1]
    assert first.shown == first.state_before, "turn 1 shows the true puzzle"
    assert second.shown == "IMAGINED\n#P#" and second.state_before != second.shown
    assert "IMAGINED" in episode.messages[3]["content"]
    m = imagination_metrics([episode])
    assert [s["step"] for s in m["steps"]] == [1, 2, 3] and m["mean_exact"] == 0.0
    assert all(s["copy_cells"] > 0 for s in m["steps"])
