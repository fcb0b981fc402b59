"""The picture of "RL that learns?" (docs/results.md, README): validation Pass@1 against the RL step of the GRPO (and
DPO) runs of `scripts/rl_learns.sh`, with the starting policy's Pass@1 and random play's as lines.

    python scripts/rl_learns_plot.py runs/learns docs/rl_learns.png

Each run directory's `metrics.jsonl` gives its validation points; a run without an evaluation before its first step
starts from the SFT policy's (`--start`, measured in run 1: the same model, seed and puzzles). It only reads files.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from matplotlib.figure import Figure

from spa_rl.io import read_jsonl

LABELS = {  # run directory -> legend (the runs of docs/results.md, "RL that learns?")
    "grpo-e2-lr1e-5-p8x4-s0": "1: full, lr 1e-5",
    "grpo-e2-lr1e-5-p16x8-s0": "3: full, lr 1e-5, 16x8",
    "grpo-e2-lr2e-6-p8x4-fresh-s0": "4: full, lr 2e-6",
    "grpo-e2-lr5e-4-p8x4-lora-fresh-s0": "5: LoRA, lr 5e-4 (seed 0)",
    "grpo-e2-lr5e-4-p8x4-lora-fresh-60-s0": "6: LoRA, lr 5e-4 (seed 0, again)",
    "grpo-e2-lr5e-4-p8x4-lora-fresh-s1": "7: LoRA, lr 5e-4 (seed 1)",
    "grpo-e2-lr5e-4-p8x4-lora-fresh-60-s2": "8: LoRA, lr 5e-4 (seed 2)",
    "dpo-e2-lr5e-4-p8x4-lora-fresh-s0": "DPO: LoRA, lr 5e-4 (seed 0)",
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--start", type=float, default=41.4, help="the SFT policy's validation Pass@1, %%")
    parser.add_argument("--random", type=float, default=25.8, help="random play's Pass@1 on the same puzzles, %%")
    args = parser.parse_args()
    fig = Figure(figsize=(7.5, 3.8))
    ax = fig.subplots()
    for name, label in LABELS.items():
        path = args.root / name / "metrics.jsonl"
        if not path.is_file():
            continue
        points = {r["step"]: 100 * r["val/pass@1"] for r in read_jsonl(path) if "val/pass@1" in r}
        points.setdefault(0, args.start)
        steps = sorted(points)
        lora, dpo = "LoRA" in label, label.startswith("DPO")
        ax.plot(steps, [points[s] for s in steps], "^:" if dpo else "o-" if lora else "s--", lw=2 if lora else 1,
                alpha=1 if lora else 0.6, label=label)
    ax.axhline(args.start, color="gray", lw=1, ls=":", label="the SFT policy (start)")
    ax.axhline(args.random, color="black", lw=1, ls="-.", label="random play")
    ax.set_xlabel("RL step (32 episodes each; run 3: 128)")
    ax.set_ylabel("validation Pass@1, % (64 puzzles x 4)")
    ax.set_title("RL from the 135M model after SFT on a solver, FrozenLake 4x4 deterministic", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    fig.savefig(args.out, dpi=110)
    print(args.out)


if __name__ == "__main__":
    main()
