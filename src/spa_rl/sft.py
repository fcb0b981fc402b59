"""World-model SFT (docs/method.md §5): fine-tune on self-play turns, with the loss on the assistant's
turn only (`spa sft`).

Loss variants: `full` (the paper's SPA, its Eq. 1-2: every token of the assistant turn, the true
`<observation>` and `<prediction>` included, up to and including its end-of-turn token; system, user and
history tokens never) and `masked` (the ablation: the contents of `<observation>` and `<prediction>` get no
loss, their tags do). Loss tokens are found by character offsets in the tokenisation of the whole
chat-templated conversation, so masks are exact for any chat template.

Why our own loop and not TRL's `SFTTrainer`: TRL expresses "completion only" and "assistant only" losses,
but not a mask that excludes spans *inside* the completion (the masked ablation), and resuming it mid-epoch
from our atomic checkpoints would need as much code as this loop. The loop is short because the plumbing it
shares with RL lives in `spa_rl.training` (precision, AdamW and the cosine schedule, checkpoints, the run log,
LoRA). It must never train on a token outside the assistant turn.
"""

from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from spa_rl.config import Seeded, setting, to_dict
from spa_rl.errors import SpaError
from spa_rl.io import atomic_dir, atomic_write_json, read_json
from spa_rl.models import (
    ModelConfig,
    checkpoint_layers,
    for_training,
    load_model,
    next_token_logits,
    pick_device,
    right_padded_batch,
)
from spa_rl.outputs import claim_output
from spa_rl.plots import plot_sft
from spa_rl.progress import progress_bar, say
from spa_rl.samples import encode_conversation, load_dataset, pack_trajectories, row_sequence
from spa_rl.training import (
    Checkpointer,
    LogConfig,
    LoRAConfig,
    RunLogger,
    Trainable,
    apply_lora,
    make_accelerator,
    micro_batches,
    resolve_precision,
    save_model,
)
from spa_rl.training.logprobs import token_logprobs
from spa_rl.training.memory import activation_bytes_per_token, model_state_bytes, plan_micro_batch_tokens
from spa_rl.training.precision import check_dtype

STAGE = "sft"


@dataclass(kw_only=True)
class SFTConfig(Seeded):
    """`spa sft`: world-model SFT (defaults: the paper's, docs/method.md §5)."""

    data: str = setting(metavar="DIR")
    """Dataset directory written by `spa collect` (train.jsonl, val.jsonl, manifest.json)."""
    out: str = setting(metavar="DIR")
    """Output directory: the fine-tuned model (OUT/model, HF format or a LoRA adapter), checkpoint/, metrics."""
    env: str | None = None
    """If set, refuse a dataset collected on another env."""
    model: ModelConfig = setting(factory=ModelConfig)
    loss: Literal["full", "masked"] = "full"
    """full: SPA (the true observation and prediction are trained on); masked: their contents get no loss (the
    paper's ablation)."""
    epochs: int = setting(5, ge=1)
    """Passes over the training set (the paper: 5; 1 epoch is much worse)."""
    lr: float = setting(1e-4, gt=0)
    """Peak learning rate of AdamW."""
    betas: tuple[float, float] = (0.9, 0.95)
    """AdamW's betas."""
    weight_decay: float = setting(0.01, ge=0)
    """AdamW's weight decay."""
    warmup_ratio: float = setting(0.1, ge=0, le=1)
    """Share of optimizer steps spent warming the learning rate up, then cosine decay to 0."""
    max_grad_norm: float = setting(1.0, gt=0)
    """Gradients are clipped to this norm."""
    gradient_checkpointing: bool = False
    """Recompute each decoder layer's activations in the backward pass instead of keeping them: most of the
    update's activation memory for more update time (measured: 8.5 instead of 18.8 GiB, 1.15x the time)."""
    batch_size: int = setting(16, ge=1)
    """Global batch: turns (dataset rows) per optimizer step; with packing, whole trajectories are added until
    the batch holds at least this many turns."""
    micro_batch_size: int = setting(4, ge=1)
    """At most this many sequences per forward/backward pass (gradient accumulation makes up the global batch)."""
    micro_batch_tokens: int = setting(0, ge=0)
    """At most this many tokens (padding included) per pass, which bounds activation memory (0: the most whose
    estimated peak fits --memory-gib; a setting that cannot fit the memory available is refused).

    Packed trajectories are long, and four 2,000-token sequences in one pass took 20 GB here."""
    memory_gib: float = setting(0.0, ge=0)
    """The peak memory training may reach, GiB, from which micro-batches are sized (0: the smaller of 8 GiB and
    nine tenths of the memory available at the start; on a GPU, nine tenths of its free memory)."""
    max_padding: float = setting(0.1, ge=0, le=1)
    """A micro-batch takes another sequence only while padding stays at most this share of its tokens.

    Padding is computed and thrown away (one sequence per turn trained at 263 tokens/s in random micro-batches
    of 4 with 25% padding, and at 362 with this cap, before masks were dropped; docs/benchmarks.md)."""
    max_length: int = setting(2048, ge=1)
    """Samples longer than this (in tokens) are dropped and counted."""
    max_train_samples: int = setting(0, ge=0, flag="--max-samples")
    """Train on a fixed random subset (by --seed) of this many training rows (0: all): compares datasets at an
    equal number of transitions."""
    pack: bool = setting(True, flag="--no-pack")
    """Train each trajectory as one sequence with the loss on all its turns (same loss terms and contexts as one
    sequence per turn, ~3x fewer tokens; --no-pack: one sequence per turn)."""
    lora: LoRAConfig = setting(factory=LoRAConfig)
    save_every: int = setting(0, ge=0)
    """Also checkpoint every N optimizer steps (0: at epoch ends only)."""
    save_epochs: bool = True
    """Checkpoint at the end of every epoch (resumable); --no-save-epochs saves only the final model."""
    log: LogConfig = setting(factory=LogConfig)

    def check(self) -> None:
        check_dtype(self.model.dtype, training=True)


# ------------------------------------------------------------------------------------------ data
def epoch_batches(turns: list[int], batch_size: int, seed: int) -> list[list[int]]:
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


@dataclass
class SFTData:
    """A dataset encoded for training: sequences, the turns with loss in each, and every epoch's batches."""

    train: list[tuple[list[int], list[int]]]
    """(token ids, loss mask) per training sequence."""
    val: list[tuple[list[int], list[int]]]
    plans: list[list[list[int]]]
    """Per epoch, the global batches as lists of sequence indices (fixed by the seed: the data position of a
    resumed run is its step)."""
    samples: dict[str, int]
    """Counts for the log: training and validation rows kept, sequences, rows dropped as too long."""

    @property
    def total_steps(self) -> int:
        return sum(len(p) for p in self.plans)

    def position(self, step: int) -> tuple[int, int]:
        """(epoch, batch within the epoch) of optimizer step `step` (0-based)."""
        for epoch, plan in enumerate(self.plans):
            if step < len(plan):
                return epoch, step
            step -= len(plan)
        raise IndexError("step beyond the last epoch")


def encode_rows(tokenizer: Any, rows: list[dict], config: SFTConfig) -> tuple[list, list[int], int]:
    """(sequences, turns with loss in each, rows dropped as too long) of dataset rows, packed by trajectory
    unless `config.pack` is off; a packed trajectory longer than `max_length` falls back to its turns."""
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


def prepare_data(tokenizer: Any, train_rows: list[dict], val_rows: list[dict], config: SFTConfig) -> SFTData:
    """Encode the rows (a fixed random subset if `max_train_samples`) and plan every epoch's batches."""
    if config.max_train_samples and len(train_rows) > config.max_train_samples:
        keep = sorted(random.Random(config.seed).sample(range(len(train_rows)), config.max_train_samples))
        train_rows = [train_rows[i] for i in keep]
    train, turns, dropped_train = encode_rows(tokenizer, train_rows, config)
    val, _, dropped_val = encode_rows(tokenizer, val_rows, config)
    if not train:
        raise SpaError(f"every training sample is longer than max_length={config.max_length}: raise --max-length")
    plans = [epoch_batches(turns, config.batch_size, config.seed + e) for e in range(config.epochs)]
    return SFTData(train, val, plans, {"train_samples": len(train_rows) - dropped_train, "train_sequences": len(train),
                                       "val_samples": len(val_rows) - dropped_val,
                                       "dropped_too_long": dropped_train + dropped_val})


def batches_on(sequences: list[tuple[list[int], list[int]]], idx: list[int], config: SFTConfig, pad_id: int,
               device: Any) -> list[dict[str, torch.Tensor]]:
    """The micro-batches of the sequences `idx`, sorted by length (less padding, same gradient), on `device`."""
    lengths = [len(ids) for ids, _ in sequences]
    micro = micro_batches(lengths, sorted(idx, key=lambda i: lengths[i]), config.micro_batch_size,
                          config.micro_batch_tokens, config.max_padding)
    return [{k: v.to(device) for k, v in right_padded_batch([sequences[i] for i in m], pad_id).items()} for m in micro]


def token_nll_sum(model: Any, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """Sum of next-token NLL over the batch's loss tokens, and their count (`models.next_token_logits`
    applies the output projection to the loss positions only; `token_logprobs` never holds their
    logits whole in fp32, which cross-entropy did three times over)."""
    labels = batch["labels"][:, 1:]
    keep = labels != -100
    logits = next_token_logits(model, batch["input_ids"], batch["attention_mask"], keep)
    return -token_logprobs(logits, labels[keep]).sum(), int(keep.sum())


def sft_step(trainable: Trainable, batches: list[dict[str, torch.Tensor]]) -> tuple[float, float]:
    """One optimizer step over a global batch given as micro-batches (`batches_on`): the mean NLL over all their
    loss tokens, gradients accumulated, one update. Returns (mean loss, gradient norm before clipping).
    `spa sft` and `benchmarks/sft.py` both run this."""
    n_tokens = max(sum(int((b["labels"][:, 1:] != -100).sum()) for b in batches), 1)
    total = 0.0
    for batch in batches:
        with trainable.autocast():
            nll, _ = token_nll_sum(trainable.model, batch)
        trainable.backward(nll / n_tokens)
        total += nll.item()
    return total / n_tokens, trainable.step()


@torch.no_grad()
def validation_loss(trainable: Trainable, data: SFTData, config: SFTConfig, pad_id: int) -> float | None:
    """Mean NLL over the validation sequences' loss tokens (None without validation data)."""
    if not data.val:
        return None
    trainable.model.eval()
    total, count = 0.0, 0
    for batch in batches_on(data.val, list(range(len(data.val))), config, pad_id, trainable.accelerator.device):
        with trainable.autocast():
            nll, n = token_nll_sum(trainable.model, batch)
        total, count = total + float(nll), count + n
    trainable.model.train()
    return total / max(count, 1)


# ------------------------------------------------------------------------------------------ the loop
def train_sft(config: SFTConfig, quiet: bool = False) -> dict:
    """Run world-model SFT into `config.out`, resuming an interrupted run; return the final metrics."""
    train_rows, val_rows, manifest = load_dataset(config.data, config.env)
    out = claim_output(config.out, STAGE, config, done="result.json")
    if out.finished:
        say(f"{out.path} already holds this finished SFT run: nothing to do", quiet)
        return read_json(out.path / "result.json", "result")
    ckpt = Checkpointer(out.path / "checkpoint")
    device = pick_device(config.model.device)
    precision = resolve_precision(config.model.dtype, device, training=True)
    accelerator = make_accelerator(device)
    if accelerator.num_processes > 1:
        raise SpaError("spa sft runs in one process (its data is not split over processes): run it without "
                       "accelerate launch")
    # resuming: the run's own checkpoint (an adapter stays one); else the starting model with any adapter merged
    # into its base, a new adapter trained on top with --lora
    resume = ckpt.exists()
    lm = load_model(str(ckpt.dir / "model") if resume else config.model.model, str(accelerator.device), "fp32",
                    merge_adapter=not resume)
    tokenizer, pad_id = lm.tokenizer, lm.tokenizer.pad_token_id
    data = prepare_data(tokenizer, train_rows, val_rows, config)
    if config.gradient_checkpointing:
        checkpoint_layers(lm.model)
    trainable = Trainable(apply_lora(for_training(lm.model), config.lora), precision, accelerator, lr=config.lr,
                          total_steps=data.total_steps, betas=config.betas, weight_decay=config.weight_decay,
                          warmup_ratio=config.warmup_ratio, max_grad_norm=config.max_grad_norm)
    plan = plan_micro_batch_tokens(config.micro_batch_tokens, config.memory_gib, device,
                                   model_state_bytes(trainable.model, precision),
                                   activation_bytes_per_token(lm.model.config, precision,
                                                              config.gradient_checkpointing), "spa sft")
    config = dataclasses.replace(config, micro_batch_tokens=plan.tokens)
    say(f"memory: {plan.describe()}", quiet)
    step, val = 0, None
    if resume:
        state = ckpt.load()
        trainable.load_state_dict(state.states["model"])
        step = state.step
        say(f"resuming {out.path} from its checkpoint at step {step} of {data.total_steps}", quiet)
    logger = RunLogger(out.path, config.log, to_dict(config), resume_step=step)
    meta = {"stage": "world-model-sft", "config": to_dict(config), "precision": precision.name, "dataset": manifest,
            "base_model": config.model.model}

    def write_model(directory: Path) -> None:
        save_model(trainable.model, tokenizer, directory, meta, trainable.weights())

    def checkpoint() -> None:
        epoch, index = data.position(step - 1)
        ckpt.save(step, lambda d: write_model(_mkdir(d / "model")), {"model": trainable.state_dict()},
                  {"epoch": epoch, "batch_in_epoch": index + 1})

    logger.log(step, {f"data/{k}": v for k, v in data.samples.items()})
    with progress_bar(transient=quiet) as bar:
        task = bar.add_task(f"SFT ({config.loss})", total=data.total_steps, completed=step, unit="steps")
        while step < data.total_steps:
            epoch, index = data.position(step)
            idx = data.plans[epoch][index]
            loss, grad_norm = sft_step(trainable, batches_on(data.train, idx, config, pad_id, accelerator.device))
            step += 1
            logger.log(step, {"loss/train": loss, "train/grad_norm": grad_norm, "train/lr": trainable.lr,
                              "train/tokens": sum(sum(data.train[i][1][1:]) for i in idx),
                              "train/epoch": epoch + (index + 1) / len(data.plans[epoch])})
            bar.advance(task)
            if config.save_every and step % config.save_every == 0:
                checkpoint()
            if index + 1 == len(data.plans[epoch]):  # end of an epoch
                val = validation_loss(trainable, data, config, pad_id)
                logger.log(step, {"epoch": epoch + 1, **({"loss/val": val} if val is not None else {})})
                if config.save_epochs:
                    checkpoint()
    if val is None:  # resumed after the last epoch's validation
        val = validation_loss(trainable, data, config, pad_id)
    final = {"steps": step, "epochs": config.epochs, **data.samples, "val_loss": val, "loss": config.loss,
             "lora": config.lora.enabled}
    meta["result"] = final
    atomic_dir(out.path / "model", write_model)
    atomic_write_json(out.path / "result.json", final)
    ckpt.discard()
    logger.close()
    plot_sft(out.path)
    return final


def _mkdir(path: Path) -> Path:
    path.mkdir()
    return path
