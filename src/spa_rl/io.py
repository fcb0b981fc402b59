"""Files that must never be half-written, and the one way to read and append JSONL.

- `atomic_write_text` / `_json` / `_jsonl`: written to a temporary file that is then renamed, so readers
  see the old file or the new one, never a part.
- `atomic_dir`: a directory (a model, a checkpoint) built in a temporary sibling and renamed into place.
- `read_jsonl` / `append_jsonl`: one policy for a torn last line. A last line without its newline that is not
  valid JSON is what an interrupted append leaves: the reader skips it and the appender cuts it off before
  writing. Any other malformed line is an error that names the file and line.
- Everything is created with the permissions the user's umask gives (not the 0600/0700 of `tempfile`), so
  others on a shared machine can read results as they can read any file the user writes.

This module must never hold anything but file plumbing.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from spa_rl.errors import SpaError


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _make_public(path: Path, is_dir: bool) -> None:
    """Give a file made by `tempfile` (0600, 0700) the mode a plain `open`/`mkdir` would have given it."""
    os.chmod(path, (0o777 if is_dir else 0o666) & ~_umask())


PROBE_PREFIX = ".spa-probe-"  # writable_dir's test file, gone as soon as it is made


def partial_write_prefix(name: str) -> str:
    """The name prefix of the temporary sibling `atomic_write_text` writes before renaming it to `name`."""
    return f".{name}."


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write `text` to `path` so that readers see the old file or the new one, never a part."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=partial_write_prefix(path.name), dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        _make_public(Path(tmp), is_dir=False)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: str | Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def atomic_write_jsonl(path: str | Path, rows: Iterable[Any]) -> None:
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def recover_dir(target: str | Path) -> Path:
    """Put back the previous version of an `atomic_dir` target if an interruption fell between its two renames
    (the old version moved aside, the new one not yet in place)."""
    target = Path(target)
    old = target.with_name(f".{target.name}-old")
    if not target.exists() and old.is_dir():
        os.replace(old, target)
    return target


def atomic_dir(target: str | Path, write: Callable[[Path], None]) -> None:
    """Build the directory `target` by calling `write(tmp)` on a fresh temporary sibling, then rename it into
    place (an existing `target` is replaced). An interruption leaves the old directory or the new one (if it
    falls between the two renames, `recover_dir` puts the old one back)."""
    target = recover_dir(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        write(tmp)
        for path in [tmp, *tmp.rglob("*")]:  # some writers (safetensors) create files 0600 as tempfile does
            if not path.is_symlink():
                _make_public(path, is_dir=path.is_dir())
        old = None
        if target.exists():
            old = target.with_name(f".{target.name}-old")
            if old.exists():
                shutil.rmtree(old)
            os.replace(target, old)
        os.replace(tmp, target)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def read_json(path: str | Path, what: str = "file") -> Any:
    """A JSON file's content; unreadable or corrupt files are a one-line error naming the file."""
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise SpaError(f"cannot read {path}: {e.strerror}") from None
    except json.JSONDecodeError as e:
        raise SpaError(f"{path} is corrupt ({e.msg}, line {e.lineno}): delete it or restore the {what}") from None


def read_jsonl(path: str | Path) -> list[dict]:
    """The rows (JSON objects) of a JSONL file. A torn last line (no newline, not valid JSON) is skipped; any
    other malformed line is an error that names the file and line."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise SpaError(f"cannot read {path}: {e.strerror}") from None
    lines = data.split(b"\n")  # the last element is empty when the file ends with a newline
    rows = []
    for n, raw in enumerate(lines, 1):
        if not raw.strip():
            continue
        try:
            row = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            if n == len(lines):  # no newline after it: an interrupted append (maybe cut inside a character)
                break
            reason = e.msg if isinstance(e, json.JSONDecodeError) else "not UTF-8"
            raise SpaError(f"{path} line {n} is not valid JSON ({reason}): fix or delete that line") from None
        if not isinstance(row, dict):
            raise SpaError(f"{path} line {n} is not a JSON object")
        rows.append(row)
    return rows


def _cut_torn_tail(path: Path) -> None:
    """Drop an unfinished last line (an interrupted append) so the next row starts on a line of its own."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        return
    if data and not data.endswith(b"\n"):
        tail = data[data.rfind(b"\n") + 1:]
        try:
            json.loads(tail)
            keep = len(data)  # a complete row that only lacks its newline
        except ValueError:
            keep = len(data) - len(tail)
        with open(path, "r+b") as f:
            f.truncate(keep)
            if keep == len(data):
                f.seek(0, os.SEEK_END)
                f.write(b"\n")


def append_jsonl(path: str | Path, rows: Iterable[Any]) -> None:
    """Append rows to a JSONL file, flushed to disk (after cutting off a torn last line)."""
    path = Path(path)
    _cut_torn_tail(path)
    with open(path, "a", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())


class JsonlAppender:
    """A JSONL file kept open for many appends (metrics), each flushed; a torn last line is cut off first."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        _cut_torn_tail(self.path)
        self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - kept open until close()

    def append(self, row: Any) -> None:
        self._file.write(json.dumps(row, ensure_ascii=False) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def writable_dir(path: str | Path) -> Path:
    """Create `path` if needed and check that files can be written there, or raise a one-line SpaError."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=PROBE_PREFIX):
            pass
    except OSError as e:
        raise SpaError(f"cannot write to {path}: {e.strerror or e}; pass another output location") from None
    return path


def writable_file(path: str | Path) -> Path:
    """Check, before any work, that `path` can be written (its directory is created if missing)."""
    path = Path(path)
    if path.is_dir():
        raise SpaError(f"{path} is a directory: pass a file name for the output")
    writable_dir(path.parent if str(path.parent) else ".")
    return path
