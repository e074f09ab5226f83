"""Train and evaluate a process reward model (:class:`thinktree.rewards.prm.ProcessRewardModel`) from search trees.

Training (:func:`train_prm`), under ``accelerate`` (DDP or DeepSpeed; ``gloo`` on CPU), AdamW, gradient clipping:

* ``objective="mse"`` / ``"bce"`` — regression / binary cross-entropy of the head (sigmoid) at every step
  boundary against Math-Shepherd MC labels (Wang et al., 2024; soft = fraction of correct outcomes below the
  step, hard = any correct) or ReST-MCTS* value targets (Zhang et al., 2024): stepwise records
  ``{"prompt", "completions", "labels"}`` from :mod:`thinktree.rewards.labels`. BCE takes soft labels as targets.
* ``objective="bt"`` — Bradley–Terry on rStar-Math PPM pairs (Guan et al., 2025):
  ``-log σ(score(prompt+chosen) - score(prompt+rejected))`` with the score read at the pair's last step
  (records ``{"prompt", "chosen", "rejected"}``; ``prompt`` already holds the shared prefix steps).

Options: ``lora`` wraps the backbone with peft (the head stays fully trainable); ``outcome_only`` keeps only each
record's last label (an ORM). Departures: Math-Shepherd trains the LM's own "+"/"-" token logits; here a separate
scalar head (as ReST-MCTS*'s value model and rStar's PPM do). Labels on shared prefixes are repeated once per
record (one record per leaf), so early steps weigh more — as in Math-Shepherd, where each solution is a sample.

Evaluation: :func:`step_metrics` (step-level accuracy at 0.5 and rank AUC — a numpy Mann–Whitney U — against MC
labels of held-out trees, each distinct prefix counted once) and :func:`rerank_metrics` (best-of-N: accuracy of
the PRM's argmax, of a PRM-weighted vote and of the majority vote, plus the oracle pass@N).

Checkpoints: :func:`save_prm_checkpoint` (LoRA merged by default → a plain HF directory) and
:func:`load_prm_checkpoint` (also loads an unmerged adapter checkpoint through ``load_policy``).

Run: ``bench/prm_rerank.py`` (the experiment); ``tests/test_prm.py`` (incl. a 2-process DDP launch).
"""

from __future__ import annotations

import math
import os
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from accelerate import Accelerator, InitProcessGroupKwargs
from torch.utils.data import DataLoader

from thinktree.rewards.prm import PRMValueFn, ProcessRewardModel, StepEncoder, load_prm
from thinktree.trainer.models import apply_lora, load_policy

__all__ = [
    "OBJECTIVES",
    "PRMSettings",
    "make_accelerator",
    "stepwise_examples",
    "pair_examples",
    "train_prm",
    "save_prm_checkpoint",
    "load_prm_checkpoint",
    "auc",
    "step_metrics",
    "rerank_metrics",
    "paired_test",
]

OBJECTIVES = ("mse", "bce", "bt")


@dataclass
class PRMSettings:
    objective: str = "bce"
    """mse | bce (stepwise labels) or bt (preference pairs)."""
    steps: int = 200
    """Optimiser steps."""
    learning_rate: float = 1e-3
    """AdamW learning rate (constant after a 5% linear warm-up)."""
    per_device_batch_size: int = 16
    """Records (or pairs) per device per step."""
    max_grad_norm: float = 1.0
    """Gradient clipping norm."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    lora: Mapping[str, Any] | bool | None = None
    """LoRA on the backbone (peft ``LoraConfig`` fields, or True for defaults); None = full fine-tuning."""
    head_only: bool = False
    """Freeze the backbone; train the value head only."""
    outcome_only: bool = False
    """Keep only each record's last label (trains an ORM)."""
    seed: int = 0
    """Seeds data order and LoRA init."""
    log_every: int = 25
    """Print the loss every this many steps on the main process (0 = never)."""


def make_accelerator(**kwargs: Any) -> Accelerator:
    """An ``Accelerator`` that also works multi-process on CPU: under a launcher (``WORLD_SIZE`` > 1) without CUDA
    it asks for the ``gloo`` backend (see docs/cpu-stack.md); a single process gets a plain ``Accelerator``."""
    launched = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if launched and not torch.cuda.is_available():
        kwargs.setdefault("kwargs_handlers", [InitProcessGroupKwargs(backend="gloo")])
    return Accelerator(**kwargs)


def stepwise_examples(
    records: Sequence[Mapping], outcome_only: bool = False
) -> list[tuple[str, list[str], list[float]]]:
    """``(prompt, step texts, float labels)`` from stepwise records; NaN labels (no evidence) are kept as NaN
    and masked out of the loss."""
    out = []
    for r in records:
        steps, labels = list(r["completions"]), [float(x) for x in r["labels"]]
        if len(steps) != len(labels):
            raise ValueError(f"record key={r.get('key')}: {len(steps)} steps but {len(labels)} labels")
        if not steps:
            continue
        if outcome_only:
            labels = [math.nan] * (len(labels) - 1) + labels[-1:]
        out.append((r["prompt"], steps, labels))
    return out


def pair_examples(records: Sequence[Mapping]) -> list[tuple[str, str, str]]:
    """``(prompt, chosen, rejected)`` from preference records."""
    return [(r["prompt"], r["chosen"], r["rejected"]) for r in records]


def _collate(encoder: StepEncoder, objective: str, examples: list) -> Any:
    def fn(idx: list[int]) -> dict[str, torch.Tensor]:
        items = [examples[i] for i in idx]
        if objective == "bt":
            enc = [encoder.encode(p, [c]) for p, c, _ in items] + [
                encoder.encode(p, [r]) for p, _, r in items
            ]
            enc = [(ids, ends[-1:], ends) for ids, ends in enc]  # read only the last step
            return encoder.batch(enc)
        enc = [(ids, ends[1:], ends) for ids, ends in (encoder.encode(p, s) for p, s, _ in items)]
        batch = encoder.batch(enc)
        batch["labels"] = torch.tensor([y for _, _, ys in items for y in ys], dtype=torch.float32)
        return batch

    return fn


def _loss(objective: str, logits: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
    if objective == "bt":
        half = logits.shape[0] // 2
        return -F.logsigmoid(logits[:half] - logits[half:]).mean()
    assert labels is not None
    keep = ~torch.isnan(labels)
    if not keep.any():
        return logits.sum() * 0.0  # keep every parameter in the graph (DDP)
    logits, labels = logits[keep], labels[keep]
    if objective == "mse":
        return F.mse_loss(torch.sigmoid(logits), labels)
    return F.binary_cross_entropy_with_logits(logits, labels)


def _prepare_params(prm: ProcessRewardModel, settings: PRMSettings) -> list[torch.nn.Parameter]:
    """Apply LoRA / freezing; the LM head is frozen unless tied (the PRM never uses it: DDP needs every
    trainable parameter to get a gradient)."""
    if settings.lora:
        prm.backbone = apply_lora(prm.backbone, settings.lora, seed=settings.seed)
    if settings.head_only:
        prm.backbone.requires_grad_(False)
    out_emb, in_emb = prm.backbone.get_output_embeddings(), prm.backbone.get_input_embeddings()
    if out_emb is not None and in_emb is not None and out_emb.weight is not in_emb.weight:
        out_emb.requires_grad_(False)
    return [p for p in prm.parameters() if p.requires_grad]


def train_prm(
    prm: ProcessRewardModel,
    tokenizer: Any,
    records: Sequence[Mapping],
    settings: PRMSettings,
    accelerator: Accelerator | None = None,
) -> dict[str, Any]:
    """Train ``prm`` in place (see module doc); returns ``{"losses", "loss_first", "loss_last", ...}``.

    ``records`` are stepwise records (mse/bce) or preference pairs (bt). Under ``accelerate launch`` every
    process passes the same records; each global batch is split across the processes.
    """
    if settings.objective not in OBJECTIVES:
        raise ValueError(f"unknown objective {settings.objective!r}; choose one of {OBJECTIVES}")
    bt = settings.objective == "bt"
    examples: list = pair_examples(records) if bt else stepwise_examples(records, settings.outcome_only)
    if not examples:
        raise ValueError(f"train_prm: no training examples for objective {settings.objective!r} (0 records)")
    acc = accelerator or make_accelerator()
    params = _prepare_params(prm, settings)
    context = getattr(prm.backbone.config, "max_position_embeddings", None)
    encoder = StepEncoder(tokenizer, context if isinstance(context, int) else None)
    gen = torch.Generator().manual_seed(settings.seed)
    loader = DataLoader(
        list(range(len(examples))), batch_size=settings.per_device_batch_size, shuffle=True, generator=gen,
        collate_fn=_collate(encoder, settings.objective, examples), drop_last=False,
    )  # fmt: skip
    opt = torch.optim.AdamW(params, lr=settings.learning_rate, weight_decay=settings.weight_decay)
    warm = max(1, settings.steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warm))
    model, opt, loader = acc.prepare(prm, opt, loader)  # the scheduler is stepped once per step, by hand
    model.train()
    losses, start, step = [], time.perf_counter(), 0
    while step < settings.steps:
        for batch in loader:
            logits = model(**{k: v for k, v in batch.items() if k != "labels"})
            loss = _loss(settings.objective, logits.float(), batch.get("labels"))
            acc.backward(loss)
            if settings.max_grad_norm:
                acc.clip_grad_norm_(model.parameters(), settings.max_grad_norm)
            opt.step()
            sched.step()
            opt.zero_grad()
            losses.append(float(acc.reduce(loss.detach(), reduction="mean")))
            step += 1
            if settings.log_every and step % settings.log_every == 0 and acc.is_main_process:
                print(f"prm step {step}/{settings.steps} loss {np.mean(losses[-settings.log_every :]):.4f}")
            if step >= settings.steps:
                break
    acc.wait_for_everyone()
    acc.unwrap_model(model).eval()
    k = max(1, min(10, len(losses) // 4))
    return {
        "losses": losses,
        "loss_first": float(np.mean(losses[:k])),
        "loss_last": float(np.mean(losses[-k:])),
        "steps": step,
        "examples": len(examples),
        "world_size": acc.num_processes,
        "time_s": time.perf_counter() - start,
    }


def save_prm_checkpoint(
    prm: ProcessRewardModel, tokenizer: Any, path: str | os.PathLike[str], merge_lora: bool = True
) -> Path:
    """Save ``prm``; a LoRA backbone is merged first (``merge_lora``), leaving a plain HF directory."""
    backbone = prm.backbone
    if merge_lora and hasattr(backbone, "merge_and_unload"):
        prm.backbone = backbone.merge_and_unload()
    with (
        warnings.catch_warnings()
    ):  # peft cannot find a config.json for a "tiny:..." base; harmless (no resize)
        warnings.filterwarnings("ignore", message="Could not find a config file in")
        return prm.save_pretrained(path, tokenizer)


def load_prm_checkpoint(path: str | os.PathLike[str], device: str = "cpu") -> tuple[ProcessRewardModel, Any]:
    """:func:`thinktree.rewards.prm.load_prm`, also for unmerged LoRA checkpoints (base rebuilt by ``load_policy``)."""
    return load_prm(path, backbone_loader=lambda d: load_policy(d, padding_side=None)[0], device=device)


# ------------------------------------------------------------------------------------------------------ metrics
def auc(scores: Sequence[float], labels: Sequence[bool]) -> float:
    """ROC AUC by the Mann–Whitney U statistic with mid-ranks for ties; NaN when a class is empty."""
    s = np.asarray(scores, dtype=float)
    y = np.asarray(labels, dtype=bool)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return math.nan
    order = np.argsort(s, kind="mergesort")
    ranks = np.empty(len(s))
    sorted_s = s[order]
    i = 0
    while i < len(s):  # mid-ranks over runs of equal scores
        j = i
        while j + 1 < len(s) and sorted_s[j + 1] == sorted_s[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2.0 + 1.0
        i = j + 1
    u = ranks[y].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def step_metrics(
    value_fn: PRMValueFn, records: Sequence[Mapping], threshold: float = 0.5
) -> dict[str, float]:
    """Step accuracy (score ≥ 0.5 vs label ≥ ``threshold``) and AUC against stepwise records' labels, every
    distinct (prompt, prefix) counted once; NaN labels are skipped."""
    scores = value_fn.step_scores(records)
    seen: dict[tuple, tuple[float, bool]] = {}
    for r, ss in zip(records, scores):
        for k, (s, y) in enumerate(zip(ss, r["labels"])):
            if y is None or (isinstance(y, float) and math.isnan(y)):
                continue
            seen.setdefault((r["prompt"], tuple(r["completions"][: k + 1])), (s, float(y) >= threshold))
    if not seen:
        return {"step_acc": math.nan, "step_auc": math.nan, "n_steps": 0, "pos_rate": math.nan}
    s_arr = np.array([v[0] for v in seen.values()])
    y_arr = np.array([v[1] for v in seen.values()])
    return {
        "step_acc": float(np.mean((s_arr >= 0.5) == y_arr)),
        "step_auc": auc(s_arr, y_arr),
        "n_steps": len(seen),
        "pos_rate": float(y_arr.mean()),
    }


def _vote(cands: Sequence[Mapping], weighted: bool) -> Mapping | None:
    """The winning candidate: most (weighted) votes, then more votes, then the answer seen first (as
    ``thinktree.search.selection.vote``); None answers do not vote."""
    totals: dict[str, list] = {}
    for pos, c in enumerate(cands):
        if c.get("answer") is None:
            continue
        e = totals.setdefault(c["answer"], [0.0, 0, -pos, c])
        e[0] += float(c["score"]) if weighted else 1.0
        e[1] += 1
    if not totals:
        return None
    return max(totals.values(), key=lambda e: tuple(e[:3]))[3]


def rerank_metrics(groups: Sequence[Sequence[Mapping]], per_prompt: bool = False) -> dict[str, Any]:
    """Best-of-N selection accuracies over prompts; each group holds the N candidates of one prompt as
    ``{"answer": str | None, "correct": bool, "score": float}``.

    ``rerank_acc``: the candidate with the highest score (first on ties); ``weighted_vote_acc``: answer with the
    most score mass; ``majority_acc``: most frequent answer (no answer → wrong); ``oracle_acc``: any correct.
    ``per_prompt=True`` adds ``picks``: per rule, whether each prompt's selection was correct (for paired tests).
    """
    picks: dict[str, list[float]] = {
        "rerank_acc": [],
        "weighted_vote_acc": [],
        "majority_acc": [],
        "oracle_acc": [],
    }
    for cands in groups:
        if not cands:
            raise ValueError("rerank_metrics: a prompt with no candidates")
        best = max(range(len(cands)), key=lambda i: (cands[i]["score"], -i))
        picks["rerank_acc"].append(bool(cands[best]["correct"]))
        for name, weighted in (("weighted_vote_acc", True), ("majority_acc", False)):
            won = _vote(cands, weighted)
            picks[name].append(bool(won is not None and won["correct"]))
        picks["oracle_acc"].append(any(bool(c["correct"]) for c in cands))
    out: dict[str, Any] = {k: float(np.mean(v)) if v else math.nan for k, v in picks.items()}
    out["n_prompts"] = len(groups)
    if per_prompt:
        out["picks"] = picks
    return out


def paired_test(a: Sequence[bool], b: Sequence[bool]) -> dict[str, float]:
    """Exact McNemar test of two selection rules on the same prompts: ``a_only`` (a right, b wrong), ``b_only``
    and the two-sided binomial p-value of the discordant split."""
    a_only = sum(1 for x, y in zip(a, b) if x and not y)
    b_only = sum(1 for x, y in zip(a, b) if y and not x)
    n, k = a_only + b_only, min(a_only, b_only)
    p = min(1.0, 2 * sum(math.comb(n, i) for i in range(k + 1)) / 2**n) if n else 1.0
    return {"a_only": a_only, "b_only": b_only, "p_value": p}
