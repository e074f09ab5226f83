"""thinktree.rewards — verifiers, reward functions and task definitions.

Every reward function has TRL's signature ``(completions: list[str], **kwargs) -> list[float | None]``: dataset
columns (e.g. ``answer=[...]``) arrive as keyword lists, so the same callables work inside TRL trainers.
``REWARDS`` maps names to them; ``TASKS`` maps task names to task classes (data, prompt, extraction, reward).
"""

from thinktree.rewards import compose  # noqa: F401,E402  (registers format, length_penalty)
from thinktree.rewards.registry import REWARDS, TASKS, get_task, register_reward

# Importing the task modules registers their rewards.
from thinktree.rewards.tasks import arith, countdown, gsm8k, math500  # noqa: F401,E402

__all__ = ["REWARDS", "TASKS", "get_task", "register_reward"]
