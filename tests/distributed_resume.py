"""Run by `test_rl_trainer.py` under `accelerate launch --num_processes 2`: PPO with the optimizer state (MODE
`optimizer`, ZeRO stage 1) or the weights (MODE `weights`, FSDP) sharded over the processes, straight through
(OUT/straight), and interrupted after its second step's checkpoint then resumed in the same processes
(OUT/resumed); an unsharded run beside them (OUT/whole). MODE `weights-bf16` shards the weights under bf16
with gradient checkpointing, the world-model loss and the curiosity bonus. Every run plays the same scripted
well-formed turns, scored by the model the engine generates with (`Scripted`): the episodes then do not depend on
the last bits of the weights, which the sharded and unsharded runs round differently (a sampled token that flips
makes the later steps incomparable), while the log-probs still show whether generation ran on the current weights.
Not a test by itself.

The processes cut their rows into different numbers of micro-batches (process 0 one row a pass, process 1 all
in one), which the arithmetic must not see and sharded weights must keep in step (every pass is a collective).

    python -m accelerate.commands.launch ... tests/distributed_resume.py MODEL OUT MODE
"""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path

import torch

import spa_rl.rl.trainer as trainer
from spa_rl.generation import Generation
from spa_rl.rl.config import RLConfig
from spa_rl.rl.trainer import train_rl

GOOD = "<think> <observation> x </observation> go <prediction> y </prediction> </think> <answer> {} </answer>"
ACTIONS = ("Right", "Down", "Left", "Up")


class Scripted:
    """Well-formed turns, each chosen by the length of its conversation so far, so that a resumed run plays
    what a straight one does; each token's log-prob is the engine's model's under the sampling temperature, as a
    sampler would report it."""

    def __init__(self, model, tokenizer):
        self.model, self.tokenizer, self.stop_ids = model, tokenizer, [tokenizer.eos_token_id]

    @torch.no_grad()
    def generate(self, prompts, config, generator=None):
        out = []
        for prompt in prompts:
            ids = self.tokenizer(GOOD.format(ACTIONS[len(prompt) % len(ACTIONS)]), add_special_tokens=False)
            ids = ids["input_ids"] + self.stop_ids
            logits = self.model(input_ids=torch.tensor([prompt + ids])).logits[0, len(prompt) - 1:-1].float()
            logprobs = torch.log_softmax(logits / config.temperature, -1).gather(-1, torch.tensor(ids)[:, None])
            out.append(Generation(ids, logprobs.squeeze(-1).tolist(), True))
        return out

    def reset(self):
        pass


def config(out: str, shard: bool) -> RLConfig:
    mode = sys.argv[3]
    extras = {}
    if mode == "weights-bf16":
        extras = dict(dtype="bf16", gradient_checkpointing=True, world_model_coef=0.5, curiosity_coef=0.1)
    else:
        extras = dict(dtype="fp32")
    return RLConfig.make(out=out, model=sys.argv[1], env="frozenlake-det", steps=3, save_every=1,
                         puzzles_per_step=4, samples_per_puzzle=2, keep_ratio=1.0, minibatch_size=4,
                         micro_batch_size=4, max_new_tokens=6, eval_puzzles=2, eval_samples=2, eval_every=0,
                         eval_before=False, device="cpu", tensorboard=False, actor_lr=1e-3,
                         critic_lr=1e-3, skip_uniform_steps=False, shard_optimizer=shard and mode == "optimizer",
                         shard_weights=shard and mode.startswith("weights"), **extras)


def uneven(self: trainer.Batch, idx: list[int], config: RLConfig) -> list[list[int]]:
    if os.environ.get("RANK", "0") == "0":
        return [[i] for i in idx]
    return [list(idx)] if idx else []


def main() -> None:
    out = sys.argv[2]
    trainer.Batch.micro = uneven
    trainer.make_backend = lambda name, model, tokenizer: Scripted(model, tokenizer)
    train_rl(config(f"{out}/whole", shard=False), quiet=True)
    train_rl(config(f"{out}/straight", shard=True), quiet=True)
    original, calls = trainer.rl_step, {"n": 0}

    def interrupted(*args, **kwargs):  # every process stops at the same point: its third step
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    trainer.rl_step = interrupted
    with contextlib.suppress(KeyboardInterrupt):
        train_rl(config(f"{out}/resumed", shard=True), quiet=True)
    trainer.rl_step = original
    if not (Path(out) / "resumed" / "checkpoint").is_dir() or (Path(out) / "resumed" / "result.json").exists():
        raise SystemExit("the run was not interrupted after a checkpoint: the resume would test nothing")
    train_rl(config(f"{out}/resumed", shard=True), quiet=True)


if __name__ == "__main__":
    main()
