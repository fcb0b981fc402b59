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
parameter become 8/N. Gradients are still summed whole, and every process still holds the whole model.

Sharded weights (`shard_weights=True`, FSDP / ZeRO stage 3, PyTorch's FSDP2 `fully_shard` on every decoder layer
and on the root): each process keeps 1/N of every weight, of its gradient and of its AdamW state, in fp32; a
layer's whole weights exist only while it runs (gathered in bf16 for bf16 training, with gradients reduced in
fp32: FSDP's mixed precision takes the place of the master copies). Every forward and backward pass is then a
collective, so all processes must run the same number of them: `in_lockstep` runs idle passes (`idle_loss`, a zero
loss through every weight) on a process with fewer micro-batches. Checkpoints gather full state dicts
(`torch.distributed.checkpoint.state_dict`), so they are the same files as an unsharded run's; `copy_into` fills
a whole copy for generation one gathered tensor at a time.

This module must never decide what is trained on or how a loss is computed: it only applies gradients.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any, TypeVar

import torch
from transformers import get_constant_schedule_with_warmup, get_cosine_schedule_with_warmup

from spa_rl.errors import SpaError
from spa_rl.training.precision import MasterWeights, Precision

T = TypeVar("T")


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


def shard_model(model: torch.nn.Module, precision: Precision) -> None:
    """FSDP2's `fully_shard` on every decoder layer of `model` (each gathered whole only while it runs) and on
    the root (embeddings, final norm, heads), in place. Under bf16 precision the fp32 shards are gathered in bf16
    and the gradients reduced in fp32 (FSDP's mixed precision, the counterpart of `MasterWeights`)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    from transformers.modeling_layers import GradientCheckpointingLayer

    mixed = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
             if precision.master_weights else MixedPrecisionPolicy())
    layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    if not layers:
        raise SpaError(f"shard_weights found no decoder layers in {type(model).__name__} (transformers' "
                       f"GradientCheckpointingLayer) to shard one by one: drop --shard-weights")
    for layer in layers:
        fully_shard(layer, mp_policy=mixed)
    fully_shard(model, mp_policy=mixed)


class Trainable:
    """A model being trained: AdamW over its trainable parameters (or their fp32 master copies when the
    precision is bf16), a warm-up schedule, gradient clipping, and the gradient sum over processes.

    Per optimizer step: `backward(loss)` for each micro-batch (inside `autocast()`), then `step()`.
    """

    def __init__(self, model: torch.nn.Module, precision: Precision, accelerator: Any, *, lr: float,
                 total_steps: int, betas: tuple[float, float] = (0.9, 0.999), weight_decay: float = 0.0,
                 warmup_ratio: float = 0.0, schedule: str = "cosine", max_grad_norm: float = 1.0,
                 shard: bool = False, shard_weights: bool = False) -> None:
        self.precision = precision
        self.accelerator = accelerator
        self.max_grad_norm = max_grad_norm
        self.fsdp = shard_weights and accelerator.num_processes > 1
        if self.fsdp:
            shard_model(model, precision)
        self.master = MasterWeights(model) if precision.master_weights and not self.fsdp else None  # fp32, casts
        self.params = self.master.params if self.master else [p for p in model.parameters() if p.requires_grad]
        self.sharded = shard and accelerator.num_processes > 1 and not self.fsdp
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

    def in_lockstep(self, micro: list[T], train: bool = True) -> Iterator[T]:
        """Yield this process's micro-batches (`micro`, for one pass over some rows). When every pass is a
        collective (sharded weights), then run idle passes (`idle_loss()`, backward when `train`) up to the most
        micro-batches any process has, so that every process runs the same passes. Consume it to the end."""
        extra = 0
        if self.fsdp:  # agree on the count before the first pass: every pass after it is a collective
            most = torch.tensor([len(micro)], device=self.accelerator.device)
            torch.distributed.all_reduce(most, op=torch.distributed.ReduceOp.MAX)
            extra = int(most) - len(micro)
        yield from micro
        for _ in range(extra):  # another process has more micro-batches: keep in step with it
            with self.autocast():
                loss = self.idle_loss()
                if train:
                    self.backward(loss)

    def idle_loss(self) -> torch.Tensor:
        """A pass of the model on one dummy token: 0, but computed through every weight, so that its backward
        takes part in the gradient reductions like a real micro-batch's while adding nothing. The model must
        take `(input_ids, attention_mask, keep)` as the RL models do."""
        ids = torch.zeros((1, 2), dtype=torch.long, device=self.accelerator.device)
        out = self.model(ids, torch.ones_like(ids), torch.ones((1, 1), dtype=torch.bool, device=ids.device))
        return (out[0] if isinstance(out, tuple) else out).sum() * 0.0

    def step(self) -> float:
        """Sum the gradients over processes, clip, update, advance the schedule; return the gradient norm before
        clipping."""
        if self.fsdp:  # each backward already reduced its share, as FSDP does, as the mean: make it the sum
            for p in self.params:
                if p.grad is not None:
                    p.grad.mul_(self.accelerator.num_processes)
        elif self.accelerator.num_processes > 1:
            for p in self.params:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                torch.distributed.all_reduce(p.grad)
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, self.max_grad_norm)
        grad_norm = float(grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm)
        self.optimizer.step()
        if self.master:
            self.master.write_back()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        return grad_norm

    @property
    def state_share(self) -> float:
        """The share of the parameters (by elements) whose optimizer state this process holds (1 unsharded)."""
        if self.fsdp:
            return sum(p.to_local().numel() for p in self.params) / sum(p.numel() for p in self.params)
        if not self.sharded:
            return 1.0
        local = sum(p.numel() for group in self.optimizer.optim.param_groups for p in group["params"])
        return local / sum(p.numel() for p in self.params)

    @property
    def lr(self) -> float:
        return float(self.scheduler.get_last_lr()[0])

    def weights(self) -> dict[str, torch.Tensor] | None:
        """The weights to save: the fp32 master copies when there are any (None: the model's own). Every process
        must call it: sharded weights are gathered whole on the main process (the others get an empty dict)."""
        if self.fsdp:
            return self._gathered()
        return self.master.state_dict(self.model) if self.master else None

    @torch.no_grad()
    def copy_into(self, model: torch.nn.Module, prefix: str = "") -> None:
        """Copy the current weights into `model` (a whole copy of `self.model`'s submodule `prefix`, e.g. a copy of
        the actor's language model for generation, at any dtype). Every process must call it when the weights are
        sharded: each tensor is gathered whole in turn, so at most one whole tensor is ever held beyond `model`."""
        target = dict(model.named_parameters(remove_duplicate=False))
        for name, p in self.model.named_parameters():
            if name.startswith(prefix):
                whole = p.full_tensor() if hasattr(p, "full_tensor") else p
                target[name.removeprefix(prefix)].copy_(whole)

    def _gathered(self) -> dict[str, torch.Tensor]:
        """The sharded weights gathered whole on the CPU of the main process (the others get an empty dict), tied
        names sharing one tensor as in the model, so that a saved model ties them as an unsharded one does."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        state = get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        first: dict[int, str] = {}
        for name, p in self.model.named_parameters(remove_duplicate=False):
            if name in state:
                state[name] = state[first.setdefault(id(p), name)]
        return state

    def state_dict(self) -> dict[str, Any]:
        """The optimizer's and schedule's states. Every process must call it (a sharded optimizer gathers its
        shards on the main process, where the whole state is returned; the others get theirs empty)."""
        if self.fsdp:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

            optimizer = get_optimizer_state_dict(self.model, self.optimizer,
                                                 options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        elif self.sharded:
            self.optimizer.consolidate_state_dict(to=0)
            optimizer = self.optimizer.state_dict() if self.accelerator.is_main_process else {}
        else:
            optimizer = self.optimizer.state_dict()
        return {"optimizer": optimizer, "scheduler": self.scheduler.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Load what `state_dict` returned on the main process (a sharded optimizer keeps its own share)."""
        if self.fsdp:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

            set_optimizer_state_dict(self.model, self.optimizer, state["optimizer"],
                                     options=StateDictOptions(full_state_dict=True))
        else:
            self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
