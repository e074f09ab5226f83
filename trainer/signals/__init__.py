"""Tree → training-signal compilers: SFT traces, step preference pairs, per-step advantages.

Pure functions over finished :class:`~thinktree.search.tree.Tree` objects (no torch):

* :func:`sft_traces` (rStar-Math) — TRL prompt-completion records of the best correct paths, and
  :func:`rft_records`, the same paths as token records for expert iteration on the engine;
* :func:`step_pairs` (MCTS-DPO) — TRL preference records between sibling steps;
* :func:`tree_advantages` / :data:`ADVANTAGES` (TreeRL, TreeRPO, GRPO) and :func:`iid_group_advantages` —
  token-level advantage records for policy-gradient training.

PRM labels (Math-Shepherd, ReST-MCTS*, rStar-Math PPM pairs) live in :mod:`thinktree.rewards.labels`, which
works on the dict form of trees. :func:`signal_counts` summarises any mix of these records for logging.
"""

from __future__ import annotations

from collections.abc import Iterable

from thinktree.trainer.signals.advantages import (
    ADVANTAGES,
    generated_tokens,
    iid_group_advantages,
    step_values,
    tree_advantages,
)
from thinktree.trainer.signals.pairs import pair_weight, step_pairs
from thinktree.trainer.signals.traces import path_q, rft_records, sft_traces

__all__ = [
    "ADVANTAGES",
    "generated_tokens",
    "iid_group_advantages",
    "pair_weight",
    "path_q",
    "rft_records",
    "sft_traces",
    "signal_counts",
    "step_pairs",
    "step_values",
    "tree_advantages",
]


def signal_counts(records: Iterable[dict]) -> dict[str, int]:
    """Counts for logging, by record kind (recognised by its fields).

    ``traces`` (has ``completion``), ``pairs`` (has ``chosen``), ``stepwise`` (PRM label records: ``labels``),
    ``advantage_records`` (has ``advantages``), ``advantage_tokens`` (trained token positions: sum of
    ``loss_mask``), ``nonzero_advantage_tokens`` (those with a non-zero advantage) and ``trees`` (distinct
    ``key`` values).
    """
    c = dict.fromkeys(
        (
            "traces",
            "pairs",
            "stepwise",
            "advantage_records",
            "advantage_tokens",
            "nonzero_advantage_tokens",
            "trees",
        ),
        0,
    )
    keys = set()
    for r in records:
        if "key" in r:
            keys.add(r["key"])
        if "advantages" in r:
            c["advantage_records"] += 1
            mask = r.get("loss_mask") or [1] * len(r["advantages"])
            c["advantage_tokens"] += sum(mask)
            c["nonzero_advantage_tokens"] += sum(1 for a, m in zip(r["advantages"], mask) if m and a != 0.0)
        elif "chosen" in r:
            c["pairs"] += 1
        elif "completion" in r:
            c["traces"] += 1
        elif "labels" in r:
            c["stepwise"] += 1
    c["trees"] = len(keys)
    return c
