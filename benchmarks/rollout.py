"""Benchmark: generation speed of the rollout engine against Hugging Face `generate`, same model, same run.

    python benchmarks/rollout.py [--new-tokens 128] [--rounds 2]
    python benchmarks/rollout.py --profile     # where one grouped engine call goes (torch.profiler), nothing else

Workload: the embedded SmolLM2-135M (bf16 where supported) on 32 concurrent first-turn Sokoban prompts,
sampled at temperature 1.0. Two prompt sets: "grouped", 4 puzzles x 8 samples (how the engine runs SPA: groups
of samples that share a puzzle), and "distinct", 32 different puzzles. For each, HF `generate` on the 32
prompts in one batch is compared with the engine's `kv` backend on the same prompts; then whole multi-turn
episodes through the engine are timed (generated tokens over wall time, environment and parsing included).
The engine is also timed with the model's own forward in place of the lean decode step (`kv-plain`).

Each measurement runs in a fresh subprocess so its peak resident memory (ru_maxrss) is its own. It also
measures the memory bandwidth (a large tensor copy) and reports the decode roofline: bandwidth divided by
the bytes a decode step must read (all weights once, including the output embedding, plus the KV cache),
times the batch. This script must never be imported by the package or the tests.
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


def _prompts(tokenizer, kind: str) -> list[list[int]]:
    from spa_rl import envs
    from spa_rl.prompts import first_messages

    seeds = [s for s in range(4) for _ in range(8)] if kind == "grouped" else list(range(32))
    out = []
    for s in seeds:
        env = envs.make("sokoban", render="grid+coords").unwrapped
        obs, _ = env.reset(seed=1_000_000_000 + s)
        msgs = first_messages(env, obs, "grid+coords", "world-model", 5, 10, 256)
        text = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        out.append(tokenizer(text, add_special_tokens=False)["input_ids"])
    return out


def worker(phase: str, kind: str, new_tokens: int) -> dict:
    """One measurement in this process."""
    import torch

    from spa_rl.generation import SamplingConfig, make_backend
    from spa_rl.models import load_model

    lm = load_model()
    sampling = SamplingConfig(max_new_tokens=new_tokens, temperature=1.0)
    result = {"phase": phase, "kind": kind, "dtype": str(lm.dtype), "threads": torch.get_num_threads()}
    if phase in ("hf", "kv", "kv-plain"):
        prompts = _prompts(lm.tokenizer, kind)
        if phase == "kv-plain":  # the engine with the model's own forward instead of the lean decode step
            from spa_rl.generation import KVCacheBackend

            backend = KVCacheBackend(lm.model, lm.tokenizer, lean=False)
        else:
            backend = make_backend(phase, lm.model, lm.tokenizer)
        backend.generate(prompts[:2], SamplingConfig(max_new_tokens=4))  # warm-up
        t0 = time.perf_counter()
        gens = backend.generate(prompts, sampling, torch.Generator().manual_seed(0))
        elapsed = time.perf_counter() - t0
        result["tokens"] = sum(len(g.token_ids) for g in gens)
        result["prompt_tokens"] = sum(len(p) for p in prompts)
        t0 = time.perf_counter()  # prefill alone (one token), to separate the decode rate
        backend.generate(prompts, SamplingConfig(max_new_tokens=1), torch.Generator().manual_seed(0))
        prefill = time.perf_counter() - t0
        result["prefill_seconds"] = prefill
        result["decode_tok_per_s"] = (result["tokens"] - len(prompts)) / max(elapsed - prefill, 1e-9)
    else:  # whole episodes through the rollout engine
        from spa_rl.rollout import RolloutConfig, RolloutEngine

        groups = (4, 8) if kind == "grouped" else (32, 1)
        engine = RolloutEngine(RolloutConfig(env="sokoban", sampling=sampling, max_concurrent=32),
                               make_backend("kv", lm.model, lm.tokenizer), lm.tokenizer)
        t0 = time.perf_counter()
        episodes = engine.run([1_000_000_000 + s for s in range(groups[0])], group_size=groups[1], seed=0)
        elapsed = time.perf_counter() - t0
        result["tokens"] = sum(len(t.response_ids) for e in episodes for t in e.turns)
        result["turns"] = sum(len(e.turns) for e in episodes)
    result["seconds"] = elapsed
    result["tok_per_s"] = result["tokens"] / elapsed
    result["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    return result


def profile_engine(new_tokens: int) -> None:
    """torch.profiler over one `kv` call on the grouped prompts (after a warm-up call), top operations by time."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from spa_rl.generation import SamplingConfig, make_backend
    from spa_rl.models import load_model

    lm = load_model()
    prompts = _prompts(lm.tokenizer, "grouped")
    backend = make_backend("kv", lm.model, lm.tokenizer)
    sampling = SamplingConfig(max_new_tokens=new_tokens, temperature=1.0)
    backend.generate(prompts, sampling, torch.Generator().manual_seed(0))
    backend.reset()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        gens = backend.generate(prompts, sampling, torch.Generator().manual_seed(0))
    print(f"# {time.strftime('%Y-%m-%d %H:%M')}; one engine call, 32 grouped prompts, "
          f"{sum(len(g.token_ids) for g in gens)} tokens generated")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))


def bandwidth_gbs() -> float:
    """Memory bandwidth from copying a 1 GiB tensor (read + write), best of 5."""
    import torch

    src = torch.empty(2**30, dtype=torch.uint8)
    src.fill_(1)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - t0)
    return 2 * src.numel() / best / 1e9


def decode_bytes_per_step(batch: int, context: int) -> float:
    """Bytes a decode step reads: every weight once (bf16; the tied output embedding again), and the KV cache."""
    from transformers import AutoConfig

    from spa_rl.models import embedded_model_path

    cfg = AutoConfig.from_pretrained(embedded_model_path())
    h, inter, layers = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers
    kv = cfg.num_key_value_heads * (h // cfg.num_attention_heads)
    per_layer = h * h * 2 + h * kv * 2 + 3 * h * inter
    weights = layers * per_layer + cfg.vocab_size * h  # output projection reads the whole embedding
    kv_cache = layers * 2 * batch * context * kv
    return 2.0 * (weights + kv_cache)


def run(phase: str, kind: str, new_tokens: int) -> dict:
    out = subprocess.run([sys.executable, __file__, "--worker", phase, kind, str(new_tokens)],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--new-tokens", type=int, default=128, help="tokens per response (default 128)")
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds per pair (default 2)")
    parser.add_argument("--profile", action="store_true",
                        help="only profile one engine call on the grouped prompts and print the top operations")
    parser.add_argument("--worker", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker[0], args.worker[1], int(args.worker[2]))))
        return
    if args.profile:
        profile_engine(args.new_tokens)
        return
    print(f"# {time.strftime('%Y-%m-%d')}, {platform.machine()}, {os.cpu_count()} cores, Python "
          f"{platform.python_version()}; 32 concurrent Sokoban prompts, {args.new_tokens} new tokens, T=1.0; "
          f"median of {args.rounds} alternating rounds", flush=True)
    rows = {}
    for kind in ("grouped", "distinct"):
        results: dict[str, list[dict]] = {"hf": [], "kv": [], "kv-plain": []}
        for _ in range(args.rounds):
            for phase in ("hf", "kv", "kv-plain"):
                results[phase].append(run(phase, kind, args.new_tokens))
        rows[kind] = {p: statistics.median(r["tok_per_s"] for r in rs) for p, rs in results.items()}
        rows[kind]["rss"] = {p: max(r["peak_rss_gib"] for r in rs) for p, rs in results.items()}
        rows[kind]["prompt_tokens"] = results["kv"][0]["prompt_tokens"]
        rows[kind]["decode"] = {p: statistics.median(r["decode_tok_per_s"] for r in rs) for p, rs in results.items()}
        rows[kind]["prefill"] = {p: statistics.median(r["prefill_seconds"] for r in rs) for p, rs in results.items()}
        ep = run("episodes", kind, args.new_tokens)
        rows[kind]["episodes"] = ep
        print(f"{kind:>8}: HF generate {rows[kind]['hf']:7.1f} tok/s (peak {rows[kind]['rss']['hf']:.2f} GiB) | "
              f"engine kv {rows[kind]['kv']:7.1f} tok/s (peak {rows[kind]['rss']['kv']:.2f} GiB) | ratio "
              f"{rows[kind]['kv'] / rows[kind]['hf']:.2f}x | whole episodes {ep['tok_per_s']:.1f} tok/s over "
              f"{ep['turns']} turns (peak {ep['peak_rss_gib']:.2f} GiB)\n"
              f"          prefill of the 32 prompts: HF {rows[kind]['prefill']['hf']:.2f} s, kv "
              f"{rows[kind]['prefill']['kv']:.2f} s; decode only: HF {rows[kind]['decode']['hf']:.1f} tok/s, kv "
              f"{rows[kind]['decode']['kv']:.1f} tok/s\n"
              f"          engine without the lean decode step (the model's own forward): "
              f"{rows[kind]['kv-plain']:.1f} tok/s, decode only {rows[kind]['decode']['kv-plain']:.1f} tok/s "
              f"(lean step: {rows[kind]['kv'] / rows[kind]['kv-plain']:.2f}x)", flush=True)
    bw = bandwidth_gbs()
    context = rows["grouped"]["prompt_tokens"] // 32 + args.new_tokens // 2
    step_bytes = decode_bytes_per_step(32, context)
    roof = bw * 1e9 / step_bytes * 32
    print(f"memory bandwidth {bw:.1f} GB/s; a decode step at batch 32, context {context} reads "
          f"{step_bytes / 1e6:.0f} MB -> decode roofline {roof:,.0f} tok/s; decode only, the engine (grouped) "
          f"reaches {rows['grouped']['decode']['kv'] / roof:.1%} of it, HF generate "
          f"{rows['grouped']['decode']['hf'] / roof:.1%}")


if __name__ == "__main__":
    main()
