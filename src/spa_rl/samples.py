"""Episodes as training text: the layer below every stage that turns played episodes into SFT rows and rows into
token ids with a loss mask. `spa collect` writes its dataset with it, `spa sft` reads and encodes that dataset, and
`spa train` encodes its own episodes the same way (the world-model loss during RL), so the three stages agree on
what a sample is without importing each other.

- `episode_samples`: one SFT row per assistant turn, with the true states rewritten into `<observation>` and
  `<prediction>` (docs/method.md §4).
- `load_dataset`: a `spa collect` directory's rows and manifest, checked.
- `encode_conversation`: chat-templated ids and the loss mask, found by character offsets so that it is exact for
  any chat template; `pack_trajectories`: a trajectory's turns as one sequence.

It must never put loss on a token outside an assistant turn, keep a turn whose true states it does not know, or
import a stage.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from spa_rl.errors import SpaError
from spa_rl.generation import stop_token_ids
from spa_rl.io import read_json, read_jsonl
from spa_rl.outputs import stage_of
from spa_rl.prompts import format_response
from spa_rl.rollout import Episode, Turn

DATASET_STAGE = "collect"
"""The stage whose output directory holds a dataset (`spa collect`)."""
LOSSES = ("full", "masked")
"""`full`: every token of the assistant turn (SPA); `masked`: the contents of `<observation>` and `<prediction>`
get no loss, their tags do (the paper's ablation)."""
_HIDDEN = re.compile(r"<(observation|prediction)>(.*?)</\1>", re.DOTALL)


# ------------------------------------------------------------------------------------------ episodes -> rows
def trajectory_id(env: str, seed: int, sample: int, round_: int = 0) -> str:
    return f"{env}/{round_}/{seed}/{sample}"


def rewrite_turn(turn: Turn, fmt: str, copy_prediction: bool = False) -> str:
    """The turn's response with the true states in its tags (`copy_prediction`: the current state as the
    prediction too), its reasoning kept, its executed actions as answer."""
    prediction = turn.state_before if copy_prediction else turn.state_after
    return format_response(turn.state_before, turn.parsed.reasoning, prediction, list(turn.actions), fmt)


def episode_samples(episode: Episode, fmt: str, render: str, filter_malformed: bool, meta: dict,
                    round_: int = 0, rewrite: bool = True, copy_prediction: bool = False) -> tuple[list[dict], int]:
    """SFT rows of one episode and the number of turns dropped as malformed. `rewrite=False` keeps the agent's own
    responses, beliefs included (the paper's self-belief ablation); `copy_prediction` rewrites the prediction
    as the current state (see `CollectConfig.copy_prediction`).

    A dropped turn also ends the trajectory's samples: later turns would condition on a history the model was
    never trained to produce.
    """
    rows: list[dict] = []
    history = list(episode.messages[:2])
    tid = trajectory_id(episode.env, episode.seed, episode.sample, round_)
    dropped = 0
    for i, turn in enumerate(episode.turns):
        if filter_malformed and (not turn.parsed.format_ok or not turn.actions):
            dropped = len(episode.turns) - i
            break
        completion = {"role": "assistant",
                      "content": rewrite_turn(turn, fmt, copy_prediction) if rewrite else turn.response}
        rows.append({
            "prompt": [dict(m) for m in history],
            "completion": [completion],
            "meta": {"env": episode.env, "render": render, "format": fmt, "seed": episode.seed,
                     "sample": episode.sample, "turn": turn.turn, "trajectory": tid,
                     "state_before": turn.state_before, "state_after": turn.state_after,
                     "actions": list(turn.actions), "success": episode.success, "round": round_, **meta},
        })
        history.append(completion)
        user_index = 2 * (i + 1) + 1  # messages: system, user, (assistant, user)*
        if user_index < len(episode.messages):
            history.append(dict(episode.messages[user_index]))
    return rows, dropped


# ------------------------------------------------------------------------------------------ the dataset
def load_dataset(data_dir: str, expected_env: str | None = None) -> tuple[list[dict], list[dict], dict]:
    """(train rows, validation rows, manifest) of a self-play dataset, checked."""
    root = Path(data_dir)
    manifest_path = root / "manifest.json"
    made_by = stage_of(root) if root.is_dir() else None
    if made_by not in (None, DATASET_STAGE):
        raise SpaError(f"{root} holds the output of `spa {made_by}`, not a dataset: pass a directory made by "
                       f"`spa collect`")
    if not manifest_path.is_file():
        if made_by == DATASET_STAGE:
            raise SpaError(f"the collection in {root} has not finished: rerun the same `spa collect` command first")
        raise SpaError(f"{root} is not a dataset (no manifest.json): create one with `spa collect --out {root}`")
    manifest = read_json(manifest_path, "dataset (collect it again)")
    if expected_env is not None and manifest.get("env") != expected_env:
        raise SpaError(f"{root} was collected on {manifest.get('env')!r}, not {expected_env!r}: use a dataset of "
                       f"{expected_env} or drop --env")
    train = read_jsonl(root / "train.jsonl")
    val = read_jsonl(root / "val.jsonl") if (root / "val.jsonl").is_file() else []
    if not train:
        raise SpaError(f"{root / 'train.jsonl'} has no rows: collect more data")
    for name, rows in (("train.jsonl", train), ("val.jsonl", val)):
        for n, row in enumerate(rows, 1):
            if not isinstance(row.get("prompt"), list) or not isinstance(row.get("completion"), list) \
                    or not row["completion"] or row["completion"][-1].get("role") != "assistant":
                raise SpaError(f"{root / name} row {n} is not a prompt/completion chat sample")
            env = row.get("meta", {}).get("env")
            if env is not None and env != manifest.get("env"):
                raise SpaError(f"{root / name} row {n} is from env {env!r} but the dataset is "
                               f"{manifest.get('env')!r}: datasets must not mix envs")
    return train, val, manifest


# ------------------------------------------------------------------------------------------ rows -> tokens
def row_sequence(row: dict) -> tuple[list[dict], list[int]]:
    """(messages, assistant indices with loss) of one dataset row on its own: its reply gets the loss."""
    messages = row["prompt"] + row["completion"]
    return messages, [len(messages) - 1]


def encode_sample(tokenizer: Any, row: dict, loss: str) -> tuple[list[int], list[int]]:
    """(input ids, loss mask) of one sample: the mask is 1 on the assistant turn's tokens (see module doc)."""
    messages, targets = row_sequence(row)
    return encode_conversation(tokenizer, messages, loss, targets)


def encode_conversation(tokenizer: Any, messages: list[dict], loss: str,
                        targets: list[int]) -> tuple[list[int], list[int]]:
    """(input ids, loss mask) of a chat conversation with the loss on the assistant messages at `targets`."""
    if loss not in LOSSES:
        raise SpaError(f"unknown loss {loss!r}: use one of {', '.join(LOSSES)}")
    full_text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)
    enc = tokenizer(full_text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    mask = [0] * len(ids)
    stop_ids = set(stop_token_ids(None, tokenizer))
    for k in targets:
        prompt_text = tokenizer.apply_chat_template(messages[:k], tokenize=False, add_generation_prompt=True)
        turn_text = tokenizer.apply_chat_template(messages[:k + 1], tokenize=False, add_generation_prompt=False)
        content = messages[k]["content"]
        if not (full_text.startswith(prompt_text) and full_text.startswith(turn_text)):
            raise SpaError("this chat template does not render a conversation as prompt + reply; SFT needs it to")
        start, turn_end = len(prompt_text), len(turn_text)
        at = full_text.find(content, start, turn_end)
        if at < 0:
            raise SpaError("the chat template changed the assistant text; SFT needs it verbatim")
        end = at + len(content)
        hidden = [(m.start(2) + at, m.end(2) + at) for m in _HIDDEN.finditer(content)] if loss == "masked" else []
        for i, (a, b) in enumerate(offsets):
            if a < start:
                continue
            if a >= turn_end:  # never past this turn, even if the template's end-of-turn is not a stop token
                break
            if a >= end:  # after the content: the end-of-turn token(s) up to and including the stop token
                mask[i] = 1
                if ids[i] in stop_ids:
                    break
                continue
            if any(a < h_end and b > h_start for h_start, h_end in hidden):
                continue
            mask[i] = 1
    return ids, mask


def pack_trajectories(rows: list[dict]) -> list[tuple[list[dict], list[int]]]:
    """(messages, assistant indices with loss) per training sequence: the rows of one trajectory become one
    sequence, the longest row's conversation with the loss on every turn that has a row of its own.

    A turn's row is its conversation so far (earlier turns rewritten) plus its reply, so it is a prefix of the
    trajectory's last row: one forward pass over the last row gives every turn's loss with the same context as
    its own row, at a fraction of the tokens. Rows that are not such a prefix (other datasets) stay separate.
    """
    groups: dict[str, list[dict]] = {}
    loose: list[tuple[list[dict], list[int]]] = []
    for row in rows:
        key = row.get("meta", {}).get("trajectory")
        if key is None:
            loose.append(row_sequence(row))
        else:
            groups.setdefault(key, []).append(row)
    packed = []
    for members in groups.values():
        longest = max(members, key=lambda r: len(r["prompt"]) + len(r["completion"]))
        messages, _ = row_sequence(longest)
        targets = set()
        for row in members:
            conv, (last,) = row_sequence(row)
            if conv == messages[:len(conv)]:
                targets.add(last)
            else:
                loose.append((conv, [last]))
        packed.append((messages, sorted(targets)))
    return packed + loose
