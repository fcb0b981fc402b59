"""Batched sampling from a causal LM behind a small backend interface.

A backend takes a batch of token-id prompts and returns, for each, the sampled tokens and each sampled
token's log-probability under the sampling distribution, `log_softmax(logits / temperature)` before any top-k
or top-p truncation (what PPO's ratio needs). Two backends:

- `hf`: Hugging Face `generate`, the reference.
- `kv` (default): our own decode loop over the model's forward with a KV cache. It exists because `generate`
  spends most of its time outside the model on CPU (see `benchmarks/rollout.py`): this loop computes logits for
  the last position only, samples in one fused step, and drops finished sequences from the cache as it goes.

A faster engine (vLLM, SGLang, llama.cpp) can slot in by implementing `GenerationBackend`. This module must
never know about environments or prompts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import torch

from spa_rl.lean_decode import LeanDecoder, RowGroups, cache_rows


@dataclass(frozen=True)
class SamplingConfig:
    """How to sample a response."""

    max_new_tokens: int = 256
    """Tokens generated at most per response."""
    temperature: float = 1.0
    """Softmax temperature; 0 means greedy decoding."""
    top_p: float = 1.0
    """Nucleus sampling mass (1.0: off)."""
    top_k: int = 0
    """Keep only the k most likely tokens (0: off)."""


@dataclass
class Generation:
    """One sampled response."""

    token_ids: list[int]
    """Generated tokens, including the stop token when one was produced."""
    logprobs: list[float]
    """Log-probability of each generated token under `log_softmax(logits / temperature)` (greedy: temperature 1)."""
    finished: bool
    """True if a stop token ended the response, False if `max_new_tokens` did."""


class GenerationBackend(Protocol):
    """Anything that can sample a batch of responses."""

    def generate(self, prompts: list[list[int]], config: SamplingConfig,
                 generator: torch.Generator | None = None) -> list[Generation]: ...


def stop_token_ids(model: Any, tokenizer: Any) -> list[int]:
    """The ids that end an assistant turn: the generation config's EOS id(s), plus the tokenizer's EOS."""
    ids: set[int] = set()
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if isinstance(eos, int):
        ids.add(eos)
    elif eos:
        ids.update(int(i) for i in eos)
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    return sorted(ids)


def _left_pad(prompts: list[list[int]], pad_id: int, device: Any) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        if p:
            ids[i, width - len(p):] = torch.tensor(p, dtype=torch.long)
            mask[i, width - len(p):] = 1
    return ids.to(device), mask.to(device)


def sample_next(logits: torch.Tensor, config: SamplingConfig,
                generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample one token per row from last-position `logits` [B, V]: (tokens [B], their log-probs [B])."""
    logits = logits.float()
    if config.temperature <= 0:
        tokens = logits.argmax(dim=-1)
        chosen = logits.gather(1, tokens[:, None]).squeeze(1)
        return tokens, chosen - torch.logsumexp(logits, dim=-1)
    scaled = logits / config.temperature if config.temperature != 1.0 else logits
    probs = torch.softmax(scaled, dim=-1)  # one fused pass (max, exp and sum as separate ops take ~2x longer)
    weights = probs
    if config.top_k and config.top_k < weights.shape[-1]:
        kth = torch.topk(weights, config.top_k, dim=-1).values[:, -1:]
        weights = weights.masked_fill(weights < kth, 0.0)
    if config.top_p < 1.0:
        sorted_w, order = torch.sort(weights, dim=-1, descending=True)
        cum = sorted_w.cumsum(dim=-1)
        drop = (cum - sorted_w) > config.top_p * cum[:, -1:]
        weights = weights.scatter(1, order, sorted_w.masked_fill(drop, 0.0))
    tokens = sample_weighted(weights, generator)
    return tokens, probs.gather(1, tokens[:, None]).squeeze(1).log()  # never log(0): zero weights are not drawn


def sample_weighted(weights: torch.Tensor, generator: torch.Generator | None, block: int = 256) -> torch.Tensor:
    """One index per row of `weights` [B, V] (non-negative, each row with some positive weight), drawn with
    probability proportional to its weight: inverse-CDF sampling in two levels (pick a block of `block`
    columns from the block sums, then a column inside it), so only one block per row needs a cumulative sum
    (one cumulative sum over whole rows, itself ~10x faster than `torch.multinomial` on CPU, was the slowest
    part of sampling; `benchmarks/decode_ops.py`). The index is always below V, and never one of zero weight
    while a row's total weight is a normal float (softmax outputs: total ~1)."""
    b, v = weights.shape
    if v % block:
        weights = torch.nn.functional.pad(weights, (0, block - v % block))
    blocks = weights.view(b, -1, block)
    cdf = blocks.sum(-1).cumsum(-1)  # [B, blocks]
    total = cdf[:, -1:]
    # u < total strictly, so the chosen block (cdf jumps above u there) has positive mass
    u = torch.minimum(torch.rand((b, 1), generator=generator, device=weights.device) * total, total * (1 - 2**-20))
    bi = torch.searchsorted(cdf, u, right=True).clamp_(max=cdf.shape[1] - 1)
    before = torch.where(bi > 0, cdf.gather(1, (bi - 1).clamp(min=0)), torch.zeros_like(u))
    inner = blocks[torch.arange(b, device=weights.device), bi[:, 0]].cumsum(-1)  # [B, block]
    r = torch.minimum((u - before).clamp_(min=0), inner[:, -1:] * (1 - 2**-20))
    ti = torch.searchsorted(inner, r, right=True).clamp_(max=block - 1)
    return (bi * block + ti).squeeze(1).clamp_(max=v - 1)


def decode_attention(module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                     **kwargs: Any) -> tuple[torch.Tensor, None]:
    """Attention for one new token per row over a static KV cache: two small batched matmuls.

    On CPU, PyTorch's fused attention kernel is slow for a single query (measured 10x slower here), so
    decoding steps use this; everything else (prefill, training) goes to the standard SDPA implementation.
    Grouped-query attention is handled by folding the query heads of a group into rows. A mask narrower than
    the static cache means the columns after it are unused: they are not read.
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if query.shape[2] != 1 or dropout > 0.0 or module.training:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    b, h, _, d = query.shape
    kvh = key.shape[1]
    if attention_mask is not None and attention_mask.shape[-1] < key.shape[-2]:
        key, value = key[:, :, :attention_mask.shape[-1]], value[:, :, :attention_mask.shape[-1]]
    scores = torch.matmul(query.reshape(b, kvh, h // kvh, d), key.transpose(-1, -2))
    scores = scores * (scaling if scaling is not None else d ** -0.5)
    if attention_mask is not None:
        if attention_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attention_mask, float("-inf"))
        else:
            scores = scores + attention_mask
    probs = torch.softmax(scores.float(), dim=-1).to(value.dtype)
    out = torch.matmul(probs, value)  # [b, kvh, group, d]
    return out.reshape(b, h, 1, d).transpose(1, 2), None


def _register_decode_attention() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register("spa_decode", decode_attention)
    AttentionMaskInterface.register("spa_decode", sdpa_mask)


def _common_prefix(seqs: list[list[int]], limit: int) -> int:
    """Length of the longest prefix all `seqs` share, at most `limit`."""
    n = 0
    while n < limit and all(s[n] == seqs[0][n] for s in seqs):
        n += 1
    return n


@dataclass
class _Stored:
    """The KV cache a previous `generate` call left behind, row by row, for prompts that continue it."""

    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    mask: torch.Tensor
    """[rows, columns] 1 where a column holds one of the row's tokens."""
    next_pos: torch.Tensor
    """Position id of each row's next token."""
    seqs: list[list[int]]
    """The tokens each row's cache holds (its prompt and all but the last response token)."""
    index: dict[tuple[int, int], int]
    """(length, hash of the tokens) -> row."""


class KVCacheBackend:
    """Our decode loop: a batched prefill, then one token per step into a preallocated (static) KV cache.

    - Logits are computed for the last position only; sampling is one fused step for the whole batch.
    - Prefill is shared: identical prompts are computed once, and a prefix common to all of them once.
    - Multi-turn reuse: the cache of the previous call is kept, and a prompt that continues one of its rows
      (the next turn of the same conversation) only prefills its new tokens.
    - Rows that finish leave the batch once a quarter of it has finished (their cache is set aside for reuse).
    - Decoding steps of Llama-family models (Llama, Qwen2, SmolLM2) run through `LeanDecoder`: the same maths
      in a few fused operations per layer, with the prompt prefix all rows share attended once for the batch.
      Other models use their own forward, with the attention switched on CPU to `decode_attention` (same
      maths, a faster kernel for single-token steps).
    Rows may have holes (padding) anywhere: the attention mask and explicit position ids take care of them.
    """

    def __init__(self, model: Any, tokenizer: Any, compact_every: float = 0.25, reuse: bool = True,
                 lean: bool = True) -> None:
        self.model = model
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.stop_ids = stop_token_ids(model, tokenizer)
        self.compact_every = compact_every
        self.reuse = reuse
        self._stored: _Stored | None = None
        device = next(model.parameters()).device
        if device.type == "cpu" and getattr(model.config, "_attn_implementation", None) in ("sdpa", "spa_decode"):
            _register_decode_attention()
            model.set_attn_implementation("spa_decode")
        # decode_attention reads only the cache columns the mask covers; other kernels need the full width
        self._narrow_mask = getattr(model.config, "_attn_implementation", None) == "spa_decode"
        self._lean = LeanDecoder.build(model) if lean else None

    def reset(self) -> None:
        """Forget the kept cache (frees its memory)."""
        self._stored = None

    @staticmethod
    def _select_rows(cache: Any, index: torch.Tensor) -> bool:
        """Keep/duplicate the cache's batch rows `index` (False if the cache layout is unknown)."""
        try:
            for layer in cache.layers:
                if layer.keys is not None:  # (None: the lean decoder's copies hold the layer)
                    layer.keys = layer.keys.index_select(0, index)
                    layer.values = layer.values.index_select(0, index)
                for name in ("lean_k", "lean_v"):  # the lean decoder's per-row copies, if any
                    if getattr(layer, name, None) is not None:
                        setattr(layer, name, getattr(layer, name).index_select(0, index))
        except AttributeError:
            return False
        return True

    def _new_cache(self, max_len: int) -> Any:
        from transformers import StaticCache

        return StaticCache(config=self.model.config, max_cache_len=max_len)

    def _forward(self, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, cache: Any,
                 start: int) -> torch.Tensor:
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=cache,
                         use_cache=True, logits_to_keep=1,
                         cache_position=torch.arange(start, start + ids.shape[1], device=ids.device))
        return out.logits[:, -1, :]

    def _prefill(self, prompts: list[list[int]], max_new_tokens: int, device: Any) -> tuple:
        """Fresh prefill with sharing. Returns (cache, mask [n, width + max_new], last logits [n, V],
        position of each row's last prompt token [n], number of leading columns every row shares, and for rows
        that are copies of one prompt: (each row's prompt index, number of prompts, columns they share after
        the leading ones), else None)."""
        unique: dict[tuple[int, ...], int] = {}
        row_of = [unique.setdefault(tuple(p), len(unique)) for p in prompts]
        uniq = [list(p) for p in unique]
        common = _common_prefix(uniq, min(len(p) for p in uniq) - 1)
        u = len(uniq)
        ids, suffix_mask = _left_pad([p[common:] for p in uniq], self.pad_id, device)
        width = common + ids.shape[1]
        cache = self._new_cache(width + max_new_tokens)
        mask = torch.zeros((u, width + max_new_tokens), dtype=torch.long, device=device)
        mask[:, :common] = 1
        mask[:, common:width] = suffix_mask
        if common > 0:
            prefix = torch.tensor([uniq[0][:common]], dtype=torch.long, device=device)
            self._forward(prefix, mask[:1], torch.arange(common, device=device)[None], cache, 0)
            if not self._select_rows(cache, torch.zeros(u, dtype=torch.long, device=device)):
                common = -1
        if common < 0:  # unknown cache layout: plain left-padded prefill
            cache = self._new_cache(width + max_new_tokens)
            ids, pmask = _left_pad(uniq, self.pad_id, device)
            mask = torch.cat([pmask, torch.zeros((u, max_new_tokens), dtype=torch.long, device=device)], dim=1)
            common = 0
        positions = (mask[:, :width].cumsum(-1) - 1).clamp(min=0)[:, common:]
        logits, last = self._forward(ids, mask, positions, cache, common), positions[:, -1]
        if u < len(prompts):
            index = torch.tensor(row_of, dtype=torch.long, device=device)
            if not self._select_rows(cache, index):
                raise RuntimeError("cannot duplicate rows of this KV cache")
            return cache, mask[index], logits[index], last[index], common, (row_of, u, width - common)
        return cache, mask, logits, last, common, None

    def _match(self, prompts: list[list[int]]) -> list[int]:
        """For each prompt, the stored row whose tokens it continues (-1 if none)."""
        st = self._stored
        if st is None:
            return [-1] * len(prompts)
        lengths = sorted({n for n, _ in st.index}, reverse=True)
        rows = []
        for p in prompts:
            row = -1
            for n in lengths:
                if n < len(p):
                    r = st.index.get((n, hash(tuple(p[:n]))))
                    if r is not None and st.seqs[r] == p[:n]:
                        row = r
                        break
            rows.append(row)
        return rows

    def _prefill_continue(self, prompts: list[list[int]], rows: list[int], max_new_tokens: int,
                          device: Any) -> tuple:
        """Prefill that reuses the stored cache: matched rows keep their columns and add only their new tokens;
        other prompts are prefilled whole in the same batch (their old columns are holes)."""
        st = self._stored
        assert st is not None
        n = len(prompts)
        suffixes = [p[len(st.seqs[r]):] if r >= 0 else p for p, r in zip(prompts, rows, strict=True)]
        old = st.mask.shape[1]
        ids, smask = _left_pad(suffixes, self.pad_id, device)
        width = old + ids.shape[1]
        cache = self._new_cache(width + max_new_tokens)
        empty = st.keys[0].new_zeros((n, st.keys[0].shape[1], 0, st.keys[0].shape[3]))
        idx = torch.tensor([max(r, 0) for r in rows], dtype=torch.long, device=device)
        has = torch.tensor([r >= 0 for r in rows], device=device)
        for i, layer in enumerate(cache.layers):
            layer.lazy_initialization(empty, empty)  # layer by layer: old and new caches never both whole
            layer.keys[:, :, :old] = st.keys[i].index_select(0, idx)
            layer.values[:, :, :old] = st.values[i].index_select(0, idx)
            layer.cumulative_length.fill_(old)
            st.keys[i] = st.values[i] = None  # free as we go
        mask = torch.zeros((n, width + max_new_tokens), dtype=torch.long, device=device)
        mask[:, :old] = st.mask.index_select(0, idx) * has[:, None]
        mask[:, old:width] = smask
        start = torch.where(has, st.next_pos.index_select(0, idx), torch.zeros_like(idx))
        positions = start[:, None] + (smask.cumsum(-1) - 1).clamp(min=0)
        shared = 0  # stored rows are packed to the left: column j holds token j of the row's sequence
        if all(r >= 0 for r in rows):
            shared = _common_prefix(prompts, min(len(st.seqs[r]) for r in rows))
        self._stored = None  # its memory is not needed any more
        return cache, mask, self._forward(ids, mask, positions, cache, old), positions[:, -1], shared, None

    def _store(self, prompts: list[list[int]], tokens: list[list[int]], cache: Any, rows: list[int],
               parked: list[tuple[list[int], list[torch.Tensor], list[torch.Tensor], torch.Tensor]],
               mask: torch.Tensor, last: torch.Tensor, width: int, used: int, groups: RowGroups | None) -> None:
        """Keep every row's cache (live and set-aside rows) for the next call, each row's tokens packed to the
        left so that the next call attends over as few columns as possible. `groups`: the lean step's layout."""
        n = len(prompts)
        device = mask.device
        full_mask = torch.zeros((n, used), dtype=mask.dtype, device=device)
        live = torch.tensor(rows, dtype=torch.long, device=device)
        full_mask[live] = mask[:, :used]
        for idx, _, _, m in parked:
            full_mask[torch.tensor(idx, device=device)] = m[:, :used]
        fed = torch.tensor([max(len(t) - 1, 0) for t in tokens], device=device)
        cols = torch.arange(used, device=device)[None, :]
        valid = full_mask.bool() & ~((cols >= width) & (cols >= width + fed[:, None]))
        counts = valid.sum(1)
        packed_len = int(counts.max())
        order = torch.argsort((~valid).to(torch.int8), dim=1, stable=True)[:, :packed_len]
        keys, values = [], []
        for li, layer in enumerate(cache.layers):
            live_kv = cache_rows(layer, None, used, groups)
            for pi, out in enumerate((keys, values)):  # 0: keys, 1: values
                src = live_kv[pi]
                h, d = src.shape[1], src.shape[3]
                full = src.new_zeros((n, h, used, d))
                full[live] = src
                for idx, pk, pv, _ in parked:
                    part = (pk, pv)[pi][li]
                    w = min(used, part.shape[2])
                    full[torch.tensor(idx, device=device), :, :w] = part[:, :, :w]
                out.append(torch.gather(full, 2, order[:, None, :, None].expand(n, h, packed_len, d)))
            layer.keys = layer.values = None  # free as we go
            layer.lean_kp = layer.lean_vp = layer.lean_kg = layer.lean_vg = layer.lean_k = layer.lean_v = None
        packed_mask = (torch.arange(packed_len, device=device)[None, :] < counts[:, None]).to(mask.dtype)
        seqs = [list(p) + t[:-1] for p, t in zip(prompts, tokens, strict=True)]
        index = {(len(sq), hash(tuple(sq))): i for i, sq in enumerate(seqs)}
        self._stored = _Stored(keys, values, packed_mask, last + 1 + fed, seqs, index)

    @torch.inference_mode()
    def generate(self, prompts: list[list[int]], config: SamplingConfig,
                 generator: torch.Generator | None = None) -> list[Generation]:
        if not prompts:
            return []
        device = next(self.model.parameters()).device
        rows_in_store = self._match(prompts) if self.reuse else [-1] * len(prompts)
        if any(r >= 0 for r in rows_in_store):
            cache, mask, logits, last, shared, copies = self._prefill_continue(prompts, rows_in_store,
                                                                               config.max_new_tokens, device)
        else:
            self._stored = None
            cache, mask, logits, last, shared, copies = self._prefill(prompts, config.max_new_tokens, device)
        prompt_last = last.clone()
        width = mask.shape[1] - config.max_new_tokens
        stop = torch.tensor(self.stop_ids, device=device)
        n = len(prompts)
        tokens: list[list[int]] = [[] for _ in range(n)]
        logprobs: list[list[float]] = [[] for _ in range(n)]
        finished = [False] * n
        rows = list(range(n))  # batch row -> prompt index
        parked: list = []
        next_pos = last + 1
        used = width
        mask4: torch.Tensor | None = None
        lean = self._lean is not None and not self.model.training and self._lean.prepare(n)
        groups: RowGroups | None = None  # rows that are copies of one prompt, for the lean step
        for step in range(config.max_new_tokens):
            tok, lp = sample_next(logits, config, generator)
            done_now = torch.isin(tok, stop)
            tok_l, lp_l, done_l = tok.tolist(), lp.tolist(), done_now.tolist()
            for r, i in enumerate(rows):
                if finished[i]:  # finished earlier, not compacted away yet: ignore its samples
                    continue
                tokens[i].append(tok_l[r])
                logprobs[i].append(lp_l[r])
                finished[i] = done_l[r]
            alive = [r for r, i in enumerate(rows) if not finished[i]]
            if not alive or step + 1 == config.max_new_tokens:
                break
            if len(alive) <= len(rows) * (1 - self.compact_every):
                gone = [r for r in range(len(rows)) if r not in set(alive)]
                if self.reuse:
                    g = torch.tensor(gone, device=device)
                    kv = [cache_rows(la, g, used, groups) for la in cache.layers]
                    parked.append(([rows[r] for r in gone], [k for k, _ in kv], [v for _, v in kv], mask[g].clone()))
                keep = torch.tensor(alive, device=device)
                if self._select_rows(cache, keep):
                    mask, tok, next_pos = mask[keep], tok[keep], next_pos[keep]
                    rows = [rows[r] for r in alive]
                    groups = None
                elif self.reuse:
                    parked.pop()
            col = width + step
            mask[:, col] = 1
            used = col + 1
            if mask4 is None or mask4.shape[0] != mask.shape[0]:
                mask4 = mask[:, None, None, :].bool()
            mask4[:, 0, 0, col] = True
            # a ready 4D mask skips the model's mask construction at every step; cut at the last used column, it
            # also keeps decode_attention from reading the unused end of the static cache
            if lean:
                if groups is None and copies is not None:
                    groups = RowGroups.of([copies[0][i] for i in rows], copies[2], copies[1], device)
                logits = self._lean.step(tok, next_pos, cache, col, mask4[:, 0, 0], prefix=shared, groups=groups)
            else:
                step_mask = mask4[..., :used] if self._narrow_mask else mask4
                out = self.model(input_ids=tok[:, None], attention_mask=step_mask,
                                 position_ids=next_pos[:, None], past_key_values=cache, use_cache=True,
                                 cache_position=torch.tensor([col], device=device))
                logits = out.logits[:, -1, :]
            next_pos = next_pos + 1
        if lean:  # the lean step writes the cache directly: set its length counters
            self._lean.release()
            for layer in cache.layers:
                layer.cumulative_length.fill_(used)
        if self.reuse:
            self._store(prompts, tokens, cache, rows, parked, mask, prompt_last, width, used, groups)
        return [Generation(tokens[i], logprobs[i], finished[i]) for i in range(n)]


class HFGenerateBackend:
    """Hugging Face `generate` with sampling; log-probs recomputed from the returned logits."""

    def __init__(self, model: Any, tokenizer: Any) -> None:
        self.model = model
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.stop_ids = stop_token_ids(model, tokenizer)

    @torch.inference_mode()
    def generate(self, prompts: list[list[int]], config: SamplingConfig,
                 generator: torch.Generator | None = None) -> list[Generation]:
        if not prompts:
            return []
        device = next(self.model.parameters()).device
        ids, mask = _left_pad(prompts, self.pad_id, device)
        if generator is not None:  # generate has no generator argument: seed the global RNG from ours
            torch.manual_seed(int(torch.randint(0, 2**62, (1,), generator=generator)))
        greedy = config.temperature <= 0
        out = self.model.generate(
            input_ids=ids, attention_mask=mask, max_new_tokens=config.max_new_tokens, do_sample=not greedy,
            temperature=None if greedy else config.temperature, top_p=None if greedy else config.top_p,
            top_k=None if greedy else (config.top_k or None), eos_token_id=self.stop_ids, pad_token_id=self.pad_id,
            return_dict_in_generate=True, output_logits=True)
        new = out.sequences[:, ids.shape[1]:]
        temp = 1.0 if greedy else config.temperature
        logp = torch.stack([torch.log_softmax(step.float() / temp, dim=-1) for step in out.logits], dim=1)
        chosen = logp.gather(2, new[:, :, None]).squeeze(2)
        result = []
        for i in range(len(prompts)):
            toks, lps = new[i].tolist(), chosen[i].tolist()
            end = next((j for j, t in enumerate(toks) if t in self.stop_ids), None)
            if end is not None:
                result.append(Generation(toks[:end + 1], lps[:end + 1], True))
            else:
                result.append(Generation(toks, lps, False))
        return result


BACKENDS = {"kv": KVCacheBackend, "hf": HFGenerateBackend}


def make_backend(name: str, model: Any, tokenizer: Any) -> GenerationBackend:
    """The backend called `name` (`kv` or `hf`) for this model."""
    from spa_rl.errors import UnknownNameError

    if name not in BACKENDS:
        raise UnknownNameError(f"unknown generation backend {name!r}: use one of {', '.join(BACKENDS)}")
    return BACKENDS[name](model, tokenizer)
