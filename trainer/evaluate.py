"""Held-out accuracy of a policy under named search methods, with the compute each one spent.

``evaluate_policy`` runs every method of ``eval.methods`` (greedy, best_of_n, step_beam, mcts) on the same
prompts and returns ``{method: {accuracy, generated_tokens, tokens_per_prompt, wall_time_s, ...}}``. Greedy runs a
temperature-0 proposer; the sampling methods use the recipe's search settings. Every number is a real pass of the
verifier over the policy's own outputs.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence

import numpy as np

from thinktree.search.types import Trajectory
from thinktree.trainer.config import RecipeConfig
from thinktree.trainer.searching import make_outcome_fn, make_proposer, run_method, summarize

__all__ = ["evaluate_policy"]


def evaluate_policy(
    model,
    tokenizer,
    task,
    prompts: Sequence[Trajectory],
    cfg: RecipeConfig,
    *,
    methods: Sequence[str] | None = None,
    seed: int = 0,
) -> dict[str, dict]:
    """Accuracy and compute of each method on ``prompts`` (one batched search call per method)."""
    search_cfg = cfg.search
    if cfg.eval.max_depth is not None:
        search_cfg = dataclasses.replace(search_cfg, max_depth=cfg.eval.max_depth)
    outcome_fn = make_outcome_fn(task)
    out: dict[str, dict] = {}
    was_training = model.training
    model.eval()
    for method in methods or cfg.eval.methods:
        proposer = make_proposer(model, tokenizer, search_cfg, 0.0 if method == "greedy" else None)
        start = time.perf_counter()
        results = run_method(
            method, prompts, proposer, outcome_fn, search_cfg, np.random.default_rng(seed),
            answer_fn=task.extract_answer,
        )  # fmt: skip
        out[method] = summarize(results, wall_s=time.perf_counter() - start)
    model.train(was_training)
    return out
