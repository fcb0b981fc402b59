"""Checkpoints and saved models, for every stage that trains.

`save_model` writes a model (or its LoRA adapter) in Hugging Face format with `spa_training.json` beside it,
so `spa eval --model DIR` and `from_pretrained` load it. `Checkpointer` writes a resumable training state as
one atomic directory: the models in HF format, every optimizer and scheduler state, the RNG states, the step
and the data position, in `trainer_state.pt`, read back with `torch.load(weights_only=True)` (tensors and plain
Python values only: nothing in a checkpoint can run code when loaded). This module must never write a
directory that is half new and half old.
"""

from __future__ import annotations

import json
import random
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from spa_rl.errors import SpaError
from spa_rl.io import atomic_dir, recover_dir

STATE_FILE = "trainer_state.pt"


def save_model(model: Any, tokenizer: Any, path: Path, meta: dict,
               state_dict: dict[str, torch.Tensor] | None = None) -> None:
    """Save the model (or its adapter) in HF format into the existing directory `path`; `state_dict` replaces
    the model's own weights (the fp32 master copies of a bf16 run, so the files and the config say float32)."""
    peft_config = getattr(model, "peft_config", None)
    if peft_config:  # name the base as the user did (e.g. "smollm2-135m"), so the adapter loads anywhere
        for cfg in peft_config.values():
            cfg.base_model_name_or_path = meta.get("base_model", cfg.base_model_name_or_path)
    model.save_pretrained(path, state_dict=state_dict)
    config_file = path / "config.json"
    if state_dict is not None and config_file.is_file():  # save_pretrained names the model's dtype, not the files'
        config_json = json.loads(config_file.read_text())
        config_json["dtype"] = "float32"
        config_file.write_text(json.dumps(config_json, indent=2, sort_keys=True) + "\n")
    tokenizer.save_pretrained(path)
    (path / "spa_training.json").write_text(json.dumps(meta, indent=2))


def rng_state() -> dict[str, Any]:
    """Every global random generator a training loop draws from (Python, torch CPU, torch CUDA)."""
    state: dict[str, Any] = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


@dataclass
class TrainerState:
    """What a checkpoint holds besides the models."""

    step: int
    """Optimizer steps done."""
    states: dict[str, Any]
    """Optimizer and scheduler states by name (`Trainable.state_dict()`)."""
    data: dict[str, Any]
    """The data position and anything else the loop needs to continue exactly."""


class Checkpointer:
    """A training run's checkpoint directory, written atomically."""

    def __init__(self, directory: str | Path) -> None:
        self.dir = recover_dir(directory)

    def exists(self) -> bool:
        return (self.dir / STATE_FILE).is_file()

    def save(self, step: int, write_models: Callable[[Path], None], states: dict[str, Any],
             data: dict[str, Any] | None = None) -> None:
        """Replace the checkpoint: `write_models(tmp)` saves the models into the new directory (see
        `save_model`), then the states, RNG states, step and data position are added."""
        def write(tmp: Path) -> None:
            write_models(tmp)
            torch.save({"step": step, "states": states, "rng": rng_state(), "data": data or {}}, tmp / STATE_FILE)

        atomic_dir(self.dir, write)

    def discard(self) -> None:
        """Delete the checkpoint once the run has written its result: a finished run is never resumed (a rerun
        with the same settings reports it finished; changed settings are refused), and the optimizer states are
        twice the model's size (1.6 GB for the 135M model)."""
        shutil.rmtree(self.dir, ignore_errors=True)

    def load(self, restore_rng: bool = True) -> TrainerState:
        """The stored state (and the RNG states restored); a damaged checkpoint is a one-line error."""
        try:
            raw = torch.load(self.dir / STATE_FILE, map_location="cpu", weights_only=True)
        except Exception as e:  # a damaged or foreign file: the user can only delete it
            raise SpaError(f"the checkpoint {self.dir} cannot be read ({type(e).__name__}): delete it to start "
                           f"the run again") from None
        if restore_rng:
            set_rng_state(raw["rng"])
        return TrainerState(raw["step"], raw["states"], raw["data"])
