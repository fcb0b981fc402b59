"""The settings convention: flags generated from dataclass fields, TOML files and overrides in the right order,
checks in one place, and output directories that refuse what they were not made for."""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from typing import Literal

import pytest

from spa_rl.cli import main
from spa_rl.config import Config, add_arguments, from_args, read_config_file, setting, to_dict
from spa_rl.errors import SpaError
from spa_rl.outputs import claim_output


@dataclass(kw_only=True)
class Inner(Config):
    temperature: float = setting(1.0, ge=0)
    """How random the samples are."""
    mode: Literal["fast", "exact"] = "fast"
    """fast or exact."""


@dataclass(kw_only=True)
class Outer(Config):
    out: str = setting(metavar="DIR")
    """Where results go."""
    steps: int = setting(10, ge=1)
    """Optimizer steps.

    A second paragraph that the help leaves out."""
    filter: bool = setting(True, flag="--no-filter")
    """Drop bad rows."""
    inner: Inner = setting(factory=Inner)
    other: Inner = setting(factory=lambda: Inner(temperature=0.5))
    log: bool = setting(True, volatile=True)
    """Write logs."""

    def check(self) -> None:
        if self.inner.mode == "exact" and self.steps > 100:
            raise SpaError("mode exact and steps > 100 cannot work together: lower --steps")


def _parse(argv: list[str]) -> Outer:
    parser = argparse.ArgumentParser()
    flags = add_arguments(parser, Outer)
    return from_args(parser.parse_args(argv), flags)


def test_flags_are_generated_from_the_fields():
    parser = argparse.ArgumentParser()
    flags = add_arguments(parser, Outer)
    help_text = " ".join(parser.format_help().split())
    assert "--steps STEPS Optimizer steps. (default: 10; >= 1)" in help_text
    assert "second paragraph" not in help_text
    assert "--no-filter Drop bad rows. (on; --no-filter turns it off)" in help_text
    assert "--no-log Write logs. (on; --no-log turns it off)" in help_text
    # names shared by two parts get no flag of their own: only --set reaches them
    assert "--temperature" not in help_text and "--mode" not in help_text
    assert set(flags.dests.values()) == {("out",), ("steps",), ("filter",), ("log",)}
    with pytest.raises(SystemExit):
        parser.parse_args(["--steps", "many", "--out", "x"])
    assert _parse(["--out", "x", "--no-filter"]).filter is False


def test_a_real_stage_help_shows_docstrings_choices_and_defaults(capsys):
    with pytest.raises(SystemExit) as e:
        main(["sft", "--help"])
    assert e.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "--lr LR Peak learning rate of AdamW. (default: 0.0001; > 0)" in text
    assert "--loss {full,masked}" in text and "--dtype {auto,bf16,bf16-autocast,fp16,fp32}" in text
    assert "--max-samples MAX_SAMPLES" in text and "--no-pack" in text and "--wandb PROJECT" in text


def test_help_of_a_positional_and_of_a_preset_command_says_what_a_user_must_know(capsys):
    with pytest.raises(SystemExit):
        main(["env", "show", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "ENV Environment name (see spa env list). (required)" in text and "default: sokoban" not in text
    with pytest.raises(SystemExit):
        main(["run", "--help"])
    assert "--print-config shows what the run will use" in " ".join(capsys.readouterr().out.split())


def test_toml_then_set_then_flags(tmp_path):
    toml = tmp_path / "run.toml"
    toml.write_text('out = "from-file"\nsteps = 20\n[inner]\ntemperature = 0.7\nmode = "exact"\n'
                    '[other]\ntemperature = 0.1\n')
    config = _parse(["--config", str(toml)])
    assert (config.out, config.steps, config.inner.temperature, config.inner.mode) == ("from-file", 20, 0.7, "exact")
    assert config.other.temperature == 0.1 and config.filter is True
    config = _parse(["--config", str(toml), "--set", "steps=30", "--set", "inner.temperature=0.2"])
    assert (config.steps, config.inner.temperature, config.other.temperature) == (30, 0.2, 0.1)
    config = _parse(["--config", str(toml), "--set", "steps=30", "--steps", "40", "--out", "flag"])
    assert (config.steps, config.out) == (40, "flag"), "an explicit flag beats --set and the file"
    assert _parse(["--out", "x"]).other.temperature == 0.5, "a part's default comes from its parent's factory"


@pytest.mark.parametrize("text,message", [
    ('out = "x"\nstepz = 3\n', "unknown setting 'stepz' (did you mean steps?)"),
    ('out = "x"\nsteps = "three"\n', "key steps: 'three' is not a valid steps (expected a whole number)"),
    ('out = "x"\nsteps = 0\n', "steps must be >= 1, got 0"),
    ('out = "x"\ntemperature = 0.3\n', "setting 'temperature' is ambiguous: say which of inner.temperature, "
                                       "other.temperature"),
    ('out = "x"\n[inner]\nmode = "slow"\n', "'slow' is not a valid inner.mode: choose one of fast, exact"),
    ('out = "x"\nsteps = 200\n[inner]\nmode = "exact"\n', "mode exact and steps > 100 cannot work together"),
    ('out = "x\n', "is not valid TOML"),
])
def test_bad_config_files_are_one_line_errors(tmp_path, text, message):
    toml = tmp_path / "bad.toml"
    toml.write_text(text)
    with pytest.raises(SpaError) as e:
        _parse(["--config", str(toml)])
    assert message in str(e.value) and "\n" not in str(e.value)


def test_required_settings_may_come_from_the_file(tmp_path):
    with pytest.raises(SpaError, match="missing setting out: pass --out"):
        _parse([])
    toml = tmp_path / "c.toml"
    toml.write_text('out = "from-file"\n')
    assert _parse(["--config", str(toml)]).out == "from-file"
    with pytest.raises(SpaError, match="expected KEY=VALUE"):
        _parse(["--out", "x", "--set", "steps"])
    assert read_config_file(Outer, toml) == {("out",): "from-file"}


def test_output_dir_resumes_same_settings_and_refuses_changes(tmp_path):
    config = Outer(out=str(tmp_path / "run"))
    first = claim_output(config.out, "demo-stage", config, done="result.json")
    assert not first.resumed and json.loads((tmp_path / "run" / "config.json").read_text())["stage"] == "demo-stage"
    (tmp_path / "run" / "work.txt").write_text("half done")
    again = claim_output(config.out, "demo-stage", Outer(out=config.out, log=False), done="result.json")
    assert again.resumed and not again.finished, "a volatile setting may change on resume"
    (tmp_path / "run" / "result.json").write_text("{}")
    assert claim_output(config.out, "demo-stage", config, done="result.json").finished
    changed = Outer(out=config.out, steps=11, inner=Inner(mode="exact"))
    with pytest.raises(SpaError) as e:
        claim_output(config.out, "demo-stage", changed)
    assert "steps: 10 -> 11" in str(e.value) and 'inner.mode: "fast" -> "exact"' in str(e.value)
    assert "start fresh" in str(e.value)
    with pytest.raises(SpaError, match="holds the output of `spa demo-stage`, not `spa other`"):
        claim_output(config.out, "other", config)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(SpaError, match="not empty and was not made by"):
        claim_output(foreign, "demo-stage", config)


def test_a_run_that_did_no_work_takes_new_settings(tmp_path):
    """A run that stopped before writing anything (a wrong model path, say) leaves only config.json: rerunning
    with corrected settings is not refused."""
    claim_output(tmp_path / "run", "demo-stage", Outer(out="x", steps=3))
    assert not claim_output(tmp_path / "run", "demo-stage", Outer(out="x", steps=4)).resumed
    stored = json.loads((tmp_path / "run" / "config.json").read_text())
    assert stored["config"]["steps"] == 4


def test_make_takes_names_as_the_command_line_does():
    from spa_rl.evaluation import EvalConfig
    from spa_rl.sft import SFTConfig

    c = EvalConfig.make(env="frozenlake", temperature=0.5, concurrent=4, **{"sampling.top_k": 3})
    assert (c.rollout.env, c.rollout.sampling.temperature, c.rollout.max_concurrent) == ("frozenlake", 0.5, 4)
    assert c.rollout.sampling.top_k == 3
    s = SFTConfig.make(data="d", out="o", lora=True, max_samples=5, wandb=None)
    assert s.lora.enabled and s.max_train_samples == 5
    with pytest.raises(SpaError, match="unknown env 'nowhere'"):
        EvalConfig.make(env="nowhere")


def test_another_process_claiming_the_same_directory_is_not_foreign_files(tmp_path):
    """Under `accelerate launch` every process claims the run directory at once: what one process leaves there for
    an instant (the write probe, the temporary sibling of its atomic config.json) is not someone else's work. Any
    other file still is. (CI caught the second process refusing the directory the first was claiming.)"""
    run = tmp_path / "run"
    run.mkdir()
    (run / ".config.json.k2j4x1").write_text('{"half": ')
    (run / ".spa-probe-abc").write_text("")
    claimed = claim_output(run, "demo-stage", Outer(out=str(run)))
    assert not claimed.resumed and json.loads((run / "config.json").read_text())["stage"] == "demo-stage"
    other = tmp_path / "other"
    other.mkdir()
    (other / ".metrics.jsonl.k2j4x1").write_text("")
    with pytest.raises(SpaError, match="not empty and was not made by"):
        claim_output(other, "demo-stage", Outer(out=str(other)))


def test_a_config_written_by_another_process_while_we_look_is_theirs_not_foreign(tmp_path, monkeypatch):
    """The other process of the launch renames its config.json into place just after this one found none: the
    directory then holds this stage's config, not foreign files. (CI caught rank 1 refusing the directory in that
    window.)"""
    run = tmp_path / "run"
    run.mkdir()
    config = Outer(out=str(run))
    real_is_file, seen = type(run).is_file, []

    def racing(self):
        if self.name == "config.json" and not seen:  # our first look: empty; their rename lands right after it
            seen.append(self)
            (run / "config.json").write_text(json.dumps({"stage": "demo-stage", "spa_rl": "x",
                                                         "config": json.loads(json.dumps(to_dict(config)))}))
            return False
        return real_is_file(self)

    monkeypatch.setattr(type(run), "is_file", racing)
    claimed = claim_output(run, "demo-stage", config)
    assert seen and not claimed.finished
    assert json.loads((run / "config.json").read_text())["stage"] == "demo-stage"


def test_a_run_from_before_a_setting_existed_resumes_at_its_default(tmp_path):
    """A newer spa-rl adds a setting (defaulting to the old behaviour): a run made before it resumes when the
    setting is at its default, and is refused when it is not."""
    config = Outer(out=str(tmp_path / "run"))
    claim_output(config.out, "demo-stage", config)
    (tmp_path / "run" / "work.txt").write_text("half done")
    stored = json.loads((tmp_path / "run" / "config.json").read_text())
    del stored["config"]["steps"], stored["config"]["inner"]["mode"]
    (tmp_path / "run" / "config.json").write_text(json.dumps(stored))
    assert claim_output(config.out, "demo-stage", config).resumed
    (tmp_path / "run" / "config.json").write_text(json.dumps(stored))
    with pytest.raises(SpaError, match="steps: null -> 11"):
        claim_output(config.out, "demo-stage", Outer(out=config.out, steps=11))
