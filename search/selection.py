"""Selection: which child a simulation descends into (PUCT, UCT), and which answer a finished tree gives.

A selection function has the signature ``select_fn(tree, node, config, bounds) -> child index``; ``config`` is an
:class:`~thinktree.search.mcts.MCTSConfig` (only its selection fields are read) and ``bounds`` are the min/max Q
over the tree's visited nodes (see :func:`q_bounds`). Register new ones in ``SELECT_FNS``. Ties go to the lowest
child index. Statistics include virtual loss: an in-flight simulation counts as a visit that returned
``config.virtual_loss_value``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from thinktree.search.tree import ROOT, Tree

if TYPE_CHECKING:
    from thinktree.search.mcts import MCTSConfig

__all__ = [
    "QBounds",
    "SelectFn",
    "SELECT_FNS",
    "ANSWER_METHODS",
    "q_bounds",
    "normalize_q",
    "puct_select",
    "uct_select",
    "select_path",
    "choose_answer",
    "vote",
]

QBounds = tuple[float, float] | None
"""(min Q, max Q) over the tree's visited nodes; None before any visit."""
SelectFn = Callable[[Tree, int, "MCTSConfig", QBounds], int]
"""``select_fn(tree, node, config, bounds) -> index of the chosen child``."""
AnswerFn = Callable[[str], "str | None"]


def q_bounds(tree: Tree) -> QBounds:
    """Min and max of Q over the visited nodes (real statistics, virtual loss excluded)."""
    qs = [tree.q(i) for i, n in enumerate(tree.nodes) if n.visits > 0]
    return (min(qs), max(qs)) if qs else None


def normalize_q(q: float, bounds: QBounds) -> float:
    """Min-max normalise ``q`` to the tree's visited range; unchanged when the range is empty (MuZero)."""
    if bounds is None or bounds[1] <= bounds[0]:
        return q
    return (q - bounds[0]) / (bounds[1] - bounds[0])


def _effective(tree: Tree, child: int, vl_value: float) -> tuple[int, float | None]:
    """(visits incl. virtual loss, Q incl. virtual loss or None if never visited nor in flight)."""
    n = tree.nodes[child]
    count = n.visits + n.virtual_loss
    if count == 0:
        return 0, None
    if n.visits == 0:
        return count, vl_value
    if tree.backup == "max":
        q = tree.q(child) if n.virtual_loss == 0 else max(tree.q(child), vl_value)
        return count, q
    return count, (n.value_sum + n.virtual_loss * vl_value) / count


def _argmax(scores: Sequence) -> int:
    """Index of the first maximum (ties → lowest index)."""
    best = 0
    for i in range(1, len(scores)):
        if scores[i] > scores[best]:
            best = i
    return best


def puct_select(tree: Tree, node: int, config: MCTSConfig, bounds: QBounds) -> int:
    """PUCT: ``Q̂(c) + c(s) · P(c) · sqrt(N(s)) / (1 + N(c))``.

    ``c(s) = c_puct`` when ``pb_c_base`` is None, else AlphaZero's ``pb_c_init + log((1 + N + pb_c_base) /
    pb_c_base)``. Q̂ is min-max normalised; an unvisited child gets ``fill_q`` (the parent's normalised Q, or 0).
    """
    parent = tree.nodes[node]
    parent_n = parent.visits + parent.virtual_loss
    if config.pb_c_base is None:
        c = config.c_puct
    else:
        c = config.pb_c_init + math.log((1 + parent_n + config.pb_c_base) / config.pb_c_base)
    fill = 0.0 if config.fill_q == "zero" else normalize_q(tree.q(node), bounds)
    sqrt_n = math.sqrt(parent_n)
    scores = []
    for child, prior in zip(parent.children, tree.child_priors(node)):
        count, q = _effective(tree, child, config.virtual_loss_value)
        q_hat = fill if q is None else normalize_q(q, bounds)
        scores.append(q_hat + c * prior * sqrt_n / (1 + count))
    return parent.children[_argmax(scores)]


def uct_select(tree: Tree, node: int, config: MCTSConfig, bounds: QBounds) -> int:
    """UCT (UCB1 on trees): ``Q̂(c) + c_puct · sqrt(ln N(s) / N(c))``; unvisited children first, by index."""
    parent = tree.nodes[node]
    log_n = math.log(max(1, parent.visits + parent.virtual_loss))
    scores = []
    for child in parent.children:
        count, q = _effective(tree, child, config.virtual_loss_value)
        if count == 0:
            scores.append(math.inf)
        else:
            scores.append(normalize_q(q, bounds) + config.c_puct * math.sqrt(log_n / count))  # type: ignore[arg-type]
    return parent.children[_argmax(scores)]


SELECT_FNS: dict[str, SelectFn] = {"puct": puct_select, "uct": uct_select}
"""Selection functions by name (``MCTSConfig.select``)."""


def select_path(tree: Tree, select_fn: SelectFn, config: MCTSConfig) -> list[int]:
    """Descend from the root with ``select_fn`` to a leaf (unexpanded or terminal); return the path."""
    bounds = q_bounds(tree)
    path = [ROOT]
    while tree.nodes[path[-1]].children:
        path.append(select_fn(tree, path[-1], config, bounds))
    return path


# -- answer selection ----------------------------------------------------------------------------------------

ANSWER_METHODS = ("visits", "q", "majority", "weighted_vote")
"""Ways to pick a tree's final answer (``MCTSConfig.answer_selection``)."""


def _descend(tree: Tree, by: str) -> int:
    """Follow the visited child with most visits (then best Q), or best Q (then most visits), from the root;
    remaining ties → lowest index."""
    node = ROOT
    while True:
        children = [c for c in tree.nodes[node].children if tree.nodes[c].visits > 0]
        if not children:
            return node
        n = tree.nodes
        keys = [(n[c].visits, tree.q(c)) if by == "visits" else (tree.q(c), n[c].visits) for c in children]
        node = children[_argmax(keys)]


def _best_terminal(tree: Tree, by: str) -> int | None:
    """Best terminal leaf by (visits, Q) or (Q, visits); visited ones first; None if there is none."""
    leaves = tree.terminal_leaves()
    if not leaves:
        return None
    visited = [i for i in leaves if tree.nodes[i].visits > 0] or leaves
    n = tree.nodes
    keys = [(n[i].visits, tree.q(i)) if by == "visits" else (tree.q(i), n[i].visits) for i in visited]
    return visited[_argmax(keys)]  # type: ignore[arg-type]


def vote(
    tree: Tree,
    leaves: Sequence[int],
    answer_fn: AnswerFn,
    weights: Sequence[float] | None = None,
) -> tuple[int | None, str | None]:
    """Majority (or weighted) vote of ``answer_fn(completion)`` over ``leaves``; None answers do not vote.

    Returns (a leaf with the winning answer, the answer). Ties: more total weight, then more votes, then the
    answer seen first. The returned leaf is the one with the answer's best Q, lowest index on ties.
    """
    totals: dict[str, list] = {}
    for pos, leaf in enumerate(leaves):
        answer = answer_fn(tree.trajectory(leaf).completion)
        if answer is None:
            continue
        w = 1.0 if weights is None else float(weights[pos])
        entry = totals.setdefault(answer, [0.0, 0, -pos, []])
        entry[0] += w
        entry[1] += 1
        entry[3].append(leaf)
    if not totals:
        return None, None
    answer = max(totals, key=lambda a: tuple(totals[a][:3]))
    members = totals[answer][3]
    return members[_argmax([tree.q(i) for i in members])], answer


def choose_answer(tree: Tree, method: str, answer_fn: AnswerFn | None) -> tuple[int, str | None]:
    """The chosen node and its answer (``answer_fn`` of its completion; None without ``answer_fn``).

    ``visits`` / ``q``: descend from the root by most visits / best Q (the other as tie-break); if that does
    not end on a terminal node,
    take the best terminal leaf by the same key (or the descent's end if the tree has no terminal leaf).
    ``majority``: vote over all terminal leaves; ``weighted_vote``: votes weighted by the leaf's value
    (``Node.value``; 0 for never-evaluated leaves). Both need ``answer_fn``.
    """
    if method in ("visits", "q"):
        node = _descend(tree, method)
        if not tree.nodes[node].terminal:
            best = _best_terminal(tree, method)
            node = node if best is None else best
    elif method in ("majority", "weighted_vote"):
        if answer_fn is None:
            raise ValueError(f"answer_selection={method!r} needs an answer_fn")
        leaves = tree.terminal_leaves()
        weights = None
        if method == "weighted_vote":
            weights = [tree.nodes[i].value or 0.0 for i in leaves]
        voted, answer = vote(tree, leaves, answer_fn, weights)
        if voted is not None:
            return voted, answer
        node = _descend(tree, "visits")
    else:
        raise ValueError(f"unknown answer_selection {method!r}; choose one of {ANSWER_METHODS}")
    answer = answer_fn(tree.trajectory(node).completion) if answer_fn is not None else None
    return node, answer
