"""Batched AlphaZero-style MCTS over reasoning steps.

One simulation: **select** a leaf with the selection function → **expand** it (unless terminal) with
``num_children`` proposed steps → **evaluate** the leaf (terminal: verifier reward; otherwise rollouts, the value
function, or a mix) → **back up** the value along the path. The root is expanded and evaluated first, so
``visits(root) = simulations + 1``.

All trees of a :func:`search` call advance together in *waves*: each wave selects up to ``in_flight`` leaves per
tree (virtual loss makes them diverge) and serves all of them with ONE ``propose`` call, one batched rollout loop
and one ``value_fn`` call, so a model backend sees large batches.

Randomness: one base seed is drawn from ``rng`` per call; tree ``key``'s stream is :func:`tree_rng` (base, key).
A tree therefore does not depend on which other prompts share its batch or on their order (the proposer's
``seeds`` contract does the rest), and a resumed run rebuilds exactly the trees it skipped.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from thinktree.search.budget import (
    Budget,
    Meter,
    SearchResult,
    base_seed_from,
    draw_seed,
    rollout_batch,
    tree_rng,
)
from thinktree.search.selection import ANSWER_METHODS, SELECT_FNS, SelectFn, choose_answer, select_path
from thinktree.search.tree import ROOT, Tree
from thinktree.search.types import OutcomeFn, StepProposer, StepRecord, Trajectory, ValueFn

__all__ = [
    "MCTSConfig",
    "SearchResult",
    "search",
    "search_with_seed",
    "check_prompts",
    "expand",
    "backup",
    "add_virtual_loss",
]

EVALUATIONS = ("rollout", "value", "mixed")
BACKUPS = ("mean", "max")
FILL_Q = ("parent", "zero")


@dataclass(frozen=True)
class MCTSConfig:
    """Hyper-parameters of :func:`search` (names as in the AlphaZero / AlphaGo papers)."""

    num_simulations: int = 32
    """Simulations per tree (the root's initial evaluation is not counted)."""
    num_children: int = 4
    """Steps sampled per expansion (duplicate texts are merged into one child)."""
    c_puct: float = 1.25
    """Exploration constant: PUCT's c when ``pb_c_base`` is None, and UCT's c."""
    pb_c_base: float | None = None
    """AlphaZero's c_base; when set, c(s) = pb_c_init + log((1 + N(s) + pb_c_base) / pb_c_base)."""
    pb_c_init: float = 1.25
    """AlphaZero's c_init (used only when ``pb_c_base`` is set)."""
    select: str = "puct"
    """Selection function: a key of ``SELECT_FNS`` ("puct" | "uct")."""
    dirichlet_alpha: float = 0.3
    """Concentration of the Dirichlet noise added to the root priors."""
    dirichlet_fraction: float = 0.0
    """Weight of the root Dirichlet noise (0 = no noise)."""
    fill_q: str = "parent"
    """Q of an unvisited child under PUCT: "parent" (parent's normalised Q) or "zero"."""
    in_flight: int = 1
    """Simulations selected per tree per wave (virtual loss keeps their paths apart)."""
    virtual_loss_value: float = 0.0
    """Value an in-flight simulation counts as until it is backed up (0 = pessimistic)."""
    evaluation: str = "rollout"
    """Leaf evaluation: "rollout" (mean outcome of rollouts), "value" (value_fn) or "mixed"."""
    num_rollouts: int = 1
    """Rollouts per evaluated leaf (rollout / mixed)."""
    lambda_mix: float = 0.5
    """AlphaGo's λ: mixed value = (1 - λ) · value_fn + λ · rollout."""
    backup: str = "mean"
    """Backup rule: "mean" (Q = mean value) or "max" (Q = max value seen below)."""
    max_depth: int = 32
    """Maximum number of steps in a trajectory; nodes (and rollouts) at this depth are terminal."""
    token_budget: int | None = None
    """Stop a tree once its generated tokens (expansions + rollouts) reach this (None = no limit)."""
    answer_selection: str = "visits"
    """Final answer: "visits" | "q" | "majority" | "weighted_vote" (see ``selection.choose_answer``)."""
    gumbel_scale: float = 1.0
    """Gumbel search only: scale of the root's Gumbel noise (0 = deterministic Sequential Halving)."""
    c_visit: float = 50.0
    """Gumbel search only: σ's visit offset, σ(q̂) = (c_visit + max_b N(b)) · c_scale · q̂ (mctx maxvisit_init)."""
    c_scale: float = 0.1
    """Gumbel search only: σ's scale of the completed, min-max rescaled Q-values (mctx value_scale)."""

    def __post_init__(self) -> None:
        for name in ("num_simulations", "num_children", "in_flight", "num_rollouts", "max_depth"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"MCTSConfig.{name} must be a positive int, got {value!r}")
        if self.token_budget is not None and self.token_budget <= 0:
            raise ValueError(f"MCTSConfig.token_budget must be positive or None, got {self.token_budget!r}")
        choices = {
            "select": tuple(SELECT_FNS),
            "evaluation": EVALUATIONS,
            "backup": BACKUPS,
            "fill_q": FILL_Q,
            "answer_selection": ANSWER_METHODS,
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"MCTSConfig.{name}={getattr(self, name)!r} is not one of {allowed}")
        for name in ("dirichlet_fraction", "lambda_mix", "virtual_loss_value"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"MCTSConfig.{name} must be in [0, 1], got {getattr(self, name)!r}")
        if self.c_puct < 0 or self.pb_c_init < 0:
            raise ValueError(
                f"MCTSConfig.c_puct / pb_c_init must be >= 0, got {self.c_puct}, {self.pb_c_init}"
            )
        if self.pb_c_base is not None and self.pb_c_base <= 0:
            raise ValueError(f"MCTSConfig.pb_c_base must be positive or None, got {self.pb_c_base!r}")
        if self.dirichlet_alpha <= 0:
            raise ValueError(f"MCTSConfig.dirichlet_alpha must be positive, got {self.dirichlet_alpha!r}")
        for name in ("gumbel_scale", "c_visit", "c_scale"):
            value = getattr(self, name)
            number = isinstance(value, (int, float)) and not isinstance(value, bool)
            if not number or not 0 <= value < float("inf"):
                raise ValueError(f"MCTSConfig.{name} must be a finite number >= 0, got {value!r}")

    def replace(self, **changes) -> MCTSConfig:
        return dataclasses.replace(self, **changes)


# -- prompts -------------------------------------------------------------------------------------------------


def check_prompts(prompts: Sequence[Trajectory]) -> list[Trajectory]:
    """Validate a prompt batch: non-empty, Trajectory objects without steps, distinct keys."""
    prompts = list(prompts)
    if not prompts:
        raise ValueError("search: empty prompt list (nothing to search)")
    seen: set[int] = set()
    for p in prompts:
        if not isinstance(p, Trajectory):
            raise ValueError(f"search: prompts must be Trajectory objects, got {type(p).__name__}")
        if p.steps:
            raise ValueError(
                f"search: prompt key={p.key} already has {len(p.steps)} steps; pass the bare prompt"
            )
        if p.key in seen:
            raise ValueError(
                f"search: duplicate prompt key {p.key} (tree seeds derive from keys; make them unique)"
            )
        seen.add(p.key)
    return prompts


# -- the four phases -----------------------------------------------------------------------------------------


def add_virtual_loss(tree: Tree, path: Sequence[int], amount: int = 1) -> None:
    """Mark (amount=1) or unmark (amount=-1) an in-flight simulation along ``path``."""
    for i in path:
        tree.nodes[i].virtual_loss += amount


def expand(tree: Tree, node: int, steps: Sequence[StepRecord], max_depth: int) -> None:
    """Add ``node``'s children: one per distinct step text (first occurrence kept, priors summed), priors
    normalised over the siblings (uniform if they sum to 0); EOS steps and children at ``max_depth`` are terminal.
    """
    merged: dict[str, list] = {}
    for step in steps:
        if step.text in merged:
            merged[step.text][1] += max(0.0, float(step.prior))
        else:
            merged[step.text] = [step, max(0.0, float(step.prior))]
    total = sum(p for _, p in merged.values())
    depth = tree.nodes[node].depth + 1
    for step, prior in merged.values():
        p = prior / total if total > 0 else 1.0 / len(merged)
        tree.add_child(node, step, p, terminal=step.eos or depth >= max_depth)


def backup(tree: Tree, path: Sequence[int], value: float) -> None:
    """Record the leaf evaluation ``value`` and add it to every node on ``path`` (mean and max statistics)."""
    leaf = tree.nodes[path[-1]]
    leaf.evaluations += 1
    leaf.value = value
    for i in path:
        n = tree.nodes[i]
        n.visits += 1
        n.value_sum += value
        n.max_value = value if n.max_value is None else max(n.max_value, value)


# -- the driver ----------------------------------------------------------------------------------------------


@dataclass
class _TreeState:
    tree: Tree
    rng: np.random.Generator
    sims: int = 0
    stop_reason: str = ""


@dataclass
class _Context:
    meter: Meter
    config: MCTSConfig
    select_fn: SelectFn


def _select_wave(state: _TreeState, ctx: _Context) -> list[list[int]]:
    """Up to ``in_flight`` paths with virtual loss applied; stops early on an already-claimed leaf."""
    cfg = ctx.config
    claimed: set[int] = set()
    paths: list[list[int]] = []
    for _ in range(min(cfg.in_flight, cfg.num_simulations - state.sims)):
        path = select_path(state.tree, ctx.select_fn, cfg)
        if path[-1] in claimed:
            break
        claimed.add(path[-1])
        add_virtual_loss(state.tree, path)
        paths.append(path)
    state.sims += len(paths)
    return paths


def _rollout_starts(trajs, roll_ks, first_steps) -> list[Trajectory]:
    """The prefixes rollouts continue from: the j-th rollout of a just-expanded leaf starts with the leaf's j-th
    sampled step (a sample from the policy at that leaf, already paid for by the expansion), so no step is generated
    twice and the expansion call does the rollouts' first step; other leaves start from themselves."""
    starts, seen = [], {}
    for k in roll_ks:
        j = seen[k] = seen.get(k, -1) + 1
        steps = first_steps.get(k) or []
        starts.append(trajs[k].extend(steps[j % len(steps)]) if steps else trajs[k])
    return starts


def _evaluate(
    states: list[_TreeState],
    leaves: list[tuple[int, int]],
    ctx: _Context,
    first_steps: dict[int, list] | None = None,
) -> list[float]:
    """Values of the wave's leaves: one batched rollout loop, one outcome_fn call and one value_fn call.

    ``first_steps[k]``: the steps sampled when leaf ``k`` was expanded in this wave (rollouts reuse them).
    """
    cfg, meter = ctx.config, ctx.meter
    nodes = [states[i].tree.nodes[leaf] for i, leaf in leaves]
    trajs = [states[i].tree.trajectory(leaf) for i, leaf in leaves]
    to_grade = [k for k, n in enumerate(nodes) if n.terminal and n.reward is None]
    open_ks = [k for k, n in enumerate(nodes) if not n.terminal]
    roll_ks = [k for k in open_ks for _ in range(cfg.num_rollouts)] if cfg.evaluation != "value" else []
    rollouts = rollout_batch(
        meter,
        [leaves[k][0] for k in roll_ks],
        _rollout_starts(trajs, roll_ks, first_steps or {}),
        [states[leaves[k][0]].rng for k in roll_ks],
        cfg.max_depth,
    )
    graded = meter.outcomes(
        [leaves[k][0] for k in to_grade + roll_ks], [trajs[k] for k in to_grade] + rollouts
    )
    for k, r in zip(to_grade, graded):
        nodes[k].reward = r
    for k, r in zip(roll_ks, graded[len(to_grade) :]):
        nodes[k].rollout_rewards.append(r)
    value_ks = open_ks if cfg.evaluation != "rollout" else []
    estimates = dict(
        zip(value_ks, meter.values([leaves[k][0] for k in value_ks], [trajs[k] for k in value_ks]))
    )
    values = []
    for k, n in enumerate(nodes):
        if n.terminal:
            values.append(n.reward if n.reward is not None else 0.0)
            continue
        if cfg.evaluation != "value":
            recent = n.rollout_rewards[-cfg.num_rollouts :]
            rollout_value = sum(recent) / len(recent)
        if cfg.evaluation == "rollout":
            values.append(rollout_value)
        elif cfg.evaluation == "value":
            values.append(estimates[k])
        else:
            values.append((1 - cfg.lambda_mix) * estimates[k] + cfg.lambda_mix * rollout_value)
    return values


def _run_wave(states: list[_TreeState], sims: list[tuple[int, list[int]]], ctx: _Context) -> None:
    """Expand the wave's open leaves (one propose call), evaluate all leaves, remove virtual loss, back up."""
    cfg = ctx.config
    open_sims = [(i, path[-1]) for i, path in sims if not states[i].tree.nodes[path[-1]].terminal]
    seeds = [draw_seed(states[i].rng) for i, _ in open_sims]
    prefixes = [states[i].tree.trajectory(leaf) for i, leaf in open_sims]
    proposals = ctx.meter.propose([i for i, _ in open_sims], prefixes, cfg.num_children, seeds)
    first_steps: dict[int, list] = {}
    where = {sim: k for k, sim in enumerate((i, path[-1]) for i, path in sims)}
    for (i, leaf), steps in zip(open_sims, proposals):
        expand(states[i].tree, leaf, steps, cfg.max_depth)
        first_steps[where[(i, leaf)]] = list(steps)
    values = _evaluate(states, [(i, path[-1]) for i, path in sims], ctx, first_steps)
    for (i, path), value in zip(sims, values):
        add_virtual_loss(states[i].tree, path, -1)
        backup(states[i].tree, path, value)


def _solved(tree: Tree) -> bool:
    """Nothing left to learn: every leaf is terminal and has been evaluated (further simulations would only
    re-read known rewards)."""
    return all(n.terminal and n.visits > 0 for n in tree.nodes if not n.children)


def _stopped(state: _TreeState, budget: Budget, cfg: MCTSConfig) -> bool:
    if not state.stop_reason:
        if state.sims >= cfg.num_simulations:
            state.stop_reason = "simulations"
        elif cfg.token_budget is not None and budget.generated_tokens >= cfg.token_budget:
            state.stop_reason = "token_budget"
        elif _solved(state.tree):
            state.stop_reason = "solved"
    return bool(state.stop_reason)


def _add_root_noise(states: list[_TreeState], cfg: MCTSConfig) -> None:
    if cfg.dirichlet_fraction == 0:
        return
    f = cfg.dirichlet_fraction
    for s in states:
        children = s.tree.nodes[ROOT].children
        noise = s.rng.dirichlet([cfg.dirichlet_alpha] * len(children))
        s.tree.root_priors = [(1 - f) * s.tree.nodes[c].prior + f * float(x) for c, x in zip(children, noise)]


def search(
    prompts: Sequence[Trajectory],
    proposer: StepProposer,
    outcome_fn: OutcomeFn,
    *,
    config: MCTSConfig,
    rng: np.random.Generator,
    value_fn: ValueFn | None = None,
    answer_fn: Callable[[str], str | None] | None = None,
    progress: Callable[[dict], None] | None = None,
    select_fn: SelectFn | None = None,
) -> list[SearchResult]:
    """Run MCTS on every prompt (all trees batched together); one :class:`SearchResult` per prompt, in order.

    ``prompts`` must be non-empty (else ValueError), step-free, with distinct ``key`` s. ``rng`` supplies one
    base seed (see :func:`tree_rng`). ``value_fn`` is required for evaluation "value"/"mixed"; ``answer_fn``
    (completion → answer) for the vote answer selections. ``progress`` is called after every wave with
    ``{"wave", "simulations", "target", "active", "trees"}``. ``select_fn`` overrides ``config.select``.
    """
    base_seed = base_seed_from(rng)
    return search_with_seed(
        prompts,
        proposer,
        outcome_fn,
        config=config,
        base_seed=base_seed,
        value_fn=value_fn,
        answer_fn=answer_fn,
        progress=progress,
        select_fn=select_fn,
    )


def search_with_seed(
    prompts: Sequence[Trajectory],
    proposer: StepProposer,
    outcome_fn: OutcomeFn,
    *,
    config: MCTSConfig,
    base_seed: int,
    value_fn: ValueFn | None = None,
    answer_fn: Callable[[str], str | None] | None = None,
    progress: Callable[[dict], None] | None = None,
    select_fn: SelectFn | None = None,
) -> list[SearchResult]:
    """:func:`search` with an explicit base seed (tree ``key`` uses ``tree_rng(base_seed, key)``)."""
    prompts = check_prompts(prompts)
    if not isinstance(config, MCTSConfig):
        raise TypeError(f"search: config must be an MCTSConfig, got {type(config).__name__}")
    if config.evaluation != "rollout" and value_fn is None:
        raise ValueError(f"search: evaluation={config.evaluation!r} needs a value_fn")
    if config.answer_selection in ("majority", "weighted_vote") and answer_fn is None:
        raise ValueError(f"search: answer_selection={config.answer_selection!r} needs an answer_fn")
    ctx = _Context(
        Meter(proposer, outcome_fn, value_fn, len(prompts)), config, select_fn or SELECT_FNS[config.select]
    )
    states = [_TreeState(Tree.from_prompt(p, config.backup), tree_rng(base_seed, p.key)) for p in prompts]
    for s in states:  # the root's own expansion + evaluation (not counted as a simulation)
        add_virtual_loss(s.tree, [ROOT])
    _run_wave(states, [(i, [ROOT]) for i in range(len(states))], ctx)
    _add_root_noise(states, config)
    wave = 0
    while True:
        active = [i for i, s in enumerate(states) if not _stopped(s, ctx.meter.budgets[i], config)]
        if not active:
            break
        _run_wave(states, [(i, path) for i in active for path in _select_wave(states[i], ctx)], ctx)
        wave += 1
        if progress is not None:
            progress(
                {
                    "wave": wave,
                    "simulations": sum(s.sims for s in states),
                    "target": config.num_simulations * len(states),
                    "active": len(active),
                    "trees": [s.tree for s in states],
                }
            )
    results = []
    for s, budget in zip(states, ctx.meter.close()):
        node, answer = choose_answer(s.tree, config.answer_selection, answer_fn)
        completion = s.tree.trajectory(node).completion
        method = f"mcts/{config.answer_selection}"
        results.append(SearchResult(s.tree, node, answer, completion, method, budget, s.sims, s.stop_reason))
    return results
