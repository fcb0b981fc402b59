"""Self-play data (docs/method.md §4): play, replace the agent's beliefs with the environment's true
states, and write supervised fine-tuning samples (`spa collect`).

Every assistant turn is rewritten: `<observation>` gets the true state at the start of the turn and
`<prediction>` the true state after the turn's executed actions, both in the run's render; the reasoning is
kept and the answer becomes the actions that were executed. One sample per assistant turn, in the
conversational prompt/completion format (the history before the turn, with earlier turns rewritten too, and
the rewritten turn), with metadata. Trajectories are split into train and validation by a hash of their id,
never by row, and identical samples are written once.

Collection writes one shard per batch of puzzles, atomically, and records what it has done, so an
interrupted run leaves valid files and a rerun continues where it stopped. This module must never keep a
turn whose true states it does not know, and never mix envs in one dataset.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import ClassVar, Literal

from spa_rl.config import Seeded, setting
from spa_rl.errors import SpaError
from spa_rl.generation import make_backend
from spa_rl.io import atomic_write_json, atomic_write_jsonl, read_json, read_jsonl
from spa_rl.models import DEFAULT_MODEL, LoadedModel, ModelConfig, load_model
from spa_rl.novelty import state_novelty
from spa_rl.outputs import claim_output
from spa_rl.progress import progress_bar, say
from spa_rl.rollout import Episode, RolloutConfig, RolloutEngine
from spa_rl.samples import DATASET_STAGE, episode_samples
from spa_rl.seeds import check_training_range, training_seeds
from spa_rl.training.precision import check_dtype

DATASET_VERSION = 2
STAGE = DATASET_STAGE


@dataclass(kw_only=True)
class CollectConfig(Seeded):
    """`spa collect`: self-play data for world-model SFT."""

    hidden: ClassVar[tuple[str, ...]] = ("round",)

    out: str = setting(metavar="DIR")
    """Dataset directory: config.json, train.jsonl, val.jsonl, manifest.json (and shards/ while collecting)."""
    model: ModelConfig = setting(factory=ModelConfig)
    rollout: RolloutConfig = setting(factory=RolloutConfig)
    policy: Literal["model", "novelty", "random", "solver"] = "model"
    """Behaviour policy: the model itself (the paper's); novelty: the model, with episodes branching from the
    most novel states seen so far; random; solver (scripted: how a model that cannot follow the format yet is
    cold-started)."""
    puzzles: int = setting(160, ge=1)
    """Training puzzles."""
    samples: int = setting(8, ge=1)
    """Episodes per puzzle."""
    first_seed: int = setting(0, ge=0)
    """First training puzzle seed (training seeds lie below 1,000,000,000, the validation puzzles' range)."""
    filter_malformed: bool = setting(True, flag="--no-filter")
    """Drop turns whose response broke the format, with the rest of their trajectory (--no-filter keeps them)."""
    rewrite: bool = True
    """Replace the agent's observation and prediction by the true states (SPA); --no-rewrite keeps its own beliefs
    (the paper's self-belief ablation)."""
    copy_prediction: bool = False
    """With the rewrite, put the current state, not the next one, in <prediction> ("nothing changes"): the format
    and the observation without the dynamics. `spa run`'s format warm start uses it."""
    val_fraction: float = setting(0.1, ge=0, lt=1)
    """Share of trajectories (not rows) held out for validation."""
    branch_share: float = setting(0.5, ge=0, le=1)
    """With --policy novelty: share of each shard's puzzle groups that start from the most novel states."""
    novelty_actor: Literal["model", "random", "solver"] = "model"
    """With --policy novelty: who picks the actions (novelty is always scored by the model)."""
    puzzles_per_shard: int = setting(4, ge=1)
    """Puzzles per shard: the unit of work that is written at once and skipped when a run resumes."""
    round: int = 0
    """Self-play round this data belongs to (recorded in every row; set by `spa selfplay`)."""

    def check(self) -> None:
        check_training_range(self.first_seed, self.puzzles)
        if self.policy in ("random", "solver") and self.model.model != DEFAULT_MODEL:
            raise SpaError("--model is for --policy model or novelty; scripted policies need no model")
        check_dtype(self.model.dtype, training=False)
        if self.copy_prediction and not self.rewrite:
            raise SpaError("copy_prediction rewrites the prediction: it needs the rewrite (drop --no-rewrite)")

    @property
    def uses_model(self) -> bool:
        return self.policy in ("model", "novelty")


@dataclass
class CollectStats:
    """What a collection produced and what it dropped, and why."""

    trajectories: int = 0
    successes: int = 0
    turns: int = 0
    kept: int = 0
    dropped_malformed: int = 0
    dropped_duplicate: int = 0
    train: int = 0
    val: int = 0

    def add(self, other: CollectStats) -> None:
        for k, v in asdict(other).items():
            setattr(self, k, getattr(self, k) + v)


def is_validation(traj_id: str, val_fraction: float) -> bool:
    """Deterministic split by trajectory: the same trajectory always lands on the same side."""
    h = int(hashlib.sha256(traj_id.encode()).hexdigest()[:8], 16)
    return h / 0xFFFFFFFF < val_fraction


def _row_key(row: dict) -> str:
    return hashlib.sha256(json.dumps([row["prompt"], row["completion"]], ensure_ascii=False).encode()).hexdigest()


def manifest_of(config: CollectConfig) -> dict:
    """The dataset's summary that readers check (`samples.load_dataset`): what was collected, and how."""
    rc = config.rollout
    return {"version": DATASET_VERSION, "env": rc.env, "render": rc.render, "format": rc.format,
            "policy": config.policy, "model": config.model.model if config.uses_model else None,
            "samples": config.samples, "first_seed": config.first_seed, "round": config.round,
            "rewrite": config.rewrite, "copy_prediction": config.copy_prediction,
            "filter_malformed": config.filter_malformed,
            "novelty_actor": config.novelty_actor if config.policy == "novelty" else None}


class DatasetWriter:
    """Writes a self-play dataset shard by shard into a directory and can resume after an interruption (the
    directory's config has been checked by `claim_output` before)."""

    def __init__(self, root: str | Path, val_fraction: float = 0.1, filter_malformed: bool = True,
                 manifest: dict | None = None, extra_meta: dict | None = None, rewrite: bool = True,
                 copy_prediction: bool = False) -> None:
        self.root = Path(root)
        self.rewrite = rewrite
        self.copy_prediction = copy_prediction
        self.val_fraction = val_fraction
        self.filter_malformed = filter_malformed
        self.manifest = manifest or {}
        self.extra_meta = extra_meta or {}
        self.shards = self.root / "shards"
        self.progress_file = self.root / "progress.json"
        self.done_units: set[str] = set()
        self.seen: set[str] = set()
        self.stats = CollectStats()
        self.shards.mkdir(parents=True, exist_ok=True)
        if self.progress_file.exists():
            state = read_json(self.progress_file, "collection")
            self.done_units = set(state["done"])
            self.stats = CollectStats(**state["stats"])
            for path in sorted(self.shards.glob("*.jsonl")):
                if path.stem in self.done_units:
                    self.seen.update(_row_key(row) for row in read_jsonl(path))

    def is_done(self, unit: str) -> bool:
        return unit in self.done_units

    def add(self, unit: str, episodes: Iterable[Episode], fmt: str, render: str, meta: dict,
            round_: int = 0) -> CollectStats:
        """Convert and write one unit of work (e.g. one batch of puzzle seeds) as one shard."""
        stats = CollectStats()
        rows = []
        for ep in episodes:
            stats.trajectories += 1
            stats.successes += int(ep.success)
            stats.turns += len(ep.turns)
            samples, dropped = episode_samples(ep, fmt, render, self.filter_malformed, {**self.extra_meta, **meta},
                                               round_, self.rewrite, self.copy_prediction)
            stats.dropped_malformed += dropped
            for row in samples:
                key = _row_key(row)
                if key in self.seen:
                    stats.dropped_duplicate += 1
                    continue
                self.seen.add(key)
                row["meta"]["split"] = "val" if is_validation(row["meta"]["trajectory"], self.val_fraction) else "train"
                stats.train += row["meta"]["split"] == "train"
                stats.val += row["meta"]["split"] == "val"
                rows.append(row)
        stats.kept = len(rows)
        atomic_write_jsonl(self.shards / f"{unit}.jsonl", rows)
        self.done_units.add(unit)
        self.stats.add(stats)
        atomic_write_json(self.progress_file, {"done": sorted(self.done_units), "stats": asdict(self.stats)})
        return stats

    def finalize(self) -> CollectStats:
        """Write `train.jsonl`, `val.jsonl` and, last, `manifest.json` (the mark of a finished dataset)."""
        train, val = [], []
        for path in sorted(self.shards.glob("*.jsonl")):
            if path.stem not in self.done_units:
                continue
            for row in read_jsonl(path):
                (val if row["meta"]["split"] == "val" else train).append(row)
        atomic_write_jsonl(self.root / "train.jsonl", train)
        atomic_write_jsonl(self.root / "val.jsonl", val)
        atomic_write_json(self.root / "manifest.json", {**self.manifest, "stats": asdict(self.stats)})
        return self.stats


def collect(config: CollectConfig, quiet: bool = False) -> CollectStats:
    """Play `config.samples` episodes on each of `config.puzzles` training puzzles with the behaviour policy and
    write the rewritten turns as a dataset in `config.out` (resumable; a finished dataset is left as it is).

    `policy="novelty"` is the model as behaviour policy with novelty-guided starts: after the first shard, a
    `branch_share` of each shard's puzzle groups start from the most novel states seen so far (highest N(s)
    under the model) instead of a fresh puzzle, so the data concentrates where the model is least familiar.
    The number of episodes stays the same. `novelty_actor` picks the actions of novelty-guided episodes: the
    model (default) or a scripted policy (`random`, `solver`); novelty is always scored by the model.
    """
    out = claim_output(config.out, STAGE, config, done="manifest.json")
    writer = DatasetWriter(out.path, config.val_fraction, config.filter_malformed, manifest_of(config),
                           {"policy": config.policy}, config.rewrite, config.copy_prediction)
    if out.finished:
        say(f"{out.path} already holds this finished collection: nothing to do", quiet)
        return writer.stats
    if out.resumed:
        say(f"resuming the collection in {out.path}: {len(writer.done_units)} shards done", quiet)
    rc = replace(config.rollout, record_snapshots=config.policy == "novelty")
    lm = load_model(config.model.model, config.model.device, config.model.dtype) if config.uses_model else None
    actor = config.novelty_actor if config.policy == "novelty" else config.policy
    if actor == "model":
        engine = RolloutEngine(rc, make_backend(rc.backend, lm.model, lm.tokenizer), lm.tokenizer)
    else:
        engine = RolloutEngine(rc, policy=actor)
    pool: list[tuple[float, int, object]] = []  # (novelty, seed, snapshot) of states seen so far
    seeds = training_seeds(config.first_seed, config.puzzles)
    units = [seeds[i:i + config.puzzles_per_shard] for i in range(0, len(seeds), config.puzzles_per_shard)]
    with progress_bar(transient=quiet) as bar:
        done = sum(len(u) for u in units if writer.is_done(_unit_name(u))) * config.samples
        task = bar.add_task(f"self-play {rc.env} ({config.policy})", total=len(seeds) * config.samples,
                            completed=done, unit="episodes")
        for k, unit_seeds in enumerate(units):
            name = _unit_name(unit_seeds)
            if writer.is_done(name):
                continue
            n_branch = round(config.branch_share * len(unit_seeds)) if config.policy == "novelty" and pool else 0
            pool.sort(key=lambda x: -x[0])
            branches, pool = pool[:n_branch], pool[n_branch:]
            tasks = [(s, j, None) for s in unit_seeds[:len(unit_seeds) - len(branches)] for j in range(config.samples)]
            tasks += [(s, 10_000 * (b + 1) + j, snap) for b, (_, s, snap) in enumerate(branches)
                      for j in range(config.samples)]
            episodes = engine.run_tasks(tasks, seed=config.seed + k, progress=lambda n: bar.advance(task, n))
            writer.add(name, episodes, rc.format, rc.render, {}, config.round)
            if config.policy == "novelty":
                pool += score_new_states(lm, rc, episodes)
    return writer.finalize()


def _unit_name(unit_seeds: list[int]) -> str:
    return f"seeds-{unit_seeds[0]:09d}-{unit_seeds[-1]:09d}"


def score_new_states(lm: LoadedModel, rc: RolloutConfig, episodes: list[Episode]) -> list:
    """(N(s), seed, snapshot) for every distinct non-terminal turn-start state of the episodes."""
    seen: dict[str, tuple[int, object]] = {}
    for ep in episodes:
        for turn, snap in zip(ep.turns, ep.snapshots, strict=False):
            if not snap.done and turn.state_before not in seen:
                seen[turn.state_before] = (ep.seed, snap)
    scores = state_novelty(lm.model, lm.tokenizer, rc, list(seen))
    return [(score, seed, snap) for score, (seed, snap) in zip(scores, seen.values(), strict=True)]
