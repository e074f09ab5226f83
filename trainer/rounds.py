"""``thinktree train``: the round pipeline, as one readable loop (nanochat style).

    warm start (optional): SFT on the task's worked solutions
    evaluate → round 0 row
    for round r = 1..R:
        search   MCTS over a fresh slice of train prompts with the current policy   → round-r/trees*.jsonl
        signals  compile the trees for train.algo                                   → round-r/signals.jsonl
        train    the policy on the signals (sft | dpo | grpo | ppo)                 → round-r/checkpoint/
        evaluate the held-out split under eval.methods                              → round-r/eval.json
    summary.json, accuracy.png, TensorBoard events

Each stage writes its outputs atomically and its entry in ``stages.json`` last, so a killed run resumes at the first
unfinished stage; a half-done search resumes inside its tree store (prompts already searched are skipped, and the
log says how many trees were reused), a half-done GRPO/PPO stage from its newest training checkpoint.

Signals per algorithm: ``sft`` — the top-k correct traces of each tree (rStar-Math self-evolution / rejection
sampling); ``dpo`` — sibling step pairs (MCTS-DPO); ``grpo`` — per-token tree advantages (``train.advantage``:
TreeRL, TreeRPO, or GRPO's group baseline over the tree's leaves); ``ppo`` — root-to-leaf paths with their outcome,
GAE over steps against a value head.

Several processes (``accelerate launch``): every rank searches and evaluates its shard of the prompts, trees are
shared through per-rank tree stores, GRPO/PPO train under accelerate (DDP / DeepSpeed) on all ranks' records, and
rank 0 writes the shared files. SFT and DPO rounds use TRL's trainers, which distribute themselves.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path

import numpy as np

from thinktree.rewards import get_task
from thinktree.search.store import TreeStore, search_resumable
from thinktree.trainer.algos.engine import is_zero3
from thinktree.trainer.checkpoint import remove_leftovers
from thinktree.trainer.config import ConfigError, RecipeConfig
from thinktree.trainer.distributed import topology
from thinktree.trainer.evaluate import evaluate_policy
from thinktree.trainer.learning import has_step_check, process_checked
from thinktree.trainer.models import (
    check_prompt_lengths,
    load_policy,
    remove_partials,
)
from thinktree.trainer.outputs import check_output_dir, prepare_output_dir, write_json_atomic
from thinktree.trainer.reporting import Reporter
from thinktree.trainer.round_training import (
    ENGINE_ALGOS,
    ROUND_TRAINERS,
    TRAINERS,
    train_stage,
    warm_examples,
    warm_start,
)
from thinktree.trainer.run_state import Run, Stages, relative_checkpoint, stores, weights_digest
from thinktree.trainer.searching import make_outcome_fn, make_prompts, make_proposer, run_method

__all__ = [
    "ROUND_TRAINERS",
    "TRAINERS",
    "Run",
    "Stages",
    "relative_checkpoint",
    "run_train",
    "weights_digest",
]

log = logging.getLogger("thinktree")


def _check_recipe(cfg: RecipeConfig) -> None:
    if cfg.rounds.num_rounds > 0 and cfg.train.algo not in ROUND_TRAINERS:
        raise ConfigError(
            f"train.algo={cfg.train.algo!r} is not a round algorithm; choose one of {sorted(ROUND_TRAINERS)}"
        )
    if cfg.train.algo == "grpo" and cfg.train.advantage not in ("treerl", "treerpo", "grpo"):
        raise ConfigError(f"train.advantage must be treerl, treerpo or grpo, got {cfg.train.advantage!r}")
    if cfg.rounds.num_rounds > 0 and cfg.search.method not in (
        "mcts",
        "gumbel",
        "best_of_n",
        "self_consistency",
        "step_beam",
    ):
        raise ConfigError(f"search.method={cfg.search.method!r} cannot generate a round's training trees")
    if cfg.rounds.warm_start.algo not in ("none", "sft", "engine"):
        raise ConfigError(
            f"rounds.warm_start.algo must be 'none', 'sft' or 'engine', got {cfg.rounds.warm_start.algo!r}"
        )
    if (
        cfg.rounds.warm_start.algo == "engine"
        and cfg.rounds.num_rounds > 0
        and cfg.train.algo not in ENGINE_ALGOS
    ):
        raise ConfigError(f"rounds.warm_start.algo=engine needs train.algo in {ENGINE_ALGOS}")
    if cfg.eval.on_forgetting not in ("warn", "stop"):
        raise ConfigError(f"eval.on_forgetting must be 'warn' or 'stop', got {cfg.eval.on_forgetting!r}")
    if cfg.rounds.num_rounds < 0:
        raise ConfigError(f"rounds.num_rounds must be >= 0, got {cfg.rounds.num_rounds}")
    if cfg.rounds.eval_every < 1:
        raise ConfigError(f"rounds.eval_every must be >= 1, got {cfg.rounds.eval_every}")
    decays = cfg.train.lr_scheduler_type not in ("constant", "constant_with_warmup")
    if cfg.train.algo in ENGINE_ALGOS and decays and cfg.train.steps == 0 and cfg.rounds.num_rounds > 0:
        raise ConfigError(
            f"train.lr_scheduler_type={cfg.train.lr_scheduler_type!r} decays over the run's "
            "rounds.num_rounds × train.steps optimiser steps: set train.steps > 0 (0 means one pass, length unknown)"
        )
    if cfg.train.control != "none" and cfg.train.algo not in ENGINE_ALGOS:
        raise ConfigError(f"train.control={cfg.train.control!r} needs train.algo in {ENGINE_ALGOS}")


def _round_pool(cfg: RecipeConfig, train_prompts: list) -> list:
    """The train prompts the rounds draw from: past the warm start's ``warm_start.examples`` when set."""
    w = cfg.rounds.warm_start
    if w.algo != "none" and w.examples is not None and w.examples < len(train_prompts):
        return train_prompts[w.examples :]
    return train_prompts


def _note_round_size(cfg: RecipeConfig, train_prompts: list) -> None:
    """Say when ``rounds.prompts_per_round`` asks for more prompts than the rounds can draw from."""
    pool, asked = len(_round_pool(cfg, train_prompts)), cfg.rounds.prompts_per_round
    if cfg.rounds.num_rounds > 0 and asked > pool:
        skipped = len(train_prompts) - pool
        where = f" past the warm start's {skipped} (rounds.warm_start.examples)" if skipped else ""
        log.warning(
            "rounds.prompts_per_round=%d is more than the %d train prompts%s (task.train_size=%d): "
            "each round searches those %d, the same prompts every round", asked, pool, where,
            cfg.task.train_size, pool,
        )  # fmt: skip


def _round_prompts(cfg: RecipeConfig, train_prompts: list, r: int) -> list:
    """A fresh slice of train prompts for round ``r`` (cycling through the train split, past the warm start's
    ``warm_start.examples`` when set), keys 0..n-1."""
    train_prompts = _round_pool(cfg, train_prompts)
    n = min(cfg.rounds.prompts_per_round, len(train_prompts))
    start = ((r - 1) * n) % max(1, len(train_prompts))
    picked = [train_prompts[(start + i) % len(train_prompts)] for i in range(n)]
    return [dataclasses.replace(p, key=i) for i, p in enumerate(picked)]


def search_stage(run: Run, prompts: list, rdir: Path, seed: int) -> dict:
    """Search this rank's share of the round's prompts with the live policy (``search.method``: mcts, or
    best_of_n / self_consistency for i.i.d. sampling through the same path); resumable per tree."""
    name = "trees.jsonl" if run.topo.world == 1 else f"trees.rank{run.topo.rank}.jsonl"
    store = TreeStore(rdir / name)
    reused = len(store.done_keys())
    if reused:  # logged, not recorded: the stage's record is the same whether or not the run was resumed
        log.info("round search: reusing %d stored trees from %s; searching the rest", reused, store.path)
    outcome_fn, start = make_outcome_fn(run.task), time.perf_counter()
    if run.cfg.search.process_check:
        outcome_fn = process_checked(outcome_fn, run.task)
    with run.policy() as policy:
        proposer = make_proposer(policy, run.tokenizer, run.cfg.search)
        search_resumable(
            store, run.topo.shard(prompts),
            lambda chunk, rng, **kw: run_method(run.cfg.search.method, chunk, proposer, outcome_fn, run.cfg.search, rng, **kw),
            rng=np.random.default_rng(seed), chunk_size=run.cfg.search.max_batch_size,
            answer_fn=run.task.extract_answer,
        )  # fmt: skip
    run.topo.barrier()
    trees = [t for s in stores(rdir) for t in s.load()]
    summaries = [s for st in stores(rdir) for s in st.results() if s]
    leaves = [t.nodes[i] for t in trees for i in t.terminal_leaves()]
    return {
        "trees": len(trees),
        "generated_tokens": sum(s["budget"]["generated_tokens"] for s in summaries),
        "search_time_s": time.perf_counter() - start,
        "leaf_reward_mean": float(np.mean([n.reward or 0.0 for n in leaves])) if leaves else 0.0,
        "search_accuracy": float(np.mean([(s.get("reward") or 0.0) >= 0.5 for s in summaries])),
    }


def health_stage(run: Run, policy, eval_prompts: list, eval_rows, stages: Stages) -> dict:
    """Compression, drift and forgetting of the current policy against round 0 (see :mod:`.health`)."""
    from thinktree.trainer import health

    cfg = run.cfg
    ws = stages.get("warm_start")
    ref_spec = stages.resolve(ws["checkpoint"]) if ws else cfg.model.policy
    if run.reference is None:
        run.reference = health.snapshot_reference(ref_spec, seed=cfg.seed, tiny_sizes=cfg.model.tiny_sizes)
    solutions = list(eval_rows["solution"]) if "solution" in eval_rows.column_names else None
    traces = health.freeze_reference_traces(
        run.out / "health_traces.json", run.task, eval_prompts, solutions,
        model=policy, tokenizer=run.tokenizer, search_cfg=cfg.search,
    )  # fmt: skip
    retained = None
    if cfg.eval.retained_task:
        retained = {"task_name": cfg.eval.retained_task, "task_kwargs": cfg.eval.retained_kwargs,
                    "n": cfg.eval.retained_size, "seed": cfg.seed, "search_cfg": cfg.search}  # fmt: skip
    return health.health_metrics(
        policy, run.tokenizer, reference=run.reference, traces=traces,
        general_text_chunks=health.load_general_text(run.tokenizer), retained=retained, task=run.task,
        prompts=eval_prompts, search_cfg=cfg.search,
    )  # fmt: skip


def _forgetting(run: Run, row: dict, round0: dict | None) -> bool:
    """Compare with round 0; returns True when the run should stop (eval.on_forgetting=stop past threshold)."""
    from thinktree.trainer.health import forgetting_report

    if round0 is None or row["round"] == 0 or "health/retained_accuracy" not in row:
        return False
    report = forgetting_report(row, round0, threshold=run.cfg.eval.forgetting_threshold)
    row.update({k: v for k, v in report.items() if k not in row})
    return bool(report.get("health/forgetting_warn")) and run.cfg.eval.on_forgetting == "stop"


# --------------------------------------------------------------------------------------------------- the loop


def _check_lengths(run: Run, train_rows, train_prompts: list, eval_prompts: list) -> None:
    """Refuse prompts (and the warm start's prompt + worked solution) that do not fit the model context, naming
    the rows (``ValueError``), before the run writes anything."""
    model, tok, name = run.model, run.tokenizer, run.task.name
    if run.cfg.rounds.num_rounds > 0:
        pool = _round_pool(run.cfg, train_prompts)
        check_prompt_lengths(model, tok, [p.prompt for p in pool], what=f"task {name} train split",
                             names=[f"train row {p.key}" for p in pool])  # fmt: skip
    check_prompt_lengths(model, tok, [p.prompt for p in eval_prompts], what=f"task {name} test split",
                         names=[f"test row {p.key}" for p in eval_prompts])  # fmt: skip
    if run.cfg.rounds.warm_start.algo != "none":
        prompts, solutions = warm_examples(run, train_rows, train_prompts)
        check_prompt_lengths(  # reserve 1: the EOS the warm start appends to every solution
            model, tok, [p.prompt + s for p, s in zip(prompts, solutions)],
            what=f"task {name} warm start (prompt + worked solution)",
            names=[f"train row {p.key}" for p in prompts], reserve=1,
        )  # fmt: skip


def _train_round(run: Run, rdir: Path, r: int) -> dict:
    """Round ``r``'s training stage, checked (finite weights; replicas equal under DDP) and checkpointed."""
    record = train_stage(run, rdir)
    run.check_finite(f"after round {r}'s training")
    if run.topo.world > 1 and not (run.engine and is_zero3(run.engine.accelerator)):
        # replicated weights (DDP): all ranks trained one model
        run.topo.check_same(f"the weights after round {r}", weights_digest(run.model))
    record["checkpoint"] = run.save(rdir / "checkpoint")
    return record


def _eval_round(
    run: Run, rdir: Path, r: int, eval_prompts: list, eval_rows
) -> tuple[dict, tuple[str, str] | None]:
    """Round ``r``'s row (recorded in ``stages.json``) and, when the run stops after it, why and which setting said
    so (None: it goes on).

    Rounds between ``rounds.eval_every`` marks only record their search and training; the others evaluate the
    held-out split (and health metrics); ``train.on_collapse`` / ``eval.on_forgetting`` = stop end the run here."""
    cfg, stages = run.cfg, run.stages
    done = {**(stages.get(f"round-{r}/search") or {}), **(stages.get(f"round-{r}/train") or {})}
    collapsed = done.get("collapse") if cfg.train.on_collapse == "stop" else None
    if 0 < r < cfg.rounds.num_rounds and r % cfg.rounds.eval_every and not collapsed:
        row = {"round": r, **done}  # rounds.eval_every: a training-only round
        stages.finish(f"round-{r}/eval", row)
        return row, None
    start = time.perf_counter()
    with run.policy() as policy:
        evals = evaluate_policy(
            policy, run.tokenizer, run.task, eval_prompts, cfg, seed=cfg.seed, topo=run.topo
        )
        row = {"round": r, "eval": evals, "eval_time_s": time.perf_counter() - start}
        if cfg.eval.health:
            row.update(health_stage(run, policy, eval_prompts, eval_rows, stages))
    row.update(done)
    forgot = _forgetting(run, row, stages.get("round-0/eval"))
    if run.topo.is_main:
        write_json_atomic(rdir / "eval.json", row)
    stages.finish(f"round-{r}/eval", row)
    if collapsed:
        return row, ("; ".join(collapsed), "train.on_collapse")
    return row, ("retained accuracy fell past the threshold", "eval.on_forgetting") if forgot else None


def run_train(cfg: RecipeConfig) -> dict:
    """Run a recipe end to end (resumable); returns the summary written to ``summary.json``.

    The recipe, the model, the task, the data and the prompt lengths are all checked before anything is written
    to the output dir, so a refused run leaves nothing that would block its corrected rerun there."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    _check_recipe(cfg)
    topo = topology()
    out = check_output_dir(cfg)  # a different recipe's run dir: refused before reading or writing anything
    stages = Stages(out, topo)
    checkpoint = stages.last_checkpoint()
    model, tokenizer = load_policy(
        checkpoint or cfg.model.policy, dtype=cfg.model.dtype, seed=cfg.seed, tiny_sizes=cfg.model.tiny_sizes,
        lora=None if checkpoint else cfg.model.lora,
    )  # fmt: skip
    run = Run(cfg, topo, out, stages, get_task(cfg.task.name, **cfg.task.kwargs), model, tokenizer)
    if cfg.search.process_check and not has_step_check(run.task):
        raise ConfigError(f"search.process_check: task {cfg.task.name!r} cannot check steps")
    needs_train = cfg.rounds.num_rounds > 0 or cfg.rounds.warm_start.algo != "none"
    train_rows = run.task.load("train", n=cfg.task.train_size, seed=cfg.seed) if needs_train else None
    train_prompts = (
        make_prompts(run.task, train_rows, tokenizer, cfg.model.use_chat_template) if needs_train else []
    )
    eval_rows = run.task.load("test", n=cfg.task.eval_size, seed=cfg.seed)
    eval_prompts = make_prompts(run.task, eval_rows, tokenizer, cfg.model.use_chat_template)
    _check_lengths(run, train_rows, train_prompts, eval_prompts)
    if topo.is_main:
        _note_round_size(cfg, train_prompts)

    resumed = (out / "config.yaml").exists()
    prepare_output_dir(cfg)  # every check passed: from here on the run writes into its output dir
    if resumed and topo.is_main:  # leftovers of saves a kill interrupted: policy saves, training checkpoints
        remove_partials(out)
        for root in [out / "warm_start" / "trainer", *out.glob("round-*/trainer")]:
            remove_leftovers(root)
    topo.barrier()
    report = Reporter(out, cfg, enabled=topo.is_main)

    if cfg.rounds.warm_start.algo != "none" and not stages.get("warm_start"):
        stages.finish("warm_start", warm_start(run, train_rows, train_prompts))
    for r in range(cfg.rounds.num_rounds + 1):
        rdir = out / f"round-{r:02d}"
        rdir.mkdir(parents=True, exist_ok=True)
        if r > 0 and stages.get(f"round-{r}/search") is None:
            prompts = _round_prompts(cfg, train_prompts, r)
            stages.finish(f"round-{r}/search", search_stage(run, prompts, rdir, cfg.seed * 1000 + r))
        if r > 0 and stages.get(f"round-{r}/train") is None:
            stages.finish(f"round-{r}/train", _train_round(run, rdir, r))
        row, stop = stages.get(f"round-{r}/eval"), None
        if row is None:
            row, stop = _eval_round(run, rdir, r, eval_prompts, eval_rows)
        report.round(row, rdir)
        if stop:
            log.warning("round %d: %s; stopping (%s=stop; the same command resumes with round %d)",
                        r, *stop, r + 1)  # fmt: skip
            break
    return report.finish(stages.get("warm_start"))
