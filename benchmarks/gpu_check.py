"""The GPU path in one command: is spa-rl right on this GPU, how fast is it, and what would the paper's run cost?

    python benchmarks/gpu_check.py                          # one CUDA GPU: about 8 minutes on an H100
    python benchmarks/gpu_check.py --shapes 0.5b            # only the Qwen2.5-0.5B-shaped speed checks
    python benchmarks/gpu_check.py --device cpu --tiny      # the dry run the test suite does (seconds)

Prints one line per check (PASS / FAIL / a number) and writes them all as JSON (`--out`, default
gpu_check.json). Correctness, on a model with random weights shaped like SmolLM2-135M (`--tiny`: two layers):
  - mismatch: the rollout engine's log-probs of the tokens it sampled (both decoders, `kv` and HF `generate`)
    against the training forward pass of the same weights, per sampled token, in fp32 (must agree: the same
    maths) and in bf16 (reported: random weights give the flattest distributions, the worst case);
  - update: the gradient of one PPO update (GAE with the critic) and one GRPO update on a fixed batch, on this
    device against the CPU, in fp32 (relative difference of the whole gradient);
  - resume: a run killed after its first step on this device resumes to the weights of one run straight through.
Speed, on random weights shaped like Qwen2.5-0.5B and -1.5B (the same shapes cost the same; random weights never
stop early, so every response runs to the token limit: an upper bound on a trained policy's cost):
  - rollout: tokens per second of the engine and of HF `generate` on the paper's batch (256 first-turn prompts);
  - one PPO step with the critic at the paper's shape (32 puzzles x 8, 25% of the groups kept, `--new-tokens`),
    seconds per phase, peak GPU memory, and the update's share of this GPU's measured bf16 matmul peak (6N FLOPs
    per trained token per model);
  - the projected wall time of the paper preset (1,000 steps, validation of 128 x 8 every 10) beside the
    paper's "about 12 hours on a single GPU".
Needs PyTorch, transformers, accelerate, peft, numpy and spa-rl's other dependencies (it lists the missing ones
first: copy their wheels over and `pip install --no-index --find-links WHEELS ...`); the tokenizer is carried
in `benchmarks/assets/smollm2-tokenizer`; nothing is downloaded. This script must never be imported by the
package.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import platform
import sys
import tempfile
import time
from pathlib import Path

REQUIRED = ("torch", "transformers", "accelerate", "peft", "numpy", "safetensors", "gymnasium", "rich", "matplotlib",
            "jinja2", "spa_rl")
TOKENIZER = Path(__file__).with_name("assets") / "smollm2-tokenizer"
SHAPES = {  # model_type, hidden, intermediate, layers, heads, kv heads, vocabulary (None: the tokenizer's)
    "tiny": ("llama", 64, 128, 2, 4, 2, None),
    "135m": ("llama", 576, 1536, 30, 9, 3, None),
    "0.5b": ("qwen2", 896, 4864, 24, 14, 2, 151936),
    "1.5b": ("qwen2", 1536, 8960, 28, 12, 2, 151936),
}
PAPER = {"steps": 1000, "puzzles": 32, "samples": 8, "keep_ratio": 0.25, "eval_every": 10, "eval_episodes": 1024,
         "hours": 12.0}


def missing_modules() -> list[str]:
    return [m for m in REQUIRED if importlib.util.find_spec(m) is None]


def build_model(shape: str, directory: Path, tokenizer) -> Path:
    """A model of `shape` with random weights (seed 0) and the carried tokenizer, saved where `load_model` reads."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    kind, hidden, inter, layers, heads, kv, vocab = SHAPES[shape]
    cls, model_cls = (LlamaConfig, LlamaForCausalLM) if kind == "llama" else (Qwen2Config, Qwen2ForCausalLM)
    config = cls(vocab_size=vocab or len(tokenizer), hidden_size=hidden, intermediate_size=inter,
                 num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv,
                 max_position_embeddings=8192, tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
                 eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    model = model_cls(config)
    path = directory / shape
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


# ------------------------------------------------------------------------------------------ correctness
def check_mismatch(path: Path, device: str, dtype: str, backend: str, new_tokens: int) -> float:
    """Mean |sampler log p - training forward log p| per sampled token, 4 puzzles x 4 samples."""
    import torch

    from spa_rl.generation import SamplingConfig, make_backend
    from spa_rl.models import load_model
    from spa_rl.rl.episodes import build_trajectory
    from spa_rl.rl.models import PolicyModel
    from spa_rl.rollout import RolloutConfig, RolloutEngine

    lm = load_model(str(path), device, dtype)
    engine = RolloutEngine(RolloutConfig(env="sokoban", sampling=SamplingConfig(max_new_tokens=new_tokens)),
                           make_backend(backend, lm.model, lm.tokenizer), lm.tokenizer)
    episodes = engine.run(list(range(4)), group_size=4, seed=0)
    policy = PolicyModel(lm.model.eval())
    diffs = []
    with torch.no_grad():
        for e in episodes:
            t = build_trajectory(e, lm.tokenizer, 0)
            ids = torch.tensor([t.ids], device=lm.model.device)
            keep = torch.tensor([t.sampled[1:]], dtype=torch.bool, device=ids.device)
            if not keep.any():
                continue
            logp, _ = policy(ids, torch.ones_like(ids), keep)
            sampler = torch.tensor(t.rollout_logprobs[1:], device=ids.device)[keep[0]]
            diffs.append((logp.float() - sampler).abs())
    return float(torch.cat(diffs).mean())


def update_gradient(path: Path, device: str, advantage: str) -> list:
    """The actor's (and critic's) gradient of one update on a fixed batch of 8 episodes (scores 1 and 0 in turn),
    as CPU fp32 tensors."""
    import torch

    from spa_rl.models import load_model
    from spa_rl.rl.advantages import ESTIMATORS
    from spa_rl.rl.config import RLConfig
    from spa_rl.rl.episodes import Trajectory
    from spa_rl.rl.models import PolicyModel, ValueModel
    from spa_rl.rl.trainer import Batch, Learners, estimate_advantages, update
    from spa_rl.training import Trainable, make_accelerator, resolve_precision

    generator = torch.Generator().manual_seed(0)
    trajectories = []
    for i in range(8):
        ids = torch.randint(10, 40000, (48,), generator=generator).tolist()
        mask = [0] * 16 + [1] * 12 + [0] * 8 + [1] * 12
        rewards = [0.0] * 47 + [float(i % 2)]
        trajectories.append(Trajectory(ids, mask, mask, [0.0] * 48, rewards, i // 2, float(i % 2)))
    config = RLConfig.make(out="x", advantage=advantage, keep_ratio=1.0, puzzles_per_step=4, samples_per_puzzle=2,
                           minibatch_size=8, micro_batch_size=4, dtype="fp32", entropy_coef=0.001)
    accelerator = make_accelerator(device)
    precision = resolve_precision("fp32", device, training=True)
    common = dict(total_steps=1, schedule="constant", max_grad_norm=1e9)
    actor = Trainable(PolicyModel(load_model(str(path), device, "fp32").model.eval()), precision, accelerator,
                      lr=1e-5, **common)
    critic = None
    if ESTIMATORS[advantage].uses_critic:
        value_model = ValueModel.from_causal_lm(load_model(str(path), device, "fp32").model).to(device).eval()
        with torch.no_grad():  # a head that is not zero (drawn on the CPU: the same on every device), so GAE is not 0
            head = value_model.value_head.weight
            head.copy_(torch.empty(head.shape).normal_(0, 0.1, generator=torch.Generator().manual_seed(1)))
        critic = Trainable(value_model, precision, accelerator, lr=1e-5, **common)
    grads: list = []
    for trainable in (actor, critic):
        if trainable is not None:
            real = trainable.step
            trainable.step = (lambda t=trainable, r=real: grads.extend(
                p.grad.detach().float().cpu().clone() for p in t.params if p.grad is not None) or r())
    batch = Batch.of(trajectories, pad_id=0)
    learners = Learners(actor, critic, None, None, None, accelerator, False)
    update(batch, trajectories, config, learners, 0, critic_stats=estimate_advantages(batch, config, learners))
    return grads


def relative_difference(a: list, b: list) -> float:
    import torch

    x, y = torch.cat([g.flatten() for g in a]), torch.cat([g.flatten() for g in b])
    return float((x - y).norm() / y.norm().clamp(min=1e-30))


def check_resume(path: Path, device: str, work: Path) -> float:
    """Largest weight difference between a run killed after its first step and resumed, and one run straight."""
    from safetensors.torch import load_file

    import spa_rl.rl.trainer as trainer
    from spa_rl.rl.config import RLConfig

    def config(out: str):
        return RLConfig.make(out=out, model=str(path), device=device, env="frozenlake-det", steps=2,
                             puzzles_per_step=2, samples_per_puzzle=2, keep_ratio=1.0, minibatch_size=4,
                             max_new_tokens=8, eval_every=0, eval_before=False, eval_puzzles=1, eval_samples=1,
                             save_every=1, tensorboard=False, dtype="fp32", skip_uniform_steps=False,
                             actor_lr=1e-4)

    trainer.train_rl(config(str(work / "straight")), quiet=True)
    original = trainer.rl_step
    calls = {"n": 0}

    def killed(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    trainer.rl_step = killed
    try:
        trainer.train_rl(config(str(work / "resumed")), quiet=True)
    except KeyboardInterrupt:
        pass
    finally:
        trainer.rl_step = original
    trainer.train_rl(config(str(work / "resumed")), quiet=True)
    a = load_file(str(work / "straight" / "model" / "model.safetensors"))
    b = load_file(str(work / "resumed" / "model" / "model.safetensors"))
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a) if a.keys() == b.keys() else math.inf


# ------------------------------------------------------------------------------------------ speed
def matmul_peak(device: str, dtype_name: str, n: int) -> float:
    import torch

    dtype = torch.bfloat16 if dtype_name == "bf16" else torch.float32
    a = torch.randn(n, n, dtype=dtype, device=device)
    b = torch.randn(n, n, dtype=dtype, device=device)
    torch.mm(a, b)
    sync(device)
    best = math.inf
    for _ in range(10):
        t0 = time.perf_counter()
        for _ in range(5):
            torch.mm(a, b)
        sync(device)
        best = min(best, (time.perf_counter() - t0) / 5)
    return 2 * n ** 3 / best


def rollout_speed(path: Path, device: str, dtype: str, prompts: int, new_tokens: int) -> dict:
    """Tokens per second of the engine's decoder and of HF `generate` on `prompts` first-turn prompts."""
    import torch

    from spa_rl.generation import SamplingConfig, make_backend
    from spa_rl.models import load_model
    from spa_rl.rollout import RolloutConfig, RolloutEngine

    lm = load_model(str(path), device, dtype)
    sampling = SamplingConfig(max_new_tokens=new_tokens)
    engine = RolloutEngine(RolloutConfig(env="sokoban", sampling=sampling), make_backend("kv", lm.model, lm.tokenizer),
                           lm.tokenizer)
    batch = [engine._start(seed, 0).prompt_ids for seed in range(prompts)]
    out = {}
    for name in ("kv", "hf"):
        backend = make_backend(name, lm.model, lm.tokenizer)
        backend.generate(batch[:2], SamplingConfig(max_new_tokens=4), torch.Generator().manual_seed(0))  # warm-up
        sync(device)
        t0 = time.perf_counter()
        generations = backend.generate(batch, sampling, torch.Generator().manual_seed(0))
        sync(device)
        elapsed = time.perf_counter() - t0
        out[name] = sum(len(g.token_ids) for g in generations) / elapsed
        if hasattr(backend, "reset"):
            backend.reset()
    return out


def ppo_step_speed(path: Path, device: str, work: Path, puzzles: int, samples: int, new_tokens: int) -> dict:
    """One PPO step with the critic at the given shape through `spa train`'s loop: seconds per phase, tokens,
    peak GPU memory."""
    import torch

    from spa_rl.io import read_jsonl
    from spa_rl.rl.config import RLConfig
    from spa_rl.rl.trainer import train_rl
    from spa_rl.training import resolve_precision

    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    out = work / f"ppo-{path.name}"
    config = RLConfig.make(out=str(out), model=str(path), device=device, env="sokoban", steps=1,
                           puzzles_per_step=puzzles, samples_per_puzzle=samples, keep_ratio=PAPER["keep_ratio"],
                           minibatch_size=max(1, int(puzzles * PAPER["keep_ratio"])) * samples,
                           max_new_tokens=new_tokens, eval_every=0, eval_before=False, eval_puzzles=1,
                           eval_samples=1, save_every=0, tensorboard=False, skip_uniform_steps=False)
    t0 = time.perf_counter()
    train_rl(config, quiet=True)
    wall = time.perf_counter() - t0
    (row,) = [r for r in read_jsonl(out / "metrics.jsonl") if "time/update" in r]
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.startswith("cuda") else None
    return {"generate_s": row["time/generate"], "score_s": row["time/score"], "update_s": row["time/update"],
            "step_s": row["time/generate"] + row["time/score"] + row["time/update"], "wall_s": wall,
            "generated_tokens": row["perf/generated_tokens"], "trained_tokens": row["perf/trained_tokens"],
            "peak_gpu_gib": peak,
            "precision": resolve_precision(config.model.dtype, device, training=True).name}


# ------------------------------------------------------------------------------------------ the check
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda", help="cuda (default; pick a GPU with CUDA_VISIBLE_DEVICES) or "
                        "cpu (a dry run)")
    parser.add_argument("--tiny", action="store_true", help="tiny models and batches: a dry run in seconds")
    parser.add_argument("--shapes", default="0.5b,1.5b", help="speed checks' model shapes (default 0.5b,1.5b)")
    parser.add_argument("--new-tokens", type=int, default=400, help="token limit a turn (default 400, the paper's)")
    parser.add_argument("--skip-speed", action="store_true", help="correctness only")
    parser.add_argument("--out", default="gpu_check.json", help="where the results go as JSON")
    args = parser.parse_args()

    missing = missing_modules()
    if missing:
        print(f"missing: {', '.join(missing)}. Copy their wheels here and run pip install --no-index "
              f"--find-links WHEELS {' '.join(m for m in missing if m != 'spa_rl')}"
              f"{' and pip install --no-deps -e .' if 'spa_rl' in missing else ''}", file=sys.stderr)
        sys.exit(2)
    import torch
    import transformers
    from transformers import AutoTokenizer

    from spa_rl.models import load_model

    started = time.perf_counter()
    device = args.device
    if device not in ("cuda", "cpu"):
        print("--device is cuda or cpu (pick a GPU with CUDA_VISIBLE_DEVICES)", file=sys.stderr)
        sys.exit(2)
    if device.startswith("cuda") and not torch.cuda.is_available():
        print("no CUDA device here: run on a GPU machine, or pass --device cpu --tiny for the dry run", file=sys.stderr)
        sys.exit(2)
    cuda = device.startswith("cuda")
    results: dict = {"date": time.strftime("%Y-%m-%d %H:%M"), "device": device,
                     "gpu": torch.cuda.get_device_name(device) if cuda else None, "machine": platform.machine(),
                     "torch": torch.__version__, "transformers": transformers.__version__, "tiny": args.tiny,
                     "checks": {}}
    bf16 = (torch.cuda.is_bf16_supported() if cuda else True)
    print(f"# gpu_check {results['date']}: {results['gpu'] or 'CPU'}, torch {torch.__version__}, transformers "
          f"{transformers.__version__}{' (tiny dry run)' if args.tiny else ''}", flush=True)

    def record(name: str, value, ok: bool | None = None, note: str = "") -> None:
        results["checks"][name] = {"value": value, "pass": ok, "note": note}
        status = "" if ok is None else ("PASS " if ok else "FAIL ")
        shown = f"{value:.4g}" if isinstance(value, float) else value
        print(f"{status}{name}: {shown}{f'  ({note})' if note else ''}", flush=True)

    def guarded(name: str, check) -> None:
        """Run one check; an exception is its FAIL (with the message), not the end of the whole run."""
        try:
            check()
        except Exception as e:  # every failure is reported, and the other checks still run
            record(name, f"{type(e).__name__}: {' '.join(str(e).split())[:300]}", False, "raised")

    tokenizer = AutoTokenizer.from_pretrained(TOKENIZER)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        small = build_model("tiny" if args.tiny else "135m", work, tokenizer)
        new = 8 if args.tiny else 64

        def mismatch(backend: str, dtype: str) -> None:
            value = check_mismatch(small, device, dtype, backend, new)
            if dtype == "fp32":
                record(f"mismatch/fp32/{backend}", value, value <= 1e-3, "sampler vs training forward, nats a token")
            else:
                record(f"mismatch/bf16/{backend}", value, None, "random weights: the flattest distributions, the "
                       "worst case")

        def gradient(advantage: str) -> None:
            value = relative_difference(update_gradient(small, device, advantage), update_gradient(small, "cpu",
                                                                                                  advantage))
            record(f"update/{advantage}", value, value <= 1e-3, f"gradient on {device} vs CPU, relative, fp32")

        def resumed() -> None:
            value = check_resume(small, device, work)
            record("resume", value, value <= (1e-5 if not cuda else 1e-3), "largest weight difference, resumed vs "
                   "straight")

        for backend in ("kv", "hf"):
            for dtype in ("fp32", "bf16") if bf16 else ("fp32",):
                guarded(f"mismatch/{dtype}/{backend}", lambda b=backend, d=dtype: mismatch(b, d))
        for advantage in ("gae", "grpo"):
            guarded(f"update/{advantage}", lambda a=advantage: gradient(a))
        guarded("resume", resumed)

        if not args.skip_speed:
            shapes = ["tiny"] if args.tiny else [s.strip() for s in args.shapes.split(",") if s.strip()]
            dtype = "bf16" if bf16 else "fp32"
            peak = matmul_peak(device, dtype, 256 if args.tiny else 8192)
            record(f"speed/matmul_peak_{dtype}_tflops", peak / 1e12)
            puzzles, samples = (2, 2) if args.tiny else (PAPER["puzzles"], PAPER["samples"])
            new_tokens = 8 if args.tiny else args.new_tokens

            def speed(shape: str) -> None:
                path = build_model(shape, work, tokenizer)
                params = sum(p.numel() for p in load_model(str(path), "cpu", "fp32").model.parameters())
                rates = rollout_speed(path, device, dtype, puzzles * samples, min(new_tokens, 128))
                record(f"speed/{shape}/rollout_tokens_per_s/engine", rates["kv"])
                record(f"speed/{shape}/rollout_tokens_per_s/hf_generate", rates["hf"], None,
                       f"engine {rates['kv'] / rates['hf']:.2f}x")
                step = ppo_step_speed(path, device, work, puzzles, samples, new_tokens)
                for key in ("generate_s", "score_s", "update_s", "step_s", "generated_tokens", "trained_tokens"):
                    record(f"speed/{shape}/ppo_step/{key}", float(step[key]))
                if step["peak_gpu_gib"] is not None:
                    record(f"speed/{shape}/ppo_step/peak_gpu_gib", step["peak_gpu_gib"])
                share = 6 * params * step["trained_tokens"] * 2 / max(step["update_s"], 1e-9) / peak
                record(f"speed/{shape}/ppo_step/update_share_of_peak", share, None,
                       f"6N a trained token, actor+critic, {step['precision']}")
                evals = PAPER["steps"] // PAPER["eval_every"]
                eval_s = step["generate_s"] * PAPER["eval_episodes"] / (puzzles * samples)
                hours = (PAPER["steps"] * step["step_s"] + evals * eval_s) / 3600
                record(f"speed/{shape}/paper_preset_hours", hours, None,
                       f"responses at the {new_tokens}-token limit: an upper bound; the paper: about "
                       f"{PAPER['hours']:g} h on one GPU")

            for shape in shapes:
                guarded(f"speed/{shape}", lambda shape=shape: speed(shape))
    results["elapsed_s"] = time.perf_counter() - started
    Path(args.out).write_text(json.dumps(results, indent=2))
    failed = [k for k, v in results["checks"].items() if v["pass"] is False]
    print(f"# {'FAILED: ' + ', '.join(failed) if failed else 'every correctness check passed'} in "
          f"{results['elapsed_s'] / 60:.1f} minutes; written to {args.out}")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
