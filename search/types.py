"""Core value types and the two injected protocols of the search.

The search talks to a model only through :class:`StepProposer` (batched: many prefixes from many trees in one call)
and to a learned evaluator only through :class:`ValueFn`. Outcome rewards (the task verifier) arrive as a plain
callable ``OutcomeFn``. This module imports nothing but the standard library, so the search core stays free of
torch/transformers (mctx injects its model the same way: ``recurrent_fn``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

__all__ = ["StepRecord", "Trajectory", "StepProposer", "ValueFn", "OutcomeFn"]


@dataclass(frozen=True, slots=True)
class StepRecord:
    """One reasoning step: the text up to (and including) the step delimiter, or up to EOS.

    ``logprobs[i]`` is the policy's log-probability of ``token_ids[i]`` at temperature 1 (needed for GRPO/PPO
    importance ratios); ``prior`` is the length-normalised step probability ``exp(mean(logprobs))`` used by PUCT.
    """

    text: str
    token_ids: tuple[int, ...] = ()
    logprobs: tuple[float, ...] = ()
    prior: float = 1.0
    eos: bool = False
    """The step ended with the end-of-sequence token: the trajectory is complete."""
    truncated: bool = False
    """The step was cut at ``max_step_tokens`` without reaching the delimiter or EOS."""

    def __post_init__(self) -> None:
        if len(self.token_ids) != len(self.logprobs):
            raise ValueError(f"StepRecord: {len(self.token_ids)} token ids but {len(self.logprobs)} logprobs")

    def to_dict(self) -> dict:
        return {
            "text": self.text,
            "token_ids": list(self.token_ids),
            "logprobs": list(self.logprobs),
            "prior": self.prior,
            "eos": self.eos,
            "truncated": self.truncated,
        }

    @classmethod
    def from_dict(cls, d: dict) -> StepRecord:
        return cls(
            text=d["text"],
            token_ids=tuple(d.get("token_ids", ())),
            logprobs=tuple(d.get("logprobs", ())),
            prior=d.get("prior", 1.0),
            eos=d.get("eos", False),
            truncated=d.get("truncated", False),
        )


@dataclass(frozen=True, slots=True)
class Trajectory:
    """The steps from a tree's root (the prompt) to one node.

    ``prompt`` is the formatted prompt text exactly as the model sees it (chat template already applied by the
    caller, if any). ``key`` identifies the prompt/tree (e.g. its index in the batch) and is informational only:
    backends cache by token content, never by key.
    """

    prompt: str
    steps: tuple[StepRecord, ...] = ()
    key: int = 0
    meta: dict = field(default_factory=dict, compare=False, hash=False)
    """Task columns for the verifier (e.g. ``{"answer": "42"}``); not part of the identity."""

    @property
    def completion(self) -> str:
        """The generated text after the prompt (all steps concatenated)."""
        return "".join(s.text for s in self.steps)

    @property
    def num_tokens(self) -> int:
        return sum(len(s.token_ids) for s in self.steps)

    @property
    def done(self) -> bool:
        return bool(self.steps) and self.steps[-1].eos

    def extend(self, step: StepRecord) -> Trajectory:
        return Trajectory(self.prompt, self.steps + (step,), self.key, self.meta)


@runtime_checkable
class StepProposer(Protocol):
    """A model adapted to the search: sample next steps for many prefixes in one batched call.

    ``seeds[i]`` seeds the sampling of ``prefixes[i]``'s children, so that the samples do not depend on how the
    requests were batched or ordered (batching and caching change speed, never results).
    Returns, for each prefix, ``num_children`` sampled steps (duplicates allowed; the search merges them).
    """

    def propose(
        self, prefixes: Sequence[Trajectory], num_children: int, seeds: Sequence[int]
    ) -> list[list[StepRecord]]: ...


@runtime_checkable
class ValueFn(Protocol):
    """A learned evaluator (PRM, value head): the estimated value in [0, 1] of each trajectory's last state."""

    def __call__(self, trajectories: Sequence[Trajectory]) -> list[float]: ...


class OutcomeFn(Protocol):
    """The task verifier for finished trajectories: reward in [0, 1] (None = could not grade → treated as 0)."""

    def __call__(self, trajectories: Sequence[Trajectory]) -> list[float | None]: ...
