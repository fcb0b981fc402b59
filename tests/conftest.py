"""Shared test helpers: envs by name, tiny models over the real tokenizer, a corridor env defined here (as a
user would define one), self-play data in one call."""

from __future__ import annotations

import gymnasium as gym
import pytest

from spa_rl import envs
from spa_rl.envs.base import PuzzleEnv, layout_lines
from spa_rl.errors import LayoutError


@pytest.fixture
def make():
    """`make(name, **kw)` -> the unwrapped env."""
    return lambda name, **kw: envs.make(name, **kw).unwrapped


@pytest.fixture(scope="session")
def tokenizer():
    """The real SmolLM2 tokenizer and chat template (from the embedded model, converted once)."""
    from spa_rl.models import embedded_model_path, load_tokenizer

    return load_tokenizer(str(embedded_model_path()))


def two_process_launch(*args: str) -> list[str]:
    """The command that runs `args` in two CPU processes with `accelerate launch` (torchrun and gloo: accelerate's
    `--cpu` launcher starts several processes only through MPI), on a free port rather than the default 29500,
    so that a run still closing its port, or anything else on it, cannot fail the rendezvous."""
    import shutil
    import socket
    import sys
    from pathlib import Path

    accelerate = shutil.which("accelerate", path=str(Path(sys.executable).parent))
    assert accelerate, "accelerate's launcher is installed with the package"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return [accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--main_process_port",
            str(port), "--mixed_precision", "no", "--dynamo_backend", "no", *args]


def launch_errors(stderr: str) -> str:
    """What each process of a failed `accelerate launch` said last (the `[rankN]:` lines, 1,500 characters a
    process), so that the process that failed first is not cut off by the others' tracebacks."""
    by_rank: dict[str, list[str]] = {}
    for line in stderr.splitlines():
        if line.startswith("[rank") and "]:" in line:
            by_rank.setdefault(line[1:line.index("]")], []).append(line)
    if not by_rank:
        return stderr[-4000:]
    return "\n".join(f"--- {rank}:\n" + "\n".join(lines)[-1500:] for rank, lines in sorted(by_rank.items()))


def build_tiny_model(tokenizer, seed: int = 0, layers: int = 2):
    """A tiny randomly initialised Llama-style model over the real tokenizer's vocabulary (fp32)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                         tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    model = LlamaForCausalLM(config).eval()
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


@pytest.fixture(scope="session")
def tiny_model_dir(tokenizer, tmp_path_factory):
    """A directory holding a tiny random model and the real tokenizer, loadable by `load_model`."""
    path = tmp_path_factory.mktemp("tiny-model")
    build_tiny_model(tokenizer).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def killed_on_call(fn, n: int):
    """`fn` that raises KeyboardInterrupt (a kill) on its `n`-th call instead of running; the calls before run."""
    calls = {"n": 0}

    def wrapper(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == n:
            raise KeyboardInterrupt
        return fn(*args, **kwargs)

    return wrapper


def collect_data(env: str, out, **settings):
    """`spa collect` from Python: settings by name, as on the command line (quiet)."""
    from spa_rl.collect import CollectConfig, collect

    return collect(CollectConfig.make(env=env, out=str(out), **settings), quiet=True)


class CorridorEnv(PuzzleEnv):
    """Walk along a corridor to the goal.

    Actions: `Left`, `Right`. Observation: the corridor as one line, `P` player, `G` goal, `_` floor.
    Reward: +1 on reaching the goal, which ends the episode. Arguments: `length`, `fixed` (the player always
    starts at the left end and the goal is at the right end), `render`.
    """

    def __init__(self, length: int = 5, fixed: bool = False, render: str = "grid",
                 render_mode: str | None = None) -> None:
        super().__init__(render=render, render_mode=render_mode)
        self.length, self.fixed = length, fixed
        self.player = self.goal = 0

    def _generate(self) -> dict:
        if self.fixed:  # the player at the left end, the goal at the right end
            self.player, self.goal = 0, self.length - 1
        else:
            self.player, self.goal = (int(x) for x in self.np_random.choice(self.length, 2, replace=False))
        return {"optimal_moves": abs(self.goal - self.player)}

    def _load_layout(self, text: str) -> dict:
        (line,) = layout_lines(text, "corridor")
        if line.count("P") != 1 or line.count("G") != 1:
            raise LayoutError("a corridor needs one P and one G")
        self.length, self.player, self.goal = len(line), line.index("P"), line.index("G")
        return {}

    def _parse_action(self, text: str) -> int | None:
        return {"left": -1, "right": 1}.get(str(text).strip().lower())

    def _apply(self, d: int) -> tuple[float, bool, bool]:
        new = min(max(self.player + d, 0), self.length - 1)
        moved, self.player = new != self.player, new
        return (1.0 if self.player == self.goal else 0.0), True, moved

    def _is_success(self) -> bool:
        return self.player == self.goal

    def _is_terminal(self) -> bool:
        return self._is_success()

    def _get_state(self) -> tuple[int, int, int]:
        return self.length, self.player, self.goal

    def _set_state(self, state: tuple[int, int, int]) -> None:
        self.length, self.player, self.goal = state

    def grid_text(self) -> str:
        return "".join("P" if i == self.player else "G" if i == self.goal else "_" for i in range(self.length))

    def coords_text(self) -> str:
        return f"Player (P) is at (0,{self.player}); goal (G) is at (0,{self.goal})."

    def solve(self) -> list[str] | None:
        step = "Right" if self.goal > self.player else "Left"
        return [step] * abs(self.goal - self.player)

    @property
    def action_names(self) -> list[str]:
        return ["Left", "Right"]

    def rules(self, render: str) -> list[str]:
        return ["You are in a corridor. Walk to the goal G. P: player, G: goal, _: floor."]


def register_corridors() -> None:
    """`corridor` (length 5, random start and goal, 3 turns) and `corridor-right` (length 2, the goal always one
    step to the right, one action: an agent learns to say Right)."""
    if "test/Corridor-v0" not in gym.registry:
        gym.register(id="test/Corridor-v0", entry_point=CorridorEnv)
    envs.register_variant(envs.Variant("corridor", "test/Corridor-v0", "a corridor (defined in a test)",
                                       {"length": 5}, max_turns=3, max_actions_per_turn=2,
                                       max_actions_per_episode=6), overwrite=True)
    envs.register_variant(envs.Variant("corridor-right", "test/Corridor-v0", "a corridor whose goal is one step right",
                                       {"length": 2, "fixed": True}, max_turns=1, max_actions_per_turn=1,
                                       max_actions_per_episode=1), overwrite=True)
