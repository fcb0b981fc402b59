"""The networks PPO trains: the policy (a causal LM scoring the tokens it sampled) and the critic (the same
network with a scalar value head), as `nn.Module`s whose `forward` returns only what the update needs at the
positions it asks for.

Both run the decoder once over right-padded sequences and project only the kept positions (a 49k vocabulary
makes full logits the largest tensor of a step). The critic is saved as the backbone in Hugging Face format
plus `value_head.safetensors`. This module must never hold RL maths: that is `core.py`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from spa_rl.models import decoder_mask, next_token_logits
from spa_rl.training.logprobs import token_logprobs_and_entropy

VALUE_HEAD = "value_head.safetensors"


class PolicyModel(nn.Module):
    """A causal LM as a policy: `forward(input_ids, keep)` gives, at each position t where `keep` [B, T-1] is set,
    the log-probability of token t+1 under `log_softmax(logits / temperature)` (the sampler's distribution) and
    the entropy of that distribution, both [K] in row-major order."""

    def __init__(self, lm: nn.Module, temperature: float = 1.0) -> None:
        super().__init__()
        self.lm = lm
        self.temperature = temperature if temperature > 0 else 1.0

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, keep: torch.Tensor,
                temperature: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """`temperature`: another than the sampler's (1.0 for the model's own likelihood, as SFT trains it)."""
        t = self.temperature if temperature is None else temperature
        logits = next_token_logits(self.lm, input_ids, attention_mask, keep)
        return token_logprobs_and_entropy(logits, input_ids[:, 1:][keep], t)


class ValueModel(nn.Module):
    """The critic: a causal LM's decoder with a linear head to one scalar per position. `forward(input_ids,
    attention_mask, keep)` gives, at each position t where `keep` [B, T-1] is set, the value of the state in
    which token t+1 is chosen (the hidden state at t), [K] in row-major order: the same positions as
    `PolicyModel`'s log-probs. The head starts at zero, so every value starts at 0."""

    def __init__(self, backbone: nn.Module, hidden_size: int) -> None:
        super().__init__()
        self.backbone = backbone
        self.value_head = nn.Linear(hidden_size, 1)
        nn.init.zeros_(self.value_head.weight)
        nn.init.zeros_(self.value_head.bias)

    @classmethod
    def from_causal_lm(cls, lm: nn.Module) -> ValueModel:
        """A critic on `lm`'s decoder (its output layer is dropped)."""
        return cls(lm.get_decoder(), lm.config.hidden_size)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        hidden = self.backbone(input_ids=input_ids, attention_mask=decoder_mask(attention_mask))
        selected = hidden.last_hidden_state[:, :-1][keep]
        return self.value_head(selected.to(self.value_head.weight.dtype)).squeeze(-1).float()

    def save(self, path: Path, state: dict[str, torch.Tensor] | None = None) -> None:
        """The backbone in HF format and the head beside it (`state`: weights replacing the module's own, e.g. fp32
        master copies, named as in `state_dict()`)."""
        state = state if state is not None else self.state_dict()
        backbone_state = {k.removeprefix("backbone."): v for k, v in state.items() if k.startswith("backbone.")}
        self.backbone.save_pretrained(path, state_dict=backbone_state)
        save_file({k.removeprefix("value_head."): v.detach().float().contiguous() for k, v in state.items()
                   if k.startswith("value_head.")}, str(path / VALUE_HEAD))

    def load_head(self, path: Path) -> None:
        """Load the head saved by `save` (the backbone is loaded by the caller from the same directory)."""
        weights = load_file(str(path / VALUE_HEAD))
        with torch.no_grad():
            self.value_head.weight.copy_(weights["weight"])
            self.value_head.bias.copy_(weights["bias"])


def load_backbone(path: str, device: Any) -> nn.Module:
    """The decoder saved by `ValueModel.save` (fp32)."""
    from transformers import AutoModel

    return AutoModel.from_pretrained(path, dtype=torch.float32, local_files_only=True).to(device)
