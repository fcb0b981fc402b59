"""Progress display for long work: a spinner for waits of unknown length and a bar with a true rate and ETA.

The rate is the work done since the bar started divided by the time since then (not a windowed estimate,
which reads absurd numbers off a bar that jumps), and the ETA is what is left at that rate. Work that resumes
passes `completed=` when adding the task; that part is not counted in the rate. Output goes to stderr so
that stdout stays machine-readable. In non-interactive runs (a log file under nohup or a cluster's batch
system, CI, pipes) rich draws nothing until the bar stops, so a two-hour run would log nothing for two hours;
there the bar prints one plain line (done/total, rate, elapsed, ETA) at most once a minute instead. This
module must never hold any logic of the work it displays.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from rich.console import Console
from rich.progress import BarColumn, Progress, ProgressColumn, Task, TextColumn, TimeElapsedColumn
from rich.text import Text

_console = Console(stderr=True)


def true_rate(task: Task) -> float | None:
    """Units per second since the task started (work it started with excluded), None before any."""
    elapsed = task.elapsed
    done = task.completed - task.fields.get("initial", 0.0)
    if not elapsed or done <= 0:
        return None
    return done / elapsed


class RateColumn(ProgressColumn):
    """`12.3 episodes/s`, or `19.8 s/step` when slower than one unit per second (a training step on CPU), with
    the unit taken from the task's `unit` field (plural; a trailing `s` is dropped for the per-unit form)."""

    def render(self, task: Task) -> Text:
        unit = task.fields.get("unit", "it")
        rate = true_rate(task)
        if not rate:
            return Text(f"? {unit}/s", style="progress.data.speed")
        if rate < 1:
            return Text(f"{1 / rate:,.1f} s/{unit.removesuffix('s')}", style="progress.data.speed")
        return Text(f"{rate:,.1f} {unit}/s", style="progress.data.speed")


def _hms(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


class EtaColumn(ProgressColumn):
    """`ETA 0:03:12`: the work left at the true rate."""

    def render(self, task: Task) -> Text:
        rate = true_rate(task)
        if task.finished:
            return Text("ETA 0:00:00", style="progress.remaining")
        if not rate or task.total is None:
            return Text("ETA -:--:--", style="progress.remaining")
        return Text(f"ETA {_hms(max(task.total - task.completed, 0) / rate)}", style="progress.remaining")


class CountColumn(ProgressColumn):
    """done/total in whole units; fractional progress (per turn) that sums to a whole up to float error counts
    as that whole (47.9999 of 48 episodes is 48, not 47)."""

    def render(self, task: Task) -> Text:
        total = "?" if task.total is None else f"{int(task.total)}"
        return Text(f"{int(task.completed + 1e-6)}/{total}", style="progress.download")


LOG_INTERVAL = 60.0
"""Seconds between the plain progress lines of a non-interactive run."""


def progress_line(task: Task) -> str:
    """`PPO 3/30 steps, 154.2 s/step, elapsed 0:07:42, ETA 1:09:23`: the bar as one line of plain text."""
    return (f"{task.description} {CountColumn().render(task).plain} {task.fields.get('unit', 'it')}, "
            f"{RateColumn().render(task).plain}, elapsed {_hms(task.elapsed or 0)}, {EtaColumn().render(task).plain}")


class _Progress(Progress):
    def __init__(self, *columns: ProgressColumn, transient: bool = False, **kwargs) -> None:
        super().__init__(*columns, transient=transient, **kwargs)
        self._log_lines = not transient and not self.console.is_interactive
        self._last_line: dict[int, float] = {}

    def add_task(self, description: str, *args, completed: float = 0, **fields) -> int:  # type: ignore[override]
        task = super().add_task(description, *args, completed=completed, initial=completed, **fields)
        self._last_line[task] = self.get_time()
        return task

    def update(self, task_id: int, **kwargs) -> None:  # type: ignore[override]
        super().update(task_id, **kwargs)
        self._maybe_log(task_id)

    def advance(self, task_id: int, advance: float = 1) -> None:
        super().advance(task_id, advance)
        self._maybe_log(task_id)

    def _maybe_log(self, task_id: int) -> None:
        """In a non-interactive run, one plain line for `task_id` if a minute has passed since its last."""
        if not self._log_lines:
            return
        now = self.get_time()
        if now - self._last_line.get(task_id, now) >= LOG_INTERVAL:
            self._last_line[task_id] = now
            with self._lock:
                task = self._tasks[task_id]
            self.console.print(progress_line(task), markup=False, highlight=False, soft_wrap=True)


def say(message: str, quiet: bool = False) -> None:
    """One line of news on stderr (what a long run is doing: resuming, skipping finished work)."""
    if not quiet:
        _console.print(message, markup=False, highlight=False, soft_wrap=True)


@contextlib.contextmanager
def status(message: str) -> Iterator[None]:
    """A spinner with `message` while the block runs."""
    with _console.status(message):
        yield


def progress_bar(transient: bool = False) -> Progress:
    """A bar with done/total, true rate, elapsed time and ETA; `add_task(description, total=n, unit="episodes")`
    (`completed=k` for work resumed at k)."""
    return _Progress(TextColumn("{task.description}"), BarColumn(), CountColumn(), RateColumn(),
                     TimeElapsedColumn(), EtaColumn(), console=_console, transient=transient)
