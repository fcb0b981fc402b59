"""Does each RL update raise the log-probs of the episodes it scored well and lower the others'? A diagnostic.

Runs `spa train` with its arguments, wrapping the trainer's update: before and after every update it scores the
step's kept episodes with the actor and prints, for the episodes with positive, negative and zero advantage,
the mean change of their log-probability (an episode's summed log-prob of its own tokens, and per token), and
the correlation between advantage and change. Used for docs/results.md ("RL that learns?"):

    .venv/bin/python scripts/probe_update.py train --init runs/learns/sft-e2/model --env frozenlake-det \\
        --format plain --advantage grpo --keep-ratio 1 --steps 4 --puzzles-per-step 8 --samples-per-puzzle 4 \\
        --minibatch-size 32 --actor-lr 5e-5 --eval-every 0 --no-eval-before --out /tmp/probe

With `--probe-positive-only` first (a diagnostic, not a trainer setting) GRPO's negative advantages are set to 0:
only the episodes that beat their group's mean are pushed, up. It costs one extra scoring pass over the batch
per update. Without that flag it must never change what the run trains.
"""

from __future__ import annotations

import sys

import torch

from spa_rl.cli import main
from spa_rl.rl import core, trainer

_update = trainer.update
_group_advantages = core.group_advantages


def _probed_update(batch, kept, config, actor, critic, reference, device, step, world, critic_stats=None):
    before = trainer.score_rows(actor, batch, config, device) if actor is not None else None
    out = _update(batch, kept, config, actor, critic, reference, device, step, world, critic_stats)
    if actor is None:
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


def _positive_only(scores, group_index, norm_by_std=True, eps=1e-6):
    return _group_advantages(scores, group_index, norm_by_std, eps).clamp(min=0)


if __name__ == "__main__":
    trainer.update = _probed_update
    args = sys.argv[1:]
    if "--probe-positive-only" in args:
        args.remove("--probe-positive-only")
        core.group_advantages = _positive_only
    sys.exit(main(args))
