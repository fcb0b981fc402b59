"""Micro-batches sized from the memory the machine has, and settings that cannot fit refused up front."""

from __future__ import annotations

import pytest
from transformers import LlamaConfig

import spa_rl.training.memory as memory
from spa_rl.errors import SpaError
from spa_rl.training.memory import GIB, activation_bytes_per_token, plan_micro_batch_tokens, state_bytes
from spa_rl.training.precision import Precision

SMOLLM2 = LlamaConfig(num_hidden_layers=30, hidden_size=576, intermediate_size=1536, vocab_size=49152)


def test_the_estimates_match_what_was_measured_on_the_embedded_model():
    """bf16: 1.35-1.4 MB a token at `spa train`'s peaks (docs/benchmarks.md), 0.33 MB with checkpointing for a
    pass alone; fp32 1.6 MB for a pass alone: the estimates may exceed these (the safe side) but not undercut."""
    bf16, fp32 = Precision("bf16"), Precision("fp32")
    assert activation_bytes_per_token(SMOLLM2, bf16) == pytest.approx(1.37e6, rel=0.05)
    assert 0.33e6 <= activation_bytes_per_token(SMOLLM2, bf16, checkpointing=True) <= 0.45e6
    assert 1.6e6 <= activation_bytes_per_token(SMOLLM2, fp32) <= 3e6
    # bf16 with master weights: 2 bytes a weight, 18 a trained one (fp32 copy, gradients, AdamW's moments)
    assert state_bytes(100, 100, bf16) == 100 * 20 and state_bytes(100, 0, bf16) == 200
    assert state_bytes(100, 10, fp32) == 100 * 4 + 10 * 12


def test_auto_sizing_fills_the_budget_and_a_setting_that_cannot_fit_is_refused(monkeypatch):
    monkeypatch.setattr(memory, "available_bytes", lambda device: 20 * GIB)
    per_token = 1e6
    plan = plan_micro_batch_tokens(0, 0, "cpu", 4 * GIB, per_token, "spa train")  # the laptop budget: 8 GiB
    assert plan.budget == 8 * GIB
    assert plan.peak(plan.tokens) <= 8 * GIB < plan.peak(plan.tokens + 1)
    assert "GiB" in plan.describe()
    bigger = plan_micro_batch_tokens(0, 16, "cpu", 4 * GIB, per_token, "spa train")
    assert bigger.tokens > plan.tokens and bigger.peak(bigger.tokens) <= 16 * GIB
    assert plan_micro_batch_tokens(5000, 0, "cpu", 4 * GIB, per_token, "spa train").tokens == 5000
    with pytest.raises(SpaError, match=r"spa train: micro-batches of 100,000 tokens need about 99\.6 GiB.*"
                                       r"set --micro-batch-tokens \d+ or less"):
        plan_micro_batch_tokens(100_000, 0, "cpu", 4 * GIB, per_token, "spa train")
    with pytest.raises(SpaError, match=r"training state needs about 7\.0 GiB.*--lora or --gradient-checkpointing"):
        plan_micro_batch_tokens(0, 0, "cpu", 7 * GIB, per_token, "spa sft")
