"""The run report: PNG plots and one self-contained `report.html` (styles, script and images inlined; it opens
from a file with no network), and `spa compare` over several runs.

A run's report holds its settings, a results table (the final evaluation; the RL run's validation before and
after; imagination), the plots (validation Pass@1 and Pass@k against the RL step, world-model accuracy,
held-out novelty per stage, reward, losses) and a trajectory viewer: pick a validation puzzle and sample, step
through its turns, and see the state the agent was shown, its observation and prediction beside the true
states with the differing cells highlighted, its actions and reward. This module must never compute a metric
or run a model: it only reads what the stages wrote. The pages are jinja2 templates beside the style sheet and the
viewer's script (`pipeline/assets/`), with autoescaping on: no text a run wrote reaches the page unescaped.
"""

from __future__ import annotations

import base64
import json
import statistics
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, ClassVar

import jinja2

from spa_rl.config import Config, setting
from spa_rl.errors import SpaError
from spa_rl.io import atomic_write_text, read_json, read_jsonl, writable_file
from spa_rl.plots import largest_pass_at_k, plot_rl, report_figures

VIEWER_EPISODES = 64
"""At most this many evaluation episodes are embedded in the viewer (the report stays small)."""


# ------------------------------------------------------------------------------------------ reading a run
def _json(path: Path) -> Any:
    return read_json(path, "results") if path.is_file() else None


@dataclass
class RunSummary:
    """What the stages of one run wrote (a stage that did not run is None or empty)."""

    WORLD_MODEL_KEYS: ClassVar[tuple[str, ...]] = ("observation_exact", "prediction_exact", "prediction_cell_acc")
    """Evaluation metrics of the world-model format, which a plain-format run does not have."""

    root: str
    name: str
    stage: str | None
    """`run` (made by `spa run`) or `train` (a `spa train` directory)."""
    config: dict
    plain: bool
    """The run's responses are in the plain format (no observation or prediction to score)."""
    eval: dict | None
    """The final evaluation's metrics (a `spa train` run: its last validation)."""
    imagine: dict | None = None
    novelty: list[dict] | None = None
    rl_rows: list[dict] = field(default_factory=list)
    """The RL stage's `metrics.jsonl`."""
    rl_result: dict | None = None
    sft_result: dict | None = None
    times: dict[str, float] = field(default_factory=dict)
    """Wall seconds per stage."""

    def shows(self, key: str) -> bool:
        """Whether metric `key` (`val/...` or plain) means anything for this run."""
        return not (self.plain and key.split("/")[-1] in self.WORLD_MODEL_KEYS)


def run_summary(root: Path) -> RunSummary:
    """What the stages of run `root` wrote. `root` may also be a `spa train` directory: its metrics are then the RL
    stage's, and its last validation stands for the final evaluation."""
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
        final = {k: v for k, v in final.items() if k not in RunSummary.WORLD_MODEL_KEYS}
    return RunSummary(root=str(root), name=root.name, stage=config.get("stage"), config=config.get("config", {}),
                      plain=plain, eval=final, imagine=_json(root / "imagine" / "imagine.json"),
                      novelty=_json(root / "novelty.json"), rl_rows=rl_rows, rl_result=_json(rl / "result.json"),
                      sft_result=_json(root / "sft" / "result.json"), times=_json(root / "times.json") or {})


RESULT_KEYS = ("pass@1", "pass@2", "pass@4", "pass@8", "format_rate", "action_valid_rate", "observation_exact",
               "prediction_exact", "prediction_cell_acc", "copy_exact_baseline", "mean_reward")
COMPARE_KEYS = ("pass@1", "pass@2", "pass@4", "pass@8", "format_rate", "observation_exact", "prediction_exact",
                "prediction_cell_acc", "copy_exact_baseline")


def results_rows(summary: RunSummary) -> list[tuple[str, str, float | None]]:
    """(where, metric, value) rows of a run's results table."""
    rows: list[tuple[str, str, float | None]] = []
    final = summary.eval or {}
    for key in RESULT_KEYS:
        if key in final:
            rows.append(("final evaluation", key, final[key]))
    vals = [r for r in summary.rl_rows if "val/pass@1" in r]
    if vals:
        for label, row in (("RL, before the first step", vals[0]), ("RL, after the last step", vals[-1])):
            for key in ("val/pass@1", largest_pass_at_k(summary.rl_rows), "val/prediction_exact"):
                if key in row:
                    rows.append((label, key.removeprefix("val/"), row[key]))
    imag = summary.imagine
    if imag:
        rows += [("imagination (open loop)", "mean exact", imag["mean_exact"]),
                 ("imagination (open loop)", "mean cells", imag["mean_cells"]),
                 ("imagination (open loop)", "copy baseline, cells", imag["mean_copy_cells"])]
    for stage, seconds in summary.times.items():
        rows.append(("wall time, minutes", stage, seconds / 60))
    return rows


# ------------------------------------------------------------------------------------------ the pages
def _fmt(value: Any) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.3f}"
    return str(value)


def _asset(name: str) -> str:
    """A file of `pipeline/assets/` (the report's style sheet and viewer script), to inline."""
    return (resources.files("spa_rl.pipeline") / "assets" / name).read_text(encoding="utf-8")


def _render(template: str, **context: Any) -> str:
    env = jinja2.Environment(loader=jinja2.PackageLoader("spa_rl.pipeline", "assets"),
                             autoescape=jinja2.select_autoescape(default=True), undefined=jinja2.StrictUndefined,
                             keep_trailing_newline=True)
    env.filters["fmt"] = _fmt
    return env.get_template(template).render(css=_asset("report.css"), **context)


def _figures(summaries: list[RunSummary]) -> list[dict[str, str]]:
    return [{"title": title, "png": base64.b64encode(png).decode()} for title, png in report_figures(summaries)]


def write_report(root: str | Path) -> Path:
    """`report.html` (and `curves.png` of the RL stage) for the run in `root`."""
    root = Path(root)
    summary = run_summary(root)
    if (root / "rl" / "metrics.jsonl").is_file():
        plot_rl(root / "rl")
    cfg = summary.config
    episodes = []
    if (root / "eval" / "trajectories.jsonl").is_file():
        episodes = read_jsonl(root / "eval" / "trajectories.jsonl")[:VIEWER_EPISODES]
    rollout = cfg.get("rollout", {})
    subtitle = (f"recipe {cfg.get('recipe')} · preset {cfg.get('preset')} · {rollout.get('env')} "
                f"({rollout.get('render')}, {rollout.get('format')}) · model {cfg.get('model', {}).get('model')} · "
                f"seed {cfg.get('seed')}")
    page = _render("report.html.j2", title=f"spa run {cfg.get('recipe')}: {root.name}", subtitle=subtitle,
                   warm_start=bool(cfg.get("warm_start")), rows=results_rows(summary), figures=_figures([summary]),
                   episodes=episodes, viewer_js=_asset("viewer.js"), settings=json.dumps(cfg, indent=2))
    out = root / "report.html"
    atomic_write_text(out, page)
    return out


# ------------------------------------------------------------------------------------------ spa compare
@dataclass(kw_only=True)
class CompareConfig(Config):
    """`spa compare`: one report over several runs."""

    runs: list[str] = setting(positional=True)
    """Run directories made by `spa run` or `spa train`."""
    out: str = setting("compare.html", metavar="FILE")
    """The report to write."""


def _arm(summary: RunSummary) -> str:
    """What a run is apart from its seed and directory: the key runs are grouped by."""
    cfg = {k: v for k, v in summary.config.items() if k not in ("seed", "out", "tensorboard")}
    return json.dumps(cfg, sort_keys=True)


def compare_runs(config: CompareConfig) -> Path:
    """Write one report comparing the runs of `config`: a table with mean and spread over the runs that differ
    only in their seed, and every run's curves overlaid."""
    out = writable_file(config.out)
    summaries = []
    for path in config.runs:
        summary = run_summary(Path(path))
        if summary.stage not in ("run", "train"):
            raise SpaError(f"{path} is not a run directory made by `spa run` or `spa train`")
        summaries.append(summary)
    groups: dict[str, list[RunSummary]] = {}
    for s in summaries:
        groups.setdefault(_arm(s), []).append(s)
    keys = [k for k in COMPARE_KEYS if any(k in (s.eval or {}) for s in summaries)]  # no all-n/a columns
    arms = []
    for members in groups.values():
        cfg = members[0].config
        arm = (f"{cfg.get('recipe')} ({cfg.get('preset')})" if members[0].stage == "run" else
               f"spa train ({cfg.get('advantage')}, {cfg.get('rollout', {}).get('env')})")
        cells = []
        for key in keys:
            values = [m.eval[key] for m in members if m.eval and key in m.eval]
            cells.append("n/a" if not values else f"{values[0]:.3f}" if len(values) == 1 else
                         f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}")
        arms.append((f"{arm}, {len(members)} seed(s): " + ", ".join(m.name for m in members), cells))
    page = _render("compare.html.j2", title="spa compare", subtitle=f"{len(summaries)} runs in {len(groups)} arm(s)",
                   keys=keys, arms=arms, figures=_figures(summaries))
    atomic_write_text(out, page)
    return out
