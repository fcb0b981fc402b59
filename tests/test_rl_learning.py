"""The trainer learns: a tiny model, warm-started by SFT on random play so that it writes the format and says
Left or Right about equally, is trained with PPO (GAE with a critic, and GRPO) on a corridor whose goal is
always one step to the right. Its success rate must rise clearly within a few dozen steps."""

from __future__ import annotations

import statistics

import pytest
import torch
from conftest import collect_data, register_corridors

from spa_rl import envs
from spa_rl.io import read_jsonl
from spa_rl.rl.config import RLConfig
from spa_rl.rl.trainer import train_rl
from spa_rl.sft import SFTConfig, train_sft


@pytest.fixture(scope="module")
def warm_model(tokenizer, tmp_path_factory):
    from transformers import LlamaConfig, LlamaForCausalLM

    register_corridors()
    root = tmp_path_factory.mktemp("learning")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                         tie_word_embeddings=True, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id)
    LlamaForCausalLM(config).save_pretrained(root / "base")
    tokenizer.save_pretrained(root / "base")
    collect_data("corridor-right", root / "data", policy="random", puzzles=8, samples=2, format="plain",
                 render="grid", max_new_tokens=24, val_fraction=0.0)  # every puzzle is the same: two rows, Left, Right
    train_sft(SFTConfig.make(data=str(root / "data"), out=str(root / "sft"), model=str(root / "base"), epochs=300,
                             lr=3e-3, warmup_ratio=0.05, batch_size=2, tensorboard=False, dtype="fp32",
                             save_epochs=False), quiet=True)
    yield root / "sft" / "model"
    envs.VARIANTS.pop("corridor", None)
    envs.VARIANTS.pop("corridor-right", None)


@pytest.mark.slow
@pytest.mark.parametrize("advantage", ["gae", "grpo"])
def test_reward_rises_on_a_trivially_learnable_task(warm_model, tmp_path, advantage):
    config = RLConfig.make(out=str(tmp_path / advantage), model=str(warm_model), env="corridor-right", render="grid",
                           format="plain", steps=16, puzzles_per_step=4, samples_per_puzzle=4, keep_ratio=1.0,
                           minibatch_size=16, micro_batch_size=16, max_new_tokens=24, actor_lr=5e-4, critic_lr=1e-3,
                           entropy_coef=0.0, advantage=advantage, eval_before=False, eval_puzzles=2, eval_samples=4,
                           dtype="fp32", tensorboard=False)
    train_rl(config, quiet=True)
    success = [r["rollout/success"] for r in read_jsonl(tmp_path / advantage / "metrics.jsonl")
               if "rollout/success" in r]
    first, last = success[0], statistics.mean(success[-6:])  # the first step's episodes precede any update
    assert 0.1 < first < 0.9, f"the warm start must say both Left and Right (success {first:.2f})"
    assert last > first + 0.25 and last > 0.85, f"success {first:.2f} -> {last:.2f}"
