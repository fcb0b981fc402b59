"""Benchmark: where a PPO step of `spa train` goes on this machine, with the embedded model, against baselines
measured in the same run.

    python benchmarks/rl.py [--steps 2] [--new-tokens 96] [--sizes 4x4,8x4,4x8] [--advantage grpo] [--lora]

For each size (puzzles per step x samples per puzzle) it runs `spa train`'s own loop (`rl.trainer.train_rl`,
GAE with a critic, every group kept) for `--steps` steps on Sokoban and reports, per step: seconds in
generation, scoring (old log-probs, values) and the update (actor and critic, forward and backward), generated
tokens per second inside training, and the peak resident memory of the process (each size in a fresh
subprocess). Two baselines from the same run: whole episodes through the rollout engine alone (what
`benchmarks/rollout.py` calls "whole episodes", same model, same prompts, same token budget), and the matrix
multiply peak of this CPU in the training precision, against which the update's model FLOPs are counted
(6 x parameters per trained token for each of actor and critic, plus 2 x parameters per token for each
no-grad scoring pass inside the update's step, which this count leaves out). It also prints the sampler/trainer
log-prob mismatch (mean |log p| difference per sampled token), the trained episodes per hour of the whole step,
and the step's share of the peak counting every pass (2N a generated token, 2N a scored token per scoring model,
6N a trained token per trained model, 4N with LoRA: no weight gradients). This script must never be
imported by the package or the tests.
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


def matmul_peak(dtype_name: str, n: int = 2048, reps: int = 10) -> float:
    import torch

    dtype = torch.bfloat16 if dtype_name == "bf16" else torch.float32
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    torch.mm(a, b)
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - t0)
    return 2 * n ** 3 / best


def worker(phase: str, puzzles: int, samples: int, steps: int, new_tokens: int, advantage: str = "gae",
           lora: bool = False, micro_tokens: int = 0) -> dict:
    import torch

    from spa_rl.io import read_jsonl
    from spa_rl.models import load_model
    from spa_rl.rl.config import RLConfig
    from spa_rl.rl.trainer import train_rl
    from spa_rl.training import resolve_precision

    result: dict = {"phase": phase, "puzzles": puzzles, "samples": samples, "threads": torch.get_num_threads()}
    if phase == "episodes":  # the rollout engine alone, as benchmarks/rollout.py times whole episodes
        from spa_rl.generation import SamplingConfig, make_backend
        from spa_rl.rollout import RolloutConfig, RolloutEngine

        lm = load_model()
        engine = RolloutEngine(RolloutConfig(env="sokoban", sampling=SamplingConfig(max_new_tokens=new_tokens),
                                             max_concurrent=32), make_backend("kv", lm.model, lm.tokenizer),
                               lm.tokenizer)
        t0 = time.perf_counter()
        episodes = engine.run(list(range(puzzles)), group_size=samples, seed=0)
        elapsed = time.perf_counter() - t0
        result["tokens_per_s"] = sum(len(t.response_ids) for e in episodes for t in e.turns) / elapsed
    else:
        with tempfile.TemporaryDirectory() as out:
            # the embedded model fails every episode alike, so the actor would sit every step out: make it train
            config = RLConfig.make(out=out, env="sokoban", steps=steps, puzzles_per_step=puzzles,
                                   samples_per_puzzle=samples, keep_ratio=1.0, minibatch_size=puzzles * samples,
                                   max_new_tokens=new_tokens, eval_every=0, eval_before=False, eval_puzzles=1,
                                   eval_samples=1, tensorboard=False, save_every=0, skip_uniform_steps=False,
                                   advantage=advantage, lora=lora, micro_batch_tokens=micro_tokens)
            train_rl(config, quiet=True)
            rows = [r for r in read_jsonl(f"{out}/metrics.jsonl") if "time/update" in r]
            params = sum(p.numel() for p in load_model(dtype="fp32").model.parameters())
        result["precision"] = resolve_precision(config.model.dtype, "cpu", training=True).name
        result["one_pass"] = config.one_pass
        result["critic"] = config.uses_critic
        result["params"] = params
        result["rows"] = rows
    usage = resource.getrusage(resource.RUSAGE_SELF)
    result["peak_rss_gib"] = usage.ru_maxrss / 2**20
    result["cpu_user_s"], result["cpu_sys_s"], result["page_faults"] = usage.ru_utime, usage.ru_stime, usage.ru_minflt
    return result


def run(phase: str, puzzles: int, samples: int, steps: int, new_tokens: int, advantage: str = "gae",
        lora: bool = False, micro_tokens: int = 0) -> dict:
    out = subprocess.run([sys.executable, __file__, "--worker", phase, str(puzzles), str(samples), str(steps),
                          str(new_tokens), advantage, str(int(lora)), str(micro_tokens)], capture_output=True,
                         text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=2, help="PPO steps per size (default 2; the first is included)")
    parser.add_argument("--new-tokens", type=int, default=96, help="max new tokens per response (default 96)")
    parser.add_argument("--sizes", default="4x4,8x4,4x8", help="puzzles x samples per step (default 4x4,8x4,4x8)")
    parser.add_argument("--advantage", default="gae", help="gae (PPO with the critic, default), grpo, bi-level-gae")
    parser.add_argument("--lora", action="store_true", help="train LoRA adapters (actor and critic) instead")
    parser.add_argument("--micro-batch-tokens", type=int, default=0,
                        help="tokens per forward/backward pass (default 0: sized from memory, as spa train does)")
    parser.add_argument("--no-baseline", action="store_true", help="skip the engine-alone baseline")
    parser.add_argument("--worker", nargs=8, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        phase, puzzles, samples, steps, new_tokens, advantage, lora, micro_tokens = args.worker
        print(json.dumps(worker(phase, int(puzzles), int(samples), int(steps), int(new_tokens), advantage,
                                bool(int(lora)), int(micro_tokens))))
        return
    import torch

    from spa_rl.training.precision import cpu_supports_bf16

    print(f"# {time.strftime('%Y-%m-%d %H:%M')}, {platform.machine()}, {os.cpu_count()} cores, "
          f"torch {torch.__version__}, native bf16 (AVX-512 BF16 or AMX): {cpu_supports_bf16()}; Sokoban, "
          f"{args.new_tokens} new tokens, {args.steps} steps per size, every group kept, advantage {args.advantage}"
          f"{', LoRA' if args.lora else ''}, micro-batch tokens {args.micro_batch_tokens or 'sized from memory'}")
    sizes = [tuple(int(x) for x in s.split("x")) for s in args.sizes.split(",")]
    for puzzles, samples in sizes:
        base = None if args.no_baseline else run("episodes", puzzles, samples, 1, args.new_tokens)
        got = run("train", puzzles, samples, args.steps, args.new_tokens, args.advantage, args.lora,
                  args.micro_batch_tokens)
        peak = matmul_peak(got["precision"])
        print(f"{puzzles} puzzles x {samples} samples ({got['precision']}, peak {peak / 1e9:.0f} GFLOP/s, "
              f"{got['peak_rss_gib']:.2f} GiB peak RSS; the process's CPU time {got['cpu_user_s']:.0f} s user, "
              f"{got['cpu_sys_s']:.0f} s system, {got['page_faults'] / 1e6:.1f} M page faults):")
        for r in got["rows"]:
            tokens = r["rollout/response_tokens"] * r["rollout/turns"] * puzzles * samples
            trained = r.get("perf/trained_tokens", 0)
            critic = int(got["critic"])
            models = critic + int(r.get("rollout/actor_updated", 1))  # the critic, and the actor when it trained
            per_token = 4 if args.lora else 6  # LoRA: forward and the activations' gradients, no weight gradients
            flops = models * per_token * got["params"] * trained
            share = flops / max(r["time/update"], 1e-9) / peak
            scored = 0 if got["one_pass"] else 1 + critic  # no-grad passes before the update
            total = r["time/generate"] + r["time/score"] + r["time/update"]
            all_flops = flops + 2 * got["params"] * (tokens + scored * trained)
            print(f"  step {r['step']}: generate {r['time/generate']:6.1f} s ({r['perf/generated_tokens_per_s']:.1f} "
                  f"tok/s, {tokens:.0f} tokens) | score {r['time/score']:5.1f} s | update {r['time/update']:6.1f} s "
                  f"({trained:.0f} trained tokens, {share:.1%} of the peak by {per_token}N x {models} models) | "
                  f"whole step {total:.1f} s = {puzzles * samples * 3600 / total:.0f} trained episodes/hour, "
                  f"{all_flops / total / peak:.1%} of the peak counting every pass | log-prob mismatch "
                  f"{r.get('rollout/logprob_mismatch', float('nan')):.2e}")
        if base:
            print(f"  baseline, the engine alone on the same episodes: {base['tokens_per_s']:.1f} tok/s "
                  f"(peak RSS {base['peak_rss_gib']:.2f} GiB)")


if __name__ == "__main__":
    main()
