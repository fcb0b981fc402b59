"""Every plot spa-rl draws (matplotlib, no display needed): a stage's curves written as PNG next to its metrics
(`loss.png`, `curves.png`, `rounds.png`), and the report's figures as PNG bytes (`report_figures`).

This module must never compute metrics: it only draws what `metrics.jsonl`, `rounds.jsonl` and a run's summary
(`pipeline.report.RunSummary`) hold.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import TYPE_CHECKING, Any

from matplotlib.figure import Figure  # no pyplot: no GUI backend is chosen or needed
from matplotlib.ticker import MaxNLocator

from spa_rl.io import read_jsonl

if TYPE_CHECKING:
    from spa_rl.pipeline.report import RunSummary


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
    ("reward and success (training episodes)", ("rollout/reward_mean", "rollout/success", "data/success")),
    ("validation Pass@k", ("val/pass@1", "val/pass@2", "val/pass@4", "val/pass@8")),
    ("world-model accuracy", ("val/observation_exact", "val/prediction_exact", "val/copy_exact_baseline",
                              "rollout/observation_exact", "rollout/prediction_exact")),
    ("losses", ("losses/policy_loss", "losses/value_loss", "losses/world_model", "losses/dpo_loss",
                "losses/sft_nll")),
    ("entropy and diversity", ("losses/entropy", "rollout/distinct_actions", "rollout/distinct_responses")),
    ("PPO health", ("losses/approx_kl", "losses/clipfrac", "losses/explained_variance")),
)
DPO_PANEL = ("DPO health", ("rewards/accuracies", "rewards/margins", "rewards/chosen", "rewards/rejected"))
"""In place of the PPO panel when the run is DPO's (its rows have `dpo/pairs`)."""


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
    panels = RL_PANELS[:-1] + (DPO_PANEL,) if any("dpo/pairs" in r for r in rows) else RL_PANELS
    for ax, (title, keys) in zip(axes, panels, strict=True):
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
    """`curves.png`: an RL run's reward, validation Pass@k, world-model accuracy, losses, entropy and PPO (or DPO)
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


# ------------------------------------------------------------------------------------------ the report's plots
def largest_pass_at_k(rows: list[dict]) -> str:
    """The validation Pass@k with the largest k the RL stage logged (k is at most its samples per puzzle)."""
    ks = [int(key.removeprefix("val/pass@")) for r in rows for key in r
          if key.startswith("val/pass@") and key.removeprefix("val/pass@").isdigit()]
    return f"val/pass@{max(ks, default=8)}"


def _png(fig: Figure) -> bytes:
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=100)
    return buf.getvalue()


def _finish(fig: Figure, ax: Any, title: str, xlabel: str = "", ylabel: str = "",
            integer_x: bool = False) -> bytes:
    """The report's plot style (title, labels, grid, legend) applied to `ax`; the figure as PNG bytes."""
    ax.set_title(title, fontsize=10)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if integer_x:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    if len(ax.get_legend_handles_labels()[1]) > 4:  # many lines: the legend beside the plot, not over its lines
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
        fig.set_figwidth(fig.get_figwidth() + 3)  # room for it, so the plot and its title keep their width
    else:
        ax.legend(fontsize=7)
    return _png(fig)


def plot_validation(summaries: list[RunSummary], keys: tuple[str, ...], title: str) -> bytes | None:
    """Metrics against the RL step, one line per run and key. With several runs, a run is a colour and a key a line
    style, and earlier runs are drawn wider underneath, so that runs with equal values still show."""
    fig = Figure(figsize=(6.4, 3.8))
    ax = fig.subplots()
    drawn = False
    styles = ("o-", "s--", "^:", "d-.")
    for i, s in enumerate(summaries):
        width = 1.3 if len(summaries) == 1 else 1.0 + 2.0 * (len(summaries) - 1 - i) / (len(summaries) - 1)
        for j, key in enumerate(keys):
            if not s.shows(key):
                continue  # a plain-format run has no world model to score
            points = [(r["step"], r[key]) for r in s.rl_rows if isinstance(r.get(key), int | float)]
            if points:
                name = key.removeprefix("val/")
                label, colour = (name, None) if len(summaries) == 1 else (f"{s.name}: {name}", f"C{i % 10}")
                ax.plot(*zip(*points, strict=True), styles[j % len(styles)], color=colour, ms=2 + width, lw=width,
                        label=label)
                drawn = True
    if drawn:
        ax.set_xlim(*step_limits([r["step"] for s in summaries for r in s.rl_rows if "step" in r]))
    return _finish(fig, ax, title, xlabel="RL step", integer_x=True) if drawn else None


def plot_novelty(summaries: list[RunSummary]) -> bytes | None:
    """Held-out state perplexity of each stage's model."""
    fig = Figure(figsize=(6.4, 3.4))
    ax = fig.subplots()
    drawn = False
    for s in summaries:
        stages = s.novelty or []
        if stages:
            ax.plot([x["stage"] for x in stages], [x["perplexity"] for x in stages], "o-", label=s.name)
            drawn = True
    return _finish(fig, ax, "novelty of validation states under each stage's model (lower: more familiar)",
                   ylabel="held-out state perplexity") if drawn else None


def plot_imagination(summaries: list[RunSummary]) -> bytes | None:
    fig = Figure(figsize=(6.4, 3.4))
    ax = fig.subplots()
    drawn = False
    for s in summaries:
        imag = s.imagine
        if imag and imag["steps"]:
            steps = [x["step"] for x in imag["steps"]]
            ax.plot(steps, [x["cells"] for x in imag["steps"]], "o-", label=f"{s.name}: imagined, cells")
            ax.plot(steps, [x["copy_cells"] for x in imag["steps"]], ":", label=f"{s.name}: nothing changes")
            drawn = True
    return _finish(fig, ax, "open-loop world model", xlabel="turn (from 2 on, the agent sees only its own predictions)",
                   ylabel="cell accuracy", integer_x=True) if drawn else None


def report_figures(summaries: list[RunSummary]) -> list[tuple[str, bytes]]:
    """The report's figures (title, PNG bytes), the ones with something to draw."""
    out = [
        ("Validation Pass@1 and Pass@k", plot_validation(summaries, ("val/pass@1", largest_pass_at_k(
            [r for summary in summaries for r in summary.rl_rows])),
                                                          "validation Pass@k against the RL step")),
        ("World-model accuracy", plot_validation(summaries, ("val/observation_exact", "val/prediction_exact",
                                                              "val/copy_exact_baseline"),
                                                  "validation world-model accuracy (exact) against the RL step")),
        ("Reward", plot_validation(summaries, ("rollout/reward_mean", "rollout/success"),
                                   "training episodes: reward and success")),
        ("Losses", plot_validation(summaries, ("losses/policy_loss", "losses/value_loss", "losses/entropy"),
                                   "PPO losses")),
        ("Novelty", plot_novelty(summaries)),
        ("Imagination", plot_imagination(summaries)),
    ]
    return [(title, png) for title, png in out if png is not None]
