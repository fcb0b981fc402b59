"""Benchmark: tokens a world-model SFT epoch must process, one sequence per turn vs one per trajectory
(`spa sft`'s packing), with random and length-grouped micro-batches, on the same self-play data.

    python benchmarks/sft_tokens.py [--puzzles 48] [--samples 4] [--micro-batch 4]

Workload: random-policy self-play on Sokoban (world-model format, grid+coords), the cold-start data of
scripts/world_model.sh. Packing and length grouping do not change the loss terms (tests/test_sft.py checks the
summed NLL is equal), so the ratio of processed tokens (padding included) is the ratio of work per epoch to
first order (attention is quadratic in length, which favours the shorter per-turn sequences a little). This
counts tokens only (no model runs), so it is deterministic. This script must never be imported by the package
or the tests.
"""

from __future__ import annotations

import argparse
import random
import tempfile


def processed_tokens(lengths: list[int], micro: int, grouped: bool, seed: int = 0) -> int:
    """Tokens a pass over `lengths` processes in micro-batches padded to their longest member."""
    order = list(range(len(lengths)))
    random.Random(seed).shuffle(order)
    if grouped:  # as spa sft: each global batch (4 micro-batches) sorted by length before splitting
        glob = micro * 4
        order = [i for k in range(0, len(order), glob) for i in sorted(order[k:k + glob], key=lengths.__getitem__)]
    chunks = [order[k:k + micro] for k in range(0, len(order), micro)]
    return sum(len(chunk) * max(lengths[i] for i in chunk) for chunk in chunks)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--puzzles", type=int, default=48)
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--micro-batch", type=int, default=4)
    args = parser.parse_args()

    from spa_rl.models import load_tokenizer, resolve_model_path
    from spa_rl.samples import encode_conversation, encode_sample, load_dataset, pack_trajectories
    from spa_rl.selfplay import collect

    tokenizer = load_tokenizer(resolve_model_path("smollm2-135m"))
    with tempfile.TemporaryDirectory() as d:
        collect("sokoban", d, policy="random", puzzles=args.puzzles, samples=args.samples, val_fraction=0.0,
                quiet=True)
        rows, _, _ = load_dataset(d)
    per_turn = [len(encode_sample(tokenizer, r, "full")[0]) for r in rows]
    packed = [len(encode_conversation(tokenizer, m, "full", t)[0]) for m, t in pack_trajectories(rows)]
    print(f"{len(rows)} turns in {len(packed)} trajectories (Sokoban, random policy, {args.puzzles} puzzles x "
          f"{args.samples}); micro-batch {args.micro_batch}")
    print("| sequences | tokens | processed (padding incl.), random batches | length-grouped | "
          "work vs per turn, random batches |")
    print("|---|---:|---:|---:|---:|")
    base = processed_tokens(per_turn, args.micro_batch, grouped=False)
    for name, lengths in (("one per turn", per_turn), ("one per trajectory (packed)", packed)):
        plain = processed_tokens(lengths, args.micro_batch, grouped=False)
        grouped = processed_tokens(lengths, args.micro_batch, grouped=True)
        print(f"| {name} | {sum(lengths):,} | {plain:,} | {grouped:,} | {grouped / base:.2f}x |")


if __name__ == "__main__":
    main()
