"""Model loading: local directories, LoRA adapters, dtype/device choice, offline errors."""

from __future__ import annotations

import pytest
import torch
from conftest import build_tiny_model

from spa_rl.errors import SpaError
from spa_rl.models import checkpoint_layers, load_model, next_token_logits
from spa_rl.training.precision import resolve_precision


def test_load_local_directory(tiny_model_dir):
    lm = load_model(str(tiny_model_dir), dtype="fp32")
    assert lm.device == "cpu" and lm.model.dtype == torch.float32 and lm.tokenizer.padding_side == "left"
    assert lm.tokenizer.chat_template


def test_load_lora_adapter_merged_and_unmerged(tiny_model_dir, tmp_path):
    from peft import LoraConfig, get_peft_model

    base = load_model(str(tiny_model_dir), dtype="fp32").model
    peft_model = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    adapter = tmp_path / "adapter"
    peft_model.save_pretrained(adapter)
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        want = peft_model(input_ids=ids).logits
    for merge in (True, False):
        lm = load_model(str(adapter), dtype="fp32", merge_adapter=merge)
        with torch.no_grad():
            got = lm.model(input_ids=ids).logits
        assert torch.allclose(got, want, atol=1e-5)


def test_unknown_model_is_a_one_line_error():
    with pytest.raises(SpaError, match="not available offline"):
        load_model("someone/not-a-model-here")


def test_one_precision_choice_for_inference_and_training(monkeypatch):
    """`auto` gives bf16 only with native bf16, the same for inference and training; each refuses what it
    cannot run."""
    import spa_rl.training.precision as precision

    assert resolve_precision("fp32", "cpu").weights == torch.float32
    assert resolve_precision("bf16", "cpu").weights == torch.bfloat16
    for native in (True, False):
        monkeypatch.setattr(precision, "cpu_supports_bf16", lambda native=native: native)
        inference, training = resolve_precision("auto", "cpu"), resolve_precision("auto", "cpu", training=True)
        assert inference.name == training.name == ("bf16" if native else "fp32")
        assert training.master_weights == native
    with pytest.raises(SpaError, match="unknown dtype"):
        resolve_precision("int3", "cpu")
    with pytest.raises(SpaError, match="needs loss scaling"):
        resolve_precision("fp16", "cpu", training=True)
    with pytest.raises(SpaError, match="training precision"):
        resolve_precision("bf16-autocast", "cpu")
    assert resolve_precision("bf16-autocast", "cpu", training=True).autocast == torch.bfloat16


@pytest.mark.parametrize("lora", [False, True])
def test_next_token_logits_of_a_padded_batch_equal_each_sequence_alone(tokenizer, lora):
    """Right padding is dropped from the attention call; the kept positions still see only their own row,
    with or without a PEFT wrapper (which hides the decoder behind get_base_model)."""
    model = build_tiny_model(tokenizer).eval()
    if lora:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=4, target_modules="all-linear", task_type="CAUSAL_LM"))
    g = torch.Generator().manual_seed(0)
    seqs = [torch.randint(5, 1000, (n,), generator=g) for n in (9, 4, 7)]
    ids = torch.zeros((3, 9), dtype=torch.long)
    mask = torch.zeros((3, 9), dtype=torch.long)
    keep = torch.zeros((3, 8), dtype=torch.bool)
    for r, s in enumerate(seqs):
        ids[r, :len(s)], mask[r, :len(s)], keep[r, :len(s) - 1] = s, 1, True
    with torch.no_grad():
        got = next_token_logits(model, ids, mask, keep)
        want = torch.cat([model(input_ids=s[None]).logits[0, :-1] for s in seqs])
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    # left-padded rows keep their mask: the pads stay invisible (RoPE sees relative positions only)
    left = torch.stack([torch.cat([torch.zeros(9 - len(s), dtype=torch.long), s]) for s in seqs])
    lmask = (torch.arange(9)[None] >= torch.tensor([9 - len(s) for s in seqs])[:, None]).long()
    last = torch.zeros((3, 8), dtype=torch.bool)
    last[:, -1] = True
    with torch.no_grad():
        got_left = next_token_logits(model, left, lmask, last)
    last_of_each = torch.tensor([7, 7 + 3, 7 + 3 + 6])
    torch.testing.assert_close(got_left, want[last_of_each], atol=1e-4, rtol=1e-4)


def test_next_token_logits_keep_the_logit_scaling_of_families_that_apply_one(tokenizer):
    """Gemma2 soft-caps its logits in `forward`: the result must be the model's own logits, not lm_head(hidden)."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    torch.manual_seed(0)
    config = Gemma2Config(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=2, num_key_value_heads=1, head_dim=16, final_logit_softcapping=0.5,
                          pad_token_id=tokenizer.pad_token_id)
    model = Gemma2ForCausalLM(config).eval()
    ids = torch.randint(5, 1000, (2, 6))
    mask = torch.tensor([[1] * 6, [1] * 4 + [0] * 2])
    keep = torch.tensor([[True] * 5, [True] * 3 + [False] * 2])
    with torch.no_grad():
        got = next_token_logits(model, ids, mask, keep)
        want = torch.cat([model(input_ids=ids[:1]).logits[0, :-1], model(input_ids=ids[1:, :4]).logits[0, :-1]])
    assert got.abs().max() <= 0.5
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_checkpoint_layers_recomputes_in_backward_with_the_same_gradients(tokenizer):
    """Activation checkpointing (`--gradient-checkpointing`): each layer runs again in the backward pass, in eval
    mode too, the gradients are those of the plain model, and passes without gradients run once as before."""
    plain, checkpointed = build_tiny_model(tokenizer, seed=3), build_tiny_model(tokenizer, seed=3)
    assert checkpoint_layers(checkpointed) == 2 and checkpoint_layers(checkpointed) == 2  # idempotent
    calls = []
    checkpointed.model.layers[0].mlp.register_forward_pre_hook(lambda *_: calls.append(1))  # (the recomputation
    # stops early, inside the MLP, once it has what backward needs: a post-hook would not see it)
    ids = torch.randint(0, len(tokenizer), (2, 17), generator=torch.Generator().manual_seed(0))
    for model in (plain, checkpointed):
        model(input_ids=ids, labels=ids).loss.backward()
    assert len(calls) == 2  # forward, then the recomputation in backward
    for (name, a), (_, b) in zip(plain.named_parameters(), checkpointed.named_parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-6, msg=name)
    with torch.no_grad():
        torch.testing.assert_close(checkpointed(input_ids=ids).logits, plain(input_ids=ids).logits)
    assert len(calls) == 3
