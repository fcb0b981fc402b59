"""Print a markdown table of the `metrics.json` files under a directory, at any depth (one row per run).

    python scripts/results_table.py runs/zeroshot
    python scripts/results_table.py runs/wm --world-model     # world-model columns only
    python scripts/results_table.py runs/wm --changed         # state-changing turns: grid and coordinates apart

Used to write docs/results.md from runs anyone can repeat; it only reads files. Runs evaluated before a metric
existed get their world-model metrics recomputed from `trajectories.jsonl` (the same function `spa eval` uses).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

COLUMNS = [("pass@1", "Pass@1"), ("pass@8", "Pass@8"), ("format_rate", "format"), ("action_valid_rate", "valid"),
           ("action_effective_rate", "effective"), ("mean_actions", "actions"), ("mean_response_tokens", "tokens"),
           ("observation_exact", "obs exact"), ("observation_cell_acc", "obs cells"),
           ("prediction_exact", "pred exact"), ("prediction_cell_acc", "pred cells")]
WORLD_MODEL = [("pass@1", "Pass@1"), ("format_rate", "format"), ("observation_exact", "obs exact"),
               ("prediction_exact", "pred exact"), ("prediction_cell_acc", "pred cells"),
               ("prediction_exact_changed", "pred exact, state changed"),
               ("prediction_cell_acc_changed", "pred cells, state changed"),
               ("copy_exact_baseline", "copy exact"), ("copy_cell_acc_baseline", "copy cells")]


def _with_world_model(path: Path, m: dict) -> dict:
    if "copy_exact_baseline" in m or not (path.parent / "trajectories.jsonl").is_file():
        return m
    from spa_rl.metrics import world_model_metrics

    turns = [(t["parsed"]["observation"], t["parsed"]["prediction"], t["state_before"], t["state_after"])
             for t in _turns(path.parent)]
    return {**m, **world_model_metrics(turns)}


def _turns(run: Path) -> list[dict]:
    out = []
    for line in (run / "trajectories.jsonl").read_text(encoding="utf-8").split("\n"):
        out += [] if not line.strip() else json.loads(line)["turns"]
    return out


def changed(root: str) -> None:
    """Per run, the turns whose actions changed the state: how often the predicted grid is the unchanged one,
    exactly the new one, and how often the coordinate lines (lines with parentheses) are right. Meant for the
    grid+coords render: with no grid lines every turn would count as both unchanged and right."""

    def grid(text: str | None) -> list[str]:
        return [ln.strip() for ln in (text or "").strip().splitlines() if ln.strip() and "(" not in ln]

    def coords(text: str | None) -> list[str]:
        return [ln.strip() for ln in (text or "").strip().splitlines() if "(" in ln]

    print("| run | state-changing turns | grid left unchanged | grid exactly right | coordinate line right |")
    print("|---|---:|---:|---:|---:|")
    for path in sorted(Path(root).rglob("trajectories.jsonl")):
        turns = [t for t in _turns(path.parent) if t["state_before"] != t["state_after"]]
        if not turns:
            continue
        counts = [sum(grid(t["parsed"]["prediction"]) == grid(t["state_before"]) for t in turns),
                  sum(grid(t["parsed"]["prediction"]) == grid(t["state_after"]) for t in turns),
                  sum(coords(t["parsed"]["prediction"]) == coords(t["state_after"]) for t in turns)]
        print(f"| {path.parent} | {len(turns)} | " + " | ".join(f"{c} ({c / len(turns):.0%})" for c in counts) + " |")


def main(root: str, world_model: bool = False) -> None:
    columns = WORLD_MODEL if world_model else COLUMNS
    rows = []
    for path in sorted(Path(root).rglob("metrics.json")):
        m = json.loads(path.read_text())
        if "config" not in m:  # not a `spa eval` result
            continue
        m = _with_world_model(path, m)
        c = m["config"]
        who = c.get("model") or c["policy"]
        rows.append((who, c["env"], c["render"], m))
    print("| policy | env | render | " + " | ".join(title for _, title in columns) + " |")
    print("|---|---|---|" + "---:|" * len(columns))
    for who, env, render, m in sorted(rows, key=lambda r: (r[0], r[1], r[2])):
        cells = []
        for key, _ in columns:
            v = m.get(key)
            cells.append("–" if v is None else (f"{v:.1f}" if key in ("mean_actions", "mean_response_tokens")
                                                else f"{100 * v:.1f}"))
        print(f"| {who} | {env} | {render} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    if "--changed" in sys.argv:
        changed(args[0] if args else "runs")
    else:
        main(args[0] if args else "runs", world_model="--world-model" in sys.argv)
