"""Per-round health metrics of a policy: compression, forgetting and drift (cheap, batched, teacher-forced).

Why. Accuracy alone says little about *how* a policy changes across self-evolution rounds. Three cheap signals:

Compression (``health/bits_per_char_ref``, ``health/bits_per_token_ref``, ``health/bits_per_char_own``)
    The code length, under the policy, of a completion given its prompt: ``-sum log2 p(token | prefix)`` over the
    completion tokens, divided by its characters (bits/char, comparable across tokenizers) or tokens. Better
    prediction is better compression ("compression is intelligence"): compressing correct reasoning better is a
    proxy for having learned the task's regularities. ``_ref`` is measured on a FIXED held-out set of correct traces (the task's reference
    solutions, e.g. arith's ``solution`` column, else verified-correct greedy traces frozen at round 0 by
    :func:`freeze_reference_traces`), so it is comparable across rounds; ``_own`` on the policy's own greedy
    solutions (a confidence measure: it falls as the policy sharpens, whether or not it is right).
Forgetting (``health/retained_accuracy``, ``health/general_nll_bits_per_char``)
    RL and search keep improving the trained task; catastrophic forgetting is what they may cost elsewhere. (a)
    greedy accuracy on a RETAINED task the recipe names but never trains on, graded by that task's own verifier
    (:func:`retained_accuracy`); (b) bits/char of a small fixed general-English text (``data/general_text.txt``,
    original prose, split by :func:`load_general_text` into chunks of at most ``max_tokens`` tokens, each scored
    after a BOS, or EOS when there is no BOS). :func:`forgetting_report` compares both with round 0 and warns when
    retained accuracy drops by more than a threshold (in points).
Drift (``health/kl_from_round0``, ``health/entropy``)
    Mean per-token KL(pi_round || pi_round0) and the policy's entropy, in nats per token (as ``train/entropy``), on
    the tokens of the policy's own greedy solutions to the held-out prompts; KL is exact over the full vocabulary
    from the two logit tensors. The reference is the adapter-disabled base for a LoRA policy (no copy), else a
    frozen model from :func:`snapshot_reference` (a CPU deep copy, or a checkpoint directory).

Departures from the ideal. Bits are measured on the text only (no EOS), with completion tokens tokenized apart
from the prompt (as the search backend does), so a BPE tokenizer may split the own solutions differently from the
tokens that were sampled. Drift is measured on greedy tokens only (not an expectation over the policy's samples),
and on its own solutions, so rounds compare different token sets. With LoRA the reference is the *base* model:
if the adapter was already trained before round 0 (an SFT warm start), KL at round 0 is not 0; pass a
:func:`snapshot_reference` of the round-0 policy to measure from round 0 exactly. Reference traces frozen from
round-0 greedy outputs cover only the prompts round 0 solved, in round 0's style.

Cost. Everything is teacher-forced under ``torch.inference_mode()``, length-sorted into right-padded batches of
``batch_size`` rows (logits only over the completion window); the only generation is one greedy pass for the own
solutions when they are not given, and the retained task's greedy evaluation.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import inspect
import json
import logging
import math
import os
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from thinktree.search.types import StepRecord, Trajectory
from thinktree.trainer.algos.batching import PromptIds, token_logprobs

log = logging.getLogger("thinktree")

__all__ = ["GENERAL_TEXT", "bits_per_char", "forgetting_report", "freeze_reference_traces", "general_text_nll",
           "greedy_solutions", "health_metrics", "load_general_text", "policy_drift", "retained_accuracy",
           "snapshot_reference"]  # fmt: skip

GENERAL_TEXT = Path(__file__).with_name("data") / "general_text.txt"
"""The fixed general-English text of the forgetting NLL (33 short original paragraphs, ~16 KB of ASCII)."""
ADAPTER = "adapter"
"""``reference=ADAPTER``: the LoRA policy with its adapter disabled."""
_LN2 = math.log(2.0)


@dataclasses.dataclass
class _Seq:
    """One scored sequence: context ids (not scored), target ids (scored) and the target's characters."""

    context: list[int]
    target: list[int]
    chars: int


# ------------------------------------------------------------------------------------------------ scoring core
def _is_peft(model: Any) -> bool:
    peft = sys.modules.get("peft")  # a PeftModel exists only if peft was imported
    return peft is not None and isinstance(model, peft.PeftModel)


def _device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


@contextlib.contextmanager
def _inference(*models: Any) -> Iterator[None]:
    """Eval mode and inference mode for the call; each model's training flag restored after."""
    mods = [m for m in models if isinstance(m, torch.nn.Module)]
    flags = [m.training for m in mods]
    for m in mods:
        m.eval()
    try:
        with torch.inference_mode():
            yield
    finally:
        for m, flag in zip(mods, flags):
            m.train(flag)


def _window_logits(model: Any, ids: torch.Tensor, att: torch.Tensor, keep: int) -> torch.Tensor:
    """Float32 logits at the last ``keep`` positions but one, ``[B, keep - 1, V]`` on ``ids``' device (they predict
    ``ids[:, -keep + 1:]``); the model runs on its own device."""
    device = _device(model)
    base = model.get_base_model() if _is_peft(model) else model
    kw: dict[str, Any] = {"input_ids": ids.to(device), "attention_mask": att.to(device), "use_cache": False}
    if "logits_to_keep" in inspect.signature(base.forward).parameters:
        kw["logits_to_keep"] = keep
    logits = model(**kw).logits[:, -keep:]
    return logits[:, :-1].float().to(ids.device)


def _collate(batch: list[_Seq], pad_id: int, device: torch.device) -> tuple[torch.Tensor, ...]:
    """Right-padded ids, attention mask, window targets ``[B, W]`` and target mask ``[B, W]`` on ``device``; the
    window starts at the shortest context's last token (``start``), so ``W = L - 1 - start``."""
    seqs = [s.context + s.target for s in batch]
    length = max(len(s) for s in seqs)
    start = min(len(s.context) for s in batch) - 1
    ids = torch.full((len(batch), length), pad_id, dtype=torch.long)
    att = torch.zeros((len(batch), length), dtype=torch.long)
    mask = torch.zeros((len(batch), length - 1 - start), dtype=torch.bool)
    for b, (s, seq) in enumerate(zip(batch, seqs)):
        ids[b, : len(seq)] = torch.tensor(seq)
        att[b, : len(seq)] = 1
        lo = len(s.context) - 1 - start
        mask[b, lo : lo + len(s.target)] = True
    return ids.to(device), att.to(device), ids[:, start + 1 :].to(device), mask.to(device)


def _score(
    model: Any, seqs: list[_Seq], pad_id: int, batch_size: int, *, drift: bool = False, reference: Any = None
) -> dict[str, float]:
    """Sums over all target tokens of the NLL (nats); with ``drift`` also the entropy and, given a reference,
    KL(policy || reference) (nats), exact over the vocabulary."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    seqs = sorted((s for s in seqs if s.target), key=lambda s: len(s.context) + len(s.target))
    tot = {"nll": 0.0, "kl": 0.0, "entropy": 0.0, "tokens": 0, "chars": 0, "sequences": len(seqs)}
    device = _device(model)
    with _inference(model, reference):
        for lo in range(0, len(seqs), batch_size):
            batch = seqs[lo : lo + batch_size]
            ids, att, targets, mask = _collate(batch, pad_id, device)
            keep = targets.shape[1] + 1
            logits = _window_logits(model, ids, att, keep)
            tot["nll"] -= token_logprobs(logits, targets)[mask].double().sum().item()
            tot["tokens"] += int(mask.sum())
            tot["chars"] += sum(s.chars for s in batch)
            if not drift:
                continue
            ref_logits = None
            if isinstance(reference, str):  # ADAPTER
                with model.disable_adapter():
                    ref_logits = _window_logits(model, ids, att, keep)
            elif reference is not None:
                ref_logits = _window_logits(reference, ids, att, keep)
            for b in range(len(batch)):  # one row at a time bounds the [W, V] temporaries
                lp = torch.log_softmax(logits[b][mask[b]], dim=-1)
                p = lp.exp()
                tot["entropy"] -= (p * lp).sum(-1).double().sum().item()
                if ref_logits is not None:
                    lq = torch.log_softmax(ref_logits[b][mask[b]], dim=-1)
                    tot["kl"] += (p * (lp - lq)).sum(-1).double().sum().item()
    return tot


def _rates(tot: Mapping[str, float]) -> dict[str, float]:
    bits = tot["nll"] / _LN2
    return {
        "bits_per_char": bits / tot["chars"] if tot["chars"] else math.nan,
        "bits_per_token": bits / tot["tokens"] if tot["tokens"] else math.nan,
        "nll_bits": bits,
        "chars": int(tot["chars"]),
        "tokens": int(tot["tokens"]),
        "sequences": int(tot["sequences"]),
    }


def _encode(tokenizer: Any, prompts: Sequence[str], completions: Sequence[str]) -> list[_Seq]:
    if len(prompts) != len(completions):
        raise ValueError(f"{len(prompts)} prompts but {len(completions)} completions")
    context = PromptIds(tokenizer)
    return [
        _Seq(context(p), [int(t) for t in tokenizer(c, add_special_tokens=False)["input_ids"]], len(c))
        for p, c in zip(prompts, completions)
    ]


def _pad_id(tokenizer: Any) -> int:
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return int(pad or 0)


# ------------------------------------------------------------------------------------------ public metrics
def bits_per_char(
    model: Any, tokenizer: Any, prompts: Sequence[str], completions: Sequence[str], batch_size: int = 16
) -> dict[str, float]:
    """Teacher-forced code length of each completion given its prompt: bits per character and per token.

    Returns ``bits_per_char``, ``bits_per_token`` (NaN when there is nothing to score), ``nll_bits`` (total),
    ``chars``, ``tokens`` and ``sequences`` (empty completions are skipped). Prompt ids as the search backend makes
    them (no special tokens, BOS iff the tokenizer adds one); completion tokenized on its own, no EOS.
    """
    seqs = _encode(tokenizer, prompts, completions)
    return _rates(_score(model, seqs, _pad_id(tokenizer), batch_size))


def policy_drift(
    model: Any, tokenizer: Any, prompts: Sequence[str], completions: Sequence[str], reference: Any = None,
    batch_size: int = 16,
) -> dict[str, float]:  # fmt: skip
    """:func:`bits_per_char` of ``completions`` plus mean per-token ``kl`` (to ``reference``) and ``entropy`` (nats).

    ``reference``: a frozen model (e.g. :func:`snapshot_reference`), ``ADAPTER`` (the LoRA policy with its adapter
    disabled), or None: ``ADAPTER`` for a LoRA policy, else no KL (``kl`` is NaN; ``entropy`` is still computed).
    """
    if reference is None or (isinstance(reference, str) and reference == ADAPTER):
        if _is_peft(model):
            reference = ADAPTER
        elif reference == ADAPTER:
            raise ValueError("reference='adapter' needs a LoRA (peft) policy")
    seqs = _encode(tokenizer, prompts, completions)
    tot = _score(model, seqs, _pad_id(tokenizer), batch_size, drift=True, reference=reference)
    out = _rates(tot)
    n = tot["tokens"]
    out["kl"] = tot["kl"] / n if n and reference is not None else float("nan")
    out["entropy"] = tot["entropy"] / n if n else float("nan")
    return out


def load_general_text(
    tokenizer: Any, max_tokens: int = 256, path: str | os.PathLike = GENERAL_TEXT
) -> list[str]:
    """The general text as chunks of at most ``max_tokens`` tokens: paragraphs packed greedily by words."""
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")

    def count(text: str) -> int:
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    chunks: list[str] = []
    for para in Path(path).read_text(encoding="utf-8").split("\n\n"):
        cur = ""
        for word in para.split():
            cand = f"{cur} {word}" if cur else word
            if cur and count(cand) > max_tokens:
                chunks.append(cur)
                cur = word
            else:
                cur = cand
            while count(cur) > max_tokens:  # one word longer than a chunk: cut it by tokens
                ids = tokenizer(cur, add_special_tokens=False)["input_ids"]
                chunks.append(tokenizer.decode(ids[:max_tokens]))
                cur = tokenizer.decode(ids[max_tokens:])
        if cur:
            chunks.append(cur)
    return chunks


def general_text_nll(
    model: Any, tokenizer: Any, chunks: Sequence[str], batch_size: int = 16
) -> dict[str, float]:
    """Bits per char / token of each chunk scored after one BOS token (EOS when the tokenizer has no BOS)."""
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if start is None:
        raise ValueError("the tokenizer has neither BOS nor EOS to start a general-text chunk with")
    seqs = [
        _Seq([int(start)], [int(t) for t in tokenizer(c, add_special_tokens=False)["input_ids"]], len(c))
        for c in chunks
    ]
    return _rates(_score(model, seqs, _pad_id(tokenizer), batch_size))


def snapshot_reference(
    source: Any, *, device: str | torch.device = "cpu", **load_kwargs: Any
) -> torch.nn.Module:
    """A frozen (eval, no grad) copy of the round-0 policy on ``device``, LoRA merged in.

    ``source``: the live model (deep-copied: briefly two copies on its device) or a checkpoint directory / spec,
    loaded with :func:`~thinktree.trainer.models.load_policy` and ``load_kwargs`` (seed, tiny_sizes, dtype).
    """
    if isinstance(source, (str, os.PathLike)):
        from thinktree.trainer.models import load_policy

        ref, _ = load_policy(source, device=None, padding_side=None, **load_kwargs)
    else:
        ref = copy.deepcopy(source)
    if _is_peft(ref):
        ref = ref.merge_and_unload()
    ref = ref.to(device).eval()
    ref.requires_grad_(False)
    return ref


# --------------------------------------------------------------------------------- greedy, retained, traces
def _search_cfg(cfg: Any) -> Any:
    """A ``SearchConfig`` from a SearchConfig or a RecipeConfig (whose ``eval.max_depth`` then applies)."""
    if hasattr(cfg, "search"):
        depth = cfg.eval.max_depth
        return cfg.search if depth is None else dataclasses.replace(cfg.search, max_depth=depth)
    return cfg


def greedy_solutions(
    model: Any, tokenizer: Any, task: Any, prompts: Sequence[Trajectory], search_cfg: Any, seed: int = 0
) -> tuple[list[tuple[str, str]], dict[str, Any]]:
    """One greedy pass (temperature 0, the search backend): ``(prompt, completion)`` pairs and their summary."""
    from thinktree.trainer.searching import make_outcome_fn, make_proposer, run_method, summarize

    cfg = _search_cfg(search_cfg)
    proposer = make_proposer(model, tokenizer, cfg, 0.0)
    start = time.perf_counter()
    results = run_method(
        "greedy", prompts, proposer, make_outcome_fn(task), cfg, np.random.default_rng(seed),
        answer_fn=task.extract_answer,
    )  # fmt: skip
    pairs = [(p.prompt, r.completion) for p, r in zip(prompts, results)]
    return pairs, summarize(results, wall_s=time.perf_counter() - start)


def retained_accuracy(
    model: Any, tokenizer: Any, task_name: str, task_kwargs: Mapping[str, Any] | None, n: int, seed: int,
    search_cfg: Any, *, split: str = "test", use_chat_template: bool = False,
) -> dict[str, Any]:  # fmt: skip
    """Greedy accuracy on ``n`` rows of a retained task, graded by that task's own verifier (``task.reward``)."""
    from thinktree.rewards import get_task
    from thinktree.trainer.searching import make_prompts

    task = get_task(task_name, **dict(task_kwargs or {}))
    rows = task.load(split, n=n, seed=seed)
    prompts = make_prompts(task, rows, tokenizer, use_chat_template)
    _, summary = greedy_solutions(model, tokenizer, task, prompts, search_cfg, seed)
    return {"task": task_name, **summary}


def freeze_reference_traces(
    path: str | os.PathLike, task: Any, prompts: Sequence[Trajectory], solutions: Sequence[str] | None = None,
    *, model: Any = None, tokenizer: Any = None, search_cfg: Any = None,
) -> list[dict[str, Any]]:  # fmt: skip
    """The held-out set of correct traces, written to ``path`` (JSON) on the first call and reloaded afterwards.

    ``solutions``: reference solutions, one per prompt (e.g. arith's ``solution`` column); without them, the
    model's greedy solutions (round 0). Either way only those the task's verifier accepts are kept.
    """
    from thinktree.trainer.outputs import write_json_atomic
    from thinktree.trainer.searching import make_outcome_fn

    path = Path(path)
    if path.exists():
        return list(json.loads(path.read_text())["traces"])
    source = "solution"
    if solutions is None:
        if model is None or tokenizer is None or search_cfg is None:
            raise ValueError("no reference solutions: pass model, tokenizer and search_cfg for greedy traces")
        solutions = [c for _, c in greedy_solutions(model, tokenizer, task, prompts, search_cfg)[0]]
        source = "greedy"
    if len(solutions) != len(prompts):
        raise ValueError(f"{len(prompts)} prompts but {len(solutions)} solutions")
    trajs = [Trajectory(p.prompt, (StepRecord(text=s),), p.key, p.meta) for p, s in zip(prompts, solutions)]
    rewards = make_outcome_fn(task)(trajs)
    traces = [
        {"key": t.key, "prompt": t.prompt, "completion": t.completion}
        for t, r in zip(trajs, rewards)
        if (r or 0.0) >= 0.5
    ]
    record = {"task": task.name, "source": source, "num_prompts": len(prompts), "traces": traces}
    write_json_atomic(path, record)
    log.info("health: froze %d/%d correct %s traces to %s", len(traces), len(prompts), source, path)
    return traces


# ------------------------------------------------------------------------------------------------ the round
def _as_pairs(items: Any) -> tuple[list[str], list[str]]:
    """Prompts and completions from ``(prompt, completion)`` tuples or ``{"prompt", "completion"}`` dicts."""
    pairs = [(x["prompt"], x["completion"]) if isinstance(x, Mapping) else tuple(x) for x in items or ()]
    return [p for p, _ in pairs], [c for _, c in pairs]


def health_metrics(
    model: Any, tokenizer: Any, *, reference: Any = None, traces: Any = (), own_solutions: Any = None,
    general_text_chunks: Sequence[str] | None = None, retained: Mapping[str, Any] | None = None, task: Any = None,
    prompts: Sequence[Trajectory] | None = None, search_cfg: Any = None, batch_size: int = 16,
) -> dict[str, float]:  # fmt: skip
    """All health metrics of one round, namespaced ``health/...`` (a metric with nothing to measure is left out).

    ``traces``: the fixed correct traces (:func:`freeze_reference_traces`); ``own_solutions``: the policy's greedy
    ``(prompt, completion)`` pairs on the held-out prompts, or None to run one greedy pass over ``prompts`` with
    ``task`` and ``search_cfg``; ``reference``: see :func:`policy_drift`; ``retained``: keyword arguments of
    :func:`retained_accuracy` (task_name, task_kwargs, n, seed, search_cfg).
    """
    start = time.perf_counter()
    out: dict[str, float] = {}
    ref_p, ref_c = _as_pairs(traces)
    if ref_p:
        r = bits_per_char(model, tokenizer, ref_p, ref_c, batch_size)
        if r["tokens"]:
            out["health/bits_per_char_ref"] = r["bits_per_char"]
            out["health/bits_per_token_ref"] = r["bits_per_token"]
    if own_solutions is None and prompts is not None and task is not None and search_cfg is not None:
        own_solutions, _ = greedy_solutions(model, tokenizer, task, prompts, search_cfg)
    own_p, own_c = _as_pairs(own_solutions)
    if own_p:
        d = policy_drift(model, tokenizer, own_p, own_c, reference, batch_size)
        if d["tokens"]:
            out["health/bits_per_char_own"] = d["bits_per_char"]
            out["health/entropy"] = d["entropy"]
            if not math.isnan(d["kl"]):
                out["health/kl_from_round0"] = d["kl"]
    if general_text_chunks:
        out["health/general_nll_bits_per_char"] = general_text_nll(
            model, tokenizer, general_text_chunks, batch_size
        )["bits_per_char"]
    if retained is not None:
        out["health/retained_accuracy"] = retained_accuracy(model, tokenizer, **retained)["accuracy"]
    out["health/time_s"] = time.perf_counter() - start
    return out


def forgetting_report(
    current: Mapping[str, float], round0: Mapping[str, float], threshold: float = 5.0
) -> dict[str, float | bool]:
    """Deltas of the health metrics against round 0; ``health/forgetting_warn`` = retained accuracy fell by more
    than ``threshold`` points (accuracy x 100)."""
    out: dict[str, float] = {}
    for key in ("bits_per_char_ref", "bits_per_char_own", "general_nll_bits_per_char"):
        a, b = current.get(f"health/{key}"), round0.get(f"health/{key}")
        if a is not None and b is not None:
            out[f"health/{key}_delta"] = float(a) - float(b)
    drop = 0.0
    a, b = current.get("health/retained_accuracy"), round0.get("health/retained_accuracy")
    if a is not None and b is not None:
        out["health/retained_accuracy_delta_pts"] = 100.0 * (float(a) - float(b))
        drop = -out["health/retained_accuracy_delta_pts"]
    out["health/forgetting_warn"] = bool(drop > threshold)
    if drop > threshold:
        log.warning(
            "health: retained accuracy fell %.1f points since round 0 (%.3f -> %.3f; threshold %.1f)",
            drop, b, a, threshold,
        )  # fmt: skip
    return out
