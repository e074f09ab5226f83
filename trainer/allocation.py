"""Compute-optimal test-time budgets: spend a fixed total search budget unevenly, by estimated prompt difficulty.

Paper: Snell, Lee, Xu, Kumar, "Scaling LLM Test-Time Compute Optimally can be More Effective than Scaling Model
Parameters" (2024). Their compute-optimal strategy bins questions by difficulty (estimated from the model's own
samples or a verifier) and picks the test-time strategy per bin; easy questions need little, the hardest gain
little from more compute, the middle gains most.

What this module does (``run_compute_optimal``):

1. **probe** — ``probe_samples`` independent samples per prompt (best-of-N, the recipe's temperature);
2. **difficulty** — ``1 - agreement`` of the probe's majority answer (share of the probe samples giving the
   most common answer; no answer at all counts as difficulty 1), or ``1 - mean PRM score`` of the probe samples
   when a value function is given (Snell's "predicted difficulty");
3. **bins** — ``num_bins`` equal-width bins over ``[0, 1]`` (bin 0 = easiest);
4. **allocate** — the rest of the budget, ``total_budget * num_prompts - probe_samples * num_prompts`` units,
   is split over prompts in proportion to their bin's weight under ``rule`` (largest-remainder rounding, so the
   per-prompt extras are integers that sum exactly to the rest):

   * ``snell``: weight ``w(c) = 2c`` for a bin centre ``c <= 1/2`` and ``1.5 - c`` above: unanimous probes get
     (almost) nothing, the uncertain middle gets most, hopeless-looking prompts get about half the middle's share
     (3 bins: weights 1/3, 1, 2/3);
   * ``uncertainty`` (oracle-free greedy): ``w(c) = c``, more budget to the less certain prompts;
   * ``uniform``: equal weights, the uniform baseline at the same total.

5. **search** — each prompt runs ``base_method`` with its extra budget (samples for the best-of-N family,
   simulations for MCTS and Gumbel search, beam width for step beam); prompts with the same budget share one
   batched call.
6. **answer** — best-of-N bases pool the probe samples with the new ones and select over the pool (majority,
   value-weighted vote or best PRM score, as the base method does); for MCTS / step beam the searched answer
   replaces the probe's, and a prompt given no extra budget keeps the probe's majority answer.

Equal compute: every rule spends exactly ``total_budget`` units per prompt on average, the probe included, so
``rule: uniform`` over a best-of-N base is plain self-consistency with ``num_samples = total_budget``. Budgets are
matched in samples / simulations, not tokens; the measured generated tokens are reported next to the accuracy.

Departures from the paper: difficulty bins are fixed-width over the probe's agreement, not quantiles of an
oracle difficulty on a held-out set; one base method for all bins instead of choosing the strategy per bin; the
probe's cost is charged to the compute-optimal run. For MCTS / step beam a probe sample counts as one budget unit
(one simulation / one beam), an approximation: compare their tokens, not their units.

Run it through ``thinktree ablate`` with a cell such as
``{method: compute_optimal, base_method: self_consistency, rule: [snell, uniform], total_budget: [4, 8]}``.
"""

from __future__ import annotations

import dataclasses
import time
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from thinktree.search.baselines import best_of_n
from thinktree.search.budget import SearchResult
from thinktree.search.types import Trajectory
from thinktree.trainer.config import SearchConfig
from thinktree.trainer.searching import accuracy_totals

__all__ = [
    "RULES",
    "BASE_BUDGET_FIELD",
    "rule_weight",
    "difficulty_bin",
    "probe_difficulty",
    "allocate",
    "CO_DEFAULTS",
    "check_options",
    "run_compute_optimal",
]

RULES = ("snell", "uncertainty", "uniform")
"""Allocation rules (see the module docstring)."""
BASE_BUDGET_FIELD = {
    "self_consistency": "num_samples",
    "best_of_n": "num_samples",
    "weighted_bon": "num_samples",
    "mcts": "num_simulations",
    "gumbel": "num_simulations",
    "step_beam": "beam_width",
}
"""Base methods of a compute-optimal run and the SearchConfig field their per-prompt budget sets."""
CO_DEFAULTS: dict[str, Any] = {
    "base_method": "self_consistency",
    "rule": "snell",
    "probe_samples": 4,
    "num_bins": 3,
}
"""Settings of a compute-optimal run and their defaults (``total_budget`` has none)."""
_POOLED = ("self_consistency", "best_of_n", "weighted_bon")
Leaf = tuple[str | None, float, float | None]
"""One finished sample: (answer, verifier reward, value_fn score or None)."""


def rule_weight(rule: str, centre: float) -> float:
    """Weight of a difficulty bin centred at ``centre`` (in [0, 1]) under ``rule``."""
    if rule == "snell":
        return 2.0 * centre if centre <= 0.5 else 1.5 - centre
    if rule == "uncertainty":
        return centre
    if rule == "uniform":
        return 1.0
    raise ValueError(f"unknown allocation rule {rule!r}; choose one of {RULES}")


def difficulty_bin(difficulty: float, num_bins: int) -> int:
    """Equal-width bin index of a difficulty in [0, 1] (0 = easiest, ``num_bins - 1`` = hardest)."""
    return min(num_bins - 1, max(0, int(difficulty * num_bins)))


def probe_difficulty(leaves: Sequence[Sequence[Leaf]], use_value: bool = False) -> list[float]:
    """Per-prompt difficulty from probe samples: ``1 - majority agreement`` or ``1 - mean value_fn score``."""
    out = []
    for samples in leaves:
        if use_value:
            scores = [v for _, _, v in samples if v is not None]
            out.append(1.0 - float(np.mean(scores)) if scores else 1.0)
            continue
        answers = Counter(a for a, _, _ in samples if a is not None)
        top = answers.most_common(1)[0][1] if answers else 0
        out.append(1.0 - top / len(samples) if samples else 1.0)
    return out


def allocate(difficulty: Sequence[float], extra_total: int, rule: str, num_bins: int = 3) -> list[int]:
    """Split ``extra_total`` budget units over prompts by their difficulty bin's weight under ``rule``.

    Largest-remainder rounding: the result is non-negative integers summing exactly to ``extra_total``; ties in
    the remainder go to the harder prompt, then the lower index. All-zero weights fall back to uniform.
    """
    if extra_total < 0:
        raise ValueError(f"allocate: extra_total must be >= 0, got {extra_total}")
    if num_bins < 1:
        raise ValueError(f"allocate: num_bins must be >= 1, got {num_bins}")
    n = len(difficulty)
    if n == 0:
        return []
    bins = [difficulty_bin(d, num_bins) for d in difficulty]
    weights = [rule_weight(rule, (b + 0.5) / num_bins) for b in bins]
    if sum(weights) <= 0:
        weights = [1.0] * n
    shares = [extra_total * w / sum(weights) for w in weights]
    alloc = [int(np.floor(s)) for s in shares]
    order = sorted(range(n), key=lambda i: (-(shares[i] - alloc[i]), -bins[i], i))
    for i in order[: extra_total - sum(alloc)]:
        alloc[i] += 1
    return alloc


def check_options(
    *, base_method: str, rule: str, total_budget: int, probe_samples: int, num_bins: int
) -> None:
    """Raise ValueError naming the first bad compute-optimal setting."""
    if base_method not in BASE_BUDGET_FIELD:
        raise ValueError(f"unknown base_method {base_method!r}; choose one of {list(BASE_BUDGET_FIELD)}")
    if rule not in RULES:
        raise ValueError(f"unknown rule {rule!r}; choose one of {list(RULES)}")
    for name, v in (("total_budget", total_budget), ("probe_samples", probe_samples), ("num_bins", num_bins)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ValueError(f"{name} must be a positive int, got {v!r}")
    if probe_samples > total_budget:
        raise ValueError(f"total_budget {total_budget} is smaller than probe_samples {probe_samples}")


def _leaves(result: SearchResult, answer_fn: Callable[[str], str | None]) -> list[Leaf]:
    tree = result.tree
    out = []
    for i in sorted(tree.terminal_leaves()):
        node = tree.nodes[i]
        value = node.extra.get("value_fn")
        out.append((answer_fn(tree.trajectory(i).completion), node.reward or 0.0, value))
    return out


def _pooled_reward(samples: Sequence[Leaf], method: str, has_value: bool) -> float:
    """Verifier reward of the answer the base method's selection picks from pooled samples."""
    if not samples:
        return 0.0
    if method == "best_of_n" and has_value:
        return max(samples, key=lambda s: s[2] if s[2] is not None else -1.0)[1]
    weighted = method == "weighted_bon" and has_value
    totals: dict[str, list[float]] = {}
    for pos, (answer, reward, value) in enumerate(samples):
        if answer is None:
            continue
        entry = totals.setdefault(answer, [0.0, 0.0, -pos, reward])
        entry[0] += (value or 0.0) if weighted else 1.0
        entry[1] += 1
    if not totals:
        return samples[0][1]
    return totals[max(totals, key=lambda a: tuple(totals[a][:3]))][3]


def _search_groups(
    prompts: Sequence[Trajectory], budgets: Sequence[int], run: Callable[[list[Trajectory], int], list]
) -> dict[int, SearchResult]:
    """One batched call of ``run(prompts, budget)`` per distinct positive budget; results by prompt index."""
    out: dict[int, SearchResult] = {}
    for b in sorted({b for b in budgets if b > 0}):
        idx = [i for i, x in enumerate(budgets) if x == b]
        for i, res in zip(idx, run([prompts[i] for i in idx], b)):
            out[i] = res
    return out


def run_compute_optimal(
    prompts: Sequence[Trajectory],
    proposer: Any,
    outcome_fn: Callable,
    cfg: SearchConfig,
    rng: np.random.Generator,
    *,
    base_method: str,
    total_budget: int,
    rule: str,
    probe_samples: int = 4,
    num_bins: int = 3,
    answer_fn: Callable[[str], str | None],
    value_fn: Callable | None = None,
    run_method: Callable | None = None,
) -> dict[str, Any]:
    """Probe → difficulty → allocate → search; returns ``summarize``-style metrics plus the allocation.

    ``total_budget`` is the mean budget per prompt (probe included). ``run_method`` defaults to
    :func:`thinktree.trainer.searching.run_method` (injectable for tests).
    """
    try:
        check_options(base_method=base_method, rule=rule, total_budget=total_budget,
                      probe_samples=probe_samples, num_bins=num_bins)  # fmt: skip
    except ValueError as e:
        raise ValueError(f"compute_optimal: {e}") from e
    if run_method is None:
        from thinktree.trainer.searching import run_method
    start = time.perf_counter()
    probe = best_of_n(
        prompts, proposer, outcome_fn, n=probe_samples, rng=rng, max_depth=cfg.max_depth,
        answer_fn=answer_fn, value_fn=value_fn,
    )  # fmt: skip
    probe_leaves = [_leaves(r, answer_fn) for r in probe]
    difficulty = probe_difficulty(probe_leaves, use_value=value_fn is not None)
    extra = allocate(difficulty, (total_budget - probe_samples) * len(prompts), rule, num_bins)
    field = BASE_BUDGET_FIELD[base_method]

    def run(group: list[Trajectory], budget: int) -> list[SearchResult]:
        group_cfg = dataclasses.replace(cfg, **{field: budget})
        return run_method(
            base_method, group, proposer, outcome_fn, group_cfg, rng, answer_fn=answer_fn, value_fn=value_fn
        )

    searched = _search_groups(prompts, extra, run)
    rewards, covered, tokens = [], 0, sum(r.budget.generated_tokens for r in probe)
    for i, leaves in enumerate(probe_leaves):
        res = searched.get(i)
        extra_leaves = _leaves(res, answer_fn) if res is not None else []
        tokens += res.budget.generated_tokens if res is not None else 0
        if res is not None and base_method not in _POOLED:
            rewards.append(res.reward or 0.0)
        else:
            rewards.append(_pooled_reward(leaves + extra_leaves, base_method, value_fn is not None))
        covered += any(r >= 0.5 for _, r, _ in leaves + extra_leaves)
    return _summary(rewards, covered, tokens, time.perf_counter() - start, difficulty, extra, num_bins)


def _summary(
    rewards: list[float], covered: int, tokens: int, wall: float, difficulty: list[float], extra: list[int],
    num_bins: int,
) -> dict[str, Any]:  # fmt: skip
    bins = [difficulty_bin(d, num_bins) for d in difficulty]
    per_bin = {
        str(b): {
            "prompts": bins.count(b),
            "extra_budget": sum(e for e, x in zip(extra, bins) if x == b),
            "correct": sum(1 for r, x in zip(rewards, bins) if x == b and r >= 0.5),
        }
        for b in range(num_bins)
    }
    return {
        **accuracy_totals(rewards, covered, tokens, wall),
        "allocation": {"difficulty": difficulty, "extra": extra, "bins": per_bin},
    }
