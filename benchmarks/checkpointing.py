"""Benchmark: what `--gradient-checkpointing` saves and costs in the RL update, with the embedded model, against
the update without it measured in the same run.

    python benchmarks/checkpointing.py [--batch 8] [--tokens 1024] [--keep 0.5]

One micro-batch of the actor's PPO update as `spa train` runs it (`rl.models.PolicyModel`: log-probs and
entropy at the kept positions, a loss on them, backward) on SmolLM2-135M in the training precision of this
machine, in eval mode as the trainer keeps it: `--batch` sequences of `--tokens` random tokens, `--keep` of the
positions scored (the agent's tokens). Each variant runs in a fresh subprocess, so its peak resident memory
(ru_maxrss) is its own: once without checkpointing, once with; seconds are the median of 3 repetitions after
one warm-up. The difference in peak memory is the activation memory the option frees per micro-batch (the
update's peak is this plus the weights, gradients and optimizer states of actor and critic). This script must
never be imported by the package or the tests.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time


def worker(checkpointed: bool, batch: int, tokens: int, keep: float) -> dict:
    import torch

    from spa_rl.models import checkpoint_layers, for_training, load_model
    from spa_rl.rl.models import PolicyModel
    from spa_rl.training import resolve_precision

    precision = resolve_precision("auto", "cpu", training=True)
    lm = load_model(dtype="bf16" if precision.name == "bf16" else "fp32")
    model = for_training(lm.model).eval()
    if checkpointed:
        checkpoint_layers(model)
    policy = PolicyModel(model)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, len(lm.tokenizer), (batch, tokens), generator=g)
    mask = torch.ones_like(ids)
    kept = torch.rand(batch, tokens - 1, generator=g) < keep
    times = []
    for _ in range(4):
        t0 = time.perf_counter()
        logprobs, entropy = policy(ids, mask, kept)
        (-(logprobs.mean()) - 0.001 * entropy.mean()).backward()
        model.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
    return {"precision": precision.name, "seconds": statistics.median(times[1:]),
            "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=8, help="sequences per micro-batch (default 8)")
    parser.add_argument("--tokens", type=int, default=1024, help="tokens per sequence (default 1024)")
    parser.add_argument("--keep", type=float, default=0.5, help="share of positions scored (default 0.5)")
    parser.add_argument("--worker", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        on, batch, tokens, keep = args.worker
        print(json.dumps(worker(on == "1", int(batch), int(tokens), float(keep))))
        return
    from spa_rl.training.precision import cpu_supports_bf16

    print(f"# {time.strftime('%Y-%m-%d %H:%M')}, {platform.machine()}, {os.cpu_count()} cores, native bf16: "
          f"{cpu_supports_bf16()}; one actor micro-batch of {args.batch} x {args.tokens} tokens, "
          f"{args.keep:.0%} scored")
    results = {}
    for on in (False, True):
        out = subprocess.run([sys.executable, __file__, "--worker", str(int(on)), str(args.batch), str(args.tokens),
                              str(args.keep)], capture_output=True, text=True, check=True)
        results[on] = json.loads(out.stdout.strip().splitlines()[-1])
        r = results[on]
        print(f"  {'with' if on else 'without'} checkpointing ({r['precision']}): forward + backward "
              f"{r['seconds']:.1f} s, peak RSS {r['peak_rss_gib']:.2f} GiB")
    a, b = results[False], results[True]
    print(f"  checkpointing: {b['seconds'] / a['seconds']:.2f}x the time, "
          f"{a['peak_rss_gib'] - b['peak_rss_gib']:.2f} GiB less peak memory")


if __name__ == "__main__":
    main()
