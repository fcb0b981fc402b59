"""`spa run RECIPE`: the whole method (or one of its baselines and ablations) in one resumable run directory.

A recipe (a small TOML file: `recipes/*.toml` here, or a path) names the stages an arm runs and the settings
that make it that arm (render, format, the SFT loss, the behaviour policy, the rewrite); a preset (`presets/*.toml`,
or a path) sizes everything for a machine (`smoke`: a tiny model, seconds; `cpu`: the embedded model in about
30 minutes on 2 cores; `paper`: the paper's settings for GPUs). Precedence, lowest first: the dataclass
defaults, the preset, the recipe, `--config`, `--set`, flags.

Stages, each in its own subdirectory with its own `config.json`, each skipped when finished and resumed when
interrupted: `warm-start/` (optional: a short SFT on scripted self-play in the arm's own format and render, the
observation the true state and the prediction rewritten as "nothing changes", so that a model too small to follow
the format zero-shot gets some reward in every arm while learning no dynamics; with the state contents masked
instead, the 135M model never learned to close the tags), `data/` (self-play), `sft/` (world-model SFT), `rl/`
(PPO), `eval/` (the final model on the validation puzzles), `imagine/` (open-loop world-model accuracy,
world-model arms only), then `novelty.json` (held-out novelty under each stage's model), `times.json` (wall
seconds per stage, summed over resumed invocations), `memory.json` (each stage's peak resident memory, GiB) and
`report.html`. A stage that fails leaves the earlier ones
intact; rerunning the command starts from it. This module must never train or
play itself: it only chains the stages and fills in the paths between them.
"""

from __future__ import annotations

import time
import tomllib
from dataclasses import dataclass, replace
from importlib import resources
from pathlib import Path
from typing import Any, ClassVar

from spa_rl.collect import CollectConfig, collect
from spa_rl.config import Seeded, build, coerce, leaf_of, resolve, setting
from spa_rl.errors import SpaError
from spa_rl.evaluation import EvalConfig, evaluate
from spa_rl.imagine import ImagineConfig, imagine
from spa_rl.io import atomic_write_json, read_json
from spa_rl.models import DEFAULT_MODEL, ModelConfig, load_model, pick_device
from spa_rl.novelty import heldout_novelty
from spa_rl.outputs import claim_output
from spa_rl.progress import say
from spa_rl.rl.config import RLConfig
from spa_rl.rl.trainer import train_rl
from spa_rl.rollout import RolloutConfig
from spa_rl.sft import SFTConfig, train_sft
from spa_rl.training.memory import peak_rss_bytes, release_free_memory, reset_peak_rss
from spa_rl.training.precision import native_bf16

STAGE = "run"
STAGES = ("collect", "sft", "rl", "eval")
STAGE_PARTS = ("warm_collect", "warm_sft", "collect", "sft", "rl", "eval", "imagine")
"""The run's nested stage settings; their paths, model, what they play, seed and logging are the run's."""
PER_RUN = "(set by spa run)"


def _placeholder_stages() -> dict[str, Any]:
    return {
        "warm_collect": CollectConfig(out=PER_RUN, policy="random", puzzles=32, samples=2, copy_prediction=True),
        "warm_sft": SFTConfig(data=PER_RUN, out=PER_RUN, loss="full", epochs=1),
        "collect": CollectConfig(out=PER_RUN),
        "sft": SFTConfig(data=PER_RUN, out=PER_RUN),
        "rl": RLConfig(out=PER_RUN),
        "eval": EvalConfig(),
        "imagine": ImagineConfig(),
    }


@dataclass(kw_only=True)
class RunConfig(Seeded):
    """`spa run`: one arm of the paper (a recipe) at one scale (a preset), stage by stage."""

    hidden: ClassVar[tuple[str, ...]] = tuple(f"{stage}.{part}" for stage in STAGE_PARTS
                                              for part in ("out", "model", "rollout", "seed", "log", "data", "env")
                                              ) + ("eval.policy",)

    recipe: str = setting(positional=True)
    """The arm: spa, vanilla-rl, state-estimation-rl, spa-masked, spa-self-belief, spa-random-data, spa-dpo, or a
    recipe file (.toml)."""
    preset: str = "cpu"
    """The scale: smoke (a tiny model, seconds), cpu (the embedded model, about 30 minutes on 2 cores), paper (the
    paper's settings, for GPUs), or a preset file (.toml)."""
    out: str = setting("", metavar="DIR")
    """Run directory: one subdirectory per stage, config.json, report.html (default: runs/RECIPE-PRESET)."""
    stages: list[str] = setting(factory=lambda: list(STAGES))
    """The stages the recipe runs, in order (from collect, sft, rl, eval; comma-separated on the command line)."""
    warm_start: bool = False
    """First a short SFT on scripted self-play in the arm's format and render, its predictions rewritten as "nothing
    changes": a format warm start without the dynamics, for a model too small to follow the format zero-shot (the
    cpu preset uses it for every arm)."""
    model: ModelConfig = setting(factory=ModelConfig)
    """The starting model (and the device and precision of every stage)."""
    rollout: RolloutConfig = setting(factory=lambda: RolloutConfig(env="frozenlake"))
    """What every stage plays: env, render, format, limits, sampling."""
    warm_collect: CollectConfig = setting(factory=lambda: _placeholder_stages()["warm_collect"])
    warm_sft: SFTConfig = setting(factory=lambda: _placeholder_stages()["warm_sft"])
    collect: CollectConfig = setting(factory=lambda: _placeholder_stages()["collect"])
    sft: SFTConfig = setting(factory=lambda: _placeholder_stages()["sft"])
    rl: RLConfig = setting(factory=lambda: _placeholder_stages()["rl"])
    eval: EvalConfig = setting(factory=lambda: _placeholder_stages()["eval"])
    imagine: ImagineConfig = setting(factory=lambda: _placeholder_stages()["imagine"])
    novelty_puzzles: int = setting(16, ge=1)
    """Validation puzzles whose states measure each stage's model's novelty (state perplexity) for the report."""
    tensorboard: bool = setting(True, volatile=True)
    """Write TensorBoard event files for the training stages."""

    def check(self) -> None:
        unknown = [s for s in self.stages if s not in STAGES]
        if unknown or not self.stages:
            raise SpaError(f"unknown stages {unknown}: a recipe's stages come from {', '.join(STAGES)}")
        if "sft" in self.stages and "collect" not in self.stages:
            raise SpaError("stage sft needs stage collect before it (its data)")
        if not self.out:
            raise SpaError("missing setting out: pass --out DIR")
        for name in STAGE_PARTS:  # each stage's own checks, before any work
            if name == "imagine" and self.rollout.format != "world-model":
                continue  # plain responses hold no prediction to imagine with: the run skips the stage
            stage_config(self, name, Path(PER_RUN), self.model.model)


def stage_config(run: RunConfig, name: str, root: Path, model: str) -> Any:
    """The settings of stage `name` inside run directory `root`, its model `model`: the run's shared settings
    (model part, what is played, seed, logging) filled into the stage's own."""
    rc = run.rollout
    base = getattr(run, name)
    starting = replace(run.model, model=model)
    if name in ("warm_collect", "collect"):
        out = root / ("warm-start/data" if name == "warm_collect" else "data")
        # warm-start data is in the arm's own format but never branches or needs a model's novelty
        scripted = base.policy in ("random", "solver")
        return replace(base, out=str(out), seed=run.seed, rollout=rc,
                       model=replace(run.model, model=DEFAULT_MODEL) if scripted else starting)
    if name in ("warm_sft", "sft"):
        prefix = "warm-start/" if name == "warm_sft" else ""
        return replace(base, data=str(root / prefix / "data"), out=str(root / prefix / "sft"), env=rc.env,
                       model=starting, seed=run.seed, log=replace(base.log, tensorboard=run.tensorboard))
    if name == "rl":
        return replace(base, out=str(root / "rl"), model=starting, rollout=rc, seed=run.seed,
                       log=replace(base.log, tensorboard=run.tensorboard))
    if name == "eval":
        return replace(base, out=str(root / "eval"), model=starting, rollout=rc, seed=run.seed)
    return replace(base, out=str(root / "imagine"), model=starting, rollout=rc, seed=run.seed)


# ------------------------------------------------------------------------------------------ recipes, presets
def _builtin(kind: str) -> dict[str, Path]:
    folder = resources.files("spa_rl.pipeline") / kind
    return {Path(str(p)).stem: Path(str(p)) for p in folder.iterdir() if str(p).endswith(".toml")}


def recipes() -> dict[str, Path]:
    """The recipes that ship with spa-rl: name -> file."""
    return _builtin("recipes")


def presets() -> dict[str, Path]:
    """The presets that ship with spa-rl: name -> file."""
    return _builtin("presets")


def find(kind: str, name: str) -> Path:
    """The file of recipe or preset `name` (a built-in name or a path to a .toml), or a one-line error listing the
    valid names."""
    builtin = recipes() if kind == "recipe" else presets()
    if name in builtin:
        return builtin[name]
    path = Path(name)
    if path.suffix == ".toml" and path.is_file():
        return path
    raise SpaError(f"unknown {kind} {name!r}: use one of {', '.join(sorted(builtin))} (or a .toml file)")


def describe(kind: str, name: str) -> str:
    """The one-line description a recipe or preset file starts with."""
    try:
        return str(tomllib.loads(find(kind, name).read_text()).get("description", ""))
    except (OSError, tomllib.TOMLDecodeError):
        return ""


def _layer(path: Path) -> dict[tuple[str, ...], Any]:
    """A recipe's or preset's settings (its description aside)."""
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
        raise SpaError(f"cannot read {path}: {e}") from None
    raw.pop("description", None)
    values = {}
    for key, value in _flat(raw).items():
        p = resolve(RunConfig, key)
        values[p] = coerce(leaf_of(RunConfig, p), value, f"{path.name} key {key}")
    return values


def _flat(table: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in table.items():
        key = f"{prefix}.{k}" if prefix else k
        if isinstance(v, dict):
            out.update(_flat(v, key))
        else:
            out[key] = v
    return out


def layered_values(recipe: str, preset: str) -> dict[tuple[str, ...], Any]:
    """The preset's settings overlaid by the recipe's (a recipe says what the arm is; a preset how big)."""
    return {**_layer(find("preset", preset)), **_layer(find("recipe", recipe))}


def make_run_config(values: dict[tuple[str, ...], Any]) -> RunConfig:
    """The run's settings from the command line's `values` over the recipe and preset they name."""
    recipe, preset = values.get(("recipe",)), values.get(("preset",), "cpu")
    if recipe is None:
        raise SpaError(f"name a recipe: spa run RECIPE (one of {', '.join(sorted(recipes()))})")
    if not values.get(("out",)):
        values = {**values, ("out",): f"runs/{Path(recipe).stem}-{Path(preset).stem}"}
    return build(RunConfig, {**layered_values(recipe, preset), **values})


# ------------------------------------------------------------------------------------------ the run
def run_pipeline(config: RunConfig, quiet: bool = False) -> Path:
    """Run (or resume) every stage of `config` in `config.out`; return the path of the report."""
    from spa_rl.pipeline.report import write_report

    out = claim_output(config.out, STAGE, config, done="report.html")
    root = out.path
    if out.finished:
        say(f"{root} already holds this finished run: its report is {root / 'report.html'}", quiet)
        return root / "report.html"
    if note := speed_note(config):
        say(note, quiet)
    plan = (["warm-start"] if config.warm_start else []) + list(config.stages)
    if config.rollout.format == "world-model":
        plan.append("imagine")
    model = config.model.model
    times_path = root / "times.json"
    times = read_json(times_path, "stage times (delete it to start the count afresh)") if times_path.is_file() else {}
    memory_path = root / "memory.json"  # each stage's peak resident memory, GiB (the last invocation's)
    peaks = read_json(memory_path, "stage memory (delete it)") if memory_path.is_file() else {}
    for k, stage in enumerate(plan, 1):
        say(f"[{k}/{len(plan)}] {stage}: {_what(stage, config)}", quiet)
        started = time.perf_counter()
        release_free_memory()  # what the stage before freed goes back to the system, not into this stage's peak
        reset_peak_rss()
        if stage == "warm-start":
            collect(stage_config(config, "warm_collect", root, model), quiet=quiet)
            release_free_memory()
            train_sft(stage_config(config, "warm_sft", root, model), quiet=quiet)
            model = str(root / "warm-start" / "sft" / "model")
        elif stage == "collect":
            collect(stage_config(config, "collect", root, model), quiet=quiet)
        elif stage == "sft":
            train_sft(stage_config(config, "sft", root, model), quiet=quiet)
            model = str(root / "sft" / "model")
        elif stage == "rl":
            train_rl(stage_config(config, "rl", root, model), quiet=quiet)
            model = str(root / "rl" / "model")
        elif stage == "eval":
            evaluate(stage_config(config, "eval", root, model), quiet=quiet)
        else:
            imagine(stage_config(config, "imagine", root, model), quiet=quiet)
        times[stage] = times.get(stage, 0.0) + time.perf_counter() - started  # summed over resumed invocations
        atomic_write_json(times_path, times)
        peaks[stage] = round(peak_rss_bytes() / 2**30, 2)
        atomic_write_json(memory_path, peaks)
    models = _stage_models(config, root)
    if not (root / "novelty.json").is_file():  # how familiar validation states are to each stage's model
        say(f"held-out novelty of {len(models)} models", quiet)
        started = time.perf_counter()
        rows = []
        for stage, path in models:
            lm = load_model(path, config.model.device, config.model.dtype)
            rows.append({"stage": stage, "model": path,
                         **heldout_novelty(lm, config.rollout.env, config.rollout.render, config.novelty_puzzles)})
        atomic_write_json(root / "novelty.json", rows)
        times["novelty"] = time.perf_counter() - started
        atomic_write_json(times_path, times)
    report = write_report(root)
    say(f"report: {report}", quiet)
    return report


def speed_note(config: RunConfig) -> str | None:
    """A warning when the cpu preset (sized for 30 minutes on 2 cores with native bf16) meets a CPU without it."""
    device = pick_device(config.model.device)
    if config.preset == "cpu" and device == "cpu" and config.model.dtype == "auto" and not native_bf16(device):
        return ("note: this CPU has no native bf16 (AVX-512 BF16 or AMX), so the model runs in fp32, 3-5x slower "
                "than where the cpu preset was sized: expect hours, not 30 minutes (docs/benchmarks.md)")
    return None


def _stage_models(config: RunConfig, root: Path) -> list[tuple[str, str]]:
    """(stage, model path) of the starting model and of every stage that produced one."""
    out = [("start", config.model.model)]
    if config.warm_start:
        out.append(("warm start", str(root / "warm-start" / "sft" / "model")))
    if "sft" in config.stages:
        out.append(("world-model SFT", str(root / "sft" / "model")))
    if "rl" in config.stages:
        out.append(("RL", str(root / "rl" / "model")))
    return out


def _what(stage: str, config: RunConfig) -> str:
    rc = config.rollout

    def count(n: int, word: str) -> str:
        return f"{n} {word}" if n == 1 else f"{n} {word}s"

    return {
        "warm-start": f"format warm start: scripted self-play ({config.warm_collect.policy}) in the {rc.format} "
                      f"format, {rc.render} render"
                      f"{', predictions rewritten as nothing changes' if rc.format == 'world-model' else ''}, then SFT",
        "collect": f"self-play data: the {'model' if config.collect.uses_model else config.collect.policy} plays "
                   f"{config.collect.puzzles} puzzles x {config.collect.samples}, "
                   f"{'true states replace its beliefs' if config.collect.rewrite else 'its own beliefs kept'}",
        "sft": f"world-model SFT ({config.sft.loss} loss, {count(config.sft.epochs, 'epoch')})",
        "rl": f"{'DPO' if config.rl.algorithm == 'dpo' else f'PPO ({config.rl.advantage})'}, "
              f"{count(config.rl.steps, 'step')} of "
              f"{config.rl.puzzles_per_step} puzzles x {config.rl.samples_per_puzzle}",
        "eval": f"the final model on {config.eval.puzzles} validation puzzles x {config.eval.samples}",
        "imagine": f"the agent plays inside its own world model on {config.imagine.puzzles} validation puzzles",
    }[stage]


__all__ = ["RunConfig", "find", "layered_values", "make_run_config", "presets", "recipes", "run_pipeline"]
