"""The `spa` command line.

Subcommands parse arguments and call library functions; they hold no logic of their own beyond printing.
User mistakes (`SpaError`) end with a one-line message and exit code 2; this module must never let a
traceback reach the user for them.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from spa_rl import __version__
from spa_rl.errors import SpaError


def _console():
    from rich.console import Console

    return Console(highlight=False)


def _make_env(name: str, seed: int, render: str, layout: str | None = None):
    from spa_rl import envs

    env = envs.make(name, render=render).unwrapped
    options = None
    if layout is not None:
        try:
            text = Path(layout).read_text(encoding="utf-8")
        except OSError as e:
            raise SpaError(f"cannot read layout file {layout}: {e.strerror}") from None
        options = {"layout": text}
    obs, info = env.reset(seed=seed, options=options)
    return env, obs, info


def cmd_env_list(args: argparse.Namespace) -> int:
    from rich.table import Table

    from spa_rl import envs

    table = Table(title="Environments (spa env show NAME)")
    for col in ("name", "description", "turns x actions/turn, actions/episode"):
        table.add_column(col)
    for v in envs.VARIANTS.values():
        table.add_row(v.name, v.description, f"{v.max_turns} x {v.max_actions_per_turn}, {v.max_actions_per_episode}")
    _console().print(table)
    return 0


def _moves(n: int) -> str:
    return f"{n} move" if n == 1 else f"{n} moves"


def _describe(env, info: dict) -> str:
    lines = []
    if info.get("optimal_moves") is not None:
        lines.append(f"optimal solution: {_moves(info['optimal_moves'])}")
    lines.append("actions: " + ", ".join(env.action_names))
    return "\n".join(lines)


def cmd_env_show(args: argparse.Namespace) -> int:
    env, obs, info = _make_env(args.name, args.seed, args.render, args.layout)
    con = _console()
    con.print(f"[bold]{args.name}[/bold] seed {args.seed} ({args.render})")
    con.print(obs, markup=False)
    con.print(_describe(env, info), markup=False)
    return 0


def cmd_env_solve(args: argparse.Namespace) -> int:
    env, obs, info = _make_env(args.name, args.seed, args.render, args.layout)
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
    for action in plan:
        obs, _, terminated, _, step_info = env.step(action)
    con.print(obs, markup=False)
    con.print("solved" if step_info.get("success") or not plan else "the plan did not solve the puzzle (a bug)")
    return 0


def cmd_env_play(args: argparse.Namespace) -> int:
    env, obs, info = _make_env(args.name, args.seed, args.render, args.layout)
    con = _console()
    con.print(f"[bold]{args.name}[/bold] seed {args.seed}. Type actions ({', '.join(env.action_names)}; several "
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


def cmd_demo(args: argparse.Namespace) -> int:
    from spa_rl.demo import run_demo

    return run_demo(_console(), puzzles=args.puzzles, seed=args.seed, model_puzzles=args.model_puzzles,
                    model=args.model)


def cmd_eval(args: argparse.Namespace) -> int:
    from spa_rl import envs
    from spa_rl.evaluation import evaluate, metrics_table

    envs.get_variant(args.env)  # unknown names fail before any model is loaded
    if args.policy != "model" and args.model:
        raise SpaError("--model is for --policy model; scripted policies need no model")
    metrics = evaluate(args.env, model=args.model, policy=args.policy, render=args.render, fmt=args.format,
                       puzzles=args.puzzles, samples=args.samples, temperature=args.temperature,
                       max_new_tokens=args.max_new_tokens, out=args.out, backend=args.backend, device=args.device,
                       dtype=args.dtype, seed=args.seed, max_concurrent=args.concurrent)
    who = (args.model or "smollm2-135m") if args.policy == "model" else f"{args.policy} policy"
    _console().print(metrics_table(metrics, title=f"{who} on {args.env} ({args.render}, {args.format}), "
                                                 f"{args.puzzles} puzzles x {args.samples} samples"))
    if args.out:
        _console().print(f"wrote {args.out}/metrics.json and {args.out}/trajectories.jsonl")
    return 0


def cmd_collect(args: argparse.Namespace) -> int:
    from rich.table import Table

    from spa_rl.selfplay import collect

    if args.policy in ("random", "solver") and args.model:
        raise SpaError("--model is for --policy model or novelty; scripted policies need no model")
    stats = collect(args.env, args.out, policy=args.policy, model=args.model, puzzles=args.puzzles,
                    samples=args.samples, render=args.render, fmt=args.format, first_seed=args.first_seed,
                    temperature=args.temperature, max_new_tokens=args.max_new_tokens,
                    filter_malformed=not args.no_filter, val_fraction=args.val_fraction, seed=args.seed,
                    backend=args.backend, device=args.device, dtype=args.dtype, branch_share=args.branch_share,
                    novelty_actor=args.novelty_actor)
    table = Table(title=f"self-play data: {args.env}, behaviour policy {args.policy} -> {args.out}")
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


def cmd_novelty(args: argparse.Namespace) -> int:
    from rich.table import Table

    from spa_rl import envs
    from spa_rl.io import atomic_write_json
    from spa_rl.novelty import novelty_report

    names = args.env or ["sokoban", "frozenlake", "sudoku"]
    for name in names:
        envs.get_variant(name)
    table = Table(title=f"state perplexity under {args.model or 'smollm2-135m'} ({args.puzzles} validation puzzles)")
    for col in ("env", "states", "grid", "grid+coords"):
        table.add_column(col, justify="right" if col != "env" else "left")
    reports = []
    for name in names:
        r = novelty_report(args.model, name, puzzles=args.puzzles, device=args.device, dtype=args.dtype)
        reports.append(r)
        table.add_row(name, str(r["grid"]["states"]), f"{r['grid']['perplexity']:.1f}",
                      f"{r['grid+coords']['perplexity']:.1f}")
    _console().print(table)
    _console().print("perplexity = exp(mean over states of N(s)), N(s) the mean token NLL of the state text "
                     "given the conversation before it")
    if args.out:
        atomic_write_json(args.out, reports)
    return 0


def cmd_sft(args: argparse.Namespace) -> int:
    from spa_rl.sft import SFTConfig, train_sft

    config = SFTConfig(data=args.data, out=args.out, model=args.model, loss=args.loss, epochs=args.epochs,
                       lr=args.lr, batch_size=args.batch_size, micro_batch_size=args.micro_batch_size,
                       micro_batch_tokens=args.micro_batch_tokens, max_padding=args.max_padding,
                       max_length=args.max_length, max_train_samples=args.max_samples, pack=not args.no_pack,
                       lora=args.lora,
                       lora_r=args.lora_r, dtype=args.dtype,
                       device=args.device, seed=args.seed, env=args.env, save_every=args.save_every,
                       tensorboard=not args.no_tensorboard, wandb_project=args.wandb)
    result = train_sft(config)
    val = "n/a" if result["val_loss"] is None else f"{result['val_loss']:.4f}"
    _console().print(f"trained {result['steps']} steps ({result['train_samples']} samples, {config.loss} loss); "
                     f"validation loss {val}\nmodel: {args.out}/model   "
                     f"(evaluate: spa eval --model {args.out}/model --env ...)")
    return 0


def cmd_selfplay(args: argparse.Namespace) -> int:
    from rich.table import Table

    from spa_rl.selfplay import selfplay_rounds

    sft = {"epochs": args.epochs, "lora": args.lora}
    history = selfplay_rounds(args.env, args.out, rounds=args.rounds, model=args.model, policy=args.policy,
                              puzzles=args.puzzles, samples=args.samples, render=args.render,
                              heldout_puzzles=args.heldout_puzzles, sft_overrides=sft, first_seed=args.first_seed,
                              collect_overrides={"max_new_tokens": args.max_new_tokens})
    table = Table(title=f"self-play rounds on {args.env}: novelty of held-out states")
    for col in ("round", "model", "mean N(s)", "perplexity"):
        table.add_column(col)
    for h in history:
        table.add_row(str(h["round"]), h["model"], f"{h['heldout']['mean_nll']:.3f}",
                      f"{h['heldout']['perplexity']:.2f}")
    _console().print(table)
    return 0


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _temperature(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}") from None
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    from spa_rl.envs import RENDERS

    parser = argparse.ArgumentParser(prog="spa", description="SPA (Self-Play Agent): world-model self-play "
                                     "fine-tuning, then RL, for LLM agents on text puzzles.")
    parser.add_argument("--version", action="version", version=f"spa-rl {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo = sub.add_parser("demo", help="the main job for now: tour the puzzles with scripted policies, then "
                          "evaluate the embedded model zero-shot on a few puzzles")
    demo.add_argument("--puzzles", type=int, default=200, help="puzzles per environment (default 200)")
    demo.add_argument("--seed", type=int, default=0, help="first puzzle seed (default 0)")
    demo.add_argument("--model-puzzles", type=int, default=4,
                      help="Sokoban validation puzzles for the zero-shot model evaluation (default 4; 0 skips)")
    demo.add_argument("--model", help="model for that evaluation (default: the embedded smollm2-135m)")
    demo.set_defaults(func=cmd_demo)

    ev = sub.add_parser("eval", help="evaluate a model (or a scripted policy) on validation puzzles: Pass@k, "
                        "action statistics, world-model accuracy")
    ev.add_argument("--model", help="embedded name (default smollm2-135m), local directory (HF format or LoRA "
                    "adapter) or Hugging Face id already in the local cache")
    ev.add_argument("--env", required=True, help="environment name (see `spa env list`)")
    ev.add_argument("--render", choices=RENDERS, default="grid+coords", help="state text (default grid+coords)")
    ev.add_argument("--format", choices=("world-model", "plain"), default="world-model",
                    help="response format asked of the agent (default world-model)")
    ev.add_argument("--puzzles", type=_positive_int, default=32, help="validation puzzles (default 32)")
    ev.add_argument("--samples", type=_positive_int, default=8, help="samples per puzzle (default 8)")
    ev.add_argument("--temperature", type=_temperature, default=1.0, help="sampling temperature (default 1.0)")
    ev.add_argument("--max-new-tokens", type=_positive_int, default=256, help="tokens per response (default 256)")
    ev.add_argument("--policy", choices=("model", "random", "solver"), default="model",
                    help="who plays: the model (default) or a scripted policy")
    ev.add_argument("--out", help="directory for metrics.json and trajectories.jsonl")
    ev.add_argument("--backend", choices=("kv", "hf"), default="kv", help="generation backend (default kv)")
    ev.add_argument("--device", default="auto", help="auto (default), cpu, cuda, cuda:1, ...")
    ev.add_argument("--dtype", choices=("auto", "bf16", "fp16", "fp32"), default="auto", help="default auto")
    ev.add_argument("--concurrent", type=_positive_int, default=32, help="episodes per batch (default 32)")
    ev.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    ev.set_defaults(func=cmd_eval)

    co = sub.add_parser("collect", help="self-play: play training puzzles, rewrite every turn with the true "
                        "states, write an SFT dataset (resumable)")
    co.add_argument("--env", required=True, help="environment name (see `spa env list`)")
    co.add_argument("--out", required=True, help="dataset directory (train.jsonl, val.jsonl, manifest.json)")
    co.add_argument("--policy", choices=("model", "novelty", "random", "solver"), default="model",
                    help="behaviour policy: the model itself (default, the paper's); novelty: the model, with "
                         "episodes branching from the most novel states seen so far; random; solver")
    co.add_argument("--branch-share", type=float, default=0.5,
                    help="with --policy novelty: share of puzzle groups that start from novel states (0.5)")
    co.add_argument("--novelty-actor", choices=("model", "random", "solver"), default="model",
                    help="with --policy novelty: who picks the actions (default the model; novelty is always "
                         "scored by --model)")
    co.add_argument("--model", help="model for --policy model (default: the embedded smollm2-135m)")
    co.add_argument("--puzzles", type=_positive_int, default=160, help="training puzzles (default 160)")
    co.add_argument("--samples", type=_positive_int, default=8, help="episodes per puzzle (default 8)")
    co.add_argument("--first-seed", type=int, default=0, help="first training puzzle seed (default 0)")
    co.add_argument("--render", choices=RENDERS, default="grid+coords", help="state text (default grid+coords)")
    co.add_argument("--format", choices=("world-model", "plain"), default="world-model", help="default world-model")
    co.add_argument("--temperature", type=_temperature, default=1.0, help="sampling temperature (default 1.0)")
    co.add_argument("--max-new-tokens", type=_positive_int, default=256, help="tokens per response (default 256)")
    co.add_argument("--no-filter", action="store_true", help="keep turns whose response broke the format")
    co.add_argument("--val-fraction", type=float, default=0.1, help="share of trajectories held out (default 0.1)")
    co.add_argument("--backend", choices=("kv", "hf"), default="kv", help="generation backend (default kv)")
    co.add_argument("--device", default="auto", help="auto (default), cpu, cuda, ...")
    co.add_argument("--dtype", choices=("auto", "bf16", "fp16", "fp32"), default="auto", help="default auto")
    co.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    co.set_defaults(func=cmd_collect)

    nv = sub.add_parser("novelty", help="mean state perplexity N(s) under a model, grid vs grid+coords render "
                        "(the paper's Table 1)")
    nv.add_argument("--model", help="model (default: the embedded smollm2-135m)")
    nv.add_argument("--env", action="append", help="environment (repeatable; default: the three paper envs)")
    nv.add_argument("--puzzles", type=_positive_int, default=32, help="validation puzzles (default 32)")
    nv.add_argument("--out", help="also write the report as JSON to this file")
    nv.add_argument("--device", default="auto", help="auto (default), cpu, cuda, ...")
    nv.add_argument("--dtype", choices=("auto", "bf16", "fp16", "fp32"), default="auto", help="default auto")
    nv.set_defaults(func=cmd_novelty)

    sf = sub.add_parser("sft", help="world-model SFT on a self-play dataset (resumes after an interruption)")
    sf.add_argument("--data", required=True, help="dataset directory from `spa collect`")
    sf.add_argument("--out", required=True, help="output directory (model/, checkpoint/, metrics.jsonl)")
    sf.add_argument("--model", default="smollm2-135m", help="model to fine-tune (default smollm2-135m)")
    sf.add_argument("--loss", choices=("full", "masked"), default="full",
                    help="full: SPA (default); masked: observation/prediction contents get no loss (ablation)")
    sf.add_argument("--epochs", type=_positive_int, default=5, help="default 5 (the paper's)")
    sf.add_argument("--lr", type=float, default=1e-4, help="peak learning rate (default 1e-4)")
    sf.add_argument("--batch-size", type=_positive_int, default=16, help="global batch (default 16)")
    sf.add_argument("--micro-batch-size", type=_positive_int, default=4, help="sequences per pass, at most (4)")
    sf.add_argument("--micro-batch-tokens", type=_positive_int, default=4096,
                    help="tokens per pass, padding included, at most (4096): bounds memory")
    sf.add_argument("--max-padding", type=float, default=0.1,
                    help="share of padding a pass may hold, at most (0.1): padding slows attention")
    sf.add_argument("--max-length", type=_positive_int, default=2048, help="longer samples are dropped (2048)")
    sf.add_argument("--max-samples", type=_positive_int, default=0,
                    help="train on a fixed random subset of this many training rows (default: all)")
    sf.add_argument("--no-pack", action="store_true",
                    help="one sequence per turn instead of one per trajectory with the loss on all its turns "
                         "(same loss terms, ~3x the tokens)")
    sf.add_argument("--lora", action="store_true", help="train a LoRA adapter instead of all weights")
    sf.add_argument("--lora-r", type=_positive_int, default=16, help="LoRA rank (default 16)")
    sf.add_argument("--env", help="refuse a dataset collected on another env")
    sf.add_argument("--dtype", choices=("auto", "bf16", "bf16-autocast", "fp32"), default="auto",
                    help="bf16: bf16 weights and activations, fp32 master weights and optimizer state; bf16-autocast: "
                         "fp32 weights under autocast (slower); default auto (bf16 where supported, else fp32)")
    sf.add_argument("--device", default="auto", help="auto (default), cpu, cuda")
    sf.add_argument("--seed", type=int, default=0, help="data order seed (default 0)")
    sf.add_argument("--save-every", type=int, default=0, help="also checkpoint every N steps (default: epochs)")
    sf.add_argument("--no-tensorboard", action="store_true", help="JSONL metrics only")
    sf.add_argument("--wandb", metavar="PROJECT", help="also log to Weights & Biases")
    sf.set_defaults(func=cmd_sft)

    sp = sub.add_parser("selfplay", help="alternate `spa collect` and `spa sft` for several rounds, logging the "
                        "novelty of held-out states per round (resumable)")
    sp.add_argument("--env", required=True, help="environment name")
    sp.add_argument("--out", required=True, help="directory for every round's data, model and rounds.jsonl")
    sp.add_argument("--rounds", type=_positive_int, default=2, help="rounds (default 2)")
    sp.add_argument("--model", help="starting model (default smollm2-135m)")
    sp.add_argument("--policy", choices=("model", "novelty", "random", "solver"), default="model",
                    help="behaviour policy of every round (default model)")
    sp.add_argument("--puzzles", type=_positive_int, default=32, help="training puzzles per round (default 32)")
    sp.add_argument("--first-seed", type=int, default=0,
                    help="first training puzzle seed of round 1; later rounds continue after it (default 0)")
    sp.add_argument("--samples", type=_positive_int, default=4, help="episodes per puzzle (default 4)")
    sp.add_argument("--render", choices=RENDERS, default="grid+coords", help="default grid+coords")
    sp.add_argument("--epochs", type=_positive_int, default=5, help="SFT epochs per round (default 5)")
    sp.add_argument("--lora", action="store_true", help="LoRA instead of full fine-tuning")
    sp.add_argument("--max-new-tokens", type=_positive_int, default=256, help="tokens per response (default 256)")
    sp.add_argument("--heldout-puzzles", type=_positive_int, default=16,
                    help="validation puzzles whose states measure novelty (default 16)")
    sp.set_defaults(func=cmd_selfplay)

    env = sub.add_parser("env", help="list, show, play and solve the environments")
    env_sub = env.add_subparsers(dest="env_command", required=True, metavar="ACTION")
    p = env_sub.add_parser("list", help="the named environments")
    p.set_defaults(func=cmd_env_list)
    for name, func, text in (("show", cmd_env_show, "print a puzzle"),
                             ("play", cmd_env_play, "play a puzzle in the terminal"),
                             ("solve", cmd_env_solve, "print an optimal solution of a puzzle")):
        p = env_sub.add_parser(name, help=text)
        p.add_argument("name", help="environment name (see `spa env list`)")
        p.add_argument("--seed", type=int, default=0, help="puzzle seed (default 0)")
        p.add_argument("--render", choices=RENDERS, default="grid+coords",
                       help="state text: the grid, or the grid plus coordinates (default)")
        p.add_argument("--layout", metavar="FILE", help="load the puzzle from a text file (its grid render) "
                       "instead of generating it")
        p.set_defaults(func=func)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except SpaError as e:
        print(f"spa: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("spa: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
