"""Progress display for long work: a spinner for waits of unknown length and a bar with rate and ETA.

Output goes to stderr so that stdout stays machine-readable; in non-interactive runs (CI, pipes) rich prints
no animation. This module must never hold any logic of the work it displays.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text

_console = Console(stderr=True)


class RateColumn(ProgressColumn):
    """`12.3 episodes/s`, or `19.8 s/step` when slower than one unit per second (a training step on CPU), with
    the unit taken from the task's `unit` field (plural; a trailing `s` is dropped for the per-unit form)."""

    def render(self, task: Task) -> Text:
        unit = task.fields.get("unit", "it")
        if not task.speed:
            return Text(f"? {unit}/s", style="progress.data.speed")
        if task.speed < 1:
            return Text(f"{1 / task.speed:,.1f} s/{unit.removesuffix('s')}", style="progress.data.speed")
        return Text(f"{task.speed:,.1f} {unit}/s", style="progress.data.speed")


@contextlib.contextmanager
def status(message: str) -> Iterator[None]:
    """A spinner with `message` while the block runs."""
    with _console.status(message):
        yield


def progress_bar(transient: bool = False) -> Progress:
    """A bar with done/total, rate, elapsed time and ETA; `add_task(description, total=n, unit="episodes")`."""
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), RateColumn(),
                    TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(), console=_console,
                    transient=transient)
