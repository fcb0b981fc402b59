"""Run by `test_rl_trainer.py` under `accelerate launch --num_processes 2`: PPO with the optimizer state sharded
over the processes, straight through (OUT/straight), and interrupted after its second step's checkpoint then
resumed in the same processes (OUT/resumed); an unsharded run beside them (OUT/whole). Not a test by itself.

    python -m accelerate.commands.launch ... tests/distributed_resume.py MODEL OUT
"""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path

import spa_rl.rl.trainer as trainer
from spa_rl.rl.trainer import RLConfig, train_rl


def config(out: str, shard: bool) -> RLConfig:
    return RLConfig.make(out=out, model=sys.argv[1], env="frozenlake-det", steps=3, save_every=1,
                         puzzles_per_step=4, samples_per_puzzle=2, keep_ratio=1.0, minibatch_size=4,
                         micro_batch_size=1, max_new_tokens=6, eval_puzzles=2, eval_samples=2, eval_every=0,
                         eval_before=False, dtype="fp32", device="cpu", tensorboard=False, actor_lr=1e-3,
                         critic_lr=1e-3, skip_uniform_steps=False, shard_optimizer=shard)


def main() -> None:
    out = sys.argv[2]
    train_rl(config(f"{out}/whole", shard=False), quiet=True)
    train_rl(config(f"{out}/straight", shard=True), quiet=True)
    original, calls = trainer.ppo_step, {"n": 0}

    def interrupted(*args, **kwargs):  # every process stops at the same point: its third step
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    trainer.ppo_step = interrupted
    with contextlib.suppress(KeyboardInterrupt):
        train_rl(config(f"{out}/resumed", shard=True), quiet=True)
    trainer.ppo_step = original
    if not (Path(out) / "resumed" / "checkpoint").is_dir() or (Path(out) / "resumed" / "result.json").exists():
        raise SystemExit("the run was not interrupted after a checkpoint: the resume would test nothing")
    train_rl(config(f"{out}/resumed", shard=True), quiet=True)


if __name__ == "__main__":
    main()
