"""Tree packing: the root-to-leaf paths of an optimiser step laid out as token tries, each shared prefix run once.

What it does
    A search tree's path records share their prompt and their first steps. :func:`pack_paths` merges the full token
    sequences (``prompt_ids(prompt) + completion_ids``) of a micro-batch's records into tries (one trie node per
    distinct prefix) laid out depth-first in packed sequences of at most ``budget`` tokens, and
    :func:`pack_batch` turns that into a :class:`PackedBatch`: packed ids ``[S, L]``, a 4-D tree attention mask
    (each token attends to itself and its ancestors only), ``position_ids`` = the token's depth from the root (so
    every token sees exactly the context and positions it had in its own path), and index tensors that read every
    record's per-token outputs back out of the packed forward. :func:`packed_forward` runs the model once over the
    packed sequences and returns a :class:`~.engine.ForwardOut` in the records' ordinary ``[B, W]`` layout (the one
    :func:`~.batching.collate` makes), so GRPO's and PPO's losses, ``loss_type`` normalisations, KL, entropy and
    value losses run unchanged on it.

Why the gradient equals the unpacked one
    Same tokens in the same context with the same positions give the same log-probability, value and entropy. The
    records' outputs are gathered from the packed ones (``logp[b, t] = packed_logp[node(b, t)]``), and the backward
    of a gather is a scatter-add: a token shared by ``k`` paths receives the sum of the ``k`` per-path loss-weighted
    gradients (each path with its own advantage, old/reference log-prob, ``loss_type`` normaliser, PPO return and
    old value). That is the "summed per-path loss weight" of prefix-shared training, made exact by construction for
    every loss term, including those non-linear in per-path quantities (clipping against a path's own old log-prob,
    PPO's clipped value loss against a path's own return), with no per-loss algebra to keep in sync.

Layout
    Records are sorted by their token sequence (ties by index), so each trie's insertion order is a pre-order
    depth-first walk (ancestors precede descendants; subtrees are contiguous). Bins are filled greedily in that
    order; a record whose new tokens would take its bin over ``budget`` starts a new bin, where its ancestors are
    repeated as context (a split at a subtree boundary). A single path longer than ``budget`` gets a bin of its own.
    Logits are computed only at the positions that predict a completion token (HF ``logits_to_keep`` as a boolean
    ``[S, L]`` mask). The optimiser step's rows are regrouped before packing (:func:`packed_micro_batches`): the
    step's chunk is sorted by token sequence and cut into ``world × grad_accum`` contiguous micro-batches of the
    usual size, so paths of one tree land together; the step's loss, a sum over its records with global
    normalisers, is the same for any grouping.

Attention support
    transformers 5.x returns a 4-D ``attention_mask`` as-is (``masking_utils._preprocess_mask_arguments``): for
    ``sdpa`` it is passed as a boolean mask, for ``eager`` it is added to the scores, so it is given as ``0`` /
    ``finfo.min`` in the model's dtype. Other implementations (flash-attention, flex) and models without attention
    (Mamba) cannot take it: :func:`tree_attention_problem` says why, after a probe that compares a packed and an
    unpacked forward of two branching paths, and GRPO/PPO then train unpacked with a warning.

Departures from AReaL's prefix-shared training (areal-project/AReaL#804, #837) and verl's RFC (volcengine/verl
#6401): those compute a per-token summed weight for a specific loss; here per-path outputs are gathered instead
(same gradient, any loss). Packing works from path records (no Tree object), so it also merges identical prompts
across trees and duplicate records. Rows are regrouped only within one optimiser step (the step plan decides which
records share a step). Reference log-probabilities and PPO's old values are still computed unpacked, once per round.
Tested under single-process and 2-process DDP on CPU; DeepSpeed ZeRO-2/3 are not tested with packing.

Run: set ``train.pack_tokens: 2048`` (a recipe, or ``TrainConfig(pack_tokens=2048)``); ``bench/train_step.py``
measures packed vs unpacked vs TRL on trees from a real search.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from .batching import Batch, PromptIds, collate, token_entropy

if TYPE_CHECKING:
    from .engine import Engine, ForwardOut

__all__ = [
    "PackedBatch",
    "PackedLayout",
    "pack_batch",
    "pack_paths",
    "packed_forward",
    "packed_micro_batches",
    "prefix_sharing",
    "tree_attention_problem",
]

SUPPORTED_ATTENTION = ("eager", "sdpa")


@dataclass
class PackedLayout:
    """Token tries of several sequences, laid out depth-first in bins (pure Python; see module doc)."""

    tokens: list[list[int]]
    """Token ids of each packed sequence (bin)."""
    parents: list[list[int]]
    """Per bin and position: the parent's position in the same bin, -1 for a root."""
    depths: list[list[int]]
    """Per bin and position: the depth from the root (0 for a root): the position id."""
    paths: list[tuple[int, list[int]]]
    """Per input sequence: ``(bin, packed position of each of its tokens)``."""

    @property
    def packed_tokens(self) -> int:
        return sum(len(t) for t in self.tokens)

    @property
    def path_tokens(self) -> int:
        return sum(len(p) for _, p in self.paths)


def _lcp(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def pack_paths(seqs: Sequence[Sequence[int]], budget: int) -> PackedLayout:
    """Merge ``seqs`` into token tries in bins of at most ``budget`` tokens (a longer single sequence: its own bin)."""
    if budget <= 0:
        raise ValueError(f"pack budget must be > 0 tokens, got {budget}")
    if any(len(s) == 0 for s in seqs):
        raise ValueError("cannot pack an empty sequence")
    order = sorted(range(len(seqs)), key=lambda i: (list(seqs[i]), i))
    bins: list[list[int]] = []
    size, prev = 0, None
    for i in order:
        s = seqs[i]
        new = len(s) - (_lcp(seqs[prev], s) if prev is not None else 0)
        if not bins or size + new > budget:
            bins.append([])
            size, new = 0, len(s)
        bins[-1].append(i)
        size, prev = size + new, i
    tokens: list[list[int]] = []
    parents: list[list[int]] = []
    depths: list[list[int]] = []
    paths: list[tuple[int, list[int]] | None] = [None] * len(seqs)
    for b, members in enumerate(bins):
        tok, par, dep = [], [], []
        children: dict[tuple[int, int], int] = {}
        for i in members:
            pos, parent = [], -1
            for d, t in enumerate(seqs[i]):
                key = (parent, int(t))
                node = children.get(key)
                if node is None:
                    node = len(tok)
                    children[key] = node
                    tok.append(int(t))
                    par.append(parent)
                    dep.append(d)
                pos.append(node)
                parent = node
            paths[i] = (b, pos)
        tokens.append(tok)
        parents.append(par)
        depths.append(dep)
    return PackedLayout(tokens, parents, depths, [p for p in paths if p is not None])


def prefix_sharing(layout: PackedLayout) -> float:
    """Share of the records' tokens that packing does not recompute: ``1 - packed / unpacked`` tokens."""
    return 1.0 - layout.packed_tokens / max(layout.path_tokens, 1)


@dataclass
class PackedBatch(Batch):
    """A :class:`Batch` (the records' ``[B, W]`` targets, mask and fields) plus its packed layout for the forward."""

    packed_ids: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.long))
    """``[S, L]`` packed token ids (padded)."""
    tree_mask: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.bool))
    """``[S, 1, L, L]`` True where a token attends (itself and its ancestors; a pad position only itself)."""
    position_ids: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.long))
    """``[S, L]`` depth of each token from its root."""
    keep: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.bool))
    """``[S, L]`` positions whose logits are computed (those predicting a completion token)."""
    source: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.long))
    """``[B, W]`` index into the kept positions (row-major order) of the position predicting ``targets[b, t]``."""
    packed_tokens: int = 0
    """Tokens in the packed sequences (without padding)."""
    path_tokens: int = 0
    """Tokens of the records' own sequences (what the unpacked step runs, without padding)."""

    @property
    def sharing(self) -> float:
        """:func:`prefix_sharing` of this micro-batch."""
        return 1.0 - self.packed_tokens / max(self.path_tokens, 1)

    def to(self, device: torch.device | str) -> PackedBatch:
        base = super().to(device)
        return PackedBatch(
            base.input_ids, base.attention_mask, base.start, base.targets, base.mask, base.fields, base.rows,
            base.spans, self.packed_ids.to(device), self.tree_mask.to(device), self.position_ids.to(device),
            self.keep.to(device), self.source.to(device), self.packed_tokens, self.path_tokens,
        )  # fmt: skip

    def attention_mask_for(self, attn_implementation: str, dtype: torch.dtype) -> torch.Tensor:
        """The 4-D mask as this attention implementation takes it: boolean (sdpa) or additive (eager)."""
        if attn_implementation == "eager":
            zero = torch.zeros((), dtype=dtype, device=self.tree_mask.device)
            return torch.where(self.tree_mask, zero, torch.finfo(dtype).min)
        return self.tree_mask


def pack_batch(
    records: Sequence[Mapping[str, Any]],
    rows: Sequence[int],
    prompts: PromptIds,
    pad_id: int,
    budget: int,
    extra: Mapping[str, Sequence[Sequence[float]]] | None = None,
) -> PackedBatch:
    """The :class:`PackedBatch` of ``records[rows]``: :func:`~.batching.collate`'s fields, packed ids and indices."""
    base = collate(records, rows, prompts, pad_id, extra)
    seqs = [prompts(records[r]["prompt"]) + [int(t) for t in records[r]["completion_ids"]] for r in rows]
    plens = [len(prompts(records[r]["prompt"])) for r in rows]
    lay = pack_paths(seqs, budget)
    n_bins, length = len(lay.tokens), max(len(t) for t in lay.tokens)
    ids = torch.full((n_bins, length), pad_id, dtype=torch.long)
    pos_ids = torch.zeros((n_bins, length), dtype=torch.long)
    mask = torch.zeros((n_bins, length, length), dtype=torch.bool)
    for b, (tok, par, dep) in enumerate(zip(lay.tokens, lay.parents, lay.depths)):
        ids[b, : len(tok)] = torch.tensor(tok)
        pos_ids[b, : len(dep)] = torch.tensor(dep)
        m = mask[b]
        for q, p in enumerate(par):
            if p >= 0:
                m[q, :q] = m[p, :q]  # a parent precedes its child (pre-order), so its row is complete
            m[q, q] = True
        m[torch.arange(len(tok), length), torch.arange(len(tok), length)] = True  # pad rows: themselves only
    # Predicting position of every completion token; logits are kept there only.
    keep = torch.zeros((n_bins, length), dtype=torch.bool)
    pred = torch.full(base.targets.shape, -1, dtype=torch.long)
    for b, ((bin_, path), p, (lo, n)) in enumerate(zip(lay.paths, plens, base.spans)):
        pred[b, lo : lo + n] = torch.tensor(path[p - 1 : p - 1 + n]) + bin_ * length
    keep.view(-1)[pred[pred >= 0]] = True
    kept_index = torch.full((n_bins * length,), -1, dtype=torch.long)
    kept_index[keep.view(-1)] = torch.arange(int(keep.sum()))
    source = torch.where(pred >= 0, kept_index[pred.clamp_min(0)], torch.zeros_like(pred))
    return PackedBatch(
        base.input_ids, base.attention_mask, base.start, base.targets, base.mask, base.fields, base.rows,
        base.spans, ids, mask.unsqueeze(1), pos_ids, keep, source, lay.packed_tokens, lay.path_tokens,
    )  # fmt: skip


def packed_forward(
    engine: Engine, batch: PackedBatch, *, values: bool = False, train: bool = True
) -> ForwardOut:
    """:meth:`Engine.forward` for a :class:`PackedBatch`: one forward over the packed sequences, ``[B, W]`` outputs.

    Window entries outside a record's completion (mask 0) read an arbitrary kept position.
    """
    from .engine import ForwardOut, _base

    model = engine.model if train else engine.wrapper
    model.train(train)
    cfg = _base(engine.policy).config
    att = batch.attention_mask_for(cfg._attn_implementation, engine.policy.dtype)
    with torch.enable_grad() if train else torch.no_grad():
        logits, v = model(batch.packed_ids, att, batch.keep, values, position_ids=batch.position_ids)
    logits = logits.reshape(-1, logits.shape[-1]).float()  # [K, V]: the kept positions, row-major
    lse = torch.logsumexp(logits, dim=-1)
    src = batch.source.reshape(-1)
    logp = (logits[src, batch.targets.reshape(-1)] - lse[src]).view_as(batch.source)
    entropy = None
    if train and engine.cfg.log_entropy:
        entropy = token_entropy(logits.unsqueeze(0))[0][src].view_as(batch.source)
    vals = None if v is None else v.reshape(-1)[src].view_as(batch.source)
    if not train:
        engine.wrapper.train()
    return ForwardOut(logp, vals, entropy)


# ------------------------------------------------------------------------------------------- use by GRPO / PPO
_PROBE_TOL = 1e-4


def _probe(engine: Engine) -> float:
    """Max |packed - unpacked| log-prob over two branching paths (eval mode, no grad)."""
    ids = engine.prompts("probe: 12+30=42; 7*6=42.")
    recs = [
        {"prompt": "probe:", "completion_ids": ids[:6] + ids[6:10], "advantages": [0.0] * 10,
         "old_logprobs": [0.0] * 10},
        {"prompt": "probe:", "completion_ids": ids[:6] + ids[12:16], "advantages": [0.0] * 10,
         "old_logprobs": [0.0] * 10},
    ]  # fmt: skip
    plain = engine.collate(recs, [0, 1])
    packed = pack_batch(recs, [0, 1], engine.prompts, engine.pad_id, 4096).to(engine.accelerator.device)
    a = engine.forward(plain, train=False).logprobs
    b = packed_forward(engine, packed, train=False).logprobs
    return float(((a - b).abs() * plain.mask).max())


def tree_attention_problem(engine: Engine) -> str | None:
    """Why this engine's policy cannot run a tree mask (None when it can; see module doc)."""
    from .engine import _base

    impl = getattr(_base(engine.policy).config, "_attn_implementation", None)
    if impl not in SUPPORTED_ATTENTION:
        return f"attention implementation {impl!r} cannot take a custom 4-D mask (supported: {SUPPORTED_ATTENTION})"
    try:
        err = _probe(engine)
    except (TypeError, ValueError, RuntimeError) as e:  # a model that refuses position_ids / a 4-D mask
        return f"packed forward failed: {type(e).__name__}: {e}"
    if not err <= _PROBE_TOL:
        return f"packed and unpacked log-probs differ by {err:.3g} on a probe (> {_PROBE_TOL})"
    return None


def packed_micro_batches(
    algo: Any, records: Sequence[Mapping[str, Any]], chunk: Sequence[int], extra: Mapping[str, Any]
) -> list[PackedBatch] | None:
    """This rank's packed micro-batches of one step's ``chunk``, or None to train unpacked.

    ``algo`` is a :class:`~.grpo.GRPO` (or PPO; ``algo.last_sharing`` is set to this rank's prefix sharing); None when ``train.pack_tokens`` is 0 or the model cannot take a tree
    mask (warned once, decided on every rank alike). The chunk is regrouped (module doc): sorted by token sequence,
    rank ``r`` takes the ``r``-th of ``world`` contiguous slices, cut into ``grad_accum`` micro-batches.
    """
    e, c = algo.engine, algo.cfg
    budget = int(getattr(c, "pack_tokens", 0) or 0)
    if budget <= 0:
        return None
    if not hasattr(algo, "_pack_problem"):
        problem = tree_attention_problem(e)
        if e.any_rank(problem is not None):
            problem = problem or "another rank's model cannot take a tree attention mask"
            warnings.warn(f"train.pack_tokens={budget} ignored, training unpacked: {problem}", stacklevel=3)
        algo._pack_problem = problem
    if algo._pack_problem is not None:
        return None
    world, accum = e.world_size, c.grad_accum
    if len(chunk) % (world * accum):
        raise ValueError(
            f"a step of {len(chunk)} records does not split into {world} ranks x {accum} micro-batches"
        )
    key = {
        r: e.prompts(records[r]["prompt"]) + [int(t) for t in records[r]["completion_ids"]]
        for r in set(chunk)
    }
    ordered = sorted(chunk, key=lambda r: (key[r], r))
    per_rank = len(ordered) // world
    mine = ordered[e.rank * per_rank : (e.rank + 1) * per_rank]
    size = per_rank // accum
    mbs = [
        pack_batch(records, mine[i * size : (i + 1) * size], e.prompts, e.pad_id, budget, extra)
        for i in range(accum)
    ]
    algo.last_sharing = 1.0 - sum(m.packed_tokens for m in mbs) / max(sum(m.path_tokens for m in mbs), 1)
    return [m.to(e.accelerator.device) for m in mbs]
