"""A lean single-token decode step for Llama-family models (Llama, Qwen2, Mistral without sliding window).

Why this exists: on a CPU, a decode step of a small model at batch 32 spends more time in the Hugging Face
forward's per-operation overhead (module calls, mask and cache bookkeeping, separate q/k/v and gate/up
matmuls) than in arithmetic. This module runs the same maths for one new token per row in a handful of
tensor operations per layer: one fused QKV matmul, rotary embedding, a write into the caller's static KV
cache, two small attention matmuls over the cache, one fused gate/up matmul. No maintained
library offers this for CPU decoding of HF models (vLLM and llama.cpp replace the model instead of sharing
its weights and cache with training code).

The fused weights are copies, rebuilt at the start of every generation call (`prepare`), so a policy being
trained is always decoded with its current weights however they were updated (optimizer steps, fused or not,
`.data` writes, LoRA merges, replaced parameters). It must never be used for a model it does not recognise
exactly (LoRA-wrapped projections, modules with hooks, sliding-window attention, biases on the output
projection, other norms): `supports` is checked at every call and the caller keeps the standard forward.
Its output must match the standard forward to floating-point tolerance (tested in `tests/test_generation.py`).

Layout. The attention's score matmul reads keys as [head_dim, length] matrices. Sliced from the cache's
[length, head_dim] layout they are transposed and not contiguous, and the CPU bf16 kernel copies them at
every layer and step (measured: most of a decode step at batch 32). So at its first step a generation call
builds, per cache layer, contiguous copies in the layout the matmuls want (`lean_kt`, `lean_v`), extended
column by column; the standard `keys`/`values` stay up to date too, so the cache remains a normal cache.
Shared prefix: rollout prompts share a long prefix (system prompt and instructions, ~300 of ~340 tokens of
a first Sokoban turn). Its keys and values are identical in every row, so they are kept once (`lean_kp`,
`lean_vp`) and attended with one matmul for the whole batch (cascade attention); only each row's own columns
are read row by row. Callers that select rows of the cache must select the same rows of `lean_kt` and
`lean_v` (or drop them).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

_SUPPORTED = ("llama", "qwen2", "mistral")


class LeanDecoder:
    """Decode one token per row with a model's own weights and a `transformers.StaticCache`."""

    def __init__(self, model: Any) -> None:
        self.model = model
        cfg = model.config
        self.n_heads = cfg.num_attention_heads
        self.n_kv = cfg.num_key_value_heads
        self.inner: Any = None
        self.layers: list[Any] = []
        self._fused: list[tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]] = []

    @staticmethod
    def supports(model: Any) -> bool:
        """Whether `model` is, right now, exactly a plain supported architecture (no LoRA layers, no hooks)."""
        cfg = getattr(model, "config", None)
        if cfg is None or getattr(cfg, "model_type", None) not in _SUPPORTED:
            return False
        if getattr(cfg, "use_sliding_window", False) or (
                cfg.model_type == "mistral" and getattr(cfg, "sliding_window", None)):
            return False
        inner = getattr(model, "model", None)
        layers = getattr(inner, "layers", None)
        if layers is None or not hasattr(inner, "rotary_emb") or not hasattr(model, "lm_head"):
            return False
        if any(mod._forward_hooks or mod._forward_pre_hooks or hasattr(mod, "_hf_hook") for mod in model.modules()):
            return False  # hooks (offloading, adapters, instrumentation) would be bypassed
        for layer in layers:
            a, m = layer.self_attn, layer.mlp
            linears = (a.q_proj, a.k_proj, a.v_proj, a.o_proj, m.gate_proj, m.up_proj, m.down_proj)
            if any(type(x) is not torch.nn.Linear for x in linears) or a.o_proj.bias is not None:
                return False
            if m.gate_proj.bias is not None or m.up_proj.bias is not None or m.down_proj.bias is not None:
                return False
            for norm in (layer.input_layernorm, layer.post_attention_layernorm):
                if not hasattr(norm, "variance_epsilon") or type(norm).__name__ not in (
                        "LlamaRMSNorm", "Qwen2RMSNorm", "MistralRMSNorm"):
                    return False
            if type(m.act_fn).__name__ != "SiLUActivation" and not isinstance(m.act_fn, torch.nn.SiLU):
                return False
        return True

    @classmethod
    def build(cls, model: Any) -> LeanDecoder | None:
        """A decoder for `model`, or None when the model is not exactly a supported plain architecture."""
        return cls(model) if cls.supports(model) else None

    def prepare(self) -> bool:
        """Called at the start of every generation call: checks the model again (modules may have been
        replaced, e.g. wrapped by LoRA) and rebuilds the fused weights from the current parameters, so that a
        model being trained is always decoded with its current weights, however they were updated. Copying the
        q/k/v and gate/up weights takes milliseconds. False: use the model's own forward for this call."""
        if not self.supports(self.model):
            self._fused = []
            return False
        self.inner = self.model.model
        self.layers = list(self.inner.layers)
        fused = []
        with torch.no_grad():
            for layer in self.layers:
                a, m = layer.self_attn, layer.mlp
                wqkv = torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight], 0).contiguous()
                bias = None
                if a.q_proj.bias is not None:
                    bias = torch.cat([a.q_proj.bias, a.k_proj.bias, a.v_proj.bias], 0).contiguous()
                wgu = torch.cat([m.gate_proj.weight, m.up_proj.weight], 0).contiguous()
                fused.append((wqkv, bias, wgu))
        self._fused = fused
        return True

    @staticmethod
    def _rms(x: torch.Tensor, norm: Any) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon)
        return norm.weight * h.to(x.dtype)

    @staticmethod
    def _layer_state(cl: Any, prefix: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """This call's attention layout of one cache layer (built at its first step, see "Layout" above)."""
        if getattr(cl, "lean_kt", None) is None or cl.lean_kt.shape[0] != cl.keys.shape[0]:
            cl.lean_kp = cl.keys[0, :, :prefix].transpose(-1, -2).contiguous()  # [nkv, hd, P]
            cl.lean_vp = cl.values[0, :, :prefix].contiguous()  # [nkv, P, hd]
            cl.lean_kt = cl.keys[:, :, prefix:].transpose(-1, -2).contiguous()  # [B, nkv, hd, W - P]
            cl.lean_v = cl.values[:, :, prefix:].contiguous()  # [B, nkv, W - P, hd]
        return cl.lean_kp, cl.lean_vp, cl.lean_kt, cl.lean_v

    @torch.inference_mode()
    def step(self, tokens: torch.Tensor, positions: torch.Tensor, cache: Any, col: int,
             mask: torch.Tensor, prefix: int = 0) -> torch.Tensor:
        """Logits [B, V] of the next token after `tokens` [B] at `positions` [B], written to cache column `col`.

        `mask` [B, cache width] (bool) marks the cache columns each row attends to, the new column included.
        `prefix`: the first `prefix` columns hold the same tokens at the same positions in every row and every
        row attends to all of them (the caller guarantees it); their attention is computed once for the batch.
        """
        if not self._fused:
            raise RuntimeError("LeanDecoder.step called before a successful prepare()")
        b = tokens.shape[0]
        attn = self.layers[0].self_attn
        hd, nh, nkv, scaling = attn.head_dim, self.n_heads, self.n_kv, attn.scaling
        group = nh // nkv
        x = self.inner.embed_tokens(tokens)  # [B, H]
        cos, sin = self.inner.rotary_emb(x, positions[:, None])  # [B, 1, hd]
        cos, sin = cos[:, 0, None, :], sin[:, 0, None, :]  # [B, 1, hd]
        half = hd // 2
        own = mask[:, prefix:]
        neg = torch.zeros(own.shape, dtype=torch.float32, device=x.device).masked_fill_(~own, float("-inf"))
        neg = neg[:, None, None, :]  # [B, 1, 1, W - P]
        for layer, (wqkv, bqkv, wgu), cl in zip(self.layers, self._fused, cache.layers, strict=True):
            a = layer.self_attn
            h = self._rms(x, layer.input_layernorm)
            qkv = F.linear(h, wqkv, bqkv)  # [B, (nh + 2 nkv) hd]
            q = qkv[:, :nh * hd].view(b, nh, hd)
            k = qkv[:, nh * hd:(nh + nkv) * hd].view(b, nkv, hd)
            v = qkv[:, (nh + nkv) * hd:].view(b, nkv, hd)
            qk = torch.cat([q, k], 1)  # rotary on queries and keys at once
            rot = torch.cat([-qk[..., half:], qk[..., :half]], -1)
            qk = qk * cos + rot * sin
            q, k = (qk[:, :nh] * scaling).reshape(b, nkv, group, hd), qk[:, nh:]
            cl.keys[:, :, col] = k  # the standard cache stays complete for the caller
            cl.values[:, :, col] = v
            kp, vp, kt, vs = self._layer_state(cl, prefix)
            kt[:, :, :, col - prefix] = k
            vs[:, :, col - prefix] = v
            w = kt.shape[-1]
            # each row's own columns: [B * nkv, hd, W - P] @ ... as contiguous matrices (see "Layout")
            own_scores = torch.bmm(q.reshape(b * nkv, group, hd), kt.view(b * nkv, hd, w)).view(b, nkv, group, w)
            own_scores = own_scores.float() + neg
            if prefix:  # the shared columns: one [B * group, hd] @ [hd, P] matmul per kv head
                qh = q.permute(1, 0, 2, 3).reshape(nkv, b * group, hd)
                pre_scores = torch.bmm(qh, kp).view(nkv, b, group, prefix).permute(1, 0, 2, 3)
                scores = torch.cat([pre_scores.float(), own_scores], -1)
            else:
                scores = own_scores
            probs = torch.softmax(scores, dim=-1).to(vs.dtype)
            out = torch.bmm(probs[..., prefix:].reshape(b * nkv, group, w), vs.view(b * nkv, w, hd))
            out = out.view(b, nkv, group, hd)
            if prefix:
                pp = probs[..., :prefix].permute(1, 0, 2, 3).reshape(nkv, b * group, prefix)
                out = out + torch.bmm(pp, vp).view(nkv, b, group, hd).permute(1, 0, 2, 3)
            x = x + a.o_proj(out.reshape(b, nh * hd))
            h = self._rms(x, layer.post_attention_layernorm)
            gu = F.linear(h, wgu)
            inter = gu.shape[-1] // 2
            x = x + layer.mlp.down_proj(F.silu(gu[:, :inter]) * gu[:, inter:])
        x = self._rms(x, self.inner.norm)
        return self.model.lm_head(x)
