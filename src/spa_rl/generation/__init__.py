"""Batched sampling from a causal LM behind a small backend interface (`GenerationBackend`).

Two backends: `kv` (default, `kv_cache.py`: our decode loop, with `lean.py`'s decode step for Llama-family
models) and `hf` (Hugging Face `generate`, the reference). A faster engine (vLLM, SGLang, llama.cpp) can slot in
by implementing `GenerationBackend`. This package must never know about environments or prompts.
"""

from __future__ import annotations

from typing import Any

from spa_rl.errors import UnknownNameError
from spa_rl.generation.hf import HFGenerateBackend
from spa_rl.generation.kv_cache import KVCacheBackend
from spa_rl.generation.sampling import (
    Generation,
    GenerationBackend,
    SamplingConfig,
    sample_next,
    sample_weighted,
    stop_token_ids,
)

BACKENDS = {"kv": KVCacheBackend, "hf": HFGenerateBackend}


def make_backend(name: str, model: Any, tokenizer: Any) -> GenerationBackend:
    """The backend called `name` (`kv` or `hf`) for this model."""
    if name not in BACKENDS:
        raise UnknownNameError(f"unknown generation backend {name!r}: use one of {', '.join(BACKENDS)}")
    return BACKENDS[name](model, tokenizer)


__all__ = ["BACKENDS", "Generation", "GenerationBackend", "HFGenerateBackend", "KVCacheBackend", "SamplingConfig",
           "make_backend", "sample_next", "sample_weighted", "stop_token_ids"]
