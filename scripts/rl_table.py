"""Print markdown tables of `spa train` runs (every directory under ROOT holding a train `metrics.jsonl`) and
draw their validation Pass@1 / Pass@k curves overlaid in one PNG.

    python scripts/rl_table.py                       # runs/curves, written by scripts/rl_curves.sh
    python scripts/rl_table.py runs/curves docs/rl_curves.png frozenlake    # only runs whose name starts so

Tables: validation at each evaluated step (Pass@1, Pass@k at the largest k, format, world-model accuracy), then
per run the training side: reward and success over the first and last five steps, the sampler/trainer log-prob
mismatch (mean |log p_sampler - log p_trainer| per sampled token), entropy, distinct responses per group, and
seconds per step; then the world model during training: the rollouts' observation and prediction accuracy, the
world-model loss (--world-model-coef) and the novelty N(s') of the states the moves reached (--curiosity-coef)
over the first and last five steps. Rewards are the game's, without bonuses (`rollout/game_reward_mean`; runs
logged before it existed had no bonuses, so their `rollout/reward_mean` is the same thing; a run resumed across
the change has both kinds of rows).
Used to write docs/results.md; it only reads files (the PNG uses the report's plot).
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

from spa_rl.pipeline.report import run_summary
from spa_rl.plots import largest_pass_at_k, plot_validation


def _mean(rows: list[dict], key: str) -> float:
    values = [r[key] for r in rows if isinstance(r.get(key), int | float)]
    return statistics.mean(values) if values else float("nan")


def main(root: str = "runs/curves", png: str | None = None, prefix: str = "") -> None:
    dirs = sorted(p.parent for p in Path(root).rglob("config.json")
                  if json.loads(p.read_text()).get("stage") == "train" and (p.parent / "metrics.jsonl").is_file()
                  and str(p.parent.relative_to(root)).startswith(prefix))
    if not dirs:
        sys.exit(f"no spa train run under {root} named {prefix}*: run bash scripts/rl_curves.sh first")
    summaries = [run_summary(d) for d in dirs]
    runs = {str(d.relative_to(root)): s.rl_rows for d, s in zip(dirs, summaries, strict=True)}
    k = largest_pass_at_k([r for rows in runs.values() for r in rows])
    cols = ("val/pass@1", k, "val/format_rate", "val/observation_exact", "val/prediction_exact",
            "val/prediction_cell_acc", "val/copy_exact_baseline")
    print("| run | step | " + " | ".join(c.removeprefix("val/") for c in cols) + " |")
    print("|---|---:" + "|---:" * len(cols) + "|")
    for name, rows in runs.items():
        for r in rows:
            if "val/pass@1" in r:
                print(f"| {name} | {r['step']} | " + " | ".join(
                    f"{100 * r[c]:.1f}" if c in r else "–" for c in cols) + " |")
    print()
    print("| run | steps | reward, steps 1-5 | reward, last 5 | success, 1-5 | success, last 5 | log-prob mismatch |"
          " entropy, 1-5 | entropy, last 5 | distinct responses | s/step generate | score | update |")
    print("|---" + "|---:" * 12 + "|")
    training = {name: [{"game_reward": r.get("rollout/game_reward_mean", r["rollout/reward_mean"]), **r}
                       for r in rows if "rollout/reward_mean" in r] for name, rows in runs.items()}
    for name, train in training.items():
        first, last = train[:5], train[-5:]
        print(f"| {name} | {len(train)} | {_mean(first, 'game_reward'):.3f} | "
              f"{_mean(last, 'game_reward'):.3f} | {100 * _mean(first, 'rollout/success'):.1f} | "
              f"{100 * _mean(last, 'rollout/success'):.1f} | {_mean(train, 'rollout/logprob_mismatch'):.4f} | "
              f"{_mean(first, 'losses/entropy'):.3f} | {_mean(last, 'losses/entropy'):.3f} | "
              f"{100 * _mean(train, 'rollout/distinct_responses'):.0f}% | {_mean(train, 'time/generate'):.0f} | "
              f"{_mean(train, 'time/score'):.0f} | {_mean(train, 'time/update'):.0f} |")
    print()
    print("| run | observation exact, 1-5 | last 5 | prediction exact, 1-5 | last 5 | world-model NLL, 1-5 | last 5 |"
          " N(s') of the moves, 1-5 | last 5 |")
    print("|---" + "|---:" * 8 + "|")
    for name, train in training.items():
        first, last = train[:5], train[-5:]
        cells = []
        for key, scale in (("rollout/observation_exact", 100), ("rollout/prediction_exact", 100),
                           ("losses/world_model", 1), ("rollout/novelty", 1)):
            for part in (first, last):
                value = _mean(part, key)
                cells.append("–" if value != value else f"{scale * value:.{1 if scale == 100 else 3}f}")
        print(f"| {name} | " + " | ".join(cells) + " |")
    if png:
        image = plot_validation(summaries, ("val/pass@1", k),
                                "validation Pass@1 and Pass@k against the RL step")
        if image:
            Path(png).parent.mkdir(parents=True, exist_ok=True)
            Path(png).write_bytes(image)
            print(f"\nwrote {png}")


if __name__ == "__main__":
    main(*sys.argv[1:])
