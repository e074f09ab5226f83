"""Gumbel MuZero search over reasoning steps: Sequential Halving with Gumbel at the root, π′ below it.

Paper: Danihelka, Guez, Schrittwieser, Silver, "Policy improvement by planning with Gumbel" (ICLR 2022); the
reference implementation is mctx's ``gumbel_muzero_policy``. This module follows it phase by phase, each phase a
small function over the shared :class:`~thinktree.search.tree.Tree`:

* **root noise** (:func:`root_gumbel`) — one Gumbel(0, 1) per root child, times ``gumbel_scale``, and the
  Gumbel-top-k of ``g + logits`` (k = ``num_children``): the root children considered, sampled without
  replacement (:func:`gumbel_top_k`);
* **Sequential Halving** (:func:`considered_visits`) — the visit count the next root simulation must go to:
  every considered child gets its share, then the better half by ``g + logits + σ(q̂)`` is kept, and so on;
* **completed Q** (:func:`completed_q`, :func:`sigma_q`) — unvisited children get the mixed value (the node's own
  evaluation mixed with the prior-weighted Q of its visited children); the completed Q-values are min-max
  rescaled over the siblings and scaled by σ: ``(c_visit + max_b N(b)) · c_scale`` (mctx's
  ``qtransform_completed_by_mix_value``);
* **improved policy** (:func:`improved_policy`) — π′ = softmax(logits + σ(completed Q));
* **interior selection** (:func:`interior_select`) — deterministic: argmax π′(a) − N(a) / (1 + Σ_b N(b));
* **acting** (:func:`root_action`) — among the most visited considered root children, argmax g + logits + σ(q̂).

Everything else is the MCTS driver (:func:`thinktree.search.mcts.search_with_seed`): waves of ``in_flight``
simulations per tree with virtual loss, one batched ``propose`` call per wave, the same leaf evaluation
(rollouts / value function / mixed), backup, budget accounting (:class:`~thinktree.search.budget.Meter`), stop
rules (simulations, token budget, solved) and answer selection (``config.answer_selection``). Gumbel search plugs
in as the selection function (:func:`make_select_fn`), so trees, stores and results are the MCTS ones; the root
records its Gumbel draw, the considered children and the chosen action in ``tree.nodes[ROOT].extra["gumbel"]``.

Departures from the paper / mctx:

* Actions are sampled reasoning steps, not an enumerable action set: the root's candidates are the
  ``num_children`` steps the proposer sampled (duplicates merged), so the Gumbel-top-k with k = ``num_children``
  keeps all of them and the Gumbels act through the ranking (which children Sequential Halving visits first and
  keeps). The logits are ``log(prior)`` with the tree's length-normalised step priors (as PUCT uses them).
* Virtual loss (``in_flight`` > 1) is counted in the visit counts that Sequential Halving's schedule and the
  interior rule see (an in-flight simulation is a visit), but not in the Q-values of σ (real statistics only).
* The final answer uses ``config.answer_selection`` like every search method (``visits`` descends by visits, ties
  by Q, which at the root agrees with the Gumbel action unless Q-values tie); the Gumbel action is recorded
  beside it (``extra["gumbel"]["action"]``). PUCT-only fields (select, c_puct, pb_c_*, fill_q, Dirichlet) are
  ignored: the Gumbel noise replaces the Dirichlet noise.
* The root noise is drawn from its own stream derived from (base seed, tree key), so trees do not depend on
  batching and a resumed run rebuilds them exactly (as for MCTS).

Run it: ``search.method: gumbel`` in a recipe (``thinktree search`` / ``eval --methods gumbel`` / ``ablate`` cells
``{method: gumbel, num_simulations: [2, 4, 8]}``), or from Python::

    results = gumbel_search(prompts, proposer, outcome_fn, config=MCTSConfig(num_simulations=8),
                            rng=np.random.default_rng(0))
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence

import numpy as np

from thinktree.search.budget import SearchResult, base_seed_from
from thinktree.search.mcts import MCTSConfig, search_with_seed
from thinktree.search.selection import QBounds, SelectFn
from thinktree.search.tree import ROOT, Tree
from thinktree.search.types import OutcomeFn, StepProposer, Trajectory, ValueFn

__all__ = [
    "GUMBEL_FIELDS",
    "IGNORED_FIELDS",
    "considered_visits",
    "gumbel_top_k",
    "child_logits",
    "completed_q",
    "sigma_q",
    "improved_policy",
    "interior_select",
    "root_gumbel",
    "root_select",
    "root_action",
    "make_select_fn",
    "gumbel_search",
]

GUMBEL_FIELDS = ("gumbel_scale", "c_visit", "c_scale")
"""MCTSConfig fields only Gumbel search reads."""
IGNORED_FIELDS = (
    "select",
    "c_puct",
    "pb_c_base",
    "pb_c_init",
    "dirichlet_alpha",
    "dirichlet_fraction",
    "fill_q",
)
"""MCTSConfig fields Gumbel search ignores (PUCT / AlphaZero only)."""
_TINY = 1e-30
"""Floor of a prior before its log (a zero prior would give -inf logits)."""
_RESCALE_EPS = 1e-8
"""Smallest denominator of the min-max rescaling of the completed Q-values (mctx's epsilon)."""
_GUMBEL_STREAM = 0x67756D62
"""Extra entropy word that separates the root-noise stream from the tree's proposer stream."""


# -- Sequential Halving -----------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=1024)
def considered_visits(num_considered: int, num_simulations: int) -> tuple[int, ...]:
    """Sequential Halving's schedule: entry ``j`` is the visit count of the root child simulation ``j`` goes to.

    Phases keep ``num_considered``, then half as many (at least 2) children; each phase gives every kept child
    ``max(1, num_simulations // (ceil(log2(num_considered)) · kept))`` visits, until the budget is spent. With one
    child the schedule is 0, 1, 2, ... (Karnin et al. 2013; mctx ``get_sequence_of_considered_visits``).
    """
    if num_considered <= 1:
        return tuple(range(num_simulations))
    phases = math.ceil(math.log2(num_considered))
    out: list[int] = []
    kept, visits = num_considered, 0
    while len(out) < num_simulations:
        for _ in range(max(1, num_simulations // (phases * kept))):
            out.extend([visits] * kept)
            visits += 1
        kept = max(2, kept // 2)
    return tuple(out[:num_simulations])


def gumbel_top_k(scores: Sequence[float], k: int) -> list[int]:
    """Positions of the ``k`` largest ``scores`` (``g + logits``: a sample without replacement), best first;
    ties → lower position."""
    order = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
    return order[: max(0, k)]


def _argmax(scores: Sequence[float], among: Sequence[int]) -> int:
    """The position in ``among`` with the largest score (ties → first in ``among``)."""
    best = among[0]
    for i in among[1:]:
        if scores[i] > scores[best]:
            best = i
    return best


# -- completed Q and the improved policy --------------------------------------------------------------------


def child_logits(tree: Tree, node: int) -> list[float]:
    """``log(prior)`` of ``node``'s children (noise-free ``Node.prior``, floored at 1e-30)."""
    return [math.log(max(tree.nodes[c].prior, _TINY)) for c in tree.nodes[node].children]


def completed_q(tree: Tree, node: int) -> list[float]:
    """Q of ``node``'s visited children; the unvisited ones get the mixed value
    ``(v + Σ_b N(b) · Σ_{visited} π(a) q(a) / Σ_{visited} π(a)) / (1 + Σ_b N(b))``, ``v`` being ``node``'s own
    evaluation (``Node.value``; ``Tree.q(node)`` if it has none) and π the children's normalised priors."""
    children = tree.nodes[node].children
    visits = [tree.nodes[c].visits for c in children]
    qs = [tree.q(c) for c in children]
    raw = tree.nodes[node].value
    raw = tree.q(node) if raw is None else raw
    seen = [i for i, n in enumerate(visits) if n > 0]
    mixed = raw
    if seen:
        priors = [max(tree.nodes[children[i]].prior, _TINY) for i in seen]
        weighted = sum(p * qs[i] for p, i in zip(priors, seen)) / sum(priors)
        total = sum(visits)
        mixed = (raw + total * weighted) / (total + 1)
    return [q if n > 0 else mixed for q, n in zip(qs, visits)]


def sigma_q(tree: Tree, node: int, c_visit: float, c_scale: float) -> list[float]:
    """σ(completed Q) of ``node``'s children: min-max rescaled over the siblings (denominator >= 1e-8), times
    ``(c_visit + max_b N(b)) · c_scale`` with real visit counts."""
    q = completed_q(tree, node)
    if not q:
        return []
    lo, hi = min(q), max(q)
    span = max(hi - lo, _RESCALE_EPS)
    max_visits = max(tree.nodes[c].visits for c in tree.nodes[node].children)
    factor = (c_visit + max_visits) * c_scale
    return [factor * (x - lo) / span for x in q]


def _softmax(xs: Sequence[float]) -> list[float]:
    top = max(xs)
    exps = [math.exp(x - top) for x in xs]
    total = sum(exps)
    return [e / total for e in exps]


def improved_policy(tree: Tree, node: int, c_visit: float = 50.0, c_scale: float = 0.1) -> list[float]:
    """π′ over ``node``'s children: ``softmax(log prior + σ(completed Q))`` (empty for a leaf)."""
    if not tree.nodes[node].children:
        return []
    sig = sigma_q(tree, node, c_visit, c_scale)
    return _softmax([lg + s for lg, s in zip(child_logits(tree, node), sig)])


def _counts(tree: Tree, node: int) -> list[int]:
    """Visit counts of ``node``'s children with the in-flight simulations (virtual loss) counted as visits."""
    return [tree.nodes[c].visits + tree.nodes[c].virtual_loss for c in tree.nodes[node].children]


def interior_select(tree: Tree, node: int, config: MCTSConfig, bounds: QBounds = None) -> int:
    """Full Gumbel MuZero's non-root rule: the child maximising ``π′(a) − N(a) / (1 + Σ_b N(b))`` (N with
    virtual loss; ties → lowest index). ``bounds`` is unused (σ rescales over the siblings)."""
    pi = improved_policy(tree, node, config.c_visit, config.c_scale)
    counts = _counts(tree, node)
    total = sum(counts)
    scores = [p - n / (1 + total) for p, n in zip(pi, counts)]
    children = tree.nodes[node].children
    return children[_argmax(scores, range(len(children)))]


# -- the root ------------------------------------------------------------------------------------------------


def root_gumbel(tree: Tree, config: MCTSConfig, base_seed: int) -> dict:
    """The root's Gumbel record ``{"noise", "considered", "gumbel_scale", "c_visit", "c_scale"}``, drawn once
    (from the stream of (``base_seed``, ``tree.key``)) and stored in ``tree.nodes[ROOT].extra["gumbel"]``.

    ``noise[i]`` belongs to the i-th root child; ``considered`` lists the Gumbel-top-k root children (node
    indices, best ``g + logits`` first), k = ``config.num_children``.
    """
    root = tree.nodes[ROOT]
    if "gumbel" in root.extra:
        return root.extra["gumbel"]
    stream = np.random.default_rng(np.random.SeedSequence([int(base_seed), tree.key % 2**64, _GUMBEL_STREAM]))
    noise = [config.gumbel_scale * float(g) for g in stream.gumbel(size=len(root.children))]
    scores = [g + lg for g, lg in zip(noise, child_logits(tree, ROOT))]
    considered = [root.children[i] for i in gumbel_top_k(scores, config.num_children)]
    root.extra["gumbel"] = {
        "noise": noise,
        "considered": considered,
        "gumbel_scale": config.gumbel_scale,
        "c_visit": config.c_visit,
        "c_scale": config.c_scale,
    }
    return root.extra["gumbel"]


def _root_scores(tree: Tree, info: dict) -> list[float]:
    """``g + logits + σ(q̂)`` of every root child."""
    sig = sigma_q(tree, ROOT, info["c_visit"], info["c_scale"])
    return [g + lg + s for g, lg, s in zip(info["noise"], child_logits(tree, ROOT), sig)]


def root_select(tree: Tree, config: MCTSConfig, base_seed: int) -> int:
    """Sequential Halving with Gumbel: among the considered children whose visit count (virtual loss included)
    equals the schedule's entry for this simulation, the one with the best ``g + logits + σ(q̂)``."""
    info = root_gumbel(tree, config, base_seed)
    children = tree.nodes[ROOT].children
    pos = {c: i for i, c in enumerate(children)}
    considered = [pos[c] for c in info["considered"]]
    counts = _counts(tree, ROOT)
    schedule = considered_visits(len(considered), config.num_simulations)
    target = schedule[min(sum(counts), len(schedule) - 1)]
    eligible = [i for i in considered if counts[i] == target]
    if not eligible:  # off schedule (cannot happen when every root simulation follows it): least visited
        least = min(counts[i] for i in considered)
        eligible = [i for i in considered if counts[i] == least]
    return children[_argmax(_root_scores(tree, info), eligible)]


def root_action(tree: Tree) -> int | None:
    """The Gumbel action: among the most visited considered root children, the best ``g + logits + σ(q̂)``
    (None if the root has no Gumbel record or no children)."""
    info = tree.nodes[ROOT].extra.get("gumbel")
    children = tree.nodes[ROOT].children
    if not info or not children:
        return None
    pos = {c: i for i, c in enumerate(children)}
    considered = [pos[c] for c in info["considered"]]
    most = max(tree.nodes[children[i]].visits for i in considered)
    eligible = [i for i in considered if tree.nodes[children[i]].visits == most]
    return children[_argmax(_root_scores(tree, info), eligible)]


def make_select_fn(base_seed: int) -> SelectFn:
    """The MCTS driver's selection function for Gumbel search: :func:`root_select` at the root (its noise drawn
    from ``base_seed``'s stream on first use), :func:`interior_select` below."""

    def gumbel_select(tree: Tree, node: int, config: MCTSConfig, bounds: QBounds) -> int:
        if node == ROOT:
            return root_select(tree, config, base_seed)
        return interior_select(tree, node, config, bounds)

    return gumbel_select


# -- the search ----------------------------------------------------------------------------------------------


def gumbel_search(
    prompts: Sequence[Trajectory],
    proposer: StepProposer,
    outcome_fn: OutcomeFn,
    *,
    config: MCTSConfig,
    rng: np.random.Generator,
    value_fn: ValueFn | None = None,
    answer_fn: Callable[[str], str | None] | None = None,
    progress: Callable[[dict], None] | None = None,
) -> list[SearchResult]:
    """Gumbel MuZero search on every prompt (all trees batched in waves); one :class:`SearchResult` per prompt.

    Arguments as :func:`thinktree.search.mcts.search`: ``rng`` supplies one base seed, from which the MCTS
    driver derives each tree's stream and :func:`root_gumbel` its noise; ``method`` of the results is
    ``"gumbel/<answer_selection>"``.
    """
    if not isinstance(config, MCTSConfig):
        raise TypeError(f"gumbel_search: config must be an MCTSConfig, got {type(config).__name__}")
    base_seed = base_seed_from(rng)
    results = search_with_seed(
        prompts, proposer, outcome_fn, config=config.replace(dirichlet_fraction=0.0), base_seed=base_seed,
        value_fn=value_fn, answer_fn=answer_fn, progress=progress, select_fn=make_select_fn(base_seed),
    )  # fmt: skip
    for r in results:
        if r.tree.nodes[ROOT].children:
            root_gumbel(r.tree, config, base_seed)["action"] = root_action(r.tree)
        r.method = f"gumbel/{config.answer_selection}"
    return results
