"""The `kv` generation backend: our own decode loop over the model's forward with a static KV cache.

It exists because Hugging Face `generate` spends most of its time outside the model on CPU (see
`benchmarks/rollout.py`): this loop computes logits for the last position only, samples in one fused step,
shares prefill between identical prompts and a common prefix, keeps the previous turn's cache for the next,
drops finished sequences from the batch as it goes, and runs the decode steps of Llama-family models through
`lean.LeanDecoder`. This module must never know about environments or prompts.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

import torch
from transformers import AttentionInterface, StaticCache
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from spa_rl.generation.lean import LeanCache, LeanDecoder, RowGroups, cache_rows
from spa_rl.generation.sampling import Generation, SamplingConfig, sample_next, stop_token_ids


def left_pad(prompts: list[list[int]], pad_id: int, device: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, mask) [n, longest]: the prompts right-aligned, `pad_id` and mask 0 before each."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        if p:
            ids[i, width - len(p):] = torch.tensor(p, dtype=torch.long)
            mask[i, width - len(p):] = 1
    return ids.to(device), mask.to(device)


def decode_attention(module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                     **kwargs: Any) -> tuple[torch.Tensor, None]:
    """Attention for one new token per row over a static KV cache: two small batched matmuls.

    On CPU, PyTorch's fused attention kernel is slow for a single query (measured 10x slower here), so
    decoding steps use this; everything else (prefill, training) goes to the standard SDPA implementation.
    Grouped-query attention is handled by folding the query heads of a group into rows. A mask narrower than
    the static cache means the columns after it are unused: they are not read.
    """
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


def cache_argument(model: Any) -> str:
    """The name under which this model's forward takes a KV cache (`cache` since transformers 5.24, before it
    `past_key_values`, which newer versions still accept with a deprecation warning)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"


def _set_length(layer: Any, n: int) -> None:
    """Tell a static cache layer that its first `n` columns are filled, where it keeps count (transformers 5.24
    counts in `cumulative_length`; 5.0 does not count, every call passing `cache_position` instead)."""
    length = getattr(layer, "cumulative_length", None)
    if isinstance(length, torch.Tensor):
        length.fill_(n)
    elif length is not None:
        layer.cumulative_length = n


@dataclass
class _Copies:
    """Rows that are copies of one prompt (a group's samples): the lean step attends their shared columns once."""

    prompt_of_row: list[int]
    """Each row's prompt index."""
    prompts: int
    """Number of distinct prompts."""
    cols: int
    """Columns the copies share after the columns every row shares."""


@dataclass
class _Prefill:
    """The state a prefill leaves for decoding."""

    cache: Any
    """The `StaticCache`, sized for the prompts and `max_new_tokens`."""
    mask: torch.Tensor
    """[n, width + max_new_tokens] 1 where a column holds one of the row's tokens."""
    logits: torch.Tensor
    """[n, V] logits after each row's last prompt token."""
    last: torch.Tensor
    """[n] position id of each row's last prompt token."""
    shared: int
    """Leading columns every row shares (same tokens at the same positions)."""
    copies: _Copies | None
    """Rows that are copies of one prompt, or None."""


@dataclass
class _Parked:
    """Rows that finished and left the batch, their cache kept for the next call."""

    rows: list[int]
    """Their prompt indices."""
    keys: list[torch.Tensor]
    """Per layer [rows, nkv, used, hd]."""
    values: list[torch.Tensor]
    mask: torch.Tensor
    """[rows, columns] their attention mask."""


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
        self._cache_kw = cache_argument(model)

    def reset(self) -> None:
        """Forget the kept cache (frees its memory)."""
        self._stored = None

    @staticmethod
    def _select_rows(cache: Any, index: torch.Tensor, lean: LeanCache | None = None) -> bool:
        """Keep/duplicate the cache's batch rows `index`, and the lean step's copies of them (False if the cache
        layout is unknown)."""
        try:
            for layer in cache.layers:
                if layer.keys is not None:  # (None: the lean step's copies hold the layer)
                    layer.keys = layer.keys.index_select(0, index)
                    layer.values = layer.values.index_select(0, index)
        except AttributeError:
            return False
        if lean is not None:
            lean.select_rows(index)
        return True

    def _new_cache(self, max_len: int) -> Any:
        return StaticCache(config=self.model.config, max_cache_len=max_len)

    def _forward(self, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, cache: Any,
                 start: int) -> torch.Tensor:
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, **{self._cache_kw: cache},
                         use_cache=True, logits_to_keep=1,
                         cache_position=torch.arange(start, start + ids.shape[1], device=ids.device))
        return out.logits[:, -1, :]

    def _prefill(self, prompts: list[list[int]], max_new_tokens: int, device: Any) -> _Prefill:
        """Fresh prefill with sharing: identical prompts computed once, the prefix they all share once."""
        unique: dict[tuple[int, ...], int] = {}
        row_of = [unique.setdefault(tuple(p), len(unique)) for p in prompts]
        uniq = [list(p) for p in unique]
        common = _common_prefix(uniq, min(len(p) for p in uniq) - 1)
        u = len(uniq)
        ids, suffix_mask = left_pad([p[common:] for p in uniq], self.pad_id, device)
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
            ids, pmask = left_pad(uniq, self.pad_id, device)
            mask = torch.cat([pmask, torch.zeros((u, max_new_tokens), dtype=torch.long, device=device)], dim=1)
            common = 0
        positions = (mask[:, :width].cumsum(-1) - 1).clamp(min=0)[:, common:]
        logits, last = self._forward(ids, mask, positions, cache, common), positions[:, -1]
        if u < len(prompts):
            index = torch.tensor(row_of, dtype=torch.long, device=device)
            if not self._select_rows(cache, index):
                raise RuntimeError("cannot duplicate rows of this KV cache")
            return _Prefill(cache, mask[index], logits[index], last[index], common, _Copies(row_of, u, width - common))
        return _Prefill(cache, mask, logits, last, common, None)

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
                          device: Any) -> _Prefill:
        """Prefill that reuses the stored cache: matched rows keep their columns and add only their new tokens;
        other prompts are prefilled whole in the same batch (their old columns are holes)."""
        st = self._stored
        assert st is not None
        n = len(prompts)
        suffixes = [p[len(st.seqs[r]):] if r >= 0 else p for p, r in zip(prompts, rows, strict=True)]
        old = st.mask.shape[1]
        ids, smask = left_pad(suffixes, self.pad_id, device)
        width = old + ids.shape[1]
        cache = self._new_cache(width + max_new_tokens)
        empty = st.keys[0].new_zeros((n, st.keys[0].shape[1], 0, st.keys[0].shape[3]))
        idx = torch.tensor([max(r, 0) for r in rows], dtype=torch.long, device=device)
        has = torch.tensor([r >= 0 for r in rows], device=device)
        for i, layer in enumerate(cache.layers):
            layer.lazy_initialization(empty, empty)  # layer by layer: old and new caches never both whole
            layer.keys[:, :, :old] = st.keys[i].index_select(0, idx)
            layer.values[:, :, :old] = st.values[i].index_select(0, idx)
            _set_length(layer, old)
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
        return _Prefill(cache, mask, self._forward(ids, mask, positions, cache, old), positions[:, -1], shared, None)

    def _store(self, prompts: list[list[int]], tokens: list[list[int]], cache: Any, lean: LeanCache | None,
               rows: list[int], parked: list[_Parked], mask: torch.Tensor, last: torch.Tensor, width: int, used: int,
               groups: RowGroups | None) -> None:
        """Keep every row's cache (live and set-aside rows) for the next call, each row's tokens packed to the
        left so that the next call attends over as few columns as possible. `groups`: the lean step's layout."""
        n = len(prompts)
        device = mask.device
        full_mask = torch.zeros((n, used), dtype=mask.dtype, device=device)
        live = torch.tensor(rows, dtype=torch.long, device=device)
        full_mask[live] = mask[:, :used]
        for pk in parked:
            full_mask[torch.tensor(pk.rows, device=device)] = pk.mask[:, :used]
        fed = torch.tensor([max(len(t) - 1, 0) for t in tokens], device=device)
        cols = torch.arange(used, device=device)[None, :]
        valid = full_mask.bool() & ~((cols >= width) & (cols >= width + fed[:, None]))
        counts = valid.sum(1)
        packed_len = int(counts.max())
        order = torch.argsort((~valid).to(torch.int8), dim=1, stable=True)[:, :packed_len]
        keys, values = [], []
        for li, layer in enumerate(cache.layers):
            live_kv = cache_rows(layer, lean.layers[li] if lean else None, None, used, groups)
            for pi, out in enumerate((keys, values)):  # 0: keys, 1: values
                src = live_kv[pi]
                h, d = src.shape[1], src.shape[3]
                full = src.new_zeros((n, h, used, d))
                full[live] = src
                for pk in parked:
                    part = (pk.keys, pk.values)[pi][li]
                    w = min(used, part.shape[2])
                    full[torch.tensor(pk.rows, device=device), :, :w] = part[:, :, :w]
                out.append(torch.gather(full, 2, order[:, None, :, None].expand(n, h, packed_len, d)))
            layer.keys = layer.values = None  # free as we go
            if lean:
                lean.layers[li] = None
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
            pre = self._prefill_continue(prompts, rows_in_store, config.max_new_tokens, device)
        else:
            self._stored = None
            pre = self._prefill(prompts, config.max_new_tokens, device)
        cache, mask, logits, last, shared, copies = pre.cache, pre.mask, pre.logits, pre.last, pre.shared, pre.copies
        del pre  # mask and logits are replaced as decoding goes
        prompt_last = last.clone()
        width = mask.shape[1] - config.max_new_tokens
        stop = torch.tensor(self.stop_ids, device=device)
        n = len(prompts)
        tokens: list[list[int]] = [[] for _ in range(n)]
        logprobs: list[list[float]] = [[] for _ in range(n)]
        finished = [False] * n
        rows = list(range(n))  # batch row -> prompt index
        parked: list[_Parked] = []
        next_pos = last + 1
        used = width
        mask4: torch.Tensor | None = None
        lean = self._lean is not None and not self.model.training and self._lean.prepare(n)
        lean_cache = LeanCache(len(cache.layers)) if lean else None
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
                    kv = [cache_rows(la, lean_cache.layers[i] if lean_cache else None, g, used, groups)
                          for i, la in enumerate(cache.layers)]
                    parked.append(_Parked([rows[r] for r in gone], [k for k, _ in kv], [v for _, v in kv],
                                          mask[g].clone()))
                keep = torch.tensor(alive, device=device)
                if self._select_rows(cache, keep, lean_cache):
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
                    groups = RowGroups.of([copies.prompt_of_row[i] for i in rows], copies.cols, copies.prompts, device)
                logits = self._lean.step(tok, next_pos, cache, lean_cache, col, mask4[:, 0, 0], prefix=shared,
                                         groups=groups)
            else:
                step_mask = mask4[..., :used] if self._narrow_mask else mask4
                out = self.model(input_ids=tok[:, None], attention_mask=step_mask,
                                 position_ids=next_pos[:, None], **{self._cache_kw: cache}, use_cache=True,
                                 cache_position=torch.tensor([col], device=device))
                logits = out.logits[:, -1, :]
            next_pos = next_pos + 1
        if lean:  # the lean step writes the cache directly: set its length counters
            self._lean.release()
            for layer in cache.layers:
                _set_length(layer, used)
        if self.reuse:
            self._store(prompts, tokens, cache, lean_cache, rows, parked, mask, prompt_last, width, used, groups)
        return [Generation(tokens[i], logprobs[i], finished[i]) for i in range(n)]
