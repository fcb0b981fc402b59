"""World-model SFT (SPEC §5): fine-tune on self-play turns, with the loss on the assistant's turn only.

Loss variants: `full` (paper Eq. 1–2: every token of the assistant turn, the true `<observation>` and
`<prediction>` included, up to and including its end-of-turn token; system, user and history tokens never)
and `masked` (the ablation: the contents of `<observation>` and `<prediction>` get no loss, their tags do).
Loss tokens are found by character offsets in the tokenisation of the whole chat-templated conversation, so
masks are exact for any chat template.

Why our own loop and not TRL's `SFTTrainer`: TRL expresses "completion only" and "assistant only" losses,
but not a mask that excludes spans *inside* the completion (the masked ablation), and resuming it mid-epoch
from our atomic checkpoints would need as much code as this loop. The loop is short: AdamW, cosine schedule
with warm-up, gradient accumulation to a global batch, bf16 with fp32 master weights where supported, full
fine-tune or LoRA (peft), validation loss every epoch, metrics to JSONL/TensorBoard, and checkpoints written
atomically that a rerun resumes from. It must never train on a token outside the assistant turn.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from spa_rl.errors import SpaError
from spa_rl.generation import stop_token_ids
from spa_rl.models import next_token_logits, right_padded_batch
from spa_rl.selfplay import read_jsonl

LOSSES = ("full", "masked")
_HIDDEN = re.compile(r"<(observation|prediction)>(.*?)</\1>", re.DOTALL)


@dataclass
class SFTConfig:
    """World-model SFT settings (defaults: the paper's, SPEC §5)."""

    data: str
    """Dataset directory written by `spa collect` (train.jsonl, val.jsonl, manifest.json)."""
    out: str
    """Output directory: the fine-tuned model (HF format, or a LoRA adapter), checkpoints, metrics."""
    model: str = "smollm2-135m"
    """Model to fine-tune: embedded name, local directory or HF id in the local cache."""
    loss: str = "full"
    """`full` (the paper's SPA) or `masked` (observation/prediction contents get no loss)."""
    epochs: int = 5
    """Passes over the training set (the paper: 5; 1 epoch is much worse)."""
    lr: float = 1e-4
    """Peak learning rate of AdamW."""
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 0.01
    warmup_ratio: float = 0.1
    """Share of optimizer steps spent warming the learning rate up, then cosine decay to 0."""
    batch_size: int = 16
    """Global batch: turns (dataset rows) per optimizer step; with packing, whole trajectories are added until
    the batch holds at least this many turns."""
    micro_batch_size: int = 4
    """At most this many sequences per forward/backward pass (gradient accumulation makes up the global batch)."""
    micro_batch_tokens: int = 4096
    """At most this many tokens (padding included) per pass, which bounds activation memory: packed trajectories
    are long, and four 2,000-token sequences in one pass took 20 GB here."""
    max_padding: float = 0.1
    """A micro-batch takes another sequence only while padding stays at most this share of its tokens. Padding
    is computed and thrown away (one sequence per turn trained at 263 tokens/s in random micro-batches of 4 with
    25% padding, and at 362 with this cap, before masks were dropped; docs/benchmarks.md)."""
    max_length: int = 2048
    """Samples longer than this (in tokens) are dropped and counted."""
    max_train_samples: int = 0
    """Train on at most this many training rows, a random subset fixed by `seed` (0: all). Compares datasets
    at an equal number of transitions."""
    pack: bool = True
    """Train on each trajectory as one sequence with the loss on all its turns (same loss terms and contexts as
    one sequence per turn, ~3x fewer tokens for multi-turn data). A packed trajectory longer than `max_length`
    falls back to one sequence per turn."""
    lora: bool = False
    """Train a LoRA adapter instead of all weights."""
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    dtype: str = "auto"
    """`bf16`: bf16 weights, activations and gradients with fp32 master weights and optimizer state
    (`MasterWeights`); `bf16-autocast`: fp32 weights under bf16 autocast (slower, fp32 residual stream); `fp32`;
    `auto`: `bf16` on GPUs and on CPUs with native bf16 instructions, else `fp32`."""
    device: str = "auto"
    seed: int = 0
    env: str | None = None
    """If set, the dataset must have been collected on this env."""
    save_every: int = 0
    """Also checkpoint every N optimizer steps (0: at epoch ends only)."""
    save_epochs: bool = True
    """Checkpoint at the end of every epoch (resumable); False saves only the final model."""
    tensorboard: bool = True
    wandb_project: str | None = None
    extra: dict = field(default_factory=dict)


# ------------------------------------------------------------------------------------------ data
def load_dataset(data_dir: str, expected_env: str | None = None) -> tuple[list[dict], list[dict], dict]:
    """(train rows, validation rows, manifest) of a self-play dataset, checked."""
    root = Path(data_dir)
    manifest_path = root / "manifest.json"
    if not manifest_path.is_file():
        raise SpaError(f"{root} is not a dataset (no manifest.json): create one with `spa collect --out {root}`")
    try:
        manifest = json.loads(manifest_path.read_text())
    except json.JSONDecodeError as e:
        raise SpaError(f"{manifest_path} is corrupt ({e.msg}): collect the data again") from None
    if expected_env is not None and manifest.get("env") != expected_env:
        raise SpaError(f"{root} was collected on {manifest.get('env')!r}, not {expected_env!r}: use a dataset of "
                       f"{expected_env} or drop --env")
    train = read_jsonl(root / "train.jsonl")
    val = read_jsonl(root / "val.jsonl") if (root / "val.jsonl").is_file() else []
    if not train:
        raise SpaError(f"{root / 'train.jsonl'} has no rows: collect more data")
    for name, rows in (("train.jsonl", train), ("val.jsonl", val)):
        for n, row in enumerate(rows, 1):
            if not isinstance(row.get("prompt"), list) or not isinstance(row.get("completion"), list) \
                    or not row["completion"] or row["completion"][-1].get("role") != "assistant":
                raise SpaError(f"{root / name} row {n} is not a prompt/completion chat sample")
            env = row.get("meta", {}).get("env")
            if env is not None and env != manifest.get("env"):
                raise SpaError(f"{root / name} row {n} is from env {env!r} but the dataset is "
                               f"{manifest.get('env')!r}: datasets must not mix envs")
    return train, val, manifest


def row_sequence(row: dict) -> tuple[list[dict], list[int]]:
    """(messages, assistant indices with loss) of one dataset row on its own: its reply gets the loss."""
    messages = row["prompt"] + row["completion"]
    return messages, [len(messages) - 1]


def encode_sample(tokenizer: Any, row: dict, loss: str) -> tuple[list[int], list[int]]:
    """(input ids, loss mask) of one sample: the mask is 1 on the assistant turn's tokens (see module doc)."""
    messages, targets = row_sequence(row)
    return encode_conversation(tokenizer, messages, loss, targets)


def encode_conversation(tokenizer: Any, messages: list[dict], loss: str,
                        targets: list[int]) -> tuple[list[int], list[int]]:
    """(input ids, loss mask) of a chat conversation with the loss on the assistant messages at `targets`."""
    if loss not in LOSSES:
        raise SpaError(f"unknown loss {loss!r}: use one of {', '.join(LOSSES)}")
    full_text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)
    enc = tokenizer(full_text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    mask = [0] * len(ids)
    stop_ids = set(stop_token_ids(None, tokenizer))
    for k in targets:
        prompt_text = tokenizer.apply_chat_template(messages[:k], tokenize=False, add_generation_prompt=True)
        turn_text = tokenizer.apply_chat_template(messages[:k + 1], tokenize=False, add_generation_prompt=False)
        content = messages[k]["content"]
        if not (full_text.startswith(prompt_text) and full_text.startswith(turn_text)):
            raise SpaError("this chat template does not render a conversation as prompt + reply; SFT needs it to")
        start, turn_end = len(prompt_text), len(turn_text)
        at = full_text.find(content, start, turn_end)
        if at < 0:
            raise SpaError("the chat template changed the assistant text; SFT needs it verbatim")
        end = at + len(content)
        hidden = [(m.start(2) + at, m.end(2) + at) for m in _HIDDEN.finditer(content)] if loss == "masked" else []
        for i, (a, b) in enumerate(offsets):
            if a < start:
                continue
            if a >= turn_end:  # never past this turn, even if the template's end-of-turn is not a stop token
                break
            if a >= end:  # after the content: the end-of-turn token(s) up to and including the stop token
                mask[i] = 1
                if ids[i] in stop_ids:
                    break
                continue
            if any(a < h_end and b > h_start for h_start, h_end in hidden):
                continue
            mask[i] = 1
    return ids, mask


def pack_trajectories(rows: list[dict]) -> list[tuple[list[dict], list[int]]]:
    """(messages, assistant indices with loss) per training sequence: the rows of one trajectory become one
    sequence, the longest row's conversation with the loss on every turn that has a row of its own.

    A turn's row is its conversation so far (earlier turns rewritten) plus its reply, so it is a prefix of the
    trajectory's last row: one forward pass over the last row gives every turn's loss with the same context as
    its own row, at a fraction of the tokens. Rows that are not such a prefix (other datasets) stay separate.
    """
    groups: dict[str, list[dict]] = {}
    loose: list[tuple[list[dict], list[int]]] = []
    for row in rows:
        key = row.get("meta", {}).get("trajectory")
        if key is None:
            loose.append(row_sequence(row))
        else:
            groups.setdefault(key, []).append(row)
    packed = []
    for members in groups.values():
        longest = max(members, key=lambda r: len(r["prompt"]) + len(r["completion"]))
        messages, _ = row_sequence(longest)
        targets = set()
        for row in members:
            conv, (last,) = row_sequence(row)
            if conv == messages[:len(conv)]:
                targets.add(last)
            else:
                loose.append((conv, [last]))
        packed.append((messages, sorted(targets)))
    return packed + loose


def _epoch_batches(turns: list[int], batch_size: int, seed: int) -> list[list[int]]:
    """One epoch's global batches: sequences in a seeded random order, grouped until each batch holds at least
    `batch_size` turns with loss (one sequence per turn: exactly `batch_size` sequences; packed trajectories:
    whole trajectories, so about `batch_size` turns)."""
    order = list(range(len(turns)))
    np.random.default_rng(seed).shuffle(order)
    batches: list[list[int]] = [[]]
    count = 0
    for i in order:
        if count >= batch_size:
            batches.append([])
            count = 0
        batches[-1].append(i)
        count += turns[i]
    return batches


def _batches(samples: list[tuple[list[int], list[int]]], order: list[int], size: int,
             max_tokens: int = 0, max_padding: float = 1.0) -> list[list[int]]:
    """`order` cut into runs of at most `size` sequences, (if set) `max_tokens` padded tokens (a longer
    sequence goes alone), and at most a `max_padding` share of padding in each run."""
    out: list[list[int]] = []
    for i in order:
        if out and len(out[-1]) < size:
            lengths = [len(samples[j][0]) for j in [*out[-1], i]]
            padded = len(lengths) * max(lengths)
            if (not max_tokens or padded <= max_tokens) and padded - sum(lengths) <= max_padding * padded:
                out[-1].append(i)
                continue
        out.append([i])
    return out


def token_nll_sum(model: Any, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """Sum of next-token NLL over the batch's loss tokens, and their count (`models.next_token_logits`
    applies the output projection to the loss positions only)."""
    labels = batch["labels"][:, 1:]
    keep = labels != -100
    logits = next_token_logits(model, batch["input_ids"], batch["attention_mask"], keep).float()
    return torch.nn.functional.cross_entropy(logits, labels[keep], reduction="sum"), int(keep.sum())


# ------------------------------------------------------------------------------------------ checkpoints
def _save_dir_atomically(target: Path, write) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        write(tmp)
        old = None
        if target.exists():
            old = target.with_name(f".{target.name}-old")
            if old.exists():
                shutil.rmtree(old)
            os.replace(target, old)
        os.replace(tmp, target)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _save_model(model: Any, tokenizer: Any, path: Path, meta: dict,
                state_dict: dict[str, torch.Tensor] | None = None) -> None:
    """Save the model (or its adapter) in HF format; `state_dict` replaces the model's own weights (the fp32
    master copies of a bf16 run, so the files and the config say float32)."""
    peft_config = getattr(model, "peft_config", None)
    if peft_config:  # name the base as the user did (e.g. "smollm2-135m"), so the adapter loads anywhere
        for cfg in peft_config.values():
            cfg.base_model_name_or_path = meta.get("base_model", cfg.base_model_name_or_path)
    model.save_pretrained(path, state_dict=state_dict)
    config_file = path / "config.json"
    if state_dict is not None and config_file.is_file():  # save_pretrained names the model's dtype, not the files'
        config_json = json.loads(config_file.read_text())
        config_json["dtype"] = "float32"
        config_file.write_text(json.dumps(config_json, indent=2, sort_keys=True) + "\n")
    tokenizer.save_pretrained(path)
    (path / "spa_training.json").write_text(json.dumps(meta, indent=2))


# ------------------------------------------------------------------------------------------ training
class MasterWeights:
    """bf16 training with fp32 master weights, as Megatron-LM and DeepSpeed do it: the model's weights,
    activations and gradients are bf16, so forward and backward have no casts and move half the bytes; after
    every backward the gradients are added into fp32 copies (accumulation over micro-batches stays exact), the
    optimizer updates fp32 weights and keeps fp32 state, and the model gets the update rounded to bf16.

    Against bf16 autocast over fp32 weights (which re-casts every weight in every pass and keeps the residual
    stream in fp32), measured on this CPU (docs/benchmarks.md): 1.0-1.1x the tokens/s (attention, which both
    run in bf16, takes much of the step) and the same losses. `MasterWeights(model)` copies the trainable
    parameters at full precision and then casts the model, so build it on the fp32 model.
    Checkpoints are written from the fp32 copies (`state_dict`), so a resumed run continues from the exact
    weights. It must never let the optimizer see a bf16 tensor.
    """

    def __init__(self, model: torch.nn.Module, dtype: torch.dtype = torch.bfloat16) -> None:
        self.model_params = [p for p in model.parameters() if p.requires_grad]
        self.params = [torch.nn.Parameter(p.detach().float().clone()) for p in self.model_params]
        for p in model.parameters():  # not buffers: RoPE's inv_freq stays fp32, as from_pretrained keeps it
            p.data = p.data.to(dtype)

    def accumulate(self) -> None:
        """Add the model's gradients into the fp32 copies and free them (call after every backward)."""
        for master, p in zip(self.params, self.model_params, strict=True):
            if p.grad is not None:
                if master.grad is None:
                    master.grad = p.grad.float()
                else:
                    master.grad.add_(p.grad)
                p.grad = None

    @torch.no_grad()
    def write_back(self) -> None:
        """Copy the fp32 weights into the model (call after every optimizer step)."""
        for master, p in zip(self.params, self.model_params, strict=True):
            p.copy_(master)

    def state_dict(self, model: torch.nn.Module) -> dict[str, torch.Tensor]:
        """The model's state dict with the fp32 copies in place of its trainable weights (tied names too)."""
        masters = {id(p): master.detach() for master, p in zip(self.params, self.model_params, strict=True)}
        state = model.state_dict()
        for name, p in model.named_parameters(remove_duplicate=False):
            if id(p) in masters:
                state[name] = masters[id(p)]
        return state


def sft_step(model: Any, batches: list[dict[str, torch.Tensor]], params: list[torch.Tensor], optimizer: Any,
             master: MasterWeights | None = None, backward: Any = torch.Tensor.backward,
             autocast: Any = contextlib.nullcontext) -> tuple[float, float]:
    """One optimizer step over a global batch given as micro-batches (`right_padded_batch`, on the model's
    device): the mean NLL over all their loss tokens, gradients accumulated (into `master`'s fp32 copies if
    set), clipped to norm 1.0, one optimizer update. Returns (mean loss, gradient norm before clipping).
    `backward`/`autocast` let `accelerate` take part. `spa sft` and `benchmarks/sft.py` both run this."""
    n_tokens = max(sum(int((b["labels"][:, 1:] != -100).sum()) for b in batches), 1)
    total = 0.0
    for batch in batches:
        with autocast():
            nll, _ = token_nll_sum(model, batch)
        backward(nll / n_tokens)
        if master:
            master.accumulate()
        total += nll.item()
    grad_norm = float(torch.nn.utils.clip_grad_norm_(params, 1.0))
    optimizer.step()
    if master:
        master.write_back()
    optimizer.zero_grad(set_to_none=True)
    return total / n_tokens, grad_norm


def adamw(params: list[torch.nn.Parameter], **kwargs: Any) -> torch.optim.AdamW:
    """AdamW, with PyTorch's fused kernel where it exists (CPU and CUDA): one pass over the parameters instead
    of a dozen operations per tensor. Same update rule and state layout, so checkpoints resume either way."""
    if all(p.device.type in ("cpu", "cuda") and p.dtype in (torch.float32, torch.bfloat16) for p in params):
        try:
            return torch.optim.AdamW(params, fused=True, **kwargs)
        except RuntimeError:  # PyTorch before 2.4 fuses on CUDA only
            pass
    return torch.optim.AdamW(params, **kwargs)


def train_sft(config: SFTConfig, quiet: bool = False) -> dict:
    """Run (or resume) world-model SFT; return the final metrics."""
    from accelerate import Accelerator
    from transformers import get_cosine_schedule_with_warmup

    from spa_rl.io import atomic_write_json, writable_dir
    from spa_rl.models import cpu_supports_bf16, load_model
    from spa_rl.progress import progress_bar
    from spa_rl.runlog import RunLogger

    if config.loss not in LOSSES:
        raise SpaError(f"unknown loss {config.loss!r}: use one of {', '.join(LOSSES)}")
    if config.micro_batch_size < 1 or config.micro_batch_tokens < 0 or not 0 <= config.max_padding <= 1:
        raise SpaError("micro_batch_size must be >= 1, micro_batch_tokens >= 0 and max_padding in [0, 1]")
    train_rows, val_rows, manifest = load_dataset(config.data, config.env)
    out = writable_dir(config.out)
    ckpt = out / "checkpoint"
    state_file = ckpt / "trainer_state.pt"
    resume = state_file.is_file()

    from accelerate.state import AcceleratorState

    precisions = ("auto", "bf16", "bf16-autocast", "fp32")
    if config.dtype not in precisions:
        raise SpaError(f"unknown dtype {config.dtype!r}: use one of {', '.join(precisions)}")
    precision = config.dtype
    if precision == "auto":
        on_gpu = torch.cuda.is_available() and config.device != "cpu"
        native = torch.cuda.is_bf16_supported(including_emulation=False) if on_gpu else cpu_supports_bf16()
        precision = "bf16" if native else "fp32"
    AcceleratorState._reset_state(True)  # accelerate keeps global state; each run chooses its own precision
    accelerator = Accelerator(mixed_precision="bf16" if precision == "bf16-autocast" else "no",
                              cpu=config.device == "cpu" or (config.device == "auto" and not torch.cuda.is_available()))
    source = str(ckpt) if resume else config.model
    lm = load_model(source, device=str(accelerator.device), dtype="fp32", merge_adapter=False)
    model, tokenizer = lm.model, lm.tokenizer
    model.config.use_cache = False
    if hasattr(model, "set_attn_implementation") and getattr(model.config, "_attn_implementation", "") == "spa_decode":
        model.set_attn_implementation("sdpa")
    if config.lora and not hasattr(model, "peft_config"):
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=config.lora_r, lora_alpha=config.lora_alpha,
                                                 lora_dropout=config.lora_dropout, target_modules="all-linear",
                                                 task_type="CAUSAL_LM"))
    elif resume and hasattr(model, "peft_config"):
        for name, p in model.named_parameters():
            p.requires_grad = "lora_" in name
    model.train()
    master = MasterWeights(model) if precision == "bf16" else None  # copies the fp32 weights, then casts

    def encode(rows: list[dict]) -> tuple[list[tuple[list[int], list[int]]], list[int], int]:
        """(sequences, turns with loss in each, rows dropped as too long)"""
        kept, turns, dropped = [], [], 0
        units = pack_trajectories(rows) if config.pack else [row_sequence(r) for r in rows]
        while units:
            messages, targets = units.pop(0)
            ids, mask = encode_conversation(tokenizer, messages, config.loss, targets)
            if len(ids) > config.max_length and len(targets) > 1:  # too long packed: its turns one by one
                units[:0] = [(messages[:k + 1], [k]) for k in targets]
                continue
            if len(ids) > config.max_length or not any(mask):
                dropped += len(targets)
                continue
            kept.append((ids, mask))
            turns.append(len(targets))
        return kept, turns, dropped

    if config.max_train_samples < 0:
        raise SpaError(f"max_train_samples must be >= 0, got {config.max_train_samples}")
    if config.max_train_samples and len(train_rows) > config.max_train_samples:
        keep = sorted(random.Random(config.seed).sample(range(len(train_rows)), config.max_train_samples))
        train_rows = [train_rows[i] for i in keep]
    train, train_turns, dropped_train = encode(train_rows)
    val, _, dropped_val = encode(val_rows)
    if not train:
        raise SpaError(f"every training sample is longer than max_length={config.max_length}: raise it")
    plans = [_epoch_batches(train_turns, config.batch_size, config.seed + e) for e in range(config.epochs)]
    total_steps = sum(len(p) for p in plans)
    params = master.params if master else [p for p in model.parameters() if p.requires_grad]
    optimizer = adamw(params, lr=config.lr, betas=config.betas, weight_decay=config.weight_decay)
    scheduler = get_cosine_schedule_with_warmup(optimizer, int(config.warmup_ratio * total_steps), total_steps)
    model, optimizer = accelerator.prepare(model, optimizer)
    step = 0
    if resume:
        state = torch.load(state_file, weights_only=False)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        step = state["step"]
        random.setstate(state["python_rng"])
        torch.set_rng_state(state["torch_rng"])
    logger = RunLogger(out, tensorboard=config.tensorboard, wandb_project=config.wandb_project, resume_step=step,
                       config=asdict(config))
    meta = {"stage": "world-model-sft", "config": asdict(config), "precision": precision, "dataset": manifest,
            "base_model": config.model}
    pad_id = tokenizer.pad_token_id

    def evaluate_val() -> float | None:
        if not val:
            return None
        model.eval()
        total, count = 0.0, 0
        with torch.no_grad():
            for idx in _batches(val, sorted(range(len(val)), key=lambda i: len(val[i][0])), config.micro_batch_size,
                                config.micro_batch_tokens, config.max_padding):
                batch = right_padded_batch([val[i] for i in idx], pad_id)
                batch = {k: v.to(accelerator.device) for k, v in batch.items()}
                with accelerator.autocast():
                    nll, n = token_nll_sum(model, batch)
                total += float(nll)
                count += n
        model.train()
        return total / max(count, 1)

    def checkpoint() -> None:
        unwrapped = accelerator.unwrap_model(model)

        def write(tmp: Path) -> None:
            _save_model(unwrapped, tokenizer, tmp, meta, master.state_dict(unwrapped) if master else None)
            torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "step": step,
                        "python_rng": random.getstate(), "torch_rng": torch.get_rng_state()},
                       tmp / "trainer_state.pt")
        _save_dir_atomically(ckpt, write)

    logger.log(step, {"data/train_samples": len(train_rows) - dropped_train, "data/train_sequences": len(train),
                      "data/val_samples": len(val_rows) - dropped_val,
                      "data/dropped_too_long": dropped_train + dropped_val})
    history = []
    with progress_bar(transient=quiet) as bar:
        task = bar.add_task(f"SFT ({config.loss})", total=total_steps, completed=step, unit="steps")
        while step < total_steps:
            epoch = next(e for e in range(config.epochs) if step < sum(len(p) for p in plans[:e + 1]))
            in_epoch = step - sum(len(p) for p in plans[:epoch])
            for idx in plans[epoch][in_epoch:]:
                # micro-batches of similar length waste less compute on padding; the step's gradient is the same
                micro = _batches(train, sorted(idx, key=lambda i: len(train[i][0])), config.micro_batch_size,
                                 config.micro_batch_tokens, config.max_padding)
                n_tokens = sum(sum(train[i][1][1:]) for i in idx)
                batches = [{k: v.to(accelerator.device) for k, v in right_padded_batch([train[i] for i in m],
                                                                                       pad_id).items()} for m in micro]
                loss, grad_norm = sft_step(model, batches, params, optimizer, master, accelerator.backward,
                                           accelerator.autocast)
                scheduler.step()
                step += 1
                logger.log(step, {"loss/train": loss, "train/grad_norm": grad_norm,
                                  "train/lr": scheduler.get_last_lr()[0], "train/tokens": n_tokens,
                                  "train/epoch": epoch + (in_epoch + 1) / len(plans[epoch])})
                in_epoch += 1
                bar.advance(task)
                if config.save_every and step % config.save_every == 0:
                    checkpoint()
            val_loss = evaluate_val()
            row = {"epoch": epoch + 1, "loss/val": val_loss}
            history.append(row)
            logger.log(step, {k: v for k, v in row.items() if v is not None})
            if config.save_epochs:
                checkpoint()
    unwrapped = accelerator.unwrap_model(model)
    final = {"steps": step, "epochs": config.epochs, "train_samples": len(train_rows) - dropped_train,
             "train_sequences": len(train), "val_samples": len(val_rows) - dropped_val,
             "dropped_too_long": dropped_train + dropped_val, "val_loss": evaluate_val(), "loss": config.loss,
             "lora": config.lora}
    meta["result"] = final
    _save_dir_atomically(out / "model", lambda tmp: _save_model(unwrapped, tokenizer, tmp, meta,
                                                                master.state_dict(unwrapped) if master else None))
    atomic_write_json(out / "result.json", final)
    logger.close()
    from spa_rl.plots import plot_sft

    plot_sft(out)
    return final
