"""Self-play data (SPEC §4): play, replace the agent's beliefs with the environment's true states, and write
supervised fine-tuning samples.

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
from dataclasses import asdict, dataclass, field
from pathlib import Path

from spa_rl.errors import SpaError
from spa_rl.io import atomic_write_json, atomic_write_jsonl
from spa_rl.prompts import format_response
from spa_rl.rollout import Episode

DATASET_VERSION = 1


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


@dataclass
class CollectConfig:
    """Where the data goes and how it is filtered and split."""

    out: str
    """Dataset directory: `train.jsonl`, `val.jsonl`, `manifest.json`, and `shards/` while collecting."""
    val_fraction: float = 0.1
    """Share of trajectories (not rows) held out for validation."""
    filter_malformed: bool = True
    """Drop turns whose response broke the format (the paper found filtering matters for weak models)."""
    extra_meta: dict = field(default_factory=dict)
    """Recorded in every row's metadata (e.g. the behaviour policy)."""


def trajectory_id(env: str, seed: int, sample: int, round_: int = 0) -> str:
    return f"{env}/{round_}/{seed}/{sample}"


def is_validation(traj_id: str, val_fraction: float) -> bool:
    """Deterministic split by trajectory: the same trajectory always lands on the same side."""
    h = int(hashlib.sha256(traj_id.encode()).hexdigest()[:8], 16)
    return h / 0xFFFFFFFF < val_fraction


def rewrite_turn(turn, fmt: str) -> str:
    """The turn's response with the true states in its tags, its reasoning kept, its executed actions as answer."""
    return format_response(turn.state_before, turn.parsed.reasoning, turn.state_after, list(turn.actions), fmt)


def episode_samples(episode: Episode, fmt: str, render: str, filter_malformed: bool, meta: dict,
                    round_: int = 0) -> tuple[list[dict], int]:
    """SFT rows of one episode and the number of turns dropped as malformed.

    A dropped turn also ends the trajectory's samples: later turns would condition on a history the model was
    never trained to produce.
    """
    rows: list[dict] = []
    history = list(episode.messages[:2])
    tid = trajectory_id(episode.env, episode.seed, episode.sample, round_)
    dropped = 0
    for i, turn in enumerate(episode.turns):
        if filter_malformed and (not turn.parsed.format_ok or not turn.actions):
            dropped = len(episode.turns) - i
            break
        completion = {"role": "assistant", "content": rewrite_turn(turn, fmt)}
        rows.append({
            "prompt": [dict(m) for m in history],
            "completion": [completion],
            "meta": {"env": episode.env, "render": render, "format": fmt, "seed": episode.seed,
                     "sample": episode.sample, "turn": turn.turn, "trajectory": tid,
                     "state_before": turn.state_before, "state_after": turn.state_after,
                     "actions": list(turn.actions), "success": episode.success, "round": round_, **meta},
        })
        history.append(completion)
        user_index = 2 * (i + 1) + 1  # messages: system, user, (assistant, user)*
        if user_index < len(episode.messages):
            history.append(dict(episode.messages[user_index]))
    return rows, dropped


def _row_key(row: dict) -> str:
    return hashlib.sha256(json.dumps([row["prompt"], row["completion"]], ensure_ascii=False).encode()).hexdigest()


class DatasetWriter:
    """Writes a self-play dataset shard by shard and can resume after an interruption."""

    def __init__(self, config: CollectConfig, header: dict) -> None:
        self.config = config
        self.root = Path(config.out)
        self.shards = self.root / "shards"
        self.header = header
        self.progress_file = self.root / "progress.json"
        self.done_units: set[str] = set()
        self.seen: set[str] = set()
        self.stats = CollectStats()
        self.shards.mkdir(parents=True, exist_ok=True)
        if self.progress_file.exists():
            state = json.loads(self.progress_file.read_text())
            if state.get("header") != header:
                raise SpaError(f"{self.root} holds a collection with other settings ({state.get('header')}): "
                               f"use another --out or delete it")
            self.done_units = set(state["done"])
            self.stats = CollectStats(**state["stats"])
            for path in sorted(self.shards.glob("*.jsonl")):
                for row in read_jsonl(path):
                    self.seen.add(_row_key(row))

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
            samples, dropped = episode_samples(ep, fmt, render, self.config.filter_malformed,
                                               {**self.config.extra_meta, **meta}, round_)
            stats.dropped_malformed += dropped
            for row in samples:
                key = _row_key(row)
                if key in self.seen:
                    stats.dropped_duplicate += 1
                    continue
                self.seen.add(key)
                row["meta"]["split"] = "val" if is_validation(row["meta"]["trajectory"],
                                                              self.config.val_fraction) else "train"
                stats.train += row["meta"]["split"] == "train"
                stats.val += row["meta"]["split"] == "val"
                rows.append(row)
        stats.kept = len(rows)
        atomic_write_jsonl(self.shards / f"{unit}.jsonl", rows)
        self.done_units.add(unit)
        self.stats.add(stats)
        atomic_write_json(self.progress_file, {"header": self.header, "done": sorted(self.done_units),
                                               "stats": asdict(self.stats)})
        return stats

    def finalize(self) -> CollectStats:
        """Write `train.jsonl`, `val.jsonl` and `manifest.json` from the shards."""
        train, val = [], []
        for path in sorted(self.shards.glob("*.jsonl")):
            for row in read_jsonl(path):
                (val if row["meta"]["split"] == "val" else train).append(row)
        atomic_write_jsonl(self.root / "train.jsonl", train)
        atomic_write_jsonl(self.root / "val.jsonl", val)
        atomic_write_json(self.root / "manifest.json", {"version": DATASET_VERSION, **self.header,
                                                        "stats": asdict(self.stats)})
        return self.stats


def read_jsonl(path: str | Path) -> list[dict]:
    """Rows of a JSONL file; a malformed line is an error that names the file and line."""
    rows = []
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as e:
        raise SpaError(f"cannot read {path}: {e.strerror}") from None
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise SpaError(f"{path} line {n} is not valid JSON ({e.msg}): fix or delete that line") from None
        if not isinstance(row, dict):
            raise SpaError(f"{path} line {n} is not a JSON object")
        rows.append(row)
    return rows


def collect(env: str, out: str, policy: str = "model", model: str | None = None, puzzles: int = 160,
            samples: int = 8, render: str = "grid+coords", fmt: str = "world-model", first_seed: int = 0,
            temperature: float = 1.0, max_new_tokens: int = 256, filter_malformed: bool = True,
            val_fraction: float = 0.1, seed: int = 0, puzzles_per_shard: int = 4, backend: str = "kv",
            device: str = "auto", dtype: str = "auto", branch_share: float = 0.5, round_: int = 0,
            novelty_actor: str = "model", quiet: bool = False) -> CollectStats:
    """Play `samples` episodes on each of `puzzles` training puzzles with the behaviour `policy` and write the
    rewritten turns as a dataset in `out` (resumable).

    `policy="novelty"` is the model as behaviour policy with novelty-guided starts: after the first shard, a
    `branch_share` of each shard's puzzle groups start from the most novel states seen so far (highest N(s)
    under the model) instead of a fresh puzzle, so the data concentrates where the model is least familiar.
    The number of episodes stays the same. `novelty_actor` picks the actions of novelty-guided episodes: the
    model (default) or a scripted policy (`random`, `solver`); novelty is always scored by `model`.
    """
    from spa_rl import envs
    from spa_rl.evaluation import VALIDATION_SEED_OFFSET
    from spa_rl.generation import SamplingConfig, make_backend
    from spa_rl.io import writable_dir
    from spa_rl.progress import progress_bar
    from spa_rl.rollout import RolloutConfig, RolloutEngine

    variant = envs.get_variant(env)
    if first_seed < 0 or first_seed + puzzles > VALIDATION_SEED_OFFSET:
        raise SpaError(f"training seeds must lie in [0, {VALIDATION_SEED_OFFSET}): validation uses the rest")
    if policy not in POLICIES:
        raise SpaError(f"unknown behaviour policy {policy!r}: use one of {', '.join(POLICIES)}")
    if not 0.0 <= branch_share <= 1.0:
        raise SpaError(f"branch share must be within [0, 1], got {branch_share}")
    if novelty_actor not in ("model", "random", "solver"):
        raise SpaError(f"unknown novelty actor {novelty_actor!r}: use model, random or solver")
    writable_dir(out)
    uses_model = policy in ("model", "novelty")
    header = {"env": env, "render": render, "format": fmt, "policy": policy,
              "model": (model or "smollm2-135m") if uses_model else None, "samples": samples,
              "first_seed": first_seed, "temperature": temperature, "max_new_tokens": max_new_tokens,
              "filter_malformed": filter_malformed, "val_fraction": val_fraction, "seed": seed, "round": round_,
              "branch_share": branch_share if policy == "novelty" else None,
              "novelty_actor": novelty_actor if policy == "novelty" else None}
    writer = DatasetWriter(CollectConfig(out, val_fraction, filter_malformed, {"policy": policy}), header)
    config = RolloutConfig(env=env, render=render, format=fmt, record_snapshots=policy == "novelty",
                           sampling=SamplingConfig(max_new_tokens=max_new_tokens, temperature=temperature))
    lm = None
    if uses_model:
        from spa_rl.models import DEFAULT_MODEL, load_model

        lm = load_model(model or DEFAULT_MODEL, device=device, dtype=dtype)
    actor = novelty_actor if policy == "novelty" else policy
    if actor == "model":
        engine = RolloutEngine(config, make_backend(backend, lm.model, lm.tokenizer), lm.tokenizer)
    else:
        engine = RolloutEngine(config, policy=actor)
    pool: list[tuple[float, int, object]] = []  # (novelty, seed, snapshot) of states seen so far
    seeds = list(range(first_seed, first_seed + puzzles))
    units = [seeds[i:i + puzzles_per_shard] for i in range(0, len(seeds), puzzles_per_shard)]
    with progress_bar(transient=quiet) as bar:
        task = bar.add_task(f"self-play {env} ({policy})", total=len(seeds) * samples, unit="episodes")
        for k, unit_seeds in enumerate(units):
            name = f"seeds-{unit_seeds[0]:09d}-{unit_seeds[-1]:09d}"
            if writer.is_done(name):
                bar.advance(task, len(unit_seeds) * samples)
                continue
            n_branch = round(branch_share * len(unit_seeds)) if policy == "novelty" and pool else 0
            pool.sort(key=lambda x: -x[0])
            branches, pool = pool[:n_branch], pool[n_branch:]
            tasks = [(s, j, None) for s in unit_seeds[:len(unit_seeds) - len(branches)] for j in range(samples)]
            tasks += [(s, 10_000 * (b + 1) + j, snap) for b, (_, s, snap) in enumerate(branches)
                      for j in range(samples)]
            episodes = engine.run_tasks(tasks, seed=seed + k, progress=lambda n: bar.advance(task, n))
            writer.add(name, episodes, fmt, render, {}, round_)
            if policy == "novelty":
                pool += _score_new_states(lm, env, render, fmt, variant, episodes)
    return writer.finalize()


POLICIES = ("model", "novelty", "random", "solver")


def _score_new_states(lm, env_name: str, render: str, fmt: str, variant, episodes: list[Episode]) -> list:
    """(N(s), seed, snapshot) for every distinct non-terminal turn-start state of the episodes."""
    from spa_rl import envs
    from spa_rl.novelty import score_states, state_contexts

    env = envs.make(env_name, render=render).unwrapped
    seen: dict[str, tuple[int, object]] = {}
    for ep in episodes:
        for turn, snap in zip(ep.turns, ep.snapshots, strict=False):
            if not snap.done and turn.state_before not in seen:
                seen[turn.state_before] = (ep.seed, snap)
    items = [state_contexts(env, text, render, fmt, lm.tokenizer, variant.max_actions_per_turn,
                            variant.max_actions_per_episode) for text in seen]
    scores = score_states(lm.model, lm.tokenizer, items) if items else []
    return [(score, seed, snap) for score, (seed, snap) in zip(scores, seen.values(), strict=True)]


def selfplay_rounds(env: str, out: str, rounds: int = 2, model: str | None = None, policy: str = "model",
                    puzzles: int = 32, samples: int = 4, render: str = "grid+coords", heldout_puzzles: int = 16,
                    sft_overrides: dict | None = None, collect_overrides: dict | None = None,
                    first_seed: int = 0, quiet: bool = False) -> list[dict]:
    """Alternate self-play collection and world-model SFT for `rounds` rounds, each round starting from the
    previous round's model, on fresh training puzzles (round r: seeds from first_seed + (r-1) * puzzles).
    Before the first round and after every round, the mean novelty of held-out (validation-puzzle) states under
    the current model is logged to `out/rounds.jsonl`. Finished rounds are skipped when the command is rerun."""
    from spa_rl.envs import get_variant
    from spa_rl.io import writable_dir
    from spa_rl.models import DEFAULT_MODEL, load_model
    from spa_rl.novelty import perplexity_summary, sample_states, score_states, state_contexts
    from spa_rl.sft import SFTConfig, train_sft

    variant = get_variant(env)
    root = writable_dir(out)
    log_path = root / "rounds.jsonl"
    done = {r["round"]: r for r in (read_jsonl(log_path) if log_path.is_file() else [])}

    def heldout_novelty(model_path: str) -> dict:
        from spa_rl import envs

        lm = load_model(model_path)
        e = envs.make(env, render=render).unwrapped
        items = [state_contexts(e, s, render, "world-model", lm.tokenizer, variant.max_actions_per_turn,
                                variant.max_actions_per_episode) for s in sample_states(env, render, heldout_puzzles)]
        return perplexity_summary(score_states(lm.model, lm.tokenizer, items))

    current = model or DEFAULT_MODEL
    history = []
    if 0 not in done:
        done[0] = {"round": 0, "model": current, "heldout": heldout_novelty(current)}
        _append_jsonl(log_path, done[0])
    history.append(done[0])
    for r in range(1, rounds + 1):
        model_dir = root / f"round-{r}" / "sft" / "model"
        if r not in done:
            data = root / f"round-{r}" / "data"
            collect(env, str(data), policy=policy, model=current, puzzles=puzzles, samples=samples, render=render,
                    first_seed=first_seed + (r - 1) * puzzles, round_=r, quiet=quiet, **(collect_overrides or {}))
            train_sft(SFTConfig(data=str(data), out=str(root / f"round-{r}" / "sft"), model=current, env=env,
                                **(sft_overrides or {})), quiet=quiet)
            done[r] = {"round": r, "model": str(model_dir), "heldout": heldout_novelty(str(model_dir))}
            _append_jsonl(log_path, done[r])
        history.append(done[r])
        current = str(model_dir)
    from spa_rl.plots import plot_rounds

    plot_rounds(root)
    return history


def _append_jsonl(path: Path, row: dict) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(row) + "\n")
        f.flush()
