"""The run report: PNG plots and one self-contained `report.html` (styles, script and images inlined; it opens
from a file with no network), and `spa compare` over several runs.

A run's report holds its settings, a results table (the final evaluation; the RL run's validation before and
after; imagination), the plots (validation Pass@1 and Pass@k against the RL step, world-model accuracy,
held-out novelty per stage, reward, losses) and a trajectory viewer: pick a validation puzzle and sample, step
through its turns, and see the state the agent was shown, its observation and prediction beside the true
states with the differing cells highlighted, its actions and reward. This module must never compute a metric
or run a model: it only reads what the stages wrote.
"""

from __future__ import annotations

import base64
import html
import io
import json
import statistics
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from spa_rl.config import Config, setting
from spa_rl.errors import SpaError
from spa_rl.io import atomic_write_text, read_json, read_jsonl, writable_file
from spa_rl.plots import plot_rl, step_limits

VIEWER_EPISODES = 64
"""At most this many evaluation episodes are embedded in the viewer (the report stays small)."""


# ------------------------------------------------------------------------------------------ reading a run
def _json(path: Path) -> Any:
    return read_json(path, "results") if path.is_file() else None


WORLD_MODEL_KEYS = ("observation_exact", "prediction_exact", "prediction_cell_acc")
"""Evaluation metrics of the world-model format, which a plain-format run does not have."""


def run_summary(root: Path) -> dict:
    """What the stages of run `root` wrote, as one dict (missing stages are None). `root` may also be a
    `spa train` directory: its metrics are then the RL stage's, and its last validation stands for the final
    evaluation."""
    config = _json(root / "config.json") or {}
    train = config.get("stage") == "train"
    rl = root if train else root / "rl"
    rl_rows = read_jsonl(rl / "metrics.jsonl") if (rl / "metrics.jsonl").is_file() else []
    final = _json(root / "eval" / "metrics.json")
    if train:
        vals = [r for r in rl_rows if "val/pass@1" in r]
        final = {k.removeprefix("val/"): v for k, v in vals[-1].items() if k.startswith("val/")} if vals else None
    plain = config.get("config", {}).get("rollout", {}).get("format") == "plain"
    if final and plain:  # the plain format has no observation or prediction: its 0s would read as a failure
        final = {k: v for k, v in final.items() if k not in WORLD_MODEL_KEYS}
    return {"root": str(root), "name": root.name, "stage": config.get("stage"), "config": config.get("config", {}),
            "plain": plain, "eval": final, "imagine": _json(root / "imagine" / "imagine.json"),
            "novelty": _json(root / "novelty.json"), "rl_rows": rl_rows,
            "rl_result": _json(rl / "result.json"), "sft_result": _json(root / "sft" / "result.json"),
            "times": _json(root / "times.json") or {}}


RESULT_KEYS = ("pass@1", "pass@2", "pass@4", "pass@8", "format_rate", "action_valid_rate", "observation_exact",
               "prediction_exact", "prediction_cell_acc", "copy_exact_baseline", "mean_reward")
COMPARE_KEYS = ("pass@1", "pass@2", "pass@4", "pass@8", "format_rate", "observation_exact", "prediction_exact",
                "prediction_cell_acc", "copy_exact_baseline")


def results_rows(summary: dict) -> list[tuple[str, str, float | None]]:
    """(where, metric, value) rows of a run's results table."""
    rows: list[tuple[str, str, float | None]] = []
    final = summary["eval"] or {}
    for key in RESULT_KEYS:
        if key in final:
            rows.append(("final evaluation", key, final[key]))
    vals = [r for r in summary["rl_rows"] if "val/pass@1" in r]
    if vals:
        for label, row in (("RL, before the first step", vals[0]), ("RL, after the last step", vals[-1])):
            for key in ("val/pass@1", largest_pass_at_k(summary["rl_rows"]), "val/prediction_exact"):
                if key in row:
                    rows.append((label, key.removeprefix("val/"), row[key]))
    imag = summary["imagine"]
    if imag:
        rows += [("imagination (open loop)", "mean exact", imag["mean_exact"]),
                 ("imagination (open loop)", "mean cells", imag["mean_cells"]),
                 ("imagination (open loop)", "copy baseline, cells", imag["mean_copy_cells"])]
    for stage, seconds in summary.get("times", {}).items():
        rows.append(("wall time, minutes", stage, seconds / 60))
    return rows


def largest_pass_at_k(rows: list[dict]) -> str:
    """The validation Pass@k with the largest k the RL stage logged (k is at most its samples per puzzle)."""
    ks = [int(key.removeprefix("val/pass@")) for r in rows for key in r
          if key.startswith("val/pass@") and key.removeprefix("val/pass@").isdigit()]
    return f"val/pass@{max(ks, default=8)}"


# ------------------------------------------------------------------------------------------ plots
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


def plot_validation(summaries: list[dict], keys: tuple[str, ...], title: str) -> bytes | None:
    """Metrics against the RL step, one line per run and key. With several runs, a run is a colour and a key a line
    style, and earlier runs are drawn wider underneath, so that runs with equal values still show."""
    fig = Figure(figsize=(6.4, 3.8))
    ax = fig.subplots()
    drawn = False
    styles = ("o-", "s--", "^:", "d-.")
    for i, s in enumerate(summaries):
        width = 1.3 if len(summaries) == 1 else 1.0 + 2.0 * (len(summaries) - 1 - i) / (len(summaries) - 1)
        for j, key in enumerate(keys):
            if s["plain"] and key.split("/")[-1] in WORLD_MODEL_KEYS:
                continue  # nothing to score: see run_summary
            points = [(r["step"], r[key]) for r in s["rl_rows"] if isinstance(r.get(key), int | float)]
            if points:
                name = key.removeprefix("val/")
                label, colour = (name, None) if len(summaries) == 1 else (f"{s['name']}: {name}", f"C{i % 10}")
                ax.plot(*zip(*points, strict=True), styles[j % len(styles)], color=colour, ms=2 + width, lw=width,
                        label=label)
                drawn = True
    if drawn:
        ax.set_xlim(*step_limits([r["step"] for s in summaries for r in s["rl_rows"] if "step" in r]))
    return _finish(fig, ax, title, xlabel="RL step", integer_x=True) if drawn else None


def plot_novelty(summaries: list[dict]) -> bytes | None:
    """Held-out state perplexity of each stage's model."""
    fig = Figure(figsize=(6.4, 3.4))
    ax = fig.subplots()
    drawn = False
    for s in summaries:
        stages = s["novelty"] or []
        if stages:
            ax.plot([x["stage"] for x in stages], [x["perplexity"] for x in stages], "o-", label=s["name"])
            drawn = True
    return _finish(fig, ax, "novelty of validation states under each stage's model (lower: more familiar)",
                   ylabel="held-out state perplexity") if drawn else None


def plot_imagination(summaries: list[dict]) -> bytes | None:
    fig = Figure(figsize=(6.4, 3.4))
    ax = fig.subplots()
    drawn = False
    for s in summaries:
        imag = s["imagine"]
        if imag and imag["steps"]:
            steps = [x["step"] for x in imag["steps"]]
            ax.plot(steps, [x["cells"] for x in imag["steps"]], "o-", label=f"{s['name']}: imagined, cells")
            ax.plot(steps, [x["copy_cells"] for x in imag["steps"]], ":", label=f"{s['name']}: nothing changes")
            drawn = True
    return _finish(fig, ax, "open-loop world model", xlabel="turn (from 2 on, the agent sees only its own predictions)",
                   ylabel="cell accuracy", integer_x=True) if drawn else None


def figures(summaries: list[dict]) -> list[tuple[str, bytes]]:
    """The report's figures (title, PNG bytes), the ones with something to draw."""
    out = [
        ("Validation Pass@1 and Pass@k", plot_validation(summaries, ("val/pass@1", largest_pass_at_k(
            [r for summary in summaries for r in summary["rl_rows"]])),
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


# ------------------------------------------------------------------------------------------ the page


def _asset(name: str) -> str:
    """A file of `pipeline/assets/` (the report's style sheet and viewer script), to inline."""
    return (resources.files("spa_rl.pipeline") / "assets" / name).read_text(encoding="utf-8")


def _fmt(value: Any) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.3f}"
    return str(value)


def _figures_html(figs: list[tuple[str, bytes]]) -> str:
    return "".join(f'<figure><img alt="{html.escape(t)}" src="data:image/png;base64,'
                   f'{base64.b64encode(png).decode()}"><figcaption>{html.escape(t)}</figcaption></figure>'
                   for t, png in figs)


def _page(title: str, subtitle: str, sections: list[str]) -> str:
    return (f"<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>"
            f"<style>{_asset('report.css')}</style></head><body><header><h1>{html.escape(title)}</h1>"
            f"<p>{html.escape(subtitle)}</p></header><main>{''.join(sections)}</main></body></html>\n")


def _viewer(episodes: list[dict]) -> str:
    payload = json.dumps(episodes, ensure_ascii=False).replace("</", "<\\/")
    return ('<section class="viewer"><h2>Trajectories (validation)</h2><div class="controls">'
            '<select id="puzzle" aria-label="puzzle"></select><select id="sample" aria-label="sample"></select>'
            '<button id="prev">&larr; previous turn</button><button id="next">next turn &rarr;</button>'
            '<span id="pos"></span></div><div id="turn"></div>'
            f'<script type="application/json" id="episodes">{payload}</script>'
            f'<script>{_asset("viewer.js")}</script></section>')


def write_report(root: str | Path) -> Path:
    """`report.html` (and `curves.png` of the RL stage) for the run in `root`."""
    root = Path(root)
    summary = run_summary(root)
    if (root / "rl" / "metrics.jsonl").is_file():
        plot_rl(root / "rl")
    cfg = summary["config"]
    rows = "".join(f"<tr><td>{html.escape(w)}</td><td>{html.escape(k)}</td><td class=\"num\">{_fmt(v)}</td></tr>"
                   for w, k, v in results_rows(summary))
    episodes = []
    if (root / "eval" / "trajectories.jsonl").is_file():
        episodes = read_jsonl(root / "eval" / "trajectories.jsonl")[:VIEWER_EPISODES]
    rollout = cfg.get("rollout", {})
    subtitle = (f"recipe {cfg.get('recipe')} · preset {cfg.get('preset')} · {rollout.get('env')} "
                f"({rollout.get('render')}, {rollout.get('format')}) · model {cfg.get('model', {}).get('model')} · "
                f"seed {cfg.get('seed')}")
    notes = ""
    if cfg.get("warm_start"):
        notes = ("<p>Every arm at this scale starts with a format warm start: a short SFT on scripted self-play in "
                 "the arm's own format and render (in the world-model format: the true state as the observation, "
                 "the prediction rewritten as &ldquo;nothing changes&rdquo;, so no dynamics are taught), so that a "
                 "model too small to follow the format zero-shot gets some reward. The arms then differ only in "
                 "what the paper varies.</p>")
    sections = [
        f"<section><h2>Results</h2>{notes}<table><tr><th>where</th><th>metric</th><th>value</th></tr>{rows}"
        "</table></section>",
        f"<section><h2>Plots</h2><div class=\"figs\">{_figures_html(figures([summary]))}</div></section>",
        _viewer(episodes),
        f"<section><h2>Settings</h2><pre>{html.escape(json.dumps(cfg, indent=2))}</pre></section>",
    ]
    out = root / "report.html"
    atomic_write_text(out, _page(f"spa run {cfg.get('recipe')}: {root.name}", subtitle, sections))
    return out


# ------------------------------------------------------------------------------------------ spa compare
@dataclass(kw_only=True)
class CompareConfig(Config):
    """`spa compare`: one report over several runs."""

    runs: list[str] = setting(positional=True)
    """Run directories made by `spa run` or `spa train`."""
    out: str = setting("compare.html", metavar="FILE")
    """The report to write."""


def _arm(summary: dict) -> str:
    """What a run is apart from its seed and directory: the key runs are grouped by."""
    cfg = {k: v for k, v in summary["config"].items() if k not in ("seed", "out", "tensorboard")}
    return json.dumps(cfg, sort_keys=True)


def compare_runs(config: CompareConfig) -> Path:
    """Write one report comparing the runs of `config`: a table with mean and spread over the runs that differ
    only in their seed, and every run's curves overlaid."""
    out = writable_file(config.out)
    summaries = []
    for path in config.runs:
        summary = run_summary(Path(path))
        if summary["stage"] not in ("run", "train"):
            raise SpaError(f"{path} is not a run directory made by `spa run` or `spa train`")
        summaries.append(summary)
    groups: dict[str, list[dict]] = {}
    for s in summaries:
        groups.setdefault(_arm(s), []).append(s)
    keys = [k for k in COMPARE_KEYS if any(k in (s["eval"] or {}) for s in summaries)]  # no all-n/a columns
    header = "".join(f"<th>{html.escape(k)}</th>" for k in keys)
    body = ""
    for members in groups.values():
        cfg = members[0]["config"]
        arm = (f"{cfg.get('recipe')} ({cfg.get('preset')})" if members[0]["stage"] == "run" else
               f"spa train ({cfg.get('advantage')}, {cfg.get('rollout', {}).get('env')})")
        label = f"{arm}, {len(members)} seed(s): " + ", ".join(m["name"] for m in members)
        cells = ""
        for key in keys:
            values = [m["eval"][key] for m in members if m["eval"] and key in m["eval"]]
            if not values:
                cells += "<td class=\"num\">n/a</td>"
            elif len(values) == 1:
                cells += f"<td class=\"num\">{values[0]:.3f}</td>"
            else:
                cells += f"<td class=\"num\">{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}</td>"
        body += f"<tr><td>{html.escape(label)}</td>{cells}</tr>"
    sections = [
        f"<section><h2>Final evaluation (mean ± standard deviation over seeds; for `spa train` runs, the last "
        f"validation)</h2><table><tr><th>run</th>{header}"
        f"</tr>{body}</table></section>",
        f"<section><h2>Plots</h2><div class=\"figs\">{_figures_html(figures(summaries))}</div></section>",
    ]
    atomic_write_text(out, _page("spa compare", f"{len(summaries)} runs in {len(groups)} arm(s)", sections))
    return out
