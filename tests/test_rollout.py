"""The rollout engine: turn records, limits, penalties, and exact assistant masks over multi-turn episodes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import build_tiny_model

from spa_rl.generation import Generation, KVCacheBackend, SamplingConfig
from spa_rl.rollout import RolloutConfig, RolloutEngine


class ScriptedBackend:
    """Returns the given texts in turn (encoded, with the stop token unless `truncate`)."""

    def __init__(self, tokenizer, texts, truncate=()):
        self.tokenizer, self.texts, self.truncate = tokenizer, texts, set(truncate)
        self.stop_ids = [tokenizer.eos_token_id]
        self.calls = 0
        self.prompts = []

    def generate(self, prompts, config, generator=None):
        out = []
        for p in prompts:
            self.prompts.append(p)
            i = self.calls % len(self.texts)
            ids = self.tokenizer(self.texts[i], add_special_tokens=False)["input_ids"]
            finished = i not in self.truncate
            ids = ids + [self.tokenizer.eos_token_id] if finished else ids
            out.append(Generation(ids, [-1.0] * len(ids), finished))
            self.calls += 1
        return out


def _check_tokens_match_template(tokenizer, episode, stop_ids):
    """Every turn's prompt ids are exactly the chat template of the conversation so far; the mask covers
    exactly the responses."""
    ids, mask = episode.tokens()
    assert len(ids) == len(mask)
    assert [t for t, m in zip(ids, mask, strict=True) if m] == [t for turn in episode.turns for t in turn.response_ids]
    assert sum(mask) == sum(len(t.response_ids) for t in episode.turns)
    k = 2  # system + first user
    for turn in episode.turns:
        expected = tokenizer.apply_chat_template(episode.messages[:k], tokenize=False, add_generation_prompt=True)
        assert tokenizer.decode(turn.prompt_ids) == expected
        assert ids[:len(turn.prompt_ids)] == turn.prompt_ids, "prompts grow by appending"
        body = turn.response_ids[:-1] if turn.response_ids[-1:] and turn.response_ids[-1] in stop_ids else \
            turn.response_ids
        assert tokenizer.decode(body) == episode.messages[k]["content"]
        k += 2


def test_masks_and_prompts_over_multi_turn_episodes(tokenizer):
    texts = ["<think> <observation> x </observation> hm <prediction> y </prediction> </think> <answer> Up </answer>",
             "I do not know the format",
             "<think> <observation> x </observation> go <prediction> y </prediction> </think> <answer> Left || Up"]
    backend = ScriptedBackend(tokenizer, texts, truncate={2})
    engine = RolloutEngine(RolloutConfig(env="sokoban", max_turns=5), backend, tokenizer)
    episodes = engine.run([0, 1], group_size=2)
    assert [(e.seed, e.sample) for e in episodes] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    for e in episodes:
        assert len(e.turns) >= 2
        _check_tokens_match_template(tokenizer, e, backend.stop_ids)
        for t in e.turns:
            if not t.parsed.format_ok:
                assert t.actions == [] and t.penalized and t.reward == pytest.approx(-0.1)
                assert t.state_before == t.state_after


def test_tiny_model_rollout_records_what_ppo_needs(tokenizer):
    model = build_tiny_model(tokenizer)
    backend = KVCacheBackend(model, tokenizer)
    config = RolloutConfig(env="frozenlake-det", sampling=SamplingConfig(max_new_tokens=10), max_concurrent=3)
    episodes = RolloutEngine(config, backend, tokenizer).run([5, 6], group_size=2, seed=0)
    assert len(episodes) == 4
    for e in episodes:
        assert len(e.turns) == 5, "a random model never answers, so every episode runs all turns"
        ids, mask = e.tokens()
        assert sum(mask) == sum(len(t.response_ids) for t in e.turns)
        last = e.turns[-1]
        # the recorded log-probs of every turn are those of the whole-conversation forward pass
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].float(), -1)
        pos = [i - 1 for i, m in enumerate(mask) if m]
        fresh = logp[pos, torch.tensor(ids)[[p + 1 for p in pos]]]
        recorded = torch.tensor([lp for t in e.turns for lp in t.logprobs])
        assert torch.allclose(recorded, fresh, atol=2e-4)
        assert last.prompt_ids[:len(e.turns[0].prompt_ids)] == e.turns[0].prompt_ids


@pytest.mark.parametrize("env", ["sokoban", "frozenlake-det", "sudoku"])
def test_solver_policy_wins_with_true_states(env):
    episodes = RolloutEngine(RolloutConfig(env=env), policy="solver").run(range(30), group_size=2)
    assert all(e.success for e in episodes)
    for e in episodes:
        for t in e.turns:
            assert t.parsed.observation == t.state_before and t.parsed.prediction == t.state_after


def test_action_limits_are_enforced():
    config = RolloutConfig(env="sokoban", max_turns=3, max_actions_per_turn=2, max_actions_per_episode=5)
    for e in RolloutEngine(config, policy="random").run(range(40), group_size=1, seed=1):
        assert len(e.turns) <= 3 and e.num_actions <= 5
        assert all(len(t.actions) <= 2 for t in e.turns)
        assert e.num_actions == sum(len(t.actions) for t in e.turns)


def test_no_valid_action_is_penalised(tokenizer):
    text = "<think> <observation> a </observation> b <prediction> c </prediction> </think> <answer> Jump </answer>"
    engine = RolloutEngine(RolloutConfig(env="sokoban", max_turns=1), ScriptedBackend(tokenizer, [text]), tokenizer)
    (e,) = engine.run([0])
    t = e.turns[0]
    assert t.parsed.format_ok and t.actions == ["Jump"] and t.valid == [False]
    assert t.penalized and t.reward == pytest.approx(-0.1)


def test_random_policy_success_matches_direct_simulation():
    """pass@1 of the random policy equals the success rate of the same policy played directly on the env."""
    from spa_rl import envs

    eps = RolloutEngine(RolloutConfig(env="frozenlake-det", max_actions_per_turn=1, max_turns=10),
                        policy="random").run(range(400), group_size=1, seed=2)
    rollout_rate = np.mean([e.success for e in eps])
    env = envs.make("frozenlake-det").unwrapped
    rng = np.random.default_rng(7)
    wins = []
    for s in range(400):
        env.reset(seed=s)
        for _ in range(10):
            _, _, term, _, info = env.step(env.random_action(rng))
            if term:
                break
        wins.append(env.success)
    direct = np.mean(wins)
    se = np.sqrt(direct * (1 - direct) / 400 * 2)
    assert abs(rollout_rate - direct) < 3 * se + 0.01, (rollout_rate, direct)


@pytest.mark.parametrize(("max_concurrent", "lean"), [(4, True), (8, True), (8, False)])
def test_kv_reuse_across_turns_with_early_stops_and_new_rows(tokenizer, max_concurrent, lean):
    """Rows stop at random points (a biased stop token), finished rows leave the batch, new episodes join
    continuing ones: every turn's log-probs must still equal a fresh forward pass of the whole conversation."""
    model = build_tiny_model(tokenizer, seed=3)
    head = torch.nn.Linear(model.config.hidden_size, model.config.vocab_size, bias=True)
    with torch.no_grad():
        head.weight.copy_(model.lm_head.weight)
        head.bias.zero_()
        head.bias[tokenizer.eos_token_id] = 8.0  # about a 6% chance to stop at each step
    model.lm_head = head
    backend = KVCacheBackend(model, tokenizer, lean=lean)
    assert (backend._lean is not None) == lean
    config = RolloutConfig(env="sokoban", sampling=SamplingConfig(max_new_tokens=12), max_concurrent=max_concurrent)
    episodes = RolloutEngine(config, backend, tokenizer).run([1, 2, 3], group_size=2, seed=4)
    stops = [t.response_ids[-1] == tokenizer.eos_token_id for e in episodes for t in e.turns]
    assert any(stops) and not all(stops), "the test needs both stopped and truncated responses"
    for e in episodes:
        ids, mask = e.tokens()
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].float(), -1)
        pos = [i - 1 for i, m in enumerate(mask) if m]
        fresh = logp[pos, torch.tensor(ids)[[p + 1 for p in pos]]]
        recorded = torch.tensor([lp for t in e.turns for lp in t.logprobs])
        assert torch.allclose(recorded, fresh, atol=3e-4), (recorded - fresh).abs().max()
