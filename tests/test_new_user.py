"""What a new user hit, each case once: changed settings over a finished run, values out of range, outputs of
one command pointed at another's, progress bars, noise from model loading, file permissions. Every mistake is
one line on stderr and exit code 2, before any slow work; nothing is lost."""

from __future__ import annotations

import json
import os
import stat
import warnings

import pytest
import torch
from conftest import build_tiny_model, collect_data

from spa_rl.cli import main


def _one_line_error(capsys, *needles: str) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("spa: error: ") and "Traceback" not in err, err
    for needle in needles:
        assert needle in err, err
    return err


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    path = tmp_path_factory.mktemp("data")
    collect_data("frozenlake-det", path, policy="solver", puzzles=2, samples=1, val_fraction=0.0)
    return path


def _sft(data, out, model, *extra):
    return main(["sft", "--data", str(data), "--out", str(out), "--model", str(model), "--epochs", "1",
                 "--dtype", "fp32", "--no-tensorboard", *extra])


def test_a_finished_sft_run_with_another_lr_is_refused_and_kept(dataset, tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "sft"
    assert _sft(dataset, out, tiny_model_dir) == 0
    capsys.readouterr()
    before = (out / "model" / "spa_training.json").read_text(), (out / "model" / "model.safetensors").read_bytes()
    assert _sft(dataset, out, tiny_model_dir, "--lr", "0.001") == 2
    _one_line_error(capsys, "other settings (lr: 0.0001 -> 0.001)", "start fresh")
    after = (out / "model" / "spa_training.json").read_text(), (out / "model" / "model.safetensors").read_bytes()
    assert before == after
    assert _sft(dataset, out, tiny_model_dir) == 0, "the same command again: finished, nothing to do"
    assert "nothing to do" in capsys.readouterr().err


def test_a_resumed_sft_says_so(dataset, tiny_model_dir, tmp_path, capsys, monkeypatch):
    calls = {"n": 0}
    original = torch.optim.AdamW.step

    def flaky(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return original(self, *a, **k)

    monkeypatch.setattr(torch.optim.AdamW, "step", flaky)
    out = tmp_path / "sft"
    assert _sft(dataset, out, tiny_model_dir, "--batch-size", "1", "--save-every", "1") == 130
    monkeypatch.setattr(torch.optim.AdamW, "step", original)
    capsys.readouterr()
    assert _sft(dataset, out, tiny_model_dir, "--batch-size", "1", "--save-every", "1") == 0
    err = capsys.readouterr().err
    assert "resuming" in err and "from its checkpoint at step 1 of" in err


@pytest.mark.parametrize("argv,needle", [
    (["demo", "--puzzles", "0"], "puzzles must be >= 1, got 0"),
    (["demo", "--model-puzzles", "-1"], "model_puzzles must be >= 0, got -1"),
    (["env", "show", "sokoban", "--seed", "-5"], "seed must be >= 0, got -5"),
    (["eval", "--env", "sokoban", "--policy", "solver", "--seed", "-1"], "seed must be >= 0, got -1"),
    (["collect", "--env", "sokoban", "--out", "x", "--val-fraction", "1.5"], "val_fraction must be >= 0 and < 1"),
    (["collect", "--env", "sokoban", "--out", "x", "--val-fraction", "-1"], "val_fraction must be >= 0 and < 1"),
    (["eval", "--policy", "solver"], "missing setting rollout.env: pass --env"),
    (["eval", "--env", "sokoban", "--set", "temprature=2"], "unknown setting 'temprature' (did you mean temperature?)"),
    (["eval", "--env", "sokoban", "--device", "gpu9"], "unknown device 'gpu9'"),
])
def test_values_out_of_range_are_one_line_errors(capsys, argv, needle):
    assert main(argv) == 2
    _one_line_error(capsys, needle)


def test_bad_settings_are_refused_before_any_model_loads(dataset, tmp_path, capsys, monkeypatch):
    import spa_rl.models as models

    monkeypatch.setattr(models, "load_model", lambda *a, **k: pytest.fail("loaded a model before refusing"))
    assert main(["sft", "--data", str(dataset), "--out", str(tmp_path / "o"), "--lr", "-1"]) == 2
    _one_line_error(capsys, "lr must be > 0, got -1")
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    assert main(["novelty", "--env", "sudoku", "--out", str(blocker / "report.json")]) == 2
    _one_line_error(capsys, "cannot write to")
    assert main(["novelty", "--env", "sudoku", "--out", str(tmp_path)]) == 2
    _one_line_error(capsys, "is a directory")


def test_novelty_writes_into_a_missing_directory(tiny_model_dir, tmp_path):
    out = tmp_path / "not" / "yet" / "report.json"
    assert main(["novelty", "--model", str(tiny_model_dir), "--env", "sudoku", "--puzzles", "1",
                 "--out", str(out)]) == 0
    assert json.loads(out.read_text())["reports"][0]["env"] == "sudoku"


def test_outputs_of_one_command_are_not_another_commands(dataset, tmp_path, capsys):
    assert main(["eval", "--env", "frozenlake-det", "--policy", "solver", "--puzzles", "1", "--samples", "1",
                 "--out", str(dataset)]) == 2
    _one_line_error(capsys, "holds the output of `spa collect`, not `spa eval`")
    ev = tmp_path / "eval"
    assert main(["eval", "--env", "sokoban", "--policy", "solver", "--puzzles", "1", "--samples", "1",
                 "--out", str(ev)]) == 0
    capsys.readouterr()
    assert main(["eval", "--env", "sudoku", "--policy", "solver", "--puzzles", "1", "--samples", "1",
                 "--out", str(ev)]) == 2
    _one_line_error(capsys, 'rollout.env: "sokoban" -> "sudoku"')
    assert json.loads((ev / "metrics.json").read_text())["config"]["env"] == "sokoban", "nothing replaced"
    assert main(["collect", "--env", "sokoban", "--policy", "solver", "--puzzles", "1", "--out", str(ev)]) == 2
    _one_line_error(capsys, "holds the output of `spa eval`, not `spa collect`")
    assert main(["sft", "--data", str(ev), "--out", str(tmp_path / "s")]) == 2
    _one_line_error(capsys, "holds the output of `spa eval`, not a dataset")
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("important")
    assert main(["eval", "--env", "sokoban", "--policy", "solver", "--out", str(mine)]) == 2
    _one_line_error(capsys, "is not empty and was not made by `spa eval`")


def test_progress_moves_with_every_turn_and_sums_to_the_episodes():
    from spa_rl.rollout import RolloutConfig, RolloutEngine

    seen = []
    engine = RolloutEngine(RolloutConfig(env="sokoban"), policy="random")
    episodes = engine.run([1, 2, 3], group_size=2, progress=seen.append)
    assert len(seen) == max(len(e.turns) for e in episodes), "one report per turn, not one at the end"
    assert sum(seen) == pytest.approx(len(episodes)) and all(0 < x <= len(episodes) for x in seen)


def test_generation_prints_no_warnings(tokenizer):
    from spa_rl.generation import SamplingConfig, make_backend

    model = build_tiny_model(tokenizer)
    backend = make_backend("kv", model, tokenizer)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a FutureWarning from transformers would fail here
        backend.generate([[1, 2, 3], [4, 5]], SamplingConfig(max_new_tokens=3))
        backend.generate([[1, 2, 3, 7, 8], [4, 5, 9]], SamplingConfig(max_new_tokens=3))


def test_outputs_are_readable_by_others(tmp_path):
    old = os.umask(0o022)
    try:
        assert main(["eval", "--env", "sokoban", "--policy", "solver", "--puzzles", "1", "--samples", "1",
                     "--out", str(tmp_path / "e")]) == 0
        from spa_rl.io import atomic_dir

        atomic_dir(tmp_path / "d", lambda d: (d / "weights.bin").write_bytes(b"x") and os.chmod(d / "weights.bin",
                                                                                                0o600))
    finally:
        os.umask(old)
    for path in [tmp_path / "e" / "metrics.json", tmp_path / "e" / "config.json", tmp_path / "d" / "weights.bin"]:
        assert stat.S_IMODE(path.stat().st_mode) == 0o644, path
    assert stat.S_IMODE((tmp_path / "d").stat().st_mode) == 0o755


@pytest.mark.integration
def test_converting_the_embedded_model_shows_no_tqdm_bar(tmp_path, monkeypatch, capfd):
    from spa_rl.models import embedded_model_path

    monkeypatch.setenv("SPA_CACHE_DIR", str(tmp_path))
    path = embedded_model_path()
    assert (path / "config.json").is_file()
    err = capfd.readouterr().err
    assert "Converting and de-quantizing" not in err and "%|" not in err
    assert stat.S_IMODE((path / "model.safetensors").stat().st_mode) & 0o044, "others can read the cached model"
