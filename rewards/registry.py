"""Name → callable registries for reward functions and tasks."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

RewardFn = Callable[..., list[float | None]]

REWARDS: dict[str, RewardFn] = {}
"""Reward functions by name, each ``(completions, **kwargs) -> list[float | None]`` (TRL's signature)."""

TASKS: dict[str, type] = {}
"""Task classes by name (see :mod:`thinktree.rewards.tasks.base`)."""


def register_reward(name: str) -> Callable[[RewardFn], RewardFn]:
    def deco(fn: RewardFn) -> RewardFn:
        if name in REWARDS:
            raise ValueError(f"reward {name!r} is already registered")
        REWARDS[name] = fn
        return fn

    return deco


def register_task(name: str) -> Callable[[type], type]:
    def deco(cls: type) -> type:
        if name in TASKS:
            raise ValueError(f"task {name!r} is already registered")
        TASKS[name] = cls
        cls.name = name
        return cls

    return deco


class UnknownTaskError(ValueError, KeyError):
    """A task name that is not registered (a ValueError, so the CLI answers it in one line; a KeyError as before)."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


def get_task(name: str, **kwargs: Any):
    """Instantiate a registered task by name; unknown names raise with the list of known ones."""
    if name not in TASKS:
        raise UnknownTaskError(f"task.name={name!r} is not a task; known tasks: {', '.join(sorted(TASKS))}")
    return TASKS[name](**kwargs)
