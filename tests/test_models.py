"""Model loading: local directories, LoRA adapters, dtype/device choice, offline errors."""

from __future__ import annotations

import pytest
import torch

from spa_rl.errors import SpaError
from spa_rl.models import load_model, pick_dtype


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


def test_dtype_choice():
    assert pick_dtype("cpu", "fp32") == torch.float32 and pick_dtype("cpu", "bf16") == torch.bfloat16
    assert pick_dtype("cpu") in (torch.bfloat16, torch.float32)
    with pytest.raises(SpaError, match="unknown dtype"):
        pick_dtype("cpu", "int3")
