"""From played episodes to what the RL update trains on: token sequences with their loss masks and rewards,
the per-turn bonuses (prediction reward, curiosity), the world-model targets, and the diagnostics of a step.

A `Trajectory` is one episode as the trainer sees it: the whole conversation's token ids (`Episode.tokens()`:
every prompt extends the previous one, so this is exactly what the model saw and sampled), the mask of the
tokens the loss covers (the agent's sampled tokens, or every token after the system prompt), the sampler's
log-probs on the sampled tokens, and the rewards on the last token of each turn or of the episode. This module
must never run a model's backward pass or change an episode.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from spa_rl.errors import SpaError
from spa_rl.metrics import cell_accuracy, normalize_state
from spa_rl.rl.config import RLConfig
from spa_rl.rollout import Episode
from spa_rl.samples import encode_conversation, episode_samples, load_dataset, pack_trajectories


@dataclass
class Trajectory:
    """One episode, tokenised for the update."""

    ids: list[int]
    """The whole conversation's token ids."""
    mask: list[int]
    """1 on the tokens the policy loss, the critic and GAE cover."""
    sampled: list[int]
    """1 on the tokens the policy sampled (the assistant's responses)."""
    rollout_logprobs: list[float]
    """The sampler's log-prob of each sampled token (0 elsewhere)."""
    rewards: list[float]
    """Token rewards: each turn's reward on its last sampled token, or the episode's on the last one."""
    group: int
    """Index of the puzzle group (the samples of one puzzle) within the step."""
    score: float
    """The episode's total reward, bonuses included (GRPO's score and the group filter's)."""
    bonuses: dict[str, list[float]] = field(default_factory=dict)
    """Each bonus per turn, before its coefficient (`prediction`, `novelty`)."""
    world_model: tuple[list[int], list[int]] | None = None
    """(ids, mask) of the episode rewritten with the true states, the mask on the states' tokens."""


def system_prefix_length(tokenizer: Any, messages: list[dict[str, str]], ids: list[int]) -> int:
    """How many leading tokens of `ids` are the system prompt (0 when the template has none or does not render
    it as a prefix)."""
    if not messages or messages[0]["role"] != "system":
        return 0
    try:
        text = tokenizer.apply_chat_template(messages[:1], tokenize=False, add_generation_prompt=False)
    except Exception:  # templates that refuse a lone system message
        return 0
    prefix = tokenizer(text, add_special_tokens=False)["input_ids"]
    return len(prefix) if ids[:len(prefix)] == prefix else 0


def per_turn_bonuses(episodes: list[Episode], config: RLConfig, novelty_of: Callable[[list[str]], list[float]],
                     reduce: Callable[[dict[str, float]], dict[str, float]] = dict,
                     ) -> tuple[list[dict[str, tuple[float, list[float]]]], dict[str, float]]:
    """For each episode, its bonuses by name: (coefficient, value per turn); and the step's statistics of them
    (`rollout/novelty`: the mean N(s') of the turns that moved, before centering). `novelty_of`: N(s) of each state
    (`novelty.state_novelty` with the actor); `reduce`: sums named numbers over every process (a copy, with one), so
    that the centring uses the mean over all of them."""
    out: list[dict[str, tuple[float, list[float]]]] = [{} for _ in episodes]
    stats: dict[str, float] = {}
    if config.prediction_reward > 0:
        for d, e in zip(out, episodes, strict=True):
            d["prediction"] = (config.prediction_reward, prediction_scores(e, config.prediction_match))
    if config.curiosity_coef > 0:
        states = sorted({t.state_after for e in episodes for t in e.turns if t.state_after != t.state_before})
        novelty = dict(zip(states, novelty_of(states), strict=True))
        raw = [[novelty[t.state_after] if t.state_after != t.state_before else None for t in e.turns]
               for e in episodes]
        values = [v for r in raw for v in r if v is not None]
        s = reduce({"total": sum(values), "count": float(len(values)), "turns": float(sum(map(len, raw)))})
        total, count, turns = s["total"], s["count"], s["turns"]
        mean = total / count if count else 0.0
        shift = mean if config.curiosity_center else 0.0
        for d, r in zip(out, raw, strict=True):
            d["novelty"] = (config.curiosity_coef, [0.0 if v is None else v - shift for v in r])
        stats = {"rollout/moved_turns": count / max(turns, 1), **({"rollout/novelty": mean} if count else {})}
    return out, stats


def prediction_scores(episode: Episode, kind: str = "exact") -> list[float]:
    """Per turn, how well the agent's `<prediction>` matches the true state after the turn: 1/0 (`exact`, after
    whitespace normalisation) or the share of grid cells right (`cell`). A missing prediction scores 0."""
    scores = []
    for t in episode.turns:
        if t.parsed.prediction is None:
            scores.append(0.0)
        elif kind == "exact":
            scores.append(float(normalize_state(t.parsed.prediction) == normalize_state(t.state_after)))
        else:
            scores.append(cell_accuracy(t.parsed.prediction, t.state_after))
    return scores


def world_model_targets(tokenizer: Any, episode: Episode, fmt: str, render: str) -> tuple[list[int], list[int]] | None:
    """(ids, mask) of the episode rewritten with the true states, as self-play data is (`samples.episode_samples`),
    with the mask on the tokens inside `<observation>` and `<prediction>` only; None if its first turn is malformed.

    Malformed turns are dropped as `spa collect` drops them (the sequence ends before the first): their reasoning
    may hold stray tags, which would put the mask on the model's own text, and an unparsed answer would teach
    that the state does not change whatever the reasoning says."""
    rows, _ = episode_samples(episode, fmt, render, filter_malformed=True, meta={})
    if not rows:
        return None
    ((messages, targets),) = pack_trajectories(rows)
    ids, full = encode_conversation(tokenizer, messages, "full", targets)
    _, without_states = encode_conversation(tokenizer, messages, "masked", targets)
    return ids, [int(a and not b) for a, b in zip(full, without_states, strict=True)]


def build_trajectory(episode: Episode, tokenizer: Any, group: int, *, placement: str = "final",
                     loss_tokens: str = "assistant", bonuses: dict[str, tuple[float, list[float]]] | None = None,
                     world_model: bool = False, fmt: str = "world-model", render: str = "grid+coords") -> Trajectory:
    """The `Trajectory` of one episode. `bonuses`: name -> (coefficient, per-turn value), added to each turn's
    reward; `placement`: `final` puts the episode's total on its last sampled token, `per-turn` each turn's
    reward on the turn's last sampled token."""
    ids, sampled = episode.tokens()
    turn_rewards = [t.reward for t in episode.turns]
    raw = {}
    for name, (coef, values) in (bonuses or {}).items():
        raw[name] = list(values)
        turn_rewards = [r + coef * v for r, v in zip(turn_rewards, values, strict=True)]
    rewards = [0.0] * len(ids)
    ends = [len(t.prompt_ids) + len(t.response_ids) - 1 for t in episode.turns]
    if placement == "final":
        if episode.turns:
            rewards[ends[-1]] += float(sum(turn_rewards))
    else:
        for end, r in zip(ends, turn_rewards, strict=True):
            rewards[end] += float(r)
    logprobs = [0.0] * len(ids)
    for t in episode.turns:
        start = len(t.prompt_ids)
        logprobs[start:start + len(t.logprobs)] = t.logprobs
    if loss_tokens == "assistant":
        mask = list(sampled)
    else:  # every token after the system prompt (what the reference code trains on)
        skip = system_prefix_length(tokenizer, episode.messages, ids)
        mask = [0] * skip + [1] * (len(ids) - skip)
    wm = world_model_targets(tokenizer, episode, fmt, render) if world_model else None
    return Trajectory(ids, mask, list(sampled), logprobs, rewards, group, float(sum(turn_rewards)), raw, wm)


def dataset_groups(data_dir: str, tokenizer: Any, env: str, fmt: str, render: str) -> list[list[Trajectory]]:
    """Offline DPO's groups: the episodes of a `spa collect` dataset (train.jsonl; each trajectory's turns as one
    sequence, the loss on every assistant turn) grouped by puzzle, score 1 for a success and 0 otherwise, keeping
    the puzzles with both (the others give no pair), in seed order. No sampled tokens: the data's policy is not the
    one being trained. The dataset must keep malformed turns (`--no-filter`: a filtered failure is cut before its
    mistake) and match the run's format and render."""
    train, _, manifest = load_dataset(data_dir, expected_env=env)
    if manifest.get("filter_malformed", True):
        raise SpaError(f"{data_dir} was collected with malformed turns dropped, which cuts each failure before its "
                       f"mistake: collect it again with --no-filter for offline DPO")
    for name, want in (("format", fmt), ("render", render)):
        if manifest.get(name) != want:
            raise SpaError(f"{data_dir} was collected with --{name} {manifest.get(name)}, this run plays --{name} "
                           f"{want}: use the same (or another dataset)")
    by_trajectory: dict[str, list[dict]] = {}
    for n, row in enumerate(train, 1):
        meta = row.get("meta", {})
        if "trajectory" not in meta or "seed" not in meta:
            raise SpaError(f"{data_dir}/train.jsonl row {n} has no trajectory or puzzle seed in its meta: offline DPO "
                           f"needs a dataset made by `spa collect`")
        by_trajectory.setdefault(str(meta["trajectory"]), []).append(row)
    by_seed: dict[int, list[Trajectory]] = {}
    for key, rows in by_trajectory.items():
        meta = rows[0]["meta"]
        packed = pack_trajectories(rows)
        if len(packed) != 1:
            raise SpaError(f"{data_dir}: the turns of trajectory {key} do not make one conversation (each turn's row "
                           f"must extend the previous one): collect the dataset again")
        messages, targets = packed[0]
        ids, mask = encode_conversation(tokenizer, messages, "full", targets)
        zeros = [0.0] * len(ids)
        by_seed.setdefault(int(meta["seed"]), []).append(
            Trajectory(ids, mask, [0] * len(ids), zeros, zeros, 0, float(bool(meta.get("success")))))
    groups = [g for _, g in sorted(by_seed.items()) if len({t.score for t in g}) > 1]
    if not groups:
        raise SpaError(f"{data_dir} has no puzzle with both a success and a failure, so no pair: collect with "
                       f"--samples >= 2 from a policy that wins some episodes")
    return groups


def group_diversity(episodes: Sequence[Episode], groups: Sequence[int]) -> dict[str, float]:
    """Collapse diagnostics: within each group, the share of distinct action sequences and of distinct response
    texts among its samples (1: every sample differs; 1/n: all identical), averaged over groups."""
    by_group: dict[int, list[Episode]] = {}
    for ep, g in zip(episodes, groups, strict=True):
        by_group.setdefault(g, []).append(ep)
    actions, responses = [], []
    for members in by_group.values():
        n = len(members)
        actions.append(len({tuple(a for t in e.turns for a in t.actions) for e in members}) / n)
        responses.append(len({tuple(t.response for t in e.turns) for e in members}) / n)
    return {"distinct_actions": float(np.mean(actions)) if actions else 0.0,
            "distinct_responses": float(np.mean(responses)) if responses else 0.0}
