"""Benchmark: the activation memory of one policy forward/backward pass of the embedded model, per token, against
the estimate that sizes micro-batches (`spa_rl.training.memory`).

    python benchmarks/memory.py [--tokens 1400,5600] [--dtype bf16] [--checkpointing]

For each size, in a fresh process: the embedded model as `spa train`'s actor (eval mode, bf16 or fp32), one pass
over random tokens in rows of 1,400 with 30% of the positions in the loss (log-probs and entropy), backward; the
peak resident memory of the pass (Linux VmHWM, reset before it) less the memory before it and the weights'
gradients, per token. Prints it beside `activation_bytes_per_token`. A pass alone holds less than `spa train` at
its peak (padding, its batch, what generation left, the allocator's slack), which the estimate's factors were
fitted to (docs/benchmarks.md, "Memory"). This script must never be imported by the package or the tests.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys


def worker(tokens: int, dtype: str, checkpointing: bool) -> dict:
    import torch

    from spa_rl.models import checkpoint_layers, for_training, load_model
    from spa_rl.rl.models import PolicyModel
    from spa_rl.training.memory import activation_bytes_per_token, peak_rss_bytes, reset_peak_rss
    from spa_rl.training.precision import resolve_precision

    lm = load_model(dtype=dtype)
    model = for_training(lm.model)
    if checkpointing:
        checkpoint_layers(model)
    policy = PolicyModel(model.eval())
    rows, length = max(1, tokens // 1400), min(tokens, 1400)
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (rows, length), generator=generator)
    keep = torch.rand((rows, length - 1), generator=generator) < 0.3
    logp, entropy = policy(ids[:1, :64], torch.ones_like(ids[:1, :64]), keep[:1, :63])  # libraries loaded
    (logp.sum() + entropy.sum()).backward()
    model.zero_grad(set_to_none=True)
    if not reset_peak_rss():
        raise SystemExit("this benchmark needs Linux (/proc/self/clear_refs) to measure one pass's peak")
    before = _rss()
    logp, entropy = policy(ids, torch.ones_like(ids), keep)
    (logp.sum() + entropy.sum()).backward()
    grads = sum(p.numel() * p.element_size() for p in model.parameters())
    per_token = (peak_rss_bytes() - before - grads) / ids.numel()
    estimate = activation_bytes_per_token(model.config, resolve_precision(dtype, "cpu", training=True),
                                          checkpointing)
    return {"tokens": ids.numel(), "measured": per_token, "estimate": estimate}


def _rss() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", default="1400,5600", help="tokens per pass, comma-separated (rows of 1,400)")
    parser.add_argument("--dtype", default="bf16")
    parser.add_argument("--checkpointing", action="store_true")
    parser.add_argument("--worker", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        tokens, dtype, checkpointing = args.worker
        print(json.dumps(worker(int(tokens), dtype, checkpointing == "1")))
        return
    print(f"# policy pass of the embedded model, {args.dtype}, gradient checkpointing {args.checkpointing}")
    for tokens in (int(t) for t in args.tokens.split(",")):
        out = subprocess.run([sys.executable, __file__, "--worker", str(tokens), args.dtype,
                              str(int(args.checkpointing))], capture_output=True, text=True, check=True)
        got = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"  {got['tokens']:,} tokens: {got['measured'] / 1e6:.2f} MB a token measured, "
              f"{got['estimate'] / 1e6:.2f} MB estimated")


if __name__ == "__main__":
    main()
