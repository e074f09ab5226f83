"""The training engine shared by GRPO and PPO: accelerate/DeepSpeed/LoRA setup and one guarded optimiser step.

What it does
    ``Engine(model, tokenizer, cfg)`` wraps the policy (a ``PreTrainedModel`` or a peft ``PeftModel``; LoRA vs full
    fine-tuning is decided by what :func:`~thinktree.trainer.models.load_policy` returned) and, for PPO, a value head
    in one ``nn.Module`` (:class:`PolicyWithValue`) so that DDP and DeepSpeed see a single model, builds AdamW (or a
    given optimiser factory) and a ``transformers`` LR scheduler, and prepares model and optimiser with
    ``accelerate``. Devices and processes come from ``accelerate launch`` (configs in ``recipes/accelerate/``; CPU
    ones for tests in ``tests/dist/``). Without CUDA the process group is always gloo
    (``InitProcessGroupKwargs(backend="gloo")``: accelerate picks none on a CPU and DeepSpeed then believes it is
    alone). Mixed precision: bf16 on CUDA when supported, none on CPU (``train.mixed_precision``).

One optimiser step (:meth:`Engine.optimizer_step`)
    The rank's micro-batches run under ``accelerator.accumulate`` (``accelerator.step`` is reset at each window, so
    the boundary is always the last micro-batch). Algorithms give a loss function that returns each micro-batch's
    *contribution to the global-batch loss* (already divided by global token / sequence counts), so the accumulated
    gradient is the gradient of the whole step's loss however it is split over micro-batches and ranks; the engine
    multiplies by ``grad_accum × world_size`` to undo accelerate's 1/accum and DDP's/DeepSpeed's 1/world averaging.
    Clipping: ``accelerator.clip_grad_norm_`` (DeepSpeed: its own ``gradient_clipping``, set from
    ``max_grad_norm``). The LR scheduler is stepped here after each applied step, not through accelerate (whose
    wrapper steps it once per process).

Skipped steps
    A step is skipped, weights, optimiser and scheduler untouched, when (a) a per-token input (advantages, rewards
    folded into them, old/reference logprobs) is not finite, (b) a micro-batch loss is not finite, or (c) the gradient
    norm is not finite (DDP/single process; DeepSpeed checks (c) itself for fp16/bf16 and ZeRO-1/2 fp32). (a) and (b)
    are decided before any backward of the offending micro-batch and all-reduced so every rank agrees; gradients
    already accumulated in the window are discarded (DeepSpeed ZeRO: its partition buffers are cleared the way its
    own overflow path clears them). Counted in ``train/skipped_steps``.

Search with the live policy
    :func:`unwrap_for_generation` yields the bare policy for ``HFStepProposer`` (ZeRO-3: parameters gathered and
    DeepSpeed's hooks removed meanwhile, like TRL's ``unwrap_model_for_generation``; every rank must enter it).
    ``Engine.on_step_end`` callbacks run after every applied optimiser step, e.g. ``lambda e, m:
    proposer.clear_cache()``.

Why hand-written: TRL's trainers own their loop and take one scalar advantage per completion; tree signals need
per-token advantages, off-policy reuse of rollout logprobs and resumable mid-round checkpoints.
"""

from __future__ import annotations

import contextlib
import copy
import math
import os
from collections.abc import Callable, Iterator
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, InitProcessGroupKwargs
from torch import nn
from transformers import get_scheduler

from thinktree.trainer.config import TrainConfig

from .batching import Batch, PromptIds, collate, token_entropy, token_logprobs
from .packing import PackedBatch, packed_forward

__all__ = ["Engine", "ForwardOut", "PolicyWithValue", "is_peft", "make_accelerator", "unwrap_for_generation"]

LossFn = Callable[["ForwardOut", Batch], tuple[torch.Tensor, dict[str, torch.Tensor]]]
StepCallback = Callable[["Engine", dict[str, float]], None]


def is_peft(model: Any) -> bool:
    """True for a peft ``PeftModel`` (a LoRA policy)."""
    try:
        from peft import PeftModel
    except ImportError:  # pragma: no cover - peft is a dependency
        return False
    return isinstance(model, PeftModel)


class PolicyWithValue(nn.Module):
    """The policy plus an optional value head (``nn.Linear(hidden, 1)`` on the last hidden states, zero-initialised).

    The head shares the policy's backbone (PPO with a shared trunk: one model in memory, the value loss also trains
    the backbone / the LoRA adapters, scaled by ``vf_coef``). One module so DDP/DeepSpeed wrap it as one model.
    """

    def __init__(self, policy: nn.Module, value_head: bool = False) -> None:
        super().__init__()
        self.policy = policy
        self.v_head: nn.Linear | None = None
        if value_head:
            hidden = int(policy.config.hidden_size)
            self.v_head = nn.Linear(hidden, 1, dtype=torch.float32)
            nn.init.zeros_(self.v_head.weight)
            nn.init.zeros_(self.v_head.bias)
            self.v_head.to(next(policy.parameters()).device)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        logits_to_keep: int | torch.Tensor,
        values: bool = False,
        position_ids: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``logits_to_keep``: the last N positions, or (tree packing) a boolean ``[B, L]`` mask of positions."""
        out = self.policy(
            input_ids=input_ids,
            attention_mask=attention_mask,
            logits_to_keep=logits_to_keep,
            position_ids=position_ids,
            output_hidden_states=values,
            use_cache=False,
        )
        if not values:
            return out.logits, None
        if self.v_head is None:
            raise ValueError("values requested but this model has no value head")
        last = out.hidden_states[-1]
        keep = logits_to_keep
        hidden = (last[keep] if isinstance(keep, torch.Tensor) else last[:, -keep:]).float()
        return out.logits, self.v_head(hidden).squeeze(-1)


class ForwardOut:
    """Per-token outputs of one forward over a :class:`Batch` window (``[B, W]`` each)."""

    def __init__(self, logprobs: torch.Tensor, values: torch.Tensor | None, entropy: torch.Tensor | None):
        self.logprobs, self.values, self.entropy = logprobs, values, entropy


def _mixed_precision(choice: str) -> str:
    if choice != "auto":
        return choice
    if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return "bf16"
    return "no"


def make_accelerator(cfg: TrainConfig) -> Accelerator:
    """An ``Accelerator`` for ``cfg``: gloo when launched without CUDA, DeepSpeed config patched to ``cfg``.

    ``WORLD_SIZE`` is set by ``accelerate launch`` / ``torchrun``; a plain process has no process group to init.
    The DeepSpeed batch size, accumulation and clipping are overwritten with ``cfg``'s.
    """
    gloo = "WORLD_SIZE" in os.environ and not torch.cuda.is_available()
    handlers = [InitProcessGroupKwargs(backend="gloo")] if gloo else []
    acc = Accelerator(
        gradient_accumulation_steps=cfg.grad_accum,
        mixed_precision=_mixed_precision(cfg.mixed_precision),
        kwargs_handlers=handlers,
    )
    acc.gradient_accumulation_steps = cfg.grad_accum  # a launch config's value would override the argument
    if acc.num_processes > 1 and acc.distributed_type == DistributedType.NO:
        raise RuntimeError(
            f"{acc.num_processes} processes but accelerate's shared state says DistributedType.NO (no gradient "
            "synchronisation, no-op barriers): something created PartialState without cpu=True on a CPU machine"
        )
    if acc.distributed_type == DistributedType.DEEPSPEED:
        ds = acc.state.deepspeed_plugin.deepspeed_config
        ds["gradient_accumulation_steps"] = cfg.grad_accum
        ds["train_micro_batch_size_per_gpu"] = cfg.per_device_batch_size
        ds["train_batch_size"] = cfg.per_device_batch_size * cfg.grad_accum * acc.num_processes
        ds["gradient_clipping"] = cfg.max_grad_norm if cfg.max_grad_norm > 0 else 0.0
    return acc


def is_zero3(accelerator: Accelerator) -> bool:
    """True under DeepSpeed ZeRO stage 3."""
    if accelerator.distributed_type != DistributedType.DEEPSPEED:
        return False
    return accelerator.state.deepspeed_plugin.zero_stage == 3


def _base(model: nn.Module) -> nn.Module:
    return model.get_base_model() if is_peft(model) else model


def _checkpointing(model: nn.Module) -> bool:
    base = _base(model)
    if hasattr(type(base), "is_activation_checkpointing"):  # transformers >= 5.x; the old name warns
        return bool(base.is_activation_checkpointing)
    return bool(getattr(base, "is_gradient_checkpointing", False))


def set_checkpointing(model: nn.Module, on: bool) -> None:
    """Turn activation (gradient) checkpointing on (non-reentrant) or off, with either transformers API."""
    base = _base(model)
    if hasattr(base, "activation_checkpointing_enable") and on:
        base.activation_checkpointing_enable({"use_reentrant": False})
    elif hasattr(base, "activation_checkpointing_disable") and not on:
        base.activation_checkpointing_disable()
    elif on:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        base.gradient_checkpointing_disable()


@contextlib.contextmanager
def unwrap_for_generation(accelerator: Accelerator, model: nn.Module) -> Iterator[nn.Module]:
    """Yield the bare policy of a prepared model for generation/search (ZeRO-3: gathered; see module doc)."""
    wrapper = accelerator.unwrap_model(model)
    policy = getattr(wrapper, "policy", wrapper)
    checkpointing = _checkpointing(policy)
    if checkpointing:
        set_checkpointing(policy, False)
    try:
        if is_zero3(accelerator):
            import deepspeed
            from trl.models.utils import add_hooks, remove_hooks

            with deepspeed.zero.GatheredParameters(model.parameters()):
                remove_hooks(model)
                try:
                    yield policy
                finally:
                    add_hooks(model)
        else:
            yield policy
    finally:
        if checkpointing:
            set_checkpointing(policy, True)


class Engine:
    """Prepared model, optimiser and scheduler plus the guarded optimiser step (see module doc)."""

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Any,
        cfg: TrainConfig,
        *,
        value_head: bool = False,
        accelerator: Accelerator | None = None,
        optimizer: Callable[[list[nn.Parameter]], torch.optim.Optimizer] | None = None,
        num_training_steps: int | None = None,
        num_decay_steps: int | None = None,
    ) -> None:
        self.cfg, self.tokenizer = cfg, tokenizer
        self.accelerator = accelerator or make_accelerator(cfg)
        self.prompts = PromptIds(tokenizer)
        self.pad_id = int(
            tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        )
        if cfg.gradient_checkpointing:
            set_checkpointing(model, True)
        self.ref_model: nn.Module | None = None
        if cfg.kl_coef > 0 and not is_peft(model):  # LoRA: the adapter-disabled base is the reference
            self.ref_model = copy.deepcopy(model).eval().requires_grad_(False).to(self.accelerator.device)
        wrapper = PolicyWithValue(model, value_head=value_head)
        params = [p for p in wrapper.parameters() if p.requires_grad]
        opt = (
            optimizer(params)
            if optimizer
            else torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
        )
        self.scheduler = get_scheduler(
            cfg.lr_scheduler_type, opt, num_warmup_steps=cfg.warmup_steps,
            num_training_steps=num_training_steps or max(cfg.steps, 1),
            scheduler_specific_kwargs=(
                {"num_decay_steps": num_decay_steps or max(cfg.steps, 1)}
                if cfg.lr_scheduler_type == "warmup_stable_decay" else None
            ),
        )  # fmt: skip
        self.model, self.optimizer = self.accelerator.prepare(wrapper, opt)
        self.raw_optimizer = opt
        self.optimizer_steps = 0
        self.skipped_steps = 0
        self.on_step_end: list[StepCallback] = []

    def set_peak_lr(self, lr: float) -> None:
        """Make ``lr`` the schedule's peak rate from now on (a warm start and the rounds share one schedule and one
        optimiser, each phase at its own peak); the current step's rate is rescaled at once."""
        sched = self.scheduler  # transformers' schedules are LambdaLR: rate = base rate x lambda(step)
        sched.base_lrs = [lr for _ in sched.base_lrs]
        for group, fn in zip(self.raw_optimizer.param_groups, sched.lr_lambdas):
            group["lr"], group["initial_lr"] = lr * fn(sched.last_epoch), lr
        sched._last_lr = [g["lr"] for g in self.raw_optimizer.param_groups]

    # ------------------------------------------------------------------------------------------------ accessors
    @property
    def world_size(self) -> int:
        return self.accelerator.num_processes

    @property
    def rank(self) -> int:
        return self.accelerator.process_index

    @property
    def wrapper(self) -> PolicyWithValue:
        return self.accelerator.unwrap_model(self.model)

    @property
    def policy(self) -> nn.Module:
        """The bare policy (under ZeRO-3 its parameters are partitioned: use :meth:`unwrap_for_generation`)."""
        return self.wrapper.policy

    @property
    def is_deepspeed(self) -> bool:
        return self.accelerator.distributed_type == DistributedType.DEEPSPEED

    def unwrap_for_generation(self) -> contextlib.AbstractContextManager[nn.Module]:
        return unwrap_for_generation(self.accelerator, self.model)

    def collate(self, records: list[dict], rows: list[int], extra: dict | None = None) -> Batch:
        return collate(records, rows, self.prompts, self.pad_id, extra).to(self.accelerator.device)

    # -------------------------------------------------------------------------------------------------- forward
    def forward(self, batch: Batch, *, values: bool = False, train: bool = True) -> ForwardOut:
        """Log-probs of the batch's targets (and values, entropy); ``train=False``: eval mode, no grad, unwrapped."""
        if isinstance(batch, PackedBatch):  # tree packing: one forward over the packed tries (packing.py)
            return packed_forward(self, batch, values=values, train=train)
        model = self.model if train else self.wrapper
        model.train(train)
        with contextlib.nullcontext() if train else torch.no_grad():
            logits, v = model(batch.input_ids, batch.attention_mask, batch.logits_to_keep, values)
        logits = logits[:, :-1]
        entropy = token_entropy(logits) if (train and self.cfg.log_entropy) else None
        out = ForwardOut(token_logprobs(logits, batch.targets), None if v is None else v[:, :-1], entropy)
        if not train:
            self.wrapper.train()
        return out

    @torch.no_grad()
    def reference_logprobs(self, batch: Batch) -> torch.Tensor:
        """Log-probs under the reference: the LoRA-disabled base, or the frozen copy (full fine-tuning)."""
        policy = self.policy
        kwargs = dict(
            input_ids=batch.input_ids, attention_mask=batch.attention_mask,
            logits_to_keep=batch.logits_to_keep, use_cache=False,
        )  # fmt: skip
        if is_peft(policy):
            was = policy.training
            policy.eval()
            with policy.disable_adapter():
                logits = policy(**kwargs).logits
            policy.train(was)
        elif self.ref_model is not None:
            logits = self.ref_model(**kwargs).logits
        else:
            raise ValueError("no reference model: full fine-tuning keeps a frozen copy only when kl_coef > 0")
        return token_logprobs(logits[:, :-1], batch.targets)

    # --------------------------------------------------------------------------------------------- the step
    def any_rank(self, flag: bool) -> bool:
        """True when ``flag`` is true on any rank (an all-reduce; every rank must call it)."""
        if self.world_size == 1:
            return bool(flag)
        t = torch.tensor([1.0 if flag else 0.0], device=self.accelerator.device)
        return bool(self.accelerator.reduce(t, reduction="sum").item() > 0)

    def optimizer_step(
        self, micro_batches: list[Batch], loss_fn: LossFn, *, values: bool = False
    ) -> dict[str, float]:
        """One optimiser step over this rank's micro-batches; returns ``train/*`` metrics (global means)."""
        acc = self.accelerator
        lr = float(self.scheduler.get_last_lr()[0])  # the rate this step uses
        stats: dict[str, torch.Tensor] = {}
        bad = self.any_rank(not all(mb.finite() for mb in micro_batches))
        window_open = False
        if not bad:
            acc.gradient_accumulation_steps = len(micro_batches)  # the state is a process-wide singleton
            acc.step = 0  # the accumulation boundary is this window's last micro-batch
            for mb in micro_batches:
                with acc.accumulate(self.model):
                    loss, parts = loss_fn(self.forward(mb, values=values), mb)
                    if self.any_rank(not bool(torch.isfinite(loss))):
                        bad = True
                        break
                    acc.backward(loss * (self.world_size * len(micro_batches)))
                    window_open = not acc.sync_gradients
                    for k, v in {"loss": loss, **parts}.items():
                        stats[k] = stats.get(k, 0.0) + v.detach().float()
        grad_norm = float("nan")
        if not bad:
            grad_norm, bad = self._apply()
        if bad:
            self._discard_grads(window_open)
            self.skipped_steps += 1
        metrics = self._reduce(stats) if not bad else {}
        metrics.update({
            "train/grad_norm": grad_norm, "train/skipped_steps": float(self.skipped_steps),
            "train/step_skipped": float(bad), "train/learning_rate": lr,
        })  # fmt: skip
        if not bad:
            self.optimizer_steps += 1
            for fn in self.on_step_end:
                fn(self, metrics)
        return metrics

    def _apply(self) -> tuple[float, bool]:
        """Clip and step at the boundary; ``(grad_norm, skipped)``."""
        acc = self.accelerator
        if self.is_deepspeed:  # DeepSpeed clipped and stepped inside accelerator.backward at the boundary
            engine = acc.deepspeed_engine_wrapped.engine
            norm = engine.get_global_grad_norm()
            skipped = not getattr(engine, "_step_applied", True)
            self.scheduler.step() if not skipped else None
            return (float(norm) if norm is not None else float("nan")), skipped
        max_norm = self.cfg.max_grad_norm if self.cfg.max_grad_norm > 0 else float("inf")
        norm = float(acc.clip_grad_norm_(self.model.parameters(), max_norm))
        if not math.isfinite(norm):
            return norm, True
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm, False

    def _discard_grads(self, window_open: bool) -> None:
        """Drop every gradient accumulated in this window (weights untouched)."""
        if not self.is_deepspeed:
            self.raw_optimizer.zero_grad(set_to_none=True)
            return
        if not window_open:
            return
        opt = self.accelerator.deepspeed_engine_wrapped.engine.optimizer
        if hasattr(
            opt, "_overflow_clean_up"
        ):  # ZeRO-3: its overflow path (zero_grad also resets micro_step_id)
            opt._overflow_clean_up(getattr(opt, "loss_scale", 1.0))
            return
        opt.zero_grad(set_to_none=True)  # ZeRO-1/2: mirror its overflow path
        if hasattr(opt, "_release_preflattened_grad_buffers"):
            opt._release_preflattened_grad_buffers()
        if getattr(opt, "cpu_offload", False):
            opt.reset_cpu_buffers()
        for name in ("averaged_gradients", "all_grad_tensors"):
            buffers = getattr(opt, name, None)
            for k in list(buffers or {}):
                buffers[k] = None
        if hasattr(opt, "micro_step_id"):
            opt.micro_step_id = -1  # INITIAL_MICRO_STEP_ID: the next backward starts a fresh window
        if hasattr(opt, "_epilogue_ran_this_backward"):
            opt._epilogue_ran_this_backward = False

    def _reduce(self, stats: dict[str, torch.Tensor]) -> dict[str, float]:
        if not stats:
            return {}
        names = sorted(stats)
        vec = torch.stack([torch.as_tensor(stats[n], device=self.accelerator.device).float() for n in names])
        if self.world_size > 1:
            vec = self.accelerator.reduce(vec, reduction="sum")
        return {f"train/{n}": float(v) for n, v in zip(names, vec.tolist())}
