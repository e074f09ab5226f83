"""HFStepProposer: a Hugging Face causal LM as a batched, prefix-cached :class:`~thinktree.search.StepProposer`.

What it does
    ``propose(prefixes, num_children, seeds)`` samples ``num_children`` next reasoning steps for every prefix in one
    call. A step is the generated tokens up to and including the first token whose text completes
    ``step_delimiter`` (so a delimiter split over two tokens, e.g. "\\n\\n" as "\\n"+"\\n", works), or the EOS token
    (``eos=True``; kept in ``token_ids``, left out of ``text``), or ``max_step_tokens`` tokens (``truncated=True``).
    ``logprobs`` are log-softmax of the RAW logits (temperature 1) at the sampled tokens; ``prior`` is
    ``exp(mean(logprobs))``.

Sampling, independent of batching
    Row (prefix i, child c) has the key ``(seeds[i] * 1_000_003 + c) mod 2**63``; its n-th token is drawn with the
    uniform ``u = splitmix64(splitmix64(key) + (n + 1) * golden)`` (53 bits; a counter-based generator: no state,
    no per-row generator object) by inverse-CDF sampling of the temperature-scaled, top-p-filtered softmax
    (temperature 0: argmax). Every operation is row-wise, so batching, order and caching change speed, never the
    sampled tokens (up to float round-off of the logits, which can only matter at an exact near-tie).

Decode loop
    Sampling, appending, EOS / delimiter / length checks are tensor ops over all rows (the delimiter through a
    precomputed automaton over token strings); per step Python does one device sync (which rows ended), and each
    finished row is turned into a StepRecord once. ``tests/test_decode_vectorised.py`` pins it token for token to
    the per-row loop it replaced.

Prefix cache (details in :mod:`.cache`)
    The model state after a token prefix is stored content-addressed (key: length + rolling hash of the ids,
    verified token by token on a hit). When a row finishes its step it stores its state covering prompt + steps up
    to its last FED token; the last sampled token is fed when that child is expanded, which also yields the logits
    of its first token. A prefix is looked up at its step boundaries and boundary-1, longest first, and only the
    remainder is fed (a child: 1 token; re-expanding a node: its last token again). The children of one prefix
    share one prefill. Rows with different past lengths are left-padded with an attention mask and real
    ``position_ids``. Attention models need ``eager``/``sdpa`` attention and full (non-sliding) layers; Mamba stores
    its conv/SSM state per entry; anything else falls back to full recompute (``mode == "recompute"``: batched,
    correct, O(L^2); a one-time ``RuntimeWarning`` per model names the reason, e.g. an attention implementation
    without a K/V path: load with ``attn_implementation="sdpa"``). LRU-bounded by ``cache_budget_bytes`` of stored
    state (default None: a quarter of the device's memory, CUDA or host RAM) and by ``cache_max_tokens`` covered
    tokens (a Mamba entry counts its covered length);
    call ``clear_cache()`` after every policy update.

How it departs from ``model.generate``
    One forward per decode step for all rows (continuous batching): a row leaves the batch as soon as its step ends
    (no padding along), and queued rows are prefilled and merged in whenever a quarter of ``max_batch_size`` is
    free; prefixes resume from cached states instead of being re-encoded. Prompts are tokenized as-is
    (``add_special_tokens=False``); BOS is prepended only if the tokenizer adds one by default and the text does not
    already start with it. Steps without ``token_ids`` are tokenized from their text. The model is put in eval mode
    during a call and restored after.

``stats`` (cumulative): forward_passes, generated_tokens, prefill_tokens (prefix tokens fed for the first time),
reencoded_tokens (tokens fed again: after eviction, without cache, or by the recompute fallback), cache_hits,
cache_misses, evictions; cached_tokens / cached_bytes are the tokens / state bytes currently held.

Run: ``HFStepProposer(model, tokenizer, step_delimiter="\\n").propose([Trajectory("2+2=")], 4, [0])``; tests in
``tests/test_hf_backend.py``; throughput in ``bench/search_throughput.py``.
"""

from __future__ import annotations

import contextlib
import math
import os
import warnings
import weakref
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from thinktree.search.backends.cache import ModelCall, PrefillItem, PrefixCache, make_adapter, roll_hash
from thinktree.search.types import StepRecord, Trajectory

__all__ = ["HFStepProposer"]

_MEMO_LIMIT = 1_000_000
_SEEN_LIMIT = 8_000_000


@dataclass
class _Prefix:
    """A trajectory flattened to token ids, with (length, hash) at every step boundary and boundary-1."""

    ids: list[int]
    cands: list[tuple[int, int]]
    h: int
    h_m1: int


@dataclass
class _Row:
    """One (prefix, child) sampling row; its tokens live in the batch tensors (:class:`_Batch`) until it ends."""

    i: int
    c: int
    prefix: _Prefix
    key: int


@dataclass
class _Batch:
    """Per-slot decode state as tensors (one row per slot; finished slots stay until compaction).

    key: sampling key; ntok: tokens sampled so far; limit: the step ends (truncated) at this many tokens
    (``max_step_tokens`` or the room left in the context); dstate: delimiter-automaton state; alive: still
    sampling; toks/lps: the step's tokens and their logprobs so far (``max_step_tokens`` columns).
    """

    key: torch.Tensor
    ntok: torch.Tensor
    limit: torch.Tensor
    dstate: torch.Tensor
    alive: torch.Tensor
    toks: torch.Tensor
    lps: torch.Tensor

    def take(self, index: torch.Tensor) -> _Batch:
        return _Batch(*(t.index_select(0, index) for t in self._all()))

    def cat(self, other: _Batch) -> _Batch:
        return _Batch(*(torch.cat([a, b]) for a, b in zip(self._all(), other._all())))

    def _all(self) -> tuple[torch.Tensor, ...]:
        return (self.key, self.ntok, self.limit, self.dstate, self.alive, self.toks, self.lps)


class HFStepProposer:
    """Batched step sampler over a HF causal LM with a content-addressed prefix-state cache (see module doc)."""

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        *,
        step_delimiter: str = "\n",
        max_step_tokens: int = 64,
        temperature: float = 1.0,
        top_p: float = 1.0,
        max_batch_size: int = 64,
        cache: bool = True,
        cache_max_tokens: int = 2_000_000,
        cache_budget_bytes: int | None = None,
        device: str | torch.device | None = None,
    ) -> None:
        if not step_delimiter:
            raise ValueError("step_delimiter must be a non-empty string")
        if max_step_tokens < 1 or max_batch_size < 1 or temperature < 0 or not 0 < top_p <= 1:
            raise ValueError(
                "need max_step_tokens >= 1, max_batch_size >= 1, temperature >= 0, 0 < top_p <= 1"
            )
        self.model, self.tokenizer = model, tokenizer
        self.step_delimiter, self.max_step_tokens = step_delimiter, int(max_step_tokens)
        self.temperature, self.top_p = float(temperature), float(top_p)
        self.max_batch_size, self.cache_enabled = int(max_batch_size), bool(cache)
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        self.pad_id = self._pad_id()
        self.eos_ids = self._eos_ids()
        self.context = getattr(model.config, "max_position_embeddings", None)
        self._bos = self._bos_to_prepend()
        self._tok_str = self._token_strings()
        self._eos_tab: torch.Tensor | None = None
        self._tables(len(self._tok_str))
        self._call = ModelCall(model, self.device)
        with self._eval_mode():
            self.adapter = make_adapter(
                model, self._call, self.pad_id, self._bos if self._bos is not None else 0
            )
        self.mode = self.adapter.kind
        if self.mode == "recompute":
            _warn_recompute(model, self.adapter.reason)
        self._call.calls = 0  # the probe does not count
        if cache_budget_bytes is None:
            cache_budget_bytes = _memory_bytes(self.device) // 4
        if cache_budget_bytes < 0:
            raise ValueError(f"cache_budget_bytes must be >= 0, got {cache_budget_bytes}")
        self.cache_budget_bytes = int(cache_budget_bytes)
        self._cache = PrefixCache(cache_max_tokens, self.cache_budget_bytes)
        self._seen: set[int] = set()
        self._prompt_memo: dict[str, tuple[list[int], int, int]] = {}
        self._step_memo: dict[tuple[int, tuple[int, ...]], tuple[int, int]] = {}
        self.stats: dict[str, int] = dict.fromkeys(
            ("forward_passes", "generated_tokens", "prefill_tokens", "reencoded_tokens", "cache_hits",
             "cache_misses", "evictions", "cached_tokens", "cached_bytes"), 0,
        )  # fmt: skip

    # ----------------------------------------------------------------------------------------------- setup helpers
    def _pad_id(self) -> int:
        for cand in (self.tokenizer.pad_token_id, getattr(self.model.config, "pad_token_id", None)):
            if cand is not None:
                return int(cand)
        return int(self.tokenizer.eos_token_id or 0)

    def _eos_ids(self) -> frozenset[int]:
        ids: set[int] = set()
        for cand in (
            self.tokenizer.eos_token_id,
            getattr(self.model.generation_config, "eos_token_id", None),
        ):
            if cand is not None:
                ids.update(cand if isinstance(cand, (list, tuple)) else [cand])
        return frozenset(int(i) for i in ids)

    def _bos_to_prepend(self) -> int | None:
        """The BOS id if the tokenizer adds one by default (checked on a probe string), else None."""
        bos = self.tokenizer.bos_token_id
        if bos is None:
            return None
        with_special = self.tokenizer("a", add_special_tokens=True)["input_ids"]
        return int(bos) if with_special and with_special[0] == bos else None

    def _token_strings(self) -> list[str]:
        """Each token's decoded text (special tokens decode to "") for fast delimiter detection."""
        n = max(len(self.tokenizer), int(getattr(self.model.config, "vocab_size", 0) or 0))
        strs = self.tokenizer.batch_decode(
            [[i] for i in range(len(self.tokenizer))], skip_special_tokens=True
        )
        return list(strs) + [""] * (n - len(strs))

    @contextlib.contextmanager
    def _eval_mode(self) -> Iterator[None]:
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.inference_mode():
                yield
        finally:
            self.model.train(was_training)

    def clear_cache(self) -> None:
        """Drop every cached state (call after each optimiser step: the policy changed)."""
        self._cache.clear()
        self._seen.clear()
        self._step_memo.clear()
        self.stats["cached_tokens"] = self.stats["cached_bytes"] = 0

    # ----------------------------------------------------------------------------------------- prefix flattening
    def _prompt(self, prompt: str) -> tuple[list[int], int, int]:
        hit = self._prompt_memo.get(prompt)
        if hit is None:
            ids = list(self.tokenizer(prompt, add_special_tokens=False)["input_ids"])
            if self._bos is not None and (not ids or ids[0] != self._bos):
                ids.insert(0, self._bos)
            if not ids:
                raise ValueError("empty prompt and the tokenizer has no BOS token: nothing to condition on")
            h_m1 = roll_hash(0, ids[:-1])
            hit = (ids, h_m1, roll_hash(h_m1, ids[-1:]))
            if len(self._prompt_memo) > _MEMO_LIMIT:
                self._prompt_memo.clear()
            self._prompt_memo[prompt] = hit
        return hit

    def _flatten(self, traj: Trajectory) -> _Prefix:
        pids, h_m1, h = self._prompt(traj.prompt)
        ids = list(pids)
        cands = [(len(ids) - 1, h_m1), (len(ids), h)]
        for step in traj.steps:
            toks = tuple(step.token_ids)
            if not toks and step.text:
                toks = tuple(self.tokenizer(step.text, add_special_tokens=False)["input_ids"])
            if not toks:
                continue
            hs = self._step_memo.get((h, toks))
            if hs is None:
                m1 = roll_hash(h, toks[:-1])
                hs = (m1, roll_hash(m1, toks[-1:]))
                if len(self._step_memo) > _MEMO_LIMIT:
                    self._step_memo.clear()
                self._step_memo[(h, toks)] = hs
            ids.extend(toks)
            h_m1, h = hs
            cands += [(len(ids) - 1, h_m1), (len(ids), h)]
        if self.context is not None and len(ids) >= self.context:
            raise ValueError(
                f"prompt key {traj.key!r} ({len(traj.steps)} steps, {traj.prompt[:60]!r}): prefix of {len(ids)} "
                f"tokens does not fit the model context ({self.context} positions): no room to generate a step"
            )
        return _Prefix(ids, cands, h, h_m1)

    # ----------------------------------------------------------------------------------------------------- propose
    def propose(
        self, prefixes: Sequence[Trajectory], num_children: int, seeds: Sequence[int]
    ) -> list[list[StepRecord]]:
        """Sample ``num_children`` steps for each prefix; ``seeds[i]`` seeds prefix i's children."""
        if len(seeds) != len(prefixes):
            raise ValueError(f"{len(prefixes)} prefixes but {len(seeds)} seeds")
        if not prefixes or num_children < 1:
            return [[] for _ in prefixes]
        flat = [self._flatten(t) for t in prefixes]
        out: list[list[Any]] = [[None] * num_children for _ in prefixes]
        rows = [
            _Row(i, c, flat[i], row_key(seeds[i], c)) for i in range(len(flat)) for c in range(num_children)
        ]
        with self._eval_mode():
            self._decode(self._groups(rows, num_children), out)
        if len(self._seen) > _SEEN_LIMIT:  # bounds memory; stats may then count a re-feed as prefill
            self._seen.clear()
        self.stats["forward_passes"] = self._call.calls
        self.stats["evictions"], self.stats["cached_tokens"] = self._cache.evictions, self._cache.tokens
        self.stats["cached_bytes"] = self._cache.bytes
        return out

    def _groups(self, rows: list[_Row], per_prefix: int) -> deque[list[_Row]]:
        """The rows of each prefix, as admission units of at most ``max_batch_size`` rows (a prefix with more
        children than that is split, and the later part re-feeds the prefix's last token)."""
        size = min(per_prefix, self.max_batch_size)
        return deque(rows[s : s + size] for s in range(0, len(rows), size))

    def _lookup(self, p: _Prefix) -> tuple[PrefillItem, int]:
        """Longest cached boundary (or boundary-1) strictly shorter than the prefix, and the hash of that length."""
        if self.cache_enabled and self.adapter.stores:
            for length, h in sorted(p.cands, reverse=True):
                if 0 < length < len(p.ids):
                    payload = self._cache.get(length, h, p.ids)
                    if payload is not None:
                        self.stats["cache_hits"] += 1
                        return PrefillItem(p.ids, length, payload), h
        self.stats["cache_misses"] += 1
        return PrefillItem(p.ids, 0, None), 0

    def _count_fed(self, p: _Prefix, k: int, h: int) -> None:
        """Split the fed remainder ``ids[k:]`` into never-fed (prefill) and fed-before (reencoded) tokens."""
        for t in p.ids[k:]:
            h = roll_hash(h, (t,))
            self.stats["reencoded_tokens" if h in self._seen else "prefill_tokens"] += 1
            self._seen.add(h)

    def _prefill(self, rows: list[_Row]) -> tuple[Any, torch.Tensor]:
        """Encode each unique prefix of ``rows`` once (from its cached state), then repeat it per child row."""
        order: dict[int, int] = {}
        prefs: list[_Prefix] = []
        for row in rows:
            if row.i not in order:
                order[row.i] = len(prefs)
                prefs.append(row.prefix)
        items = []
        for p in prefs:
            item, h_k = self._lookup(p)
            self._count_fed(p, item.k, h_k)
            items.append(item)
        state, logits, stored = self.adapter.prefill(items)
        if self.cache_enabled:
            for u, payload in stored:
                self._cache.put(tuple(prefs[u].ids[:-1]), prefs[u].h_m1, payload)
        index = [order[row.i] for row in rows]
        if index != list(range(len(items))):
            state = self.adapter.select(state, index)
            logits = logits.index_select(0, torch.tensor(index, device=logits.device))
        return state, logits

    # ------------------------------------------------------------------------------------------------------ decode
    def _admit(self, pending: deque[list[_Row]], n_active: int) -> list[_Row]:
        """Rows to add to the running batch: whole groups that fit, once a quarter of the batch is free."""
        size = self.max_batch_size
        if not pending or (n_active and n_active + max(len(pending[0]), size // 4) > size):
            return []
        new: list[_Row] = []
        while pending and n_active + len(new) + len(pending[0]) <= size:
            new += pending.popleft()
        return new

    def _decode(self, pending: deque[list[_Row]], out: list[list[Any]]) -> None:
        """One decode loop for all rows (continuous batching), every per-token operation a tensor op over the batch:
        sampling, appending, EOS / delimiter / length checks. Python runs once per step (one device sync: which
        rows ended) and once per finished row. A finished row's slot goes dead (fed padding, output ignored) until
        dead slots reach the adapter's ``dead_fraction`` of the batch or room is needed for queued groups; then the
        batch is compacted (one copy of the K/V instead of one per finished row) and groups are merged in."""
        slots: list[_Row | None] = []
        n_dead = 0
        state: Any = None
        batch: _Batch | None = None
        logits = torch.empty(0)
        while pending or slots:
            new = self._admit(pending, len(slots) - n_dead)
            if new:
                if n_dead:
                    keep = [b for b, row in enumerate(slots) if row is not None]
                    state, slots, logits, batch = self._take(state, slots, logits, batch, keep)
                    n_dead = 0
                st, lg = self._prefill(new)
                nb = self._new_batch(new)
                if slots:
                    state, logits, batch = (
                        self.adapter.merge(state, st),
                        torch.cat([logits, lg]),
                        batch.cat(nb),
                    )
                else:
                    state, logits, batch = st, lg, nb
                slots = slots + new
            logits = logits.to(
                self.device
            )  # a no-op unless the model's last layer sits elsewhere (device_map)
            tok, lp = sample_tokens(logits, batch.key, batch.ntok, self.temperature, self.top_p)
            ended, eos, truncated = self._step(batch, tok, lp, logits.shape[-1])
            done = ended.nonzero().squeeze(1).tolist()  # the step's one sync
            if done:
                self._finish(done, slots, batch, eos, truncated, state, out)
                for b in done:
                    slots[b] = None
                n_dead += len(done)
            if n_dead == len(slots):
                slots, state, batch, n_dead = [], None, None, 0
                continue
            feed = torch.where(batch.alive, tok, self.pad_id)
            if n_dead > len(slots) * self.adapter.dead_fraction:
                keep = [b for b, row in enumerate(slots) if row is not None]
                idx = torch.tensor(keep, device=feed.device)
                state, slots, _, batch = self._take(state, slots, None, batch, keep)
                feed, n_dead = feed.index_select(0, idx), 0
            logits, reencoded = self.adapter.feed(state, feed)
            self.stats["reencoded_tokens"] += reencoded

    def _take(self, state: Any, slots: list, logits: torch.Tensor | None, batch: _Batch, keep: list[int]):
        """Keep slots ``keep`` (drops dead slots) in the model state, the slot list, the logits and the batch."""
        idx = torch.tensor(keep, dtype=torch.long, device=batch.key.device)
        if logits is not None:
            logits = logits.index_select(0, idx.to(logits.device))
        return self.adapter.select(state, keep), [slots[b] for b in keep], logits, batch.take(idx)

    def _new_batch(self, rows: list[_Row]) -> _Batch:
        dev, n = self.device, len(rows)
        room = [
            self.max_step_tokens
            if self.context is None
            else min(self.max_step_tokens, self.context - len(r.prefix.ids))
            for r in rows
        ]
        zeros = torch.zeros(n, dtype=torch.long, device=dev)
        return _Batch(
            key=torch.tensor([r.key for r in rows], dtype=torch.long, device=dev),
            ntok=zeros,
            limit=torch.tensor(room, dtype=torch.long, device=dev),
            dstate=zeros.clone(),
            alive=torch.ones(n, dtype=torch.bool, device=dev),
            toks=torch.zeros((n, self.max_step_tokens), dtype=torch.long, device=dev),
            lps=torch.zeros((n, self.max_step_tokens), dtype=torch.float64, device=dev),
        )

    def _step(
        self, batch: _Batch, tok: torch.Tensor, lp: torch.Tensor, vocab: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Append each slot's sampled token; return (ended, eos, truncated) masks over the slots. A step ends at EOS,
        else when its text completes the delimiter (automaton over token strings), else at its length limit."""
        eos_tab, done_tab, next_tab = self._tables(vocab)
        rows = torch.arange(len(tok), device=tok.device)
        col = batch.ntok.clamp_max(
            self.max_step_tokens - 1
        )  # dead slots may sit at the limit: their writes are junk
        batch.toks[rows, col] = tok
        batch.lps[rows, col] = lp.to(batch.lps.device, torch.float64)
        batch.ntok = batch.ntok + 1
        eos = eos_tab[tok]
        delim = done_tab[batch.dstate, tok]
        batch.dstate = next_tab[batch.dstate, tok]
        ended = batch.alive & (eos | delim | (batch.ntok >= batch.limit))
        truncated = ended & ~eos & ~delim
        batch.alive = batch.alive & ~ended
        return ended, eos, truncated

    def _finish(
        self, done: list[int], slots: list, batch: _Batch, eos: torch.Tensor, truncated: torch.Tensor, state: Any,
        out: list[list[Any]],
    ) -> None:  # fmt: skip
        """Turn the finished slots ``done`` into StepRecords; cache each one's state (up to its last fed token)."""
        idx = torch.tensor(done, dtype=torch.long, device=batch.key.device)
        lengths = batch.ntok.index_select(0, idx).tolist()
        eos_l, trunc_l = eos.index_select(0, idx).tolist(), truncated.index_select(0, idx).tolist()
        toks, lps = batch.toks.index_select(0, idx).tolist(), batch.lps.index_select(0, idx).tolist()
        for b, n, is_eos, is_trunc, tokens, logprobs in zip(done, lengths, eos_l, trunc_l, toks, lps):
            row = slots[b]
            tokens, logprobs = tokens[:n], logprobs[:n]
            out[row.i][row.c] = StepRecord(
                text=self.tokenizer.decode(tokens[:-1] if is_eos else tokens, skip_special_tokens=True),
                token_ids=tuple(tokens),
                logprobs=tuple(logprobs),
                prior=math.exp(sum(logprobs) / n),
                eos=bool(is_eos),
                truncated=bool(is_trunc),
            )
            self.stats["generated_tokens"] += n
            h = row.prefix.h
            for t in tokens[:-1]:  # the fed tokens (the last sampled one is fed when this child is expanded)
                h = roll_hash(h, (t,))
                self._seen.add(h)
            if self.cache_enabled and self.adapter.stores and not is_eos:
                if (len(row.prefix.ids) + n - 1, h) not in self._cache:
                    ids = tuple(row.prefix.ids) + tuple(tokens[:-1])
                    self._cache.put(ids, h, self.adapter.row_payload(state, b))

    def _tables(self, vocab: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(is EOS per token, delimiter completed per (state, token), next state per (state, token)) covering at
        least ``vocab`` token ids (ids past the tokenizer decode to "" and leave the state as it is)."""
        if self._eos_tab is None or self._eos_tab.shape[0] < vocab:
            width = max(vocab, len(self._tok_str), max(self.eos_ids, default=0) + 1)
            eos = torch.zeros(width, dtype=torch.bool)
            eos[list(self.eos_ids)] = True
            done, nxt = _delimiter_automaton(self.step_delimiter, self._tok_str, width)
            self._eos_tab, self._delim_done, self._delim_next = (t.to(self.device) for t in (eos, done, nxt))
        return self._eos_tab, self._delim_done, self._delim_next


def _delimiter_automaton(
    delim: str, token_strings: Sequence[str], width: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """KMP over token strings: state s = the longest delimiter prefix that the step's text so far ends with (a step
    starts at 0). ``done[s, t]``: text + token t contains the delimiter; ``nxt[s, t]``: the state after t."""
    n = len(delim)
    done = torch.zeros((n, width), dtype=torch.bool)
    nxt = torch.zeros((n, width), dtype=torch.long)
    nxt[:, len(token_strings) :] = torch.arange(n)[:, None]  # ids without a string: "" keeps the state
    chars = set(delim)
    for t, w in enumerate(token_strings):
        if not w:
            nxt[:, t] = torch.arange(n)
            continue
        if chars.isdisjoint(w):
            continue  # never completes the delimiter, never leaves a delimiter prefix at the end
        for s in range(n):
            text = delim[:s] + w
            if delim in text:
                done[s, t] = True
                continue
            k = min(n - 1, len(text))
            while k and not text.endswith(delim[:k]):
                k -= 1
            nxt[s, t] = k
    return done, nxt


def _top_p_filter(scores: torch.Tensor, top_p: float) -> torch.Tensor:
    """Mask (to -inf) the tokens outside each row's nucleus; the most likely token is always kept."""
    sorted_scores, order = scores.sort(dim=-1, descending=True)
    probs = sorted_scores.softmax(dim=-1)
    drop = (probs.cumsum(dim=-1) - probs) > top_p
    sorted_scores = sorted_scores.masked_fill(drop, float("-inf"))
    return torch.full_like(scores, float("-inf")).scatter(-1, order, sorted_scores)


_warned_models: weakref.WeakSet = weakref.WeakSet()


def _warn_recompute(model: Any, reason: str) -> None:
    """Once per model: the backend falls back to recomputing every prefix (no cache)."""
    try:
        if model in _warned_models:
            return
        _warned_models.add(model)
    except TypeError:  # not weak-referenceable: warn every time rather than never
        pass
    warnings.warn(
        f"HFStepProposer: no prefix-cache path for {type(model).__name__}: {reason}. Falling back to full recompute "
        "(every decode step re-runs each whole sequence: O(L^2) per step, correct but slow).",
        RuntimeWarning,
        stacklevel=3,
    )


def _memory_bytes(device: torch.device) -> int:
    """Total memory of ``device``: the CUDA card's, else the host's physical RAM."""
    if device.type == "cuda":
        return int(torch.cuda.get_device_properties(device).total_memory)
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return 16 * 2**30


# ------------------------------------------------------------------------------------------- counter-based sampling
_M64 = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15
_MIX1, _MIX2 = 0xBF58476D1CE4E5B9, 0x94D049BB133111EB
_BLOCK = 256  # vocabulary block of the two-level inverse-CDF draw


def _signed(x: int) -> int:
    """A 64-bit pattern as the int64 value torch stores for it."""
    x &= _M64
    return x - (1 << 64) if x >> 63 else x


def _shr(x: torch.Tensor, s: int) -> torch.Tensor:
    """Logical right shift of int64 bit patterns (torch's ``>>`` is arithmetic)."""
    return (x >> s) & ((1 << (64 - s)) - 1)


def _mix(x: torch.Tensor) -> torch.Tensor:
    """splitmix64's finaliser on int64 tensors (products wrap mod 2**64, as two's complement does)."""
    x = (x ^ _shr(x, 30)) * _signed(_MIX1)
    x = (x ^ _shr(x, 27)) * _signed(_MIX2)
    return x ^ _shr(x, 31)


def row_key(seed: int, child: int) -> int:
    """The sampling key of row (prefix seeded ``seed``, child ``child``): an int64."""
    return _signed((int(seed) * 1_000_003 + int(child)) % 2**63)


def uniforms(keys: torch.Tensor, steps: torch.Tensor) -> torch.Tensor:
    """One float64 uniform in [0, 1) per row: a hash of (row key, token index within the step); 53 random bits."""
    x = _mix(_mix(keys) + (steps + 1) * _signed(_GOLDEN))
    return _shr(x, 11).to(torch.float64) * 2.0**-53


def sample_tokens(
    logits: torch.Tensor, keys: torch.Tensor, steps: torch.Tensor, temperature: float, top_p: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sampled token and its log-softmax (raw logits, temperature 1) for every row, as tensors.

    Temperature 0: argmax. Otherwise inverse-CDF sampling of softmax(top-p-filtered logits / T) with the row's
    counter-based uniform ``u``: the token is the first whose cumulative weight exceeds ``u * total``. The CDF is
    two-level (block sums, then one block) so no full-vocabulary scan beyond one ``exp`` and one sum per row.
    Every operation is row-wise, so a row's token never depends on the other rows of the batch.
    """
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    top = logits.amax(dim=-1, keepdim=True)
    weights = torch.exp(logits - top)
    log_z = top.squeeze(1) + torch.log(weights.sum(dim=-1))
    if temperature == 0:
        tok = logits.argmax(dim=-1)
    else:
        if temperature != 1.0 or top_p < 1.0:
            scores = logits / temperature
            if top_p < 1.0:
                scores = _top_p_filter(scores, top_p)
            weights = torch.exp(scores - scores.amax(dim=-1, keepdim=True))
        tok = _inverse_cdf(weights, uniforms(keys, steps))
    lp = logits.gather(1, tok[:, None]).squeeze(1) - log_z
    return tok, lp


def _inverse_cdf(weights: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Per row, the first index whose cumulative weight exceeds ``u * total`` (never a zero-weight index)."""
    rows, vocab = weights.shape
    pad = -vocab % _BLOCK
    if pad:
        weights = torch.nn.functional.pad(weights, (0, pad))
    blocks = weights.view(rows, -1, _BLOCK)
    block_sum = blocks.sum(dim=-1, dtype=torch.float64)
    cum = block_sum.cumsum(dim=-1)
    target = u * cum[:, -1]
    j = torch.searchsorted(cum, target[:, None], right=True).clamp_max(cum.shape[1] - 1)
    # the cumulative weight before block j, as searchsorted saw it (so start <= target < start + block)
    start = torch.where(j > 0, cum.gather(1, (j - 1).clamp_min(0)), 0.0).squeeze(1)
    chosen = blocks[torch.arange(rows, device=weights.device), j.squeeze(1)]  # (rows, BLOCK)
    inner = chosen.cumsum(dim=-1, dtype=torch.float64) + start[:, None]
    k = torch.searchsorted(inner, target[:, None], right=True).squeeze(1)
    # round-off can leave the target past the block's last cumulative value: take its last positive-weight index
    idx = torch.arange(_BLOCK, device=weights.device)
    last = torch.where(chosen > 0, idx, -1).amax(dim=-1)
    k = torch.where(k >= _BLOCK, last, k).clamp(0, _BLOCK - 1)
    return (j.squeeze(1) * _BLOCK + k).clamp_max(vocab - 1)
