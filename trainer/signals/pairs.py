"""Step-level preference pairs from search trees (MCTS-DPO).

At every expanded node with at least two *visited* children (``visits >= min_visits``) the child with the highest
Q is chosen (ties → lower index) and the rejected child is, in ``mode="best_worst"``, the one with the lowest Q
(ties → lower index) or, in ``mode="random"``, a uniformly random other visited child whose Q gap to the chosen
one is ``>= min_margin`` (drawn with the given ``numpy.random.Generator``; ``rng=None`` → ``default_rng(0)``, so a
call is reproducible). A pair is kept only if its gap ``Q(chosen) − Q(rejected)`` is ``>= min_margin`` and ``> 0``.
This is MCTS-DPO (Xie et al., 2024, "Monte Carlo Tree Search Boosts Reasoning via Iterative Preference
Learning"), which pairs the highest- and lowest-Q steps of each tree depth. Departures: pairs are formed per
expanded node (siblings share the exact prefix) rather than per depth, and each pair carries a confidence weight.

Weight (a per-pair confidence in (0, 1), independent of the other pairs, so batching does not change it)::

    weight = min(gap, 1) · (1 − 1 / sqrt(1 + min(N_chosen, N_rejected)))

The first factor is the Q gap (Q values lie in [0, 1]); the second grows with the evidence behind the *less*
visited of the two (0.29 at 1 visit, 0.5 at 3, 0.67 at 8, → 1), so a large gap measured on a single visit is
discounted. Use it as a per-example loss weight, or ignore it.

Records are TRL's preference format plus bookkeeping: ``{"prompt": tree.prompt + the step texts root → node,
"chosen": chosen child's step text, "rejected": rejected child's step text, "weight", "key": tree.key, "node": the
shared parent, "chosen_node", "rejected_node", "q_chosen", "q_rejected"}``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Literal

import numpy as np

from thinktree.search.tree import Tree

__all__ = ["step_pairs", "pair_weight"]


def pair_weight(gap: float, visits_chosen: int, visits_rejected: int) -> float:
    """``min(gap, 1) · (1 − 1/sqrt(1 + min(visits)))`` (see module doc)."""
    v = min(visits_chosen, visits_rejected)
    return min(max(gap, 0.0), 1.0) * (1.0 - 1.0 / math.sqrt(1.0 + v))


def step_pairs(
    trees: Iterable[Tree],
    mode: Literal["best_worst", "random"] = "best_worst",
    min_margin: float = 0.1,
    min_visits: int = 1,
    rng: np.random.Generator | None = None,
) -> list[dict]:
    """MCTS-DPO step pairs of every tree, trees in order and nodes by index (see module doc)."""
    if mode not in ("best_worst", "random"):
        raise ValueError(f"mode must be 'best_worst' or 'random', got {mode!r}")
    if rng is None:
        rng = np.random.default_rng(0)
    out: list[dict] = []
    for tree in trees:
        for i, node in enumerate(tree.nodes):
            kids = [c for c in node.children if tree.nodes[c].visits >= max(min_visits, 1)]
            if len(kids) < 2:
                continue
            q = {c: tree.q(c) for c in kids}
            chosen = min(kids, key=lambda c: (-q[c], c))
            others = [c for c in kids if c != chosen]
            if mode == "best_worst":
                rejected = min(others, key=lambda c: (q[c], c))
            else:
                candidates = [c for c in others if q[chosen] - q[c] >= min_margin and q[chosen] > q[c]]
                if not candidates:
                    continue
                rejected = candidates[int(rng.integers(len(candidates)))]
            gap = q[chosen] - q[rejected]
            if gap < min_margin or gap <= 0:
                continue
            nc, nr = tree.nodes[chosen].visits, tree.nodes[rejected].visits
            out.append(
                {
                    "prompt": tree.prompt + tree.trajectory(i).completion,
                    "chosen": tree.nodes[chosen].step.text,  # type: ignore[union-attr]
                    "rejected": tree.nodes[rejected].step.text,  # type: ignore[union-attr]
                    "weight": pair_weight(gap, nc, nr),
                    "key": tree.key,
                    "node": i,
                    "chosen_node": chosen,
                    "rejected_node": rejected,
                    "q_chosen": q[chosen],
                    "q_rejected": q[rejected],
                }
            )
    return out
