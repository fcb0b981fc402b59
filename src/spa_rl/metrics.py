"""Metrics of played episodes: Pass@k, action statistics and world-model accuracy, shared by `spa eval`, the
validation inside `spa train` and `spa imagine`.

Pass@k is the unbiased estimator 1 − C(n−c, k)/C(n, k) of docs/method.md §7, per puzzle, averaged; `any@n` is "at least
one of the n samples succeeded" (what the reference code calls pass@8). World-model accuracy compares the
agent's own `<observation>` and `<prediction>` with the true states, exactly (after whitespace normalisation)
and cell by cell on the grid. No maintained library computes these for multi-turn text agents, so they are
here. This module must never touch a model or an env: it only reads episodes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from spa_rl.envs.base import COORDS_SENTENCE
from spa_rl.rollout import Episode

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
