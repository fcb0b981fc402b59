"""Training plumbing shared by every stage that trains (SFT and RL): precision, the optimizer and its schedule,
micro-batches, checkpoints, the run log, LoRA. The stages' own loops live in `spa_rl.sft` and `spa_rl.rl`.

This package must never hold a stage's loss or data: only what every training loop needs.
"""

from spa_rl.training.batching import micro_batches
from spa_rl.training.checkpoint import Checkpointer, TrainerState, save_model
from spa_rl.training.lora import LoRAConfig, apply_lora
from spa_rl.training.optim import Trainable, adamw, make_accelerator
from spa_rl.training.precision import MasterWeights, Precision, native_bf16, resolve_precision
from spa_rl.training.runlog import LogConfig, RunLogger

__all__ = ["Checkpointer", "LoRAConfig", "LogConfig", "MasterWeights", "Precision", "RunLogger", "Trainable",
           "TrainerState", "adamw", "apply_lora", "make_accelerator", "micro_batches", "native_bf16",
           "resolve_precision", "save_model"]
