"""What a search spends and returns: budgets, metered calls to the injected functions, random streams, results.

Every search method (MCTS and the baselines) calls the model only through a :class:`Meter`, so all of them are
charged the same way: tokens per tree, batched calls per tree, and the proposer's own counters (the optional
``stats`` dict attribute, e.g. ``forward_passes`` / ``reencoded_tokens``) as deltas over the whole search call.
All of them return one :class:`SearchResult` per prompt and draw randomness from :func:`tree_rng` streams.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from thinktree.search.tree import Tree
from thinktree.search.types import StepProposer, StepRecord, Trajectory

__all__ = [
    "Budget",
    "Meter",
    "SearchResult",
    "SEED_HIGH",
    "proposer_stats",
    "describe",
    "tree_rng",
    "base_seed_from",
    "draw_seed",
    "rollout_batch",
]


@dataclass
class Budget:
    """Compute spent on one tree.

    Token counts are per tree. ``wall_time_s`` and ``backend`` (deltas of the proposer's numeric ``stats``) cover
    the whole batched search call, which all trees of that call share.
    """

    generated_tokens: int = 0
    """Tokens of every step the proposer returned for this tree (expansions + rollouts, duplicates included)."""
    rollout_tokens: int = 0
    """The part of ``generated_tokens`` spent in rollouts (steps that are not added to the tree)."""
    proposer_calls: int = 0
    """Batched ``propose`` calls that included at least one prefix of this tree."""
    prefixes: int = 0
    """Prefixes of this tree sent to the proposer (one per expansion or rollout step)."""
    value_evals: int = 0
    """Trajectories of this tree scored by the value function."""
    outcome_evals: int = 0
    """Trajectories of this tree graded by the outcome function (verifier)."""
    wall_time_s: float = 0.0
    """Wall-clock seconds of the whole search call (shared by its trees)."""
    backend: dict[str, float] = field(default_factory=dict)
    """Deltas of the proposer's numeric ``stats`` over the whole search call (shared by its trees)."""

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Budget:
        return cls(**{k: (dict(v) if k == "backend" else v) for k, v in d.items()})


def proposer_stats(proposer: object) -> dict[str, float]:
    """The numeric entries of ``proposer.stats`` (empty if the proposer has no ``stats`` dict)."""
    stats = getattr(proposer, "stats", None)
    if not isinstance(stats, dict):
        return {}
    return {str(k): v for k, v in stats.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def describe(trajectory: Trajectory) -> str:
    """A short identification of a trajectory for error messages."""
    tail = trajectory.completion[-80:]
    return f"trajectory key={trajectory.key} ({len(trajectory.steps)} steps, completion ends {tail!r})"


def _name(fn: object) -> str:
    return getattr(fn, "__qualname__", None) or type(fn).__qualname__


def _check_score(x: object, what: str, trajectory: Trajectory) -> float:
    if x is None and what == "outcome_fn":
        return 0.0
    try:
        v = float(x)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise ValueError(f"{what} returned {x!r} (not a number) for {describe(trajectory)}") from None
    if not math.isfinite(v):
        raise ValueError(f"{what} returned non-finite {v!r} for {describe(trajectory)}")
    if not -1e-6 <= v <= 1 + 1e-6:
        raise ValueError(f"{what} returned {v!r}, outside [0, 1], for {describe(trajectory)}")
    return min(1.0, max(0.0, v))


class Meter:
    """Calls the proposer / value_fn / outcome_fn with validation and charges each tree's :class:`Budget`.

    ``owners[i]`` is the tree index (0..num_trees-1) that request ``i`` belongs to.
    """

    def __init__(
        self,
        proposer: StepProposer,
        outcome_fn: Callable[[Sequence[Trajectory]], list[float | None]],
        value_fn: Callable[[Sequence[Trajectory]], list[float]] | None,
        num_trees: int,
    ) -> None:
        self.proposer = proposer
        self.outcome_fn = outcome_fn
        self.value_fn = value_fn
        self.budgets = [Budget() for _ in range(num_trees)]
        self._t0 = time.perf_counter()
        self._stats0 = proposer_stats(proposer)

    def propose(
        self,
        owners: Sequence[int],
        prefixes: Sequence[Trajectory],
        num_children: int,
        seeds: Sequence[int],
        *,
        rollout: bool = False,
    ) -> list[list[StepRecord]]:
        """One batched ``propose`` call; checks that every prefix got exactly ``num_children`` StepRecords."""
        if not prefixes:
            return []
        name = f"proposer {_name(self.proposer)}"
        out = self.proposer.propose(list(prefixes), num_children, [int(s) for s in seeds])
        if not isinstance(out, (list, tuple)) or len(out) != len(prefixes):
            got = len(out) if isinstance(out, (list, tuple)) else type(out).__name__
            raise RuntimeError(f"{name} returned {got} step lists for {len(prefixes)} prefixes")
        result = []
        for prefix, steps in zip(prefixes, out):
            if not isinstance(steps, (list, tuple)) or len(steps) == 0:
                raise RuntimeError(f"{name} returned no steps for {describe(prefix)}")
            if len(steps) != num_children:
                raise RuntimeError(
                    f"{name} returned {len(steps)} steps, expected num_children={num_children}, "
                    f"for {describe(prefix)}"
                )
            if not all(isinstance(s, StepRecord) for s in steps):
                raise RuntimeError(f"{name} returned a non-StepRecord step for {describe(prefix)}")
            result.append(list(steps))
        for owner, steps in zip(owners, result):
            budget = self.budgets[owner]
            tokens = sum(len(s.token_ids) for s in steps)
            budget.generated_tokens += tokens
            budget.rollout_tokens += tokens if rollout else 0
            budget.prefixes += 1
        for owner in sorted(set(owners)):
            self.budgets[owner].proposer_calls += 1
        return result

    def values(self, owners: Sequence[int], trajectories: Sequence[Trajectory]) -> list[float]:
        """Value-function estimates in [0, 1]; NaN/inf/out-of-range → ValueError naming the trajectory."""
        if not trajectories:
            return []
        if self.value_fn is None:
            raise ValueError("this search needs a value_fn (evaluation='value'/'mixed' or value scoring)")
        raw = self.value_fn(list(trajectories))
        self._check_len(raw, trajectories, f"value_fn {_name(self.value_fn)}")
        for owner in owners:
            self.budgets[owner].value_evals += 1
        return [_check_score(x, "value_fn", t) for x, t in zip(raw, trajectories)]

    def outcomes(self, owners: Sequence[int], trajectories: Sequence[Trajectory]) -> list[float]:
        """Verifier rewards in [0, 1] (None → 0.0)."""
        if not trajectories:
            return []
        raw = self.outcome_fn(list(trajectories))
        self._check_len(raw, trajectories, f"outcome_fn {_name(self.outcome_fn)}")
        for owner in owners:
            self.budgets[owner].outcome_evals += 1
        return [_check_score(x, "outcome_fn", t) for x, t in zip(raw, trajectories)]

    @staticmethod
    def _check_len(raw: Any, trajectories: Sequence[Trajectory], name: str) -> None:
        if isinstance(raw, (str, bytes)) or not hasattr(raw, "__len__") or len(raw) != len(trajectories):
            got = len(raw) if hasattr(raw, "__len__") else type(raw).__name__
            raise RuntimeError(f"{name} returned {got} scores for {len(trajectories)} trajectories")

    def close(self) -> list[Budget]:
        """Stamp wall time and proposer-stats deltas on every budget and return the budgets."""
        wall = time.perf_counter() - self._t0
        after = proposer_stats(self.proposer)
        delta = {k: v - self._stats0.get(k, 0) for k, v in sorted(after.items())}
        for budget in self.budgets:
            budget.wall_time_s = wall
            budget.backend = dict(delta)
        return self.budgets


SEED_HIGH = 2**31 - 1
"""Proposer seeds are drawn from [0, SEED_HIGH) (fits every backend's seed type)."""


def tree_rng(base_seed: int, key: int) -> np.random.Generator:
    """The random stream of tree ``key`` in a search whose base seed is ``base_seed``.

    Deriving it from the key (not the position in the batch) makes a tree independent of which other prompts
    share its batch and lets a resumed run rebuild exactly the trees it skipped.
    """
    return np.random.default_rng(np.random.SeedSequence([int(base_seed), int(key) % 2**64]))


def base_seed_from(rng: np.random.Generator) -> int:
    """The one base seed a search call draws from its ``rng`` (TypeError if ``rng`` is not a Generator)."""
    if not isinstance(rng, np.random.Generator):
        raise TypeError(f"rng must be a numpy.random.Generator (np.random.default_rng(seed)), got {rng!r}")
    return int(rng.integers(0, 2**63))


def draw_seed(rng: np.random.Generator) -> int:
    """One proposer seed."""
    return int(rng.integers(0, SEED_HIGH))


@dataclass
class SearchResult:
    """What any search method (MCTS or a baseline) returns for one prompt."""

    tree: Tree
    """The tree the method built (baselines: their chains / beams under one root)."""
    node: int
    """The chosen node (a terminal leaf when one exists)."""
    answer: str | None
    """``answer_fn`` of the chosen completion (None without answer_fn or if it extracts nothing)."""
    completion: str
    """Generated text of the chosen node's trajectory."""
    method: str
    """How the answer was chosen, e.g. "mcts/visits", "best_of_n/majority", "greedy"."""
    budget: Budget
    """Compute spent on this tree."""
    num_simulations: int = 0
    """Simulations run (MCTS; < num_simulations if the token budget ran out or the tree was solved)."""
    stop_reason: str = ""
    """Why the tree stopped: "simulations", "token_budget", "solved" (MCTS) or "done" (baselines)."""

    @property
    def reward(self) -> float | None:
        """Verifier reward of the chosen node (None if it is not a graded terminal)."""
        return self.tree.nodes[self.node].reward

    def summary(self) -> dict:
        """JSON-serialisable summary (everything but the tree)."""
        return {
            "key": self.tree.key,
            "node": self.node,
            "answer": self.answer,
            "completion": self.completion,
            "method": self.method,
            "reward": self.reward,
            "num_simulations": self.num_simulations,
            "stop_reason": self.stop_reason,
            "budget": self.budget.to_dict(),
        }


def rollout_batch(
    meter: Meter,
    owners: Sequence[int],
    prefixes: Sequence[Trajectory],
    rngs: Sequence[np.random.Generator],
    max_depth: int,
    *,
    rollout: bool = True,
) -> list[Trajectory]:
    """Extend every prefix one sampled step at a time (one ``propose(..., 1, ...)`` call per round for all of
    them) until EOS or ``max_depth`` steps. ``rngs[i]`` seeds prefix ``i`` (draws in a fixed order);
    ``rollout`` charges the tokens as rollout tokens (baselines that keep the steps pass False).
    """
    trajs = list(prefixes)

    def unfinished(js: Sequence[int]) -> list[int]:
        return [j for j in js if not trajs[j].done and len(trajs[j].steps) < max_depth]

    active = unfinished(range(len(trajs)))
    while active:
        seeds = [draw_seed(rngs[j]) for j in active]
        out = meter.propose(
            [owners[j] for j in active], [trajs[j] for j in active], 1, seeds, rollout=rollout
        )
        for j, steps in zip(active, out):
            trajs[j] = trajs[j].extend(steps[0])
        active = unfinished(active)
    return trajs
