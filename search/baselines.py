"""Baselines with the same interface, return type and Budget accounting as :func:`~thinktree.search.mcts.search`.

* :func:`greedy` — one chain, one child per step. The protocol has no temperature: greedy decoding needs a
  proposer configured with temperature 0 (otherwise this is a single random sample).
* :func:`best_of_n` — n independent chains; answer by majority vote (self-consistency), by value-weighted vote,
  or by the best value_fn score.
* :func:`step_beam` — step-level beam search scored by ``value_fn`` (or, without one, by mean step logprob).

Each returns the tree it built (chains / beams under one root; no Monte-Carlo statistics except that every
graded terminal leaf's reward is backed up once along its path), so downstream code treats all methods alike.
Randomness follows :func:`~thinktree.search.budget.tree_rng`: one base seed from ``rng``, one stream per key.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np

from thinktree.search.budget import Meter, SearchResult, base_seed_from, draw_seed, rollout_batch, tree_rng
from thinktree.search.mcts import backup, check_prompts, expand
from thinktree.search.selection import vote
from thinktree.search.tree import ROOT, Tree
from thinktree.search.types import OutcomeFn, StepProposer, StepRecord, Trajectory, ValueFn

__all__ = ["greedy", "best_of_n", "step_beam", "BON_SELECTIONS", "DEFAULT_MAX_DEPTH"]

DEFAULT_MAX_DEPTH = 32
"""Same default as ``MCTSConfig.max_depth``."""
BON_SELECTIONS = ("majority", "weighted_vote", "best_value")
"""Best-of-n answer selections: self-consistency, value-weighted vote, best value_fn score."""
AnswerFn = Callable[[str], "str | None"]


def _setup(
    prompts: Sequence[Trajectory],
    proposer: StepProposer,
    outcome_fn: OutcomeFn,
    value_fn: ValueFn | None,
    rng: np.random.Generator,
) -> tuple[list[Tree], list[np.random.Generator], Meter]:
    prompts = check_prompts(prompts)
    base_seed = base_seed_from(rng)
    trees = [Tree.from_prompt(p) for p in prompts]
    rngs = [tree_rng(base_seed, p.key) for p in prompts]
    return trees, rngs, Meter(proposer, outcome_fn, value_fn, len(prompts))


def _normalise_priors(tree: Tree) -> None:
    for node in tree.nodes:
        total = sum(tree.nodes[c].prior for c in node.children)
        for c in node.children:
            tree.nodes[c].prior = tree.nodes[c].prior / total if total > 0 else 1.0 / len(node.children)


def _grade(trees: list[Tree], leaves: list[list[int]], meter: Meter) -> None:
    """One outcome_fn call for all ``leaves``; record each reward and back it up along the leaf's path."""
    pairs = [(i, leaf) for i, ls in enumerate(leaves) for leaf in ls]
    rewards = meter.outcomes([i for i, _ in pairs], [trees[i].trajectory(leaf) for i, leaf in pairs])
    for (i, leaf), reward in zip(pairs, rewards):
        trees[i].nodes[leaf].reward = reward
        backup(trees[i], trees[i].path(leaf), reward)


def _chains(
    trees: list[Tree], rngs: list[np.random.Generator], meter: Meter, n: int, max_depth: int
) -> list[list[int]]:
    """Sample ``n`` chains per tree (one batched rollout loop), add them under the root, grade them."""
    if not isinstance(max_depth, int) or max_depth <= 0:
        raise ValueError(f"max_depth must be a positive int, got {max_depth!r}")
    owners = [i for i in range(len(trees)) for _ in range(n)]
    roots = [trees[i].trajectory(ROOT) for i in owners]
    finals = rollout_batch(meter, owners, roots, [rngs[i] for i in owners], max_depth, rollout=False)
    leaves: list[list[int]] = [[] for _ in trees]
    for i, traj in zip(owners, finals):
        node = ROOT
        for d, step in enumerate(traj.steps, start=1):
            node = trees[i].add_child(node, step, step.prior, terminal=step.eos or d >= max_depth)
        leaves[i].append(node)
    for tree in trees:
        _normalise_priors(tree)
    _grade(trees, leaves, meter)
    return leaves


def _result(
    tree: Tree, node: int, answer_fn: AnswerFn | None, method: str, budget, answer=None
) -> SearchResult:
    completion = tree.trajectory(node).completion
    if answer is None and answer_fn is not None:
        answer = answer_fn(completion)
    return SearchResult(tree, node, answer, completion, method, budget, stop_reason="done")


def greedy(
    prompts: Sequence[Trajectory],
    proposer: StepProposer,
    outcome_fn: OutcomeFn,
    *,
    rng: np.random.Generator,
    max_depth: int = DEFAULT_MAX_DEPTH,
    answer_fn: AnswerFn | None = None,
) -> list[SearchResult]:
    """One chain per prompt (``propose(..., num_children=1, ...)`` until EOS or ``max_depth``).

    Greedy decoding needs a proposer configured with temperature 0: the protocol has no temperature.
    """
    trees, rngs, meter = _setup(prompts, proposer, outcome_fn, None, rng)
    leaves = _chains(trees, rngs, meter, 1, max_depth)
    budgets = meter.close()
    return [_result(t, ls[0], answer_fn, "greedy", b) for t, ls, b in zip(trees, leaves, budgets)]


def best_of_n(
    prompts: Sequence[Trajectory],
    proposer: StepProposer,
    outcome_fn: OutcomeFn,
    *,
    n: int,
    rng: np.random.Generator,
    max_depth: int = DEFAULT_MAX_DEPTH,
    answer_selection: str = "majority",
    value_fn: ValueFn | None = None,
    answer_fn: AnswerFn | None = None,
) -> list[SearchResult]:
    """``n`` independent chains per prompt under one root (duplicate texts are NOT merged: chains stay apart).

    ``answer_selection``: "majority" (self-consistency; needs ``answer_fn``), "weighted_vote" (votes weighted by
    ``value_fn``; needs both) or "best_value" (highest ``value_fn`` score; ties → first chain). value_fn scores
    are stored in ``Node.extra["value_fn"]`` of the leaves.
    """
    if not isinstance(n, int) or n <= 0:
        raise ValueError(f"best_of_n: n must be a positive int, got {n!r}")
    if answer_selection not in BON_SELECTIONS:
        raise ValueError(
            f"best_of_n: unknown answer_selection {answer_selection!r}; choose one of {BON_SELECTIONS}"
        )
    if answer_selection != "majority" and value_fn is None:
        raise ValueError(f"best_of_n: answer_selection={answer_selection!r} needs a value_fn")
    if answer_selection != "best_value" and answer_fn is None:
        raise ValueError(f"best_of_n: answer_selection={answer_selection!r} needs an answer_fn")
    trees, rngs, meter = _setup(prompts, proposer, outcome_fn, value_fn, rng)
    leaves = _chains(trees, rngs, meter, n, max_depth)
    scores: list[list[float]] = [[] for _ in trees]
    if value_fn is not None:
        pairs = [(i, leaf) for i, ls in enumerate(leaves) for leaf in ls]
        flat = meter.values([i for i, _ in pairs], [trees[i].trajectory(leaf) for i, leaf in pairs])
        for (i, leaf), s in zip(pairs, flat):
            trees[i].nodes[leaf].extra["value_fn"] = s
            scores[i].append(s)
    results = []
    for tree, ls, sc, budget in zip(trees, leaves, scores, meter.close()):
        node, answer = ls[0], None
        if answer_selection == "best_value":
            node = ls[int(np.argmax(sc))]
        else:
            voted, answer = vote(tree, ls, answer_fn, sc if answer_selection == "weighted_vote" else None)  # type: ignore[arg-type]
            node = ls[0] if voted is None else voted
        results.append(_result(tree, node, answer_fn, f"best_of_n/{answer_selection}", budget, answer))
    return results


def mean_step_logprob(trajectory: Trajectory) -> float:
    """Mean over steps of the step's mean token logprob (``log(prior)`` for steps without logprobs)."""

    def step_score(s: StepRecord) -> float:
        if s.logprobs:
            return sum(s.logprobs) / len(s.logprobs)
        return math.log(s.prior) if s.prior > 0 else -math.inf

    return sum(step_score(s) for s in trajectory.steps) / max(1, len(trajectory.steps))


def _beam_round(
    trees: list[Tree],
    rngs: list[np.random.Generator],
    meter: Meter,
    live: list[list[int]],
    expansions: int,
    max_depth: int,
    score_by_value: bool,
) -> list[list[int]]:
    """Expand every live beam (one propose call) and score the new candidates; returns candidates per tree."""
    reqs = [(i, node) for i, nodes in enumerate(live) for node in nodes]
    seeds = [draw_seed(rngs[i]) for i, _ in reqs]
    prefixes = [trees[i].trajectory(node) for i, node in reqs]
    proposals = meter.propose([i for i, _ in reqs], prefixes, expansions, seeds)
    cands: list[list[int]] = [[] for _ in trees]
    for (i, node), steps in zip(reqs, proposals):
        before = len(trees[i].nodes)
        expand(trees[i], node, steps, max_depth)
        cands[i].extend(range(before, len(trees[i].nodes)))
    pairs = [(i, c) for i, cs in enumerate(cands) for c in cs]
    trajs = [trees[i].trajectory(c) for i, c in pairs]
    if score_by_value:
        scores = meter.values([i for i, _ in pairs], trajs)
    else:
        scores = [mean_step_logprob(t) for t in trajs]
    for (i, c), s in zip(pairs, scores):
        trees[i].nodes[c].extra["beam_score"] = s
    return cands


def step_beam(
    prompts: Sequence[Trajectory],
    proposer: StepProposer,
    outcome_fn: OutcomeFn,
    *,
    rng: np.random.Generator,
    beam_width: int = 4,
    expansions: int = 4,
    max_depth: int = DEFAULT_MAX_DEPTH,
    value_fn: ValueFn | None = None,
    answer_fn: AnswerFn | None = None,
) -> list[SearchResult]:
    """Step-level beam search: each live beam proposes ``expansions`` steps (duplicates merged); of all
    candidates of a tree the top ``beam_width`` by score are kept (ties → lowest index); kept terminal candidates
    are finished and leave the beam (so the beam narrows), the rest continue. Scores: ``value_fn`` of the
    candidate's trajectory, or :func:`mean_step_logprob` without one; stored in ``Node.extra["beam_score"]``
    (``extra["beam_kept"]`` marks kept nodes). Answer: the finished beam with the best score.
    """
    for name, v in (("beam_width", beam_width), ("expansions", expansions), ("max_depth", max_depth)):
        if not isinstance(v, int) or v <= 0:
            raise ValueError(f"step_beam: {name} must be a positive int, got {v!r}")
    trees, rngs, meter = _setup(prompts, proposer, outcome_fn, value_fn, rng)
    live: list[list[int]] = [[ROOT] for _ in trees]
    done: list[list[int]] = [[] for _ in trees]
    while any(live):
        cands = _beam_round(trees, rngs, meter, live, expansions, max_depth, value_fn is not None)
        for i, cs in enumerate(cands):
            nodes = trees[i].nodes
            kept = sorted(cs, key=lambda c: (-nodes[c].extra["beam_score"], c))[:beam_width]
            for c in kept:
                nodes[c].extra["beam_kept"] = True
            done[i].extend(c for c in kept if nodes[c].terminal)
            live[i] = [c for c in kept if not nodes[c].terminal]
    _grade(trees, done, meter)
    results = []
    for tree, ds, budget in zip(trees, done, meter.close()):
        best = min(ds, key=lambda c: (-tree.nodes[c].extra["beam_score"], c))
        results.append(_result(tree, best, answer_fn, "step_beam", budget))
    return results
