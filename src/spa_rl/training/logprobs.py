"""Log-probabilities and entropies of chosen tokens from a language model's logits, without a [tokens x vocabulary]
fp32 tensor ever whole in memory: the one loss kernel that SFT's negative log-likelihood and the RL policy's
log-probs and entropy share.

Why ours: autograd through `log_softmax` (or `cross_entropy`) and an entropy keeps several fp32 copies of the
logits (five for log-probs with entropy), which cost a quarter of a policy micro-batch's forward and backward on a
CPU and most of SFT's activation memory beyond the decoder's (docs/benchmarks.md); the fused kernels that avoid
them (Liger's, Apple's cut cross-entropy) need Triton and a GPU. This module must never hold a model or a loss's
weighting: it maps logits to per-token numbers and back.
"""

from __future__ import annotations

import torch

LOGPROB_CHUNK_ROWS = 256
"""Rows of logits `token_logprobs_and_entropy` turns to fp32 at a time (256 x a 49k vocabulary: 50 MB)."""


def token_logprobs_and_entropy(logits: torch.Tensor, targets: torch.Tensor,
                               temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(log-prob of `targets` [K], entropy [K]) under `log_softmax(logits / temperature)`, from `logits` [K, V]
    (any float dtype; the arithmetic is at least fp32), both fp32 and differentiable with respect to `logits`.

    The same numbers as `log_softmax(...).gather(...)` and the softmax's entropy, computed `LOGPROB_CHUNK_ROWS`
    rows at a time with the gradient written out (d log p_y / dz = onehot(y) - p, dH / dz = -p (log p + H))."""
    return _LogprobEntropy.apply(logits, targets, float(temperature), True)


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """The log-probs of `token_logprobs_and_entropy` alone (SFT's NLL), without the entropy's arithmetic."""
    logp, _ = _LogprobEntropy.apply(logits, targets, float(temperature), False)
    return logp


class _LogprobEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor, temperature: float, with_entropy: bool):
        rows, ctx.compute = logits.shape[0], torch.promote_types(logits.dtype, torch.float32)
        logp = torch.empty(rows, dtype=torch.float32, device=logits.device)
        entropy, log_z = torch.empty_like(logp), torch.empty_like(logp)
        for start in range(0, rows, LOGPROB_CHUNK_ROWS):
            part = slice(start, start + LOGPROB_CHUNK_ROWS)
            z = logits[part].to(ctx.compute, copy=True)  # worked on in place
            if temperature != 1.0:
                z.div_(temperature)
            log_z[part] = torch.logsumexp(z, dim=-1)
            z.sub_(log_z[part, None])  # log p
            logp[part] = z.gather(-1, targets[part, None]).squeeze(-1)
            entropy[part] = -torch.linalg.vecdot(z.exp(), z) if with_entropy else 0.0
        ctx.save_for_backward(logits, targets, log_z, entropy)
        ctx.temperature, ctx.with_entropy = temperature, with_entropy
        return logp, entropy

    @staticmethod
    def backward(ctx, grad_logp: torch.Tensor | None, grad_entropy: torch.Tensor | None):
        logits, targets, log_z, entropy = ctx.saved_tensors
        t = ctx.temperature
        grad_logp = torch.zeros_like(log_z) if grad_logp is None else grad_logp
        if not ctx.with_entropy:
            grad_entropy = None  # the entropy was not computed: it has no gradient to pass on
        grad_entropy = torch.zeros_like(log_z) if grad_entropy is None else grad_entropy
        grad_logp, grad_entropy, log_z, entropy = (x.to(ctx.compute) for x in (grad_logp, grad_entropy, log_z, entropy))
        grad = torch.empty_like(logits)
        for start in range(0, logits.shape[0], LOGPROB_CHUNK_ROWS):
            part = slice(start, start + LOGPROB_CHUNK_ROWS)
            z = logits[part].to(ctx.compute, copy=True)  # worked on in place
            if t != 1.0:
                z.div_(t)
            z.sub_(log_z[part, None])  # log p
            p = z.exp()
            # -p * (g_logp + g_H * (log p + H)), then + g_logp at the target
            z.add_(entropy[part, None]).mul_(grad_entropy[part, None]).add_(grad_logp[part, None]).mul_(p).neg_()
            z.scatter_add_(-1, targets[part, None], grad_logp[part, None])
            if t != 1.0:
                z.div_(t)
            grad[part] = z
        return grad, None, None, None
