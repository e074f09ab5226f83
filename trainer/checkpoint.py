"""Resumable training checkpoints: a loadable model directory plus the full training state, written atomically.

Layout of ``<root>/checkpoint-<step:08d>/``::

    model/                 standard HF directory (full fine-tuning) or peft adapter directory (LoRA), loadable with
                           plain transformers / peft (and load_policy); value_head.safetensors beside it for PPO
    state/                 accelerator.save_state: model weights, optimizer (DeepSpeed: its sharded engine state),
                           RNG states of python / numpy / torch (/ cuda) per process
    trainer_state.pt       the LR scheduler, the engine's step counters and the algorithm's ``data_state`` (data
                           position, precomputed per-token arrays such as reference logprobs or PPO old values)
    trainer_state.json     a readable summary (step, counters, time)

Atomicity. Every rank writes into ``<root>/.checkpoint-<step>.partial`` (a hidden name, ignored by
:func:`latest_checkpoint`), the main process renames it to ``checkpoint-<step>`` only once everything is written,
and old checkpoints are first renamed to hidden ``.deleting-*`` names and then removed. A process killed at any moment
(SIGKILL included) therefore leaves only complete ``checkpoint-*`` directories plus hidden leftovers, which the next
save (or :func:`remove_leftovers`) removes. Files are not fsynced: a killed *process* loses nothing written to the page cache; a power cut may.

Resume. :func:`load_checkpoint` restores weights, optimiser, scheduler, RNG states and counters and returns the
``data_state``; with the deterministic step plan of :mod:`thinktree.trainer.algos.batching` a run killed and resumed
ends with the same weights as an uninterrupted one (``tests/test_resume.py``). In a multi-process run every rank
calls both functions (DeepSpeed saves and loads per-rank shards); ``root`` must be on a filesystem all ranks share.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from thinktree.trainer.models import save_policy

if TYPE_CHECKING:
    from thinktree.trainer.algos.engine import Engine

__all__ = [
    "retire",
    "latest_checkpoint",
    "list_checkpoints",
    "load_checkpoint",
    "remove_leftovers",
    "save_checkpoint",
    "save_model",
]

_NAME = re.compile(r"^checkpoint-(\d+)$")
FORMAT_VERSION = 1


def list_checkpoints(root: str | os.PathLike[str]) -> list[Path]:
    """Complete checkpoints under ``root``, oldest first."""
    base = Path(root)
    if not base.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in base.iterdir() if p.is_dir() and (m := _NAME.match(p.name))]
    return [p for _, p in sorted(found)]


def latest_checkpoint(root: str | os.PathLike[str]) -> Path | None:
    """The newest complete checkpoint under ``root`` (``None`` if there is none)."""
    found = list_checkpoints(root)
    return found[-1] if found else None


def save_model(engine: Engine, out_dir: str | os.PathLike[str], tokenizer: Any = None) -> Path:
    """Write the policy as a loadable HF / peft directory (+ ``value_head.safetensors``); every rank calls it."""
    from safetensors.torch import save_file

    from thinktree.trainer.algos.engine import is_zero3

    acc, out = engine.accelerator, Path(out_dir)
    wrapper = engine.wrapper
    full = acc.get_state_dict(engine.model) if is_zero3(acc) else None  # a collective under ZeRO-3
    if acc.is_main_process:
        if full is None:
            save_policy(wrapper.policy, tokenizer, out)
        else:
            policy_state = {k.removeprefix("policy."): v for k, v in full.items() if k.startswith("policy.")}
            out.mkdir(parents=True, exist_ok=True)
            wrapper.policy.save_pretrained(out, state_dict=policy_state)
            if tokenizer is not None:
                tokenizer.save_pretrained(out)
        if wrapper.v_head is not None:
            src = (
                full
                if full is not None
                else {f"v_head.{k}": v for k, v in wrapper.v_head.state_dict().items()}
            )
            head = {
                k.removeprefix("v_head."): v.detach().cpu().contiguous()
                for k, v in src.items()
                if k.startswith("v_head.")
            }
            save_file(head, str(out / "value_head.safetensors"))
    acc.wait_for_everyone()
    return out


def save_checkpoint(
    engine: Engine,
    root: str | os.PathLike[str],
    step: int,
    *,
    data_state: dict[str, Any] | None = None,
    tokenizer: Any = None,
    keep: int | None = None,
) -> Path:
    """Save a resumable checkpoint ``<root>/checkpoint-<step>`` atomically (see module doc); returns its path."""
    acc, base = engine.accelerator, Path(root)
    final, partial = base / f"checkpoint-{step:08d}", base / f".checkpoint-{step:08d}.partial"
    if acc.is_main_process:
        base.mkdir(parents=True, exist_ok=True)
        remove_leftovers(base)
        partial.mkdir()
    acc.wait_for_everyone()
    acc.save_state(str(partial / "state"))
    save_model(engine, partial / "model", tokenizer)
    if acc.is_main_process:
        state = {
            "version": FORMAT_VERSION,
            "step": step,
            "scheduler": engine.scheduler.state_dict(),
            "optimizer_steps": engine.optimizer_steps,
            "skipped_steps": engine.skipped_steps,
            "data_state": data_state or {},
        }
        torch.save(state, partial / "trainer_state.pt")
        summary = {k: state[k] for k in ("version", "step", "optimizer_steps", "skipped_steps")}
        (partial / "trainer_state.json").write_text(
            json.dumps({**summary, "time": time.time()}, indent=2) + "\n"
        )
        if final.exists():  # re-saving the same step (a resumed run): replace the old copy
            retire(final)
        os.rename(partial, final)
        if keep is not None and keep > 0:
            for old in list_checkpoints(base)[:-keep]:
                retire(old)
    acc.wait_for_everyone()
    return final


def load_checkpoint(engine: Engine, path: str | os.PathLike[str]) -> dict[str, Any]:
    """Restore weights, optimiser, scheduler, RNG states and counters from ``path``; returns its ``data_state``."""
    ckpt = Path(path)
    engine.accelerator.load_state(str(ckpt / "state"))
    state = torch.load(ckpt / "trainer_state.pt", map_location="cpu", weights_only=False)
    if state.get("version") != FORMAT_VERSION:
        raise ValueError(f"{ckpt}: checkpoint format {state.get('version')} is not {FORMAT_VERSION}")
    engine.scheduler.load_state_dict(state["scheduler"])
    engine.optimizer_steps = int(state["optimizer_steps"])
    engine.skipped_steps = int(state["skipped_steps"])
    return dict(state["data_state"])


def retire(path: Path) -> None:
    """Remove a directory without ever exposing it half-deleted under its own name."""
    hidden = path.parent / f".deleting-{path.name}-{uuid.uuid4().hex[:8]}"
    os.rename(path, hidden)
    shutil.rmtree(hidden, ignore_errors=True)


def remove_leftovers(root: str | os.PathLike[str]) -> None:
    """Remove what killed saves and removals left under ``root`` (hidden ``.checkpoint-*`` / ``.deleting-*``
    folders); every save does it, and a resumed run for roots it may not save into again. Call it only while no
    process writes a checkpoint there."""
    base = Path(root)
    if not base.is_dir():
        return
    for p in base.iterdir():
        if p.name.startswith((".checkpoint-", ".deleting-")) and p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
