"""The `hf` generation backend: Hugging Face `generate` with sampling, the reference the `kv` backend is
measured and tested against. This module must never know about environments or prompts.
"""

from __future__ import annotations

from typing import Any

import torch

from spa_rl.generation.kv_cache import left_pad
from spa_rl.generation.sampling import Generation, SamplingConfig, stop_token_ids


class HFGenerateBackend:
    """Hugging Face `generate` with sampling; log-probs recomputed from the returned logits."""

    def __init__(self, model: Any, tokenizer: Any) -> None:
        self.model = model
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.stop_ids = stop_token_ids(model, tokenizer)

    def reset(self) -> None:
        """Nothing to forget: `generate` keeps nothing between calls."""

    @torch.inference_mode()
    def generate(self, prompts: list[list[int]], config: SamplingConfig,
                 generator: torch.Generator | None = None) -> list[Generation]:
        if not prompts:
            return []
        device = next(self.model.parameters()).device
        ids, mask = left_pad(prompts, self.pad_id, device)
        if generator is not None:  # generate has no generator argument: seed the global RNG from ours
            torch.manual_seed(int(torch.randint(0, 2**62, (1,), generator=generator)))
        greedy = config.temperature <= 0
        out = self.model.generate(
            input_ids=ids, attention_mask=mask, max_new_tokens=config.max_new_tokens, do_sample=not greedy,
            temperature=None if greedy else config.temperature, top_p=None if greedy else config.top_p,
            top_k=None if greedy else (config.top_k or None), eos_token_id=self.stop_ids, pad_token_id=self.pad_id,
            return_dict_in_generate=True, output_logits=True)
        new = out.sequences[:, ids.shape[1]:]
        temp = 1.0 if greedy else config.temperature
        logp = torch.stack([torch.log_softmax(step.float() / temp, dim=-1) for step in out.logits], dim=1)
        chosen = logp.gather(2, new[:, :, None]).squeeze(2)
        result = []
        for i in range(len(prompts)):
            toks, lps = new[i].tolist(), chosen[i].tolist()
            end = next((j for j, t in enumerate(toks) if t in self.stop_ids), None)
            if end is not None:
                result.append(Generation(toks[:end + 1], lps[:end + 1], True))
            else:
                result.append(Generation(toks, lps, False))
        return result
