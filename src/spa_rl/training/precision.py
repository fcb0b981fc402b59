"""Numeric precision: the one place that decides which dtype a model runs and trains in, and fp32 master
weights for bf16 training.

`resolve_precision(dtype, device, training)` turns a user's `--dtype` into a `Precision` for every stage, so
inference and training agree on the same machine: `auto` means bf16 only where the hardware computes it
natively (a GPU with bf16 units, a CPU with AVX-512 BF16 or AMX), else fp32 (inference on an older GPU: fp16).
`MasterWeights` is the Megatron-LM/DeepSpeed scheme for training in bf16. This module must never pick a
precision anywhere but `resolve_precision`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from spa_rl.errors import SpaError

DTYPES = ("auto", "bf16", "bf16-autocast", "fp16", "fp32")
"""What `--dtype` accepts (`bf16-autocast` is for training only, `fp16` for inference only)."""


@dataclass(frozen=True)
class Precision:
    """How a model is held and computed."""

    name: str
    """`bf16`, `bf16-autocast`, `fp16` or `fp32`."""

    @property
    def weights(self) -> torch.dtype:
        """The dtype of the model's weights."""
        return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.name, torch.float32)

    @property
    def autocast(self) -> torch.dtype | None:
        """The dtype forward passes autocast to (None: none)."""
        return torch.bfloat16 if self.name == "bf16-autocast" else None

    @property
    def master_weights(self) -> bool:
        """Training keeps fp32 master weights and optimizer state beside bf16 weights."""
        return self.name == "bf16"


def cpu_supports_bf16() -> bool:
    """Whether this CPU has native bf16 matrix instructions (AVX-512 BF16 or AMX)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def native_bf16(device: str) -> bool:
    """Whether `device` (`cpu`, `cuda`, `cuda:1`, ...) computes bf16 natively (emulation does not count)."""
    if device.startswith("cuda"):
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False)
    if device == "cpu":
        return cpu_supports_bf16()
    return False


def check_dtype(dtype: str, training: bool) -> None:
    """Refuse a `--dtype` this use cannot run: fp16 for training (it needs loss scaling), bf16-autocast outside
    it. Stages call it from their settings' checks, before any work."""
    if dtype not in DTYPES:
        raise SpaError(f"unknown dtype {dtype!r}: use one of {', '.join(DTYPES)}")
    if training and dtype == "fp16":
        raise SpaError("dtype fp16 cannot be trained here (it needs loss scaling): use bf16, bf16-autocast or fp32")
    if not training and dtype == "bf16-autocast":
        raise SpaError("dtype bf16-autocast is a training precision: use bf16, fp16 or fp32 here")


def resolve_precision(dtype: str, device: str, training: bool = False) -> Precision:
    """The precision for `--dtype` on `device` (already resolved, not `auto`), after `check_dtype`."""
    check_dtype(dtype, training)
    if dtype == "auto":
        if native_bf16(device):
            return Precision("bf16")
        return Precision("fp16" if device.startswith("cuda") and not training else "fp32")
    return Precision(dtype)


class MasterWeights:
    """bf16 training with fp32 master weights, as Megatron-LM and DeepSpeed do it: the model's weights,
    activations and gradients are bf16, so forward and backward have no casts and move half the bytes; after
    every backward the gradients are added into fp32 copies (accumulation over micro-batches stays exact), the
    optimizer updates fp32 weights and keeps fp32 state, and the model gets the update rounded to bf16.

    Against bf16 autocast over fp32 weights (which re-casts every weight in every pass and keeps the residual
    stream in fp32), measured on a CPU with native bf16 (docs/benchmarks.md): 1.0-1.1x the tokens/s (attention,
    which both run in bf16, takes much of the step) and the same losses. `MasterWeights(model)` copies the
    trainable parameters at full precision and then casts the model, so build it on the fp32 model.
    Checkpoints are written from the fp32 copies (`state_dict`), so a resumed run continues from the exact
    weights. It must never let the optimizer see a bf16 tensor.
    """

    def __init__(self, model: torch.nn.Module, dtype: torch.dtype = torch.bfloat16) -> None:
        self.model_params = [p for p in model.parameters() if p.requires_grad]
        self.params = [torch.nn.Parameter(p.detach().float().clone()) for p in self.model_params]
        for p in model.parameters():  # not buffers: RoPE's inv_freq stays fp32, as from_pretrained keeps it
            p.data = p.data.to(dtype)

    def accumulate(self) -> None:
        """Add the model's gradients into the fp32 copies and free them (call after every backward)."""
        for master, p in zip(self.params, self.model_params, strict=True):
            if p.grad is not None:
                if master.grad is None:
                    master.grad = p.grad.float()
                else:
                    master.grad.add_(p.grad)
                p.grad = None

    @torch.no_grad()
    def write_back(self) -> None:
        """Copy the fp32 weights into the model (call after every optimizer step)."""
        for master, p in zip(self.params, self.model_params, strict=True):
            p.copy_(master)

    def state_dict(self, model: torch.nn.Module) -> dict[str, torch.Tensor]:
        """The model's state dict with the fp32 copies in place of its trainable weights (tied names too)."""
        masters = {id(p): master.detach() for master, p in zip(self.params, self.model_params, strict=True)}
        state = model.state_dict()
        for name, p in model.named_parameters(remove_duplicate=False):
            if id(p) in masters:
                state[name] = masters[id(p)]
        return state
