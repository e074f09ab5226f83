"""Process reward model (PRM): a scalar value head on a causal-LM backbone, read at every step boundary.

What
    :class:`ProcessRewardModel` wraps a Hugging Face causal LM (the *backbone*) and adds ``nn.Linear(hidden, 1)``
    on its final hidden states. A trajectory is encoded as ``[BOS] + prompt ids + step_1 ids + ... + step_K ids``
    and the head is read at each step's LAST token, so ONE forward pass scores all ``K`` steps (the backbone is
    causal: the score of step ``k`` sees the prompt and steps ``1..k`` only). ``sigmoid(logit)`` ∈ [0, 1] is the
    estimated probability that the prefix ending at that step leads to a correct answer.

    ``features="hidden+logprob"`` also feeds the head four numbers the backbone's OWN LM head gives in the same
    forward pass: the mean and the minimum log-probability of the step's tokens, and the same two over all steps
    so far (prompt excluded). A PRM initialised from the policy thus starts from what the policy already knows
    about a step (an arithmetic slip is a low-probability token) and learns from the labels how much to trust
    it (a new head starts as that confidence alone: weight 1 on the prefix mean, ~0 elsewhere); with the backbone
    fine-tuned, the LM head is part of the PRM and its probabilities move with it. (Close in spirit to implicit
    PRMs, Yuan et al. 2024, which read process rewards off token log-probabilities.)

    :class:`PRMValueFn` adapts it to the search's ``ValueFn`` protocol (``__call__(trajectories) -> list[float]``,
    duck-typed, so this package does not import ``thinktree.search``), for MCTS leaf evaluation
    (``evaluation="value"|"mixed"``), best-of-N reranking and step-beam scoring. Whole solutions are scored by an
    aggregate of their step scores: ``last`` (default; the value of the current state), ``min`` (Lightman et al.
    2023 / Math-Shepherd's weakest step), ``prod`` (probability all steps are right) or ``mean``. A trajectory
    with no steps (the search root) gets the score read at the prompt's last token.

    :class:`ORM` is the same head used only at the last step (``aggregate="last"``) on finished solutions: an
    outcome reward model. Trained on last-step labels only (``outcome_only=True`` in
    :mod:`thinktree.trainer.algos.prm`) it *is* an ORM; trained on all steps it is a PRM read like an ORM.

Papers
    Labels: Math-Shepherd (Wang et al., 2024) Monte-Carlo step labels, ReST-MCTS* (Zhang et al., 2024) value
    targets, rStar-Math (Guan et al., 2025) process-preference pairs — see :mod:`thinktree.rewards.labels`.
    Training lives in :mod:`thinktree.trainer.algos.prm` (this package must not import peft/accelerate/trl).

Departures / choices
    * Steps are tokenized from their TEXT (``add_special_tokens=False``, prompt and each step separately, then
      concatenated) so the boundaries are exact and match the text-only labels of dict-form trees; a finished
      step's EOS token is not appended. BOS is prepended iff the tokenizer adds one by default (as the HF search
      backend does). A step with empty text adds no token: its boundary is the previous one.
    * Batches are RIGHT-padded: with a causal backbone real tokens never see padding and keep their natural
      positions, so scores do not depend on batching (up to float round-off).
    * The head reads the decoder's final hidden state (``backbone.get_decoder()``), skipping the LM head.

Checkpoint
    A standard HF directory: the backbone's ``save_pretrained`` files (``AutoModelForCausalLM.from_pretrained``
    loads it as a plain LM), the tokenizer, ``value_head.safetensors`` and ``prm_config.json`` (head dims,
    aggregation default, base spec). A LoRA backbone (a ``peft`` model) saves as an adapter directory; loading that
    needs ``backbone_loader`` (the trainer passes one) — or merge the adapter first (the trainer's default).

Run: ``PRMValueFn(ProcessRewardModel(model), tokenizer)([Trajectory("2+3=?\\n", steps)])``; tests in
``tests/test_prm.py``; the experiment in ``bench/prm_rerank.py``.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

from thinktree.rewards.step_encoding import StepEncoder, prompt_steps

__all__ = [
    "AGGREGATES",
    "HEAD_FILE",
    "CONFIG_FILE",
    "PRMConfig",
    "ProcessRewardModel",
    "StepEncoder",
    "PRMValueFn",
    "ORM",
    "aggregate_scores",
    "check_causal",
    "load_prm",
]

AGGREGATES = ("last", "min", "prod", "mean")
HEAD_FILE = "value_head.safetensors"
CONFIG_FILE = "prm_config.json"
FORMAT = 1
LOGPROB_FEATURES = ("step_mean", "step_min", "prefix_mean", "prefix_min")
"""The extra head inputs of ``features="hidden+logprob"``, in order (see :meth:`ProcessRewardModel.logprob_features`)."""
FEATURES = {"hidden": 0, "hidden+logprob": len(LOGPROB_FEATURES)}
"""Head input kinds → number of extra inputs next to the final hidden state (see the module doc)."""
LOGIT_BUDGET = 1 << 24
"""Most logits (batch × positions × vocab) the log-probability features materialise at once (64 MiB in float32)."""


def aggregate_scores(scores: Sequence[float], how: str = "last") -> float:
    """One score for a solution from its step scores: last, min, prod or mean (NaN for no steps)."""
    if how not in AGGREGATES:
        raise ValueError(f"unknown aggregate {how!r}; choose one of {AGGREGATES}")
    if not scores:
        return math.nan
    if how == "last":
        return float(scores[-1])
    if how == "min":
        return float(min(scores))
    if how == "prod":
        return float(math.prod(scores))
    return float(sum(scores) / len(scores))


def _hidden_size(config: Any) -> int:
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    for name in ("hidden_size", "d_model", "n_embd"):
        value = getattr(text, name, None)
        if isinstance(value, int):
            return value
    raise ValueError(f"cannot find the hidden size of backbone config {type(config).__name__}")


def check_causal(config: Any, source: str = "backbone") -> None:
    """ValueError unless ``config`` is a decoder-only causal LM config (as ``load_policy`` checks)."""
    what = getattr(config, "model_type", None) or type(config).__name__
    if getattr(config, "is_encoder_decoder", False):
        raise ValueError(f"{source} is not a causal LM: its config ({what}) is an encoder-decoder model")
    if getattr(config, "is_decoder", None) is False:
        raise ValueError(f"{source} is not a causal LM: its config ({what}) is an encoder (is_decoder=False)")
    if type(config) not in MODEL_FOR_CAUSAL_LM_MAPPING:
        raise ValueError(f"{source} is not a causal LM: AutoModelForCausalLM has no model for config {what}")


@dataclass
class PRMConfig:
    """What ``prm_config.json`` holds."""

    hidden_size: int
    head_out: int = 1
    aggregate: str = "last"
    base: str | None = None
    """The spec the backbone came from (e.g. ``tiny:llama`` or a policy checkpoint), for the record."""
    backbone_format: str = "hf"
    """``hf`` (a full HF directory) or ``adapter`` (a peft adapter directory)."""
    features: str = "hidden"
    """What the head reads: ``hidden`` or ``hidden+logprob`` (see :data:`FEATURES`)."""
    format: int = FORMAT


class ProcessRewardModel(nn.Module):
    """A causal-LM backbone plus a scalar value head read at step-boundary positions (see module doc)."""

    def __init__(
        self,
        backbone: PreTrainedModel,
        *,
        aggregate: str = "last",
        base: str | None = None,
        head: nn.Linear | None = None,
        features: str = "hidden",
    ) -> None:
        super().__init__()
        check_causal(backbone.config)
        if aggregate not in AGGREGATES:
            raise ValueError(f"unknown aggregate {aggregate!r}; choose one of {AGGREGATES}")
        if features not in FEATURES:
            raise ValueError(f"unknown PRM features {features!r}; choose one of {tuple(FEATURES)}")
        hidden = _hidden_size(backbone.config)
        width = hidden + FEATURES[features]
        if head is not None and (head.in_features != width or head.out_features != 1):
            raise ValueError(
                f"value head has shape ({head.out_features}, {head.in_features}) but the backbone's hidden "
                f"size is {hidden} with features {features!r}: expected (1, {width})"
            )
        if features != "hidden" and backbone.get_output_embeddings() is None:
            raise ValueError(
                f"features {features!r} need the backbone's LM head; {type(backbone).__name__} has none"
            )
        self.backbone = backbone
        self.features = features
        self.head = head if head is not None else nn.Linear(width, 1)
        if head is None and features == "hidden+logprob":
            self.init_confidence_head(hidden_std=0.02)
        elif head is None:
            nn.init.zeros_(self.head.bias)
            nn.init.normal_(self.head.weight, std=0.02)  # scores start near 0.5
        self.config = PRMConfig(hidden_size=hidden, aggregate=aggregate, base=base, features=features)

    @torch.no_grad()
    def init_confidence_head(self, hidden_std: float = 0.0) -> None:
        """Make the head the policy's confidence, sigmoid(mean log-probability of the steps so far): weight 1 on the
        ``prefix_mean`` feature, 0 on the other features and the bias, N(0, ``hidden_std``) on the hidden state
        (0: exactly the confidence, an untrained scorer)."""
        if self.features != "hidden+logprob":
            raise ValueError(f"a confidence head needs features='hidden+logprob', not {self.features!r}")
        hidden = self.head.in_features - len(LOGPROB_FEATURES)
        nn.init.zeros_(self.head.bias)
        if hidden_std > 0:  # drawn over the whole row, then the feature weights are set (same init as before)
            nn.init.normal_(self.head.weight, std=hidden_std)
        else:
            nn.init.zeros_(self.head.weight)
        self.head.weight[0, hidden:] = 0.0
        self.head.weight[0, hidden + LOGPROB_FEATURES.index("prefix_mean")] = 1.0

    def hidden_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Final hidden states ``(batch, seq, hidden)`` of the backbone's decoder (LM head skipped)."""
        get_decoder = getattr(self.backbone, "get_decoder", None)
        decoder = get_decoder() if callable(get_decoder) else None
        if decoder is not None and decoder is not self.backbone:
            return decoder(
                input_ids=input_ids, attention_mask=attention_mask, use_cache=False
            ).last_hidden_state
        out = self.backbone(
            input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True, use_cache=False
        )
        return out.hidden_states[-1]

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        rows: torch.Tensor,
        cols: torch.Tensor,
        starts: torch.Tensor | None = None,
        first: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Head logits at positions ``(rows[m], cols[m])`` of the batch: shape ``(M,)``.

        ``starts[m]`` / ``first[m]`` (from :meth:`StepEncoder.batch`) are the first token of boundary ``m``'s step
        and of the row's first step; only ``features="hidden+logprob"`` needs them.
        """
        hidden = self.hidden_states(input_ids, attention_mask)
        h = hidden[rows, cols].to(self.head.weight.dtype)
        if self.features != "hidden":
            if starts is None or first is None:
                raise ValueError(
                    f"PRM features {self.features!r} need the batch's 'starts' and 'first' positions"
                )
            h = torch.cat(
                [h, self.logprob_features(hidden, input_ids, rows, cols, starts, first).to(h.dtype)], -1
            )
        return self.head(h).squeeze(-1)

    def logprob_features(
        self,
        hidden: torch.Tensor,
        input_ids: torch.Tensor,
        rows: torch.Tensor,
        cols: torch.Tensor,
        starts: torch.Tensor,
        first: torch.Tensor,
    ) -> torch.Tensor:
        """``(M, 4)``: mean and min token log-probability of each boundary's step, then of all steps so far
        (0 where the span is empty, e.g. the prompt boundary). Tokens are scored by the backbone's LM head."""
        head, h, ids = self.backbone.get_output_embeddings(), hidden[:, :-1], input_ids[:, 1:]
        width = max(1, LOGIT_BUDGET // max(1, h.shape[0] * head.weight.shape[0]))  # positions per chunk
        parts = []
        for s in range(0, h.shape[1], width):  # bounded memory: never all (batch, seq, vocab) logits at once
            logits = head(h[:, s : s + width]).float()
            parts.append(
                torch.gather(logits, -1, ids[:, s : s + width, None]).squeeze(-1) - logits.logsumexp(-1)
            )
        tok = torch.cat(parts, 1) if parts else h.new_zeros(h.shape[0], 0)
        lp = torch.cat([tok.new_zeros(tok.shape[0], 1), tok], 1)[rows]  # (M, T); lp[:, t] = log p(token t)
        pos = torch.arange(lp.shape[1], device=lp.device)[None]
        out = []
        for lo in (starts, first):
            span = (pos >= lo[:, None]) & (pos <= cols[:, None])
            n = span.sum(-1)
            mean = torch.where(span, lp, 0.0).sum(-1) / n.clamp(min=1)
            low = torch.where(span, lp, torch.inf).amin(-1)
            out += [mean, torch.where(n > 0, low, 0.0)]
        return torch.stack(out, -1)

    def save_pretrained(self, path: str | os.PathLike[str], tokenizer: Any = None) -> Path:
        """Write the checkpoint directory (atomically: a temporary folder renamed into place)."""
        out = Path(path).expanduser().absolute()
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
        try:
            self.backbone.save_pretrained(tmp)
            if tokenizer is not None:
                tokenizer.save_pretrained(tmp)
            head = {k: v.detach().cpu().contiguous() for k, v in self.head.state_dict().items()}
            save_file(head, str(tmp / HEAD_FILE))
            is_adapter = (tmp / "adapter_config.json").is_file() and not (tmp / "config.json").is_file()
            self.config.backbone_format = "adapter" if is_adapter else "hf"
            (tmp / CONFIG_FILE).write_text(json.dumps(asdict(self.config), indent=2) + "\n")
            if out.exists():
                shutil.rmtree(out)
            os.rename(tmp, out)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return out


def load_prm(
    path: str | os.PathLike[str],
    *,
    backbone_loader: Callable[[Path], PreTrainedModel] | None = None,
    device: str | torch.device = "cpu",
) -> tuple[ProcessRewardModel, Any]:
    """``(prm, tokenizer)`` from a checkpoint directory (tokenizer None if none was saved).

    A wrong-shaped checkpoint (missing head file or config, head size ≠ backbone hidden size, non-causal
    backbone) raises ``ValueError``. An adapter backbone needs ``backbone_loader(dir) -> model``.
    """
    d = Path(path).expanduser()
    if not (d / CONFIG_FILE).is_file():
        raise ValueError(f"{d} is not a PRM checkpoint: no {CONFIG_FILE}")
    if not (d / HEAD_FILE).is_file():
        raise ValueError(f"PRM checkpoint {d} has no value head file {HEAD_FILE}")
    cfg = json.loads((d / CONFIG_FILE).read_text())
    if (d / "config.json").is_file():
        from transformers import AutoConfig

        check_causal(AutoConfig.from_pretrained(d), f"PRM backbone {d}")
        backbone = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32)
    elif (d / "adapter_config.json").is_file():
        if backbone_loader is None:
            raise ValueError(
                f"PRM checkpoint {d} holds a LoRA adapter backbone; pass backbone_loader (e.g. "
                "thinktree.trainer.algos.prm.load_prm_checkpoint) or save with the adapter merged"
            )
        backbone = backbone_loader(d)
    else:
        raise ValueError(f"PRM checkpoint {d} has neither config.json nor adapter_config.json")
    state = load_file(str(d / HEAD_FILE))
    weight = state.get("weight")
    if weight is None or "bias" not in state:
        raise ValueError(f"{d / HEAD_FILE} lacks 'weight'/'bias' (keys: {sorted(state)})")
    hidden = _hidden_size(backbone.config)
    features = cfg.get("features", "hidden")
    if features not in FEATURES:
        raise ValueError(f"PRM checkpoint {d}: unknown features {features!r} in {CONFIG_FILE}")
    width = hidden + FEATURES[features]
    if tuple(weight.shape) != (1, width) or int(cfg.get("hidden_size", hidden)) != hidden:
        raise ValueError(
            f"PRM checkpoint {d}: value head weight has shape {tuple(weight.shape)} (config hidden_size "
            f"{cfg.get('hidden_size')}, features {features!r}) but the backbone's hidden size is {hidden}: "
            f"expected (1, {width})"
        )
    head = nn.Linear(width, 1)
    head.load_state_dict(state)
    prm = ProcessRewardModel(
        backbone, aggregate=cfg.get("aggregate", "last"), base=cfg.get("base"), head=head, features=features
    )
    tokenizer = AutoTokenizer.from_pretrained(d) if (d / "tokenizer_config.json").is_file() else None
    return prm.to(device).eval(), tokenizer


class PRMValueFn:
    """A :class:`ProcessRewardModel` as the search's ``ValueFn``: trajectories → aggregate step score in [0, 1]."""

    def __init__(
        self,
        prm: ProcessRewardModel,
        tokenizer: Any,
        aggregate: str | None = None,
        batch_size: int = 32,
        device: str | torch.device | None = None,
    ) -> None:
        agg = aggregate or prm.config.aggregate
        if agg not in AGGREGATES:
            raise ValueError(f"unknown aggregate {agg!r}; choose one of {AGGREGATES}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.prm, self.aggregate, self.batch_size = prm, agg, int(batch_size)
        self.device = torch.device(device) if device is not None else next(prm.parameters()).device
        context = getattr(prm.backbone.config, "max_position_embeddings", None)
        self.encoder = StepEncoder(tokenizer, context if isinstance(context, int) else None)
        self.__name__ = f"PRMValueFn[{agg}]"

    @contextlib.contextmanager
    def _eval(self) -> Iterator[None]:
        was = self.prm.training
        self.prm.eval()
        try:
            with torch.inference_mode():
                yield
        finally:
            self.prm.train(was)

    def boundary_scores(self, items: Sequence[Any]) -> list[list[float]]:
        """Per item, ``[prompt score, step_1 score, ..., step_K score]`` (sigmoid of the head)."""
        encoded = [self.encoder.encode(*prompt_steps(x)) for x in items]
        order = sorted(range(len(encoded)), key=lambda i: len(encoded[i][0]))
        out: list[list[float]] = [[] for _ in encoded]
        with self._eval():
            for s in range(0, len(order), self.batch_size):
                chunk = order[s : s + self.batch_size]
                b = {k: v.to(self.device) for k, v in self.encoder.batch([encoded[i] for i in chunk]).items()}
                probs = torch.sigmoid(self.prm(**b).float()).tolist()
                pos = 0
                for i in chunk:
                    n = len(encoded[i][1])
                    out[i] = probs[pos : pos + n]
                    pos += n
        return out

    def step_scores(self, trajectories: Sequence[Any]) -> list[list[float]]:
        """Per trajectory, the score of each step (one forward pass per batch of trajectories)."""
        return [s[1:] for s in self.boundary_scores(trajectories)]

    def scores(self, trajectories: Sequence[Any], aggregate: str | None = None) -> list[float]:
        """Aggregate score per trajectory; a trajectory without steps gets its prompt-boundary score."""
        how = aggregate or self.aggregate
        return [
            aggregate_scores(s[1:], how) if len(s) > 1 else s[0] for s in self.boundary_scores(trajectories)
        ]

    def __call__(self, trajectories: Sequence[Any]) -> list[float]:
        return self.scores(trajectories)


class ORM(PRMValueFn):
    """Outcome reward model: the PRM head read at the last step only (``aggregate="last"``), see module doc."""

    def __init__(self, prm: ProcessRewardModel, tokenizer: Any, batch_size: int = 32, **kwargs: Any) -> None:
        super().__init__(prm, tokenizer, aggregate="last", batch_size=batch_size, **kwargs)
        self.__name__ = "ORM"
