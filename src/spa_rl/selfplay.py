"""Self-play rounds (`spa selfplay`): alternate self-play collection and world-model SFT, each round starting
from the previous round's model, and log how novel held-out states are to the model after every round
(the blog's "perplexity as curiosity": self-play should drive it down).

Round r collects on fresh training puzzles (seeds from `first_seed + (r-1) * puzzles`) into `OUT/round-r/data`
and fine-tunes into `OUT/round-r/sft`; `OUT/rounds.jsonl` gets the held-out novelty before the first round and
after each. Each round's stages keep their own config.json, so a rerun skips finished rounds and resumes the
interrupted one. This module must never train or collect itself: it only chains `collect` and `train_sft`.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import ClassVar

from spa_rl.collect import CollectConfig, collect
from spa_rl.config import Config, setting
from spa_rl.io import append_jsonl, read_jsonl
from spa_rl.models import DEFAULT_MODEL, ModelConfig, load_model
from spa_rl.novelty import heldout_novelty
from spa_rl.outputs import claim_output
from spa_rl.plots import plot_rounds
from spa_rl.seeds import check_training_range
from spa_rl.sft import SFTConfig, train_sft

STAGE = "selfplay"
PER_ROUND = "(set for each round)"


@dataclass(kw_only=True)
class SelfPlayConfig(Config):
    """`spa selfplay`: rounds of collection and SFT, with the held-out novelty logged per round."""

    hidden: ClassVar[tuple[str, ...]] = ("collect.out", "collect.model", "sft.data", "sft.out", "sft.model", "sft.env")

    out: str = setting(metavar="DIR")
    """Directory for every round's data and model, rounds.jsonl and novelty.png."""
    rounds: int = setting(2, ge=1)
    """Rounds of collection and SFT."""
    heldout_puzzles: int = setting(16, ge=1)
    """Validation puzzles whose states measure novelty."""
    model: ModelConfig = setting(factory=ModelConfig)
    """The starting model; each round collects (with --policy model or novelty), scores and fine-tunes the
    previous round's model on this device and in this precision."""
    collect: CollectConfig = setting(factory=lambda: CollectConfig(out=PER_ROUND, puzzles=32, samples=4))
    """Each round's collection (its first seed moves on by --puzzles each round)."""
    sft: SFTConfig = setting(factory=lambda: SFTConfig(data=PER_ROUND, out=PER_ROUND))
    """Each round's SFT."""

    def check(self) -> None:
        check_training_range(self.collect.first_seed, self.collect.puzzles * self.rounds)
        # each round's stages get these settings: check them now, not after a round of work
        replace(self.collect, model=self.model if self.collect.uses_model else replace(self.model, model=DEFAULT_MODEL))
        replace(self.sft, model=self.model)


def selfplay_rounds(config: SelfPlayConfig, quiet: bool = False) -> list[dict]:
    """Run (or resume) the rounds; return the held-out novelty before and after each."""
    root = claim_output(config.out, STAGE, config).path
    log_path = root / "rounds.jsonl"
    done = {r["round"]: r for r in (read_jsonl(log_path) if log_path.is_file() else [])}
    env, render = config.collect.rollout.env, config.collect.rollout.render

    def novelty(model_path: str) -> dict:
        lm = load_model(model_path, config.model.device, config.model.dtype)
        return heldout_novelty(lm, env, render, config.heldout_puzzles)

    current = config.model.model
    history = []
    if 0 not in done:
        done[0] = {"round": 0, "model": current, "heldout": novelty(current)}
        append_jsonl(log_path, [done[0]])
    history.append(done[0])
    for r in range(1, config.rounds + 1):
        model_dir = root / f"round-{r}" / "sft" / "model"
        if r not in done:
            data = str(root / f"round-{r}" / "data")
            behaviour = replace(config.model, model=current if config.collect.uses_model else DEFAULT_MODEL)
            collect(replace(config.collect, out=data, model=behaviour, round=r,
                            first_seed=config.collect.first_seed + (r - 1) * config.collect.puzzles), quiet=quiet)
            train_sft(replace(config.sft, data=data, out=str(root / f"round-{r}" / "sft"), env=env,
                              model=replace(config.model, model=current)), quiet=quiet)
            done[r] = {"round": r, "model": str(model_dir), "heldout": novelty(str(model_dir))}
            append_jsonl(log_path, [done[r]])
        history.append(done[r])
        current = str(model_dir)
    plot_rounds(root)
    return history
