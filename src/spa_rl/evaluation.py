"""`spa eval`: play a fixed set of validation puzzles and measure them with `spa_rl.metrics` (Pass@k, action
statistics, world-model accuracy); writes the episodes and the metrics. It must never compute a metric itself: the
training loop's validation and this command report the same numbers because both call `metrics.compute_metrics`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from rich.table import Table

from spa_rl.api import RESPONSES_FILE, ApiConfig, ApiPolicy
from spa_rl.config import Seeded, setting
from spa_rl.errors import SpaError
from spa_rl.generation import make_backend
from spa_rl.io import atomic_write_json, atomic_write_jsonl, read_json
from spa_rl.metrics import compute_metrics
from spa_rl.models import DEFAULT_MODEL, ModelConfig, load_model
from spa_rl.outputs import claim_output
from spa_rl.progress import progress_bar, say
from spa_rl.rollout import RolloutConfig, RolloutEngine
from spa_rl.seeds import validation_seeds
from spa_rl.training.precision import check_dtype


# ------------------------------------------------------------------------------------------ the command
@dataclass(kw_only=True)
class EvalConfig(Seeded):
    """`spa eval`: play validation puzzles and measure Pass@k, actions and world-model accuracy."""

    model: ModelConfig = setting(factory=ModelConfig)
    api: ApiConfig = setting(factory=ApiConfig)
    rollout: RolloutConfig = setting(factory=RolloutConfig)
    policy: Literal["model", "random", "solver"] = "model"
    """Who plays: the model, or a scripted policy (random, solver: the floor and the ceiling)."""
    puzzles: int = setting(32, ge=1)
    """Validation puzzles (the fixed seeds from 1,000,000,000 on)."""
    samples: int = setting(8, ge=1)
    """Episodes per puzzle (Pass@k needs k <= samples)."""
    out: str | None = setting(None, metavar="DIR")
    """Directory for config.json, metrics.json and trajectories.jsonl (and responses.jsonl, an API's answers, from
    which an interrupted evaluation resumes; none: print only)."""

    def check(self) -> None:
        if self.policy != "model" and self.model.model != DEFAULT_MODEL:
            raise SpaError("--model is for --policy model; scripted policies need no model")
        if self.policy != "model" and self.api.api_base:
            raise SpaError("--api-base is for --policy model; scripted policies ask no model")
        check_dtype(self.model.dtype, training=False)


def evaluate(config: EvalConfig, quiet: bool = False) -> dict:
    """Run `config.samples` episodes on each of `config.puzzles` validation puzzles and return the metrics.

    With `config.out`, writes `config.json`, `metrics.json` and `trajectories.jsonl` there (atomically); an
    output directory that already holds this evaluation is not evaluated again.
    """
    out = None
    if config.out:
        out = claim_output(config.out, "eval", config, done="metrics.json")
        if out.finished:
            say(f"{out.path} already holds this evaluation: showing its results", quiet)
            return read_json(out.path / "metrics.json", "evaluation")
    rc = config.rollout
    api = None
    if config.api.api_base:
        api = ApiPolicy(config.api, config.model.model, out.path / RESPONSES_FILE if out else None, config.seed)
        engine = RolloutEngine(rc, api, policy="api")
        model_desc = {"model": config.model.model, "api_base": config.api.api_base}
    elif config.policy == "model":
        lm = load_model(config.model.model, device=config.model.device, dtype=config.model.dtype)
        engine = RolloutEngine(rc, make_backend(rc.backend, lm.model, lm.tokenizer), lm.tokenizer)
        model_desc = {"model": lm.name, "path": lm.path, "device": lm.device, "dtype": str(lm.dtype)}
    else:
        engine = RolloutEngine(rc, policy=config.policy)
        model_desc = {"model": None}
    seeds = validation_seeds(config.puzzles)
    with progress_bar(transient=quiet) as bar:
        task = bar.add_task(f"eval {rc.env} ({'api' if api else config.policy})", total=config.puzzles * config.samples,
                            unit="episodes")
        try:
            episodes = engine.run(seeds, group_size=config.samples, seed=config.seed,
                                  progress=lambda n: bar.advance(task, n))
        finally:
            if api is not None:
                api.close()
    if api is not None:
        say(f"api: {api.asked} answers asked, {api.replayed} replayed from the answers kept before", quiet)
    metrics = compute_metrics(episodes, config.samples)
    if api is not None:  # an API returns text: there are no token ids to count
        metrics.pop("mean_response_tokens", None)
    metrics["config"] = {"env": rc.env, "policy": config.policy, "render": rc.render, "format": rc.format,
                         "puzzles": config.puzzles, "samples": config.samples,
                         "temperature": rc.sampling.temperature, "max_new_tokens": rc.sampling.max_new_tokens,
                         "backend": "api" if api else rc.backend, "seed": config.seed, "first_seed": seeds[0],
                         **model_desc}
    if out is not None:
        atomic_write_jsonl(out.path / "trajectories.jsonl", (e.to_json() for e in episodes))
        atomic_write_json(out.path / "metrics.json", metrics)
    return metrics


def metrics_table(metrics: dict, title: str = "evaluation"):
    """A rich table of the headline metrics."""
    table = Table(title=title)
    table.add_column("metric")
    table.add_column("value", justify="right")
    keys = [k for k in metrics if k.startswith(("pass@", "any@"))] + [
        "format_rate", "action_valid_rate", "action_effective_rate", "mean_actions", "mean_turns", "mean_reward",
        "mean_response_tokens", "observation_exact", "observation_cell_acc", "prediction_exact",
        "prediction_cell_acc"]
    for k in keys:
        v = metrics.get(k)
        table.add_row(k, f"{v:.3f}" if isinstance(v, float) else str(v))
    return table
