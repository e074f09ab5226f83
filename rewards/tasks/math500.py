"""``math500``: the MATH-500 competition problems (test split only), graded with ``math_verify``.

Data: a local JSON-lines file or a directory holding ``test.jsonl`` (rows ``{"question", "answer"}``, the answer
a full solution with ``\\boxed{...}``), or, when no path is given, the hub id ``HuggingFaceH4/MATH-500`` (columns
``problem``, ``solution``, ``answer``). Columns: ``question``, ``prompt``, ``answer`` (the content of the last
``\\boxed{}``, balanced-brace parse) and ``solution`` (one paragraph per line, ``[asy]`` figures dropped, last
line ``Answer: <answer>``).

Grading: the candidate is the completion's last ``\\boxed{}``, else the text after the last ``Answer:`` / ``The
answer is``, else the last non-empty line. Identical answers up to LaTeX spacing score 1.0 at once; otherwise
``math_verify.parse``/``verify`` decide with their signal-based timeouts disabled (they only work on the main
thread) and this module's own timeout instead: the check runs in a daemon thread that is abandoned after
``timeout`` seconds (score 0.0). An abandoned thread finishes in the background; it cannot be killed.
"""

from __future__ import annotations

import functools
import logging
import os
import re
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from thinktree.rewards.tasks.base import Task, check_split, last_boxed, take, task
from thinktree.rewards.tasks.jsonl import read_jsonl, resolve_split_file

if TYPE_CHECKING:
    import datasets

logger = logging.getLogger(__name__)
_ANSWER_RE = re.compile(r"(?:the\s+(?:final\s+)?answer\s+is|\banswer\s*:)\s*:?([^\n]*)", re.IGNORECASE)
_ASY_RE = re.compile(r"\[asy\].*?\[/asy\]", re.DOTALL)
_TEXT_RE = re.compile(r"\\(?:text|textbf|mathrm|mbox)\s*\{([^{}]*)\}")
MAX_CANDIDATE_CHARS = 1000


class VerifyTimeout(Exception):
    """The math_verify check did not finish in time."""


def call_with_timeout(fn: Callable[[], Any], timeout: float) -> Any:
    """``fn()`` run in a daemon thread; raises :class:`VerifyTimeout` after ``timeout`` seconds.

    Works off the main thread (unlike ``signal.alarm``); a thread that times out is left to finish on its own.
    """
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["value"] = fn()
        except BaseException as e:  # re-raised in the caller
            box["error"] = e

    t = threading.Thread(target=run, name="math500-verify", daemon=True)
    t.start()
    t.join(timeout)
    if t.is_alive():
        raise VerifyTimeout(f"math_verify did not finish in {timeout} s")
    if "error" in box:
        raise box["error"]
    return box.get("value")


def _unwrap(text: str) -> str:
    """Strip math delimiters (``$``, ``\\(...\\)``, ``\\[...\\]``) and a trailing period, until stable."""
    prev = None
    while text != prev:
        prev, text = text, text.strip().rstrip(".").strip("$").strip()
        for left, right in (("\\(", "\\)"), ("\\[", "\\]")):
            if text.startswith(left) and text.endswith(right):
                text = text[2:-2]
    return text


def _squash(text: str) -> str:
    """A conservative normal form for the exact-match fast path (spacing and LaTeX sizing only)."""
    text = _TEXT_RE.sub(r"\1", text)
    for a in ("\\left", "\\right", "\\!", "\\,", "\\;", "\\ ", "$", " ", "\n"):
        text = text.replace(a, "")
    return text.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac").rstrip(".")


@functools.lru_cache(maxsize=4096)
def _parse_boxed(text: str) -> tuple:
    from math_verify import parse

    return tuple(parse("\\boxed{" + text + "}", parsing_timeout=None))


def _silence_timeout_warning() -> None:
    """math_verify warns once when its own timeout is off; this module supplies one, so mark it as shown."""
    import math_verify.grader
    import math_verify.parser

    for mod in (math_verify.parser, math_verify.grader):
        if hasattr(mod, "TIMEOUT_WARNING_SHOWN"):
            mod.TIMEOUT_WARNING_SHOWN = True


def verify_answer(gold: str, candidate: str) -> bool:
    """Whether ``candidate`` equals ``gold`` per math_verify (no timeout here: see :func:`call_with_timeout`)."""
    from math_verify import verify

    _silence_timeout_warning()
    g, c = _parse_boxed(gold), _parse_boxed(candidate)
    if not g or not c:
        return False
    return bool(verify(list(g), list(c), timeout_seconds=None))


def solution_lines(solution: str, answer: str) -> str:
    """A reference solution as one paragraph per line, ``[asy]`` figures dropped, then ``Answer: <answer>``."""
    body = _ASY_RE.sub("", solution.split("The answer is:")[0])
    paragraphs = [" ".join(p.split()) for p in re.split(r"\n\s*\n", body)]
    return "\n".join([*(p for p in paragraphs if p), f"Answer: {answer}"])


def _check_reference(row: dict[str, str]) -> str | None:
    if last_boxed(row["answer"]) is None:
        return "field 'answer' has no \\boxed{...} final answer"
    return None


@task("math500")
class Math500Task(Task):
    """MATH-500 from ``path`` (a ``.jsonl`` file or a directory with ``test.jsonl``), else from ``hub_id``."""

    system_prompt = (
        "Solve the math problem. Reason step by step, writing one step per line. "
        "Finish with a final line 'Answer: <answer>' giving the answer in LaTeX."
    )

    def __init__(
        self,
        path: str | os.PathLike[str] | None = None,
        hub_id: str = "HuggingFaceH4/MATH-500",
        timeout: float = 5.0,
    ) -> None:
        self.path, self.hub_id, self.timeout = path, hub_id, timeout

    def raw_rows(self, split: str) -> list[dict[str, str]]:
        """``{"question", "solution", "answer"}`` rows (answer = the final boxed answer)."""
        check_split(split)
        if split != "test":
            raise ValueError("math500 has only a 'test' split")
        if self.path is not None:
            rows = read_jsonl(resolve_split_file(self.path, split), ("question", "answer"), _check_reference)
            return [
                {"question": r["question"], "solution": r["answer"], "answer": last_boxed(r["answer"])}
                for r in rows
            ]
        import datasets

        ds = datasets.load_dataset(self.hub_id, split=split)
        return [{"question": r["problem"], "solution": r["solution"], "answer": r["answer"]} for r in ds]

    def load(self, split: str = "test", n: int | None = None, seed: int = 0) -> datasets.Dataset:
        import datasets

        rows = []
        for raw in take(self.raw_rows(split), n, seed):
            q, a = raw["question"].strip(), raw["answer"].strip()
            rows.append(
                {
                    "question": q,
                    "prompt": self.prompt(q),
                    "answer": a,
                    "solution": solution_lines(raw["solution"], a),
                }
            )
        return datasets.Dataset.from_list(rows)

    def prompt(self, question: str) -> str:
        return (
            f"Problem: {question}\nSolve step by step, one step per line, and end with 'Answer: <answer>'.\n"
        )

    def extract_answer(self, completion: str) -> str | None:
        boxed = last_boxed(completion)
        if boxed is not None:
            text = boxed
        else:
            matches = _ANSWER_RE.findall(completion)
            lines = [ln for ln in completion.splitlines() if ln.strip()]
            text = matches[-1] if matches and matches[-1].strip() else (lines[-1] if lines else "")
            text = _unwrap(text)
        text = text.strip()
        return text or None

    def score(self, completion: str, answer: str | None, **row: Any) -> float | None:
        if answer is None or not str(answer).strip():
            return None
        candidate = self.extract_answer(completion)
        if candidate is None or len(candidate) > MAX_CANDIDATE_CHARS:
            return 0.0
        gold = str(answer).strip()
        if _squash(candidate) == _squash(gold):
            return 1.0
        try:
            ok = call_with_timeout(lambda: verify_answer(gold, candidate), self.timeout)
        except VerifyTimeout:
            logger.warning("math500: verification timed out after %s s; scoring 0.0", self.timeout)
            return 0.0
        return 1.0 if ok else 0.0
