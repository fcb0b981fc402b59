"""The optimizer side of training, shared by SFT and RL: AdamW, the learning-rate schedule, gradient
clipping, precision (autocast or fp32 master weights) and data parallelism, bundled as one `Trainable` per
model being trained (SFT has one; PPO has an actor and a critic).

Data parallelism (`accelerate launch --num_processes N`): every process holds the whole model and its own
share of the data; `step()` sums the gradients over the processes before clipping and updating, so every
process makes the same update (callers scale their losses by the global batch). This is what DDP does, done
once per optimizer step on the gradients the optimizer sees (the fp32 master copies in bf16 training), so
processes may run different numbers of micro-batches and bf16 accumulation never rounds. Sharding a model too
large for one device (FSDP) is not implemented.

This module must never decide what is trained on or how a loss is computed: it only applies gradients.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from transformers import get_constant_schedule_with_warmup, get_cosine_schedule_with_warmup

from spa_rl.training.precision import MasterWeights, Precision


def adamw(params: list[torch.nn.Parameter], **kwargs: Any) -> torch.optim.AdamW:
    """AdamW, with PyTorch's fused kernel where it exists (CPU and CUDA): one pass over the parameters instead
    of a dozen operations per tensor. Same update rule and state layout, so checkpoints resume either way."""
    if all(p.device.type in ("cpu", "cuda") and p.dtype in (torch.float32, torch.bfloat16) for p in params):
        try:
            return torch.optim.AdamW(params, fused=True, **kwargs)
        except RuntimeError:  # PyTorch before 2.4 fuses on CUDA only
            pass
    return torch.optim.AdamW(params, **kwargs)


def make_accelerator(device: str) -> Any:
    """An `accelerate.Accelerator` for `device` (`cpu`, `cuda`, ...): one process here, or each process of an
    `accelerate launch`. Mixed precision is ours (`Trainable.autocast`), so accelerate is asked for none."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    # accelerate keeps process-wide state from the first Accelerator; a second run in the same process (tests,
    # self-play rounds) may ask for another device, so start from a clean state
    AcceleratorState._reset_state(True)
    return Accelerator(cpu=not device.startswith("cuda"), mixed_precision="no")


class Trainable:
    """A model being trained: AdamW over its trainable parameters (or their fp32 master copies when the
    precision is bf16), a warm-up schedule, gradient clipping, and the gradient sum over processes.

    Per optimizer step: `backward(loss)` for each micro-batch (inside `autocast()`), then `step()`.
    """

    def __init__(self, model: torch.nn.Module, precision: Precision, accelerator: Any, *, lr: float,
                 total_steps: int, betas: tuple[float, float] = (0.9, 0.999), weight_decay: float = 0.0,
                 warmup_ratio: float = 0.0, schedule: str = "cosine", max_grad_norm: float = 1.0) -> None:
        self.precision = precision
        self.accelerator = accelerator
        self.max_grad_norm = max_grad_norm
        self.master = MasterWeights(model) if precision.master_weights else None  # copies fp32, then casts
        self.params = self.master.params if self.master else [p for p in model.parameters() if p.requires_grad]
        optimizer = adamw(self.params, lr=lr, betas=tuple(betas), weight_decay=weight_decay)
        warmup = int(warmup_ratio * total_steps)
        if schedule not in ("cosine", "constant"):
            raise ValueError(f"unknown schedule {schedule!r}: use cosine or constant")
        if schedule == "cosine":
            self.scheduler = get_cosine_schedule_with_warmup(optimizer, warmup, total_steps)
        else:
            self.scheduler = get_constant_schedule_with_warmup(optimizer, warmup)
        self.model, self.optimizer = model, optimizer

    @contextlib.contextmanager
    def autocast(self) -> Iterator[None]:
        """Where forward passes run (bf16 autocast for the `bf16-autocast` precision)."""
        if self.precision.autocast is None:
            yield
            return
        with torch.autocast(self.accelerator.device.type, dtype=self.precision.autocast):
            yield

    def backward(self, loss: torch.Tensor) -> None:
        """Accumulate the gradients of `loss` (into the fp32 master copies when there are any)."""
        loss.backward()
        if self.master:
            self.master.accumulate()

    def step(self) -> float:
        """Sum the gradients over processes, clip, update, advance the schedule; return the gradient norm before
        clipping."""
        if self.accelerator.num_processes > 1:
            for p in self.params:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                torch.distributed.all_reduce(p.grad)
        grad_norm = float(torch.nn.utils.clip_grad_norm_(self.params, self.max_grad_norm))
        self.optimizer.step()
        if self.master:
            self.master.write_back()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        return grad_norm

    @property
    def lr(self) -> float:
        return float(self.scheduler.get_last_lr()[0])

    def weights(self) -> dict[str, torch.Tensor] | None:
        """The weights to save: the fp32 master copies when there are any (None: the model's own)."""
        return self.master.state_dict(self.model) if self.master else None

    def state_dict(self) -> dict[str, Any]:
        return {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
