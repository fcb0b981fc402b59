"""The agent's text protocol (docs/method.md §3): the instruction and turn messages it reads, and the parser of what it
writes.

A conversation is a list of chat messages: a system message, a first user message with the instruction and
turn 1, then alternating assistant turns and user messages with the reward and the next state. The parser
turns a response into observation, reasoning, prediction and actions, and says whether the format was
followed. Model text is untrusted input: `parse_response` must never raise, whatever it is given, and
nothing here may depend on a particular model family's special tokens.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Literal, get_args

from spa_rl.envs.base import PuzzleEnv

Format = Literal["world-model", "plain"]
FORMATS: tuple[str, ...] = get_args(Format)
"""Response formats: world-model (observation and prediction inside think) and plain (the baselines')."""
SYSTEM_PROMPT = "You're a helpful assistant."
ACTION_SEPARATOR = "||"


@dataclass
class ParsedResponse:
    """What the agent wrote, split into its parts. Fields are None/empty when the part is missing."""

    observation: str | None = None
    """Contents of `<observation>`: the agent's belief about the current state."""
    reasoning: str = ""
    """The rest of `<think>` (or of the whole text when there is no `<think>`)."""
    prediction: str | None = None
    """Contents of `<prediction>`: the state the agent expects after its actions."""
    actions: list[str] = field(default_factory=list)
    """The actions inside `<answer>`, split on `||`, stripped, empty ones dropped."""
    format_ok: bool = False
    """Whether the response follows the required format exactly (tags once each, in order, nothing outside)."""


_TAG = {t: re.compile(rf"<{t}>(.*?)</{t}>", re.DOTALL) for t in ("think", "observation", "prediction", "answer")}
_STRICT = re.compile(r"^\s*<think>(?P<think>.*?)</think>\s*<answer>(?P<answer>.*?)</answer>\s*$", re.DOTALL)
_WM_THINK = re.compile(r"^\s*<observation>(?P<obs>.*?)</observation>(?P<mid>.*?)<prediction>(?P<pred>.*?)"
                       r"</prediction>(?P<tail>.*)$", re.DOTALL)
_ANY_TAG = re.compile(r"</?(?:think|observation|prediction|answer)>")


def parse_response(text: object, fmt: str = "world-model") -> ParsedResponse:
    """Parse a response; never raises. Fields are extracted even when the format is broken."""
    try:
        if isinstance(text, bytes):
            text = text.decode("utf-8", errors="replace")
        return _parse(text if isinstance(text, str) else "", fmt)
    except Exception:
        return ParsedResponse()


def _first(tag: str, text: str) -> str | None:
    m = _TAG[tag].search(text)
    return m.group(1).strip() if m else None


def _parse(text: str, fmt: str) -> ParsedResponse:
    think = _first("think", text)
    answer = _first("answer", text)
    observation = _first("observation", think if think is not None else text)
    prediction = _first("prediction", think if think is not None else text)
    reasoning = think if think is not None else text
    reasoning = _TAG["observation"].sub(" ", reasoning)
    reasoning = _TAG["prediction"].sub(" ", reasoning)
    reasoning = _TAG["answer"].sub(" ", reasoning) if think is None else reasoning
    reasoning = " ".join(reasoning.split())
    actions = [a.strip() for a in answer.split(ACTION_SEPARATOR)] if answer is not None else []
    actions = [a for a in actions if a]

    strict = _STRICT.match(text)
    ok = strict is not None and not _ANY_TAG.search(strict.group("answer"))
    if ok:
        inner = strict.group("think")
        if fmt == "world-model":
            wm = _WM_THINK.match(inner)
            ok = wm is not None and not any(_ANY_TAG.search(wm.group(g)) for g in ("obs", "mid", "pred", "tail"))
        else:
            ok = not re.search(r"</?(?:think|answer)>", inner)
    return ParsedResponse(observation, reasoning, prediction, actions, bool(ok and actions))


def format_response(observation: str | None, reasoning: str, prediction: str | None, actions: list[str],
                    fmt: str = "world-model") -> str:
    """The canonical response text for these parts (used by scripted policies and the SFT rewrite)."""
    answer = f" {ACTION_SEPARATOR} ".join(actions)
    if fmt == "world-model":
        return (f"<think> <observation>\n{observation}\n</observation> {reasoning} <prediction>\n{prediction}\n"
                f"</prediction> </think> <answer> {answer} </answer>")
    return f"<think> {reasoning} </think> <answer> {answer} </answer>"


# ----------------------------------------------------------------------------------------------- messages
def format_demand(fmt: str, max_new_tokens: int) -> str:
    """The closing sentence of every turn message: the required response format."""
    if fmt == "world-model":
        shape = ("<think> <observation> [the current state] </observation> [your reasoning] <prediction> "
                 "[the state after your actions] </prediction> </think> <answer> [your actions] </answer>")
    else:
        shape = "<think> [your reasoning] </think> <answer> [your actions] </answer>"
    return (f"Always output: {shape} with no extra text. Strictly follow this format. "
            f"Max response length: {max_new_tokens} tokens.")


def turn_message(turn: int, state: str, actions_left: int, fmt: str, max_new_tokens: int,
                 reward: float | None = None) -> str:
    """A turn's user text: the previous turn's reward (after turn 1), the state and the format demand."""
    head = f"Reward:\n{reward:g}\n\n" if reward is not None else ""
    return (f"{head}Turn {turn}:\nState:\n{state}\nYou have {actions_left} actions left. "
            f"{format_demand(fmt, max_new_tokens)}")


def first_messages(env: PuzzleEnv, state: str, render: str, fmt: str, max_actions_per_turn: int,
                   actions_left: int, max_new_tokens: int) -> list[dict[str, str]]:
    """The conversation before the agent's first turn: system message and the first user message."""
    user = (env.instruction(render, max_actions_per_turn) + "\n\n"
            + turn_message(1, state, actions_left, fmt, max_new_tokens))
    return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": user}]
