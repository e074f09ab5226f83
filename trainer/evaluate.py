"""Held-out accuracy of a policy under named search methods, with the compute each one spent.

``evaluate_policy`` runs every method of ``eval.methods`` (greedy, best_of_n, step_beam, mcts) on the same
prompts and returns ``{method: {accuracy, generated_tokens, tokens_per_prompt, wall_time_s, ...}}``. Greedy runs a
temperature-0 proposer; the sampling methods use the recipe's search settings. Every number is a real pass of the
verifier over the policy's own outputs.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from thinktree.search.types import Trajectory
from thinktree.trainer.config import ConfigError, RecipeConfig
from thinktree.trainer.distributed import Topology
from thinktree.trainer.searching import make_outcome_fn, make_proposer, merge_summaries, run_method, summarize

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
    value_fn=None,
    topo: Topology | None = None,
) -> dict[str, dict]:
    """Accuracy and compute of each method on ``prompts`` (one batched search call per method).

    With a multi-process ``topo`` each rank evaluates its shard of the prompts and the summaries are merged.
    """
    topo = topo or Topology()
    prompts = topo.shard(prompts)
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
            answer_fn=task.extract_answer, value_fn=value_fn,
        )  # fmt: skip
        out[method] = merge_summaries(topo.gather(summarize(results, wall_s=time.perf_counter() - start)))
    model.train(was_training)
    return out


def _recipe_model_config(cfg: RecipeConfig):
    """The transformers config the recipe's ``model.policy`` describes, when it can be known cheaply (else None)."""
    spec = cfg.model.policy
    if spec.startswith("tiny:"):
        from thinktree.trainer.tiny import build_tiny_tokenizer, tiny_config

        return tiny_config(spec.split(":", 1)[1], len(build_tiny_tokenizer()), **(cfg.model.tiny_sizes or {}))
    if spec.startswith("package:") or spec.endswith(".gguf"):
        return None
    try:
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(spec)
    except Exception:
        return None


def check_checkpoint(cfg: RecipeConfig, checkpoint: str | Path) -> None:
    """Refuse a checkpoint whose architecture does not match the recipe's model (type, vocab, width, depth)."""
    path = Path(checkpoint)
    if not path.is_dir():
        raise ConfigError(f"checkpoint {path} is not a directory")
    meta_file = path / "config.json"
    if not meta_file.exists():
        if (path / "adapter_config.json").exists():
            base = json.loads((path / "adapter_config.json").read_text()).get("base_model_name_or_path")
            if base and base != cfg.model.policy:
                raise ConfigError(
                    f"checkpoint {path} is an adapter for {base!r}, the recipe's model is {cfg.model.policy!r}"
                )
            return
        raise ConfigError(f"checkpoint {path} has no config.json (not a model directory)")
    have = json.loads(meta_file.read_text())
    want = _recipe_model_config(cfg)
    if want is None:
        return
    diffs = [
        f"{k}: checkpoint {have.get(k)!r} vs recipe {getattr(want, k, None)!r}"
        for k in ("model_type", "vocab_size", "hidden_size", "num_hidden_layers")
        if have.get(k) != getattr(want, k, None)
    ]
    if diffs:
        raise ConfigError(
            f"checkpoint {path} does not match the recipe's model {cfg.model.policy!r}: " + "; ".join(diffs)
        )


def run_eval_command(
    cfg: RecipeConfig,
    *,
    checkpoint: str | None = None,
    split: str = "test",
    methods: Sequence[str] | None = None,
    prm: str | None = None,
    out: str | None = None,
) -> dict:
    """``thinktree eval``: accuracy of a policy (the recipe's, or a checkpoint) under named methods; writes JSON."""
    from thinktree.rewards import get_task
    from thinktree.trainer.models import load_policy
    from thinktree.trainer.outputs import write_json_atomic
    from thinktree.trainer.searching import METHODS, make_prompts

    methods = list(methods or cfg.eval.methods)
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ConfigError(f"unknown method(s) {unknown}; choose from {list(METHODS)}")
    if checkpoint:
        check_checkpoint(cfg, checkpoint)
    model, tokenizer = load_policy(
        checkpoint or cfg.model.policy, dtype=cfg.model.dtype, seed=cfg.seed, tiny_sizes=cfg.model.tiny_sizes
    )
    value_fn = _load_value_fn(prm) if prm else None
    task = get_task(cfg.task.name, **cfg.task.kwargs)
    rows = task.load(split, n=cfg.task.eval_size if split == "test" else cfg.task.train_size, seed=cfg.seed)
    prompts = make_prompts(task, rows, tokenizer, cfg.model.use_chat_template)
    results = evaluate_policy(
        model, tokenizer, task, prompts, cfg, methods=methods, seed=cfg.seed, value_fn=value_fn
    )
    record = {"policy": checkpoint or cfg.model.policy, "task": cfg.task.name, "split": split,
              "num_prompts": len(prompts), "methods": results}  # fmt: skip
    path = Path(out) if out else Path(cfg.output.dir) / f"eval-{split}.json"
    write_json_atomic(path, record)
    print(format_eval_table(results))
    print(f"wrote {path}")
    return record


def format_eval_table(results: dict[str, dict]) -> str:
    """One line per method: accuracy, pass@k, tokens per prompt, wall time."""
    lines = [f"{'method':>18} | {'accuracy':>8} | {'pass@k':>7} | {'tok/prompt':>10} | {'time s':>7}"]
    for m, r in results.items():
        lines.append(
            f"{m:>18} | {r['accuracy']:>8.3f} | {r['pass_at_k']:>7.3f} | {r['tokens_per_prompt']:>10.1f} | "
            f"{r['wall_time_s']:>7.1f}"
        )
    return "\n".join(lines)


def _load_value_fn(path: str):
    from thinktree.rewards.prm import PRMValueFn, load_prm

    prm, tokenizer = load_prm(path)
    return PRMValueFn(prm, tokenizer)
