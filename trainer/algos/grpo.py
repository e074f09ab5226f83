"""Tree-GRPO: a clipped policy-gradient loss over per-token advantages from the tree compilers.

Paper: GRPO (Shao et al., 2024, DeepSeekMath) with the loss normalisations of Dr. GRPO (Liu et al., 2025) and DAPO
(Yu et al., 2025). Input: advantage records (:mod:`thinktree.trainer.signals.advantages`), one training sequence
each, with a possibly different advantage on every token (TreeRL / TreeRPO give each reasoning step its own).

Loss, per trained token ``t`` (``loss_mask = 1``), with ``r_t = exp(logp_t - old_logp_t)``::

    l_t = max(-A_t r_t, -A_t clip(r_t, 1 - clip_coef, 1 + clip_coef_high)) + kl_coef * k3_t
    k3_t = exp(ref_t - logp_t) - (ref_t - logp_t) - 1            (Schulman's k3 estimator of KL(pi || ref))

normalised over the optimiser step's whole batch (all micro-batches, all ranks) by ``loss_type``:

* ``grpo``: mean over each sequence's tokens, then mean over the sequences (the GRPO paper);
* ``dr_grpo``: sum over all tokens / (sequences × ``max_completion_length``) (Dr. GRPO's constant; when
  ``max_completion_length`` is null, the longest completion of the step's batch — a departure: search steps have no
  single generation budget);
* ``dapo``: sum over all tokens / number of tokens (DAPO's token-level normalisation; the default).

Because the normaliser is the global batch's, gradient accumulation is exact for all three variants: per-device batch 1
× accumulation 4 gives the same gradient as batch 4 × accumulation 1 (``tests/test_grpo.py``).

``old_logp`` is the rollout's ``old_logprobs`` (the search backend's temperature-1 logprobs); ``num_iterations > 1``
reuses them over several passes (off-policy, PPO-style clipping). ``train/logprob_mismatch`` is the mean
``|logp - old_logp|`` recomputed in training mode on the first optimiser step (before any update): a check that
training and search see the same tokens in the same context. The reference is the LoRA-disabled base when training an
adapter, a frozen copy for full fine-tuning (only kept when ``kl_coef > 0``); its logprobs are computed once per
round, before training, and kept with the checkpoints.

Departures from the papers: advantages come from trees (any compiler), not from a group of i.i.d. samples; no
entropy bonus; the KL is added per token before normalisation (as TRL). Why hand-written: TRL's ``GRPOTrainer`` takes
one scalar advantage per completion.

Run: ``GRPO(Engine(model, tokenizer, cfg)).train(records, checkpoint_dir=...)`` or :func:`train_grpo`.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from thinktree.trainer.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from thinktree.trainer.config import TrainConfig

from .batching import Batch, shard, step_plan
from .engine import Engine, ForwardOut
from .packing import packed_micro_batches

__all__ = ["GRPO", "LOSS_TYPES", "LossNorm", "clipped_pg_loss", "k3_kl", "normalise", "train_grpo"]

LOSS_TYPES = ("grpo", "dr_grpo", "dapo")


@dataclass(frozen=True)
class LossNorm:
    """Global counts of one optimiser step's batch, for normalising each micro-batch's contribution."""

    loss_type: str
    n_tokens: float
    """Trained tokens (``sum(loss_mask)``) over the whole step."""
    n_seqs: int
    """Sequences over the whole step."""
    max_len: int
    """dr_grpo's constant."""

    @classmethod
    def of(
        cls,
        records: Sequence[dict],
        rows: Sequence[int],
        loss_type: str,
        max_completion_length: int | None = None,
    ) -> LossNorm:
        if loss_type not in LOSS_TYPES:
            raise ValueError(f"unknown loss_type {loss_type!r}; choose one of {LOSS_TYPES}")
        masks = [records[r].get("loss_mask") or [1] * len(records[r]["completion_ids"]) for r in rows]
        longest = max(len(records[r]["completion_ids"]) for r in rows)
        return cls(
            loss_type, float(sum(sum(m) for m in masks)), len(rows), int(max_completion_length or longest)
        )


def normalise(per_token: torch.Tensor, mask: torch.Tensor, norm: LossNorm) -> torch.Tensor:
    """This micro-batch's contribution to the step's ``loss_type``-normalised loss (see module doc)."""
    masked = per_token * mask
    if norm.loss_type == "dapo":
        return masked.sum() / max(norm.n_tokens, 1.0)
    if norm.loss_type == "grpo":
        return (masked.sum(-1) / mask.sum(-1).clamp_min(1.0)).sum() / norm.n_seqs
    if norm.loss_type == "dr_grpo":
        return masked.sum() / (norm.n_seqs * norm.max_len)
    raise ValueError(f"unknown loss_type {norm.loss_type!r}; choose one of {LOSS_TYPES}")


def clipped_pg_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    clip_low: float,
    clip_high: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-token clipped surrogate ``max(-A r, -A clip(r))``; returns ``(loss, ratio, clipped)``.

    ``clipped`` marks the tokens where the clipped branch is active (``r < 1 - low`` with ``A < 0`` or
    ``r > 1 + high`` with ``A > 0``): their gradient is exactly zero.
    """
    log_ratio = logprobs - old_logprobs
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped_obj = -advantages * torch.clamp(ratio, 1.0 - clip_low, 1.0 + clip_high)
    loss = torch.maximum(unclipped, clipped_obj)
    clipped = ((ratio < 1.0 - clip_low) & (advantages < 0)) | ((ratio > 1.0 + clip_high) & (advantages > 0))
    return loss, ratio, clipped


def k3_kl(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """Schulman's k3 estimator of KL(pi || ref) per token (non-negative, unbiased)."""
    d = ref_logprobs - logprobs
    return torch.exp(d) - d - 1.0


class GRPO:
    """The tree-GRPO trainer: a step plan over a round's records, the loss above, checkpoints and resume."""

    name = "grpo"
    value_head = False

    def __init__(self, engine: Engine, *, seed: int = 0) -> None:
        self.engine, self.cfg, self.seed = engine, engine.cfg, int(seed)
        self.clip_low = self.cfg.clip_coef
        self.clip_high = self.cfg.clip_coef if self.cfg.clip_coef_high is None else self.cfg.clip_coef_high

    # ------------------------------------------------------------------------------------------------- the loss
    def policy_loss(
        self, out: ForwardOut, batch: Batch, norm: LossNorm
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Per-token policy loss ``[B, W]`` (the clipped surrogate) and its metric contributions."""
        f, mask, tok = batch.fields, batch.mask, max(norm.n_tokens, 1.0)
        pg, ratio, clipped = clipped_pg_loss(
            out.logprobs, f["old_logprobs"], f["advantages"], self.clip_low, self.clip_high
        )
        return pg, {
            "pg_loss": normalise(pg, mask, norm),
            "clip_frac": (clipped.float() * mask).sum() / tok,
            "approx_kl": (((ratio - 1) - torch.log(ratio)) * mask).sum() / tok,
        }

    def loss(
        self, out: ForwardOut, batch: Batch, norm: LossNorm, first: bool
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Micro-batch loss (its contribution to the step's loss) and metric contributions (global token means):
        :meth:`policy_loss` plus the KL penalty, normalised by ``loss_type``."""
        f, mask = batch.fields, batch.mask
        per_token, parts = self.policy_loss(out, batch, norm)
        tok = max(norm.n_tokens, 1.0)
        if self.cfg.kl_coef > 0:
            kl = k3_kl(out.logprobs, f["ref_logprobs"])
            per_token = per_token + self.cfg.kl_coef * kl
            parts["kl"] = (kl * mask).sum() / tok
        if out.entropy is not None:
            parts["entropy"] = (out.entropy * mask).sum() / tok
        if first:
            parts["logprob_mismatch"] = ((out.logprobs - f["old_logprobs"]).abs() * mask).sum() / tok
        return normalise(per_token, mask, norm), {k: v.detach() for k, v in parts.items()}

    # ------------------------------------------------------------------------------------------ precomputation
    def precompute(self, records: Sequence[dict]) -> dict[str, list[list[float]]]:
        """Per-token arrays fixed for the round: reference logprobs when ``kl_coef > 0``."""
        if self.cfg.kl_coef <= 0:
            return {}
        return {"ref_logprobs": self.map_records(records, self.engine.reference_logprobs)}

    def map_records(self, records: Sequence[dict], fn: Callable[[Batch], torch.Tensor]) -> list[list[float]]:
        """``fn`` over every record (no grad, in order, batch = per-device size) as per-completion-token lists.

        Every rank computes all records (equal collective counts under ZeRO-3; redundant but simple).
        """
        out: list[list[float]] = []
        size = self.cfg.per_device_batch_size
        for lo in range(0, len(records), size):
            batch = self.engine.collate(list(records), list(range(lo, min(lo + size, len(records)))))
            with torch.no_grad():
                out.extend(batch.per_record(fn(batch)))
        return out

    # ------------------------------------------------------------------------------------------------ training
    def plan(self, records: Sequence[dict]) -> list[list[int]]:
        """Record indices of every optimiser step of this round (deterministic in ``seed``)."""
        c, e = self.cfg, self.engine
        global_batch = c.per_device_batch_size * c.grad_accum * e.world_size
        groups = [r.get("key") for r in records] if c.pack_tokens > 0 else None  # whole trees per step
        return step_plan(
            len(records), global_batch, c.num_iterations, self.seed, c.steps if c.steps > 0 else None, groups
        )

    def step(
        self, records: Sequence[dict], chunk: Sequence[int], extra: dict, first: bool
    ) -> dict[str, float]:
        """One optimiser step on the records ``chunk`` (this rank takes its shard)."""
        e, c = self.engine, self.cfg
        norm = LossNorm.of(records, chunk, c.loss_type, c.max_completion_length)
        mbs = packed_micro_batches(self, records, chunk, extra)  # train.pack_tokens > 0: tree packing
        if mbs is None:
            rows_of = shard(chunk, e.rank, e.world_size, c.grad_accum)
            mbs = [e.collate(list(records), rows, extra) for rows in rows_of]
        return e.optimizer_step(mbs, lambda out, b: self.loss(out, b, norm, first), values=self.value_head)

    def train(
        self,
        records: Sequence[dict],
        *,
        checkpoint_dir: str | os.PathLike[str] | None = None,
        progress: bool = True,
    ) -> list[dict[str, float]]:
        """Train on one round's records; resumes from the newest checkpoint in ``checkpoint_dir`` if there is one.

        Returns every optimiser step's metrics of the round, those before a resume included (each checkpoint's
        ``data_state`` carries the history so far): a stage resumed after its last step returns the full history.
        """
        records = list(records)
        if not records:
            return []
        plan, fingerprint, start, extra = self.plan(records), _fingerprint(records), 0, None
        history: list[dict[str, float]] = []
        ckpt = latest_checkpoint(checkpoint_dir) if checkpoint_dir is not None else None
        if ckpt is not None:
            state = load_checkpoint(self.engine, ckpt)
            if state.get("fingerprint") != fingerprint:
                raise ValueError(f"{ckpt} was written for other records; use a fresh checkpoint_dir")
            start, extra = int(state["step"]), state["extra"]
            history = [dict(m) for m in state.get("history", [])]
        if extra is None:
            extra = self.precompute(records)
        bar = tqdm(
            total=len(plan),
            initial=start,
            desc=self.name,
            disable=not (progress and self.engine.accelerator.is_main_process),
        )
        for s in range(start, len(plan)):
            metrics = self.step(records, plan[s], extra, first=s == 0)
            metrics["train/plan_step"] = float(s + 1)
            history.append(metrics)
            bar.update(1)
            bar.set_postfix(loss=f"{metrics.get('train/loss', float('nan')):.4g}")
            if checkpoint_dir is not None and self._save_now(s + 1, len(plan)):
                data = {"step": s + 1, "extra": extra, "fingerprint": fingerprint, "history": history}
                save_checkpoint(
                    self.engine,
                    checkpoint_dir,
                    s + 1,
                    data_state=data,
                    tokenizer=self.engine.tokenizer,
                    keep=self.cfg.save_total_limit,
                )
        bar.close()
        return history

    def _save_now(self, done: int, total: int) -> bool:
        every = self.cfg.save_steps
        return done == total or (every > 0 and done % every == 0)


def _fingerprint(records: Sequence[dict]) -> str:
    keys = ("prompt", "completion_ids", "advantages", "old_logprobs", "loss_mask", "reward", "step_ends")
    h = hashlib.sha256()
    for r in records:
        h.update(json.dumps([r.get(k) for k in keys], sort_keys=True).encode())
    return h.hexdigest()


def train_grpo(
    model: Any,
    tokenizer: Any,
    records: Sequence[dict],
    cfg: TrainConfig,
    *,
    seed: int = 0,
    checkpoint_dir: str | Path | None = None,
    on_step_end: Sequence[Callable[[Engine, dict[str, float]], None]] = (),
    engine: Engine | None = None,
) -> tuple[Engine, list[dict[str, float]]]:
    """Build (or reuse) an :class:`Engine` and run :meth:`GRPO.train`; returns the engine and per-step metrics."""
    return run_algorithm(GRPO, model, tokenizer, records, cfg, seed=seed, checkpoint_dir=checkpoint_dir,
                         on_step_end=on_step_end, engine=engine)  # fmt: skip


def run_algorithm(
    algo: type[GRPO], model: Any, tokenizer: Any, records: Sequence[dict], cfg: TrainConfig, *, seed: int = 0,
    checkpoint_dir: str | Path | None = None, on_step_end: Sequence[Callable[[Engine, dict[str, float]], None]] = (),
    engine: Engine | None = None,
) -> tuple[Engine, list[dict[str, float]]]:  # fmt: skip
    """Build (or reuse) an :class:`Engine` (with a value head when ``algo`` trains one) and run ``algo.train``."""
    engine = engine or Engine(model, tokenizer, cfg, value_head=algo.value_head)
    engine.on_step_end.extend(on_step_end)
    return engine, algo(engine, seed=seed).train(records, checkpoint_dir=checkpoint_dir)
