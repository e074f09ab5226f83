"""Reward composition: a weighted sum of named rewards from ``REWARDS``, with per-component values for logging.

What
    ``compose_rewards({"outcome": 1.0, "format": 0.1, "length_penalty": 0.05}, task="arith")`` returns a
    :class:`ComposedReward`: a callable with TRL's reward signature ``(completions, **kwargs) -> list[float | None]``
    that sums ``weight · reward`` over the components, and remembers the last batch's per-component values
    (``components``) and their means as ``reward/<name>`` metrics (``metrics``, plus ``reward/total``).
    ``trl_reward_funcs()`` gives the same components as ``(reward_funcs, reward_weights)`` for TRL's
    ``GRPOConfig(reward_weights=...)``, where TRL logs each one itself.

Names
    Any key of ``REWARDS`` (each task registers its verifier under its name, e.g. ``arith``), ``outcome`` (the
    verifier of ``task``), and two small shaping rewards registered here:

    * ``format`` — 1.0 when the completion's last non-empty line is ``Answer: <something>`` (the answer format
      every task uses), else 0.0.
    * ``length_penalty`` — 0 up to a budget, then linear: ``-min(cap, (n - budget) / scale)``; ``n`` counts
      characters, or tokens (``unit="tokens"``: TRL's ``completion_ids`` column when present, else the given
      tokenizer). The registered default is ``budget=400`` characters, ``scale=budget``, ``cap=1``.

    A component is configured by a weight, or by ``{"weight": w, **options}`` for a reward with a factory in
    ``FACTORIES`` (``{"length_penalty": {"weight": 0.1, "budget": 64, "unit": "tokens"}}``).

None handling
    A component that returns None for a completion (could not grade) contributes nothing to that completion's
    sum and is left out of its metric mean; a completion where every component is None gets None (TRL then
    ignores it), as TRL does for its own multi-reward sums.

Related work: the shaping terms follow the format / length rewards of DeepSeek-R1 (2025) and Kimi k1.5 (2025);
departure: no length reward relative to the group (k1.5) — a fixed budget, so the reward is per completion.
Tests: ``tests/test_compose.py``.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from thinktree.rewards.registry import REWARDS, RewardFn, register_reward
from thinktree.rewards.tasks.base import completion_text

__all__ = [
    "FACTORIES",
    "ComposedReward",
    "compose_rewards",
    "format_reward",
    "make_length_penalty",
]

_ANSWER_LINE = re.compile(r"^\s*Answer\s*:\s*\S")


@register_reward("format")
def format_reward(completions: Sequence[Any], **kwargs: Any) -> list[float | None]:
    """1.0 when the last non-empty line of the completion is an ``Answer: ...`` line, else 0.0."""
    out: list[float | None] = []
    for c in completions:
        lines = [line for line in completion_text(c).splitlines() if line.strip()]
        out.append(1.0 if lines and _ANSWER_LINE.match(lines[-1]) else 0.0)
    return out


def make_length_penalty(
    budget: int = 400,
    unit: str = "chars",
    tokenizer: Any = None,
    scale: float | None = None,
    cap: float = 1.0,
) -> RewardFn:
    """A length penalty: 0 up to ``budget`` characters/tokens, then ``-min(cap, (n - budget) / scale)``."""
    if budget < 0 or cap < 0 or unit not in ("chars", "tokens"):
        raise ValueError(
            f"length_penalty: need budget >= 0, cap >= 0, unit chars|tokens; got {budget}, {cap}, {unit}"
        )
    span = float(scale if scale is not None else max(budget, 1))
    if span <= 0:
        raise ValueError(f"length_penalty: scale must be positive, got {scale}")

    def length_penalty(completions: Sequence[Any], **kwargs: Any) -> list[float | None]:
        ids = kwargs.get("completion_ids")
        if unit == "tokens" and ids is not None and len(ids) == len(completions):
            lengths = [len(x) for x in ids]
        elif unit == "tokens":
            if tokenizer is None:
                raise ValueError(
                    "length_penalty(unit='tokens') needs completion_ids (TRL passes them) or a tokenizer"
                )
            texts = [completion_text(c) for c in completions]
            lengths = [len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts]
        else:
            lengths = [len(completion_text(c)) for c in completions]
        return [-min(cap, max(0, n - budget) / span) for n in lengths]

    length_penalty.__name__ = "length_penalty"
    return length_penalty


register_reward("length_penalty")(make_length_penalty())

FACTORIES: dict[str, Callable[..., RewardFn]] = {"length_penalty": make_length_penalty}
"""Rewards that take options in a composition spec (``{"weight": w, **options}``)."""


def _resolve(name: str, spec: Any, task: str | None) -> tuple[float, RewardFn]:
    options: dict[str, Any] = {}
    if isinstance(spec, Mapping):
        options = {k: v for k, v in spec.items() if k != "weight"}
        if "weight" not in spec:
            raise ValueError(f"reward {name!r}: a mapping spec needs a 'weight'")
        spec = spec["weight"]
    if isinstance(spec, bool) or not isinstance(spec, (int, float)):
        raise ValueError(f"reward {name!r}: weight must be a number, got {spec!r}")
    if options:
        if name not in FACTORIES:
            raise ValueError(
                f"reward {name!r} takes no options (options: {sorted(options)}); only {sorted(FACTORIES)} do"
            )
        return float(spec), FACTORIES[name](**options)
    if name == "outcome" and "outcome" not in REWARDS:
        if task is None:
            raise ValueError("reward 'outcome' needs task=<task name> (the verifier to use)")
        if task not in REWARDS:
            raise ValueError(f"unknown task reward {task!r}; known rewards: {sorted(REWARDS)}")
        return float(spec), REWARDS[task]
    if name not in REWARDS:
        raise ValueError(f"unknown reward {name!r}; known: {sorted(REWARDS)} (and 'outcome' with a task)")
    return float(spec), REWARDS[name]


class ComposedReward:
    """Weighted sum of named rewards with TRL's signature; keeps the last batch's components (see module doc)."""

    def __init__(self, weights: Mapping[str, Any], task: str | None = None) -> None:
        if not weights:
            raise ValueError("compose_rewards: empty composition (give at least one {name: weight})")
        self.weights: dict[str, float] = {}
        self.funcs: dict[str, RewardFn] = {}
        for name, spec in weights.items():
            self.weights[name], self.funcs[name] = _resolve(name, spec, task)
        self.components: dict[str, list[float | None]] = {}
        self.__name__ = "composed"

    def compute(self, completions: Sequence[Any], **kwargs: Any) -> dict[str, list[float | None]]:
        """Per-component values for a batch (also stored in ``self.components``)."""
        values: dict[str, list[float | None]] = {}
        for name, fn in self.funcs.items():
            out = list(fn(completions, **kwargs))
            if len(out) != len(completions):
                raise ValueError(
                    f"reward {name!r} returned {len(out)} values for {len(completions)} completions"
                )
            values[name] = [None if v is None else float(v) for v in out]
        self.components = values
        return values

    def __call__(self, completions: Sequence[Any], **kwargs: Any) -> list[float | None]:
        values = self.compute(completions, **kwargs)
        totals: list[float | None] = []
        for i in range(len(completions)):
            parts = [self.weights[n] * v[i] for n, v in values.items() if v[i] is not None]  # type: ignore[operator]
            totals.append(sum(parts) if parts else None)
        self.components["total"] = totals
        return totals

    def metrics(self) -> dict[str, float]:
        """``reward/<name>`` → mean of the last batch's (unweighted) component values, plus ``reward/total``."""
        out: dict[str, float] = {}
        for name, vals in self.components.items():
            seen = [v for v in vals if v is not None]
            if seen:
                out[f"reward/{name}"] = sum(seen) / len(seen)
        return out

    def trl_reward_funcs(self) -> tuple[list[RewardFn], list[float]]:
        """``(reward_funcs, reward_weights)`` for a TRL trainer, each function named after its component."""
        funcs = []
        for name, fn in self.funcs.items():

            def named(completions: Sequence[Any], _fn: RewardFn = fn, **kwargs: Any) -> list[float | None]:
                return _fn(completions, **kwargs)

            named.__name__ = named.__qualname__ = name
            funcs.append(named)
        return funcs, list(self.weights.values())


def compose_rewards(weights: Mapping[str, Any], task: str | None = None) -> ComposedReward:
    """A :class:`ComposedReward` from ``{name: weight}`` (or ``{name: {"weight": w, **options}}``)."""
    return ComposedReward(weights, task)
