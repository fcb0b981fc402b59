"""LoRA (peft) for any stage that trains: which layers get adapters and with what rank.

This module must never train anything: it only wraps a model so that its adapters are what trains.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

from spa_rl.config import Config, setting


@dataclass(kw_only=True)
class LoRAConfig(Config):
    """Low-rank adapters instead of full fine-tuning."""

    enabled: bool = setting(False, flag="--lora")
    """Train a LoRA adapter on every linear layer instead of all weights (the result is an adapter directory that
    `spa eval --model` loads)."""
    r: int = setting(16, ge=1, flag="--lora-r")
    """LoRA rank."""
    alpha: int = setting(32, ge=1, flag="--lora-alpha")
    """LoRA scaling numerator (the update is scaled by alpha / r)."""
    dropout: float = setting(0.05, ge=0, lt=1, flag="--lora-dropout")
    """Dropout on the adapters' input."""


def apply_lora(model: Any, config: LoRAConfig) -> Any:
    """`model` with trainable LoRA adapters if `config.enabled` (a model that already has adapters, e.g. one
    resumed from a checkpoint, gets its adapters made trainable and nothing else)."""
    if hasattr(model, "peft_config"):
        for name, p in model.named_parameters():
            p.requires_grad = "lora_" in name
        return model
    if not config.enabled:
        return model
    from peft import LoraConfig, get_peft_model

    with warnings.catch_warnings():  # peft reads transformers' deprecated `is_gradient_checkpointing`: not ours to fix
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        return get_peft_model(model, LoraConfig(r=config.r, lora_alpha=config.alpha, lora_dropout=config.dropout,
                                                target_modules="all-linear", task_type="CAUSAL_LM"))
