"""Run metrics: JSONL always, TensorBoard by default, Weights & Biases when asked.

`RunLogger.log(step, {"loss/train": 1.2, ...})` appends one JSON line per call to `metrics.jsonl` (flushed, so
an interrupted run keeps what it logged) and mirrors scalars to the other sinks. A run that starts fresh
(`resume_step=0`) replaces an old `metrics.jsonl`; a resumed run keeps the rows up to its checkpoint's step and
drops the rest, so plots show one history. This module must never decide what is logged.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any


class RunLogger:
    def __init__(self, out_dir: str | Path, tensorboard: bool = True, wandb_project: str | None = None,
                 config: dict | None = None, resume_step: int = 0) -> None:
        from spa_rl.io import atomic_write_jsonl

        self.dir = Path(out_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        path = self.dir / "metrics.jsonl"
        old = read_metrics(path) if resume_step and path.is_file() else []
        atomic_write_jsonl(path, [r for r in old if r.get("step", 0) <= resume_step])
        self._jsonl = open(path, "a", encoding="utf-8")  # noqa: SIM115 - kept open
        self._tb = None
        self._wandb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(log_dir=str(self.dir / "tensorboard"))
            except ImportError:
                self._tb = None
        if wandb_project:
            import wandb

            self._wandb = wandb.init(project=wandb_project, config=config or {}, dir=str(self.dir))

    def log(self, step: int, values: dict[str, Any]) -> None:
        row = {"step": step, "time": time.time(), **values}
        self._jsonl.write(json.dumps(row) + "\n")
        self._jsonl.flush()
        scalars = {k: v for k, v in values.items() if isinstance(v, int | float)}
        if self._tb is not None:
            for k, v in scalars.items():
                self._tb.add_scalar(k, v, step)
            self._tb.flush()
        if self._wandb is not None:
            self._wandb.log(scalars, step=step)

    def close(self) -> None:
        self._jsonl.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()


def read_metrics(path: str | Path) -> list[dict]:
    """The rows of a `metrics.jsonl` (a torn last line from an interruption is skipped)."""
    rows = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows
