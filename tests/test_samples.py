"""Episodes as training text: loss masks token by token, packing a trajectory into one sequence."""

from __future__ import annotations

import copy
import re

import pytest
import torch
from conftest import build_tiny_model, collect_data

from spa_rl.models import right_padded_batch
from spa_rl.samples import encode_conversation, encode_sample, load_dataset, pack_trajectories
from spa_rl.sft import token_nll_sum

CONTENT = ("<think> <observation>\n_P\nG_\n</observation> go down-left <prediction>\n__\n√_\n</prediction> "
           "</think> <answer> Left || Down </answer>")
ROW = {"prompt": [{"role": "system", "content": "You're a helpful assistant."},
                  {"role": "user", "content": "Turn 1:\nState:\n_P\nG_"}],
       "completion": [{"role": "assistant", "content": CONTENT}]}


def test_full_loss_covers_exactly_the_assistant_turn(tokenizer):
    ids, mask = encode_sample(tokenizer, ROW, "full")
    first = mask.index(1)
    assert all(mask[first:first + sum(mask)])  # one contiguous span
    assert tokenizer.decode(ids[first:first + sum(mask)]) == CONTENT + tokenizer.eos_token
    prompt_len = len(tokenizer.apply_chat_template(ROW["prompt"], tokenize=True, add_generation_prompt=True,
                                                   return_dict=False))
    assert first == prompt_len, "no system, user or template token is trained on"


def test_masked_loss_drops_exactly_the_state_contents(tokenizer):
    ids, full = encode_sample(tokenizer, ROW, "full")
    _, masked = encode_sample(tokenizer, ROW, "masked")
    kept = tokenizer.decode([i for i, m in zip(ids, masked, strict=True) if m])
    assert kept == re.sub(r"<(observation|prediction)>.*?</\1>", r"<\1></\1>", CONTENT, flags=re.S) + \
        tokenizer.eos_token
    dropped = tokenizer.decode([i for i, f, m in zip(ids, full, masked, strict=True) if f and not m])
    assert dropped == "\n_P\nG_\n\n__\n√_\n"


def test_packed_trajectories_give_the_same_loss_terms_as_one_row_per_turn(tokenizer, tmp_path):
    """One sequence per trajectory with the loss on all its turns: the same loss tokens, the same summed NLL
    (each turn sees the same context), for both loss variants; fewer tokens in all."""
    collect_data("sokoban", str(tmp_path / "d"), policy="random", puzzles=4, samples=2, val_fraction=0.0)
    rows = load_dataset(str(tmp_path / "d"))[0]
    packed = pack_trajectories(rows)
    assert len(packed) < len(rows) and sum(len(t) for _, t in packed) == len(rows)
    model = build_tiny_model(tokenizer).eval()
    for loss in ("full", "masked"):
        per_row = [encode_sample(tokenizer, r, loss) for r in rows]
        per_traj = [encode_conversation(tokenizer, m, loss, t) for m, t in packed]
        assert sum(map(sum, (m for _, m in per_row))) == sum(map(sum, (m for _, m in per_traj)))
        assert sum(len(x) for x, _ in per_traj) < 0.6 * sum(len(x) for x, _ in per_row)
        with torch.no_grad():
            a = sum(float(token_nll_sum(model, right_padded_batch([per_row[i]], 0))[0]) for i in range(len(per_row)))
            b = sum(float(token_nll_sum(model, right_padded_batch([per_traj[i]], 0))[0]) for i in range(len(per_traj)))
        assert a == pytest.approx(b, rel=1e-4)


def test_mask_never_leaves_the_assistant_turn_when_eos_is_not_the_end_of_turn(tokenizer):
    """A template whose end-of-turn token is not the EOS (as Gemma's): the mask still stops at the turn's end."""
    tok = copy.deepcopy(tokenizer)
    tok.eos_token = "<|endoftext|>"
    messages = ROW["prompt"] + ROW["completion"] + [{"role": "user", "content": "Turn 2:\nState:\n__\n√_"},
                                                    {"role": "assistant", "content": CONTENT}]
    ids, mask = encode_conversation(tok, messages, "full", [2])
    text = tok.decode([t for t, m in zip(ids, mask, strict=True) if m])
    assert "Turn 2" not in text and text.count("<answer>") == 1 and text.rstrip().endswith("<|im_end|>")
