"""Output directories and resume: every stage claims its directory before any slow work.

`claim_output(dir, stage, config)` writes the stage's resolved config to `DIR/config.json`, which also marks the
directory as that stage's. A rerun with the same config resumes (or finds the work finished); a different stage's
directory, a foreign non-empty directory, or a changed config is refused in one line that lists the changes.
This module must never delete a file it did not write, nor let a changed setting resume silently.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from spa_rl.config import defaults_of, diff, to_dict, volatile_paths
from spa_rl.errors import SpaError
from spa_rl.io import PROBE_PREFIX, atomic_write_json, partial_write_prefix, read_json, writable_dir

CONFIG_FILE = "config.json"


@dataclass
class Output:
    """A stage's claimed output directory."""

    path: Path
    resumed: bool
    """A run with the same settings had already started here."""
    finished: bool
    """... and it finished: nothing is left to do."""


def stage_of(path: str | Path) -> str | None:
    """The stage that made directory `path` (from its config.json), or None."""
    file = Path(path) / CONFIG_FILE
    if not file.is_file():
        return None
    data = read_json(file, "stage's settings")
    return data.get("stage") if isinstance(data, dict) else None


def _scratch(name: str) -> bool:
    """A file that claiming a directory leaves for an instant: the write probe, or the temporary sibling of an atomic
    write of `config.json`. Under `accelerate launch` every process claims the same directory at once, and another
    process's half-written config must not read as someone else's files."""
    return name.startswith((PROBE_PREFIX, partial_write_prefix(CONFIG_FILE)))


def claim_output(path: str | Path, stage: str, config: Any, done: str | None = None,
                 command: str | None = None, path_key: str = "out") -> Output:
    """Make `path` the output directory of `stage` run with `config`, or refuse in one line.

    New or empty: `config.json` is written. Holding this stage's `config.json` with the same settings (volatile
    ones aside): resumed, and `finished` if the file `done` exists. Holding only this stage's `config.json` (a run
    that stopped before doing any work): taken over with the new settings. Anything else is refused: another
    stage's output, a non-empty directory that no stage made, or this stage's work with other settings (the
    differences are listed). Call it before any slow work, so mistakes cost nothing."""
    from spa_rl import __version__  # (the package imports this module while it is being imported)

    path = Path(path)
    command = command or f"spa {stage}"
    file = path / CONFIG_FILE
    record = {"stage": stage, "spa_rl": __version__, "config": to_dict(config)}
    if path.exists() and not path.is_dir():
        raise SpaError(f"{path} is a file, not a directory: pass another output directory")
    if file.is_file():
        stored = read_json(file, "stage's settings")
        other = stored.get("stage") if isinstance(stored, dict) else None
        if other is None:
            raise SpaError(f"{path} is not empty and was not made by `{command}` (its config.json is not a stage's): "
                           f"pass a new or empty output directory")
        if other != stage:
            raise SpaError(f"{path} holds the output of `spa {other}`, not `{command}`: pass another output directory")
        # the directory's own path may be spelled differently (relative, a trailing slash): not a setting
        changes = diff(stored.get("config", {}), record["config"], volatile_paths(type(config)) | {path_key},
                       defaults_of(type(config)))
        started = any(p.name != CONFIG_FILE and not _scratch(p.name) for p in path.iterdir())
        if changes and not started:  # a run that failed before doing any work: nothing to resume, nothing lost
            atomic_write_json(file, record)
            return Output(path, False, False)
        if changes:
            raise SpaError(f"{path} was made with other settings ({'; '.join(changes)}): rerun with the same settings "
                           f"to resume it, or pass another output directory (or delete {path}) to start fresh")
        writable_dir(path)
        atomic_write_json(file, record)  # volatile settings (logging sinks) may have changed
        return Output(path, True, done is not None and (path / done).exists())
    if path.is_dir() and any(not _scratch(p.name) for p in path.iterdir()):
        if file.is_file():  # another process of the same launch wrote config.json since we looked: claim it as theirs
            return claim_output(path, stage, config, done, command, path_key)
        raise SpaError(f"{path} is not empty and was not made by `{command}`: pass a new or empty output directory")
    writable_dir(path)
    atomic_write_json(file, record)
    return Output(path, False, False)
