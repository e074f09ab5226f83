"""Supervised fine-tuning (warm start and SFT rounds) through TRL's ``SFTTrainer``.

Data is TRL's prompt-completion format (``prompt``, ``completion``); the loss is on completion tokens only, EOS is
appended by TRL. Nothing here is hand-written beyond choosing CPU-safe defaults (TRL defaults to bf16, which raises
on a CPU) and turning our config into an ``SFTConfig``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from datasets import Dataset
from transformers import PreTrainedModel, PreTrainedTokenizerBase
from trl import SFTConfig, SFTTrainer

__all__ = ["SFTSettings", "train_sft"]


@dataclass
class SFTSettings:
    steps: int = 300
    """Optimiser steps (ignored when `epochs` is set)."""
    epochs: float | None = None
    """Train this many epochs instead of a fixed number of steps."""
    learning_rate: float = 1e-3
    """Peak learning rate (cosine schedule with 5% warm-up)."""
    per_device_batch_size: int = 32
    """Sequences per device per micro-batch."""
    grad_accum: int = 1
    """Gradient accumulation steps."""
    max_grad_norm: float = 1.0
    """Gradient clipping norm."""
    seed: int = 0
    """Seed of data order and dropout."""
    report_to: tuple[str, ...] = ()
    """TRL/transformers report_to integrations (tensorboard, wandb)."""


def _precision() -> dict:
    if torch.cuda.is_available():
        return {"bf16": torch.cuda.is_bf16_supported(), "fp16": False, "use_cpu": False}
    return {"bf16": False, "fp16": False, "use_cpu": True}


def train_sft(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    dataset: Dataset,
    settings: SFTSettings,
    output_dir: str | os.PathLike,
) -> dict:
    """Fine-tune ``model`` in place on a prompt-completion dataset; returns TRL's final training metrics."""
    missing = {"prompt", "completion"} - set(dataset.column_names)
    if missing:
        raise ValueError(f"SFT dataset lacks columns {sorted(missing)}; has {dataset.column_names}")
    steps = {"num_train_epochs": settings.epochs} if settings.epochs else {"max_steps": settings.steps}
    args = SFTConfig(
        output_dir=str(output_dir),
        per_device_train_batch_size=settings.per_device_batch_size,
        gradient_accumulation_steps=settings.grad_accum,
        learning_rate=settings.learning_rate,
        lr_scheduler_type="cosine",
        warmup_steps=0.05,
        max_grad_norm=settings.max_grad_norm,
        logging_steps=25,
        save_strategy="no",
        report_to=list(settings.report_to) or "none",
        completion_only_loss=True,
        seed=settings.seed,
        data_seed=settings.seed,
        dataloader_num_workers=0,
        disable_tqdm=False,
        **steps,
        **_precision(),
    )
    trainer = SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer)
    result = trainer.train()
    model.eval()
    return dict(result.metrics)
