"""Prefix-state cache for :mod:`thinktree.search.backends.hf`: a content-addressed LRU store plus three adapters.

The store (:class:`PrefixCache`) maps a token-id prefix to the model state after feeding exactly that prefix, for ONE
sequence: per-layer K/V tensors (attention models) or the per-layer conv/SSM recurrent state (Mamba). Keys are
``(length, rolling hash)``; a hit is confirmed by comparing the stored token ids, so a hash collision can never serve
a wrong prefix. It is bounded by the number of covered tokens and evicts least-recently-used entries.

An adapter owns the running decode batch and knows how to build it from cached entries, feed tokens, merge batches,
drop rows and cut one row's state back out into an entry:

* :class:`KVAdapter` — rows with different past lengths are LEFT-padded (past K/V padded with zeros, masked out by
  the 2D attention mask) and fed with explicit per-row ``position_ids``, so RoPE sees the real positions. Prefix
  remainders of different lengths are right-aligned in the input block; the holes between a row's past and its
  remainder are masked too.
* :class:`SSMAdapter` — Mamba's fixed-size state needs no padding, but HF's full-sequence scan ignores an incoming
  recurrent state, so a resumed row is fed ONE token per forward (rows right-aligned by remainder length, a
  sub-batch per step). Prefixes with no cached state are prefilled from zero state in one left-padded forward (exact:
  padded inputs are zeroed, so they leave a zero state) up to their last token, which then joins the catch-up.
* :class:`RecomputeAdapter` — the fallback for any other cache type: every forward re-runs the full left-padded
  sequences without a cache (correct, O(L^2), still batched).
"""

from __future__ import annotations

import inspect
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer, LinearAttentionLayer

__all__ = [
    "PrefixCache",
    "payload_bytes",
    "PrefillItem",
    "ModelCall",
    "KVAdapter",
    "SSMAdapter",
    "RecomputeAdapter",
    "make_adapter",
]

_MOD = (1 << 61) - 1
_BASE = 0x9E3779B97F4A7C15 % _MOD


def roll_hash(h: int, tokens: Iterable[int]) -> int:
    """Polynomial rolling hash of a token sequence, continued from ``h`` (the hash of the empty sequence is 0)."""
    for t in tokens:
        h = (h * _BASE + t + 1) % _MOD
    return h


def payload_bytes(payload: Any) -> int:
    """Bytes held by a cache payload: a tensor, or a tuple/list of tensors (None: 0)."""
    if payload is None:
        return 0
    if isinstance(payload, torch.Tensor):
        return payload.numel() * payload.element_size()
    return sum(payload_bytes(p) for p in payload)


class PrefixCache:
    """Content-addressed LRU store: ``(length, hash) -> (token ids, state payload)``, bounded by covered tokens AND by
    payload bytes (``max_bytes=None``: tokens only); least recently used entries go first."""

    def __init__(self, max_tokens: int, max_bytes: int | None = None) -> None:
        self.max_tokens = int(max_tokens)
        self.max_bytes = None if max_bytes is None else int(max_bytes)
        self._entries: OrderedDict[tuple[int, int], tuple[tuple[int, ...], Any, int]] = OrderedDict()
        self.tokens = 0
        self.bytes = 0
        self.evictions = 0

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: tuple[int, int]) -> bool:
        return key in self._entries

    def get(self, length: int, h: int, ids: Sequence[int]) -> Any | None:
        """The payload cached for ``ids[:length]`` (verified token by token), or None."""
        entry = self._entries.get((length, h))
        if entry is None or entry[0] != tuple(ids[:length]):
            return None
        self._entries.move_to_end((length, h))
        return entry[1]

    def _over(self) -> bool:
        return self.tokens > self.max_tokens or (self.max_bytes is not None and self.bytes > self.max_bytes)

    def put(self, ids: tuple[int, ...], h: int, payload: Any) -> None:
        key = (len(ids), h)
        if key in self._entries:
            self._entries.move_to_end(key)
            return
        size = payload_bytes(payload)
        if len(ids) > self.max_tokens or (self.max_bytes is not None and size > self.max_bytes):
            return
        self._entries[key] = (ids, payload, size)
        self.tokens += len(ids)
        self.bytes += size
        while self._over():
            (n, _), (_, _, b) = self._entries.popitem(last=False)
            self.tokens -= n
            self.bytes -= b
            self.evictions += 1

    def clear(self) -> None:
        self._entries.clear()
        self.tokens = 0
        self.bytes = 0


@dataclass
class PrefillItem:
    """One unique prefix to encode: its full ids, the cached length ``k`` and that entry's payload (None if k=0)."""

    ids: list[int]
    k: int = 0
    payload: Any = None


class ModelCall:
    """Calls a causal LM for the last position's logits, hiding the v4/v5 cache keyword differences."""

    def __init__(self, model: torch.nn.Module, device: torch.device) -> None:
        self.model, self.device = model, device
        base = model.get_base_model() if hasattr(model, "get_base_model") else model  # PEFT passes kwargs on
        params = inspect.signature(base.forward).parameters
        self.cache_kw = "cache" if "cache" in params else "past_key_values"
        self.accepts_positions = "position_ids" in params
        self.keep_kw = "logits_to_keep" if "logits_to_keep" in params else None
        self.calls = 0

    def __call__(self, input_ids, mask=None, positions=None, cache=None, use_cache: bool = True):
        kw: dict[str, Any] = {"input_ids": input_ids, "use_cache": use_cache}
        if mask is not None:
            kw["attention_mask"] = mask
        if positions is not None and self.accepts_positions:
            kw["position_ids"] = positions
        if cache is not None:
            kw[self.cache_kw] = cache
        if self.keep_kw:
            kw[self.keep_kw] = 1
        out = self.model(**kw)
        self.calls += 1
        new_cache = (
            getattr(out, "cache", None) if hasattr(out, "cache") else getattr(out, "past_key_values", None)
        )
        return out.logits[:, -1], new_cache


def _left_pad(seqs: Sequence[Sequence[int]], pad: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for r, s in enumerate(seqs):
        if s:
            ids[r, width - len(s) :] = torch.tensor(s, dtype=torch.long)
            mask[r, width - len(s) :] = 1
    return ids.to(device), mask.to(device)


class RecomputeAdapter:
    """No usable cache: the state is the list of full sequences; every feed re-runs them all (left-padded)."""

    kind = "recompute"
    stores = False
    dead_fraction = 0.0  # every fed token costs a full recompute: drop finished rows at once

    def __init__(self, call: ModelCall, pad_id: int, reason: str = "") -> None:
        self.call, self.pad_id, self.reason = call, pad_id, reason

    def _run(self, seqs: list[list[int]]) -> torch.Tensor:
        ids, mask = _left_pad(seqs, self.pad_id, self.call.device)
        positions = (mask.cumsum(1) - 1).clamp_min(0)
        logits, _ = self.call(ids, mask, positions, use_cache=False)
        return logits

    def prefill(self, items: list[PrefillItem]) -> tuple[list[list[int]], torch.Tensor, list]:
        seqs = [list(it.ids) for it in items]
        return seqs, self._run(seqs), []

    def feed(self, state: list[list[int]], tokens: torch.Tensor) -> tuple[torch.Tensor, int]:
        for s, t in zip(state, tokens.tolist()):
            s.append(t)
        return self._run(state), sum(len(s) - 1 for s in state)

    def select(self, state: list[list[int]], index: Sequence[int]) -> list[list[int]]:
        return [list(state[i]) for i in index]

    def merge(self, a: list[list[int]], b: list[list[int]]) -> list[list[int]]:
        return a + b

    def row_payload(self, state, b: int, drop_last: bool = False) -> None:
        return None


class KVState:
    """The running batch's K/V: an HF DynamicCache (rows left-padded), the 2D mask and each row's next position."""

    def __init__(self, cache: DynamicCache, mask: torch.Tensor, pos: torch.Tensor) -> None:
        self.cache, self.mask, self.pos = cache, mask, pos


def _kv_cache(kv: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> DynamicCache:
    cache = DynamicCache()
    for k, v in kv:
        layer = DynamicLayer()
        layer.lazy_initialization(k, v)
        layer.keys, layer.values = k, v
        cache.layers.append(layer)
    return cache


class KVAdapter:
    """Attention models with a plain DynamicCache: payload = one tensor ``(layers, 2, kv_heads, length, head_dim)``."""

    kind = "kv"
    stores = True
    # finished rows stay in the batch (wasted work) until they are 1/8 of it: each compaction copies all K/V
    dead_fraction = 0.125

    def __init__(self, call: ModelCall, pad_id: int, layers: int, heads: int, head_dim: int, dtype) -> None:
        self.call, self.pad_id = call, pad_id
        self.shape, self.dtype = (layers, heads, head_dim), dtype
        ctx = getattr(call.model.config, "max_position_embeddings", None)
        self.max_pos = ctx - 1 if isinstance(ctx, int) else None

    def prefill(self, items: list[PrefillItem]) -> tuple[KVState, torch.Tensor, list[tuple[int, Any]]]:
        n_layers, heads, dim = self.shape
        dev, U = self.call.device, len(items)
        lp = max(it.k for it in items)
        rw = max(len(it.ids) - it.k for it in items)
        past = torch.zeros((n_layers, 2, U, heads, lp, dim), dtype=self.dtype, device=dev)
        mask = torch.zeros((U, lp + rw), dtype=torch.long)
        ids = torch.full((U, rw), self.pad_id, dtype=torch.long)
        positions = torch.zeros((U, rw), dtype=torch.long)
        for u, it in enumerate(items):
            if it.k:
                past[:, :, u, :, lp - it.k :] = it.payload
                mask[u, lp - it.k : lp] = 1
            r = len(it.ids) - it.k
            ids[u, rw - r :] = torch.tensor(it.ids[it.k :], dtype=torch.long)
            positions[u, rw - r :] = torch.arange(it.k, len(it.ids))
            mask[u, lp + rw - r :] = 1
        cache = _kv_cache([(past[i, 0], past[i, 1]) for i in range(n_layers)]) if lp else None
        mask = mask.to(dev)
        logits, cache = self.call(ids.to(dev), mask, positions.to(dev), cache)
        pos = torch.tensor([len(it.ids) for it in items], dtype=torch.long, device=dev)
        state = KVState(cache, mask, pos)
        stored = [
            (u, self.row_payload(state, u, drop_last=True))
            for u, it in enumerate(items)
            if it.k < len(it.ids) - 1
        ]
        return state, logits, stored

    def feed(self, state: KVState, tokens: torch.Tensor) -> tuple[torch.Tensor, int]:
        """One token per row (a long tensor, one per row of the batch)."""
        state.mask = torch.cat([state.mask, state.mask.new_ones((state.mask.shape[0], 1))], dim=1)
        ids = tokens.to(self.call.device)[:, None]
        positions = state.pos[:, None]
        if self.max_pos is not None:  # only dead rows (fed padding until compaction) can run past the context
            positions = positions.clamp_max(self.max_pos)
        logits, state.cache = self.call(ids, state.mask, positions, state.cache)
        state.pos = state.pos + 1
        return logits, 0

    def select(self, state: KVState, index: Sequence[int]) -> KVState:
        """Keep (or repeat) rows ``index``; drop leading columns that no remaining row uses."""
        idx = torch.tensor(list(index), dtype=torch.long, device=state.mask.device)
        mask = state.mask.index_select(0, idx)
        first = int(mask.any(0).long().argmax()) if mask.numel() else 0
        mask = mask[:, first:]
        for layer in state.cache.layers:
            layer.keys = layer.keys.index_select(0, idx)[:, :, first:]
            layer.values = layer.values.index_select(0, idx)[:, :, first:]
        return KVState(state.cache, mask, state.pos.index_select(0, idx))

    def merge(self, a: KVState, b: KVState) -> KVState:
        """Rows of ``a`` then rows of ``b``, both left-padded to the longer past."""
        width = max(a.mask.shape[1], b.mask.shape[1])

        def pad(t: torch.Tensor, dim: int) -> torch.Tensor:
            extra = width - t.shape[dim]
            if not extra:
                return t
            return torch.cat([t.new_zeros((*t.shape[:dim], extra, *t.shape[dim + 1 :])), t], dim)

        for la, lb in zip(a.cache.layers, b.cache.layers):
            la.keys = torch.cat([pad(la.keys, 2), pad(lb.keys, 2)])
            la.values = torch.cat([pad(la.values, 2), pad(lb.values, 2)])
        return KVState(a.cache, torch.cat([pad(a.mask, 1), pad(b.mask, 1)]), torch.cat([a.pos, b.pos]))

    def row_payload(self, state: KVState, b: int, drop_last: bool = False) -> torch.Tensor:
        """Row ``b``'s real (unmasked) columns as a standalone payload, optionally without the last fed token."""
        cols = state.mask[b].nonzero().squeeze(1)
        if drop_last:
            cols = cols[:-1]
        return torch.stack(
            [
                torch.stack([lay.keys[b].index_select(1, cols), lay.values[b].index_select(1, cols)])
                for lay in state.cache.layers
            ]
        )


class SSMState:
    """The running batch's Mamba state: ``conv (layers, B, C, K)``, ``ssm (layers, B, C, N)`` and the HF cache over them."""

    def __init__(self, conv: torch.Tensor, ssm: torch.Tensor, cache: DynamicCache) -> None:
        self.conv, self.ssm, self.cache = conv, ssm, cache


class SSMAdapter:
    """Mamba-style models (one conv + one recurrent state per layer): payload = ``(conv[:, b], ssm[:, b])``."""

    kind = "ssm"
    stores = True
    dead_fraction = 0.125

    def __init__(self, call: ModelCall, pad_id: int, config, conv_shape, ssm_shape, dtypes) -> None:
        self.call, self.pad_id, self.config = call, pad_id, config
        self.conv_shape, self.ssm_shape, self.dtypes = tuple(conv_shape), tuple(ssm_shape), dtypes

    def _state(self, conv: torch.Tensor, ssm: torch.Tensor) -> SSMState:
        """Wrap stacked states in an HF cache whose layers VIEW them (the model updates states in place)."""
        cache = DynamicCache(config=self.config)
        for i, layer in enumerate(cache.layers):
            layer.conv_states[0], layer.recurrent_states[0] = conv[i], ssm[i]
            layer.conv_kernel_size[0] = conv.shape[-1]
            layer.is_conv_states_initialized[0] = layer.is_recurrent_states_initialized[0] = True
            layer.has_previous_state[0] = True
            layer.device, layer.dtype = conv.device, conv.dtype
        return SSMState(conv, ssm, cache)

    def _zeros(self, n: int) -> SSMState:
        dev, layers = self.call.device, self.conv_shape[0]
        conv = torch.zeros((layers, n, *self.conv_shape[1:]), dtype=self.dtypes[0], device=dev)
        ssm = torch.zeros((layers, n, *self.ssm_shape[1:]), dtype=self.dtypes[1], device=dev)
        return self._state(conv, ssm)

    def _from_scratch(self, state: SSMState, rows: list[int], seqs: list[list[int]]) -> None:
        """Prefill ``seqs`` from zero state in one left-padded forward; write the states into ``rows``."""
        ids, mask = _left_pad(seqs, self.pad_id, self.call.device)
        _, cache = self.call(ids, mask if len(seqs) > 1 else None)
        idx = torch.tensor(rows, dtype=torch.long, device=state.conv.device)
        for i, layer in enumerate(cache.layers):
            state.conv[i].index_copy_(0, idx, layer.conv_states[0].to(state.conv.dtype))
            state.ssm[i].index_copy_(0, idx, layer.recurrent_states[0].to(state.ssm.dtype))

    def prefill(self, items: list[PrefillItem]) -> tuple[SSMState, torch.Tensor, list[tuple[int, Any]]]:
        state, ks = self._zeros(len(items)), [it.k for it in items]
        for u, it in enumerate(items):
            if it.k:
                state.conv[:, u], state.ssm[:, u] = it.payload
        fresh = [u for u, it in enumerate(items) if it.k == 0 and len(it.ids) >= 2]
        stored = []
        if fresh:
            self._from_scratch(state, fresh, [items[u].ids[:-1] for u in fresh])
            for u in fresh:
                ks[u] = len(items[u].ids) - 1
                stored.append((u, self.row_payload(state, u)))
        rems = [it.ids[k:] for it, k in zip(items, ks)]
        width = max(len(r) for r in rems)
        for t in range(width):  # right-aligned catch-up, one token per forward
            sub = [u for u, r in enumerate(rems) if len(r) >= width - t]
            tokens = torch.tensor([rems[u][t - width + len(rems[u])] for u in sub], dtype=torch.long)
            logits = self._feed_rows(state, sub, tokens)
        return state, logits, stored

    def _feed_rows(self, state: SSMState, rows: list[int], tokens: torch.Tensor) -> torch.Tensor:
        ids = tokens.to(self.call.device)[:, None]
        if len(rows) == state.conv.shape[1]:
            logits, _ = self.call(ids, cache=state.cache)
            return logits
        idx = torch.tensor(rows, dtype=torch.long, device=state.conv.device)
        sub = self._state(state.conv.index_select(1, idx), state.ssm.index_select(1, idx))
        logits, _ = self.call(ids, cache=sub.cache)
        state.conv.index_copy_(1, idx, sub.conv)
        state.ssm.index_copy_(1, idx, sub.ssm)
        return logits

    def feed(self, state: SSMState, tokens: torch.Tensor) -> tuple[torch.Tensor, int]:
        return self._feed_rows(state, list(range(len(tokens))), tokens), 0

    def select(self, state: SSMState, index: Sequence[int]) -> SSMState:
        idx = torch.tensor(list(index), dtype=torch.long, device=state.conv.device)
        return self._state(state.conv.index_select(1, idx), state.ssm.index_select(1, idx))

    def merge(self, a: SSMState, b: SSMState) -> SSMState:
        return self._state(torch.cat([a.conv, b.conv], 1), torch.cat([a.ssm, b.ssm], 1))

    def row_payload(
        self, state: SSMState, b: int, drop_last: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return state.conv[:, b].clone(), state.ssm[:, b].clone()


def make_adapter(model: torch.nn.Module, call: ModelCall, pad_id: int, probe_id: int):
    """Probe the model's cache once and pick the adapter: KV, SSM, or the recompute fallback."""
    with torch.inference_mode():
        ids = torch.tensor([[probe_id, probe_id]], device=call.device)
        _, cache = call(ids, torch.ones_like(ids))
    layers = getattr(cache, "layers", None)
    attn = getattr(model.config, "_attn_implementation", None)
    if layers and all(type(lay) is DynamicLayer for lay in layers) and call.accepts_positions:
        shapes = {(lay.keys.shape[1], lay.keys.shape[3], lay.values.shape[3]) for lay in layers}
        if len(shapes) == 1 and attn in ("eager", "sdpa"):
            heads, kdim, vdim = shapes.pop()
            if kdim == vdim:
                return KVAdapter(call, pad_id, len(layers), heads, kdim, layers[0].keys.dtype)
    if layers and all(type(lay) is LinearAttentionLayer and lay.number_of_states == 1 for lay in layers):
        conv = [lay.conv_states[0] for lay in layers]
        ssm = [lay.recurrent_states[0] for lay in layers]
        if all(c is not None for c in conv) and all(s is not None for s in ssm):
            if len({c.shape for c in conv}) == 1 and len({s.shape for s in ssm}) == 1:
                shp_c, shp_s = (len(layers), *conv[0].shape[1:]), (len(layers), *ssm[0].shape[1:])
                return SSMAdapter(call, pad_id, model.config, shp_c, shp_s, (conv[0].dtype, ssm[0].dtype))
    return RecomputeAdapter(call, pad_id, _no_kv_reason(layers, attn, call))


def _no_kv_reason(layers, attn: str | None, call: ModelCall) -> str:
    """Why the probe found no cache path this backend can resume from (for the one-time warning)."""
    if not layers:
        return "the model returned no layered cache"
    kinds = sorted({type(lay).__name__ for lay in layers})
    if kinds != ["DynamicLayer"]:
        return f"its cache layers are {', '.join(kinds)} (sliding-window, hybrid or quantized), not plain K/V"
    if not call.accepts_positions:
        return "its forward takes no position_ids (needed under left padding)"
    if attn not in ("eager", "sdpa"):
        return (
            f"attention implementation {attn!r} has no K/V path here (load with attn_implementation='sdpa')"
        )
    return "its layers' K/V shapes differ (per-layer heads or head sizes)"
