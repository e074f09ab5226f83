"""Glue between a recipe, a policy, a task and the search library: prompts, verifier, proposer, methods.

``run_method`` runs any named search method (mcts, gumbel, greedy, best_of_n, step_beam) with the same budget
accounting;
``run_search_command`` is ``thinktree search``: it searches a task split with the recipe's policy, appends each tree to
``<output.dir>/search/<split>/trees.jsonl`` as it finishes (a rerun resumes, skipping prompts already done) and writes
``summary.json`` with accuracy, tokens, forward passes and throughput.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from thinktree.rewards import get_task
from thinktree.search.backends.hf import HFStepProposer
from thinktree.search.baselines import best_of_n, greedy, step_beam
from thinktree.search.budget import SearchResult
from thinktree.search.gumbel import gumbel_search
from thinktree.search.mcts import search
from thinktree.search.store import TreeStore, search_resumable
from thinktree.search.types import Trajectory
from thinktree.trainer.config import RecipeConfig, SearchConfig

__all__ = [
    "METHODS",
    "make_prompts",
    "make_outcome_fn",
    "make_proposer",
    "run_method",
    "summarize",
    "run_search_command",
]

METHODS = ("greedy", "self_consistency", "best_of_n", "weighted_bon", "step_beam", "mcts", "gumbel")
"""Named search methods. best_of_n picks the sample the value function scores highest (majority vote, i.e.
self-consistency, when no value function is given); weighted_bon weights the votes by the value function; gumbel is
Gumbel MuZero search (``thinktree.search.gumbel``) with the MCTS fields plus gumbel_scale, c_visit, c_scale."""
_NOT_META = ("prompt", "question", "solution")


def make_prompts(task, rows, tokenizer=None, use_chat_template: bool = False) -> list[Trajectory]:
    """One root trajectory per dataset row; the row's other columns (answer, numbers, ...) go into ``meta``."""
    prompts = []
    for i, row in enumerate(rows):
        text = row["prompt"]
        if use_chat_template:
            if tokenizer is None or not getattr(tokenizer, "chat_template", None):
                raise ValueError("model.use_chat_template is set but the tokenizer has no chat template")
            text = tokenizer.apply_chat_template(
                task.chat_messages(row["question"]), tokenize=False, add_generation_prompt=True
            )
        meta = {k: v for k, v in row.items() if k not in _NOT_META}
        prompts.append(Trajectory(prompt=text, key=i, meta=meta))
    return prompts


def make_outcome_fn(task):
    """The task verifier as the search's ``OutcomeFn``: trajectories → rewards, columns taken from ``meta``."""

    def outcome(trajectories: Sequence[Trajectory]) -> list[float | None]:
        if not trajectories:
            return []
        columns: dict[str, list] = {k: [] for k in trajectories[0].meta}
        for t in trajectories:
            for k in columns:
                columns[k].append(t.meta.get(k))
        return task.reward([t.completion for t in trajectories], **columns)

    outcome.__name__ = f"outcome[{task.name}]"
    return outcome


def make_proposer(model, tokenizer, cfg: SearchConfig, temperature: float | None = None) -> HFStepProposer:
    """The HF backend configured from the recipe's search section (``temperature`` overrides it)."""
    return HFStepProposer(
        model,
        tokenizer,
        step_delimiter=cfg.step_delimiter,
        max_step_tokens=cfg.max_step_tokens,
        temperature=cfg.temperature if temperature is None else temperature,
        top_p=cfg.top_p,
        max_batch_size=cfg.max_batch_size,
        cache_budget_bytes=cfg.cache_budget_bytes,
    )


def run_method(
    method: str,
    prompts: Sequence[Trajectory],
    proposer,
    outcome_fn,
    cfg: SearchConfig,
    rng: np.random.Generator,
    *,
    answer_fn=None,
    value_fn=None,
    progress=None,
) -> list[SearchResult]:
    """Run one named search method; greedy expects a temperature-0 proposer (see ``make_proposer``)."""
    if method == "mcts":
        return search(
            prompts, proposer, outcome_fn, config=cfg.mcts(), rng=rng, value_fn=value_fn,
            answer_fn=answer_fn, progress=progress,
        )  # fmt: skip
    if method == "gumbel":
        return gumbel_search(
            prompts, proposer, outcome_fn, config=cfg.mcts(), rng=rng, value_fn=value_fn,
            answer_fn=answer_fn, progress=progress,
        )  # fmt: skip
    if method == "greedy":
        return greedy(prompts, proposer, outcome_fn, rng=rng, max_depth=cfg.max_depth, answer_fn=answer_fn)
    if method in ("self_consistency", "best_of_n", "weighted_bon"):
        selection = {
            "self_consistency": "majority",
            "best_of_n": "best_value",
            "weighted_bon": "weighted_vote",
        }
        selection = selection[method] if value_fn is not None else "majority"
        if method == "weighted_bon" and value_fn is None:
            raise ValueError("method weighted_bon needs a value function (a PRM)")
        return best_of_n(
            prompts, proposer, outcome_fn, n=cfg.num_samples, rng=rng, max_depth=cfg.max_depth,
            answer_fn=answer_fn, value_fn=value_fn, answer_selection=selection,
        )  # fmt: skip
    if method == "step_beam":
        return step_beam(
            prompts, proposer, outcome_fn, beam_width=cfg.beam_width, expansions=cfg.num_children,
            rng=rng, max_depth=cfg.max_depth, value_fn=value_fn, answer_fn=answer_fn,
        )  # fmt: skip
    raise ValueError(f"unknown search method {method!r}; choose one of {METHODS}")


def summarize(results: Sequence[SearchResult], wall_s: float | None = None) -> dict[str, Any]:
    """Accuracy of the chosen answers and the compute spent (tokens, forward passes, throughput).

    ``pass_at_k``: the fraction of prompts with at least one correct finished solution anywhere in the tree (for
    best-of-N that is pass@N; for MCTS and beam, the coverage of the search).
    """
    rewards = [r.reward or 0.0 for r in results]
    tokens = sum(r.budget.generated_tokens for r in results)
    wall = wall_s if wall_s is not None else max((r.budget.wall_time_s for r in results), default=0.0)
    backend: dict[str, float] = {}
    for r in results[:1]:  # backend counters are shared by all trees of one call
        backend = dict(r.budget.backend)
    covered = sum(
        1 for r in results if any((r.tree.nodes[i].reward or 0.0) >= 0.5 for i in r.tree.terminal_leaves())
    )
    return {
        **accuracy_totals(rewards, covered, tokens, wall),
        "tokens_per_s": tokens / wall if wall > 0 else 0.0,
        "backend": backend,
    }


def accuracy_totals(rewards: Sequence[float], covered: int, tokens: int, wall: float) -> dict[str, Any]:
    """The fields every method summary shares: accuracy of the chosen answers (reward ≥ 0.5), pass@k (``covered``
    prompts had a correct solution anywhere), mean reward, generated tokens (total and per prompt), wall time."""
    n = len(rewards)
    return {
        "num_prompts": n,
        "accuracy": sum(1 for x in rewards if x >= 0.5) / n if n else 0.0,
        "pass_at_k": covered / n if n else 0.0,
        "mean_reward": sum(rewards) / n if n else 0.0,
        "generated_tokens": tokens,
        "tokens_per_prompt": tokens / n if n else 0.0,
        "wall_time_s": wall,
    }


def merge_summaries(parts: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Combine :func:`summarize` outputs of disjoint prompt shards (e.g. one per rank) into one."""
    parts = [p for p in parts if p["num_prompts"]]
    if not parts:
        return summarize([])
    n = sum(p["num_prompts"] for p in parts)
    tokens = sum(p["generated_tokens"] for p in parts)
    wall = max(p["wall_time_s"] for p in parts)
    backend: dict[str, float] = {}
    for p in parts:
        for k, v in p["backend"].items():
            backend[k] = backend.get(k, 0) + v
    return {
        "num_prompts": n,
        **{
            k: sum(p[k] * p["num_prompts"] for p in parts) / n
            for k in ("accuracy", "pass_at_k", "mean_reward")
        },
        "generated_tokens": tokens,
        "tokens_per_prompt": tokens / n,
        "wall_time_s": wall,
        "tokens_per_s": tokens / wall if wall > 0 else 0.0,
        "backend": backend,
    }


def run_search_command(cfg: RecipeConfig, split: str = "test", limit: int | None = None) -> dict:
    """``thinktree search``: search a task split with the recipe's policy and method; resumable.

    Trees go to ``<output.dir>/search/<split>/trees.jsonl`` (one store per split: a rerun resumes only its own
    split) and the summary to ``search/<split>/summary.json``. The model, the task, the data and the prompt
    lengths are checked before anything is written to the output directory.
    """
    from thinktree.trainer.models import check_prompt_lengths, load_policy
    from thinktree.trainer.outputs import prepare_output_dir, write_json_atomic

    model, tokenizer = load_policy(
        cfg.model.policy, dtype=cfg.model.dtype, seed=cfg.seed, tiny_sizes=cfg.model.tiny_sizes
    )
    task = get_task(cfg.task.name, **cfg.task.kwargs)
    size = cfg.task.eval_size if split == "test" else cfg.task.train_size
    rows = task.load(split, n=min(size, limit) if limit else size, seed=cfg.seed)
    prompts = make_prompts(task, rows, tokenizer, cfg.model.use_chat_template)
    check_prompt_lengths(
        model, tokenizer, [p.prompt for p in prompts], what=f"task {task.name} {split} split",
        names=[f"{split} row {p.key}" for p in prompts],
    )  # fmt: skip
    root = Path(cfg.output.dir) / "search"
    if (root / "trees.jsonl").exists():
        raise ValueError(
            f"{root / 'trees.jsonl'} was written before search stores were kept per split and its split is "
            f"unknown: move it to {root / '<split>' / 'trees.jsonl'} or delete it"
        )
    out = prepare_output_dir(cfg) / "search" / split
    out.mkdir(parents=True, exist_ok=True)
    method = cfg.search.method
    proposer = make_proposer(model, tokenizer, cfg.search, 0.0 if method == "greedy" else None)
    store = TreeStore(out / "trees.jsonl")
    done = len(store.done_keys() & {p.key for p in prompts})
    if done:
        print(f"resuming: {done} of {len(prompts)} prompts already searched in {store.path}")
    bar = tqdm(total=len(prompts), initial=done, desc=f"search[{method}]", unit="tree")
    start = time.perf_counter()

    def one_chunk(chunk, *args, rng, **kwargs):
        res = run_method(method, chunk, proposer, make_outcome_fn(task), cfg.search, rng, **kwargs)
        bar.update(len(res))
        bar.set_postfix(
            tok_s=f"{proposer.stats.get('generated_tokens', 0) / (time.perf_counter() - start):.0f}"
        )
        return res

    search_resumable(
        store, prompts, one_chunk, rng=np.random.default_rng(cfg.seed), chunk_size=cfg.search.max_batch_size,
        answer_fn=task.extract_answer,
    )  # fmt: skip
    bar.close()
    summary = summarize_store(store, wall_s=time.perf_counter() - start, keys={p.key for p in prompts})
    summary.update(method=method, split=split, policy=cfg.model.policy)
    write_json_atomic(out / "summary.json", summary)
    print(json.dumps({k: v for k, v in summary.items() if k != "backend"}, indent=None))
    return summary


def summarize_store(store: TreeStore, wall_s: float, keys: set[int] | None = None) -> dict[str, Any]:
    """Accuracy and token totals over the results in a tree store (including resumed ones); ``keys``: only the
    trees of these prompts (a smaller ``--limit`` than an earlier run's), else all."""
    summaries = [
        r["result"]
        for r in store.records()
        if r.get("result") is not None and (keys is None or r["key"] in keys)
    ]
    n = len(summaries)
    tokens = sum(s["budget"]["generated_tokens"] for s in summaries)
    correct = sum(1 for s in summaries if (s.get("reward") or 0.0) >= 0.5)
    return {
        "num_prompts": n,
        "accuracy": correct / n if n else 0.0,
        "generated_tokens": tokens,
        "tokens_per_prompt": tokens / n if n else 0.0,
        "wall_time_s_this_run": wall_s,
        "trees": str(store.path),
    }
