"""Evaluation: Pass@k, action statistics and world-model accuracy on a fixed validation seed set.

Pass@k is the unbiased estimator 1 − C(n−c, k)/C(n, k) of docs/method.md §7, per puzzle, averaged; `any@n` is "at least
one of the n samples succeeded" (what the reference code calls pass@8). World-model accuracy compares the
agent's own `<observation>` and `<prediction>` with the true states, exactly (after whitespace normalisation)
and cell by cell on the grid. No maintained library computes these for multi-turn text agents, so they are
here. Apart from `evaluate`, which runs the episodes, this module must never touch a model or an env: the
metrics only read episodes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
from rich.table import Table

from spa_rl.config import Seeded, claim_output, setting
from spa_rl.envs.base import COORDS_SENTENCE
from spa_rl.errors import SpaError
from spa_rl.generation import make_backend
from spa_rl.io import atomic_write_json, atomic_write_jsonl, read_json
from spa_rl.models import DEFAULT_MODEL, ModelConfig, load_model
from spa_rl.progress import progress_bar, say
from spa_rl.rollout import Episode, RolloutConfig, RolloutEngine
from spa_rl.seeds import validation_seeds
from spa_rl.training.precision import check_dtype

PASS_KS = (1, 2, 4, 8, 16)


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased probability that at least one of k samples, drawn from n with c successes, succeeds."""
    if k > n:
        raise ValueError(f"k={k} > n={n}")
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def normalize_state(text: str | None) -> str:
    """Lines stripped, blank lines dropped."""
    if not text:
        return ""
    return "\n".join(line.strip() for line in text.strip().splitlines() if line.strip())


def grid_cells(text: str | None) -> list[list[str]]:
    """The grid part of a state text as rows of cells (a line with spaces is split on them, as in Sudoku)."""
    rows = []
    for line in normalize_state(text).splitlines():
        if COORDS_SENTENCE.search(line):
            continue
        rows.append(line.split() if " " in line else list(line))
    return rows


def cell_accuracy(predicted: str | None, true: str) -> float:
    """Share of the true grid's cells that the predicted grid has at the same row and column."""
    truth = grid_cells(true)
    guess = grid_cells(predicted)
    total = sum(len(r) for r in truth)
    if total == 0:
        return 0.0
    hits = sum(1 for r, row in enumerate(truth) for c, cell in enumerate(row)
               if r < len(guess) and c < len(guess[r]) and guess[r][c] == cell)
    return hits / total


def compute_metrics(episodes: Sequence[Episode], samples: int) -> dict:
    """All evaluation metrics of a set of episodes (`samples` per puzzle seed)."""
    by_seed: dict[int, list[Episode]] = {}
    for e in episodes:
        by_seed.setdefault(e.seed, []).append(e)
    counts = {s: (len(es), sum(e.success for e in es)) for s, es in by_seed.items()}
    metrics: dict = {"puzzles": len(by_seed), "samples": samples, "episodes": len(episodes)}
    metrics["pass@1"] = float(np.mean([e.success for e in episodes])) if episodes else 0.0
    for k in PASS_KS:
        if k <= samples:
            metrics[f"pass@{k}"] = float(np.mean([pass_at_k(n, c, k) for n, c in counts.values()]))
    metrics[f"any@{samples}"] = float(np.mean([c > 0 for _, c in counts.values()])) if counts else 0.0
    metrics["success_per_puzzle"] = {str(s): c / n for s, (n, c) in counts.items()}

    turns = [t for e in episodes for t in e.turns]
    valid = [v for t in turns for v in t.valid]
    effective = [v for t in turns for v in t.effective]
    attempted = sum(len(t.actions) for t in turns)
    metrics["action_valid_rate"] = sum(valid) / attempted if attempted else 0.0
    metrics["action_effective_rate"] = sum(effective) / attempted if attempted else 0.0
    metrics["mean_actions"] = float(np.mean([e.num_actions for e in episodes])) if episodes else 0.0
    metrics["mean_turns"] = float(np.mean([len(e.turns) for e in episodes])) if episodes else 0.0
    metrics["mean_reward"] = float(np.mean([e.total_reward for e in episodes])) if episodes else 0.0
    metrics["mean_response_tokens"] = float(np.mean([len(t.response_ids) for t in turns])) if turns else 0.0
    metrics["truncated_rate"] = float(np.mean([t.truncated for t in turns])) if turns else 0.0
    metrics["format_rate"] = float(np.mean([t.parsed.format_ok for t in turns])) if turns else 0.0
    metrics.update(world_model_metrics([(t.parsed.observation, t.parsed.prediction, t.state_before, t.state_after)
                                        for t in turns]))
    return metrics


def world_model_metrics(turns: Sequence[tuple[str | None, str | None, str, str]]) -> dict:
    """World-model accuracy of (observation written, prediction written, true state before, true state after)
    per turn: exact match and cell accuracy of both tags; the same for predictions on the turns whose actions
    changed the state (`prediction_*_changed`, None without such turns); and `copy_*_baseline`, what the
    trivial prediction "nothing changes" (the state before) would score on the same turns: the floor a
    prediction must beat to show a world model."""
    def exact(pairs: list) -> float:
        return float(np.mean([normalize_state(g) == normalize_state(s) for g, s in pairs])) if pairs else 0.0

    def cells(pairs: list) -> float:
        return float(np.mean([cell_accuracy(g, s) for g, s in pairs])) if pairs else 0.0

    changed = [t for t in turns if normalize_state(t[2]) != normalize_state(t[3])]
    observation = [(o, b) for o, _, b, _ in turns]
    prediction = [(p, a) for _, p, _, a in turns]
    prediction_changed = [(p, a) for _, p, _, a in changed]
    copy = [(b, a) for _, _, b, a in turns]
    out: dict = {
        "observation_exact": exact(observation), "observation_cell_acc": cells(observation),
        "prediction_exact": exact(prediction), "prediction_cell_acc": cells(prediction),
        # None when no turn changed the state: nothing to measure
        "prediction_exact_changed": exact(prediction_changed) if changed else None,
        "prediction_cell_acc_changed": cells(prediction_changed) if changed else None,
        "copy_exact_baseline": exact(copy), "copy_cell_acc_baseline": cells(copy),
    }
    out["changed_turns"] = len(changed)
    return out


# ------------------------------------------------------------------------------------------ the command
@dataclass(kw_only=True)
class EvalConfig(Seeded):
    """`spa eval`: play validation puzzles and measure Pass@k, actions and world-model accuracy."""

    model: ModelConfig = setting(factory=ModelConfig)
    rollout: RolloutConfig = setting(factory=RolloutConfig)
    policy: Literal["model", "random", "solver"] = "model"
    """Who plays: the model, or a scripted policy (random, solver: the floor and the ceiling)."""
    puzzles: int = setting(32, ge=1)
    """Validation puzzles (the fixed seeds from 1,000,000,000 on)."""
    samples: int = setting(8, ge=1)
    """Episodes per puzzle (Pass@k needs k <= samples)."""
    out: str | None = setting(None, metavar="DIR")
    """Directory for config.json, metrics.json and trajectories.jsonl (none: print only)."""

    def check(self) -> None:
        if self.policy != "model" and self.model.model != DEFAULT_MODEL:
            raise SpaError("--model is for --policy model; scripted policies need no model")
        check_dtype(self.model.dtype, training=False)


def evaluate(config: EvalConfig, quiet: bool = False) -> dict:
    """Run `config.samples` episodes on each of `config.puzzles` validation puzzles and return the metrics.

    With `config.out`, writes `config.json`, `metrics.json` and `trajectories.jsonl` there (atomically); an
    output directory that already holds this evaluation is not evaluated again.
    """
    out = None
    if config.out:
        out = claim_output(config.out, "eval", config, done="metrics.json")
        if out.finished:
            say(f"{out.path} already holds this evaluation: showing its results", quiet)
            return read_json(out.path / "metrics.json", "evaluation")
    rc = config.rollout
    if config.policy == "model":
        lm = load_model(config.model.model, device=config.model.device, dtype=config.model.dtype)
        engine = RolloutEngine(rc, make_backend(rc.backend, lm.model, lm.tokenizer), lm.tokenizer)
        model_desc = {"model": lm.name, "path": lm.path, "device": lm.device, "dtype": str(lm.dtype)}
    else:
        engine = RolloutEngine(rc, policy=config.policy)
        model_desc = {"model": None}
    seeds = validation_seeds(config.puzzles)
    with progress_bar(transient=quiet) as bar:
        task = bar.add_task(f"eval {rc.env} ({config.policy})", total=config.puzzles * config.samples,
                            unit="episodes")
        episodes = engine.run(seeds, group_size=config.samples, seed=config.seed,
                              progress=lambda n: bar.advance(task, n))
    metrics = compute_metrics(episodes, config.samples)
    metrics["config"] = {"env": rc.env, "policy": config.policy, "render": rc.render, "format": rc.format,
                         "puzzles": config.puzzles, "samples": config.samples,
                         "temperature": rc.sampling.temperature, "max_new_tokens": rc.sampling.max_new_tokens,
                         "backend": rc.backend, "seed": config.seed, "first_seed": seeds[0], **model_desc}
    if out is not None:
        atomic_write_jsonl(out.path / "trajectories.jsonl", (e.to_json() for e in episodes))
        atomic_write_json(out.path / "metrics.json", metrics)
    return metrics


def metrics_table(metrics: dict, title: str = "evaluation"):
    """A rich table of the headline metrics."""
    table = Table(title=title)
    table.add_column("metric")
    table.add_column("value", justify="right")
    keys = [k for k in metrics if k.startswith(("pass@", "any@"))] + [
        "format_rate", "action_valid_rate", "action_effective_rate", "mean_actions", "mean_turns", "mean_reward",
        "mean_response_tokens", "observation_exact", "observation_cell_acc", "prediction_exact",
        "prediction_cell_acc"]
    for k in keys:
        v = metrics.get(k)
        table.add_row(k, f"{v:.3f}" if isinstance(v, float) else str(v))
    return table
