"""`spa imagine`: the agent plays inside its own world model, and we measure how far its imagination holds.

On the validation puzzles the agent is shown, from the second turn on, its own `<prediction>` of the previous
turn as the state (its last shown state if it wrote none), while the environment executes its actions on the
true state (`RolloutConfig.imagine`). At each step the imagined state is compared with the true one, exactly
and cell by cell: an open-loop, multi-step test of the world model. The baseline is "nothing changes" from the
start (the puzzle's first state against the true state after k turns). One-step accuracy with the true state
shown is what `spa eval` reports as `prediction_exact`. No anchor of the paper measures this; it is the most
direct test of whether the method built a world model. This module must never train: it only plays and scores.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from spa_rl.api import RESPONSES_FILE, ApiConfig, ApiPolicy
from spa_rl.config import Seeded, setting, to_dict
from spa_rl.errors import SpaError
from spa_rl.generation import make_backend
from spa_rl.io import atomic_write_json, atomic_write_jsonl, read_json
from spa_rl.metrics import cell_accuracy, normalize_state
from spa_rl.models import ModelConfig, load_model
from spa_rl.outputs import claim_output
from spa_rl.progress import progress_bar, say
from spa_rl.rollout import Episode, RolloutConfig, RolloutEngine
from spa_rl.seeds import validation_seeds
from spa_rl.training.precision import check_dtype

STAGE = "imagine"


@dataclass(kw_only=True)
class ImagineConfig(Seeded):
    """`spa imagine`: open-loop world-model accuracy on validation puzzles."""

    model: ModelConfig = setting(factory=ModelConfig)
    api: ApiConfig = setting(factory=ApiConfig)
    rollout: RolloutConfig = setting(factory=RolloutConfig)
    puzzles: int = setting(32, ge=1)
    """Validation puzzles (the fixed seeds from 1,000,000,000 on)."""
    samples: int = setting(1, ge=1)
    """Episodes per puzzle."""
    out: str | None = setting(None, metavar="DIR")
    """Directory for config.json, imagine.json and the episodes (none: print only)."""

    def check(self) -> None:
        check_dtype(self.model.dtype, training=False)
        if self.rollout.format != "world-model":
            raise SpaError("spa imagine needs --format world-model: the plain format writes no <prediction>")


def imagination_metrics(episodes: list[Episode]) -> dict:
    """Per step k (turn k's prediction against the true state after turn k, from the second turn on the agent
    having seen only its own predictions): exact and cell accuracy, their "nothing changes since the start"
    baselines, and how many episodes reached step k; plus the means over all steps."""
    steps: dict[int, dict[str, list[float]]] = {}
    for e in episodes:
        start = e.turns[0].state_before if e.turns else ""
        for t in e.turns:
            s = steps.setdefault(t.turn, {"exact": [], "cells": [], "copy_exact": [], "copy_cells": []})
            s["exact"].append(float(normalize_state(t.parsed.prediction) == normalize_state(t.state_after)))
            s["cells"].append(cell_accuracy(t.parsed.prediction, t.state_after))
            s["copy_exact"].append(float(normalize_state(start) == normalize_state(t.state_after)))
            s["copy_cells"].append(cell_accuracy(start, t.state_after))
    per_step = [{"step": k, "episodes": len(v["exact"]), **{name: float(np.mean(x)) for name, x in v.items()}}
                for k, v in sorted(steps.items())]
    every = {name: [x for v in steps.values() for x in v[name]] for name in ("exact", "cells", "copy_exact",
                                                                             "copy_cells")}
    return {"steps": per_step, **{f"mean_{name}": float(np.mean(x)) if x else 0.0 for name, x in every.items()},
            "episodes": len(episodes)}


def imagine(config: ImagineConfig, quiet: bool = False) -> dict:
    """Play the validation puzzles inside the agent's own world model and return `imagination_metrics`; with
    `config.out`, written there (a finished directory is not played again)."""
    out = None
    if config.out:
        out = claim_output(config.out, STAGE, config, done="imagine.json")
        if out.finished:
            say(f"{out.path} already holds this imagination run: showing its results", quiet)
            return read_json(out.path / "imagine.json", "results")
    rc = replace(config.rollout, imagine=True)
    api = None
    if config.api.api_base:
        api = ApiPolicy(config.api, config.model.model, out.path / RESPONSES_FILE if out else None, config.seed)
        engine = RolloutEngine(rc, api, policy="api")
    else:
        lm = load_model(config.model.model, config.model.device, config.model.dtype)
        engine = RolloutEngine(rc, make_backend(rc.backend, lm.model, lm.tokenizer), lm.tokenizer)
    with progress_bar(transient=quiet) as bar:
        task = bar.add_task(f"imagine {rc.env}", total=config.puzzles * config.samples, unit="episodes")
        try:
            episodes = engine.run(validation_seeds(config.puzzles), group_size=config.samples, seed=config.seed,
                                  progress=lambda n: bar.advance(task, n))
        finally:
            if api is not None:
                api.close()
    metrics = {**imagination_metrics(episodes), "config": to_dict(config)}
    if out is not None:
        atomic_write_jsonl(out.path / "episodes.jsonl", (e.to_json() for e in episodes))
        atomic_write_json(out.path / "imagine.json", metrics)
    return metrics
