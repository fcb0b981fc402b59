"""`spa demo`: the README's main job until the training stages land (a minute or two on a laptop CPU).

For each of the paper's three puzzles it shows one puzzle in both renders with its optimal solution, plays
many seeded puzzles with the scripted random and solver policies under the agent's episode limits (docs/method.md §3)
and reports success rates and speed; then it evaluates the embedded model zero-shot on a few Sokoban
validation puzzles beside the same two policies (`--model-puzzles 0` skips it). It must never download
anything.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
from rich.console import Console
from rich.table import Table

from spa_rl import envs
from spa_rl.config import Seeded, setting
from spa_rl.evaluation import EvalConfig, evaluate, metrics_table
from spa_rl.models import ModelConfig
from spa_rl.progress import progress_bar

DEMO_ENVS = ("sokoban", "frozenlake", "sudoku")


@dataclass(kw_only=True)
class DemoConfig(Seeded):
    """`spa demo`: the environments with scripted policies, then the model zero-shot."""

    puzzles: int = setting(200, ge=1)
    """Puzzles per environment played by the scripted policies (seeds from --seed on)."""
    model_puzzles: int = setting(4, ge=0)
    """Sokoban validation puzzles for the zero-shot model evaluation (0 skips it)."""
    model: ModelConfig = setting(factory=ModelConfig)


def run_demo(console: Console, config: DemoConfig) -> int:
    """Print the tour; return the exit code."""
    puzzles, seed, model_puzzles = config.puzzles, config.seed, config.model_puzzles
    rows = []
    for name in DEMO_ENVS:
        variant = envs.get_variant(name)
        env = envs.make(name, render="grid+coords").unwrapped
        obs, info = env.reset(seed=seed)
        console.rule(f"[bold]{name}[/bold]: {variant.description}")
        console.print(f"seed {seed}, grid+coords render:", style="dim")
        console.print(obs, markup=False)
        plan = env.solve()
        console.print(f"optimal solution: {' || '.join(plan or [])}", markup=False)

        stats = {"random": [], "solver": []}
        steps = 0
        t_gen = t_step = 0.0
        with progress_bar(transient=True) as progress:
            task = progress.add_task(f"{name}: playing {puzzles} puzzles x 2 policies", total=puzzles, unit="puzzles")
            rng = np.random.default_rng(seed)
            for s in range(seed, seed + puzzles):
                for policy in stats:
                    t0 = time.perf_counter()
                    env.reset(seed=s)
                    t1 = time.perf_counter()
                    for _ in range(variant.max_actions_per_episode):
                        action = env.random_action(rng) if policy == "random" else env.optimal_action()
                        if action is None:
                            break
                        _, _, terminated, _, _ = env.step(action)
                        steps += 1
                        if terminated:
                            break
                    t_gen += t1 - t0
                    t_step += time.perf_counter() - t1
                    stats[policy].append(env.success)
                progress.advance(task)
        rows.append((name, float(np.mean(stats["random"])), float(np.mean(stats["solver"])),
                     2 * puzzles / t_gen, steps / t_step))

    table = Table(title=f"Scripted policies, {puzzles} puzzles each (seeds {seed}..{seed + puzzles - 1}), "
                        "paper episode limits")
    for col in ("env", "random success", "solver success", "puzzles generated/s", "policy steps/s"):
        table.add_column(col, justify="right" if col != "env" else "left")
    for name, rnd, sol, gen, stp in rows:
        table.add_row(name, f"{rnd:.1%}", f"{sol:.1%}", f"{gen:,.0f}", f"{stp:,.0f}")
    console.print(table)
    console.print("The solver is below 100% only where the dynamics are random (slippery FrozenLake).")
    if model_puzzles > 0:
        console.rule("[bold]the embedded model, zero-shot[/bold]")
        name = config.model.model
        for policy in ("model", "random", "solver"):
            m = evaluate(EvalConfig.make(model=config.model if policy == "model" else ModelConfig(), env="sokoban",
                                         policy=policy, puzzles=model_puzzles, samples=2, max_new_tokens=128))
            console.print(metrics_table(m, title=f"{name if policy == 'model' else policy} on sokoban, "
                                                 f"{model_puzzles} validation puzzles x 2 samples"))
        console.print("A small model does not follow the SPA format zero-shot: self-play fine-tuning (next "
                      "stage) is what teaches it. Full evaluation: `spa eval --env sokoban --out runs/eval`.")
    console.print("Play a puzzle yourself: `spa env play sokoban --seed 3`.")
    return 0
