"""Shared test helpers: building envs by name."""

from __future__ import annotations

import pytest

from spa_rl import envs


@pytest.fixture
def make():
    """`make(name, **kw)` -> the unwrapped env."""
    return lambda name, **kw: envs.make(name, **kw).unwrapped


@pytest.fixture(scope="session")
def tokenizer():
    """The real SmolLM2 tokenizer and chat template (from the embedded model, converted once)."""
    from spa_rl.models import embedded_model_path, load_tokenizer

    return load_tokenizer(str(embedded_model_path()))


def build_tiny_model(tokenizer, seed: int = 0, layers: int = 2):
    """A tiny randomly initialised Llama-style model over the real tokenizer's vocabulary (fp32)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                         tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    model = LlamaForCausalLM(config).eval()
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


@pytest.fixture(scope="session")
def tiny_model_dir(tokenizer, tmp_path_factory):
    """A directory holding a tiny random model and the real tokenizer, loadable by `load_model`."""
    path = tmp_path_factory.mktemp("tiny-model")
    build_tiny_model(tokenizer).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def collect_data(env: str, out, **settings):
    """`spa collect` from Python: settings by name, as on the command line (quiet)."""
    from spa_rl.collect import CollectConfig, collect

    return collect(CollectConfig.make(env=env, out=str(out), **settings), quiet=True)
