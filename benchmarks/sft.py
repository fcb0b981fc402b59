"""Benchmark: world-model SFT throughput of the embedded model, bf16 (fp32 master weights, `spa sft`'s default),
bf16 autocast and fp32, against the measured matrix-multiply peak of this machine, in the same run.

    python benchmarks/sft.py [--steps 3] [--rounds 3]
    python benchmarks/sft.py --profile [no-pack] [--dtype bf16]   # where one step goes (torch.profiler), nothing else

The training step is the one `spa sft` runs (`spa_rl.sft.sft_step`: loss, AdamW, clipping) on real
self-play data: random-policy Sokoban episodes (the cold-start data of `scripts/world_model.sh`), world-model
format, grid+coords, packed one trajectory per sequence, global batches of 16 turns cut into micro-batches
exactly as `spa sft` cuts them (length-grouped, at most 4 sequences, 4,096 tokens and 10% padding each). For
comparison it also times `spa sft --no-pack` (one sequence per turn, batched the same way) in both bf16 modes;
fp32 is timed for the default only. Throughput counts every non-padding token of every sequence; model
FLOPs per token are counted as 6 x parameters, as the issue asks, and compared with the peak of a large square
bf16 (and fp32) matmul measured here. 6N leaves out attention, whose cost per token grows with the sequence
length, so the script also reports the share with causal attention counted (6 x layers x width x T per token of
a sequence of length T: PaLM's 12 x layers x width x T, halved for the causal mask). This script must never be
imported by the package or the tests.
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import statistics
import tempfile
import time

import torch


def matmul_peak(dtype: torch.dtype, n: int = 2048, reps: int = 10) -> float:
    """FLOP/s of an n x n x n matmul, best of `reps`."""
    a = torch.randn(n, n, dtype=dtype)
    b = torch.randn(n, n, dtype=dtype)
    torch.mm(a, b)
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - t0)
    return 2 * n ** 3 / best


def datasets(tokenizer) -> tuple[dict, int]:
    """Encoded sequences: packed trajectories (`spa sft`'s default) and one sequence per turn."""
    from spa_rl.collect import CollectConfig, collect
    from spa_rl.samples import encode_conversation, encode_sample, load_dataset, pack_trajectories

    with tempfile.TemporaryDirectory() as d:
        collect(CollectConfig.make(env="sokoban", out=d, policy="random", puzzles=12, samples=4, val_fraction=0.0),
                quiet=True)
        rows, _, _ = load_dataset(d)
    units = pack_trajectories(rows)
    packed = [encode_conversation(tokenizer, m, "full", t) for m, t in units]
    return {"packed": packed, "turns": [len(t) for _, t in units],
            "per-turn": [encode_sample(tokenizer, r, "full") for r in rows]}, len(rows)


def plans(data: dict, steps: int) -> dict[str, tuple[list, list[list[list[int]]]]]:
    """Per configuration: (sequences, optimizer steps as lists of micro-batches), warm-up step first."""
    from spa_rl.sft import SFTConfig, epoch_batches
    from spa_rl.training import micro_batches

    cfg = SFTConfig(data="", out="", micro_batch_tokens=4096)  # the bound before memory sizing (0 now: sized)
    packed, per_turn = data["packed"], data["per-turn"]

    def cut(seqs: list, idx: list[int]) -> list[list[int]]:
        lengths = [len(x) for x, _ in seqs]
        return micro_batches(lengths, sorted(idx, key=lambda i: lengths[i]), cfg.micro_batch_size,
                             cfg.micro_batch_tokens, cfg.max_padding)

    spa = [cut(packed, idx) for idx in epoch_batches(data["turns"], cfg.batch_size, seed=0)[:steps + 1]]
    no_pack = [cut(per_turn, idx) for idx in epoch_batches([1] * len(per_turn), cfg.batch_size, seed=0)[:steps + 1]]
    return {"spa sft (packed trajectories)": (packed, spa),
            "spa sft --no-pack (one sequence per turn)": (per_turn, no_pack)}


def shares(config, data, plan: list[list[list[int]]]) -> tuple[float, float]:
    """(padding share, causal attention FLOPs per token) of the plan's optimizer steps after the first."""
    micros = [[len(data[i][0]) for i in idx] for step in plan[1:] for idx in step]
    tokens = sum(sum(m) for m in micros)
    attention = sum(6 * config.num_hidden_layers * config.num_attention_heads * config.head_dim * n ** 2
                    for m in micros for n in m)
    return 1 - tokens / sum(len(m) * max(m) for m in micros), attention / tokens


def throughput(model, data, plan: list[list[list[int]]], precision: str, pad: int) -> float:
    """Non-padding tokens per second over the plan's optimizer steps after the first (warm-up). `precision` is a
    `spa sft --dtype` (`bf16` casts the model in place)."""
    from spa_rl.models import right_padded_batch
    from spa_rl.sft import sft_step
    from spa_rl.training import Trainable, make_accelerator, resolve_precision

    model.train()
    trainable = Trainable(model, resolve_precision(precision, "cpu", training=True), make_accelerator("cpu"),
                          lr=1e-5, total_steps=len(plan))

    def step(micro: list[list[int]]) -> int:
        batches = [right_padded_batch([data[i] for i in idx], pad) for idx in micro]
        sft_step(trainable, batches)
        return sum(int(b["attention_mask"].sum()) for b in batches)

    step(plan[0])  # warm-up
    t0 = time.perf_counter()
    tokens = sum(step(micro) for micro in plan[1:])
    return tokens / (time.perf_counter() - t0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=3, help="timed optimizer steps per configuration (default 3)")
    parser.add_argument("--rounds", type=int, default=3,
                        help="time every configuration this many times, in alternating order, and report the median "
                             "(default 3; the machine's speed drifts)")
    parser.add_argument("--profile", nargs="?", const="packed", choices=["packed", "no-pack"],
                        help="only profile one bf16 optimizer step (default: packed trajectories, spa sft's default; "
                             "no-pack: one sequence per turn) and print the top operations")
    parser.add_argument("--dtype", default="bf16", choices=("bf16", "bf16-autocast", "fp32"),
                        help="precision of the profiled step (default bf16, spa sft's)")
    args = parser.parse_args()
    from spa_rl.models import load_model

    lm = load_model("smollm2-135m", dtype="fp32")
    params = sum(p.numel() for p in lm.model.parameters())
    data, rows = datasets(lm.tokenizer)
    peak_bf16, peak_fp32 = matmul_peak(torch.bfloat16), matmul_peak(torch.float32)
    print(f"# {time.strftime('%Y-%m-%d')}, {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; SmolLM2-135M ({params / 1e6:.1f}M parameters); {rows} Sokoban turns "
          f"of random self-play in {len(data['packed'])} trajectories; {args.steps} timed steps of 16 turns")
    print(f"matmul peak (2048^3): bf16 {peak_bf16 / 1e9:.0f} GFLOP/s, fp32 {peak_fp32 / 1e9:.0f} GFLOP/s")
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        name = "spa sft (packed trajectories)" if args.profile == "packed" else \
            "spa sft --no-pack (one sequence per turn)"
        seqs, plan = plans(data, 1)[name]
        model = copy.deepcopy(lm.model)
        throughput(model, seqs, [plan[0], plan[0]], args.dtype, lm.tokenizer.pad_token_id)  # warm-up
        print("profiled step, sequence lengths per micro-batch:", [[len(seqs[i][0]) for i in m] for m in plan[1]])
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            throughput(model, seqs, [plan[1], plan[1]], args.dtype, lm.tokenizer.pad_token_id)  # one step twice
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))
        return
    configs = [(name, precision, seqs, plan) for name, (seqs, plan) in plans(data, args.steps).items()
               for precision in (("bf16", "bf16-autocast", "fp32") if name.startswith("spa sft (") else
                                 ("bf16", "bf16-autocast"))]
    results: dict[tuple[str, str], list[float]] = {}
    for r in range(args.rounds):
        for name, precision, seqs, plan in configs if r % 2 == 0 else configs[::-1]:
            model = copy.deepcopy(lm.model)  # bf16 casts its model; every configuration starts from the same one
            tps = throughput(model, seqs, plan, precision, lm.tokenizer.pad_token_id)
            del model
            results.setdefault((name, precision), []).append(tps)
            print(f"round {r + 1}: {name}, {precision}: {tps:6.1f} tokens/s", flush=True)
    peak_bf16 = max(peak_bf16, matmul_peak(torch.bfloat16))  # the best of two measurements, before and after
    print(f"bf16 peak after the runs {peak_bf16 / 1e9:.0f} GFLOP/s (best of the two measurements used below)")
    print(f"median of {args.rounds} rounds:")
    for name, precision, seqs, plan in configs:
        tps = statistics.median(results[name, precision])
        pad_share, attention = shares(lm.model.config, seqs, plan)
        flops = 6 * params * tps
        print(f"{name}, {precision}: {tps:6.1f} tokens/s ({pad_share:.0%} padding) = {flops / 1e9:5.1f} GFLOP/s "
              f"= {flops / peak_bf16:.1%} of the bf16 peak ({flops / peak_fp32:.1%} of the fp32 peak); "
              f"with attention {(flops + attention * tps) / peak_bf16:.1%} of the bf16 peak", flush=True)


if __name__ == "__main__":
    main()
