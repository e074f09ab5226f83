"""Process-reward-model (PRM) labels compiled from search trees.

Three labelers, each a pure function of finished trees:

* :func:`math_shepherd_labels` — Math-Shepherd (Wang et al., 2024) Monte-Carlo step labels. A step's *soft* label
  is the fraction of the outcomes below it that are correct, its *hard* label is whether any is. "Below it" means
  the step's evidence: the terminal leaves of its subtree (itself included, if terminal) plus the rollouts started
  at the step or at any of its descendants. Departure: Math-Shepherd runs N fresh completions from every step of
  one solution; here the completions are whatever the search produced (tree leaves + rollouts), so different
  steps have different amounts of evidence, and steps with none get no label.
* :func:`rest_value_labels` — ReST-MCTS* (Zhang et al., 2024, eq. 1–2) inferred value targets along each
  root-to-terminal-leaf path::

      v_0 = 0
      v_k = clip(v_{k-1} + r_k · (1 − v_{k-1}) / (m_k + 1), 0, 1)           k = 1 .. K

  ``K`` is the number of steps of the path, ``m_k`` the paper's *reasoning distance* (the number of steps still
  needed after step ``k``) and ``r_k ∈ {+1, −1}`` the step quality (the paper's ``1 − 2·r_{s_k}``). Indexing: on a
  correct path whose leaf is the nearest correct leaf of every step, ``m_k = K − k`` and the targets are exactly
  ``v_k = k / K`` (a correct final step gets ``m_K = 0``, so ``v_K = 1``). Departures from the paper, which gets
  ``r`` from a PRM and ``m`` from extra rollouts: ``r_k = +1`` when the step's subtree holds a correct terminal
  leaf, else ``−1``; ``m_k`` = depth distance from step ``k`` to its nearest correct terminal leaf when ``r_k = +1``,
  else the steps left on this path (``K − k``). A wrong *terminal* step is pinned to ``v_K = 0`` (a finished wrong
  answer is worth nothing; the formula alone gives ``max(0, 2·v_{K−1} − 1)``, which stays > 0 after a prefix
  valued above 1/2); ``pin_terminal=False`` keeps the bare formula. A correct terminal step gets 1 either way
  (``m_K = 0``). Only terminal leaves are used here (a rollout has no depth in the tree).
* :func:`ppm_pairs` — rStar-Math (Guan et al., 2025) process-preference-model pairs. At every node, the children
  that reach a correct answer (a correct terminal leaf below) are ranked by Q and the top ``top`` kept; the
  children that reach only wrong answers (terminal leaves below, none correct) are ranked by Q and the bottom
  ``top`` kept; every (positive, negative) combination with ``Q(pos) − Q(neg) > 0`` becomes a pair. Departure: the
  paper also pairs full final-answer trajectories; here every pair is one step after a shared prefix.

Input: trees in **dict form**, i.e. ``Tree.to_dict()`` or one parsed JSON line of the tree store. A JSON string
and any object with a ``to_dict()`` method (a ``Tree``) are accepted too and converted. This package does not
import ``thinktree.search``; the node fields read are ``parent``, ``children``, ``terminal``, ``reward``,
``rollout_rewards``, ``visits``, ``value_sum``, ``max_value`` and ``step.text``, plus the tree's ``prompt``, ``key``
and ``backup``. Node indices must be in creation order (every parent before its children), as ``Tree`` guarantees.

Outcomes: a terminal node's outcome is its ``reward`` (``None`` = could not grade → 0.0); an outcome is
*correct* when it is ``>= threshold``.

Output: stepwise supervision in TRL's format ``{"prompt", "completions": [step texts], "labels": [...]}`` — one
record per terminal leaf (the path from the root to it) — and preference pairs in TRL's format ``{"prompt",
"chosen", "rejected"}`` where ``prompt`` is the tree prompt plus the shared prefix's step texts. Records also carry
``key`` (the tree) and ``node`` (the leaf, or the pair's parent). Every labeler returns ``(records, stats)``;
``stats`` counts trees, skipped trees (``no_terminal``: no terminal leaf → no labels; for pairs also
``all_correct`` / ``all_wrong`` → nothing to contrast) and records, for the caller to log.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

__all__ = [
    "StepEvidence",
    "as_tree_dict",
    "tree_evidence",
    "mc_labels",
    "math_shepherd_labels",
    "rest_path_values",
    "rest_value_labels",
    "ppm_pairs",
]

_ROOT = 0
_NO_PARENT = -1


def as_tree_dict(tree: Any) -> dict:
    """The dict form of ``tree``: a mapping (returned as is), a JSON string, or an object with ``to_dict()``."""
    if isinstance(tree, Mapping):
        d = tree
    elif isinstance(tree, (str, bytes, bytearray)):
        d = json.loads(tree)
    elif hasattr(tree, "to_dict"):
        d = tree.to_dict()
    else:
        raise TypeError(
            f"expected a tree dict, JSON string or object with to_dict(); got {type(tree).__name__}"
        )
    if "nodes" not in d or "prompt" not in d:
        raise ValueError(f"not a tree dict (needs 'prompt' and 'nodes'); keys: {sorted(d)}")
    return d  # type: ignore[return-value]


def _tree_list(trees: Any) -> list[dict]:
    if isinstance(trees, (Mapping, str, bytes, bytearray)) or hasattr(trees, "to_dict"):
        trees = [trees]
    return [as_tree_dict(t) for t in trees]


def _outcome(node: Mapping) -> float | None:
    """Outcome of a terminal node (None reward → 0.0); None for a non-terminal node."""
    if not node.get("terminal", False):
        return None
    r = node.get("reward")
    return 0.0 if r is None else float(r)


def _q(tree: Mapping, node: Mapping) -> float:
    """Q(node) from the dict form, exactly as ``Tree.q``."""
    visits = node.get("visits", 0)
    if visits == 0:
        return 0.0
    if tree.get("backup", "mean") == "max":
        m = node.get("max_value")
        return 0.0 if m is None else float(m)
    return float(node.get("value_sum", 0.0)) / visits


def _path(nodes: list[Mapping], i: int) -> list[int]:
    out = [i]
    while nodes[out[-1]]["parent"] != _NO_PARENT:
        out.append(nodes[out[-1]]["parent"])
    return out[::-1]


def _texts(nodes: list[Mapping], path: list[int]) -> list[str]:
    return [nodes[i]["step"]["text"] for i in path if i != _ROOT]


@dataclass(frozen=True, slots=True)
class StepEvidence:
    """Monte-Carlo evidence below one node (its subtree, the node included)."""

    n: int
    """Number of outcomes: terminal leaves in the subtree + rollouts started in the subtree."""
    correct: int
    """How many of those outcomes are correct (``>= threshold``)."""
    total: float
    """Sum of those outcomes."""
    leaves: int
    """Terminal leaves in the subtree."""
    correct_leaves: int
    """Correct terminal leaves in the subtree."""
    correct_dist: int | None
    """Steps from the node down to its nearest correct terminal leaf (0 = the node itself); None if none."""

    @property
    def soft(self) -> float:
        """Fraction of correct outcomes (Math-Shepherd soft label); NaN without evidence."""
        return self.correct / self.n if self.n else math.nan

    @property
    def hard(self) -> bool:
        """Any correct outcome (Math-Shepherd hard label)."""
        return self.correct > 0


def tree_evidence(tree: Any, threshold: float = 0.5) -> list[StepEvidence]:
    """Per node (by index), the outcomes below it: terminal leaves and rollouts of its subtree."""
    d = as_tree_dict(tree)
    nodes = d["nodes"]
    size = len(nodes)
    n = [0] * size
    correct = [0] * size
    total = [0.0] * size
    leaves = [0] * size
    cleaves = [0] * size
    dist: list[float] = [math.inf] * size
    for i in range(size - 1, -1, -1):
        node = nodes[i]
        parent = node["parent"]
        if (i == _ROOT) != (parent == _NO_PARENT) or parent >= i:
            raise ValueError(
                f"tree key={d.get('key')}: node {i} has parent {parent}; nodes must be in creation order"
            )
        o = _outcome(node)
        if o is not None:
            n[i] += 1
            total[i] += o
            leaves[i] += 1
            if o >= threshold:
                correct[i] += 1
                cleaves[i] += 1
                dist[i] = 0
        for r in node.get("rollout_rewards", ()):
            n[i] += 1
            total[i] += float(r)
            correct[i] += float(r) >= threshold
        if parent != _NO_PARENT:
            n[parent] += n[i]
            correct[parent] += correct[i]
            total[parent] += total[i]
            leaves[parent] += leaves[i]
            cleaves[parent] += cleaves[i]
            dist[parent] = min(dist[parent], dist[i] + 1)
    return [
        StepEvidence(
            n[i], correct[i], total[i], leaves[i], cleaves[i], None if dist[i] == math.inf else int(dist[i])
        )
        for i in range(size)
    ]


def mc_labels(tree: Any, threshold: float = 0.5) -> dict[int, tuple[float, bool]]:
    """Math-Shepherd labels ``{node: (soft, hard)}`` for every non-root node with evidence below it."""
    ev = tree_evidence(tree, threshold)
    return {i: (e.soft, e.hard) for i, e in enumerate(ev) if i != _ROOT and e.n > 0}


def _new_stats() -> dict[str, int]:
    return {"trees": 0, "no_terminal": 0, "all_correct": 0, "all_wrong": 0, "mixed": 0, "records": 0}


def _classify(stats: dict[str, int], root: StepEvidence) -> bool:
    """Count the tree's kind; False when it has no terminal leaf (no labels)."""
    stats["trees"] += 1
    if root.leaves == 0:
        stats["no_terminal"] += 1
        return False
    if root.correct_leaves == root.leaves:
        stats["all_correct"] += 1
    elif root.correct_leaves == 0:
        stats["all_wrong"] += 1
    else:
        stats["mixed"] += 1
    return True


def math_shepherd_labels(
    trees: Any,
    kind: Literal["soft", "hard"] = "hard",
    threshold: float = 0.5,
    include_open: bool = False,
) -> tuple[list[dict], dict[str, int]]:
    """Math-Shepherd step labels, one stepwise record per terminal leaf (the path root → leaf).

    ``kind="hard"`` gives ``bool`` labels (any correct outcome below the step), ``"soft"`` gives ``float`` labels
    (fraction of correct outcomes). ``include_open=True`` also emits the paths to non-terminal leaves that have
    rollouts (a prefix with labels, no final answer). Returns ``(records, stats)``; ``stats["steps"]`` counts
    labelled steps.
    """
    if kind not in ("soft", "hard"):
        raise ValueError(f"kind must be 'soft' or 'hard', got {kind!r}")
    records: list[dict] = []
    stats = _new_stats() | {"steps": 0}
    for d in _tree_list(trees):
        nodes = d["nodes"]
        ev = tree_evidence(d, threshold)
        if not _classify(stats, ev[_ROOT]):
            continue
        ends = [
            i
            for i, node in enumerate(nodes)
            if i != _ROOT
            and (node.get("terminal") or (include_open and not node["children"] and ev[i].n > 0))
        ]
        for leaf in ends:
            path = _path(nodes, leaf)[1:]
            labels: list = [ev[i].hard if kind == "hard" else ev[i].soft for i in path]
            records.append(_stepwise_record(d, nodes, leaf, path, labels))
            stats["steps"] += len(path)
    stats["records"] = len(records)
    return records, stats


def _stepwise_record(d: Mapping, nodes: list[Mapping], leaf: int, path: list[int], labels: list) -> dict:
    """One TRL stepwise-supervision record: the steps on ``path`` (root excluded) and one label per step."""
    return {"prompt": d["prompt"], "completions": _texts(nodes, path), "labels": labels, "key": d.get("key", 0),
            "node": leaf}  # fmt: skip


def _rest_values(nodes: list[Mapping], ev: list[StepEvidence], leaf: int, pin_terminal: bool) -> list[float]:
    path = _path(nodes, leaf)[1:]
    big_k = len(path)
    v = 0.0
    out = []
    for k, i in enumerate(path, start=1):
        dist = ev[i].correct_dist
        if dist is not None:  # a correct leaf below: r_k = +1, m_k = distance to the nearest one
            r, m = 1.0, dist
        else:  # no correct leaf below: r_k = -1, m_k = steps left on this path
            r, m = -1.0, big_k - k
        v = min(1.0, max(0.0, v + r * (1.0 - v) / (m + 1)))
        if pin_terminal and dist is None and nodes[i].get("terminal"):
            v = 0.0
        out.append(v)
    return out


def rest_path_values(tree: Any, node: int, threshold: float = 0.5, pin_terminal: bool = True) -> list[float]:
    """ReST-MCTS* value targets ``[v_1, ..., v_K]`` of the steps on the path root → ``node`` (see module doc)."""
    d = as_tree_dict(tree)
    return _rest_values(d["nodes"], tree_evidence(d, threshold), node, pin_terminal)


def rest_value_labels(
    trees: Any, threshold: float = 0.5, pin_terminal: bool = True
) -> tuple[list[dict], dict[str, int]]:
    """ReST-MCTS* inferred value targets (floats in [0, 1]), one stepwise record per terminal leaf."""
    records: list[dict] = []
    stats = _new_stats() | {"steps": 0}
    for d in _tree_list(trees):
        nodes = d["nodes"]
        ev = tree_evidence(d, threshold)
        if not _classify(stats, ev[_ROOT]):
            continue
        for leaf, node in enumerate(nodes):
            if leaf == _ROOT or not node.get("terminal"):
                continue
            path = _path(nodes, leaf)[1:]
            records.append(
                _stepwise_record(d, nodes, leaf, path, _rest_values(nodes, ev, leaf, pin_terminal))
            )
            stats["steps"] += len(path)
    stats["records"] = len(records)
    return records, stats


def ppm_pairs(trees: Any, threshold: float = 0.5, top: int = 2) -> tuple[list[dict], dict[str, int]]:
    """rStar-Math PPM step pairs in TRL preference format (see module doc).

    Each record: ``{"prompt", "chosen", "rejected", "key", "node", "chosen_node", "rejected_node", "q_chosen",
    "q_rejected"}``. ``stats`` adds ``pairs``, ``dropped_margin`` (combinations with ``Q(pos) <= Q(neg)``) and
    ``nodes`` (nodes that gave at least one pair); all-correct and all-wrong trees give no pairs.
    """
    if top < 1:
        raise ValueError(f"top must be >= 1, got {top}")
    records: list[dict] = []
    stats = _new_stats() | {"pairs": 0, "dropped_margin": 0, "nodes": 0}
    for d in _tree_list(trees):
        nodes = d["nodes"]
        ev = tree_evidence(d, threshold)
        if not _classify(stats, ev[_ROOT]) or ev[_ROOT].correct_leaves in (0, ev[_ROOT].leaves):
            continue
        for i, node in enumerate(nodes):
            kids = node["children"]
            e = ev[i]
            if len(kids) < 2 or e.correct_leaves == 0 or e.correct_leaves == e.leaves:
                continue
            q = {c: _q(d, nodes[c]) for c in kids}
            pos = sorted((c for c in kids if ev[c].correct_leaves > 0), key=lambda c: (-q[c], c))[:top]
            neg = sorted(
                (c for c in kids if ev[c].leaves > 0 and ev[c].correct_leaves == 0), key=lambda c: (q[c], c)
            )
            neg = neg[:top]
            prompt = d["prompt"] + "".join(_texts(nodes, _path(nodes, i)))
            made = 0
            for p in pos:
                for n in neg:
                    if q[p] - q[n] <= 0:
                        stats["dropped_margin"] += 1
                        continue
                    records.append(
                        {
                            "prompt": prompt,
                            "chosen": nodes[p]["step"]["text"],
                            "rejected": nodes[n]["step"]["text"],
                            "key": d.get("key", 0),
                            "node": i,
                            "chosen_node": p,
                            "rejected_node": n,
                            "q_chosen": q[p],
                            "q_rejected": q[n],
                        }
                    )
                    made += 1
            stats["nodes"] += made > 0
    stats["pairs"] = stats["records"] = len(records)
    return records, stats
