"""Run metrics: JSONL always, TensorBoard by default, Weights & Biases when asked.

`RunLogger.log(step, {"loss/train": 1.2, ...})` appends one JSON line per call to `metrics.jsonl` (flushed, so
an interrupted run keeps what it logged) and mirrors scalars to the other sinks. A run that starts fresh
(`resume_step=0`) replaces an old `metrics.jsonl`; a resumed run keeps the rows up to its checkpoint's step and
drops the rest, so plots show one history. This module must never decide what is logged.
"""

from __future__ import annotations

import importlib.util
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from spa_rl.config import Config, setting
from spa_rl.errors import SpaError
from spa_rl.io import JsonlAppender, atomic_write_jsonl, read_jsonl


@dataclass(kw_only=True)
class LogConfig(Config):
    """Where a training run's metrics go besides `metrics.jsonl`."""

    tensorboard: bool = setting(True, volatile=True)
    """Also write TensorBoard event files (`OUT/tensorboard`)."""
    wandb_project: str | None = setting(None, flag="--wandb", metavar="PROJECT", volatile=True)
    """Also log to this Weights & Biases project (needs `pip install wandb`)."""

    def check(self) -> None:
        if self.wandb_project and importlib.util.find_spec("wandb") is None:
            raise SpaError("--wandb needs the wandb package: pip install wandb (or pip install 'spa-rl[wandb]')")


class RunLogger:
    def __init__(self, out_dir: str | Path, config: LogConfig | None = None, run_config: dict | None = None,
                 resume_step: int = 0) -> None:
        config = config or LogConfig()
        self.dir = Path(out_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        path = self.dir / "metrics.jsonl"
        old = read_jsonl(path) if resume_step and path.is_file() else []
        atomic_write_jsonl(path, [r for r in old if r.get("step", 0) <= resume_step])
        self._jsonl = JsonlAppender(path)
        self._tb = None
        self._wandb = None
        if config.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(log_dir=str(self.dir / "tensorboard"))
            except ImportError:
                self._tb = None
        if config.wandb_project:
            import wandb

            self._wandb = wandb.init(project=config.wandb_project, config=run_config or {}, dir=str(self.dir))

    def log(self, step: int, values: dict[str, Any]) -> None:
        self._jsonl.append({"step": step, "time": time.time(), **values})
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
