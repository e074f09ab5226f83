"""Advantage records → padded training tensors, the step plan, and token log-probabilities.

Shared by :mod:`.engine`, :mod:`.grpo` and :mod:`.ppo`. A record (see :mod:`thinktree.trainer.signals.advantages`)
is one training sequence ``prompt_ids(prompt) + completion_ids``; its per-token lists (``advantages``,
``old_logprobs``, ``loss_mask``) have one entry per completion token.

Layout. Sequences are right-padded to ``L`` (so real tokens keep positions ``0..n-1`` and the default position ids
are right). Logits are computed only for the *window* ``[start, L)`` with ``start = min(prompt length) - 1`` (HF's
``logits_to_keep``); window index ``t`` holds the logits at position ``start + t``, which predict token
``start + t + 1``. Every per-token tensor of a :class:`Batch` (``targets``, ``mask``, ``advantages``, ...) has shape
``[B, W]`` with ``W = L - 1 - start`` and is aligned with those predictions: completion token ``j`` of a row with
prompt length ``p`` sits at window index ``p - 1 + j - start``. The hidden state at that index is the state *before*
the token, which is where PPO reads the value of the state a step starts from.

Prompt ids are made exactly as the search backend makes them (``HFStepProposer._prompt``): the prompt text tokenized
with ``add_special_tokens=False``, with the tokenizer's BOS prepended iff it adds one by default (probed on "a") and
the text does not already start with it. The rollout ``old_logprobs`` then refer to the same tokens in the same
context, which ``train/logprob_mismatch`` checks.

Step plan. ``step_plan`` turns ``n`` records into optimiser steps of exactly ``global_batch`` records
(``per_device_batch_size × grad_accum × world_size``): ``num_iterations`` passes, each a fresh permutation from a
seeded ``torch.Generator``; a pass whose size is not a multiple of the batch is padded cyclically with its own first
records (as ``DistributedSampler`` pads), so every rank runs the same number of micro-batches. ``shard`` gives rank
``r`` the records ``chunk[r::world]``, cut into ``grad_accum`` micro-batches.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = [
    "Batch",
    "PromptIds",
    "collate",
    "prompt_ids",
    "shard",
    "step_plan",
    "token_entropy",
    "token_logprobs",
]


def _bos_to_prepend(tokenizer: Any) -> int | None:
    bos = tokenizer.bos_token_id
    if bos is None:
        return None
    probe = tokenizer("a", add_special_tokens=True)["input_ids"]
    return int(bos) if probe and probe[0] == bos else None


def prompt_ids(tokenizer: Any, text: str) -> list[int]:
    """Token ids of a prompt exactly as the search backend makes them (see module doc)."""
    ids = [int(i) for i in tokenizer(text, add_special_tokens=False)["input_ids"]]
    bos = _bos_to_prepend(tokenizer)
    if bos is not None and (not ids or ids[0] != bos):
        ids.insert(0, bos)
    if not ids:
        raise ValueError("empty prompt and the tokenizer has no BOS token: nothing to condition on")
    return ids


class PromptIds:
    """Memoised :func:`prompt_ids` for one tokenizer (the BOS probe runs once)."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.bos = _bos_to_prepend(tokenizer)
        self._memo: dict[str, list[int]] = {}

    def __call__(self, text: str) -> list[int]:
        hit = self._memo.get(text)
        if hit is None:
            hit = [int(i) for i in self.tokenizer(text, add_special_tokens=False)["input_ids"]]
            if self.bos is not None and (not hit or hit[0] != self.bos):
                hit.insert(0, self.bos)
            if not hit:
                raise ValueError("empty prompt and the tokenizer has no BOS token: nothing to condition on")
            self._memo[text] = hit
        return hit


@dataclass
class Batch:
    """One micro-batch: padded ids plus ``[B, W]`` per-token tensors aligned with the logits window."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    start: int
    """Window start: logits are kept for positions ``[start, L)``."""
    targets: torch.Tensor
    mask: torch.Tensor
    """Float loss mask (completion tokens with ``loss_mask == 1``)."""
    fields: dict[str, torch.Tensor] = field(default_factory=dict)
    """Per-token float tensors by name: ``advantages``, ``old_logprobs`` and any precomputed extras."""
    rows: list[int] = field(default_factory=list)
    """Record indices of the rows."""
    spans: list[tuple[int, int]] = field(default_factory=list)
    """Per row ``(window index of completion token 0, completion length)``."""

    @property
    def logits_to_keep(self) -> int:
        return self.input_ids.shape[1] - self.start

    def to(self, device: torch.device | str) -> Batch:
        return Batch(
            self.input_ids.to(device),
            self.attention_mask.to(device),
            self.start,
            self.targets.to(device),
            self.mask.to(device),
            {k: v.to(device) for k, v in self.fields.items()},
            list(self.rows),
            list(self.spans),
        )

    def per_record(self, values: torch.Tensor) -> list[list[float]]:
        """A ``[B, W]`` tensor back to per-completion-token lists, one per row."""
        rows = values.detach().float().cpu()
        return [rows[b, lo : lo + n].tolist() for b, (lo, n) in enumerate(self.spans)]

    def finite(self) -> bool:
        """True when every per-token field is finite on the trained tokens."""
        keep = self.mask > 0
        return all(bool(torch.isfinite(v[keep]).all()) for v in self.fields.values())


def collate(
    records: Sequence[Mapping[str, Any]],
    rows: Sequence[int],
    prompts: PromptIds,
    pad_id: int,
    extra: Mapping[str, Sequence[Sequence[float]]] | None = None,
) -> Batch:
    """A :class:`Batch` of ``records[rows]``; ``extra[name][row]`` are further per-completion-token lists.

    An ``extra`` name overrides the record's own list of that name (PPO replaces ``advantages`` by its GAE ones).
    """
    seqs, plens = [], []
    for r in rows:
        rec = records[r]
        p = prompts(rec["prompt"])
        c = [int(t) for t in rec["completion_ids"]]
        if not c:
            raise ValueError(f"record {r} (key={rec.get('key')}) has no completion tokens")
        seqs.append(p + c)
        plens.append(len(p))
    length = max(len(s) for s in seqs)
    start = min(plens) - 1
    width = length - 1 - start
    ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    att = torch.zeros((len(rows), length), dtype=torch.long)
    extra = extra or {}
    names = list(dict.fromkeys(["advantages", "old_logprobs", *extra]))
    per_tok = {n: torch.zeros((len(rows), width), dtype=torch.float32) for n in names}
    mask = torch.zeros((len(rows), width), dtype=torch.float32)
    spans = []
    for b, (r, seq, p) in enumerate(zip(rows, seqs, plens)):
        rec, n = records[r], len(seq) - p
        ids[b, : len(seq)] = torch.tensor(seq)
        att[b, : len(seq)] = 1
        lo = p - 1 - start
        spans.append((lo, n))
        mask[b, lo : lo + n] = torch.tensor(rec.get("loss_mask") or [1] * n, dtype=torch.float32)
        for name in names:
            src = extra[name][r] if name in extra else rec[name]
            if len(src) != n:
                raise ValueError(f"record {r}: {name} has {len(src)} entries for {n} completion tokens")
            per_tok[name][b, lo : lo + n] = torch.tensor(src, dtype=torch.float32)
    targets = ids[:, start + 1 :]
    return Batch(ids, att, start, targets, mask, per_tok, list(rows), spans)


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """``log softmax(logits)[target]`` per position, in float32, without materialising the full log-softmax."""
    logits = logits.float()
    picked = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    return picked - torch.logsumexp(logits, dim=-1)


@torch.no_grad()
def token_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of each position's distribution (no grad; one row at a time to bound memory)."""
    out = []
    for row in logits:
        logp = torch.log_softmax(row.float(), dim=-1)
        out.append(-(logp.exp() * logp).sum(-1))
    return torch.stack(out)


def step_plan(
    n: int,
    global_batch: int,
    num_iterations: int,
    seed: int,
    max_steps: int | None = None,
    groups: Sequence[Any] | None = None,
) -> list[list[int]]:
    """Record indices of each optimiser step: seeded passes of ``global_batch``-sized chunks.

    ``max_steps=None``: ``num_iterations`` passes. ``max_steps=k``: exactly ``k`` steps, cut from as many seeded
    passes as that takes (``train.steps`` is a count, not an upper bound: 30 steps over 3 chunks is 10 passes).
    ``groups`` (one label per record, e.g. its tree key): each pass shuffles the groups, not the records, and keeps a
    group's records next to each other, so one step holds whole trees (tree packing computes their shared prefixes
    once) instead of a few paths of many trees.
    """
    if n <= 0 or global_batch <= 0 or num_iterations <= 0:
        raise ValueError(
            f"step_plan needs n, global_batch, num_iterations > 0; got {n}, {global_batch}, {num_iterations}"
        )
    gen = torch.Generator().manual_seed(int(seed))
    chunks = math.ceil(n / global_batch)
    passes = (
        num_iterations if max_steps is None else max(num_iterations, math.ceil(max(0, max_steps) / chunks))
    )
    members: dict[Any, list[int]] = {}
    for i, g in enumerate(groups if groups is not None else range(n)):
        members.setdefault(g, []).append(i)
    labels = list(members)
    plan: list[list[int]] = []
    for _ in range(passes):
        perm = [i for g in torch.randperm(len(labels), generator=gen).tolist() for i in members[labels[g]]]
        order = (perm * math.ceil(chunks * global_batch / n))[: chunks * global_batch]
        plan.extend(order[i * global_batch : (i + 1) * global_batch] for i in range(chunks))
    return plan if max_steps is None else plan[: max(0, max_steps)]


def shard(chunk: Sequence[int], rank: int, world: int, grad_accum: int) -> list[list[int]]:
    """This rank's ``grad_accum`` micro-batches of one step's ``chunk`` (rank ``r`` takes ``chunk[r::world]``)."""
    mine = list(chunk[rank::world])
    if len(mine) % grad_accum:
        raise ValueError(f"{len(mine)} records per rank do not split into {grad_accum} micro-batches")
    size = len(mine) // grad_accum
    return [mine[i * size : (i + 1) * size] for i in range(grad_accum)]
