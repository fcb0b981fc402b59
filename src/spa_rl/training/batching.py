"""Cutting sequences into micro-batches for forward/backward passes, shared by every stage that trains.

A global batch (SFT's 16 turns, PPO's minibatch of 64 episodes) is cut into micro-batches that bound the
activation memory of one pass (`max_tokens`, padding included) and the compute thrown away on padding
(`max_padding`); gradients accumulate over them, so the update is the same. This module must never decide
what a batch holds, only how it is cut.
"""

from __future__ import annotations


def micro_batches(lengths: list[int], order: list[int], size: int, max_tokens: int = 0,
                  max_padding: float = 1.0) -> list[list[int]]:
    """`order` (indices into `lengths`, the sequences' token counts) cut into runs of at most `size` sequences,
    (if set) `max_tokens` padded tokens (a longer sequence goes alone), and at most a `max_padding` share of
    padding in each run. Sort `order` by length first to waste the least."""
    out: list[list[int]] = []
    for i in order:
        if out and len(out[-1]) < size:
            run = [lengths[j] for j in [*out[-1], i]]
            padded = len(run) * max(run)
            if (not max_tokens or padded <= max_tokens) and padded - sum(run) <= max_padding * padded:
                out[-1].append(i)
                continue
        out.append([i])
    return out
