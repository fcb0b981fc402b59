"""The rollout engine: many multi-turn episodes at once, recording everything training needs.

Episodes run in groups of samples that share a puzzle seed. At each round, every active episode's prompt is
generated in one batch; responses are parsed, their actions executed under the turn, per-turn and
per-episode limits, and finished episodes leave the batch while waiting ones take their place (batching at
the turn level). Each turn records the prompt and response token ids, the sampled tokens' log-probabilities,
the true state before and after the turn's actions, the reward and the parsed response. Token ids are built
incrementally (the next prompt is the previous prompt, the response, and the chat template's continuation), so
`Episode.tokens()` gives the whole conversation with an exact mask of the assistant's tokens.

No maintained library runs text-game episodes with multi-turn chat, per-turn action limits and these
records, so this loop is ours. It must never depend on a model family (it asks the tokenizer's chat template)
and never let model text raise (the parser and the envs absorb anything).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar, Literal

import numpy as np
import torch

from spa_rl import envs
from spa_rl.config import setting
from spa_rl.envs import EnvConfig
from spa_rl.envs.base import EnvSnapshot, PuzzleEnv
from spa_rl.generation import GenerationBackend, SamplingConfig
from spa_rl.policies import scripted_response
from spa_rl.prompts import Format, ParsedResponse, first_messages, parse_response, turn_message

FORMAT_PENALTY = -0.1
_SENTINEL = "\ue000spa-sentinel\ue001"


@dataclass(kw_only=True)
class RolloutConfig(EnvConfig):
    """What to play and under which limits (the puzzle part, `EnvConfig`, plus the agent's side)."""

    hidden: ClassVar[tuple[str, ...]] = ("record_snapshots", "imagine")

    format: Format = "world-model"
    """Response format asked of the agent: world-model (observation and prediction tags) or plain."""
    max_turns: int | None = setting(None, ge=1)
    """Assistant turns per episode (none: the env's, 5)."""
    max_actions_per_turn: int | None = setting(None, ge=1)
    """Actions executed per turn at most (none: the env's, 5)."""
    max_actions_per_episode: int | None = setting(None, ge=1)
    """Actions executed per episode at most (none: the env's)."""
    format_penalty: float = FORMAT_PENALTY
    """Reward of a turn whose response breaks the format or holds no valid action; nothing is executed then
    when the format is broken."""
    sampling: SamplingConfig = setting(factory=SamplingConfig)
    """Sampling of responses."""
    backend: Literal["kv", "hf"] = "kv"
    """Generation backend: kv (ours, fast on CPU) or hf (Hugging Face generate, the reference)."""
    max_concurrent: int = setting(32, ge=1, flag="--concurrent")
    """Episodes generated in one batch."""
    record_snapshots: bool = False
    """Keep an env snapshot of every turn's starting state in `Episode.snapshots` (for branching)."""
    imagine: bool = False
    """Show the agent its own `<prediction>` as the next turn's state instead of the true one (its last shown
    state when it wrote none): it plays inside its own world model while the env keeps the truth (`spa imagine`)."""

    def limits(self) -> tuple[int, int, int]:
        v = envs.get_variant(self.env)
        return (self.max_turns or v.max_turns, self.max_actions_per_turn or v.max_actions_per_turn,
                self.max_actions_per_episode or v.max_actions_per_episode)


@dataclass
class Turn:
    """One assistant turn and its consequences."""

    turn: int
    """1-based turn number."""
    prompt_ids: list[int]
    """Every token the model saw before this response (the whole conversation so far)."""
    response_ids: list[int]
    """The sampled tokens (with the stop token when one ended the response)."""
    logprobs: list[float]
    """Log-probability of each response token under the sampling distribution."""
    response: str
    """The response text (special tokens removed)."""
    parsed: ParsedResponse
    state_before: str
    """True state at the start of the turn, in the run's render."""
    state_after: str
    """True state after the turn's actions."""
    actions: list[str]
    """The actions executed (the parsed ones within the limits; none when the format was broken)."""
    valid: list[bool]
    effective: list[bool]
    reward: float
    """Environment reward of the executed actions plus the format penalty, if any."""
    penalized: bool
    truncated: bool
    """The response hit `max_new_tokens` without a stop token."""
    shown: str = ""
    """The state text the agent was shown at the start of the turn: the true state, or in imagination (see
    `RolloutConfig.imagine`) what it predicted the turn before."""


@dataclass
class Episode:
    """A whole episode of one puzzle sample."""

    env: str
    seed: int
    sample: int
    """Index of this sample within its group (the puzzle's samples)."""
    messages: list[dict[str, str]]
    """The chat, as text."""
    turns: list[Turn] = field(default_factory=list)
    success: bool = False
    done: bool = False
    """The env reached a terminal state."""
    num_actions: int = 0
    info: dict = field(default_factory=dict)
    """Reset info of the puzzle (e.g. Sokoban's `optimal_moves`); `branched` when it started from a snapshot."""
    snapshots: list = field(default_factory=list)
    """Env snapshots of each turn's starting state (only with `RolloutConfig.record_snapshots`)."""

    @property
    def total_reward(self) -> float:
        return float(sum(t.reward for t in self.turns))

    def tokens(self) -> tuple[list[int], list[int]]:
        """The whole conversation's token ids and a mask that is 1 exactly on the assistant's tokens."""
        if not self.turns:
            return [], []
        last = self.turns[-1]
        ids = last.prompt_ids + last.response_ids
        mask = [0] * len(ids)
        for t in self.turns:
            start = len(t.prompt_ids)
            mask[start:start + len(t.response_ids)] = [1] * len(t.response_ids)
        return ids, mask

    def to_json(self, with_tokens: bool = False) -> dict:
        """A JSON-ready record (token ids and log-probs only if asked; snapshots never)."""
        turns = []
        for t in self.turns:
            d = asdict(t)
            if not with_tokens:
                for k in ("prompt_ids", "response_ids", "logprobs"):
                    d.pop(k)
            turns.append(d)
        return {"env": self.env, "seed": self.seed, "sample": self.sample, "success": self.success,
                "total_reward": self.total_reward, "num_actions": self.num_actions, "info": self.info,
                "messages": self.messages, "turns": turns}


# ------------------------------------------------------------------------------------------ chat tokens
class ChatTokens:
    """Token ids of a conversation, grown turn by turn with the tokenizer's own chat template."""

    def __init__(self, tokenizer: Any, stop_ids: Sequence[int]) -> None:
        self.tokenizer = tokenizer
        self.stop_texts = {int(i): tokenizer.decode([int(i)]) for i in stop_ids}

    def _template(self, messages: list[dict[str, str]], generation_prompt: bool) -> str:
        try:
            return self.tokenizer.apply_chat_template(messages, tokenize=False,
                                                      add_generation_prompt=generation_prompt)
        except Exception:
            if messages and messages[0]["role"] == "system":
                merged = [{"role": "user", "content": messages[0]["content"] + "\n\n" + messages[1]["content"]}]
                return self.tokenizer.apply_chat_template(merged + messages[2:], tokenize=False,
                                                          add_generation_prompt=generation_prompt)
            raise

    def encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def first(self, messages: list[dict[str, str]]) -> list[int]:
        return self.encode(self._template(messages, True))

    def continuation(self, messages: list[dict[str, str]], response_ids: list[int], next_user: str) -> list[int]:
        """Tokens that follow an assistant response: end of its turn, the next user message, the reply prompt."""
        text = self._template(messages + [{"role": "assistant", "content": _SENTINEL},
                                          {"role": "user", "content": next_user}], True)
        glue = text[text.rfind(_SENTINEL) + len(_SENTINEL):]
        if response_ids and response_ids[-1] in self.stop_texts:
            stop = self.stop_texts[response_ids[-1]]
            if glue.startswith(stop):
                glue = glue[len(stop):]
        return self.encode(glue)


# ------------------------------------------------------------------------------------------ policies
@dataclass
class Response:
    """What the agent answered in one turn."""

    text: str
    """The response text (special tokens removed)."""
    token_ids: list[int]
    """The sampled tokens (empty for scripted policies)."""
    logprobs: list[float]
    """Each sampled token's log-probability under the sampling distribution."""
    truncated: bool
    """The response hit `max_new_tokens` without a stop token."""


@dataclass
class _Live:
    """An episode in progress."""

    episode: Episode
    env: PuzzleEnv
    prompt_ids: list[int]
    actions_left: int
    shown: str
    """The state text of the user message the agent is answering."""


# ------------------------------------------------------------------------------------------ engine
class RolloutEngine:
    """Plays episodes with a model (through a generation backend), a model behind an API (`policy="api"`, the
    backend an `spa_rl.api.ApiPolicy`) or a scripted policy (random, solver)."""

    def __init__(self, config: RolloutConfig, backend: GenerationBackend | Any = None, tokenizer: Any = None,
                 policy: str = "model") -> None:
        envs.get_variant(config.env)  # fail early on unknown names
        self.config = config
        self.policy = policy
        self.backend = backend
        self.tokenizer = tokenizer
        if policy == "model":
            if backend is None or tokenizer is None:
                raise ValueError("policy 'model' needs a generation backend and a tokenizer")
            self.chat = ChatTokens(tokenizer, getattr(backend, "stop_ids", [tokenizer.eos_token_id]))
        if policy == "api" and not hasattr(backend, "respond"):
            raise ValueError("policy 'api' needs a backend that answers conversations (`spa_rl.api.ApiPolicy`)")

    def _start(self, seed: int, sample: int, snapshot: EnvSnapshot | None = None) -> _Live:
        cfg = self.config
        env = envs.make(cfg.env, render=cfg.render, **cfg.env_overrides).unwrapped
        obs, info = env.reset(seed=seed)
        if snapshot is not None:  # branch: start from a state reached earlier instead of the puzzle's start
            obs = env.restore(snapshot)
            info = {**info, "branched": True}
        _, per_turn, per_episode = cfg.limits()
        messages = first_messages(env, obs, cfg.render, cfg.format, per_turn, per_episode,
                                  cfg.sampling.max_new_tokens)
        ep = Episode(cfg.env, seed, sample, messages, info={k: v for k, v in info.items()
                                                              if k not in ("success", "action_is_valid",
                                                                           "action_is_effective")})
        prompt = self.chat.first(messages) if self.policy == "model" else []
        return _Live(ep, env, prompt, per_episode, obs)

    def _respond(self, live: list[_Live], generator: torch.Generator | None,
                 rng: np.random.Generator) -> list[Response]:
        if self.policy == "model":
            gens = self.backend.generate([lv.prompt_ids for lv in live], self.config.sampling, generator)
            return [Response(self.tokenizer.decode(g.token_ids, skip_special_tokens=True), g.token_ids, g.logprobs,
                             not g.finished) for g in gens]
        if self.policy == "api":  # text from a model behind an API: no token ids, no log-probs
            answers = self.backend.respond([(lv.episode.seed, lv.episode.sample, lv.episode.messages)
                                            for lv in live], self.config.sampling)
            return [Response(text, [], [], truncated) for text, truncated in answers]
        _, per_turn, _ = self.config.limits()
        return [Response(scripted_response(lv.env, self.policy, min(per_turn, lv.actions_left), self.config.format,
                                           rng), [], [], False) for lv in live]

    def _apply(self, lv: _Live, response: Response) -> None:
        cfg = self.config
        max_turns, per_turn, _ = cfg.limits()
        ep, env = lv.episode, lv.env
        text, ids = response.text, response.token_ids
        parsed = parse_response(text, cfg.format)
        before = env.render_text()
        if cfg.record_snapshots:
            ep.snapshots.append(env.snapshot())
        actions = parsed.actions[:min(per_turn, lv.actions_left)] if parsed.format_ok else []
        reward, valid, effective = 0.0, [], []
        for a in actions:
            _, r, terminated, _, info = env.step(a)
            reward += r
            valid.append(info["action_is_valid"])
            effective.append(info["action_is_effective"])
            if terminated:
                break
        executed = actions[:len(valid)]
        penalized = not parsed.format_ok or not any(valid)
        if penalized:
            reward += cfg.format_penalty
        lv.actions_left -= len(executed)
        ep.num_actions += len(executed)
        turn_no = len(ep.turns) + 1
        ep.turns.append(Turn(turn_no, lv.prompt_ids, ids, response.logprobs, text, parsed, before, env.render_text(),
                             executed, valid, effective, round(reward, 6), penalized, response.truncated, lv.shown))
        ep.messages.append({"role": "assistant", "content": text})
        ep.success = env.success
        ep.done = env.done or turn_no >= max_turns or lv.actions_left <= 0
        if not ep.done:
            if cfg.imagine:  # the agent's own idea of the next state, as the state it sees
                lv.shown = parsed.prediction.strip() if parsed.prediction else lv.shown
            else:
                lv.shown = env.render_text()
            user = turn_message(turn_no + 1, lv.shown, lv.actions_left, cfg.format,
                                cfg.sampling.max_new_tokens, reward=round(reward, 6))
            if self.policy == "model":
                lv.prompt_ids = lv.prompt_ids + ids + self.chat.continuation(ep.messages, ids, user)
            ep.messages.append({"role": "user", "content": user})

    def run(self, seeds: Sequence[int], group_size: int = 1, seed: int = 0,
            progress: Callable[[float], None] | None = None) -> list[Episode]:
        """Play `group_size` samples of each puzzle seed; return episodes in (seed, sample) order.

        `seed` fixes the sampling randomness; `progress(x)` is called after every turn with the episodes' worth
        of work just done (a turn is 1/max_turns of an episode; a finished episode adds what it had left), so a
        progress bar moves with the work and sums to the number of episodes.
        """
        return self.run_tasks([(s, k, None) for s, k in itertools.product(seeds, range(group_size))], seed,
                              progress)

    def run_tasks(self, tasks: Sequence[tuple[int, int, EnvSnapshot | None]], seed: int = 0,
                  progress: Callable[[float], None] | None = None) -> list[Episode]:
        """Play episodes given as (puzzle seed, sample index, starting snapshot or None); return them in order."""
        generator = torch.Generator().manual_seed(seed)
        rng = np.random.default_rng(seed)
        max_turns = self.config.limits()[0]
        pending = iter(tasks)
        finished: list[Episode] = []
        active: list[_Live] = []
        while True:
            while len(active) < self.config.max_concurrent:
                nxt = next(pending, None)
                if nxt is None:
                    break
                active.append(self._start(*nxt))
            if not active:
                break
            for lv, out in zip(active, self._respond(active, generator, rng), strict=True):
                self._apply(lv, out)
            still, done_work = [], 0.0
            for lv in active:
                if lv.episode.done:
                    finished.append(lv.episode)
                    done_work += (max_turns - len(lv.episode.turns) + 1) / max_turns
                else:
                    still.append(lv)
                    done_work += 1 / max_turns
            if progress is not None:
                progress(done_work)
            active = still
        order = {id(e): i for i, e in enumerate(finished)}
        rank = {(t[0], t[1]): i for i, t in enumerate(tasks)}
        return sorted(finished, key=lambda e: (rank.get((e.seed, e.sample), len(rank)), order[id(e)]))
