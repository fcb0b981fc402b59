"""Plots of a run's metrics, written as PNG next to them (matplotlib, no display needed).

This module must never compute metrics: it only draws what `metrics.jsonl` and `rounds.jsonl` hold.
"""

from __future__ import annotations

from pathlib import Path

from matplotlib.figure import Figure  # no pyplot: no GUI backend is chosen or needed
from matplotlib.ticker import MaxNLocator

from spa_rl.io import read_jsonl


def plot_sft(run_dir: str | Path) -> Path | None:
    """`loss.png`: training loss per step and validation loss per epoch, with the learning rate."""
    run_dir = Path(run_dir)
    rows = read_jsonl(run_dir / "metrics.jsonl") if (run_dir / "metrics.jsonl").is_file() else []
    train = [(r["step"], r["loss/train"]) for r in rows if "loss/train" in r]
    val = [(r["step"], r["loss/val"]) for r in rows if "loss/val" in r]
    lr = [(r["step"], r["train/lr"]) for r in rows if "train/lr" in r]
    if not train:
        return None
    fig = Figure(figsize=(7, 4))
    ax = fig.subplots()
    ax.plot(*zip(*train, strict=True), label="train loss (per step)", lw=1, alpha=0.8)
    if val:
        ax.plot(*zip(*val, strict=True), "o-", label="validation loss (per epoch)", lw=2)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("token NLL (nats)")
    ax.grid(alpha=0.3)
    if lr:
        ax2 = ax.twinx()
        ax2.plot(*zip(*lr, strict=True), color="gray", ls=":", lw=1, label="learning rate")
        ax2.set_ylabel("learning rate", color="gray")
    ax.legend(loc="upper right")
    ax.set_title(f"world-model SFT: {run_dir.name}")
    fig.tight_layout()
    out = run_dir / "loss.png"
    fig.savefig(out, dpi=120)
    return out


def plot_rounds(out_dir: str | Path) -> Path | None:
    """`novelty.png`: mean novelty (perplexity) of held-out states after each self-play round."""
    out_dir = Path(out_dir)
    path = out_dir / "rounds.jsonl"
    if not path.is_file():
        return None
    rows = sorted(read_jsonl(path), key=lambda r: r["round"])
    fig = Figure(figsize=(5, 3.5))
    ax = fig.subplots()
    ax.plot([r["round"] for r in rows], [r["heldout"]["perplexity"] for r in rows], "o-")
    ax.set_xticks([r["round"] for r in rows])  # rounds are whole numbers
    ax.set_xlabel("self-play round (0 = before)")
    ax.set_ylabel("held-out state perplexity")
    ax.grid(alpha=0.3)
    ax.set_title("novelty of held-out states")
    fig.tight_layout()
    out = out_dir / "novelty.png"
    fig.savefig(out, dpi=120)
    return out


RL_PANELS = (
    ("reward and success (training episodes)", ("rollout/reward_mean", "rollout/success")),
    ("validation Pass@k", ("val/pass@1", "val/pass@2", "val/pass@4", "val/pass@8")),
    ("world-model accuracy", ("val/observation_exact", "val/prediction_exact", "val/copy_exact_baseline",
                              "rollout/observation_exact", "rollout/prediction_exact")),
    ("losses", ("losses/policy_loss", "losses/value_loss", "losses/world_model")),
    ("entropy and diversity", ("losses/entropy", "rollout/distinct_actions", "rollout/distinct_responses")),
    ("PPO health", ("losses/approx_kl", "losses/clipfrac", "losses/explained_variance")),
)


def step_limits(steps: list[float]) -> tuple[float, float]:
    """x-axis limits that span the RL steps with room at both ends, also when there is only one step."""
    lo, hi = (min(steps), max(steps)) if steps else (0, 1)
    pad = max(0.5, 0.03 * (hi - lo))
    return lo - pad, hi + pad


def rl_figure(rows: list[dict], name: str) -> Figure:
    """The figure of `plot_rl` for metrics rows (one dict per logged step). Every panel spans the run's steps;
    a series with few points gets markers, so a run of one step still shows its values."""
    fig = Figure(figsize=(13, 7.5))
    axes = fig.subplots(2, 3).flatten()
    xlim = step_limits([r["step"] for r in rows if isinstance(r.get("step"), int | float)])
    for ax, (title, keys) in zip(axes, RL_PANELS, strict=True):
        mixed = len({key.split("/")[0] for key in keys}) > 1  # then the prefix tells validation from rollouts
        for key in keys:
            points = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), int | float)]
            if points:
                style = "o-" if key.startswith("val/") or len(points) <= 20 else "-"
                ax.plot(*zip(*points, strict=True), style, lw=1.2, ms=3, label=key if mixed else key.split("/", 1)[1])
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("RL step")
        ax.set_xlim(*xlim)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.suptitle(f"RL: {name}")
    fig.tight_layout()
    return fig


def plot_rl(run_dir: str | Path) -> Path | None:
    """`curves.png`: an RL run's reward, validation Pass@k, world-model accuracy, losses, entropy and PPO
    diagnostics against the step."""
    run_dir = Path(run_dir)
    path = run_dir / "metrics.jsonl"
    rows = read_jsonl(path) if path.is_file() else []
    if not rows:
        return None
    name = f"{run_dir.resolve().parent.name}/{run_dir.name}" if run_dir.name == "rl" else run_dir.name  # spa run's rl/
    out = run_dir / "curves.png"
    rl_figure(rows, name).savefig(out, dpi=110)
    return out
