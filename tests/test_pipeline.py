"""`spa run` end to end with the smoke preset (a tiny random model): every recipe, resuming inside each stage,
refusals, the report and `spa compare`."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
from conftest import killed_on_call

from spa_rl.cli import main
from spa_rl.config import to_dict
from spa_rl.errors import SpaError
from spa_rl.io import read_jsonl
from spa_rl.pipeline.run import RunConfig, make_run_config, recipes, run_pipeline

RECIPES = ("spa", "vanilla-rl", "state-estimation-rl", "spa-masked", "spa-self-belief", "spa-random-data", "spa-dpo")


def _config(recipe: str, out, **extra) -> RunConfig:
    """The smoke run of `recipe` into `out`, with `extra` settings by name (`seed=2`, `stages=[...]`)."""
    return make_run_config({("recipe",): recipe, ("preset",): "smoke", ("out",): str(out),
                            ("tensorboard",): False, **{(k,): v for k, v in extra.items()}})


def test_cpu_preset_warns_on_a_cpu_without_native_bf16(monkeypatch):
    import spa_rl.pipeline.run as run

    cpu = make_run_config({("recipe",): "spa", ("preset",): "cpu", ("out",): "x", ("device",): "cpu"})
    monkeypatch.setattr(run, "native_bf16", lambda device: False)
    assert "no native bf16" in run.speed_note(cpu)
    assert run.speed_note(replace(cpu, model=replace(cpu.model, dtype="fp32"))) is None  # the user chose fp32
    assert run.speed_note(_config("spa", "x")) is None  # the smoke preset takes seconds anywhere
    monkeypatch.setattr(run, "native_bf16", lambda device: True)
    assert run.speed_note(cpu) is None


def test_the_recipes_that_ship_are_the_papers_arms():
    assert set(recipes()) == set(RECIPES)
    spa, vanilla = _config("spa", "x"), _config("vanilla-rl", "x")
    assert spa.stages == ["collect", "sft", "rl", "eval"] and spa.rollout.format == "world-model"
    assert spa.rollout.render == "grid+coords" and spa.sft.loss == "full" and spa.collect.rewrite
    assert vanilla.stages == ["rl", "eval"] and vanilla.rollout.render == "grid" and vanilla.rollout.format == "plain"
    assert _config("spa-masked", "x").sft.loss == "masked"
    assert not _config("spa-self-belief", "x").collect.rewrite
    assert _config("spa-random-data", "x").collect.policy == "random"
    assert spa.model.model == "tiny-random" and spa.warm_start, "the smoke preset's model, warm-started"
    from spa_rl.pipeline.run import _what
    assert "predictions rewritten" in _what("warm-start", spa), "the world-model format's warm start says what it does"
    assert "prediction" not in _what("warm-start", vanilla), "the plain format has no prediction to rewrite"


@pytest.mark.slow
@pytest.mark.parametrize("recipe", RECIPES)
def test_every_recipe_runs_end_to_end(tmp_path, recipe):
    report = run_pipeline(_config(recipe, tmp_path / recipe), quiet=True)
    root = tmp_path / recipe
    assert report == root / "report.html" and report.is_file()
    assert json.loads((root / "eval" / "metrics.json").read_text())["episodes"] == 4
    assert (root / "warm-start" / "sft" / "model").is_dir() and (root / "rl" / "model").is_dir()
    assert (root / "data").is_dir() == (recipe not in ("vanilla-rl", "state-estimation-rl"))
    assert (root / "imagine" / "imagine.json").is_file() == (recipe not in ("vanilla-rl", "state-estimation-rl"))
    novelty = json.loads((root / "novelty.json").read_text())
    assert [n["stage"] for n in novelty][:2] == ["start", "warm start"] and novelty[-1]["stage"] == "RL"
    page = report.read_text()
    assert "<script" in page and "http://" not in page and "https://" not in page, "self-contained, no network"
    assert "data:image/png;base64," in page and "Trajectories" in page


def test_a_killed_run_resumes_from_the_stage_it_was_in(tmp_path, monkeypatch):
    """Kill the run inside each stage in turn (RL after its first step, the others as they start; each stage's own
    resume inside itself is tested with the stage); every rerun skips the finished stages, and the final result
    is the one an uninterrupted run gives."""
    from pathlib import Path

    import spa_rl.pipeline.run as run
    import spa_rl.rl.trainer as trainer

    straight = tmp_path / "straight"
    run_pipeline(_config("spa", straight), quiet=True)
    killed = tmp_path / "killed"
    for stage, target, where in (("warm-start", "train_sft", "warm-start/sft"), ("collect", "collect", "data"),
                                 ("sft", "train_sft", "sft"), ("eval", "evaluate", "eval"),
                                 ("imagine", "imagine", "imagine")):
        original = getattr(run, target)

        def interrupted(config, *a, _original=original, _where=where, **k):
            if Path(config.out) == killed / _where:
                raise KeyboardInterrupt
            return _original(config, *a, **k)

        monkeypatch.setattr(run, target, interrupted)
        if stage == "eval":  # before eval, RL: killed after its first step
            rl_step = trainer.rl_step
            monkeypatch.setattr(trainer, "rl_step", killed_on_call(rl_step, 2))
            with pytest.raises(KeyboardInterrupt):
                run_pipeline(_config("spa", killed), quiet=True)
            monkeypatch.setattr(trainer, "rl_step", rl_step)
            assert (killed / "rl" / "checkpoint").is_dir() and not (killed / "rl" / "result.json").exists()
        with pytest.raises(KeyboardInterrupt):
            run_pipeline(_config("spa", killed), quiet=True)
        monkeypatch.setattr(run, target, original)
    run_pipeline(_config("spa", killed), quiet=True)
    a = json.loads((straight / "eval" / "metrics.json").read_text())
    b = json.loads((killed / "eval" / "metrics.json").read_text())
    assert {k: v for k, v in a.items() if k != "config"} == {k: v for k, v in b.items() if k != "config"}
    assert [r["step"] for r in read_jsonl(killed / "rl" / "metrics.jsonl") if "losses/policy_loss" in r] == [1, 2]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("finished") / "run"
    assert main(["run", "spa", "--preset", "smoke", "--out", str(root), "--no-tensorboard"]) == 0
    return root


def test_a_finished_run_reruns_as_finished(finished_run, capsys):
    assert main(["run", "spa", "--preset", "smoke", "--out", str(finished_run), "--no-tensorboard"]) == 0
    assert "already holds this finished run" in capsys.readouterr().err, "says so and points to its report"


def test_another_recipe_in_a_runs_directory_is_refused_in_one_line(finished_run, capsys):
    assert main(["run", "vanilla-rl", "--preset", "smoke", "--out", str(finished_run), "--no-tensorboard"]) == 2
    err = capsys.readouterr().err
    assert 'recipe: "spa" -> "vanilla-rl"' in err and err.count("\n") == 1


def test_an_unknown_recipe_preset_or_stage_is_refused(tmp_path, capsys):
    assert main(["run", "nope", "--out", str(tmp_path / "x")]) == 2
    assert "unknown recipe 'nope': use one of spa, spa-dpo, spa-masked" in capsys.readouterr().err
    assert main(["run", "spa", "--preset", "huge", "--out", str(tmp_path / "x")]) == 2
    assert "unknown preset 'huge': use one of cpu, paper, smoke" in capsys.readouterr().err
    with pytest.raises(SpaError, match="unknown stages"):
        _config("spa", tmp_path / "y", stages=["collect", "dance"])
    assert not (tmp_path / "x").exists(), "nothing written"


def test_a_users_own_recipe_file(tmp_path):
    recipe = tmp_path / "mine.toml"
    recipe.write_text('description = "GRPO without SFT"\nstages = ["rl", "eval"]\n[rl]\nadvantage = "grpo"\n'
                      '[rollout]\nformat = "plain"\nrender = "grid"\n')
    config = _config(str(recipe), tmp_path / "run")
    assert config.rl.advantage == "grpo" and config.stages == ["rl", "eval"]
    assert to_dict(config)["recipe"] == str(recipe)


@pytest.mark.slow
def test_compare_overlays_runs_and_averages_seeds(tmp_path, capsys):
    for seed in (1, 2):
        run_pipeline(_config("vanilla-rl", tmp_path / f"v{seed}", seed=seed), quiet=True)
    out = tmp_path / "compare.html"
    assert main(["compare", str(tmp_path / "v1"), str(tmp_path / "v2"), "--out", str(out)]) == 0
    page = out.read_text()
    assert "2 seed(s): v1, v2" in page and "±" in page and "data:image/png;base64," in page
    table = page.split("<table")[1].split("</table>")[0]
    assert "format_rate" in table and "observation_exact" not in table, "a plain-format arm has no world model to score"
    assert "n/a" not in table, "no column that no run has"
    # a `spa train` directory (here the RL stage of v1) compares too: its last validation is its final result
    assert main(["compare", str(tmp_path / "v1"), str(tmp_path / "v1" / "rl"), "--out", str(out)]) == 0
    page = out.read_text()
    assert "spa train (gae, " in page and "1 seed(s): rl" in page
    last = [r for r in read_jsonl(tmp_path / "v1" / "rl" / "metrics.jsonl") if "val/pass@1" in r][-1]
    assert f"{last['val/pass@1']:.3f}" in page.split("1 seed(s): rl")[1].split("</tr>")[0]
    assert main(["compare", str(tmp_path), "--out", str(out)]) == 2
    assert "is not a run directory" in capsys.readouterr().err
