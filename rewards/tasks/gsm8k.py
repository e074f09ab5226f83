"""``gsm8k``: grade-school math word problems (Cobbe et al., 2021) with a numeric grader.

Data: a local JSON-lines file or a directory holding ``train.jsonl``/``test.jsonl`` (rows ``{"question",
"answer"}``, the answer's last line ``#### N``; a single file serves both splits, split by a stable hash of the
question with ``test_frac`` of it held out, see :func:`~thinktree.rewards.tasks.jsonl.hash_split`), or, when no path is given, a hub id loaded with
``datasets.load_dataset`` (default ``openai/gsm8k``, config ``main``). Columns: ``question``, ``prompt``,
``answer`` (the number after ``####``, commas removed) and ``solution`` (the reference, ``<<...>>`` calculator
annotations stripped, one step per line, last line ``Answer: N``).

Grading extracts one number from the completion: the first number after the first marker (in this order, its
last occurrence) that is followed by a number:
``#### N``, ``\\boxed{N}``, ``The answer is N``, ``Answer: N``, ``A: N``, else the last number in the text. It
handles ``1,000``, ``$``, units, trailing ``.``, signs, decimals (``18.00`` = ``18``, ``.5`` = ``0.5``),
percent signs, ``3/4`` and ``\\frac{3}{4}``, and compares numerically: exactly when both are integers, else
with relative tolerance 1e-6 (so ``0.3333333`` matches ``1/3``).
"""

from __future__ import annotations

import math
import os
import re
from fractions import Fraction
from pathlib import Path
from typing import TYPE_CHECKING, Any

from thinktree.rewards.tasks.base import Task, check_split, last_boxed, take, task
from thinktree.rewards.tasks.jsonl import hash_split, read_jsonl, resolve_split_file

if TYPE_CHECKING:
    import datasets

_CALC_RE = re.compile(r"<<[^<>]*>>")
_NUM = r"(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|\.\d+"
_NUMBER_RE = re.compile(rf"(?P<sign>[-\u2212]\s*)?\$?\s*(?P<num>{_NUM})(?:\s*/\s*(?P<den>{_NUM}))?")
_FRAC_RE = re.compile(r"\\[dt]?frac\s*\{\s*([^{}]*)\}\s*\{\s*([^{}]*)\}")
_MARKERS = [
    re.compile(r"####([^\n]*)"),
    None,  # \boxed{...}: balanced-brace parse
    re.compile(r"the\s+(?:final\s+)?answer\s+is\s*:?([^\n]*)", re.IGNORECASE),
    re.compile(r"\banswer\s*:([^\n]*)", re.IGNORECASE),
    re.compile(r"(?<![A-Za-z])A\s*:([^\n]*)"),
]
REL_TOL = 1e-6
MAX_DIGITS = 50


def normalize_number(text: str) -> str:
    """``'1,080'`` → ``'1080'``, ``'18.00'`` → ``'18'``; strings that are not numbers come back stripped."""
    text = text.strip().replace(",", "").lstrip("$").rstrip(".")
    try:
        value = Fraction(text)
    except (ValueError, ZeroDivisionError):
        return text
    return str(value.numerator) if value.denominator == 1 else text


def _clean_latex(text: str) -> str:
    text = _FRAC_RE.sub(r"(\1)/(\2)", text)
    for a, b in (("{,}", ","), ("\\,", ""), ("\\!", ""), ("\\$", "$"), ("\\%", "%"), ("\u2212", "-")):
        text = text.replace(a, b)
    return text.replace("(", "").replace(")", "")


def _first_number(text: str, last: bool = False) -> Fraction | None:
    """The first (or last) number in ``text`` as a Fraction; a ``-`` glued after a word/digit is no sign."""
    found = None
    for m in _NUMBER_RE.finditer(text):
        found = m
        if not last:
            break
    if found is None:
        return None
    num, den = found.group("num").replace(",", ""), found.group("den")
    if len(num) > MAX_DIGITS or (den and len(den) > MAX_DIGITS):
        return None
    value = Fraction(num)
    if den is not None:
        d = Fraction(den.replace(",", ""))
        if d == 0:
            return None
        value /= d
    start = found.start()
    glued = start > 0 and (text[start - 1].isalnum() or text[start - 1] in ")]")
    if found.group("sign") and not glued:
        value = -value
    return value


def extract_number(completion: str) -> Fraction | None:
    """The final numeric answer written in ``completion`` (see the module docstring), or None."""
    for marker in _MARKERS:
        if marker is None:
            boxed = last_boxed(completion)
            value = _first_number(_clean_latex(boxed)) if boxed is not None else None
            if value is not None:
                return value
            continue
        matches = marker.findall(completion)
        value = _first_number(_clean_latex(matches[-1])) if matches else None
        if value is not None:
            return value
    return _first_number(_clean_latex(completion), last=True)


def numbers_match(got: Fraction, want: Fraction) -> bool:
    """Exact for two integers (``100000001`` is not ``100000000``), else relative tolerance ``REL_TOL``."""
    if got == want:
        return True
    if got.denominator == 1 and want.denominator == 1:
        return False
    try:
        return math.isclose(float(got), float(want), rel_tol=REL_TOL, abs_tol=1e-12)
    except OverflowError:
        return False


def reference_solution(reference: str) -> tuple[str, str]:
    """``(answer, solution)`` from a GSM8K reference (steps, then ``#### N``)."""
    body, sep, final = reference.rpartition("####")
    if not sep:
        raise ValueError("reference has no '#### N' final line")
    answer = normalize_number(final)
    steps = [ln.strip() for ln in _CALC_RE.sub("", body).splitlines() if ln.strip()]
    return answer, "\n".join([*steps, f"Answer: {answer}"])


def _check_reference(row: dict[str, str]) -> str | None:
    if "####" not in row["answer"]:
        return "field 'answer' has no '#### N' final line"
    return None


@task("gsm8k")
class GSM8KTask(Task):
    """GSM8K from ``path`` (a ``.jsonl`` file or a directory with ``<split>.jsonl``), else from ``hub_id``."""

    system_prompt = (
        "Solve the math word problem. Reason step by step, writing one step per line. "
        "Finish with a final line 'Answer: <number>'."
    )

    def __init__(
        self,
        path: str | os.PathLike[str] | None = None,
        hub_id: str = "openai/gsm8k",
        config: str = "main",
        test_frac: float = 0.1,
    ) -> None:
        self.path, self.hub_id, self.config, self.test_frac = path, hub_id, config, test_frac

    def raw_rows(self, split: str) -> list[dict[str, str]]:
        """``{"question", "answer"}`` rows as stored (answer = the full reference)."""
        check_split(split)
        if self.path is not None:
            source = resolve_split_file(self.path, split)
            rows = read_jsonl(source, ("question", "answer"), _check_reference)
            if Path(self.path).is_file():  # one file for both splits: held-out rows must never be trained on
                rows = hash_split(rows, split, self.test_frac, source)
            return rows
        import datasets

        ds = datasets.load_dataset(self.hub_id, self.config, split=split)
        return [{"question": r["question"], "answer": r["answer"]} for r in ds]

    def load(self, split: str = "train", n: int | None = None, seed: int = 0) -> datasets.Dataset:
        import datasets

        rows = []
        for raw in take(self.raw_rows(split), n, seed):
            answer, solution = reference_solution(raw["answer"])
            q = raw["question"].strip()
            rows.append({"question": q, "prompt": self.prompt(q), "answer": answer, "solution": solution})
        return datasets.Dataset.from_list(rows)

    def prompt(self, question: str) -> str:
        return (
            f"Question: {question}\nSolve step by step, one step per line, and end with 'Answer: <number>'.\n"
        )

    def extract_answer(self, completion: str) -> str | None:
        value = extract_number(completion)
        if value is None:
            return None
        return str(value.numerator) if value.denominator == 1 else str(float(value))

    def score(self, completion: str, answer: str | None, **row: Any) -> float | None:
        if answer is None:
            return None
        want = extract_number(str(answer))
        if want is None:
            return None
        got = extract_number(completion)
        return 1.0 if got is not None and numbers_match(got, want) else 0.0
