"""Generation backends: recorded log-probabilities are those of a fresh forward pass."""

from __future__ import annotations

import pytest
import torch
from conftest import build_tiny_model

from spa_rl.errors import SpaError
from spa_rl.generation import KVCacheBackend, SamplingConfig, make_backend, sample_next, sample_weighted


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


def test_two_level_sampling_draws_in_proportion_and_never_a_zero_weight():
    """Vocabulary not a multiple of the block, zero-weight columns and whole zero blocks, a lone positive
    weight in the padded last block: frequencies follow the weights and no zero-weight index comes out."""
    g = torch.Generator().manual_seed(0)
    w = torch.rand(37, generator=g) ** 3
    w[8:16] = 0.0  # a whole block of zeros
    w[[0, 20, 36]] = 0.0
    n = 40_000
    tok = sample_weighted(w.repeat(n, 1), g, block=8)
    freq = torch.bincount(tok, minlength=37).float() / n
    assert tok.max() < 37 and (freq[w == 0] == 0).all()
    assert torch.allclose(freq, w / w.sum(), atol=0.01)
    lone = torch.zeros(5, 37)
    lone[:, 35] = 1e-30  # tiny but positive
    assert sample_weighted(lone, g, block=8).tolist() == [35] * 5
    assert sample_weighted(torch.tensor([[0.0, 2.0]]).repeat(100, 1), g, block=256).tolist() == [1] * 100
    denormal = torch.zeros(500, 600)
    denormal[:, 3] = 1e-45  # total weight below the normal floats: still an index inside the vocabulary
    assert sample_weighted(denormal, g).max() < 600


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


def _tiny_qwen2(tokenizer):
    """A tiny Qwen2 model: biases on q/k/v, unlike Llama."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(1)
    config = Qwen2Config(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                         tie_word_embeddings=True)
    model = Qwen2ForCausalLM(config).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_proj.bias.normal_(0, 0.5)
            layer.self_attn.k_proj.bias.normal_(0, 0.5)
    return model


@pytest.mark.parametrize("family", ["llama", "qwen2"])
@pytest.mark.parametrize("prepack", [True, False])
def test_lean_decoder_matches_the_model_forward(tokenizer, family, prepack, monkeypatch):
    """The lean decode step (shared-prefix attention, fused weights, prepacked or plain) gives the model's own
    log-probs, for prompts with and without a shared prefix, and in a second call that continues the first
    one's rows."""
    from spa_rl.generation.lean import LeanDecoder

    if not prepack:  # what runs where oneDNN cannot prepack (GPUs, other CPUs)
        monkeypatch.setattr(LeanDecoder, "_can_prepack", staticmethod(lambda weight, batch: False))
    model = build_tiny_model(tokenizer, seed=2) if family == "llama" else _tiny_qwen2(tokenizer)
    with torch.no_grad():  # random init gives near-uniform attention, which would hide attention errors
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(40.0)
            layer.self_attn.k_proj.weight.mul_(40.0)
    lean, plain = KVCacheBackend(model, tokenizer), KVCacheBackend(model, tokenizer, lean=False)
    assert lean._lean is not None and plain._lean is None
    assert lean._lean.prepare() and lean._lean._packed == (prepack and torch.backends.mkldnn.is_available())
    shared = list(range(100, 140))
    first = [shared + [7, 8, 9], shared + [7], shared + [5, 6, 7, 8, 9, 10], shared + [7, 8, 9]]
    config = SamplingConfig(max_new_tokens=10, temperature=0.0)
    outs = {}
    for name, backend in (("lean", lean), ("plain", plain)):
        a = backend.generate(first, config)
        second = [p + o.token_ids + [11, 12] for p, o in zip(first, a, strict=True)]
        b = backend.generate(second, config)
        c = backend.generate([[3, 4, 5], [6, 7]], config)  # nothing shared
        outs[name] = (a, b, c)
    for got, ref in zip(outs["lean"], outs["plain"], strict=True):
        for g, r in zip(got, ref, strict=True):
            assert g.token_ids == r.token_ids
            assert torch.allclose(torch.tensor(g.logprobs), torch.tensor(r.logprobs), atol=1e-4)


def test_lean_decoder_groups_of_copies_match_a_fresh_forward_pass(tokenizer, monkeypatch):
    """Rows that are copies of one prompt attend their prompt's columns once per group (the second cascade
    level): sampled log-probs equal a fresh forward pass, both while the groups are whole and after rows leave
    the batch at different times (a sparse group layout), and in a next turn that continues every row."""
    from spa_rl.generation import lean as lean_decode

    model = build_tiny_model(tokenizer, seed=5)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(40.0)
            layer.self_attn.k_proj.weight.mul_(40.0)
    layouts = []
    real_of = lean_decode.RowGroups.of

    def spy(*args, **kwargs):
        layouts.append(real_of(*args, **kwargs))
        return layouts[-1]

    monkeypatch.setattr(lean_decode.RowGroups, "of", spy)
    backend = KVCacheBackend(model, tokenizer)
    backend.stop_ids = list(range(3, len(tokenizer), 12))  # ~8% per token: rows end at different steps
    shared = list(range(100, 130))
    prompts = [shared + [7, 8, 9]] * 3 + [shared + [5]] * 3 + [shared + [6, 4, 2, 1]] * 2
    outs = backend.generate(prompts, SamplingConfig(max_new_tokens=24), torch.Generator().manual_seed(0))
    assert layouts and layouts[0].dense is False  # groups of 3, 3, 2
    assert any(not g.dense and g.index.numel() < len(prompts) for g in layouts)
    for prompt, out in zip(prompts, outs, strict=True):
        fresh = _fresh_logprobs(model, prompt, out.token_ids, 1.0)
        assert torch.allclose(torch.tensor(out.logprobs), fresh, atol=2e-4)
    layouts.clear()
    turn2 = [p + o.token_ids + [11, 12] for p, o in zip(prompts, outs, strict=True)]
    assert all(r >= 0 for r in backend._match(turn2))  # every row continues its stored cache
    outs = backend.generate(turn2, SamplingConfig(max_new_tokens=24), torch.Generator().manual_seed(2))
    for prompt, out in zip(turn2, outs, strict=True):
        fresh = _fresh_logprobs(model, prompt, out.token_ids, 1.0)
        assert torch.allclose(torch.tensor(out.logprobs), fresh, atol=2e-4)
    layouts.clear()
    backend.reset()
    even = [shared + [7, 8, 9]] * 3 + [shared + [5]] * 3
    outs = backend.generate(even, SamplingConfig(max_new_tokens=24), torch.Generator().manual_seed(1))
    assert layouts[0].dense
    for prompt, out in zip(even, outs, strict=True):
        fresh = _fresh_logprobs(model, prompt, out.token_ids, 1.0)
        assert torch.allclose(torch.tensor(out.logprobs), fresh, atol=2e-4)


def test_lean_decoder_follows_weight_updates_and_declines_unknown_models(tokenizer):
    """Every way a trainer changes weights (a fused optimizer step, `.data` writes, LoRA wrapping after the
    backend exists, adapters switched off) is seen by the next generation call."""
    from peft import LoraConfig, get_peft_model

    from spa_rl.generation.lean import LeanDecoder

    model = build_tiny_model(tokenizer, seed=4)
    backend = KVCacheBackend(model, tokenizer)
    prompt = [[20, 21, 22, 23]]
    config = SamplingConfig(max_new_tokens=6, temperature=0.0)

    def check_against_plain_forward() -> list[float]:
        backend.reset()
        got = backend.generate(prompt, config)[0]
        ref = KVCacheBackend(model, tokenizer, lean=False).generate(prompt, config)[0]
        assert got.token_ids == ref.token_ids
        assert torch.allclose(torch.tensor(got.logprobs), torch.tensor(ref.logprobs), atol=1e-4)
        return got.logprobs

    before = check_against_plain_forward()
    with torch.no_grad():  # writes that do not move the version counter
        for layer in model.model.layers:
            layer.mlp.up_proj.weight.data.mul_(3.0)
            layer.self_attn.k_proj.weight.data += 0.3
    after = check_against_plain_forward()
    assert after != before
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=0.05, fused=True)
    model(input_ids=torch.tensor(prompt), labels=torch.tensor(prompt)).loss.backward()
    opt.step()
    model.eval()
    assert check_against_plain_forward() != after
    lora = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj", "v_proj", "down_proj"])).eval()
    with torch.no_grad():  # PEFT starts B at zero: an adapter that changes nothing would hide a missed update
        for name, p in lora.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5, generator=torch.Generator().manual_seed(len(name)))
    # wrapped in place: the backend built on the base model, and one on the PEFT model, fold the adapters in
    assert LeanDecoder.supports(model) and LeanDecoder.build(lora) is not None
    with_adapter = check_against_plain_forward()
    with lora.disable_adapter():
        without = check_against_plain_forward()
    assert without != with_adapter, "the adapters changed the model, and the lean step saw it"
    peft_backend = KVCacheBackend(lora, tokenizer)
    got = peft_backend.generate(prompt, config)[0]
    backend.reset()
    assert peft_backend._lean is not None and got.token_ids == backend.generate(prompt, config)[0].token_ids
    assert LeanDecoder.build(torch.nn.Module()) is None
    from peft import inject_adapter_in_model

    head_lora = inject_adapter_in_model(LoraConfig(r=2, target_modules=["lm_head"]), build_tiny_model(tokenizer))
    assert not LeanDecoder.supports(head_lora)  # an adapter on the output projection is not bypassed
