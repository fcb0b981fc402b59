"""Benchmark: what `--shard-optimizer` (ZeRO stage 1) and `--shard-weights` (FSDP, ZeRO stage 3) save per
process, with the embedded model under two processes, against unsharded data parallelism measured in the same run.

    python benchmarks/sharding.py [--processes 2] [--tokens 128]

Each variant is one `torchrun` launch of `--processes` CPU processes (gloo, one thread each) that build the
actor's `Trainable` as `spa train` does (SmolLM2-135M, the training precision of this machine: bf16 with fp32
master weights where the CPU has native bf16, else fp32; under `--shard-weights` also the whole copy generation
runs on), run one forward/backward on a sequence of `--tokens` random tokens and one optimizer step (gradients
summed over the processes, the AdamW state created), then report the bytes each process holds (counted from its
tensors: weights, master copies, gradients, AdamW state, the generation copy), its peak resident memory
(ru_maxrss) and the forward/backward and optimizer step's seconds. The weights must agree across processes
afterwards (checked on the whole weights). This script must never be imported by the package or the tests.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

VARIANTS = {"whole": "data parallel", "optimizer": "--shard-optimizer", "weights": "--shard-weights"}


def worker(variant: str, tokens: int, out: str) -> None:
    import copy

    import torch
    import torch.distributed as dist

    from spa_rl.models import for_training, load_model
    from spa_rl.rl.models import PolicyModel
    from spa_rl.training import Trainable, make_accelerator, resolve_precision

    def gib(tensors: list) -> float:  # this process's bytes (a sharded tensor's local shard)
        local = [t.to_local() if hasattr(t, "to_local") else t for t in tensors if t is not None]
        return sum(t.numel() * t.element_size() for t in local) / 2**30

    accelerator = make_accelerator("cpu")
    precision = resolve_precision("auto", "cpu", training=True)
    lm = load_model(dtype="fp32")
    policy = PolicyModel(for_training(lm.model).eval())
    copy_gib = 0.0
    if variant == "weights":  # as spa train does: generation runs on a whole copy at inference precision
        rollout_lm = copy.deepcopy(policy.lm).to(precision.weights).requires_grad_(False)
        copy_gib = gib(list(rollout_lm.parameters()))
    actor = Trainable(policy, precision, accelerator, lr=1e-6, total_steps=1, schedule="constant",
                      shard=variant == "optimizer", shard_weights=variant == "weights")
    ids = torch.randint(0, len(lm.tokenizer), (1, tokens), generator=torch.Generator().manual_seed(0))
    t0 = time.perf_counter()
    with actor.autocast():
        logprobs, _ = policy(ids, torch.ones_like(ids), torch.ones(1, tokens - 1, dtype=torch.bool))
    actor.backward(-logprobs.mean())
    pass_seconds = time.perf_counter() - t0
    grads_gib = gib([p.grad for p in actor.params])
    t0 = time.perf_counter()
    actor.step()
    seconds = time.perf_counter() - t0
    inner = actor.optimizer.optim if actor.sharded else actor.optimizer
    state = [v for s in inner.state.values() for v in s.values() if torch.is_tensor(v) and v.dim() > 0]
    weights = list(policy.parameters()) + (actor.master.params if actor.master else [])
    if variant == "weights":  # compare the whole weights, as `spa train` gathers them for generation
        actor.copy_into(rollout_lm, prefix="lm.")
    whole = list(rollout_lm.parameters()) if variant == "weights" else actor.params
    fingerprint = torch.tensor([sum(float(v.detach().double().abs().sum()) for v in whole)], dtype=torch.float64)
    everyone = [torch.zeros_like(fingerprint) for _ in range(dist.get_world_size())]
    dist.all_gather(everyone, fingerprint)
    row = {"rank": dist.get_rank(), "precision": precision.name, "state_gib": gib(state), "weights_gib": gib(weights),
           "grads_gib": grads_gib, "copy_gib": copy_gib, "share": actor.state_share, "step_seconds": seconds,
           "pass_seconds": pass_seconds, "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
           "weights_agree": len({float(x) for x in everyone}) == 1,
           "parameters": sum(p.numel() for p in actor.params)}
    Path(out, f"{variant}-{dist.get_rank()}.json").write_text(json.dumps(row))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--processes", type=int, default=2, help="processes (default 2)")
    parser.add_argument("--tokens", type=int, default=128, help="tokens in the one training sequence (default 128)")
    parser.add_argument("--worker", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        variant, tokens, out = args.worker
        worker(variant, int(tokens), out)
        return
    from spa_rl.training.precision import cpu_supports_bf16

    print(f"# {time.strftime('%Y-%m-%d %H:%M')}, {platform.machine()}, {os.cpu_count()} cores, native bf16: "
          f"{cpu_supports_bf16()}; SmolLM2-135M actor, {args.processes} processes, one step")
    torchrun = Path(sys.executable).with_name("torchrun")
    results = {}
    with tempfile.TemporaryDirectory() as out:
        for variant, name in VARIANTS.items():
            subprocess.run([str(torchrun), "--standalone", f"--nproc_per_node={args.processes}", __file__, "--worker",
                            variant, str(args.tokens), out], check=True, capture_output=True,
                           env={**os.environ, "OMP_NUM_THREADS": "1"})
            rows = [json.loads(Path(out, f"{variant}-{r}.json").read_text()) for r in range(args.processes)]
            results[variant] = rows
            for r in rows:
                total = r["weights_gib"] + r["grads_gib"] + r["state_gib"]
                extra = f" + generation copy {r['copy_gib']:.3f} GiB" if r["copy_gib"] else ""
                print(f"  {name:17} rank {r['rank']} ({r['precision']}): weights {r['weights_gib']:.3f} + gradients "
                      f"{r['grads_gib']:.3f} + AdamW {r['state_gib']:.3f} = {total:.3f} GiB{extra} "
                      f"({r['share']:.1%} of {r['parameters'] / 1e6:.1f}M parameters' optimizer state), "
                      f"peak RSS {r['peak_rss_gib']:.2f} GiB, forward/backward {r['pass_seconds']:.2f} s, "
                      f"optimizer step {r['step_seconds']:.2f} s, weights agree: {r['weights_agree']}")

    def held(variant: str) -> float:
        return max(r["weights_gib"] + r["grads_gib"] + r["state_gib"] + r["copy_gib"] for r in results[variant])

    for variant in ("optimizer", "weights"):
        print(f"  {VARIANTS[variant]}: the largest per-process training state (generation copy included) is "
              f"{held(variant) / held('whole'):.2f}x data parallel's; peak RSS "
              f"{max(r['peak_rss_gib'] for r in results[variant]):.2f} against "
              f"{max(r['peak_rss_gib'] for r in results['whole']):.2f} GiB")


if __name__ == "__main__":
    main()
