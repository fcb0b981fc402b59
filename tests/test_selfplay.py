"""Self-play data: the true-state rewrite, the structure filter, the split by trajectory, resuming."""

from __future__ import annotations

import json

import pytest
from conftest import collect_data
from test_rollout import ScriptedBackend

from spa_rl.cli import main
from spa_rl.collect import DatasetWriter
from spa_rl.errors import SpaError
from spa_rl.io import read_jsonl
from spa_rl.prompts import parse_response
from spa_rl.rollout import RolloutConfig, RolloutEngine

GOOD_BUT_WRONG = ("<think> <observation> I am somewhere </observation> let us go <prediction> ###\n#P# "
                  "</prediction> </think> <answer> Down || Left </answer>")
MALFORMED = "Down Left please, I think the box is near"


class TurnBackend(ScriptedBackend):
    """Answers turn k with texts[k - 1] (the turn number read from the prompt)."""

    def generate(self, prompts, config, generator=None):
        out = []
        for p in prompts:
            turn = self.tokenizer.decode(p).count("Turn ")
            self.texts_now = [self.texts[min(turn, len(self.texts)) - 1]]
            out.extend(ScriptedBackend(self.tokenizer, self.texts_now).generate([p], config))
        return out


def _episodes(tokenizer, texts, seeds=(0, 1, 2)):
    engine = RolloutEngine(RolloutConfig(env="sokoban", max_turns=3), TurnBackend(tokenizer, texts), tokenizer)
    return engine.run(list(seeds), group_size=2)


@pytest.mark.parametrize("filter_malformed", [False, True])
def test_rewrite_puts_exactly_the_true_states_in_both_tags(tokenizer, tmp_path, filter_malformed):
    episodes = _episodes(tokenizer, [GOOD_BUT_WRONG, MALFORMED, GOOD_BUT_WRONG])
    writer = DatasetWriter(tmp_path, val_fraction=0.5, filter_malformed=filter_malformed)
    stats = writer.add("u", episodes, "world-model", "grid+coords", {})
    writer.finalize()
    rows = read_jsonl(tmp_path / "train.jsonl") + read_jsonl(tmp_path / "val.jsonl")
    assert len(rows) == stats.kept > 0
    for row in rows:
        p = parse_response(row["completion"][0]["content"])
        assert p.observation == row["meta"]["state_before"] and p.prediction == row["meta"]["state_after"]
        # earlier assistant turns in the prompt are rewritten too
        for m in row["prompt"]:
            if m["role"] == "assistant":
                assert "I am somewhere" not in m["content"]
    turns = {r["meta"]["turn"] for r in rows}
    if filter_malformed:  # turn 2 is malformed: it and everything after it are dropped
        assert turns == {1} and stats.dropped_malformed == 2 * len(episodes)
    else:
        assert turns == {1, 2, 3}
        malformed_rows = [r for r in rows if r["meta"]["turn"] == 2]
        assert all(r["meta"]["state_before"] == r["meta"]["state_after"] for r in malformed_rows)


def test_copy_prediction_writes_the_current_state_as_the_prediction(tmp_path):
    """The format warm start's data: the observation is the true state and the prediction says "nothing changes",
    while the actions that ran, and so the next turn's state, are real."""
    collect_data("sokoban", str(tmp_path), policy="random", puzzles=4, samples=2, copy_prediction=True)
    rows = read_jsonl(tmp_path / "train.jsonl") + read_jsonl(tmp_path / "val.jsonl")
    assert any(r["meta"]["state_before"] != r["meta"]["state_after"] for r in rows), "some turns changed the state"
    for row in rows:
        p = parse_response(row["completion"][0]["content"])
        assert p.observation == p.prediction == row["meta"]["state_before"]
    assert json.loads((tmp_path / "manifest.json").read_text())["copy_prediction"] is True
    with pytest.raises(SpaError, match="copy_prediction rewrites the prediction"):
        collect_data("sokoban", str(tmp_path / "x"), policy="random", puzzles=1, samples=1, copy_prediction=True,
                     rewrite=False)


def test_split_never_shares_a_trajectory(tmp_path):
    stats = collect_data("sokoban", str(tmp_path), policy="random", puzzles=40, samples=4, val_fraction=0.25)
    train = read_jsonl(tmp_path / "train.jsonl")
    val = read_jsonl(tmp_path / "val.jsonl")
    t_ids = {r["meta"]["trajectory"] for r in train}
    v_ids = {r["meta"]["trajectory"] for r in val}
    assert t_ids and v_ids and not (t_ids & v_ids)
    assert 0.1 < len(v_ids) / (len(t_ids) + len(v_ids)) < 0.4
    assert stats.train == len(train) and stats.val == len(val)
    keys = [json.dumps([r["prompt"], r["completion"]]) for r in train + val]
    assert len(keys) == len(set(keys)), "no duplicate samples"


def test_interrupted_collection_resumes_without_duplicates(tmp_path, monkeypatch):
    full = tmp_path / "full"
    collect_data("frozenlake-det", str(full), policy="random", puzzles=12, samples=2)
    want = read_jsonl(full / "train.jsonl") + read_jsonl(full / "val.jsonl")

    part = tmp_path / "part"
    calls = {"n": 0}
    original = RolloutEngine.run_tasks

    def flaky(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return original(self, *a, **k)

    monkeypatch.setattr(RolloutEngine, "run_tasks", flaky)
    with pytest.raises(KeyboardInterrupt):
        collect_data("frozenlake-det", str(part), policy="random", puzzles=12, samples=2)
    assert len(list((part / "shards").glob("*.jsonl"))) == 2  # what was written is complete and valid
    for shard in (part / "shards").glob("*.jsonl"):
        read_jsonl(shard)
    monkeypatch.setattr(RolloutEngine, "run_tasks", original)
    collect_data("frozenlake-det", str(part), policy="random", puzzles=12, samples=2)
    got = read_jsonl(part / "train.jsonl") + read_jsonl(part / "val.jsonl")
    assert [json.dumps(r) for r in got] == [json.dumps(r) for r in want]


def test_collection_with_other_settings_is_refused(tmp_path):
    collect_data("sokoban", str(tmp_path), policy="solver", puzzles=2, samples=1)
    with pytest.raises(SpaError, match=r"other settings \(rollout.env: \"sokoban\" -> \"frozenlake-det\"\)"):
        collect_data("frozenlake-det", str(tmp_path), policy="solver", puzzles=2, samples=1)


def test_malformed_dataset_line_is_named(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": []}\n{not json\n')
    with pytest.raises(SpaError, match="line 2 is not valid JSON"):
        read_jsonl(bad)


def test_collect_cli_summary(tmp_path, capsys):
    assert main(["collect", "--env", "sudoku", "--policy", "solver", "--puzzles", "3", "--samples", "1",
                 "--out", str(tmp_path / "d")]) == 0
    out = capsys.readouterr().out
    assert "behaviour policy success" in out and "100.0%" in out
    assert json.loads((tmp_path / "d" / "manifest.json").read_text())["env"] == "sudoku"


def test_novelty_guided_collection_branches_from_the_most_novel_states(tiny_model_dir, tmp_path, monkeypatch):
    """After the first shard, half of each shard's groups start from the highest-N(s) states seen so far."""
    import spa_rl.collect as sp
    from spa_rl import envs

    calls = []
    original = sp.score_new_states

    def spy(*a, **k):
        out = original(*a, **k)
        calls.append(out)
        return out

    monkeypatch.setattr(sp, "score_new_states", spy)
    collect_data("sokoban", str(tmp_path), policy="novelty", model=str(tiny_model_dir), puzzles=8, samples=2,
                 max_new_tokens=4, puzzles_per_shard=4, filter_malformed=False)
    rows = read_jsonl(tmp_path / "train.jsonl") + read_jsonl(tmp_path / "val.jsonl")
    branched = {r["meta"]["trajectory"] for r in rows if r["meta"]["sample"] >= 10_000}
    assert len(branched) == 2 * 2, "2 of the second shard's 4 groups, 2 samples each"
    first_shard = calls[0]
    assert first_shard and all(isinstance(score, float) for score, _, _ in first_shard)
    env = envs.make("sokoban", render="grid+coords").unwrapped
    best = set()
    for _, seed, snap in sorted(first_shard, key=lambda x: -x[0])[:2]:
        env.reset(seed=seed)
        best.add(env.restore(snap))
    starts = {r["meta"]["state_before"] for r in rows if r["meta"]["sample"] >= 10_000 and r["meta"]["turn"] == 1}
    assert starts == best


def test_selfplay_rounds_log_heldout_novelty_and_resume(tiny_model_dir, tmp_path, monkeypatch):
    from spa_rl.selfplay import SelfPlayConfig, selfplay_rounds

    config = SelfPlayConfig.make(out=str(tmp_path), env="frozenlake-det", rounds=2, model=str(tiny_model_dir),
                                 policy="solver", puzzles=2, samples=1, heldout_puzzles=2, epochs=1,
                                 tensorboard=False, dtype="fp32")
    history = selfplay_rounds(config, quiet=True)
    assert [h["round"] for h in history] == [0, 1, 2]
    assert history[2]["model"].endswith("round-2/sft/model") and history[1]["heldout"]["states"] > 0
    assert len(read_jsonl(tmp_path / "rounds.jsonl")) == 3 and (tmp_path / "novelty.png").is_file()
    # a rerun finds every round done and trains nothing
    import spa_rl.selfplay as sp

    monkeypatch.setattr(sp, "train_sft", lambda *a, **k: pytest.fail("retrained a finished round"))
    assert selfplay_rounds(config, quiet=True) == history


def test_novelty_guided_collection_with_a_scripted_actor(tiny_model_dir, tmp_path):
    """--novelty-actor random: the tiny model only scores states, random actions are played (so every turn is
    well formed), and later shards still branch from novel states."""
    stats = collect_data("sokoban", str(tmp_path), policy="novelty", novelty_actor="random",
                         model=str(tiny_model_dir), puzzles=8, samples=2, puzzles_per_shard=4)
    rows = read_jsonl(tmp_path / "train.jsonl") + read_jsonl(tmp_path / "val.jsonl")
    assert stats.dropped_malformed == 0 and stats.kept + stats.dropped_duplicate == stats.turns
    assert len({r["meta"]["trajectory"] for r in rows if r["meta"]["sample"] >= 10_000}) == 4
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["novelty_actor"] == "random"
