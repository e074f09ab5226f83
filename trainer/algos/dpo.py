"""Step-level DPO on MCTS step pairs, through TRL's ``DPOTrainer``.

What it does. :func:`train_dpo` fine-tunes a policy on preference pairs of *sibling reasoning steps*, as
:func:`thinktree.trainer.signals.pairs.step_pairs` compiles them from search trees: ``prompt`` is the question plus
the shared prefix of steps, ``chosen`` / ``rejected`` are the higher- and lower-Q next steps, ``weight`` is the pair's
confidence. The loss is TRL's DPO loss (a per-pair ``loss_type``: ``sigmoid``, ``ipo``, ``robust``, ...) between the
policy and a frozen reference, on the step tokens only; each pair's loss is multiplied by its weight. This is the
step-level preference learning of MCTS-DPO (Xie et al., 2024, "Monte Carlo Tree Search Boosts Reasoning via
Iterative Preference Learning", arXiv:2405.00451) and Step-DPO (Lai et al., 2024, "Step-DPO: Step-wise Preference
Optimization for Long-chain Reasoning of LLMs", arXiv:2406.18629).

Reference model.
- LoRA (``model`` is a ``peft.PeftModel``): no second model. TRL freezes a copy of the *adapter* at the start of
  training as adapter ``"ref"`` and computes the reference with it (``lora_reference="start"``, the iterative-DPO
  choice: the reference is the policy this round starts from; for a freshly initialised LoRA, whose B matrices are
  zero, this is exactly the base model), or the reference is the base model with adapters disabled
  (``lora_reference="base"``). The ``"ref"`` adapter is removed again when :func:`train_dpo` returns.
- Full fine-tuning: a frozen in-memory copy of ``model`` (``copy.deepcopy``) unless ``ref_model`` is given. TRL's own
  default would reload the reference from ``model.config._name_or_path``, which is wrong for a policy trained in
  memory (and impossible for a ``tiny:`` model).

Step texts get no EOS by default. TRL appends EOS to ``chosen`` and ``rejected``; for a step in the middle of a solution that
would compare (and train) "stop after this step". With ``append_eos=False`` (default) the appended EOS is removed
after TRL's tokenisation, so only the step's own tokens are scored; a text that already ends with EOS keeps it.

Why a subclass for the weights. TRL 1.16 has no per-example weight column: ``DPOConfig.use_weighting`` is WPO
(Zhou et al., 2024), whose weight is computed from the policy's own probabilities, and unknown dataset columns are
dropped before batching (``remove_unused_columns``, keyed on ``_signature_columns``) and would otherwise be passed to
``model.forward``. :class:`WeightedDPOTrainer` keeps the ``weight`` column through preprocessing (signature columns),
adds it to each batch (collator), takes it out before the forward (``compute_loss``) and multiplies each pair's loss
by it at the one per-pair point of TRL's ``_compute_loss``, WPO's ``per_sequence_loss *= w_chosen * w_rejected``
with ``w_row = exp(mean over the row's completion tokens of (log_probs - log_sum_sq_probs))``: a forward hook on the
policy sets ``log_sum_sq_probs = log_probs.detach() - c_row`` with ``c = log(weight)`` on the chosen row and ``0`` on
the rejected row, so TRL's own code computes ``per_sequence_loss * weight``, in value and in gradient. Copying TRL's 300-line loss to change one line would not follow TRL's fixes; the weight tests in
``tests/test_dpo.py`` pin this behaviour against per-pair losses. Consequences: WPO cannot be combined with pair
weights, and with weights these loss types are refused (``ValueError``): ``aot`` / ``aot_unpaired`` (they sort pairs
within a batch, so a weight would land on another pair), ``hinge`` and ``sft`` (TRL 1.16's weighting multiplies their
per-pair loss in place, which fails in the backward / on ``sft``'s expanded batch mean: a TRL bug that hits WPO too).
Checked against per-pair losses: ``sigmoid``, ``ipo``, ``robust`` (in the tests) and ``bco_pair``, ``nca_pair``,
``sppo_hard``, ``apo_zero``, ``apo_down``, ``discopop``, ``sigmoid_norm``, ``exo_pair`` (by hand, TRL 1.16).

Weight normalisation: over the whole training set. :func:`prepare_pairs` divides the weights by their mean over all
pairs (so the mean weight is 1 and the learning rate keeps its meaning), then each batch's loss is
``mean_i(w_i * loss_i)``. Normalising per batch instead would give a batch of low-confidence pairs as much pull as a
batch of confident ones. A weight-0 pair contributes exactly no gradient; for one batch holding every pair the loss
is the weighted mean ``sum(w_i * loss_i) / sum(w_i)``. Weights must be finite, >= 0 and not all 0.

How to run::

    from thinktree.trainer.algos.dpo import DPOSettings, train_dpo
    from thinktree.trainer.models import load_policy
    from thinktree.trainer.signals.pairs import step_pairs

    model, tokenizer = load_policy("tiny:llama", lora={"r": 8})
    metrics = train_dpo(model, tokenizer, step_pairs(trees), DPOSettings(steps=200), "runs/dpo")

:func:`train_dpo` is CPU-safe (``use_cpu`` without CUDA, no bf16, no gradient checkpointing) and runs in one
process. For DDP / DeepSpeed build a :class:`WeightedDPOTrainer` with your own ``DPOConfig`` (on CPU, per the shared
``docs/cpu-stack.md``: ``PartialState(backend="gloo")`` first, ``accelerator_config={"use_configured_state": True}``,
``use_cpu=False``); that path is untested here. Like every TRL preference trainer it sets dropout to 0 in the model
(``disable_dropout``).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import logging
import math
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, Literal

import torch
from datasets import Dataset
from transformers import PreTrainedModel, PreTrainedTokenizerBase
from trl import DPOConfig, DPOTrainer

from .sft import _precision

__all__ = ["DPOSettings", "WeightedDPOTrainer", "build_dpo_trainer", "prepare_pairs", "train_dpo"]

logger = logging.getLogger(__name__)

PAIR_COLUMNS = ("prompt", "chosen", "rejected")
WEIGHT_COLUMN = "weight"
# log-weight of a weight-0 pair: exp() of it is exactly 0 in float32, so the pair's loss is multiplied by 0, not ~1e-30
_ZERO_LOG_WEIGHT = -1.0e4
_UNWEIGHTABLE = {  # loss types TRL 1.16 cannot weight per pair, and why
    "aot": "it sorts the pairs of a batch, so a weight would land on another pair",
    "aot_unpaired": "it sorts the pairs of a batch, so a weight would land on another pair",
    "hinge": "TRL multiplies its relu output in place, which breaks the backward",
    "sft": "it is one batch-level mean and TRL's in-place multiply fails on it",
}
_EOS_FLAGS = ("_chosen_had_eos", "_rejected_had_eos")
# transformers 5 renamed gradient_checkpointing (a deprecated alias that warns when set, as TRL's default does)
_CHECKPOINTING = next(
    (f.name for f in dataclasses.fields(DPOConfig) if f.name == "activation_checkpointing"),
    "gradient_checkpointing",
)


@dataclasses.dataclass
class DPOSettings:
    beta: float = 0.1
    """DPO β (for ``ipo``: τ): strength of the pull towards the reference."""
    label_smoothing: float = 0.0
    """Label-noise ε of the ``robust`` and ``exo_pair`` losses (``exo_pair`` needs > 0, e.g. 1e-3)."""
    loss_type: str | tuple[str, ...] = "sigmoid"
    """TRL loss name(s): sigmoid (DPO), ipo, hinge, robust, bco_pair, sppo_hard, nca_pair, apo_zero, ..."""
    learning_rate: float = 5e-6
    """Peak learning rate (cosine schedule with warm-up); LoRA usually wants ~10x more."""
    steps: int = 100
    """Optimiser steps (ignored when `epochs` is set)."""
    epochs: float | None = None
    """Train this many epochs instead of a fixed number of steps."""
    per_device_batch_size: int = 8
    """Pairs per device per micro-batch (each pair is two sequences)."""
    grad_accum: int = 1
    """Gradient accumulation steps."""
    max_grad_norm: float = 1.0
    """Gradient clipping norm."""
    warmup_ratio: float = 0.05
    """Fraction of the steps spent warming the learning rate up."""
    seed: int = 0
    """Seed of data order (and of TRL's `set_seed`)."""
    use_weights: bool = True
    """Multiply each pair's loss by its `weight` column (normalised to mean 1 over the pairs); False: unweighted."""
    max_length: int | None = 1024
    """Truncate prompt+step to this many tokens (keeping the start); TRL drops pairs whose prompt alone fills it."""
    append_eos: bool = False
    """Keep TRL's EOS after each chosen/rejected step (off: steps are mid-solution continuations)."""
    lora_reference: Literal["start", "base"] = "start"
    """LoRA reference: the adapter as it was when training started, or the base model (adapters disabled)."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward (TRL's default is on; off is faster for small models)."""
    logging_steps: int = 10
    """Log TRL's metrics every this many steps."""
    report_to: tuple[str, ...] = ()
    """TRL/transformers report_to integrations (tensorboard, wandb)."""


# ------------------------------------------------------------------------------------------------------- the pairs
def prepare_pairs(pairs: Dataset | Sequence[Mapping[str, Any]], use_weights: bool = True) -> Dataset:
    """Validate preference pairs and return a ``Dataset`` of ``prompt, chosen, rejected`` (+ normalised ``weight``).

    Raises ``ValueError`` for no pairs, missing columns, non-string or empty texts, and (with ``use_weights``) weights
    that are not finite, negative, or all zero. Weights are divided by their mean (see the module doc).
    """
    columns = [*PAIR_COLUMNS, WEIGHT_COLUMN] if use_weights else list(PAIR_COLUMNS)
    if isinstance(pairs, Dataset):
        have = set(pairs.column_names)
        dataset = pairs
    elif isinstance(pairs, Sequence) and not isinstance(pairs, (str, bytes)):
        bad = [i for i, p in enumerate(pairs) if not isinstance(p, Mapping)]
        if bad:
            raise ValueError(
                f"preference pairs must be mappings; item {bad[0]} is {type(pairs[bad[0]]).__name__}"
            )
        have = set.intersection(*(set(p) for p in pairs)) if pairs else set(columns)
        dataset = None
    else:
        raise TypeError(f"pairs must be a datasets.Dataset or a list of dicts, got {type(pairs).__name__}")
    if len(pairs) == 0:
        raise ValueError("no preference pairs to train on (empty pair list)")
    missing = [c for c in columns if c not in have]
    if missing:
        hint = " (or set use_weights=False)" if missing == [WEIGHT_COLUMN] else ""
        raise ValueError(f"preference pairs lack columns {missing}{hint}; need {columns}")
    if dataset is None:
        dataset = Dataset.from_list([{c: p[c] for c in columns} for p in pairs])  # type: ignore[index]
    else:
        dataset = dataset.select_columns(columns)
    _check_texts(dataset)
    if use_weights:
        weights = _normalised_weights(dataset[WEIGHT_COLUMN])
        dataset = dataset.remove_columns(WEIGHT_COLUMN).add_column(WEIGHT_COLUMN, weights)
    return dataset


def _check_texts(dataset: Dataset) -> None:
    for column in PAIR_COLUMNS:
        for i, text in enumerate(dataset[column]):
            if not isinstance(text, str) or (column != "prompt" and not text):
                kind = "a string" if column == "prompt" else "a non-empty string"
                raise ValueError(f"pair {i}: {column!r} must be {kind}, got {text!r:.60}")


def _normalised_weights(raw: Sequence[Any]) -> list[float]:
    weights: list[float] = []
    for i, w in enumerate(raw):
        try:
            value = float(w)
        except (TypeError, ValueError):
            raise ValueError(f"pair {i}: weight must be a number, got {w!r}") from None
        if not math.isfinite(value) or value < 0:
            raise ValueError(f"pair {i}: weight must be finite and >= 0, got {w!r}")
        weights.append(value)
    mean = sum(weights) / len(weights)
    if mean <= 0:
        raise ValueError("every pair has weight 0: nothing to learn (or set use_weights=False)")
    return [w / mean for w in weights]


# ----------------------------------------------------------------------------------------------------- the trainer
class _AddWeights:
    """Collator wrapper: TRL's batch plus a float tensor of the examples' weights."""

    def __init__(self, collator: Callable[[list[dict]], dict], column: str) -> None:
        self.collator, self.column = collator, column

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        if any(self.column not in e for e in examples):
            raise ValueError(f"weighted DPO: an example has no {self.column!r} column")
        batch = self.collator(examples)
        batch[self.column] = torch.tensor([float(e[self.column]) for e in examples], dtype=torch.float32)
        return batch


class WeightedDPOTrainer(DPOTrainer):
    """TRL's ``DPOTrainer`` with each pair's loss multiplied by the dataset column ``weight_column``.

    ``weight_column=None`` is plain ``DPOTrainer``. The column is used as given (:func:`prepare_pairs` normalises
    it). With a weight column, ``args.use_weighting`` is set to True: in this class it means "weight by the column"
    and replaces WPO (see the module doc for how). ``append_eos=False`` removes the EOS that TRL appends to
    ``chosen`` / ``rejected`` texts that did not end with it. Call :meth:`remove_weight_hook` when done.
    """

    def __init__(
        self,
        model: PreTrainedModel,
        ref_model: PreTrainedModel | None = None,
        args: DPOConfig | None = None,
        *,
        weight_column: str | None = WEIGHT_COLUMN,
        append_eos: bool = True,
        **kwargs: Any,
    ) -> None:
        self.weight_column = weight_column
        self._append_eos = append_eos
        self._row_log_weights: torch.Tensor | None = None
        if weight_column is not None:
            if args is None:
                raise ValueError("WeightedDPOTrainer with a weight column needs a DPOConfig (args)")
            for loss_type in args.loss_type:
                if loss_type in _UNWEIGHTABLE:
                    raise ValueError(
                        f"loss_type {loss_type!r} cannot be weighted per pair: {_UNWEIGHTABLE[loss_type]}; "
                        "use another loss type or no weights (use_weights=False / weight_column=None)"
                    )
            args.use_weighting = True
        super().__init__(model, ref_model, args, **kwargs)
        self._hook = None
        if weight_column is not None:
            self.data_collator = _AddWeights(self.data_collator, weight_column)
            self._hook = self.model.register_forward_hook(self._weight_hook, with_kwargs=True)

    def remove_weight_hook(self) -> None:
        """Remove the forward hook this trainer put on the policy (idempotent)."""
        if self._hook is not None:
            self._hook.remove()
            self._hook = None

    def _set_signature_columns_if_needed(self) -> None:
        super()._set_signature_columns_if_needed()
        if self.weight_column is not None and self.weight_column not in self._signature_columns:
            self._signature_columns = [*self._signature_columns, self.weight_column]

    def _prepare_dataset(
        self, dataset: Any, processing_class: Any, args: DPOConfig, dataset_name: str
    ) -> Any:
        first = next(iter(dataset))
        text_only = all(isinstance(first.get(c), str) for c in PAIR_COLUMNS)
        if self._append_eos or not text_only:
            return super()._prepare_dataset(dataset, processing_class, args, dataset_name)
        eos = self._tokenizer.eos_token
        dataset = dataset.map(
            lambda e: {_EOS_FLAGS[0]: e["chosen"].endswith(eos), _EOS_FLAGS[1]: e["rejected"].endswith(eos)},
            desc=f"Noting EOS-ended steps of {dataset_name} dataset",
        )
        dataset = super()._prepare_dataset(dataset, processing_class, args, dataset_name)
        return dataset.map(
            _strip_appended_eos,
            fn_kwargs={"eos_id": self._tokenizer.eos_token_id},
            desc=f"Removing appended EOS from {dataset_name} dataset",
        )

    def _weight_hook(self, module: torch.nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        """Make TRL's WPO factor of each row ``exp(c_row)``: chosen row ``c = log w``, rejected row ``c = 0``."""
        row_log_w = self._row_log_weights
        if row_log_w is None or not kwargs.get("fused_lm_head", False):
            return None
        log_probs = output.log_probs
        if log_probs.size(0) != row_log_w.numel():
            raise RuntimeError(f"weight hook: {log_probs.size(0)} rows, {row_log_w.numel()} row weights")
        output.log_sum_sq_probs = log_probs.detach().float() - row_log_w.to(log_probs.device)[:, None]
        return output

    def compute_loss(
        self,
        model: torch.nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: Any = None,
    ) -> Any:
        if self.weight_column is None:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        inputs = dict(inputs)
        weights = inputs.pop(self.weight_column, None)
        if weights is None:
            raise ValueError(f"batch has no {self.weight_column!r} column")
        w = weights.float()
        log_w = torch.where(
            w > 0, w.clamp_min(torch.finfo(w.dtype).tiny).log(), torch.full_like(w, _ZERO_LOG_WEIGHT)
        )
        # the batch's rows are [chosen_1..n, rejected_1..n]: the weight goes on the chosen row, 1 on the rejected one
        self._row_log_weights = torch.cat([log_w, torch.zeros_like(log_w)])
        try:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        finally:
            self._row_log_weights = None

    def compute_ref_log_probs(self, model: torch.nn.Module, inputs: dict[str, Any]) -> Any:
        if self.weight_column is not None:
            inputs = {k: v for k, v in inputs.items() if k != self.weight_column}
        return super().compute_ref_log_probs(model, inputs)


def _strip_appended_eos(example: dict[str, Any], eos_id: int) -> dict[str, Any]:
    out = {}
    for ids, had_eos in (("chosen_ids", _EOS_FLAGS[0]), ("rejected_ids", _EOS_FLAGS[1])):
        tokens = example[ids]
        out[ids] = tokens[:-1] if not example[had_eos] and tokens and tokens[-1] == eos_id else tokens
    return out


# ------------------------------------------------------------------------------------------------------ entry points
def _is_peft(model: Any) -> bool:
    try:
        from peft import PeftModel
    except ImportError:  # pragma: no cover - peft is a dependency
        return False
    return isinstance(model, PeftModel)


def _dpo_config(settings: DPOSettings, output_dir: str | os.PathLike) -> DPOConfig:
    steps = {"num_train_epochs": settings.epochs} if settings.epochs else {"max_steps": settings.steps}
    loss_type = [settings.loss_type] if isinstance(settings.loss_type, str) else list(settings.loss_type)
    return DPOConfig(
        output_dir=str(output_dir),
        beta=settings.beta,
        label_smoothing=settings.label_smoothing,
        loss_type=loss_type,
        per_device_train_batch_size=settings.per_device_batch_size,
        gradient_accumulation_steps=settings.grad_accum,
        learning_rate=settings.learning_rate,
        lr_scheduler_type="cosine",
        warmup_steps=settings.warmup_ratio,
        max_grad_norm=settings.max_grad_norm,
        max_length=settings.max_length,
        **{_CHECKPOINTING: settings.gradient_checkpointing},
        use_weighting=settings.use_weights,
        logging_steps=settings.logging_steps,
        save_strategy="no",
        report_to=list(settings.report_to) or "none",
        seed=settings.seed,
        data_seed=settings.seed,
        dataloader_num_workers=0,
        **steps,
        **_precision(),
    )


def build_dpo_trainer(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    pairs: Dataset | Sequence[Mapping[str, Any]],
    settings: DPOSettings,
    output_dir: str | os.PathLike,
    ref_model: PreTrainedModel | None = None,
) -> WeightedDPOTrainer:
    """The :class:`WeightedDPOTrainer` that :func:`train_dpo` runs (validated pairs, reference chosen as documented).

    It leaves TRL's changes on ``model`` (fused LM-head forward, a ``"ref"`` adapter, the weight hook); prefer
    :func:`train_dpo`, which undoes them.
    """
    if settings.lora_reference not in ("start", "base"):
        raise ValueError(f"lora_reference must be 'start' or 'base', got {settings.lora_reference!r}")
    dataset = prepare_pairs(pairs, use_weights=settings.use_weights)
    peft = _is_peft(model)
    if ref_model is None and not peft:
        ref_model = copy.deepcopy(model).eval().requires_grad_(False)
    adapters = set(model.peft_config) if peft else set()
    trainer = WeightedDPOTrainer(
        model,
        ref_model,
        _dpo_config(settings, output_dir),
        weight_column=WEIGHT_COLUMN if settings.use_weights else None,
        append_eos=settings.append_eos,
        train_dataset=dataset,
        processing_class=tokenizer,
    )
    if peft and ref_model is None and settings.lora_reference == "base":
        for name in set(model.peft_config) - adapters:  # TRL's frozen "ref" copy of the adapter
            model.delete_adapter(name)
    dropped = len(dataset) - len(trainer.train_dataset)
    if dropped == len(dataset):
        trainer.remove_weight_hook()
        raise ValueError(f"every pair's prompt is at least max_length={settings.max_length} tokens long")
    if dropped:
        logger.warning(
            "DPO: %d of %d pairs dropped, their prompt fills max_length=%s",
            dropped,
            len(dataset),
            settings.max_length,
        )
    return trainer


@contextlib.contextmanager
def _restoring(model: PreTrainedModel) -> Iterator[None]:
    """Undo TRL's changes to ``model`` on exit: its fused-LM-head ``forward`` patch and the adapters it added."""
    peft = _is_peft(model)
    base = model.get_base_model() if peft else model
    had_forward, forward = "forward" in vars(base), vars(base).get("forward")
    adapters = set(model.peft_config) if peft else set()
    try:
        yield
    finally:
        if had_forward:
            base.forward = forward
        else:
            vars(base).pop("forward", None)
        for name in set(model.peft_config) - adapters if peft else ():
            model.delete_adapter(name)


def train_dpo(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    pairs: Dataset | Sequence[Mapping[str, Any]],
    settings: DPOSettings,
    output_dir: str | os.PathLike,
    ref_model: PreTrainedModel | None = None,
) -> dict[str, Any]:
    """Train ``model`` in place with (weighted) step-level DPO on ``pairs``; returns metrics.

    ``pairs``: ``step_pairs`` records or any ``prompt, chosen, rejected[, weight]`` records / ``Dataset``. The
    reference is ``ref_model`` if given, else as in the module doc. Metrics: TRL's final training metrics
    (``train_loss``, ``train_runtime``, ...), ``num_pairs``, ``num_pairs_used`` (after TRL drops over-long prompts)
    and the last logged DPO statistics (``rewards/margins``, ``rewards/accuracies``, ``logps/chosen``, ...).
    """
    # validated here too, so that bad input fails before the model is touched
    dataset = prepare_pairs(pairs, use_weights=settings.use_weights)
    with _restoring(model):
        trainer = build_dpo_trainer(model, tokenizer, dataset, settings, output_dir, ref_model)
        try:
            result = trainer.train()
        finally:
            trainer.remove_weight_hook()
    model.eval()
    metrics: dict[str, Any] = dict(result.metrics)
    metrics["num_pairs"] = len(dataset)
    metrics["num_pairs_used"] = len(trainer.train_dataset)
    logged = [entry for entry in trainer.state.log_history if "rewards/margins" in entry]
    if logged:
        metrics.update({k: v for k, v in logged[-1].items() if "/" in k})
    return metrics
