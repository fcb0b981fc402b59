"""Benchmark: the decode step's building blocks against their plain alternatives, same shapes, same run.

    python benchmarks/decode_ops.py [--batch 32] [--reps 30]

1. Matmuls: every linear layer of one decode step of the embedded SmolLM2-135M (30 layers of fused q/k/v,
   output, fused gate/up and down projections, then the tied output projection) at `--batch` rows, in the
   model's dtype: plain `F.linear` against oneDNN-prepacked weights as `spa_rl.generation.lean` uses them.
2. Sampling one token per row from [batch, 49,152] logits: `spa_rl.generation.sample_next` (one fused softmax,
   two-level inverse CDF) against the previous sampler (separate max/exp/sum, one cumulative sum over the
   whole row), kept here as the baseline.

Prints medians of `--reps` timings and the ratios. This script must never be imported by the package or the tests.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import torch
import torch.nn.functional as F


def timed(fn, reps: int) -> float:
    """Median seconds of `reps` calls after 3 warm-up calls."""
    for _ in range(3):
        fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def one_level_sample(logits: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """The sampler before the two-level version: the baseline."""
    logits = logits.float()
    peak = logits.max(dim=-1, keepdim=True).values
    weights = (logits - peak).exp_()
    log_total = weights.sum(dim=-1).log()
    cdf = weights.cumsum(dim=-1)
    u = torch.rand((cdf.shape[0], 1), generator=generator) * cdf[:, -1:]
    tokens = torch.searchsorted(cdf, u, right=True).squeeze(1).clamp_(max=cdf.shape[1] - 1)
    return tokens, logits.gather(1, tokens[:, None]).squeeze(1) - peak.squeeze(1) - log_total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=32, help="rows per decode step (default 32)")
    parser.add_argument("--reps", type=int, default=30, help="timed repetitions (default 30)")
    args = parser.parse_args()
    from spa_rl.generation import SamplingConfig, sample_next
    from spa_rl.generation.lean import LeanDecoder
    from spa_rl.models import load_model

    lm = load_model()
    model, b = lm.model, args.batch
    dec = LeanDecoder.build(model)
    if dec is None or not dec.prepare(b):
        raise SystemExit("the embedded model is not supported by the lean decoder")
    print(f"# {time.strftime('%Y-%m-%d %H:%M')}, {platform.machine()}, {os.cpu_count()} cores, torch "
          f"{torch.__version__}, {torch.get_num_threads()} threads; SmolLM2-135M in {lm.dtype}; batch {b}; "
          f"median of {args.reps}; oneDNN prepacking {'available' if dec._packed else 'NOT available'}")
    plain = []
    for layer in model.model.layers:
        a, m = layer.self_attn, layer.mlp
        plain += [torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight]).detach(), a.o_proj.weight.detach(),
                  torch.cat([m.gate_proj.weight, m.up_proj.weight]).detach(), m.down_proj.weight.detach()]
    packed = [w for qkv, _, o, gu, down in dec._fused for w in (qkv, o, gu, down)]
    inputs = [torch.randn(b, w.shape[1]).to(w.dtype) for w in plain]
    head, head_packed = model.lm_head.weight.detach(), dec._head[0]
    x = torch.randn(b, head.shape[1]).to(head.dtype)
    with torch.inference_mode():
        t_plain = timed(lambda: [F.linear(i, w) for i, w in zip(inputs, plain, strict=True)], args.reps)
        t_packed = timed(lambda: [dec._linear(i, w) for i, w in zip(inputs, packed, strict=True)], args.reps)
        h_plain = timed(lambda: F.linear(x, head), args.reps)
        h_packed = timed(lambda: dec._linear(x, head_packed), args.reps)
        same = all(torch.equal(F.linear(i, w), dec._linear(i, p)) for i, w, p in zip(inputs, plain, packed,
                                                                                          strict=True))
    print(f"layer matmuls of one step: plain {t_plain * 1e3:.2f} ms, prepacked {t_packed * 1e3:.2f} ms "
          f"({t_plain / t_packed:.2f}x); output projection: plain {h_plain * 1e3:.2f} ms, prepacked "
          f"{h_packed * 1e3:.2f} ms ({h_plain / h_packed:.2f}x); results bit-identical: {same}")
    logits = (torch.randn(b, head.shape[0]) * 3).to(lm.dtype)
    g = torch.Generator().manual_seed(0)
    cfg = SamplingConfig(temperature=1.0)
    t_old = timed(lambda: one_level_sample(logits, g), args.reps)
    t_new = timed(lambda: sample_next(logits, cfg, g), args.reps)
    print(f"sampling from [{b}, {head.shape[0]}] logits: one-level cumsum {t_old * 1e3:.2f} ms, fused softmax + "
          f"two-level {t_new * 1e3:.2f} ms ({t_old / t_new:.2f}x)")


if __name__ == "__main__":
    main()
