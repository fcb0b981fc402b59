"""How much memory training needs, and how many tokens one forward/backward pass may hold on this machine.

Every stage that trains sizes its micro-batches here (`plan_micro_batch_tokens`) before any pass: a
setting that cannot fit is refused with the estimate and the flag that fixes it, instead of being killed by the
kernel half an hour in. The estimate is a formula over the model's shape, not a measurement of the run:

- training state per model: the weights at their precision, and for each trained weight its gradient, AdamW's
  two moments and (bf16) the fp32 master copy (`state_bytes`);
- activations kept for the backward pass, per token: `ACTIVATION_FACTORS` x the layer's hidden and MLP widths
  x the precision's bytes, for every layer (one layer's worth and the layer inputs with gradient checkpointing),
  plus a row of logits for a token in the loss (`activation_bytes_per_token`). The factors were measured on the
  embedded model, bf16 and fp32 (docs/benchmarks.md, "Memory"), and hold for the Llama family's layer layout;
- a fixed reserve for the interpreter, the libraries, the tokenizer, the rollout engine and the allocator's slack.

No maintained library sizes micro-batches for a CPU's memory (accelerate's `find_executable_batch_size` retries
after a CUDA out-of-memory error, which a CPU process never gets: the kernel kills it). This module must never
allocate a tensor or load a model.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch

from spa_rl.errors import SpaError
from spa_rl.training.precision import Precision

GIB = 2**30
LAPTOP_GIB = 8.0
"""The default budget on a CPU: what a 16 GB laptop can give one process, whatever this machine has."""
RESERVE_GIB = 2.5
"""Interpreter, libraries, tokenizer, what generation leaves behind and the allocator's slack: measured with the
embedded model, `spa train` holds 6.0 GiB at its second update before any pass, against 5.0 of models estimated
(the first update holds less: AdamW's moments appear at its end). A stage that follows another in one process
(`spa run`) starts from a fragmented heap even after `release_free_memory`: world-model SFT after self-play peaked
at 8.6 GiB in a plan of 8.0 made with a reserve of 1.5, and at 8.01 with 2.0, where the same SFT as the first
stage (the format warm start) peaked at 7.0 (2026-12-07, AMX machine); hence 2.5."""
ACTIVATION_FACTORS = (23.0, 5.0)
"""Values kept for the backward pass per token and layer, in units of (hidden size, MLP width) elements at the
compute precision: fitted to `spa train`'s peaks with SmolLM2-135M in bf16 with PyTorch's SDPA, 1.35-1.4 MB a
token (a pass alone measured 1.1 MB; the trainer holds more: padding, its batch, the allocator's slack; in fp32
the estimate is 2.7 MB against 1.6 measured for a pass alone; docs/benchmarks.md, "Memory")."""
CHECKPOINT_FACTOR = 8.0
"""With gradient checkpointing: values kept per token and layer in units of the hidden size (the layer's input
and what the recomputation holds; 0.42 MB a token estimated, 0.33 measured for a pass alone)."""
MIN_TOKENS = 256


@dataclass(frozen=True)
class MemoryPlan:
    """What `plan_micro_batch_tokens` decided, in bytes, for the log and the error messages."""

    tokens: int
    """Tokens per forward/backward pass, at most (a longer sequence still goes alone)."""
    budget: int
    """The peak this stage may reach."""
    state: int
    """The models' weights and training state."""
    per_token: float
    """Activation bytes per token in a pass."""

    def describe(self) -> str:
        return (f"micro-batches of up to {self.tokens:,} tokens: about {self.peak(self.tokens) / GIB:.1f} GiB at the "
                f"peak ({self.state / GIB:.1f} GiB of models, {self.tokens * self.per_token / GIB:.1f} of "
                f"activations, {RESERVE_GIB} reserve) within {self.budget / GIB:.1f} GiB")

    def peak(self, tokens: int) -> float:
        return self.state + tokens * self.per_token + RESERVE_GIB * GIB


def release_free_memory() -> bool:
    """Hand memory that Python and the allocator hold but no longer use back to the operating system (a garbage
    collection, then glibc's `malloc_trim`): between stages of one process, so that a stage starts from what it
    needs rather than from the high-water mark of the stage before. False where there is no glibc."""
    import ctypes
    import ctypes.util
    import gc

    gc.collect()
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
        return bool(libc is not None and libc.malloc_trim(0))
    except (OSError, AttributeError):
        return False


def reset_peak_rss() -> bool:
    """Start a new count for `peak_rss_bytes` (Linux: writing 5 to /proc/self/clear_refs resets VmHWM); False
    where that cannot be done (the peak then counts from the process's start)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_bytes() -> int:
    """This process's peak resident memory since the last `reset_peak_rss` (or its start)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def available_bytes(device: str) -> int:
    """Memory this process can still take on `device`: a GPU's free memory, or the system's available memory
    (Linux `MemAvailable`; elsewhere half the physical memory, a guess that errs on the safe side)."""
    if device.startswith("cuda") and torch.cuda.is_available():
        free, _ = torch.cuda.mem_get_info(torch.device(device))
        return int(free)
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 2
    except (OSError, ValueError, AttributeError):
        return int(LAPTOP_GIB * GIB)


def _bytes(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def state_bytes(params: int, trained: int, precision: Precision) -> int:
    """A model's weights (`params`, at the precision's width) and the training state of its `trained` weights:
    gradient, AdamW's two moments, and the fp32 master copy and its gradient under bf16 master weights."""
    per_trained = 4 + 8 + (4 + 2 if precision.master_weights else 0)
    return params * _bytes(precision.weights) + trained * per_trained


def model_state_bytes(model: torch.nn.Module, precision: Precision, trained: bool = True) -> int:
    """`state_bytes` of a loaded model, its trained weights being those that require gradients (none when
    `trained` is False: a reference model, a copy for generation)."""
    params = list(model.parameters())
    return state_bytes(sum(p.numel() for p in params),
                       sum(p.numel() for p in params if p.requires_grad) if trained else 0, precision)


def activation_bytes_per_token(model_config: Any, precision: Precision, checkpointing: bool = False) -> float:
    """Bytes kept for the backward pass per token of a forward pass of a model shaped like `model_config` (an HF
    config with `num_hidden_layers`, `hidden_size`, `intermediate_size`, `vocab_size`), with a row of logits (at
    the compute precision, and an fp32 chunk) counted for every token as if it were in the loss."""
    layers, hidden = model_config.num_hidden_layers, model_config.hidden_size
    mlp = getattr(model_config, "intermediate_size", 4 * hidden)
    width = 2 if (precision.autocast is not None or precision.weights != torch.float32) else 4
    a, b = ACTIVATION_FACTORS
    per_layer = (a * hidden + b * mlp) * width
    kept = (per_layer + layers * CHECKPOINT_FACTOR * hidden * width) if checkpointing else layers * per_layer
    return kept + model_config.vocab_size * width


def plan_micro_batch_tokens(requested: int, memory_gib: float, device: str, state: int, per_token: float,
                            what: str) -> MemoryPlan:
    """The tokens per pass for `what` (a stage's name, for messages): `requested` if it fits the memory available
    (else refused with the estimate), or (0) the most that keep the estimated peak within `memory_gib` (0: the
    smaller of `LAPTOP_GIB` and 90% of what is available; on a GPU, 90% of its free memory)."""
    available = available_bytes(device)
    if memory_gib:
        budget = int(memory_gib * GIB)
    elif device.startswith("cuda"):
        budget = int(0.9 * available)
    else:
        budget = int(min(LAPTOP_GIB * GIB, 0.9 * available))
    plan = MemoryPlan(requested, budget, state, per_token)
    fixes = "--lora, --gradient-checkpointing or a smaller --micro-batch-tokens"
    if requested:
        if plan.peak(requested) > available:
            most = int((available - state - RESERVE_GIB * GIB) / per_token)
            raise SpaError(f"{what}: micro-batches of {requested:,} tokens need about {plan.peak(requested) / GIB:.1f} "
                           f"GiB ({state / GIB:.1f} of models, {requested * per_token / GIB:.1f} of activations), "
                           f"more than the {available / GIB:.1f} GiB available: "
                           + (f"set --micro-batch-tokens {most} or less" if most >= MIN_TOKENS else f"use {fixes}"))
        return plan
    tokens = int((budget - state - RESERVE_GIB * GIB) / per_token)
    if tokens < MIN_TOKENS:
        raise SpaError(f"{what}: the models' training state needs about {state / GIB:.1f} GiB and a pass of "
                       f"{MIN_TOKENS} tokens {MIN_TOKENS * per_token / GIB:.1f} more, beyond the "
                       f"{budget / GIB:.1f} GiB budget: use --lora or --gradient-checkpointing, or raise "
                       f"--memory-gib (available: {available / GIB:.1f} GiB)")
    return MemoryPlan(tokens, budget, state, per_token)
