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

Layout. A row's keys and values sliced from the static cache are not contiguous (the cache is wider than
what is used), and the CPU bf16 matmul copies such operands at every layer and step (measured: most of a
decode step at batch 32). So at its first step a generation call builds, per cache layer, contiguous copies
of the rows' keys and values ([length, head_dim] per row and kv head: `LeanLayer.k`, `.v`; scores are
computed as keys @ queries^T, which measured faster than queries @ keys^T for long rows), extended token by
token. They then are the cache: the layer's standard `keys`/`values` are freed (holding both doubled the
memory of long multi-turn batches) and `cache_rows` puts a row's columns back together when the caller needs
them (rows leaving the batch, the cache kept for the next turn).
Shared prefix: rollout prompts share a long prefix (system prompt and instructions, ~200 of ~340 tokens of
a first Sokoban turn). Its keys and values are identical in every row, so they are kept once (`LeanLayer.kp`,
`.vp`) and attended with one matmul for the whole batch (cascade attention); only each row's own columns
are read row by row. Groups: SPA samples several responses to each prompt, so rows that are copies of one
prompt also share the prompt's columns after the global prefix (~140 of ~340 columns of a first Sokoban turn).
Those are kept once per group (`LeanLayer.kg`, `.vg`) and attended with one matmul per group and kv head
(a second cascade level), so a row reads on its own only the tokens it generated.
The lean layers of one generation call live in a `LeanCache` the caller owns (nothing is attached to
transformers' cache objects). Callers that select rows of the cache must select the same rows of the
`LeanCache` (`select_rows`) and of their `RowGroups`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

_SUPPORTED = ("llama", "qwen2", "mistral")


@dataclass
class RowGroups:
    """Which batch rows are copies of one prompt: their cache columns [prefix, prefix + cols) are identical."""

    index: torch.Tensor
    """[B] the group of each row (0 .. count - 1; a group may have lost all its rows)."""
    slot: torch.Tensor
    """[B] the row's rank within its group."""
    count: int
    """Number of groups."""
    size: int
    """Rows in the largest group."""
    cols: int
    """Columns after the global prefix that the rows of a group share."""
    dense: bool
    """Rows are sorted by group and every group has `size` rows (no index arithmetic needed)."""

    @classmethod
    def of(cls, groups: list[int], cols: int, count: int, device: Any) -> RowGroups:
        """The layout of rows whose groups are `groups` (one entry per row, values below `count`)."""
        seen: dict[int, int] = {}
        slots = []
        for g in groups:
            slots.append(seen.get(g, 0))
            seen[g] = slots[-1] + 1
        size = max(seen.values())
        dense = groups == [g for g in range(count) for _ in range(size)]
        return cls(torch.tensor(groups, dtype=torch.long, device=device),
                   torch.tensor(slots, dtype=torch.long, device=device), count, size, cols, dense)

    def gather(self, t: torch.Tensor) -> torch.Tensor:
        """[B, nkv, group, n] per row -> [count * nkv, size * group, n]: a group's rows stacked (zeros for
        missing rows), ready for one matmul per group and kv head."""
        b, nkv, group, n = t.shape
        if self.dense:
            return t.view(self.count, self.size, nkv, group, n).transpose(1, 2).reshape(-1, self.size * group, n)
        out = t.new_zeros((self.count, nkv, self.size, group, n))
        out[self.index, :, self.slot] = t
        return out.view(-1, self.size * group, n)

    def scatter(self, t: torch.Tensor, nkv: int) -> torch.Tensor:
        """The inverse of `gather`: [count * nkv, size * group, n] -> [B, nkv, group, n]."""
        t = t.view(self.count, nkv, self.size, t.shape[1] // self.size, t.shape[2])
        if self.dense:
            return t.transpose(1, 2).reshape(-1, nkv, t.shape[3], t.shape[4])
        return t[self.index, :, self.slot]


@dataclass
class LeanLayer:
    """One cache layer as the lean step holds it once it has taken the layer over (see "Layout")."""

    kp: torch.Tensor
    """[nkv, hd, P] keys of the shared prefix (transposed), kept once for the batch."""
    vp: torch.Tensor
    """[nkv, P, hd] values of the shared prefix."""
    kg: torch.Tensor | None
    """[U, nkv, hd, G] keys of each group's shared columns (transposed), or None without groups."""
    vg: torch.Tensor | None
    """[U, nkv, G, hd] values of each group's shared columns."""
    k: torch.Tensor
    """[B, nkv, W - end, hd] each row's own keys, contiguous, extended token by token."""
    v: torch.Tensor
    """[B, nkv, W - end, hd] each row's own values."""
    end: int
    """The first column a row holds on its own (prefix + group columns)."""

    @classmethod
    def take(cls, cl: Any, prefix: int, groups: RowGroups | None) -> LeanLayer:
        """Copy cache layer `cl`'s keys and values into the lean layout and free the layer's own tensors: from
        here on the copies are the cache (`cache_rows` puts rows back together)."""
        end = prefix + (groups.cols if groups is not None else 0)
        kg = vg = None
        if groups is not None:  # one row of each group holds the group's columns (any row if none is left)
            first = {int(g): r for r, g in reversed(list(enumerate(groups.index.tolist())))}
            rep = torch.tensor([first.get(g, 0) for g in range(groups.count)], device=cl.keys.device)
            kg = cl.keys[rep, :, prefix:end].transpose(-1, -2).contiguous()
            vg = cl.values[rep, :, prefix:end].contiguous()
        layer = cls(kp=cl.keys[0, :, :prefix].transpose(-1, -2).contiguous(), vp=cl.values[0, :, :prefix].contiguous(),
                    kg=kg, vg=vg, k=cl.keys[:, :, end:].contiguous(), v=cl.values[:, :, end:].contiguous(), end=end)
        cl.keys = cl.values = None
        return layer


class LeanCache:
    """The lean step's state for one generation call: per layer of the caller's `StaticCache`, its `LeanLayer`
    once the step has taken it over (None before). Owned by the caller for the length of the call, so nothing is
    attached to transformers' cache objects."""

    def __init__(self, n_layers: int) -> None:
        self.layers: list[LeanLayer | None] = [None] * n_layers

    def select_rows(self, index: torch.Tensor) -> None:
        """Keep/duplicate batch rows `index` of every taken layer's own columns."""
        for layer in self.layers:
            if layer is not None:
                layer.k, layer.v = layer.k.index_select(0, index), layer.v.index_select(0, index)


def cache_rows(cl: Any, lean: LeanLayer | None, index: torch.Tensor | None, used: int,
               groups: RowGroups | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and values [rows, nkv, used, hd] of the first `used` columns of cache layer `cl` for the batch rows
    `index` (all if None): read from the standard cache, or, once the lean step has taken the layer over
    (`lean`), put together from the shared prefix, the group columns (`groups`: the layout of the last step's
    rows) and the rows' own copies."""
    if lean is None:
        k, v = cl.keys[:, :, :used], cl.values[:, :, :used]
        return (k, v) if index is None else (k.index_select(0, index), v.index_select(0, index))
    own_k, own_v = lean.k, lean.v
    group = groups.index if lean.kg is not None and groups is not None else None
    if index is not None:
        own_k, own_v = own_k.index_select(0, index), own_v.index_select(0, index)
        group = group.index_select(0, index) if group is not None else None
    prefix, end = lean.kp.shape[-1], lean.end
    keys = own_k.new_empty((own_k.shape[0], own_k.shape[1], used, own_k.shape[3]))
    values = torch.empty_like(keys)
    keys[:, :, :prefix] = lean.kp.transpose(-1, -2)
    values[:, :, :prefix] = lean.vp
    if group is not None:
        keys[:, :, prefix:end] = lean.kg.transpose(-1, -2)[group]
        values[:, :, prefix:end] = lean.vg[group]
    keys[:, :, end:] = own_k[:, :, :used - end]
    values[:, :, end:] = own_v[:, :, :used - end]
    return keys, values


def _unwrap(model: Any) -> Any:
    """The causal LM inside a PEFT wrapper (the model itself otherwise)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _is_lora(layer: Any) -> bool:
    """Whether `layer` is PEFT's LoRA `Linear` over a plain `nn.Linear` (not DoRA, not another adapter type)."""
    kind = type(layer)
    return (kind.__name__ == "Linear" and kind.__module__.startswith("peft.")
            and type(getattr(layer, "base_layer", None)) is torch.nn.Linear and hasattr(layer, "lora_A")
            and not any(getattr(layer, "use_dora", {}).values()) and not getattr(layer, "fan_in_fan_out", False))


def _bias(layer: Any) -> torch.Tensor | None:
    return (layer.base_layer if _is_lora(layer) else layer).bias


def _weight(layer: Any) -> torch.Tensor:
    """The weight a linear layer applies: a LoRA layer's base weight plus its active adapters' B @ A x scaling
    (summed in fp32, then rounded once to the weight's dtype), unless merged or disabled. The layers run in eval
    mode, so the adapters' dropout is the identity."""
    if not _is_lora(layer):
        return layer.weight
    weight = layer.base_layer.weight
    if layer.merged or layer.disable_adapters:
        return weight
    total = weight.float()
    for name in layer.active_adapters:
        if name in layer.lora_A:
            a, b = layer.lora_A[name].weight.float(), layer.lora_B[name].weight.float()
            total = total + layer.scaling[name] * (b @ a)
    return total.to(weight.dtype)


class LeanDecoder:
    """Decode one token per row with a model's own weights and a `transformers.StaticCache`."""

    def __init__(self, model: Any) -> None:
        self.model = model
        cfg = model.config
        self.n_heads = cfg.num_attention_heads
        self.n_kv = cfg.num_key_value_heads
        self.inner: Any = None
        self.layers: list[Any] = []
        self._fused: list[tuple[torch.Tensor, ...]] = []  # per layer: qkv, its bias, o, gate/up, down
        self._head: tuple[torch.Tensor, torch.Tensor | None] | None = None
        self._packed = False
        self._prepack_ok: dict[tuple[Any, Any], bool] = {}  # (device, dtype) -> the probe's answer

    @staticmethod
    def supports(model: Any) -> bool:
        """Whether `model` is, right now, exactly a plain supported architecture (no hooks; LoRA adapters only on
        the decoder's linear layers, whose update is folded into the decode weights: `_weight`)."""
        model = _unwrap(model)
        cfg = getattr(model, "config", None)
        if cfg is None or getattr(cfg, "model_type", None) not in _SUPPORTED:
            return False
        if getattr(cfg, "use_sliding_window", False) or (
                cfg.model_type == "mistral" and getattr(cfg, "sliding_window", None)):
            return False
        inner = getattr(model, "model", None)
        layers = getattr(inner, "layers", None)
        if layers is None or not hasattr(inner, "rotary_emb"):
            return False
        if type(getattr(model, "lm_head", None)) is not torch.nn.Linear:
            return False  # e.g. an adapter on the output projection, which the step would bypass
        if any(mod._forward_hooks or mod._forward_pre_hooks or hasattr(mod, "_hf_hook") for mod in model.modules()):
            return False  # hooks (offloading, adapters, instrumentation) would be bypassed
        for layer in layers:
            a, m = layer.self_attn, layer.mlp
            linears = (a.q_proj, a.k_proj, a.v_proj, a.o_proj, m.gate_proj, m.up_proj, m.down_proj)
            if any(type(x) is not torch.nn.Linear and not _is_lora(x) for x in linears):
                return False
            if any(_bias(x) is not None for x in (a.o_proj, m.gate_proj, m.up_proj, m.down_proj)):
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

    def prepare(self, batch: int = 32) -> bool:
        """Called at the start of every generation call: checks the model again (modules may have been
        replaced, e.g. wrapped by LoRA) and rebuilds the decode weights from the current parameters, so that a
        model being trained is always decoded with its current weights, however they were updated (~0.1 s for
        135M parameters). `batch`: the call's batch size (a hint for the weight layout). False: use the model's
        own forward for this call. `release` frees the copies."""
        self.release()
        if not self.supports(self.model):
            return False
        base = _unwrap(self.model)
        self.inner = base.model
        self.layers = list(self.inner.layers)
        head = base.lm_head
        where = (head.weight.device, head.weight.dtype)
        if where not in self._prepack_ok:  # the probe's answer does not change between calls
            self._prepack_ok[where] = self._can_prepack(head.weight, batch)
        self._packed = self._prepack_ok[where]
        fused = []
        with torch.no_grad():
            for layer in self.layers:
                a, m = layer.self_attn, layer.mlp
                wqkv = torch.cat([_weight(a.q_proj), _weight(a.k_proj), _weight(a.v_proj)], 0)
                bias = None
                if _bias(a.q_proj) is not None:
                    bias = torch.cat([_bias(a.q_proj), _bias(a.k_proj), _bias(a.v_proj)], 0).contiguous()
                wgu = torch.cat([_weight(m.gate_proj), _weight(m.up_proj)], 0)
                fused.append((self._pack(wqkv, batch), bias, self._pack(_weight(a.o_proj), batch),
                              self._pack(wgu, batch), self._pack(_weight(m.down_proj), batch)))
            self._head = (self._pack(head.weight, batch), head.bias)
        self._fused = fused
        return True

    def release(self) -> None:
        """Free the decode weights (they are rebuilt by the next `prepare`)."""
        self._fused = []
        self._head = None

    @staticmethod
    def _can_prepack(weight: torch.Tensor, batch: int) -> bool:
        """Whether oneDNN can prepack weights for this CPU and dtype. A weight prepacked once for the call is
        read by the matmul directly; a plain one is repacked at every call of every step (measured here: the decode
        matmuls of SmolLM2-135M at batch 32 in bf16 run 1.29x faster, the output projection 1.34x;
        `benchmarks/decode_ops.py`).
        Checked against `F.linear` on a probe, and never used off the CPU or if the operators are missing."""
        if weight.device.type != "cpu" or not torch.backends.mkldnn.is_available():
            return False
        try:
            probe_w = weight[:64].detach().clone()
            probe_x = torch.randn(batch, weight.shape[1], generator=torch.Generator().manual_seed(0)).to(weight.dtype)
            got = torch.ops.mkldnn._linear_pointwise(
                probe_x, torch.ops.mkldnn._reorder_linear_weight(probe_w, batch), None, "none", [], "")
            ref = F.linear(probe_x, probe_w)
        except (RuntimeError, AttributeError, NotImplementedError):
            return False
        return bool(torch.allclose(got.float(), ref.float(), rtol=1e-2, atol=1e-2 * float(ref.abs().max())))

    def _pack(self, weight: torch.Tensor, batch: int) -> torch.Tensor:
        if self._packed:
            return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), batch)
        return weight.detach().contiguous()

    def _linear(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        if self._packed:
            return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
        return F.linear(x, weight, bias)

    @staticmethod
    def _rms(x: torch.Tensor, norm: Any) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon)
        return norm.weight * h.to(x.dtype)

    @torch.inference_mode()
    def step(self, tokens: torch.Tensor, positions: torch.Tensor, cache: Any, state: LeanCache, col: int,
             mask: torch.Tensor, prefix: int = 0, groups: RowGroups | None = None) -> torch.Tensor:
        """Logits [B, V] of the next token after `tokens` [B] at `positions` [B], written to cache column `col`.

        `state`: this call's `LeanCache` for `cache` (the first step takes each layer over).

        `mask` [B, cache width] (bool) marks the cache columns each row attends to, the new column included.
        `prefix`: the first `prefix` columns hold the same tokens at the same positions in every row and every
        row attends to all of them (the caller guarantees it); their attention is computed once for the batch.
        `groups`: rows of one group hold the same tokens in the next `groups.cols` columns (the caller guarantees
        it, and that the mask agrees); their attention is computed once per group.
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
        end = prefix + (groups.cols if groups is not None else 0)  # first column a row reads on its own
        after = mask[:, prefix:]
        neg = torch.zeros(after.shape, dtype=torch.float32, device=x.device).masked_fill_(~after, float("-inf"))
        neg = neg[:, None, None, :]  # [B, 1, 1, W - P]
        for i, (layer, (wqkv, bqkv, wo, wgu, wdown)) in enumerate(zip(self.layers, self._fused, strict=True)):
            h = self._rms(x, layer.input_layernorm)
            qkv = self._linear(h, wqkv, bqkv)  # [B, (nh + 2 nkv) hd]
            q = qkv[:, :nh * hd].view(b, nh, hd)
            k = qkv[:, nh * hd:(nh + nkv) * hd].view(b, nkv, hd)
            v = qkv[:, (nh + nkv) * hd:].view(b, nkv, hd)
            qk = torch.cat([q, k], 1)  # rotary on queries and keys at once
            rot = torch.cat([-qk[..., half:], qk[..., :half]], -1)
            qk = qk * cos + rot * sin
            q, k = (qk[:, :nh] * scaling).reshape(b, nkv, group, hd), qk[:, nh:]
            lean = state.layers[i]
            if lean is None:
                lean = state.layers[i] = LeanLayer.take(cache.layers[i], prefix, groups)
            kp, vp, kg, vg, ks, vs = lean.kp, lean.vp, lean.kg, lean.vg, lean.k, lean.v
            ks[:, :, col - end] = k
            vs[:, :, col - end] = v
            w = ks.shape[2]
            # each row's own columns: [B * nkv, W - end, hd] @ ... as contiguous matrices (see "Layout")
            scores = torch.bmm(ks.view(b * nkv, w, hd), q.reshape(b * nkv, group, hd).transpose(1, 2))
            scores = scores.transpose(1, 2).view(b, nkv, group, w)
            if groups is not None:  # a group's columns: one [rows * group, hd] @ [hd, G] matmul per group, kv head
                grp = torch.bmm(groups.gather(q), kg.view(-1, hd, groups.cols))
                scores = torch.cat([groups.scatter(grp, nkv), scores], -1)
            scores = scores.float() + neg
            if prefix:  # the shared columns: one [B * group, hd] @ [hd, P] matmul per kv head
                qh = q.permute(1, 0, 2, 3).reshape(nkv, b * group, hd)
                pre_scores = torch.bmm(qh, kp).view(nkv, b, group, prefix).permute(1, 0, 2, 3)
                scores = torch.cat([pre_scores.float(), scores], -1)
            probs = torch.softmax(scores, dim=-1).to(vs.dtype)
            out = torch.bmm(probs[..., end:].reshape(b * nkv, group, w), vs.view(b * nkv, w, hd))
            out = out.view(b, nkv, group, hd)
            if groups is not None:
                og = torch.bmm(groups.gather(probs[..., prefix:end]), vg.view(-1, groups.cols, hd))
                out = out + groups.scatter(og, nkv)
            if prefix:
                pp = probs[..., :prefix].permute(1, 0, 2, 3).reshape(nkv, b * group, prefix)
                out = out + torch.bmm(pp, vp).view(nkv, b, group, hd).permute(1, 0, 2, 3)
            x = x + self._linear(out.reshape(b, nh * hd), wo)
            h = self._rms(x, layer.post_attention_layernorm)
            gu = self._linear(h, wgu)
            inter = gu.shape[-1] // 2
            x = x + self._linear(F.silu(gu[:, :inter]) * gu[:, inter:], wdown)
        x = self._rms(x, self.inner.norm)
        return self._linear(x, *self._head)
