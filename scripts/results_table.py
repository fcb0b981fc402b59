"""Print a markdown table of the `metrics.json` files under a directory (one row per run).

    python scripts/results_table.py runs/zeroshot

Used to write docs/results.md from runs anyone can repeat; it only reads files.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

COLUMNS = [("pass@1", "Pass@1"), ("pass@8", "Pass@8"), ("format_rate", "format"), ("action_valid_rate", "valid"),
           ("action_effective_rate", "effective"), ("mean_actions", "actions"), ("mean_response_tokens", "tokens"),
           ("observation_exact", "obs exact"), ("observation_cell_acc", "obs cells"),
           ("prediction_exact", "pred exact"), ("prediction_cell_acc", "pred cells")]


def main(root: str) -> None:
    rows = []
    for path in sorted(Path(root).glob("*/metrics.json")):
        m = json.loads(path.read_text())
        c = m["config"]
        who = c.get("model") or c["policy"]
        rows.append((who, c["env"], c["render"], m))
    print("| policy | env | render | " + " | ".join(title for _, title in COLUMNS) + " |")
    print("|---|---|---|" + "---:|" * len(COLUMNS))
    for who, env, render, m in sorted(rows, key=lambda r: (r[0], r[1], r[2])):
        cells = []
        for key, _ in COLUMNS:
            v = m.get(key)
            cells.append("–" if v is None else (f"{v:.1f}" if key in ("mean_actions", "mean_response_tokens")
                                                else f"{100 * v:.1f}"))
        print(f"| {who} | {env} | {render} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "runs")
