"""Does each RL update raise the log-probs of the episodes it scored well and lower the others'? A diagnostic.

Runs `spa train` with its arguments, wrapping the trainer's update: before and after every update it scores the
step's kept episodes with the actor and prints, for the episodes with positive, negative and zero advantage,
the mean change of their log-probability (an episode's summed log-prob of its own tokens, and per token), and
the correlation between advantage and change. Used for docs/results.md ("RL that learns?"):

    .venv/bin/python scripts/probe_update.py train --init runs/learns/sft-e2/model --env frozenlake-det \\
        --format plain --advantage grpo --keep-ratio 1 --steps 4 --puzzles-per-step 8 --samples-per-puzzle 4 \\
        --minibatch-size 32 --actor-lr 5e-5 --eval-every 0 --no-eval-before --out /tmp/probe

It also registers the advantage estimator `grpo-positive` (GRPO with its negative advantages set to 0: only the
episodes that beat their group's mean are pushed, up), for `--advantage grpo-positive`; `--probe-positive-only`
first is the same. Probing costs one extra scoring pass over the batch per update; it must never change what the
run trains.
"""

from __future__ import annotations

import sys

import torch

from spa_rl.cli import main
from spa_rl.rl import advantages, trainer
from spa_rl.rl.advantages import register_advantage

_update = trainer.update


@register_advantage("grpo-positive", uses_critic=False)
def grpo_positive(x, config):
    adv, returns = advantages.grpo(x, config)
    return adv.clamp(min=0), returns


def _probed_update(batch, kept, config, learners, step, train_actor=True, critic_stats=None):
    actor, device = learners.actor, learners.device
    before = trainer.score_rows(actor, batch, config, device) if train_actor else None
    out = _update(batch, kept, config, learners, step, train_actor, critic_stats)
    if not train_actor:
        return out
    after = trainer.score_rows(actor, batch, config, device)
    mask = batch.mask
    tokens = mask.sum(-1).clamp(min=1)
    advantage = (batch.advantages * mask).sum(-1) / tokens
    change = ((after - before) * mask).sum(-1)
    for sign, rows in (("+", advantage > 0), ("-", advantage < 0), ("0", advantage == 0)):
        if rows.any():
            print(f"step {step + 1} A{sign}: {int(rows.sum())} episodes, mean change of log p "
                  f"{float(change[rows].mean()):+.3f} an episode, {float((change / tokens)[rows].mean()):+.4f} a token",
                  flush=True)
    corr = torch.corrcoef(torch.stack([advantage, change]))[0, 1]
    print(f"step {step + 1} corr(advantage, change) {float(corr):+.3f}", flush=True)
    return out


if __name__ == "__main__":
    trainer.update = _probed_update
    args = sys.argv[1:]
    if "--probe-positive-only" in args:
        args.remove("--probe-positive-only")
        args += ["--advantage", "grpo-positive"]
    sys.exit(main(args))
