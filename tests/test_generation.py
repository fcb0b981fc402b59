"""Generation backends: recorded log-probabilities are those of a fresh forward pass."""

from __future__ import annotations

import pytest
import torch
from conftest import build_tiny_model

from spa_rl.errors import SpaError
from spa_rl.generation import KVCacheBackend, SamplingConfig, make_backend, sample_next


def _fresh_logprobs(model, prompt, response, temperature):
    ids = torch.tensor([prompt + response])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0].float()
    logp = torch.log_softmax(logits / temperature, dim=-1)
    pos = torch.arange(len(prompt) - 1, len(prompt) + len(response) - 1)
    return logp[pos, torch.tensor(response)]


@pytest.mark.parametrize("backend", ["kv", "hf"])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_logprobs_match_a_fresh_forward_pass(tokenizer, backend, temperature):
    model = build_tiny_model(tokenizer)
    prefix = tokenizer("<|im_start|>user\nshared instruction text", add_special_tokens=False)["input_ids"]
    prompts = [prefix + tokenizer(s, add_special_tokens=False)["input_ids"]
               for s in ("a", "a much longer second prompt here", "a", "third one", "")]
    gen = make_backend(backend, model, tokenizer)
    outs = gen.generate(prompts, SamplingConfig(max_new_tokens=12, temperature=temperature),
                        torch.Generator().manual_seed(0))
    assert len(outs) == len(prompts)
    for prompt, out in zip(prompts, outs, strict=True):
        assert 1 <= len(out.token_ids) == len(out.logprobs) <= 12
        assert out.finished == (out.token_ids[-1] in gen.stop_ids)
        fresh = _fresh_logprobs(model, prompt, out.token_ids, temperature)
        assert torch.allclose(torch.tensor(out.logprobs), fresh, atol=2e-4), (out.logprobs, fresh.tolist())


def test_kv_backend_stops_rows_at_their_stop_token(tokenizer):
    model = build_tiny_model(tokenizer)
    eos = tokenizer.eos_token_id
    with torch.no_grad():  # make the model love the stop token after a few steps: bias its embedding
        model.model.embed_tokens.weight[eos] *= 0
    gen = KVCacheBackend(model, tokenizer)
    outs = gen.generate([[5, 6, 7], [8, 9]], SamplingConfig(max_new_tokens=30, temperature=1.0),
                        torch.Generator().manual_seed(1))
    for o in outs:
        assert eos not in o.token_ids[:-1], "nothing is recorded after a stop token"


def test_identical_prompts_still_sample_independently(tokenizer):
    model = build_tiny_model(tokenizer)
    gen = KVCacheBackend(model, tokenizer)
    outs = gen.generate([[11, 12, 13]] * 6, SamplingConfig(max_new_tokens=8), torch.Generator().manual_seed(0))
    assert len({tuple(o.token_ids) for o in outs}) > 1


def test_same_seed_same_samples(tokenizer):
    model = build_tiny_model(tokenizer)
    gen = KVCacheBackend(model, tokenizer)
    runs = [gen.generate([[1, 2, 3], [4, 5]], SamplingConfig(max_new_tokens=6), torch.Generator().manual_seed(3))
            for _ in range(2)]
    assert [o.token_ids for o in runs[0]] == [o.token_ids for o in runs[1]]


def test_sampling_filters():
    logits = torch.tensor([[0.0, 1.0, 2.0, 3.0]]).repeat(2000, 1)
    g = torch.Generator().manual_seed(0)
    tok, lp = sample_next(logits, SamplingConfig(top_k=2), g)
    assert set(tok.tolist()) == {2, 3}
    tok, _ = sample_next(logits, SamplingConfig(top_p=0.5), g)
    assert set(tok.tolist()) == {3}
    tok, lp = sample_next(logits, SamplingConfig(temperature=0), g)
    assert set(tok.tolist()) == {3} and torch.allclose(lp, torch.log_softmax(logits[0], -1)[3])
    tok, _ = sample_next(logits, SamplingConfig(), g)
    freq = torch.bincount(tok, minlength=4).float() / len(tok)
    assert torch.allclose(freq, torch.softmax(logits[0], -1), atol=0.04)


def test_unknown_backend(tokenizer):
    with pytest.raises(SpaError, match="unknown generation backend"):
        make_backend("vllm-not-here", build_tiny_model(tokenizer), tokenizer)
