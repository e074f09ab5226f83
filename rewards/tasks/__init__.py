"""Task definitions: data, prompts, answer extraction and rewards, one module per task.

``arith`` and ``countdown`` are synthetic (generated from a seed, with worked solutions); ``gsm8k`` and ``math500``
load JSON-lines files (or a hub id). Each module registers its task class in ``TASKS`` and its reward in
``REWARDS`` under the task name; :class:`~thinktree.rewards.tasks.base.Task` is the shared interface.
"""

from thinktree.rewards.tasks.base import Task

__all__ = ["Task"]
