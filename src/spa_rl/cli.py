"""The `spa` command line.

Every command's flags are generated from its settings dataclass (`spa_rl.config`): a setting is declared once,
where it is documented, and `--config FILE` and `--set KEY=VALUE` reach the same dataclass. Only the chosen
command's module is imported, so `spa env list` starts in a fraction of a second. Subcommands parse, call one
library function and print; they hold no logic of their own. User mistakes (`SpaError`) end with a one-line
message and exit code 2; this module must never let a traceback reach the user for them.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console

from spa_rl import __version__
from spa_rl.config import Flags, Seeded, add_arguments, args_values, from_args, setting, to_dict
from spa_rl.envs import EnvConfig
from spa_rl.errors import SpaError


def _console() -> Console:
    return Console(highlight=False)


# ------------------------------------------------------------------------------------------ env commands
@dataclass(kw_only=True)
class EnvCommandConfig(EnvConfig, Seeded):
    """`spa env show|play|solve NAME`: one puzzle in the terminal."""

    layout: str | None = setting(None, metavar="FILE")
    """Load the puzzle from a text file (its grid render) instead of generating it."""


def _make_env(c: EnvCommandConfig) -> tuple[Any, str, dict]:
    from spa_rl import envs

    env = envs.make(c.env, render=c.render, **c.env_overrides).unwrapped
    options = None
    if c.layout is not None:
        try:
            options = {"layout": Path(c.layout).read_text(encoding="utf-8")}
        except OSError as e:
            raise SpaError(f"cannot read layout file {c.layout}: {e.strerror}") from None
    obs, info = env.reset(seed=c.seed, options=options)
    return env, obs, info


def _moves(n: int) -> str:
    return f"{n} move" if n == 1 else f"{n} moves"


def cmd_env_list(_: None) -> int:
    from rich.table import Table

    from spa_rl import envs

    table = Table(title="Environments (spa env show NAME)")
    for col in ("name", "description", "turns x actions/turn, actions/episode"):
        table.add_column(col)
    for v in envs.VARIANTS.values():
        table.add_row(v.name, v.description, f"{v.max_turns} x {v.max_actions_per_turn}, {v.max_actions_per_episode}")
    _console().print(table)
    return 0


def cmd_env_show(c: EnvCommandConfig) -> int:
    env, obs, info = _make_env(c)
    con = _console()
    con.print(f"[bold]{c.env}[/bold] seed {c.seed} ({c.render})")
    con.print(obs, markup=False)
    if info.get("optimal_moves") is not None:
        con.print(f"optimal solution: {_moves(info['optimal_moves'])}")
    con.print("actions: " + ", ".join(env.action_names), markup=False)
    return 0


def cmd_env_solve(c: EnvCommandConfig) -> int:
    env, obs, _ = _make_env(c)
    con = _console()
    con.print(obs, markup=False)
    plan = env.solve()
    if plan is None:
        con.print("no solution: this puzzle cannot be won from here")
        return 1
    con.print(f"optimal solution ({_moves(len(plan))}): " + " || ".join(plan), markup=False)
    if getattr(env, "slippery", False):
        con.print("the lake is slippery: this plan assumes every move goes as intended")
        return 0
    step_info: dict = {}
    for action in plan:
        obs, _, _, _, step_info = env.step(action)
    con.print(obs, markup=False)
    con.print("solved" if step_info.get("success") or not plan else "the plan did not solve the puzzle (a bug)")
    return 0


def cmd_env_play(c: EnvCommandConfig) -> int:
    env, obs, info = _make_env(c)
    con = _console()
    con.print(f"[bold]{c.env}[/bold] seed {c.seed}. Type actions ({', '.join(env.action_names)}; several "
              "separated by '||'), or: hint, undo, restart, quit.")
    start = env.snapshot()
    history = []
    total = 0.0
    con.print(obs, markup=False)
    if info.get("optimal_moves") is not None:
        con.print(f"(solvable in {_moves(info['optimal_moves'])})")
    while True:
        try:
            line = input("> ").strip()
        except EOFError:
            con.print()
            return 0
        if not line:
            continue
        cmd = line.lower()
        if cmd in ("quit", "q", "exit"):
            return 0
        if cmd == "hint":
            con.print(f"hint: {env.optimal_action() or 'no winning move from here'}", markup=False)
            continue
        if cmd in ("undo", "restart"):
            if cmd == "restart":
                history, total = [], 0.0
                con.print(env.restore(start), markup=False)
            elif history:
                snap, total = history.pop()
                con.print(env.restore(snap), markup=False)
            else:
                con.print("nothing to undo")
            continue
        for action in (a.strip() for a in line.split("||")):
            history.append((env.snapshot(), total))
            obs, reward, terminated, _, step_info = env.step(action)
            total += reward
            if not step_info["action_is_valid"]:
                history.pop()
                con.print(f"invalid action {action!r}: nothing changed", markup=False)
                break
            con.print(f"{action}: reward {reward:+g} (total {total:+g})"
                      + ("" if step_info["action_is_effective"] else ", nothing moved"), markup=False)
            if terminated:
                break
        con.print(obs, markup=False)
        if env.done:
            verdict = "[bold green]solved![/bold green]" if env.success else "[bold red]episode over[/bold red]"
            con.print(verdict + " (undo or restart to continue, quit to leave)")


# ------------------------------------------------------------------------------------------ stage commands
def cmd_demo(c: Any) -> int:
    from spa_rl.demo import run_demo

    return run_demo(_console(), c)


def cmd_eval(c: Any) -> int:
    from spa_rl.evaluation import evaluate, metrics_table

    metrics = evaluate(c)
    rc = c.rollout
    who = c.model.model if c.policy == "model" else f"{c.policy} policy"
    _console().print(metrics_table(metrics, title=f"{who} on {rc.env} ({rc.render}, {rc.format}), "
                                                  f"{c.puzzles} puzzles x {c.samples} samples"))
    if c.out:
        _console().print(f"results: {c.out}/metrics.json and {c.out}/trajectories.jsonl")
    return 0


def cmd_collect(c: Any) -> int:
    from rich.table import Table

    from spa_rl.collect import collect

    stats = collect(c)
    table = Table(title=f"self-play data: {c.rollout.env}, behaviour policy {c.policy} -> {c.out}")
    table.add_column("")
    table.add_column("count", justify="right")
    success = stats.successes / stats.trajectories if stats.trajectories else 0.0
    for label, value in (("trajectories", stats.trajectories),
                         ("behaviour policy success", f"{success:.1%}"),
                         ("assistant turns played", stats.turns), ("turns kept", stats.kept),
                         ("dropped: malformed (and the rest of their trajectory)", stats.dropped_malformed),
                         ("dropped: duplicate", stats.dropped_duplicate),
                         ("train rows", stats.train), ("validation rows", stats.val)):
        table.add_row(label, str(value))
    _console().print(table)
    return 0


def cmd_novelty(c: Any) -> int:
    from rich.table import Table

    from spa_rl.novelty import novelty_report

    reports = novelty_report(c)
    table = Table(title=f"state perplexity under {c.model.model} ({c.puzzles} validation puzzles)")
    for col in ("env", "states", "grid", "grid+coords"):
        table.add_column(col, justify="right" if col != "env" else "left")
    for r in reports:
        table.add_row(r["env"], str(r["grid"]["states"]), f"{r['grid']['perplexity']:.1f}",
                      f"{r['grid+coords']['perplexity']:.1f}")
    _console().print(table)
    _console().print("perplexity = exp(mean over states of N(s)), N(s) the mean token NLL of the state text "
                     "given the conversation before it")
    return 0


def cmd_sft(c: Any) -> int:
    from spa_rl.sft import train_sft

    result = train_sft(c)
    val = "n/a" if result["val_loss"] is None else f"{result['val_loss']:.4f}"
    _console().print(f"trained {result['steps']} steps ({result['train_samples']} samples, {c.loss} loss); "
                     f"validation loss {val}\nmodel: {c.out}/model   "
                     f"(evaluate: spa eval --model {c.out}/model --env ...)")
    return 0


def cmd_train(c: Any) -> int:
    from accelerate import PartialState

    from spa_rl.rl.trainer import train_rl

    result = train_rl(c)
    if not PartialState().is_main_process:  # under accelerate launch, one summary
        return 0
    shown = ", ".join(f"{k.removeprefix('val/')} {v:.3f}" for k, v in result.items()
                      if k in ("val/pass@1", "val/pass@8", "val/prediction_exact"))
    _console().print(f"trained {result['steps']} PPO steps; validation: {shown or 'n/a'}\nactor: {c.out}/model   "
                     f"curves: {c.out}/curves.png   (evaluate: spa eval --model {c.out}/model --env ...)")
    return 0


def cmd_run(c: Any) -> int:
    from spa_rl.pipeline.run import describe, run_pipeline

    _console().print(f"[bold]spa run {c.recipe}[/bold] (preset {c.preset}) on {c.rollout.env}, model "
                     f"{c.model.model} -> {c.out}\n{describe('recipe', c.recipe)}")
    report = run_pipeline(c)
    _console().print(f"done: open {report}")
    return 0


def cmd_imagine(c: Any) -> int:
    from rich.table import Table

    from spa_rl.imagine import imagine

    m = imagine(c)
    table = Table(title=f"{c.model.model} imagining {c.rollout.env}: its predictions shown as the state, "
                        f"{c.puzzles} puzzles x {c.samples}")
    for col in ("step", "episodes", "exact", "cells", "copy exact", "copy cells"):
        table.add_column(col, justify="right")
    for s in m["steps"]:
        table.add_row(str(s["step"]), str(s["episodes"]), f"{s['exact']:.3f}", f"{s['cells']:.3f}",
                      f"{s['copy_exact']:.3f}", f"{s['copy_cells']:.3f}")
    _console().print(table)
    _console().print("step 1 is the one-step prediction from the true state; from step 2 the agent has seen only "
                     "its own predictions. copy: the first state, as if nothing changed.")
    return 0


def cmd_compare(c: Any) -> int:
    from spa_rl.pipeline.report import compare_runs

    report = compare_runs(c)
    _console().print(f"wrote {report}")
    return 0


def cmd_selfplay(c: Any) -> int:
    from rich.table import Table

    from spa_rl.selfplay import selfplay_rounds

    history = selfplay_rounds(c)
    table = Table(title=f"self-play rounds on {c.collect.rollout.env}: novelty of held-out states")
    for col in ("round", "model", "mean N(s)", "perplexity"):
        table.add_column(col)
    for h in history:
        table.add_row(str(h["round"]), h["model"], f"{h['heldout']['mean_nll']:.3f}",
                      f"{h['heldout']['perplexity']:.2f}")
    _console().print(table)
    return 0


@dataclass(frozen=True)
class Command:
    """A subcommand: its settings class (imported only when the command runs) and what it does."""

    help: str
    config: str
    """`module:Class` of its settings."""
    run: Callable[[Any], int]
    positional: tuple[str, ...] = ()
    required: tuple[str, ...] = ()
    """Settings the command line must give although they have defaults."""
    aliases: tuple[tuple[str, str], ...] = ()
    """(dotted path, flag) for settings this command names differently."""
    make: str | None = None
    """`module:function` turning the command line's settings into the config, when something lies between them
    and the defaults (`spa run`'s recipe and preset); else the config class's defaults are the base."""


COMMANDS: dict[str, Command] = {
    "demo": Command("a tour: the puzzles played by scripted policies, then the embedded model zero-shot on a few "
                    "puzzles", "spa_rl.demo:DemoConfig", cmd_demo),
    "eval": Command("evaluate a model (or a scripted policy) on validation puzzles: Pass@k, action statistics, "
                    "world-model accuracy", "spa_rl.evaluation:EvalConfig", cmd_eval, required=("env",)),
    "collect": Command("self-play: play training puzzles, rewrite every turn with the true states, write an SFT "
                       "dataset (resumable)", "spa_rl.collect:CollectConfig", cmd_collect, required=("env",)),
    "novelty": Command("mean state perplexity N(s) under a model, grid vs grid+coords render (the paper's Table 1)",
                       "spa_rl.novelty:NoveltyConfig", cmd_novelty),
    "sft": Command("world-model SFT on a self-play dataset (resumes after an interruption)",
                   "spa_rl.sft:SFTConfig", cmd_sft),
    "train": Command("RL: multi-turn PPO with a critic (or GRPO, turn-level GAE, iterated DPO) from a checkpoint, with "
                     "validation Pass@k and world-model accuracy during training (resumable)",
                     "spa_rl.rl.config:RLConfig", cmd_train, required=("env",), aliases=(("model.model", "--init"),)),
    "run": Command("the whole method, or one of its baselines and ablations, in one resumable run: a recipe (spa, "
                   "vanilla-rl, state-estimation-rl, spa-masked, spa-self-belief, spa-random-data, spa-dpo) at a "
                   "preset scale (smoke, cpu, paper), then report.html", "spa_rl.pipeline.run:RunConfig", cmd_run,
                   make="spa_rl.pipeline.run:make_run_config"),
    "compare": Command("one report over several run directories: the results table and plots overlaid, mean and "
                       "spread over seeds", "spa_rl.pipeline.report:CompareConfig", cmd_compare),
    "imagine": Command("the agent plays inside its own world model (its predictions shown as the state): open-loop "
                       "world-model accuracy per step against the copy baseline", "spa_rl.imagine:ImagineConfig",
                       cmd_imagine, required=("env",)),
    "selfplay": Command("alternate `spa collect` and `spa sft` for several rounds, logging the novelty of held-out "
                        "states per round (resumable)", "spa_rl.selfplay:SelfPlayConfig", cmd_selfplay,
                        required=("env",)),
}
ENV_COMMANDS: dict[str, tuple[str, Callable[[Any], int]]] = {
    "show": ("print a puzzle", cmd_env_show),
    "play": ("play a puzzle in the terminal", cmd_env_play),
    "solve": ("print an optimal solution of a puzzle", cmd_env_solve),
}


def _config_class(spec: str) -> type:
    module, name = spec.split(":")
    return getattr(importlib.import_module(module), name)


def build_parser(argv: Sequence[str] = ()) -> tuple[argparse.ArgumentParser, dict[str, Flags]]:
    """The parser, with the flags of the command named in `argv` generated (the others listed only)."""
    parser = argparse.ArgumentParser(prog="spa", description="SPA (Self-Play Agent): world-model self-play "
                                     "fine-tuning, then RL, for LLM agents on text puzzles.")
    parser.add_argument("--version", action="version", version=f"spa-rl {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    chosen = next((a for a in argv if not a.startswith("-")), None)
    flags: dict[str, Flags] = {}
    for name, command in COMMANDS.items():
        p = sub.add_parser(name, help=command.help, description=command.help,
                           epilog="The defaults shown are the settings' own: the recipe and the preset (--preset, cpu "
                           "unless given) replace many of them, and --print-config shows what the run will use."
                           if command.make else None)
        p.set_defaults(func=command.run, flags_key=name)
        if name == chosen:
            flags[name] = add_arguments(p, _config_class(command.config), command.positional, command.required,
                                        dict(command.aliases))
    env = sub.add_parser("env", help="list, show, play and solve the environments")
    env_sub = env.add_subparsers(dest="env_command", required=True, metavar="ACTION")
    env_sub.add_parser("list", help="the named environments").set_defaults(func=cmd_env_list, flags_key=None)
    for name, (text, func) in ENV_COMMANDS.items():
        p = env_sub.add_parser(name, help=text, description=text)
        p.set_defaults(func=func, flags_key="env")
        if chosen == "env":
            flags["env"] = add_arguments(p, EnvCommandConfig, positional=("env",))
    return parser, flags


def _config_of(args: argparse.Namespace, flags: Flags) -> Any:
    command = COMMANDS.get(args.command)
    if command is not None and command.make:
        module, name = command.make.split(":")
        return getattr(importlib.import_module(module), name)(args_values(args, flags))
    return from_args(args, flags)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        parser, flags = build_parser(argv)
        args = parser.parse_args(argv)
        config = _config_of(args, flags[args.flags_key]) if args.flags_key else None
        if getattr(args, "print_config", False):
            print(json.dumps(to_dict(config), indent=2))
            return 0
        return int(args.func(config) or 0)
    except SpaError as e:
        print(f"spa: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("spa: interrupted (rerun the same command to resume where it stopped)", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader of our output (`| head`) closed it: not an error of ours
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
