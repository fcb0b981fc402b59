"""Benchmark: Sokoban puzzle generation and step rate, spa-rl against gym-sokoban 0.0.6, in the same run.

    pip install -r benchmarks/requirements.txt      # gym-sokoban 0.0.6 (+ setuptools<81); not a spa-rl dependency
    python benchmarks/envs.py [--seconds 3] [--rounds 3]

Both sides are timed in alternating rounds on the same machine and the median round is reported, with
the ratio ours/theirs. Our generation includes what theirs does not: the guarantee of solvability within the
move range and the exact optimal solution length. gym-sokoban's step is timed with its cheapest observation
(`tiny_rgb_array`); ours returns the text observation. It also prints the optimal solution lengths of
gym-sokoban's levels (computed with our BFS solver) beside ours, to compare difficulty.
This script must never be imported by the package or the tests.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import io
import os
import platform
import random
import statistics
import sys
import time
import warnings

import numpy as np

from spa_rl import envs
from spa_rl.envs.sokoban import Room, solve

CONFIGS = [("sokoban 6x6, 1 box", "sokoban", (6, 6), 1), ("sokoban 10x10, 2 boxes", "sokoban-10x10-2box", (10, 10), 2)]


def _gym_sokoban():
    try:
        with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()):
            warnings.simplefilter("ignore")
            from gym_sokoban.envs.room_utils import generate_room
            from gym_sokoban.envs.sokoban_env import SokobanEnv
    except ImportError:
        sys.exit("benchmarks/envs.py needs gym-sokoban 0.0.6: pip install -r benchmarks/requirements.txt")
    return generate_room, SokobanEnv


def rate(fn, seconds: float) -> float:
    """Calls of `fn` per second over about `seconds` (fn returns how many units it did)."""
    done, t0 = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - t0) < seconds:
        done += fn()
    return done / elapsed


def ours_generate(name: str):
    env = envs.make(name).unwrapped
    seeds = iter(range(10**9))
    return lambda: (env.reset(seed=next(seeds)), 1)[1]


def theirs_generate(generate_room, dim, num_boxes):
    def one() -> int:
        while True:  # what gym-sokoban's own reset does: retry until a room comes out
            try:
                generate_room(dim=dim, num_steps=int(1.7 * sum(dim)), num_boxes=num_boxes)
                return 1
            except (RuntimeError, RuntimeWarning):
                continue
    return one


def ours_step(name: str, actions: list[int]):
    env = envs.make(name).unwrapped
    env.reset(seed=0)
    words = env.action_names
    it = iter(range(10**12))

    def batch() -> int:
        for _ in range(1000):
            _, _, term, _, _ = env.step(words[actions[next(it) % len(actions)]])
            if term:
                env.reset(seed=next(it))
        return 1000
    return batch


def theirs_step(SokobanEnv, dim, num_boxes, actions: list[int]):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        env = SokobanEnv(dim_room=dim, num_boxes=num_boxes, max_steps=10**9)
    it = iter(range(10**12))

    def batch() -> int:
        for _ in range(1000):
            _, _, done, _ = env.step(1 + actions[next(it) % len(actions)], observation_mode="tiny_rgb_array")
            if done:
                env.reset()
        return 1000
    return batch


def difficulty(generate_room, dim, num_boxes, name: str, n: int) -> tuple[dict, dict]:
    """Optimal solution lengths of n levels from each generator (our BFS solver on both)."""
    theirs: collections.Counter = collections.Counter()
    while sum(theirs.values()) < n:
        try:
            fixed, state, _ = generate_room(dim=dim, num_steps=int(1.7 * sum(dim)), num_boxes=num_boxes)
        except (RuntimeError, RuntimeWarning):
            continue
        cols = dim[1]
        floor = {int(r * cols + c) for r, c in zip(*np.nonzero(fixed != 0), strict=True)}
        targets = {int(r * cols + c) for r, c in zip(*np.nonzero(fixed == 2), strict=True)}
        boxes = frozenset(int(r * cols + c) for r, c in zip(*np.nonzero((state == 3) | (state == 4)), strict=True))
        player = int(np.flatnonzero(state == 5)[0])
        plan = solve(Room.build(dim[0], dim[1], floor, targets), player, boxes)
        theirs[None if plan is None else len(plan)] += 1
    env = envs.make(name).unwrapped
    ours = collections.Counter(env.reset(seed=s)[1]["optimal_moves"] for s in range(n))
    return dict(ours), dict(theirs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=3.0, help="time per measurement (default 3)")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds per pair (default 3)")
    parser.add_argument("--levels", type=int, default=300, help="levels for the difficulty comparison")
    args = parser.parse_args()
    generate_room, SokobanEnv = _gym_sokoban()
    random.seed(0)
    np.random.seed(0)  # gym-sokoban draws from the global generators
    actions = [int(a) for a in np.random.default_rng(0).integers(0, 4, size=100_003)]

    print(f"# {time.strftime('%Y-%m-%d')}, {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"Python {platform.python_version()}; median of {args.rounds} alternating rounds of {args.seconds:g} s")
    print(f"{'measure':<42} {'spa-rl':>12} {'gym-sokoban':>12} {'ratio':>8}")
    for label, name, dim, nb in CONFIGS:
        for what, ours_fn, theirs_fn in (
            ("levels generated/s", ours_generate(name), theirs_generate(generate_room, dim, nb)),
            ("steps/s", ours_step(name, actions), theirs_step(SokobanEnv, dim, nb, actions)),
        ):
            a, b = [], []
            for _ in range(args.rounds):
                a.append(rate(ours_fn, args.seconds))
                b.append(rate(theirs_fn, args.seconds))
            ra, rb = statistics.median(a), statistics.median(b)
            print(f"{label + ': ' + what:<42} {ra:>12,.0f} {rb:>12,.0f} {ra / rb:>7.1f}x", flush=True)
    print("\n# optimal solution length of generated levels (our BFS solver on both): length: count")
    for label, name, dim, nb in CONFIGS:
        ours, theirs = difficulty(generate_room, dim, nb, name, args.levels)
        def fmt(c: dict) -> str:
            return ", ".join(f"{k}: {v}" for k, v in sorted(c.items(), key=lambda kv: (kv[0] is None, kv[0] or 0)))
        print(f"{label}, {args.levels} levels\n  spa-rl:      {fmt(ours)}\n  gym-sokoban: {fmt(theirs)}")


if __name__ == "__main__":
    main()
