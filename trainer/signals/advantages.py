"""Per-step advantages from search trees, as token-level policy-gradient records.

Every method scores the tree's sampled steps from the Monte-Carlo evidence below them: a terminal leaf's
outcome is its verifier ``reward`` (``None`` → 0.0), scored as ``1[outcome >= threshold]`` (or the raw outcome
with ``threshold=None``); the evidence of node ``n``, ``L(n)``, is the terminal leaves of its subtree (``n``
included) plus the rollouts started at ``n`` or below. ``V(n)`` = mean score over ``L(n)`` — TreeRL's EPTree value
(the fraction of correct leaves under ``n``). Only nodes with ``|L(n)| > 0`` are scored.

Methods (registry :data:`ADVANTAGES`, dispatch :func:`tree_advantages`):

* ``"treerl"`` — TreeRL (Hou et al., 2025): ``A(n) = (V(n) − V(root)) + (V(n) − V(parent(n)))`` (global + local
  advantage). The paper multiplies by ``1/sqrt(|L(n)|)``; here that reweighting is opt-in
  (``sqrt_leaf_norm=True``), because with ``dedupe_prefixes`` each step is already counted once.
* ``"treerpo"`` — TreeRPO (Yang et al., 2025): ``A(n) = V(n) − mean(V(s) for s in siblings(n) ∪ {n})``, the
  group being the scored children of ``n``'s parent (a lone scored child gets 0). With ``normalize=True`` the
  difference is divided by the group's std + 1e-4, as in the paper's GRPO-style step groups.
* ``"grpo"`` — the GRPO baseline on the same tree: the group is the tree's terminal leaves and every token of
  a leaf's root-to-leaf path gets ``A = (score(leaf) − mean) / (std + 1e-4)`` (``normalize=False`` drops the
  std: Dr. GRPO). Shared prefixes appear once per leaf path, exactly as if the leaves had been sampled i.i.d.

``std`` is the sample standard deviation (``ddof=1``, as TRL's ``GRPOTrainer``; 0 for one member).
``normalize=None`` (default) means the method's usual choice: on for ``grpo``, off for ``treerl``/``treerpo``. For
``treerl``, ``normalize=True`` divides all the tree's step advantages by their std (when it is > 0); the mean is
not subtracted, the advantages being relative already.

Record format (one training sequence; all lists have one entry per token of ``completion_ids``)::

    {"prompt": str, "key": tree.key, "node": int, "method": str,
     "completion_ids": [token ids of the steps root → node],
     "advantages": [float], "old_logprobs": [float, from StepRecord.logprobs], "loss_mask": [0/1],
     "prefix_len": int}

* Path mode (default): one record per root-to-terminal-leaf path (``node`` = the leaf); each token carries its
  own step's advantage (``grpo``: the leaf's), ``loss_mask`` is all ones, ``prefix_len = 0``. Shared prefixes
  therefore appear in several records.
* ``dedupe_prefixes=True`` (``treerl``/``treerpo`` only): one record per scored step (``node`` = that step): the
  same fields, ``completion_ids`` still spans root → step so the record is self-contained, but the first
  ``prefix_len`` tokens (the ancestors' steps) are context only: ``loss_mask = 0`` and advantage 0 there. Steps
  whose evidence is only rollouts (no terminal leaf below) appear only in this mode.

:func:`iid_group_advantages` gives plain GRPO advantages for i.i.d. chains (a tree whose root has ``n`` unbranched
chains: best-of-N) in the same format, so that tree and chain sampling can be compared at equal generated tokens
(:func:`generated_tokens`). Departures from the papers: no KL/entropy terms, no PRM mixing; V uses rollouts too.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from thinktree.search.tree import NO_PARENT, ROOT, Tree

__all__ = [
    "ADVANTAGES",
    "path_record",
    "AdvantageFn",
    "step_values",
    "treerl_step_advantages",
    "treerpo_step_advantages",
    "grpo_leaf_advantages",
    "treerl_advantages",
    "treerpo_advantages",
    "grpo_advantages",
    "tree_advantages",
    "iid_group_advantages",
    "generated_tokens",
]

EPS = 1e-4
"""Added to the std before dividing (TRL's GRPO constant)."""


def _as_tree(tree: Any) -> Tree:
    if isinstance(tree, Tree):
        return tree
    if isinstance(tree, Mapping):
        return Tree.from_dict(dict(tree))
    if isinstance(tree, (str, bytes, bytearray)):
        return Tree.from_json(tree if isinstance(tree, str) else tree.decode())
    raise TypeError(f"expected a Tree, tree dict or JSON string; got {type(tree).__name__}")


def _score(outcome: float, threshold: float | None) -> float:
    if threshold is None:
        return float(outcome)
    return 1.0 if outcome >= threshold else 0.0


def _leaf_outcome(tree: Tree, i: int) -> float:
    r = tree.nodes[i].reward
    return 0.0 if r is None else float(r)


def _std(xs: list[float]) -> float:
    """Sample standard deviation (ddof=1); 0.0 for fewer than two values."""
    if len(xs) < 2:
        return 0.0
    m = sum(xs) / len(xs)
    return math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1))


def step_values(tree: Tree, threshold: float | None = 0.5) -> dict[int, tuple[float, int]]:
    """``{node: (V(n), |L(n)|)}`` for every node (root included) with evidence below it."""
    size = len(tree.nodes)
    count = [0] * size
    total = [0.0] * size
    for i in range(size - 1, -1, -1):
        node = tree.nodes[i]
        if node.terminal:
            count[i] += 1
            total[i] += _score(_leaf_outcome(tree, i), threshold)
        for r in node.rollout_rewards:
            count[i] += 1
            total[i] += _score(r, threshold)
        if node.parent != NO_PARENT:
            if node.parent >= i:
                raise ValueError(
                    f"tree key={tree.key}: node {i} has parent {node.parent}; not in creation order"
                )
            count[node.parent] += count[i]
            total[node.parent] += total[i]
    return {i: (total[i] / count[i], count[i]) for i in range(size) if count[i] > 0}


def treerl_step_advantages(
    tree: Tree, threshold: float | None = 0.5, normalize: bool = False, sqrt_leaf_norm: bool = False
) -> dict[int, float]:
    """TreeRL ``{node: A(n)}`` for every scored non-root node (see module doc)."""
    values = step_values(tree, threshold)
    if ROOT not in values:
        return {}
    v_root = values[ROOT][0]
    adv = {}
    for i, (v, n) in values.items():
        if i == ROOT:
            continue
        a = (v - v_root) + (v - values[tree.nodes[i].parent][0])
        adv[i] = a / math.sqrt(n) if sqrt_leaf_norm else a
    if normalize:
        s = _std(list(adv.values()))
        if s > 0:
            adv = {i: a / (s + EPS) for i, a in adv.items()}
    return adv


def treerpo_step_advantages(
    tree: Tree, threshold: float | None = 0.5, normalize: bool = False
) -> dict[int, float]:
    """TreeRPO ``{node: A(n)}``: V(n) minus the mean V of its scored sibling group (see module doc)."""
    values = step_values(tree, threshold)
    adv = {}
    for node in tree.nodes:
        group = [c for c in node.children if c in values]
        if not group:
            continue
        vs = [values[c][0] for c in group]
        mean = sum(vs) / len(vs)
        scale = _std(vs) + EPS if normalize else 1.0
        for c, v in zip(group, vs):
            adv[c] = (v - mean) / scale
    return adv


def grpo_leaf_advantages(
    tree: Tree, threshold: float | None = 0.5, normalize: bool = True
) -> dict[int, float]:
    """GRPO ``{terminal leaf: A}`` with the tree's terminal leaves as the group."""
    leaves = tree.terminal_leaves()
    scores = [_score(_leaf_outcome(tree, i), threshold) for i in leaves]
    if not scores:
        return {}
    mean = sum(scores) / len(scores)
    scale = _std(scores) + EPS if normalize else 1.0
    return {i: (s - mean) / scale for i, s in zip(leaves, scores)}


def path_record(
    tree: Tree, node: int, method: str, token_adv: Callable[[int], float], train_from: int = 1
) -> dict:
    """Record for the path root → ``node``; steps at depth ``>= train_from`` are trained, the rest is context."""
    ids: list[int] = []
    adv: list[float] = []
    lps: list[float] = []
    mask: list[int] = []
    prefix_len = 0
    for i in tree.path(node)[1:]:
        step = tree.nodes[i].step
        assert step is not None
        n = len(step.token_ids)
        trained = tree.nodes[i].depth >= train_from
        a = token_adv(i) if trained else 0.0
        ids.extend(step.token_ids)
        lps.extend(step.logprobs)
        adv.extend([a] * n)
        mask.extend([1 if trained else 0] * n)
        if not trained:
            prefix_len += n
    return {
        "prompt": tree.prompt,
        "key": tree.key,
        "node": node,
        "method": method,
        "completion_ids": ids,
        "advantages": adv,
        "old_logprobs": lps,
        "loss_mask": mask,
        "prefix_len": prefix_len,
    }


def _step_records(tree: Tree, adv: dict[int, float], method: str, dedupe_prefixes: bool) -> list[dict]:
    if dedupe_prefixes:
        return [
            path_record(tree, i, method, adv.__getitem__, train_from=tree.nodes[i].depth)
            for i in sorted(adv)
            if i != ROOT
        ]
    return [path_record(tree, leaf, method, adv.__getitem__, train_from=1) for leaf in tree.terminal_leaves()]


def treerl_advantages(
    tree: Any,
    *,
    threshold: float | None = 0.5,
    normalize: bool | None = None,
    dedupe_prefixes: bool = False,
    sqrt_leaf_norm: bool = False,
) -> list[dict]:
    """TreeRL records (global + local advantage per step)."""
    t = _as_tree(tree)
    adv = treerl_step_advantages(t, threshold, bool(normalize), sqrt_leaf_norm)
    return _step_records(t, adv, "treerl", dedupe_prefixes)


def treerpo_advantages(
    tree: Any, *, threshold: float | None = 0.5, normalize: bool | None = None, dedupe_prefixes: bool = False
) -> list[dict]:
    """TreeRPO records (sibling-relative advantage per step)."""
    t = _as_tree(tree)
    adv = treerpo_step_advantages(t, threshold, bool(normalize))
    return _step_records(t, adv, "treerpo", dedupe_prefixes)


def grpo_advantages(
    tree: Any, *, threshold: float | None = 0.5, normalize: bool | None = None, dedupe_prefixes: bool = False
) -> list[dict]:
    """GRPO records: one per terminal leaf, the leaf's group advantage on every token of its path."""
    if dedupe_prefixes:
        raise ValueError(
            "grpo: dedupe_prefixes is not defined (a shared token carries one advantage per leaf)"
        )
    t = _as_tree(tree)
    adv = grpo_leaf_advantages(t, threshold, True if normalize is None else normalize)
    return [path_record(t, leaf, "grpo", lambda _i, a=a: a, train_from=1) for leaf, a in adv.items()]


AdvantageFn = Callable[..., list[dict]]

ADVANTAGES: dict[str, AdvantageFn] = {
    "treerl": treerl_advantages,
    "treerpo": treerpo_advantages,
    "grpo": grpo_advantages,
}
"""Advantage compilers by name; each ``(tree, *, threshold, normalize, dedupe_prefixes, **method_kwargs)``."""


def tree_advantages(
    tree: Any,
    method: str = "treerl",
    threshold: float | None = 0.5,
    normalize: bool | None = None,
    dedupe_prefixes: bool = False,
    **kwargs: Any,
) -> list[dict]:
    """Advantage records of one tree by the named method (``ADVANTAGES``); extra kwargs go to the method."""
    if method not in ADVANTAGES:
        raise KeyError(f"unknown advantage method {method!r}; known: {sorted(ADVANTAGES)}")
    return ADVANTAGES[method](
        tree, threshold=threshold, normalize=normalize, dedupe_prefixes=dedupe_prefixes, **kwargs
    )


def iid_group_advantages(chains: Any, threshold: float | None = 0.5, normalize: bool = True) -> list[dict]:
    """Plain GRPO advantages for i.i.d. chains, in the advantage record format.

    ``chains`` is a tree (or an iterable of trees, one group each) whose root has ``n`` children, each the start of
    an unbranched chain of steps (best-of-N sampling). Raises ``ValueError`` for a branched tree (use
    ``tree_advantages(tree, "grpo")`` there). Records are emitted for the chains that end in a terminal leaf.
    """
    trees = [chains] if isinstance(chains, (Tree, Mapping, str, bytes, bytearray)) else list(chains)
    out: list[dict] = []
    for tree in trees:
        t = _as_tree(tree)
        for i, node in enumerate(t.nodes):
            if i != ROOT and len(node.children) > 1:
                raise ValueError(
                    f"iid_group_advantages: tree key={t.key} branches at node {i}; not i.i.d. chains"
                )
        adv = grpo_leaf_advantages(t, threshold, normalize)
        out.extend(path_record(t, leaf, "iid", lambda _i, a=a: a, train_from=1) for leaf, a in adv.items())
    return out


def generated_tokens(trees: Tree | Iterable[Tree]) -> int:
    """Tokens the policy generated to build the tree(s): every step counted once (rollouts excluded)."""
    ts = [trees] if isinstance(trees, Tree) else list(trees)
    return sum(len(n.step.token_ids) for t in ts for n in t.nodes if n.step is not None)
