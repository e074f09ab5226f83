"""π′ targets: Gumbel MuZero's improved policy at every expanded node, as step-level policy-gradient records.

At a node ``s`` with sampled children ``a`` (normalised step priors ``p(a)``), the improved policy is
``π′ = softmax(log p + σ(completed Q))`` (:func:`thinktree.search.gumbel.improved_policy`; completed Q and σ as in
mctx, with ``c_visit`` / ``c_scale``). Training toward π′ over the sampled children means minimising
``KL(π′ ‖ π_S)``, π_S being the policy renormalised over that set; its gradient is
``Σ_a (π′(a) − π_S(a)) ∇ log π(a)``. So each child ``a`` gets one record whose advantage on the step's tokens is

    A(a) = π′(a) − p(a)  ( = p(a) · (π′(a) / p(a) − 1): the ratio π′/p minus its prior-weighted mean, 1 ),

which the GRPO trainer (and PPO) consume as they are: a policy-gradient step on these records is a step of the
sibling-restricted cross-entropy toward π′. Records, one per trained child step (the same layout as
``advantages.py``'s ``dedupe_prefixes`` records)::

    {"prompt": tree.prompt, "key": tree.key, "node": child, "method": "improved_policy",
     "completion_ids": [tokens root → child], "advantages": [0 on the prefix, A(a) on the step],
     "old_logprobs": [StepRecord.logprobs], "loss_mask": [0 on the prefix, 1 on the step], "prefix_len": int,
     "target": π′(a), "prior": p(a)}

Nodes are used when they have at least two children and ``min_visits`` visits among them (π′ of an unvisited
node is the prior: nothing to learn); steps whose advantage is 0 are dropped. ``c_visit`` / ``c_scale`` default
to the ones the Gumbel search recorded at the root (``extra["gumbel"]``), else ``MCTSConfig``'s defaults, so the
compiler also reads PUCT trees.

Use standalone, or add to another signal (e.g. a GRPO round's records)::

    from thinktree.trainer.signals.improved_policy import improved_policy_records
    records = tree_advantages(tree, "treerl") + improved_policy_records(tree, scale=1.0)

Departures: p is the tree's length-normalised step prior (what the search used), not the exact sequence
probability, so ``p = π_S`` only approximately; the loss weights tokens as the trainer's ``loss_type`` does (one
record per step, its tokens equally), not one term per step; no separate KL-regularised loss is added.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from thinktree.search.gumbel import improved_policy
from thinktree.search.mcts import MCTSConfig
from thinktree.search.tree import ROOT, Tree

__all__ = ["improved_policy_targets", "improved_policy_advantages", "improved_policy_records"]


def _tree(tree: Tree | Mapping | str) -> Tree:
    if isinstance(tree, Tree):
        return tree
    if isinstance(tree, Mapping):
        return Tree.from_dict(dict(tree))
    if isinstance(tree, str):
        return Tree.from_json(tree)
    raise TypeError(f"expected a Tree, tree dict or JSON string; got {type(tree).__name__}")


def _constants(tree: Tree, c_visit: float | None, c_scale: float | None) -> tuple[float, float]:
    recorded = tree.nodes[ROOT].extra.get("gumbel") or {}
    defaults = MCTSConfig()
    cv = c_visit if c_visit is not None else recorded.get("c_visit", defaults.c_visit)
    cs = c_scale if c_scale is not None else recorded.get("c_scale", defaults.c_scale)
    if not (cv >= 0 and cs >= 0):
        raise ValueError(f"c_visit and c_scale must be >= 0, got {cv!r}, {cs!r}")
    return float(cv), float(cs)


def improved_policy_targets(
    tree: Tree | Mapping | str,
    *,
    c_visit: float | None = None,
    c_scale: float | None = None,
    min_visits: int = 1,
) -> dict[int, list[tuple[int, float, float]]]:
    """``{node: [(child, p(child), π′(child)), ...]}`` for every node with >= 2 children and >= ``min_visits``
    visits among them; ``p`` is the prior normalised over the children."""
    if min_visits < 1:
        raise ValueError(f"min_visits must be >= 1, got {min_visits}")
    t = _tree(tree)
    cv, cs = _constants(t, c_visit, c_scale)
    out: dict[int, list[tuple[int, float, float]]] = {}
    for i, node in enumerate(t.nodes):
        if len(node.children) < 2 or sum(t.nodes[c].visits for c in node.children) < min_visits:
            continue
        priors = [max(t.nodes[c].prior, 0.0) for c in node.children]
        total = sum(priors)
        p = [x / total for x in priors] if total > 0 else [1.0 / len(priors)] * len(priors)
        out[i] = list(zip(node.children, p, improved_policy(t, i, cv, cs)))
    return out


def improved_policy_advantages(
    tree: Tree | Mapping | str,
    *,
    c_visit: float | None = None,
    c_scale: float | None = None,
    min_visits: int = 1,
) -> dict[int, float]:
    """``{child: π′(child) − p(child)}`` over the nodes of :func:`improved_policy_targets`."""
    targets = improved_policy_targets(tree, c_visit=c_visit, c_scale=c_scale, min_visits=min_visits)
    return {c: pi - p for rows in targets.values() for c, p, pi in rows}


def improved_policy_records(
    tree: Tree | Mapping | str,
    *,
    c_visit: float | None = None,
    c_scale: float | None = None,
    min_visits: int = 1,
    scale: float = 1.0,
) -> list[dict[str, Any]]:
    """One advantage record per child step with a non-zero ``scale · (π′ − p)`` (see module doc), by node index."""
    t = _tree(tree)
    targets = improved_policy_targets(t, c_visit=c_visit, c_scale=c_scale, min_visits=min_visits)
    records = []
    for child, p, pi in sorted(row for rows in targets.values() for row in rows):
        advantage = scale * (pi - p)
        if advantage == 0.0:
            continue
        steps = [t.nodes[i].step for i in t.path(child)[1:]]
        prefix = [tok for s in steps[:-1] for tok in s.token_ids]  # type: ignore[union-attr]
        n = len(steps[-1].token_ids)  # type: ignore[union-attr]
        records.append(
            {
                "prompt": t.prompt,
                "key": t.key,
                "node": child,
                "method": "improved_policy",
                "completion_ids": prefix + list(steps[-1].token_ids),  # type: ignore[union-attr]
                "advantages": [0.0] * len(prefix) + [advantage] * n,
                "old_logprobs": [lp for s in steps for lp in s.logprobs],  # type: ignore[union-attr]
                "loss_mask": [0] * len(prefix) + [1] * n,
                "prefix_len": len(prefix),
                "target": pi,
                "prior": p,
            }
        )
    return records
