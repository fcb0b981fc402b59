"""Benchmark: world-model SFT throughput of the embedded model, bf16 autocast vs fp32, against the measured
matrix-multiply peak of this machine, in the same run.

    python benchmarks/sft.py [--steps 6] [--micro-batch 4]

The training step is the one `spa sft` runs (`spa_rl.sft.token_nll_sum`, AdamW, gradient clipping) on real
self-play samples (solver play on Sokoban, world-model format, grid+coords). Throughput counts every token
of every sequence (prompt tokens too); model FLOPs per token are counted as 6 x parameters, as the issue asks,
and compared with the peak of a large square bf16 (and fp32) matmul measured here. This script must never be
imported by the package or the tests.
"""

from __future__ import annotations

import argparse
import os
import platform
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


def samples(tokenizer, n: int) -> list[tuple[list[int], list[int]]]:
    from spa_rl.selfplay import collect
    from spa_rl.sft import encode_sample, load_dataset

    with tempfile.TemporaryDirectory() as d:
        collect("sokoban", d, policy="solver", puzzles=n, samples=1, val_fraction=0.0, quiet=True)
        rows, _, _ = load_dataset(d)
    return [encode_sample(tokenizer, r, "full") for r in rows]


def throughput(model, data, micro: int, steps: int, autocast: bool, pad: int) -> float:
    from spa_rl.sft import _collate, token_nll_sum

    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    batches = [list(range(i, i + micro)) for i in range(0, len(data) - micro + 1, micro)]

    def step(idx: list[int]) -> int:
        batch = _collate(data, idx, pad)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            nll, n = token_nll_sum(model, batch)
        (nll / max(n, 1)).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return int(batch["attention_mask"].sum())

    step(batches[0])  # warm-up
    tokens, t0 = 0, time.perf_counter()
    for k in range(steps):
        tokens += step(batches[(k + 1) % len(batches)])
    return tokens / (time.perf_counter() - t0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=6, help="timed optimizer steps per precision (default 6)")
    parser.add_argument("--micro-batch", type=int, default=4, help="sequences per step (default 4)")
    args = parser.parse_args()
    from spa_rl.models import load_model

    lm = load_model("smollm2-135m", dtype="fp32")
    params = sum(p.numel() for p in lm.model.parameters())
    data = samples(lm.tokenizer, 24)
    mean_len = sum(len(x) for x, _ in data) / len(data)
    peak_bf16, peak_fp32 = matmul_peak(torch.bfloat16), matmul_peak(torch.float32)
    print(f"# {time.strftime('%Y-%m-%d')}, {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; SmolLM2-135M ({params / 1e6:.1f}M parameters), {len(data)} Sokoban "
          f"SFT samples of {mean_len:.0f} tokens on average, micro-batch {args.micro_batch}")
    print(f"matmul peak (2048^3): bf16 {peak_bf16 / 1e9:.0f} GFLOP/s, fp32 {peak_fp32 / 1e9:.0f} GFLOP/s")
    for name, autocast in (("bf16 autocast", True), ("fp32", False)):
        tps = throughput(lm.model, data, args.micro_batch, args.steps, autocast, lm.tokenizer.pad_token_id)
        flops = 6 * params * tps
        print(f"{name:>13}: {tps:7.1f} tokens/s = {flops / 1e9:6.1f} GFLOP/s = {flops / peak_bf16:.1%} of the bf16 "
              f"peak ({flops / peak_fp32:.1%} of the fp32 peak)", flush=True)


if __name__ == "__main__":
    main()
