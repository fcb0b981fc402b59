"""How a response is sampled, and what a generation backend returns.

A backend takes a batch of token-id prompts and returns, for each, the sampled tokens and each sampled
token's log-probability under the sampling distribution, `log_softmax(logits / temperature)` before any top-k
or top-p truncation (what PPO's ratio needs). `sample_next` is the sampler every backend of ours shares.
This module must never know about environments, prompts or a particular backend.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import torch

from spa_rl.config import Config, setting


@dataclass(kw_only=True)
class SamplingConfig(Config):
    """How to sample a response."""

    max_new_tokens: int = setting(256, ge=1)
    """Tokens generated at most per response."""
    temperature: float = setting(1.0, ge=0)
    """Softmax temperature; 0 means greedy decoding."""
    top_p: float = setting(1.0, gt=0, le=1)
    """Nucleus sampling mass (1.0: off)."""
    top_k: int = setting(0, ge=0)
    """Keep only the k most likely tokens (0: off)."""


@dataclass
class Generation:
    """One sampled response."""

    token_ids: list[int]
    """Generated tokens, including the stop token when one was produced."""
    logprobs: list[float]
    """Log-probability of each generated token under `log_softmax(logits / temperature)` (greedy: temperature 1)."""
    finished: bool
    """True if a stop token ended the response, False if `max_new_tokens` did."""


class GenerationBackend(Protocol):
    """Anything that can sample a batch of responses."""

    def generate(self, prompts: list[list[int]], config: SamplingConfig,
                 generator: torch.Generator | None = None) -> list[Generation]: ...

    def reset(self) -> None:
        """Forget whatever was kept between calls (a cache for the next turn): the weights may change next."""


def stop_token_ids(model: Any, tokenizer: Any) -> list[int]:
    """The ids that end an assistant turn: the generation config's EOS id(s), plus the tokenizer's EOS."""
    ids: set[int] = set()
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if isinstance(eos, int):
        ids.add(eos)
    elif eos:
        ids.update(int(i) for i in eos)
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    return sorted(ids)


def sample_next(logits: torch.Tensor, config: SamplingConfig,
                generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample one token per row from last-position `logits` [B, V]: (tokens [B], their log-probs [B])."""
    logits = logits.float()
    if config.temperature <= 0:
        tokens = logits.argmax(dim=-1)
        chosen = logits.gather(1, tokens[:, None]).squeeze(1)
        return tokens, chosen - torch.logsumexp(logits, dim=-1)
    scaled = logits / config.temperature if config.temperature != 1.0 else logits
    probs = torch.softmax(scaled, dim=-1)  # one fused pass (max, exp and sum as separate ops take ~2x longer)
    weights = probs
    if config.top_k and config.top_k < weights.shape[-1]:
        kth = torch.topk(weights, config.top_k, dim=-1).values[:, -1:]
        weights = weights.masked_fill(weights < kth, 0.0)
    if config.top_p < 1.0:
        sorted_w, order = torch.sort(weights, dim=-1, descending=True)
        cum = sorted_w.cumsum(dim=-1)
        drop = (cum - sorted_w) > config.top_p * cum[:, -1:]
        weights = weights.scatter(1, order, sorted_w.masked_fill(drop, 0.0))
    tokens = sample_weighted(weights, generator)
    return tokens, probs.gather(1, tokens[:, None]).squeeze(1).log()  # never log(0): zero weights are not drawn


def sample_weighted(weights: torch.Tensor, generator: torch.Generator | None, block: int = 256) -> torch.Tensor:
    """One index per row of `weights` [B, V] (non-negative, each row with some positive weight), drawn with
    probability proportional to its weight: inverse-CDF sampling in two levels (pick a block of `block`
    columns from the block sums, then a column inside it), so only one block per row needs a cumulative sum
    (one cumulative sum over whole rows, itself ~10x faster than `torch.multinomial` on CPU, was the slowest
    part of sampling; `benchmarks/decode_ops.py`). The index is always below V, and never one of zero weight
    while a row's total weight is a normal float (softmax outputs: total ~1)."""
    b, v = weights.shape
    if v % block:
        weights = torch.nn.functional.pad(weights, (0, block - v % block))
    blocks = weights.view(b, -1, block)
    cdf = blocks.sum(-1).cumsum(-1)  # [B, blocks]
    total = cdf[:, -1:]
    # u < total strictly, so the chosen block (cdf jumps above u there) has positive mass
    u = torch.minimum(torch.rand((b, 1), generator=generator, device=weights.device) * total, total * (1 - 2**-20))
    bi = torch.searchsorted(cdf, u, right=True).clamp_(max=cdf.shape[1] - 1)
    before = torch.where(bi > 0, cdf.gather(1, (bi - 1).clamp(min=0)), torch.zeros_like(u))
    inner = blocks[torch.arange(b, device=weights.device), bi[:, 0]].cumsum(-1)  # [B, block]
    r = torch.minimum((u - before).clamp_(min=0), inner[:, -1:] * (1 - 2**-20))
    ti = torch.searchsorted(inner, r, right=True).clamp_(max=block - 1)
    return (bi * block + ti).squeeze(1).clamp_(max=v - 1)
