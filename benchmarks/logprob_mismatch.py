"""Benchmark: where the sampler/trainer log-prob mismatch comes from, with the embedded model.

    python benchmarks/logprob_mismatch.py [--env sokoban] [--new-tokens 96] [--dtype bf16]
    ONEDNN_MAX_CPU_ISA=AVX512_CORE_BF16 python benchmarks/logprob_mismatch.py   # the same without AMX

Plays 4 puzzles x 4 samples with the rollout engine (`spa train`'s sampler, at temperature 1, the benchmark shape
of `benchmarks/rl.py`) and scores the sampled tokens again with the training forward pass of the same weights:
in the run's precision (what `rollout/logprob_mismatch` reports), with the output projection in fp32 over the
same hidden states, and with the whole model in fp32 (the reference both bf16 paths round away from). Prints
the mean |log p difference| per sampled token of each pair, and the sampler-trainer mismatch by the token's
surprisal (-log p in fp32): the mismatch of two bf16 computations grows with how flat the distribution is, so a
near-random policy shows far more than a trained one. This script must never be imported by the package or
the tests.
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--env", default="sokoban")
    parser.add_argument("--new-tokens", type=int, default=96)
    parser.add_argument("--dtype", default="bf16", help="the sampler's and trainer's precision (default bf16)")
    args = parser.parse_args()

    from spa_rl.generation import SamplingConfig, make_backend
    from spa_rl.models import load_model, next_token_logits
    from spa_rl.rl.episodes import build_trajectory
    from spa_rl.rollout import RolloutConfig, RolloutEngine

    lm = load_model(dtype=args.dtype)
    model, tokenizer = lm.model.eval(), lm.tokenizer
    engine = RolloutEngine(RolloutConfig(env=args.env, sampling=SamplingConfig(max_new_tokens=args.new_tokens)),
                           make_backend("kv", model, tokenizer), tokenizer)
    episodes = engine.run(list(range(4)), group_size=4, seed=0)
    trajectories = [build_trajectory(e, tokenizer, 0) for e in episodes]
    reference = load_model(dtype="fp32").model.eval()

    @torch.no_grad()
    def score(m: torch.nn.Module, fp32_head: bool = False) -> torch.Tensor:
        out = []
        for t in trajectories:
            ids = torch.tensor([t.ids])
            keep = torch.tensor([t.sampled[1:]], dtype=torch.bool)
            if fp32_head:
                hidden = m.get_decoder()(input_ids=ids).last_hidden_state[:, :-1][keep]
                logits = hidden.float() @ m.get_output_embeddings().weight.float().T
            else:
                logits = next_token_logits(m, ids, torch.ones_like(ids), keep).float()
            out.append(torch.log_softmax(logits, -1).gather(-1, ids[:, 1:][keep][:, None]).squeeze(-1))
        return torch.cat(out)

    sampler = torch.cat([torch.tensor(t.rollout_logprobs[1:])[torch.tensor(t.sampled[1:], dtype=torch.bool)]
                         for t in trajectories])
    trainer, trainer_head, fp32 = score(model), score(model, fp32_head=True), score(reference)
    from pathlib import Path

    cpuinfo = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    flags = [f for f in ("avx512_bf16", "amx_bf16") if f in cpuinfo]
    print(f"# {time.strftime('%Y-%m-%d %H:%M')}, {platform.machine()}, {os.cpu_count()} cores, CPU flags "
          f"{' '.join(flags) or 'none of avx512_bf16/amx_bf16'}, ONEDNN_MAX_CPU_ISA="
          f"{os.environ.get('ONEDNN_MAX_CPU_ISA', '(unset)')}, torch {torch.__version__}; {args.env}, "
          f"{len(episodes)} episodes, {sampler.numel()} sampled tokens, {args.dtype}")
    for name, a, b in (("sampler vs trainer (rollout/logprob_mismatch)", sampler, trainer),
                       ("sampler vs trainer with an fp32 output projection", sampler, trainer_head),
                       ("sampler vs fp32", sampler, fp32), ("trainer vs fp32", trainer, fp32),
                       ("trainer with an fp32 output projection vs fp32", trainer_head, fp32)):
        print(f"  {name}: {(a - b).abs().mean():.4f}")
    surprisal = -fp32
    print(f"  mean surprisal of the sampled tokens: {surprisal.mean():.2f} nats")
    for lo, hi in ((0, 0.1), (0.1, 1), (1, 3), (3, float("inf"))):
        chosen = (surprisal >= lo) & (surprisal < hi)
        if chosen.any():
            print(f"  tokens with -log p in [{lo}, {hi}): {int(chosen.sum())}, sampler vs trainer "
                  f"{(sampler - trainer)[chosen].abs().mean():.4f}")


if __name__ == "__main__":
    main()
