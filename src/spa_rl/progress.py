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
    """`12.3 episodes/s`, with the unit taken from the task's `unit` field."""

    def render(self, task: Task) -> Text:
        unit = task.fields.get("unit", "it")
        if task.speed is None:
            return Text(f"? {unit}/s", style="progress.data.speed")
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
