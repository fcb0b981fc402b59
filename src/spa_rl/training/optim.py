"""The optimizer side of training, shared by SFT and RL: AdamW, the learning-rate schedule, gradient
clipping, precision (autocast or fp32 master weights) and data parallelism, bundled as one `Trainable` per
model being trained (SFT has one; PPO has an actor and a critic).

Data parallelism (`accelerate launch --num_processes N`): every process holds the whole model and its own
share of the data; `step()` sums the gradients over the processes before clipping and updating, so every
process makes the same update (callers scale their losses by the global batch). This is what DDP does, done
once per optimizer step on the gradients the optimizer sees (the fp32 master copies in bf16 training), so
processes may run different numbers of micro-batches and bf16 accumulation never rounds.

Sharded optimizer state (`shard=True`, ZeRO stage 1): with N processes each keeps the AdamW moments of 1/N of
the parameters (PyTorch's `ZeroRedundancyOptimizer`), updates those and broadcasts them, so AdamW's 8 bytes a
parameter become 8/N. Gradients are still summed whole, and every process still holds the whole model: sharding
the parameters themselves (FSDP, ZeRO stage 3) is not implemented, because the rollout engine generates from
whole weights in every process.

This module must never decide what is trained on or how a loss is computed: it only applies gradients.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from transformers import get_constant_schedule_with_warmup, get_cosine_schedule_with_warmup

from spa_rl.training.precision import MasterWeights, Precision


def adamw(params: list[torch.nn.Parameter], shard: bool = False, **kwargs: Any) -> torch.optim.Optimizer:
    """AdamW, with PyTorch's fused kernel where it exists (CPU and CUDA): one pass over the parameters instead
    of a dozen operations per tensor. Same update rule and state layout, so checkpoints resume either way.
    `shard`: each process of a distributed run keeps the state of its share of the parameters only."""
    fusable = all(p.device.type in ("cpu", "cuda") and p.dtype in (torch.float32, torch.bfloat16) for p in params)
    for fused in ([True, False] if fusable else [False]):
        options = {**kwargs, "fused": True} if fused else kwargs
        try:
            if shard:
                from torch.distributed.optim import ZeroRedundancyOptimizer

                return ZeroRedundancyOptimizer(params, optimizer_class=torch.optim.AdamW, **options)
            return torch.optim.AdamW(params, **options)
        except RuntimeError:  # PyTorch before 2.4 fuses on CUDA only
            if not fused:
                raise
    raise AssertionError("unreachable")


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
                 warmup_ratio: float = 0.0, schedule: str = "cosine", max_grad_norm: float = 1.0,
                 shard: bool = False) -> None:
        self.precision = precision
        self.accelerator = accelerator
        self.max_grad_norm = max_grad_norm
        self.master = MasterWeights(model) if precision.master_weights else None  # copies fp32, then casts
        self.params = self.master.params if self.master else [p for p in model.parameters() if p.requires_grad]
        self.sharded = shard and accelerator.num_processes > 1
        optimizer = adamw(self.params, shard=self.sharded, lr=lr, betas=tuple(betas), weight_decay=weight_decay)
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
    def state_share(self) -> float:
        """The share of the parameters (by elements) whose optimizer state this process holds (1 unsharded)."""
        if not self.sharded:
            return 1.0
        local = sum(p.numel() for group in self.optimizer.optim.param_groups for p in group["params"])
        return local / sum(p.numel() for p in self.params)

    @property
    def lr(self) -> float:
        return float(self.scheduler.get_last_lr()[0])

    def weights(self) -> dict[str, torch.Tensor] | None:
        """The weights to save: the fp32 master copies when there are any (None: the model's own)."""
        return self.master.state_dict(self.model) if self.master else None

    def state_dict(self) -> dict[str, Any]:
        """The optimizer's and schedule's states. Every process must call it (a sharded optimizer gathers its
        shards on the main process, where the whole state is returned; the others get theirs empty)."""
        if self.sharded:
            self.optimizer.consolidate_state_dict(to=0)
            optimizer = self.optimizer.state_dict() if self.accelerator.is_main_process else {}
        else:
            optimizer = self.optimizer.state_dict()
        return {"optimizer": optimizer, "scheduler": self.scheduler.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Load what `state_dict` returned on the main process (a sharded optimizer keeps its own share)."""
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
