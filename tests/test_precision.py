"""Training precision: bf16 weights with an fp32 master copy."""

from __future__ import annotations

import copy

import torch
from conftest import build_tiny_model

from spa_rl.training import MasterWeights


def test_master_weights_accumulate_in_fp32_and_write_back_rounded(tokenizer):
    model = build_tiny_model(tokenizer, layers=1).train()
    reference = copy.deepcopy(model)
    master = MasterWeights(model)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    assert model.model.rotary_emb.inv_freq.dtype == torch.float32, "buffers keep their precision"
    assert all(m.dtype == torch.float32 for m in master.params)
    assert all(torch.equal(m, p) for m, p in zip(master.params, reference.parameters(), strict=True)), \
        "copied before the cast"
    ids = torch.randint(0, 100, (2, 9))
    grads = []
    for rows in (ids[:1], ids[1:]):  # two micro-batches
        model(input_ids=rows).logits.float().square().mean().backward()
        grads.append([p.grad.float().clone() for p in model.parameters()])
        master.accumulate()
        assert all(p.grad is None for p in model.parameters())
    for m, g0, g1 in zip(master.params, *grads, strict=True):
        assert torch.equal(m.grad, g0 + g1), "summed in fp32, not in bf16"
    opt = torch.optim.SGD(master.params, lr=0.5)
    opt.step()
    master.write_back()
    for m, p in zip(master.params, model.parameters(), strict=True):
        assert torch.equal(p, m.to(torch.bfloat16))
    state = master.state_dict(model)
    assert state["lm_head.weight"] is state["model.embed_tokens.weight"], "tied weights stay one tensor"
    assert all(v.dtype == torch.float32 for v in state.values() if v.is_floating_point())
