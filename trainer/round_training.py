"""The training stages of ``thinktree train``: the warm start and each round's compile-and-train step.

One engine serves the whole run for the hand-written algorithms (``grpo``, ``ppo``, ``rft``): AdamW's moments, the LR
schedule, PPO's critic, the KL reference and the RNG carry from the warm start (``rounds.warm_start.algo: engine``)
through every round, and a resumed process rebuilds the engine from the newest training checkpoint. ``sft`` and ``dpo``
rounds use TRL's trainers (a fresh optimiser each round). See :mod:`thinktree.trainer.rounds` for the loop.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
import time
from pathlib import Path

import numpy as np
from datasets import Dataset

from thinktree.trainer.algos.dpo import DPOSettings, train_dpo
from thinktree.trainer.algos.engine import Engine
from thinktree.trainer.algos.grpo import GRPO
from thinktree.trainer.algos.ppo import PPO, ppo_records
from thinktree.trainer.algos.rft import RFT
from thinktree.trainer.algos.sft import SFTSettings, train_sft
from thinktree.trainer.checkpoint import latest_checkpoint, load_checkpoint, retire
from thinktree.trainer.config import ConfigError, RecipeConfig
from thinktree.trainer.learning import collapse_report, randomise_rewards
from thinktree.trainer.models import (
    load_policy,
)
from thinktree.trainer.outputs import dumps_finite
from thinktree.trainer.run_state import Run, stores
from thinktree.trainer.signals import signal_counts, step_pairs, tree_advantages
from thinktree.trainer.signals.improved_policy import improved_policy_records
from thinktree.trainer.signals.traces import rft_records, sft_traces

log = logging.getLogger("thinktree")


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
    prompts, solutions = warm_examples(run, rows, prompts)
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


def warm_examples(run: Run, rows, prompts: list) -> tuple[list, list[str]]:
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
    done = [run.out / "warm_start" / "trainer"]  # this round's own checkpoints too: they are the newest state
    done += sorted(p for p in run.out.glob("round-*/trainer") if p.parent.name <= rdir.name)
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
            if old.exists() and (old.parent.name < rdir.name or old.parent.name == "warm_start"):
                retire(
                    old
                )  # renamed away first: a kill never leaves a half-deleted checkpoint under its name
        for left in [*run.out.glob("round-*/.deleting-*"), *run.out.glob("warm_start/.deleting-*")]:
            shutil.rmtree(left, ignore_errors=True)  # what an earlier kill left between rename and removal
    run.topo.barrier()


def _train_engine(run: Run, trees: list, rdir: Path) -> dict:
    """GRPO on per-token tree advantages, PPO with a value head, or RFT (expert iteration) on verified paths.

    One engine serves the whole run: AdamW's moments, the LR schedule (warm-up and decay over
    ``rounds.num_rounds × train.steps`` steps), PPO's critic and the reference policy carry from round to round;
    each round ends with a resumable training checkpoint in ``round-XX/trainer/``, from which a resumed run rebuilds
    the engine. ``train.control``: ``random_reward`` trains on the same trees with coin-flip rewards,
    ``zero_update`` compiles and records the signals but takes no optimiser step.
    """
    t, r = run.cfg.train, int(rdir.name.removeprefix("round-"))  # the round number, from its directory
    if t.control == "random_reward":
        trees, p = randomise_rewards(trees, np.random.default_rng([run.cfg.seed, r, 7]))
        log.info("random-reward control: leaf rewards replaced by coin flips at p=%.3f", p)
    records = _compile(run, trees)
    _write_signals(run, rdir, records)
    if not records:
        return {}
    if t.control == "zero_update":
        return {"control": "zero_update"}
    engine = _engine(run, rdir)
    engine.set_peak_lr(t.learning_rate)
    history = TRAINERS[t.algo](engine, seed=run.cfg.seed * 1000 + r).train(
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
    trees = [t for s in stores(rdir) for t in s.load()]
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
