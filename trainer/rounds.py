"""``thinktree train``: the round pipeline, as one readable loop (nanochat style).

    warm start (optional): SFT on the task's worked solutions
    evaluate → round 0 row
    for round r = 1..R:
        search   MCTS over a fresh slice of train prompts with the current policy   → round-r/trees.jsonl
        signals  compile the trees (rounds.signal)                                   → round-r/signals.jsonl
        train    the policy on the signals (train.algo)                              → round-r/checkpoint/
        evaluate the held-out split under eval.methods                               → round-r/eval.json
    summary.json, accuracy.png, TensorBoard events

Each stage writes its outputs atomically and a stage marker last, so a killed run resumes at the first unfinished
stage (a half-done search resumes inside the tree store, skipping prompts already searched). The output directory
shows the state: ``stages.json`` lists the finished stages.

Training algorithms available in the rounds today: ``sft`` on the top-k correct MCTS traces of each tree
(rStar-Math's self-evolution data, a.k.a. rejection-sampling fine-tuning). Tree-GRPO, PPO and step-DPO are tracked
in the project's issues; a recipe that asks for them fails at start-up with that message instead of faking a stage.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
from datasets import Dataset

from thinktree.rewards import get_task
from thinktree.search.store import TreeStore, search_resumable
from thinktree.trainer.algos.dpo import DPOSettings, train_dpo
from thinktree.trainer.algos.sft import SFTSettings, train_sft
from thinktree.trainer.config import ConfigError, RecipeConfig
from thinktree.trainer.evaluate import evaluate_policy
from thinktree.trainer.outputs import prepare_output_dir, write_json_atomic
from thinktree.trainer.reporting import Reporter
from thinktree.trainer.searching import make_outcome_fn, make_prompts, make_proposer, run_method
from thinktree.trainer.signals.pairs import step_pairs
from thinktree.trainer.signals.traces import sft_traces

log = logging.getLogger("thinktree")


def _check_recipe(cfg: RecipeConfig) -> None:
    if cfg.rounds.num_rounds > 0 and cfg.train.algo not in ROUND_TRAINERS:
        raise ConfigError(
            f"train.algo={cfg.train.algo!r} is not available in the round pipeline (available: {sorted(ROUND_TRAINERS)})"
        )
    if cfg.rounds.warm_start.algo not in ("none", "sft"):
        raise ConfigError(
            f"rounds.warm_start.algo must be 'none' or 'sft', got {cfg.rounds.warm_start.algo!r}"
        )
    if cfg.rounds.num_rounds < 0:
        raise ConfigError(f"rounds.num_rounds must be >= 0, got {cfg.rounds.num_rounds}")


class Stages:
    """``stages.json``: the finished stages of a run, each with its small result record."""

    def __init__(self, out: Path) -> None:
        self.path = out / "stages.json"
        self.done: dict[str, Any] = json.loads(self.path.read_text()) if self.path.exists() else {}

    def get(self, name: str) -> Any:
        return self.done.get(name)

    def finish(self, name: str, record: Any) -> None:
        self.done[name] = record
        write_json_atomic(self.path, self.done)


def _load(cfg: RecipeConfig, checkpoint: str | None):
    from thinktree.trainer.models import load_policy

    spec = checkpoint or cfg.model.policy
    lora = None if checkpoint else cfg.model.lora
    return load_policy(spec, dtype=cfg.model.dtype, seed=cfg.seed, tiny_sizes=cfg.model.tiny_sizes, lora=lora)


def _save(model, tokenizer, path: Path) -> str:
    from thinktree.trainer.models import save_policy

    return str(save_policy(model, tokenizer, path))


def _sft_settings(cfg: RecipeConfig, *, warm: bool) -> SFTSettings:
    w, t = cfg.rounds.warm_start, cfg.train
    return SFTSettings(
        steps=w.steps if warm else t.steps,
        epochs=w.epochs if warm else None,
        learning_rate=w.learning_rate if warm else t.learning_rate,
        per_device_batch_size=w.per_device_batch_size if warm else t.per_device_batch_size,
        grad_accum=1 if warm else t.grad_accum,
        max_grad_norm=t.max_grad_norm,
        seed=cfg.seed,
    )


def _round_prompts(cfg: RecipeConfig, train_prompts: list, r: int) -> list:
    """A fresh slice of train prompts for round ``r`` (cycling through the train split)."""
    n = min(cfg.rounds.prompts_per_round, len(train_prompts))
    start = ((r - 1) * n) % max(1, len(train_prompts))
    picked = [train_prompts[(start + i) % len(train_prompts)] for i in range(n)]
    return [dataclasses.replace(p, key=i) for i, p in enumerate(picked)]


def _search_round(cfg, model, tokenizer, task, prompts, out: Path, seed: int) -> dict:
    store = TreeStore(out / "trees.jsonl")
    reused = len(store.done_keys())
    if reused:
        log.info("round search: reusing %d stored trees from %s", reused, store.path)
    proposer = make_proposer(model, tokenizer, cfg.search)
    start = time.perf_counter()
    search_resumable(
        store, prompts, lambda chunk, rng, **kw: run_method("mcts", chunk, proposer, make_outcome_fn(task),
                                                            cfg.search, rng, **kw),
        rng=np.random.default_rng(seed), chunk_size=cfg.search.max_batch_size,
        answer_fn=task.extract_answer,
    )  # fmt: skip
    trees = store.load()
    leaves = [t.nodes[i] for t in trees for i in t.terminal_leaves()]
    summaries = [s for s in store.results() if s]
    return {
        "trees": len(trees),
        "reused_trees": reused,
        "generated_tokens": sum(s["budget"]["generated_tokens"] for s in summaries),
        "search_time_s": time.perf_counter() - start,
        "leaf_reward_mean": float(np.mean([n.reward or 0.0 for n in leaves])) if leaves else 0.0,
        "search_accuracy": float(np.mean([(s.get("reward") or 0.0) >= 0.5 for s in summaries])),
    }


def _write_signals(out: Path, records: list[dict]) -> None:
    with open(out / "signals.jsonl", "w") as f:
        for rec in records:
            f.write(json.dumps(rec) + "\n")


def _train_sft_round(cfg, model, tokenizer, trees, out: Path) -> dict:
    """rStar-Math / rejection-sampling round: SFT on the top-k correct traces of each tree."""
    records = sft_traces(trees, k=cfg.rounds.traces_per_tree)
    _write_signals(out, records)
    info: dict[str, Any] = {"sft_traces": len(records)}
    if records:
        data = Dataset.from_list([{"prompt": r["prompt"], "completion": r["completion"]} for r in records])
        metrics = train_sft(model, tokenizer, data, _sft_settings(cfg, warm=False), out / "trainer")
        info["train_loss"] = metrics.get("train_loss")
    return info


def _train_dpo_round(cfg, model, tokenizer, trees, out: Path) -> dict:
    """MCTS-DPO round: step-level DPO on sibling step pairs (best vs worst by Q), confidence-weighted."""
    records = step_pairs(trees, min_margin=cfg.train.pair_min_margin, rng=np.random.default_rng(cfg.seed))
    _write_signals(out, records)
    info: dict[str, Any] = {"step_pairs": len(records)}
    if records:
        t = cfg.train
        settings = DPOSettings(
            beta=t.dpo_beta, learning_rate=t.learning_rate, steps=t.steps, per_device_batch_size=t.per_device_batch_size,
            grad_accum=t.grad_accum, max_grad_norm=t.max_grad_norm, seed=cfg.seed,
        )  # fmt: skip
        metrics = train_dpo(model, tokenizer, records, settings, out / "trainer")
        info["train_loss"] = metrics.get("train_loss")
    return info


ROUND_TRAINERS = {"sft": _train_sft_round, "dpo": _train_dpo_round}
"""Round training stage per ``train.algo``: (cfg, model, tokenizer, trees, round dir) → record for the summary."""


def _train_round(cfg, model, tokenizer, out: Path) -> dict:
    trees = TreeStore(out / "trees.jsonl").load()
    info = ROUND_TRAINERS[cfg.train.algo](cfg, model, tokenizer, trees, out)
    if not any(v for k, v in info.items() if k in ("sft_traces", "step_pairs", "advantage_tokens")):
        log.warning("round: no training signal in %d trees; the policy is not updated this round", len(trees))
    return info


def run_train(cfg: RecipeConfig) -> dict:
    """Run a recipe end to end (resumable); returns the summary written to ``summary.json``."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    _check_recipe(cfg)
    out = prepare_output_dir(cfg)
    stages = Stages(out)
    report = Reporter(out, cfg)
    task = get_task(cfg.task.name, **cfg.task.kwargs)
    checkpoint = None
    for name in reversed(list(stages.done)):
        checkpoint = (stages.done[name] or {}).get("checkpoint") or checkpoint
        if checkpoint:
            break
    model, tokenizer = _load(cfg, checkpoint)
    needs_train = cfg.rounds.num_rounds > 0 or cfg.rounds.warm_start.algo != "none"
    train_rows = task.load("train", n=cfg.task.train_size, seed=cfg.seed) if needs_train else None
    eval_rows = task.load("test", n=cfg.task.eval_size, seed=cfg.seed)
    train_prompts = make_prompts(task, train_rows, tokenizer, cfg.model.use_chat_template) if needs_train else []
    eval_prompts = make_prompts(task, eval_rows, tokenizer, cfg.model.use_chat_template)

    if cfg.rounds.warm_start.algo == "sft" and not stages.get("warm_start"):
        if "solution" not in train_rows.column_names:
            raise ConfigError(f"task {task.name!r} has no worked solutions for an SFT warm start")
        start = time.perf_counter()
        data = [{"prompt": p.prompt, "completion": s} for p, s in zip(train_prompts, train_rows["solution"])]
        metrics = train_sft(
            model, tokenizer, Dataset.from_list(data), _sft_settings(cfg, warm=True), out / "ws"
        )
        ckpt = _save(model, tokenizer, out / "warm_start" / "checkpoint")
        stages.finish("warm_start", {"checkpoint": ckpt, "train_loss": metrics.get("train_loss"),
                                     "time_s": time.perf_counter() - start})  # fmt: skip

    for r in range(cfg.rounds.num_rounds + 1):
        rdir = out / f"round-{r:02d}"
        row = dict(stages.get(f"round-{r}/eval") or {})
        if r > 0:
            for stage, fn in (("search", _search_round), ("train", _train_round)):
                if stages.get(f"round-{r}/{stage}") is None:
                    args = (
                        (task, _round_prompts(cfg, train_prompts, r), rdir, cfg.seed * 1000 + r)
                        if stage == "search"
                        else (rdir,)
                    )
                    record = fn(cfg, model, tokenizer, *args)
                    if stage == "train":
                        record["checkpoint"] = _save(model, tokenizer, rdir / "checkpoint")
                    stages.finish(f"round-{r}/{stage}", record)
        if not row:
            start = time.perf_counter()
            evals = evaluate_policy(model, tokenizer, task, eval_prompts, cfg, seed=cfg.seed)
            row = {"round": r, "eval": evals, "eval_time_s": time.perf_counter() - start}
            for stage in ("search", "train"):
                row.update(stages.get(f"round-{r}/{stage}") or {})
            write_json_atomic(rdir / "eval.json", row)
            stages.finish(f"round-{r}/eval", row)
        report.round(row)
    return report.finish(stages.get("warm_start"))
