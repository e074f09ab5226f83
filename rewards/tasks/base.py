"""The :class:`Task` interface shared by every task, plus small helpers the tasks share.

A task bundles data (``load``), prompting (``prompt``, ``chat_messages``), answer extraction and grading
(``extract_answer``, ``score``) and a TRL-style batched reward (``reward``). The :func:`task` class decorator
registers the class in ``TASKS`` and a default instance's reward in ``REWARDS``, both under the task name.

Solutions follow one format everywhere: one reasoning step per line, last line ``Answer: <answer>``.
"""

from __future__ import annotations

import hashlib
import inspect
import logging
import random
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, ClassVar

from thinktree.rewards.registry import register_reward, register_task

if TYPE_CHECKING:
    import datasets

logger = logging.getLogger(__name__)

SPLITS = ("train", "test")
DEFAULT_SYSTEM_PROMPT = (
    "Solve the problem. Reason step by step, writing one step per line. "
    "Finish with a final line of the form 'Answer: <answer>'."
)


def completion_text(completion: Any) -> str:
    """The text of a completion: a plain string, or TRL's conversational form (the last message's content)."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, dict):
        completion = [completion]
    if isinstance(completion, (list, tuple)) and completion:
        last = completion[-1]
        if isinstance(last, dict) and isinstance(last.get("content"), str):
            return last["content"]
    return ""


def last_boxed(text: str) -> str | None:
    """The content of the last ``\\boxed{...}`` (or ``\\fbox{...}``) in ``text``, by balanced-brace parsing."""
    starts = [text.rfind("\\boxed"), text.rfind("\\fbox")]
    i = max(starts)
    while i >= 0:
        j = i + (len("\\boxed") if text.startswith("\\boxed", i) else len("\\fbox"))
        while j < len(text) and text[j] == " ":
            j += 1
        if j < len(text) and text[j] == "{":
            depth = 0
            for k in range(j, len(text)):
                if text[k] == "{":
                    depth += 1
                elif text[k] == "}":
                    depth -= 1
                    if depth == 0:
                        return text[j + 1 : k]
        # unbalanced or not followed by a brace: try the previous occurrence
        i = max(text.rfind("\\boxed", 0, i), text.rfind("\\fbox", 0, i))
    return None


def take(rows: list[dict], n: int | None, seed: int) -> list[dict]:
    """All rows in order (``n=None``) or ``min(n, len(rows))`` rows drawn with ``random.Random(seed)``.

    For one seed, a smaller ``n`` gives a prefix of a larger ``n``'s selection.
    """
    if n is None:
        return rows
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    return [rows[i] for i in order[:n]]


def split_of(key: str, test_frac: float) -> str:
    """The split a synthetic problem belongs to, from a stable hash of its content key (seed-independent)."""
    h = int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "big")
    return "test" if h / 2**64 < test_frac else "train"


def synth_rows(
    name: str,
    make: Callable[[random.Random], tuple[str, dict]],
    split: str,
    n: int,
    seed: int,
    test_frac: float,
) -> list[dict]:
    """``n`` distinct generated rows of ``split``; ``make(rng)`` returns ``(content_key, row)``.

    Each split draws from its own seed stream and keeps only problems whose content hash falls in that split,
    so train and test are disjoint for any seeds and sizes.
    """
    check_split(split)
    rng = random.Random(f"{name}:{split}:{seed}")
    rows: list[dict] = []
    seen: set[str] = set()
    max_tries = 200 * n + 1000
    for _ in range(max_tries):
        if len(rows) >= n:
            break
        key, row = make(rng)
        if key in seen or split_of(key, test_frac) != split:
            continue
        seen.add(key)
        rows.append(row)
    if len(rows) < n:
        raise ValueError(
            f"{name}: could only generate {len(rows)} distinct {split!r} problems of {n} requested; "
            "widen the difficulty knobs or ask for fewer"
        )
    return rows


def check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose one of {SPLITS}")


def check_task_kwargs(cls: type, kwargs: dict[str, Any]) -> None:
    """Refuse keyword options that ``cls.__init__`` does not take, naming them and the ones it does take.

    A recipe's ``task.kwargs`` belong to its task: ``task.name=gsm8k task.kwargs.path=F`` on a recipe written for
    arith keeps arith's ``digits``, which gsm8k does not take (set the whole dict instead: ``task.kwargs={path: F}``).
    """
    params = list(inspect.signature(cls.__init__).parameters.values())[1:]
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return
    known = [p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    unknown = sorted(k for k in kwargs if k not in known)
    if unknown:
        name = getattr(cls, "name", cls.__name__)
        raise ValueError(
            f"task.kwargs: task {name!r} has no option(s) {', '.join(map(repr, unknown))} (its options: "
            f"{', '.join(known) or 'none'}); options left from another task's recipe? set the whole dict, "
            f"e.g. 'task.kwargs={{{known[0] if known else 'option'}: ...}}'"
        )


class Task:
    """Base class of all tasks; subclasses implement ``load``, ``extract_answer`` and ``score``.

    Constructing a task with an option its ``__init__`` does not take raises one ``ValueError`` that names the
    option and the ones it takes (:func:`check_task_kwargs`), not a ``TypeError``.
    """

    name: ClassVar[str] = "task"
    system_prompt: ClassVar[str] = DEFAULT_SYSTEM_PROMPT

    def __new__(cls, *args: Any, **kwargs: Any) -> Task:
        check_task_kwargs(cls, kwargs)
        return super().__new__(cls)

    def load(self, split: str = "train", n: int | None = None, seed: int = 0) -> datasets.Dataset:
        """A dataset with at least ``question``, ``prompt`` and ``answer`` (and ``solution`` where known)."""
        raise NotImplementedError

    def prompt(self, question: str) -> str:
        """The plain-text prompt a model continues (no chat template); ends with a newline."""
        return f"{question}\n"

    def chat_messages(self, question: str) -> list[dict[str, str]]:
        """System + user messages for a tokenizer's chat template."""
        return [
            {"role": "system", "content": self.system_prompt},
            {"role": "user", "content": question},
        ]

    def extract_answer(self, completion: str) -> str | None:
        """The final answer written in ``completion``, or None if there is none."""
        raise NotImplementedError

    def score(self, completion: str, answer: str | None, **row: Any) -> float | None:
        """1.0 if ``completion`` answers correctly, else 0.0; None if the reference is missing."""
        raise NotImplementedError

    def reward(
        self, completions: Sequence[Any], answer: Sequence[Any] | None = None, **kwargs: Any
    ) -> list[float | None]:
        """TRL's reward signature: dataset columns arrive as per-completion lists in ``kwargs``.

        Never raises on model output: unreadable completions score 0.0.
        """
        size = len(completions)
        if answer is None:
            answer = [None] * size
        if len(answer) != size:
            raise ValueError(f"{self.name}: {size} completions but {len(answer)} answers")
        columns = {k: v for k, v in kwargs.items() if isinstance(v, (list, tuple)) and len(v) == size}
        out: list[float | None] = []
        for i, completion in enumerate(completions):
            row = {k: v[i] for k, v in columns.items()}
            try:
                out.append(self.score(completion_text(completion), answer[i], **row))
            except Exception:  # a grader bug on odd output must not kill a training step
                logger.debug("%s: grading failed; scoring 0.0", self.name, exc_info=True)
                out.append(0.0)
        return out

    def is_correct(self, completion: Any, answer: str | None, **row: Any) -> bool:
        """Whether ``completion`` scores 1.0 against ``answer`` (``row``: extra columns, single values)."""
        return self.reward([completion], [answer], **{k: [v] for k, v in row.items()})[0] == 1.0


def task(name: str) -> Callable[[type[Task]], type[Task]]:
    """Class decorator: register the task class and its default instance's reward, both under ``name``."""

    def deco(cls: type[Task]) -> type[Task]:
        register_task(name)(cls)
        default = cls()

        def reward_fn(completions: Sequence[Any], **kwargs: Any) -> list[float | None]:
            return default.reward(completions, **kwargs)

        reward_fn.__name__ = reward_fn.__qualname__ = name  # TRL logs rewards under __name__
        reward_fn.__doc__ = f"Reward of task {name!r} (TRL signature): 1.0 correct, 0.0 wrong or unreadable."
        register_reward(name)(reward_fn)
        return cls

    return deco
