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

import contextlib
import dataclasses
import hashlib
import json
import logging
import re
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from datasets import Dataset

from thinktree.rewards import get_task
from thinktree.search.store import TreeStore, search_resumable
from thinktree.trainer.algos.dpo import DPOSettings, train_dpo
from thinktree.trainer.algos.engine import Engine, is_zero3
from thinktree.trainer.algos.grpo import GRPO
from thinktree.trainer.algos.ppo import PPO, ppo_records
from thinktree.trainer.algos.rft import RFT
from thinktree.trainer.algos.sft import SFTSettings, train_sft
from thinktree.trainer.checkpoint import latest_checkpoint, load_checkpoint, remove_leftovers, save_model
from thinktree.trainer.config import ConfigError, RecipeConfig
from thinktree.trainer.distributed import Topology, topology
from thinktree.trainer.evaluate import evaluate_policy
from thinktree.trainer.learning import collapse_report, has_step_check, process_checked, randomise_rewards
from thinktree.trainer.models import (
    NonFiniteWeightsError,
    check_finite_weights,
    check_prompt_lengths,
    load_policy,
    remove_partials,
    save_policy,
)
from thinktree.trainer.outputs import check_output_dir, dumps_finite, prepare_output_dir, write_json_atomic
from thinktree.trainer.reporting import Reporter
from thinktree.trainer.searching import make_outcome_fn, make_prompts, make_proposer, run_method
from thinktree.trainer.signals import signal_counts, step_pairs, tree_advantages
from thinktree.trainer.signals.improved_policy import improved_policy_records
from thinktree.trainer.signals.traces import rft_records, sft_traces

log = logging.getLogger("thinktree")


_STAGE_DIR = re.compile(r"^(warm_start|round-\d+)$")


def relative_checkpoint(path: str) -> str:
    """A ``checkpoint`` entry as stored: relative to the run dir. Entries written before paths were relative are
    absolute; one that names a stage's checkpoint (``.../round-02/checkpoint``) becomes relative, so a moved or
    copied run dir uses its own weights; any other absolute path is kept."""
    p = Path(path)
    if p.is_absolute() and len(p.parts) >= 2 and p.name == "checkpoint" and _STAGE_DIR.match(p.parent.name):
        return f"{p.parent.name}/{p.name}"
    return path


class Stages:
    """``stages.json``: the finished stages of a run, each with its small result record (rank 0 writes it).

    Checkpoint paths are stored relative to the run dir (``round-02/checkpoint``) and resolved on read
    (:meth:`resolve`), so a run dir moved or copied elsewhere resumes from its own files."""

    def __init__(self, out: Path, topo: Topology) -> None:
        self.out, self.path, self.topo = out, out / "stages.json", topo
        self.done: dict[str, Any] = json.loads(self.path.read_text()) if self.path.exists() else {}
        for record in self.done.values():
            if isinstance(record, dict) and isinstance(record.get("checkpoint"), str):
                record["checkpoint"] = relative_checkpoint(record["checkpoint"])

    def get(self, name: str) -> Any:
        return self.done.get(name)

    def resolve(self, checkpoint: str) -> str:
        """A stored checkpoint entry as a path to load (relative entries are under this run dir)."""
        return str(checkpoint if Path(checkpoint).is_absolute() else self.out / checkpoint)

    def finish(self, name: str, record: Any) -> None:
        self.done[name] = record
        if self.topo.is_main:
            write_json_atomic(self.path, self.done)
        self.topo.barrier()

    def last_checkpoint(self) -> str | None:
        for record in reversed(list(self.done.values())):
            if isinstance(record, dict) and record.get("checkpoint"):
                return self.resolve(record["checkpoint"])
        return None


@dataclasses.dataclass
class Run:
    """Everything one training run holds: recipe, processes, output dir, task, policy."""

    cfg: RecipeConfig
    topo: Topology
    out: Path
    stages: Stages
    task: Any
    model: Any
    tokenizer: Any
    reference: Any = None
    """The round-0 policy, frozen (health metrics: KL drift)."""
    engine: Any = None
    """Under DeepSpeed ZeRO-3 only: the training engine that holds the partitioned weights."""

    @contextlib.contextmanager
    def policy(self) -> Iterator[Any]:
        """The live policy for search and evaluation (ZeRO-3: parameters gathered; every rank must enter)."""
        if self.engine is None:
            yield self.model
        else:
            with self.engine.unwrap_for_generation() as model:
                yield model

    def save(self, path: Path) -> str:
        """Save the policy to ``path`` (under the run dir); returns the path relative to the run dir."""
        if self.engine is not None:
            save_model(self.engine, path, tokenizer=self.tokenizer)
        else:
            if self.topo.is_main:
                save_policy(self.model, self.tokenizer, path)
            self.topo.barrier()
        return path.relative_to(self.out).as_posix()

    def check_finite(self, where: str) -> None:
        """Fail loudly (:class:`NonFiniteWeightsError`, on every rank) when the policy's weights hold NaN or inf."""
        try:
            check_finite_weights(self.model, where)
            error = None
        except NonFiniteWeightsError as e:
            error = str(e)
        errors = [e for e in self.topo.gather(error) if e]
        if errors:
            raise NonFiniteWeightsError(
                f"{errors[0]}; the stage is not recorded: rerun with the fix in a new output.dir"
            )


def weights_digest(model) -> str:
    """SHA-256 of a model's parameters (name, dtype and bytes), to compare replicas across ranks."""
    h = hashlib.sha256()
    for name, p in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(p.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


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


# --------------------------------------------------------------------------------------------------- stages


def warm_start(run: Run, rows, prompts) -> dict:
    """Likelihood on the task's worked solutions (the prompts formatted exactly as the search formats them):
    TRL's ``SFTTrainer`` (``algo: sft``) or the run's own engine (``algo: engine``; see :func:`_engine_warm_start`)."""
    start, w = time.perf_counter(), run.cfg.rounds.warm_start
    prompts, solutions = _warm_examples(run, rows, prompts)
    n = len(prompts)
    if w.algo == "engine":
        loss = _engine_warm_start(run, prompts, solutions)
    else:
        data = Dataset.from_list([{"prompt": p.prompt, "completion": s} for p, s in zip(prompts, solutions)])
        loss = train_sft(
            run.model, run.tokenizer, data, _sft_settings(run.cfg, warm=True), run.out / "ws"
        ).get("train_loss")
    run.check_finite("after the warm start")
    ckpt = run.save(run.out / "warm_start" / "checkpoint")
    return {"checkpoint": ckpt, "train_loss": loss, "examples": n, "time_s": time.perf_counter() - start}


def _warm_examples(run: Run, rows, prompts: list) -> tuple[list, list[str]]:
    """The warm start's prompts and worked solutions (the first ``warm_start.examples``, else all)."""
    if "solution" not in rows.column_names:
        raise ConfigError(f"task {run.task.name!r} has no worked solutions for an SFT warm start")
    w = run.cfg.rounds.warm_start
    n = len(prompts) if w.examples is None else min(w.examples, len(prompts))
    return prompts[:n], list(rows["solution"])[:n]


def solution_records(tokenizer, prompts: list, solutions: list[str]) -> list[dict]:
    """Worked solutions as engine records: the solution's tokens plus EOS, every token trained with weight 1."""
    eos = [int(tokenizer.eos_token_id)] if tokenizer.eos_token_id is not None else []
    out = []
    for p, text in zip(prompts, solutions):
        ids = [int(i) for i in tokenizer(text, add_special_tokens=False)["input_ids"]] + eos
        out.append({"prompt": p.prompt, "key": p.key, "completion_ids": ids, "advantages": [1.0] * len(ids),
                    "old_logprobs": [0.0] * len(ids), "loss_mask": [1] * len(ids)})  # fmt: skip
    return out


def _engine_warm_start(run: Run, prompts: list, solutions: list[str]) -> float | None:
    """``warm_start.steps`` likelihood steps on the run's engine at ``warm_start.learning_rate`` (resumable in
    ``warm_start/trainer/``); the engine, its AdamW moments and its LR schedule then carry into round 1."""
    w = run.cfg.rounds.warm_start
    engine = _engine(run, run.out / "round-01")
    engine.set_peak_lr(w.learning_rate)
    algo = RFT(engine, seed=run.cfg.seed)
    algo.cfg = dataclasses.replace(run.cfg.train, steps=w.steps, per_device_batch_size=w.per_device_batch_size,
                                   grad_accum=1, num_iterations=1, kl_coef=0.0)  # fmt: skip
    records = solution_records(run.tokenizer, prompts, solutions)
    history = algo.train(records, checkpoint_dir=run.out / "warm_start" / "trainer")
    if engine.ref_model is not None:  # the KL reference is the warm-started policy, as with a TRL warm start
        engine.ref_model.load_state_dict(engine.policy.state_dict())
    return history[-1].get("train/nll") if history else None


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


def _stores(rdir: Path) -> list[TreeStore]:
    return [TreeStore(p) for p in sorted(rdir.glob("trees*.jsonl"))]


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
    trees = [t for s in _stores(rdir) for t in s.load()]
    summaries = [s for st in _stores(rdir) for s in st.results() if s]
    leaves = [t.nodes[i] for t in trees for i in t.terminal_leaves()]
    return {
        "trees": len(trees),
        "generated_tokens": sum(s["budget"]["generated_tokens"] for s in summaries),
        "search_time_s": time.perf_counter() - start,
        "leaf_reward_mean": float(np.mean([n.reward or 0.0 for n in leaves])) if leaves else 0.0,
        "search_accuracy": float(np.mean([(s.get("reward") or 0.0) >= 0.5 for s in summaries])),
    }


def _write_jsonl(path: Path, records: list[dict]) -> None:
    """One JSON object a line, NaN/inf as null (see :func:`dumps_finite`); written aside and renamed into place."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        for rec in records:
            f.write(dumps_finite(rec, str(path)) + "\n")
    tmp.replace(path)


def _write_signals(run: Run, rdir: Path, records: list[dict]) -> None:
    if run.topo.is_main:
        _write_jsonl(rdir / "signals.jsonl", records)


def _train_sft(run: Run, trees: list, rdir: Path) -> dict:
    records = sft_traces(trees, k=run.cfg.rounds.traces_per_tree)
    _write_signals(run, rdir, records)
    if not records:
        return {}
    data = Dataset.from_list([{"prompt": r["prompt"], "completion": r["completion"]} for r in records])
    metrics = train_sft(run.model, run.tokenizer, data, _sft_settings(run.cfg, warm=False), rdir / "trainer")
    return {"train_loss": metrics.get("train_loss")}


def _train_dpo(run: Run, trees: list, rdir: Path) -> dict:
    t = run.cfg.train
    records = step_pairs(trees, min_margin=t.pair_min_margin, rng=np.random.default_rng(run.cfg.seed))
    _write_signals(run, rdir, records)
    if not records:
        return {}
    settings = DPOSettings(
        beta=t.dpo_beta, learning_rate=t.learning_rate, steps=t.steps, per_device_batch_size=t.per_device_batch_size,
        grad_accum=t.grad_accum, max_grad_norm=t.max_grad_norm, seed=run.cfg.seed,
    )  # fmt: skip
    metrics = train_dpo(run.model, run.tokenizer, records, settings, rdir / "trainer")
    return {"train_loss": metrics.get("train_loss")}


ENGINE_ALGOS = ("grpo", "ppo", "rft")
"""Round algorithms trained on the hand-written engine, whose state carries from round to round."""


def _compile(run: Run, trees: list) -> list[dict]:
    """The round's records for the engine algorithm ``train.algo``."""
    t = run.cfg.train
    if t.algo == "ppo":
        return [rec for tree in trees for rec in ppo_records(tree)]
    if t.algo == "grpo":
        records = [rec for tree in trees for rec in tree_advantages(tree, method=t.advantage)]
    else:
        records = rft_records(trees, k=run.cfg.rounds.traces_per_tree)
    if t.pi_prime_coef > 0:  # Gumbel MuZero's improved policy as a target: KL(pi' || pi) per searched node
        records += [rec for tree in trees for rec in improved_policy_records(tree, scale=t.pi_prime_coef)]
    return records


def _horizon(cfg: RecipeConfig) -> int | None:
    """Optimiser steps of the whole run (the LR schedule's length: an engine warm start's steps plus
    ``rounds.num_rounds × train.steps``); None when ``train.steps`` is 0 (one pass a round, length unknown)."""
    if cfg.train.steps <= 0:
        return None
    warm = cfg.rounds.warm_start.steps if cfg.rounds.warm_start.algo == "engine" else 0
    return warm + cfg.train.steps * cfg.rounds.num_rounds


def _engine(run: Run, rdir: Path) -> Engine:
    """The run's one training engine: built at the first training round, or rebuilt on resume from the newest
    finished round's training checkpoint (weights, optimiser moments, LR schedule, RNG, PPO's value head)."""
    if run.engine is not None:
        return run.engine
    algo = TRAINERS[run.cfg.train.algo]
    rounds_steps = (
        run.cfg.train.steps * run.cfg.rounds.num_rounds or None
    )  # warmup_stable_decay: decay over them
    run.engine = Engine(run.model, run.tokenizer, run.cfg.train, value_head=algo.value_head,
                        num_training_steps=_horizon(run.cfg), num_decay_steps=rounds_steps)  # fmt: skip
    done = [run.out / "warm_start" / "trainer"]
    done += sorted(p for p in run.out.glob("round-*/trainer") if p.parent.name < rdir.name)
    ckpt = next((c for c in map(latest_checkpoint, reversed(done)) if c is not None), None)
    if ckpt is not None:
        load_checkpoint(run.engine, ckpt)
        log.info("training state (optimiser, schedule, RNG) resumed from %s", ckpt)
        if (
            run.engine.ref_model is not None
        ):  # the frozen reference is the round-1 start, not the resumed policy
            ws = run.stages.get("warm_start")
            ref, _ = load_policy(run.stages.resolve(ws["checkpoint"]) if ws else run.cfg.model.policy, dtype=run.cfg.model.dtype,
                                 seed=run.cfg.seed, tiny_sizes=run.cfg.model.tiny_sizes)  # fmt: skip
            run.engine.ref_model.load_state_dict(ref.state_dict())
    return run.engine


def _prune_training_state(run: Run, rdir: Path) -> None:
    """Keep only the newest round's training checkpoints (earlier rounds' state is superseded)."""
    if run.topo.is_main:
        for old in [run.out / "warm_start" / "trainer", *run.out.glob("round-*/trainer")]:
            if old.parent.name < rdir.name or old.parent.name == "warm_start":
                shutil.rmtree(old, ignore_errors=True)
    run.topo.barrier()


def _train_engine(run: Run, trees: list, rdir: Path) -> dict:
    """GRPO on per-token tree advantages, PPO with a value head, or RFT (expert iteration) on verified paths.

    One engine serves the whole run: AdamW's moments, the LR schedule (warm-up and decay over
    ``rounds.num_rounds × train.steps`` steps), PPO's critic and the reference policy carry from round to round;
    each round ends with a resumable training checkpoint in ``round-XX/trainer/``, from which a resumed run rebuilds
    the engine. ``train.control``: ``random_reward`` trains on the same trees with coin-flip rewards,
    ``zero_update`` compiles and records the signals but takes no optimiser step.
    """
    t = run.cfg.train
    if t.control == "random_reward":
        trees, p = randomise_rewards(trees, np.random.default_rng([run.cfg.seed, int(rdir.name[-2:]), 7]))
        log.info("random-reward control: leaf rewards replaced by coin flips at p=%.3f", p)
    records = _compile(run, trees)
    _write_signals(run, rdir, records)
    if not records:
        return {}
    if t.control == "zero_update":
        return {"control": "zero_update"}
    engine = _engine(run, rdir)
    engine.set_peak_lr(t.learning_rate)
    history = TRAINERS[t.algo](engine, seed=run.cfg.seed * 1000 + int(rdir.name[-2:])).train(
        records, checkpoint_dir=rdir / "trainer"
    )
    if (
        run.topo.is_main
    ):  # every optimiser step's metrics (a resumed stage's too), for TensorBoard (Reporter.round)
        _write_jsonl(rdir / "train_metrics.jsonl", history)
    _prune_training_state(run, rdir)
    reasons = collapse_report(trees, records, history, entropy_floor=t.entropy_floor, kl_ceiling=t.kl_ceiling)
    last = history[-1] if history else {}
    info = {k.split("/", 1)[1]: v for k, v in last.items() if k.startswith("train/")}
    return {**info, "optimizer_steps": engine.optimizer_steps, "collapse": reasons}


ROUND_TRAINERS = {
    "sft": _train_sft,
    "dpo": _train_dpo,
    "grpo": _train_engine,
    "ppo": _train_engine,
    "rft": _train_engine,
}
"""Round training stage per ``train.algo``: (run, trees, round dir) → metrics for the summary."""

TRAINERS = {"grpo": GRPO, "ppo": PPO, "rft": RFT}
"""Engine algorithms by ``train.algo`` (each a :class:`GRPO` subclass: loss, precompute, value head)."""


def train_stage(run: Run, rdir: Path) -> dict:
    trees = [t for s in _stores(rdir) for t in s.load()]
    start = time.perf_counter()
    counts = {}
    info = ROUND_TRAINERS[run.cfg.train.algo](run, trees, rdir)
    if (rdir / "signals.jsonl").exists():
        with open(rdir / "signals.jsonl") as f:
            counts = signal_counts(json.loads(line) for line in f)
        counts.pop("trees", None)  # the search record's tree count is the one the summary reports
    if not info:
        log.warning("round: no training signal in %d trees; the policy is not updated this round", len(trees))
    for reason in info.get("collapse") or []:
        log.warning("%s cannot teach: %s", rdir.name, reason)
    return {**counts, **info, "train_time_s": time.perf_counter() - start}


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
        prompts, solutions = _warm_examples(run, train_rows, train_prompts)
        check_prompt_lengths(  # reserve 1: the EOS the warm start appends to every solution
            model, tok, [p.prompt + s for p, s in zip(prompts, solutions)],
            what=f"task {name} warm start (prompt + worked solution)",
            names=[f"train row {p.key}" for p in prompts], reserve=1,
        )  # fmt: skip


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
            record = train_stage(run, rdir)
            run.check_finite(f"after round {r}'s training")
            if run.topo.world > 1 and not (run.engine and is_zero3(run.engine.accelerator)):
                # replicated weights (DDP): all ranks trained one model
                run.topo.check_same(f"the weights after round {r}", weights_digest(run.model))
            record["checkpoint"] = run.save(rdir / "checkpoint")
            stages.finish(f"round-{r}/train", record)
        row = stages.get(f"round-{r}/eval")
        collapsed = (
            (stages.get(f"round-{r}/train") or {}).get("collapse")
            if cfg.train.on_collapse == "stop"
            else None
        )
        if row is None and 0 < r < cfg.rounds.num_rounds and r % cfg.rounds.eval_every and not collapsed:
            row = {
                "round": r,
                **(stages.get(f"round-{r}/search") or {}),
                **(stages.get(f"round-{r}/train") or {}),
            }
            stages.finish(f"round-{r}/eval", row)  # rounds.eval_every: a training-only round
        if row is None:
            start = time.perf_counter()
            with run.policy() as policy:
                evals = evaluate_policy(
                    policy, tokenizer, run.task, eval_prompts, cfg, seed=cfg.seed, topo=topo
                )
                row = {"round": r, "eval": evals, "eval_time_s": time.perf_counter() - start}
                if cfg.eval.health:
                    row.update(health_stage(run, policy, eval_prompts, eval_rows, stages))
            for stage in ("search", "train"):
                row.update(stages.get(f"round-{r}/{stage}") or {})
            stop = _forgetting(run, row, stages.get("round-0/eval"))
            if topo.is_main:
                write_json_atomic(rdir / "eval.json", row)
            stages.finish(f"round-{r}/eval", row)
            if stop or collapsed:
                why = "; ".join(collapsed) if collapsed else "retained accuracy fell past the threshold"
                knob = "train.on_collapse" if collapsed else "eval.on_forgetting"
                log.warning("round %d: %s; stopping (%s=stop; the same command resumes with round %d)",
                            r, why, knob, r + 1)  # fmt: skip
                report.round(row, rdir)
                break
        report.round(row, rdir)
    return report.finish(stages.get("warm_start"))
