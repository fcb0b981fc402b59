"""Print a markdown table of the `imagine.json` files under a directory (one row per `spa imagine` run).

    python scripts/imagine_table.py              # runs/imagine, written by scripts/imagine.sh
    python scripts/imagine_table.py runs/spa-cpu # any directory: every imagine.json at any depth

Columns: the mean over all turns of exact and cell accuracy of the imagined state against the true one, the
"nothing changes since the start" baseline on the same turns, then cell accuracy at each step k (from step 2 on
the agent has seen only its own predictions). Used to write docs/results.md; it only reads files.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def main(root: str = "runs/imagine") -> None:
    paths = sorted(Path(root).rglob("imagine.json"))
    if not paths:
        sys.exit(f"no imagine.json under {root}: run bash scripts/imagine.sh first")
    steps = max(len(json.loads(p.read_text())["steps"]) for p in paths)
    head = ["run", "turns", "exact", "cells", "copy exact", "copy cells"] + [f"cells, step {k}" for k in
                                                                              range(1, steps + 1)]
    print("| " + " | ".join(head) + " |")
    print("|---" + "|---:" * (len(head) - 1) + "|")
    for p in paths:
        m = json.loads(p.read_text())
        turns = sum(s["episodes"] for s in m["steps"])
        per_step = [f"{100 * s['cells']:.1f} (n={s['episodes']})" for s in m["steps"]]
        per_step += ["–"] * (steps - len(per_step))
        cells = [str(p.parent.relative_to(root)) if p.parent != Path(root) else p.parent.name, str(turns),
                 f"{100 * m['mean_exact']:.1f}", f"{100 * m['mean_cells']:.1f}", f"{100 * m['mean_copy_exact']:.1f}",
                 f"{100 * m['mean_copy_cells']:.1f}", *per_step]
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main(*sys.argv[1:])
