"""The chunked log-prob and entropy kernel against the plain expressions."""

from __future__ import annotations

import pytest
import torch

import spa_rl.training.logprobs as logprobs
from spa_rl.training.logprobs import token_logprobs, token_logprobs_and_entropy


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_chunked_logprobs_and_entropy_match_the_plain_expressions_and_their_gradients(monkeypatch, dtype,
                                                                                     temperature):
    """Values and the hand-written gradient against autograd through log_softmax and the entropy in float64,
    over chunk boundaries (7 rows, chunks of 3), with both outputs in the loss; the input is left as it was (the
    chunks are worked on in place)."""
    monkeypatch.setattr(logprobs, "LOGPROB_CHUNK_ROWS", 3)
    generator = torch.Generator().manual_seed(0)
    logits = (torch.randn(7, 11, generator=generator, dtype=torch.float64) * 3).to(dtype).requires_grad_(True)
    before = logits.detach().clone()
    targets = torch.randint(0, 11, (7,), generator=generator)
    w_logp, w_entropy = torch.randn(7, generator=generator), torch.randn(7, generator=generator)
    logp, entropy = token_logprobs_and_entropy(logits, targets, temperature)
    (logp * w_logp + entropy * w_entropy).sum().backward()
    assert logp.dtype == entropy.dtype == torch.float32 and logits.grad.dtype == dtype
    assert torch.equal(logits.detach(), before)
    exact = logits.detach().double().requires_grad_(True)
    scaled = exact / temperature
    ref_logp = torch.log_softmax(scaled, -1).gather(-1, targets[:, None]).squeeze(-1)
    ref_entropy = torch.logsumexp(scaled, -1) - (torch.softmax(scaled, -1) * scaled).sum(-1)
    (ref_logp * w_logp.double() + ref_entropy * w_entropy.double()).sum().backward()
    torch.testing.assert_close(logp.double(), ref_logp, rtol=0, atol=1e-5)
    torch.testing.assert_close(entropy.double(), ref_entropy, rtol=0, atol=1e-5)
    tol = 1e-2 if dtype == torch.bfloat16 else 1e-5  # the gradient is returned in the logits' dtype
    torch.testing.assert_close(logits.grad.double(), exact.grad, rtol=tol, atol=tol)
    only_logp, _ = token_logprobs_and_entropy(logits.detach().requires_grad_(True), targets, temperature)
    only_logp.sum().backward()  # an unused output gets no gradient (None), which must not fail
    alone = logits.detach().requires_grad_(True)
    got = token_logprobs(alone, targets, temperature)
    (got * w_logp).sum().backward()
    torch.testing.assert_close(got.double(), ref_logp, rtol=0, atol=1e-5)
    exact.grad = None
    ref_alone = torch.log_softmax(exact / temperature, -1).gather(-1, targets[:, None]).squeeze(-1)
    (ref_alone * w_logp.double()).sum().backward()
    torch.testing.assert_close(alone.grad.double(), exact.grad, rtol=tol, atol=tol)
