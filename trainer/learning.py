"""What makes a round's learning trustworthy: process-checked rewards, controls, and collapse checks.

* :func:`process_checked` wraps a task verifier so that a path through a step the task can prove wrong earns 0
  (``search.process_check``). The search backs that 0 up like any outcome, so MCTS's Q, every compiler (advantages,
  traces, pairs, PRM labels) and the round's accuracy all see it. Tasks opt in with ``check_steps(steps, numbers)``
  (countdown: arithmetic and the number pool) or ``step_is_correct(line)`` (arith: each ``a<op>b=c`` line).
* :func:`randomise_rewards` is the random-reward control (``train.control: random_reward``): every terminal leaf's
  reward is replaced by a coin flip at the round's own positive rate, seeded. Random rewards gave +21 points on
  Qwen-Math (Shao et al., 2025, arXiv 2506.10947), so a method's gain counts only beyond this control's.
* :func:`collapse_report` reads a round's signals and training metrics and names what makes the round unable to
  teach: no non-zero advantage, trees whose leaves are all correct or all wrong, entropy under
  ``train.entropy_floor``, approx-KL over ``train.kl_ceiling``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from thinktree.search.tree import Tree
from thinktree.search.types import Trajectory

log = logging.getLogger("thinktree")

__all__ = ["collapse_report", "has_step_check", "process_checked", "randomise_rewards"]

CORRECT = 0.5
"""A reward at or above this counts as correct (the compilers' threshold)."""


def has_step_check(task: Any) -> bool:
    """True when ``task`` can check individual steps (``check_steps`` or ``step_is_correct``)."""
    return callable(getattr(task, "check_steps", None)) or callable(getattr(task, "step_is_correct", None))


def _steps_ok(task: Any, traj: Trajectory) -> bool:
    texts = [s.text for s in traj.steps]
    if callable(getattr(task, "check_steps", None)):
        return bool(task.check_steps(texts, traj.meta.get("numbers") or []))
    return all(
        task.step_is_correct(line) is not False for t in texts for line in t.splitlines() if line.strip()
    )


def process_checked(outcome_fn: Callable, task: Any) -> Callable:
    """``outcome_fn`` with the reward of any trajectory through a wrong step set to 0.0 (see module doc)."""
    if not has_step_check(task):
        raise ValueError(f"task {task.name!r} cannot check steps (no check_steps / step_is_correct)")

    def checked(trajectories: Sequence[Trajectory]) -> list[float | None]:
        rewards = outcome_fn(trajectories)
        return [
            r if (r is None or r < CORRECT or _steps_ok(task, t)) else 0.0
            for r, t in zip(rewards, trajectories)
        ]

    checked.__name__ = f"process_checked[{getattr(outcome_fn, '__name__', 'outcome')}]"
    return checked


def randomise_rewards(trees: Sequence[Tree], rng: np.random.Generator) -> tuple[list[Tree], float]:
    """Copies of ``trees`` whose terminal leaves' rewards are Bernoulli(p) coin flips, p = the trees' correct share.

    Rollout rewards (evidence under a node that is not a kept leaf) are flipped the same way, so the compilers'
    values ``V(n)`` carry no information about correctness either. Returns the trees and ``p``.
    """
    out = [Tree.from_dict(t.to_dict()) for t in trees]
    rewards = [t.nodes[i].reward or 0.0 for t in out for i in t.terminal_leaves()]
    rewards += [r for t in out for n in t.nodes for r in n.rollout_rewards]
    p = float(np.mean([r >= CORRECT for r in rewards])) if rewards else 0.0
    for t in out:
        for n in t.nodes:
            if n.terminal:
                n.reward = float(rng.random() < p)
            if n.rollout_rewards:
                n.rollout_rewards = [float(rng.random() < p) for _ in n.rollout_rewards]
    return out, p


def collapse_report(trees: Sequence[Tree], records: Sequence[dict], history: Sequence[dict], *,
                    entropy_floor: float, kl_ceiling: float) -> list[str]:  # fmt: skip
    """Reasons this round cannot teach the policy (empty when it can); see module doc."""
    reasons = []
    if records and "advantages" in records[0]:
        nonzero = sum(1 for r in records for a, m in zip(r["advantages"], r.get("loss_mask") or [1] * len(r["advantages"]))
                      if m and a != 0)  # fmt: skip
        if nonzero == 0:
            reasons.append("no trained token has a non-zero advantage")
    graded = [[(t.nodes[i].reward or 0.0) >= CORRECT for i in t.terminal_leaves()] for t in trees]
    graded = [g for g in graded if g]
    if graded and all(all(g) for g in graded):
        reasons.append(f"all {len(graded)} trees have only correct leaves")
    elif graded and not any(any(g) for g in graded):
        reasons.append(f"all {len(graded)} trees have only wrong leaves")
    entropies = [m["train/entropy"] for m in history if "train/entropy" in m]
    if entropies and float(np.mean(entropies)) < entropy_floor:
        reasons.append(f"mean token entropy {np.mean(entropies):.4f} < train.entropy_floor={entropy_floor}")
    kls = [m["train/approx_kl"] for m in history if "train/approx_kl" in m]
    if kls and max(kls) > kl_ceiling:
        reasons.append(f"approx-KL {max(kls):.3f} > train.kl_ceiling={kl_ceiling}")
    return reasons
