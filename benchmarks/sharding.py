"""Benchmark: what `--shard-optimizer` (ZeRO stage 1) saves per process, with the embedded model under two
processes, against the unsharded optimizer measured in the same run.

    python benchmarks/sharding.py [--processes 2] [--tokens 128]

Each variant is one `torchrun` launch of `--processes` CPU processes (gloo, one thread each) that build the
actor's `Trainable` as `spa train` does (SmolLM2-135M, the training precision of this machine: bf16 with fp32
master weights where the CPU has native bf16, else fp32), run one forward/backward on a sequence of `--tokens`
random tokens and one optimizer step (gradients summed over the processes, the AdamW state created), then
report the bytes of optimizer state each process holds (counted from its tensors), its peak resident memory
(ru_maxrss) and the optimizer step's seconds. The weights must agree across processes afterwards (checked).
This script must never be imported by the package or the tests.
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


def worker(shard: bool, tokens: int, out: str) -> None:
    import torch
    import torch.distributed as dist

    from spa_rl.models import for_training, load_model
    from spa_rl.rl.models import PolicyModel
    from spa_rl.training import Trainable, make_accelerator, resolve_precision

    accelerator = make_accelerator("cpu")
    precision = resolve_precision("auto", "cpu", training=True)
    lm = load_model(dtype="fp32")
    policy = PolicyModel(for_training(lm.model).eval())
    actor = Trainable(policy, precision, accelerator, lr=1e-6, total_steps=1, schedule="constant", shard=shard)
    ids = torch.randint(0, len(lm.tokenizer), (1, tokens), generator=torch.Generator().manual_seed(0))
    with actor.autocast():
        logprobs, _ = policy(ids, torch.ones_like(ids), torch.ones(1, tokens - 1, dtype=torch.bool))
    actor.backward(-logprobs.mean())
    t0 = time.perf_counter()
    actor.step()
    seconds = time.perf_counter() - t0
    inner = actor.optimizer.optim if actor.sharded else actor.optimizer
    state_bytes = sum(v.numel() * v.element_size() for s in inner.state.values() for v in s.values()
                      if torch.is_tensor(v) and v.dim() > 0)
    fingerprint = torch.tensor([sum(float(p.detach().double().abs().sum()) for p in actor.params)],
                               dtype=torch.float64)
    everyone = [torch.zeros_like(fingerprint) for _ in range(dist.get_world_size())]
    dist.all_gather(everyone, fingerprint)
    row = {"rank": dist.get_rank(), "precision": precision.name, "state_gib": state_bytes / 2**30,
           "share": actor.state_share, "step_seconds": seconds,
           "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
           "weights_agree": len({float(x) for x in everyone}) == 1,
           "parameters": sum(p.numel() for p in actor.params)}
    Path(out, f"{int(shard)}-{dist.get_rank()}.json").write_text(json.dumps(row))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--processes", type=int, default=2, help="processes (default 2)")
    parser.add_argument("--tokens", type=int, default=128, help="tokens in the one training sequence (default 128)")
    parser.add_argument("--worker", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        shard, tokens, out = args.worker
        worker(shard == "1", int(tokens), out)
        return
    from spa_rl.training.precision import cpu_supports_bf16

    print(f"# {time.strftime('%Y-%m-%d %H:%M')}, {platform.machine()}, {os.cpu_count()} cores, native bf16: "
          f"{cpu_supports_bf16()}; SmolLM2-135M actor, {args.processes} processes, one step")
    torchrun = Path(sys.executable).with_name("torchrun")
    results = {}
    with tempfile.TemporaryDirectory() as out:
        for shard in (False, True):
            subprocess.run([str(torchrun), "--standalone", f"--nproc_per_node={args.processes}", __file__, "--worker",
                            str(int(shard)), str(args.tokens), out], check=True, capture_output=True,
                           env={**os.environ, "OMP_NUM_THREADS": "1"})
            rows = [json.loads(Path(out, f"{int(shard)}-{r}.json").read_text()) for r in range(args.processes)]
            results[shard] = rows
            for r in rows:
                print(f"  {'sharded' if shard else 'whole  '} rank {r['rank']} ({r['precision']}): optimizer state "
                      f"{r['state_gib']:.3f} GiB ({r['share']:.1%} of {r['parameters'] / 1e6:.1f}M parameters), "
                      f"peak RSS {r['peak_rss_gib']:.2f} GiB, optimizer step {r['step_seconds']:.2f} s, "
                      f"weights agree: {r['weights_agree']}")
    whole = max(r["state_gib"] for r in results[False])
    sharded = max(r["state_gib"] for r in results[True])
    print(f"  sharding: the largest per-process optimizer state is {sharded / whole:.2f}x the unsharded "
          f"({whole - sharded:.3f} GiB less); peak RSS {max(r['peak_rss_gib'] for r in results[True]):.2f} against "
          f"{max(r['peak_rss_gib'] for r in results[False]):.2f} GiB")


if __name__ == "__main__":
    main()
