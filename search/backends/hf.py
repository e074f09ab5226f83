"""HFStepProposer: a Hugging Face causal LM as a batched, prefix-cached :class:`~thinktree.search.StepProposer`.

What it does
    ``propose(prefixes, num_children, seeds)`` samples ``num_children`` next reasoning steps for every prefix in one
    call. A step is the generated tokens up to and including the first token whose text completes
    ``step_delimiter`` (so a delimiter split over two tokens, e.g. "\\n\\n" as "\\n"+"\\n", works), or the EOS token
    (``eos=True``; kept in ``token_ids``, left out of ``text``), or ``max_step_tokens`` tokens (``truncated=True``).
    ``logprobs`` are log-softmax of the RAW logits (temperature 1) at the sampled tokens; ``prior`` is
    ``exp(mean(logprobs))``.

Sampling, independent of batching
    Row (prefix i, child c) owns a ``torch.Generator`` seeded with ``(seeds[i] * 1_000_003 + c) mod 2**63`` and
    samples by Gumbel-max on the temperature-scaled, top-p-filtered logits with its own noise vector (temperature 0:
    argmax). Batching, order and caching therefore change speed, never the sampled tokens (up to float round-off of
    the logits, which can only matter at an exact near-tie).

Prefix cache (details in :mod:`.cache`)
    The model state after a token prefix is stored content-addressed (key: length + rolling hash of the ids,
    verified token by token on a hit). When a row finishes its step it stores its state covering prompt + steps up
    to its last FED token; the last sampled token is fed when that child is expanded, which also yields the logits
    of its first token. A prefix is looked up at its step boundaries and boundary-1, longest first, and only the
    remainder is fed (a child: 1 token; re-expanding a node: its last token again). The children of one prefix
    share one prefill. Rows with different past lengths are left-padded with an attention mask and real
    ``position_ids``. Attention models need ``eager``/``sdpa`` attention and full (non-sliding) layers; Mamba stores
    its conv/SSM state per entry; anything else falls back to full recompute (``mode == "recompute"``: batched,
    correct, O(L^2)). LRU-bounded by ``cache_max_tokens`` covered tokens (a Mamba entry counts its covered length);
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
cache_misses, evictions; cached_tokens is the tokens currently held.

Run: ``HFStepProposer(model, tokenizer, step_delimiter="\\n").propose([Trajectory("2+2=")], 4, [0])``; tests in
``tests/test_hf_backend.py``; throughput in ``bench/search_throughput.py``.
"""

from __future__ import annotations

import contextlib
import math
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
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
    """One (prefix, child) sampling row."""

    i: int
    c: int
    prefix: _Prefix
    gen: torch.Generator | None
    h: int = 0
    tail: str = ""
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    eos: bool = False
    truncated: bool = False


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
        self._call = ModelCall(model, self.device)
        with self._eval_mode():
            self.adapter = make_adapter(
                model, self._call, self.pad_id, self._bos if self._bos is not None else 0
            )
        self.mode = self.adapter.kind
        self._call.calls = 0  # the probe does not count
        self._cache = PrefixCache(cache_max_tokens)
        self._seen: set[int] = set()
        self._prompt_memo: dict[str, tuple[list[int], int, int]] = {}
        self._step_memo: dict[tuple[int, tuple[int, ...]], tuple[int, int]] = {}
        self.stats: dict[str, int] = dict.fromkeys(
            ("forward_passes", "generated_tokens", "prefill_tokens", "reencoded_tokens", "cache_hits",
             "cache_misses", "evictions", "cached_tokens"), 0,
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
        self.stats["cached_tokens"] = 0

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
            _Row(i, c, flat[i], self._generator(seeds[i], c))
            for i in range(len(flat))
            for c in range(num_children)
        ]
        with self._eval_mode():
            self._decode(self._groups(rows, num_children), out)
        if len(self._seen) > _SEEN_LIMIT:  # bounds memory; stats may then count a re-feed as prefill
            self._seen.clear()
        self.stats["forward_passes"] = self._call.calls
        self.stats["evictions"], self.stats["cached_tokens"] = self._cache.evictions, self._cache.tokens
        return out

    def _groups(self, rows: list[_Row], per_prefix: int) -> deque[list[_Row]]:
        """The rows of each prefix, as admission units of at most ``max_batch_size`` rows (a prefix with more
        children than that is split, and the later part re-feeds the prefix's last token)."""
        size = min(per_prefix, self.max_batch_size)
        return deque(rows[s : s + size] for s in range(0, len(rows), size))

    def _generator(self, seed: int, child: int) -> torch.Generator | None:
        if self.temperature == 0:
            return None
        gen = torch.Generator(device=self.device)
        gen.manual_seed((int(seed) * 1_000_003 + child) % 2**63)
        return gen

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
            row.h = row.prefix.h
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
        """One decode loop for all rows (continuous batching). A finished row's slot goes dead (fed padding, output
        ignored) until dead slots reach ``_DEAD_FRACTION`` of the batch or room is needed for queued groups; then
        the batch is compacted (one copy of the K/V instead of one per finished row) and groups are merged in."""
        slots: list[_Row | None] = []
        state: Any = None
        logits = torch.empty(0)
        while pending or slots:
            new = self._admit(pending, len(slots) - slots.count(None))
            if new:
                state, slots, logits = self._compact(state, slots, logits)
                st, lg = self._prefill(new)
                state = self.adapter.merge(state, st) if slots else st
                logits = torch.cat([logits, lg]) if slots else lg
                slots = slots + new
            live = [b for b, row in enumerate(slots) if row is not None]
            if len(live) < len(slots):
                logits = logits.index_select(0, torch.tensor(live, device=logits.device))
            feed = [self.pad_id] * len(slots)
            tokens, lps = self._sample(logits, [slots[b] for b in live])
            for b, t, lp in zip(live, tokens, lps):
                row = slots[b]
                if self._advance(row, t, lp):
                    self._finish(row, state, b, out)
                    slots[b] = None
                else:
                    feed[b] = t
                    row.h = roll_hash(row.h, (t,))
                    self._seen.add(row.h)
            dead = slots.count(None)
            if dead == len(slots):
                slots, state = [], None
                continue
            if dead > len(slots) * self.adapter.dead_fraction:
                keep = [b for b, row in enumerate(slots) if row is not None]
                state, slots, feed = (
                    self.adapter.select(state, keep),
                    [slots[b] for b in keep],
                    [feed[b] for b in keep],
                )
            logits, reencoded = self.adapter.feed(state, feed)
            self.stats["reencoded_tokens"] += reencoded

    def _compact(
        self, state: Any, slots: list[_Row | None], logits: torch.Tensor
    ) -> tuple[Any, list, torch.Tensor]:
        """Drop dead slots (before new rows are merged in)."""
        keep = [b for b, row in enumerate(slots) if row is not None]
        if len(keep) == len(slots):
            return state, slots, logits
        if not keep:
            return None, [], logits[:0]
        idx = torch.tensor(keep, device=logits.device)
        return self.adapter.select(state, keep), [slots[b] for b in keep], logits.index_select(0, idx)

    def _sample(self, logits: torch.Tensor, rows: list[_Row]) -> tuple[list[int], list[float]]:
        if logits.dtype in (torch.float16, torch.bfloat16):
            logits = logits.float()
        logp = torch.log_softmax(logits, dim=-1)
        if self.temperature == 0:
            tok = logits.argmax(dim=-1)
        else:
            scores = logits / self.temperature
            if self.top_p < 1.0:
                scores = _top_p_filter(scores, self.top_p)
            vocab = scores.shape[-1]
            u = torch.stack([torch.rand(vocab, generator=r.gen, device=self.device) for r in rows])
            gumbel = -torch.log(-torch.log(u.to(scores.dtype).clamp_min(1e-20)))
            tok = (scores + gumbel).argmax(dim=-1)
        lp = logp.gather(1, tok[:, None]).squeeze(1)
        return tok.tolist(), lp.tolist()

    def _advance(self, row: _Row, tok: int, lp: float) -> bool:
        """Append a sampled token; True when the row's step is complete."""
        row.tokens.append(tok)
        row.logprobs.append(lp)
        if tok in self.eos_ids:
            row.eos = True
            return True
        text = row.tail + (self._tok_str[tok] if tok < len(self._tok_str) else "")
        if self.step_delimiter in text:
            return True
        row.tail = text[1 - len(self.step_delimiter) :] if len(self.step_delimiter) > 1 else ""
        total = len(row.prefix.ids) + len(row.tokens)
        if len(row.tokens) >= self.max_step_tokens or (self.context is not None and total >= self.context):
            row.truncated = True
            return True
        return False

    def _finish(self, row: _Row, state: Any, b: int, out: list[list[Any]]) -> None:
        text_ids = row.tokens[:-1] if row.eos else row.tokens
        out[row.i][row.c] = StepRecord(
            text=self.tokenizer.decode(text_ids, skip_special_tokens=True),
            token_ids=tuple(row.tokens),
            logprobs=tuple(row.logprobs),
            prior=math.exp(sum(row.logprobs) / len(row.logprobs)),
            eos=row.eos,
            truncated=row.truncated,
        )
        self.stats["generated_tokens"] += len(row.tokens)
        if self.cache_enabled and self.adapter.stores and not row.eos:
            length = len(row.prefix.ids) + len(row.tokens) - 1
            if (length, row.h) not in self._cache:
                ids = tuple(row.prefix.ids) + tuple(row.tokens[:-1])
                self._cache.put(ids, row.h, self.adapter.row_payload(state, b))


def _top_p_filter(scores: torch.Tensor, top_p: float) -> torch.Tensor:
    """Mask (to -inf) the tokens outside each row's nucleus; the most likely token is always kept."""
    sorted_scores, order = scores.sort(dim=-1, descending=True)
    probs = sorted_scores.softmax(dim=-1)
    drop = (probs.cumsum(dim=-1) - probs) > top_p
    sorted_scores = sorted_scores.masked_fill(drop, float("-inf"))
    return torch.full_like(scores, float("-inf")).scatter(-1, order, sorted_scores)
