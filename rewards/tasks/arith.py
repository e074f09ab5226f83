"""``arith``: synthetic multi-step integer arithmetic with worked solutions, small enough for a char-level model.

Format (plain ASCII)::

    question  23+45*2-7
    prompt    23+45*2-7=?\\n
    solution  45*2=90\\n23+90=113\\n113-7=106\\nAnswer: 106

The worked solution applies one operation per line: first every ``*`` (left to right), then ``+``/``-`` left to
right, so the usual precedence is explicit. Operands have up to ``digits`` digits; the right operand of ``*`` is a
single small factor (2..``mul_max``) and two ``*`` never follow each other, so numbers stay small. Results may be
negative. Problems are deterministic for a seed, distinct within a split, and train/test are disjoint (split by a
hash of the expression).
"""

from __future__ import annotations

import random
import re
from typing import TYPE_CHECKING, Any

from thinktree.rewards.tasks.base import Task, check_split, synth_rows, task

if TYPE_CHECKING:
    import datasets

_ANSWER_RE = re.compile(r"Answer\s*:\s*(-?\d+)")
_INT_RE = re.compile(r"-?\d+")
_MAX_DIGITS = 30
_STEP_RE = re.compile(r"^\s*(-?\d{1,30})\s*([+\-*])\s*(-?\d{1,30})\s*=\s*(-?\d{1,30})\s*$")


def solve_steps(numbers: list[int], ops: list[str]) -> tuple[list[str], int]:
    """The worked steps (``a*b=c`` lines) evaluating ``numbers[0] ops[0] numbers[1] ...``, and the result."""
    nums, rest_ops, steps = [numbers[0]], [], []
    for op, b in zip(ops, numbers[1:]):
        if op == "*":
            a = nums.pop()
            c = a * b
            steps.append(f"{a}*{b}={c}")
            nums.append(c)
        else:
            rest_ops.append(op)
            nums.append(b)
    acc = nums[0]
    for op, b in zip(rest_ops, nums[1:]):
        c = acc + b if op == "+" else acc - b
        steps.append(f"{acc}{op}{b}={c}")
        acc = c
    return steps, acc


@task("arith")
class ArithTask(Task):
    """Integer expressions with ``ops`` operations (inclusive range) over ``digits``-digit operands."""

    system_prompt = (
        "Evaluate the arithmetic expression step by step, one step per line: each step is one operation "
        "written as 'a*b=c', every multiplication first, then additions and subtractions from left to right. "
        "Finish with a final line 'Answer: <integer>'."
    )
    default_n = {"train": 10_000, "test": 500}

    def __init__(
        self,
        ops: tuple[int, int] = (2, 4),
        digits: int = 2,
        operators: str = "+-*",
        mul_max: int = 9,
        test_frac: float = 0.1,
    ) -> None:
        lo, hi = ops
        if not 1 <= lo <= hi:
            raise ValueError(f"arith: ops must be a range (lo, hi) with 1 <= lo <= hi, got {ops}")
        if digits < 1 or mul_max < 2 or not operators or set(operators) - set("+-*"):
            raise ValueError("arith: need digits >= 1, mul_max >= 2 and operators drawn from '+-*'")
        self.ops, self.digits, self.operators = (lo, hi), digits, operators
        self.mul_max, self.test_frac = mul_max, test_frac

    def sample(self, rng: random.Random) -> tuple[list[int], list[str]]:
        """One random expression: operands and operators."""
        k = rng.randint(*self.ops)
        numbers = [rng.randint(1, 10**self.digits - 1)]
        ops: list[str] = []
        for _ in range(k):
            choices = self.operators
            if ops and ops[-1] == "*" and len(choices) > 1:
                choices = choices.replace("*", "")
            op = rng.choice(choices)
            ops.append(op)
            numbers.append(rng.randint(2, self.mul_max) if op == "*" else rng.randint(1, 10**self.digits - 1))
        return numbers, ops

    def make_row(self, numbers: list[int], ops: list[str]) -> dict[str, Any]:
        question = str(numbers[0]) + "".join(f"{op}{b}" for op, b in zip(ops, numbers[1:]))
        steps, result = solve_steps(numbers, ops)
        return {
            "question": question,
            "prompt": self.prompt(question),
            "answer": str(result),
            "solution": "\n".join([*steps, f"Answer: {result}"]),
        }

    def load(self, split: str = "train", n: int | None = None, seed: int = 0) -> datasets.Dataset:
        import datasets

        check_split(split)

        def make(rng: random.Random) -> tuple[str, dict]:
            row = self.make_row(*self.sample(rng))
            return row["question"], row

        rows = synth_rows(
            self.name, make, split, self.default_n[split] if n is None else n, seed, self.test_frac
        )
        return datasets.Dataset.from_list(rows)

    def prompt(self, question: str) -> str:
        return f"{question}=?\n"

    def extract_answer(self, completion: str) -> str | None:
        """The integer after the last ``Answer:``, else the last integer in the text."""
        matches = _ANSWER_RE.findall(completion)
        if matches:
            return matches[-1]
        last = None
        for m in _INT_RE.finditer(completion):
            last = m
        if last is None:
            return None
        text, start = last.group(), last.start()
        # "113-7": the minus is an operator, not a sign
        if (
            text.startswith("-")
            and start > 0
            and (completion[start - 1].isalnum() or completion[start - 1] == ")")
        ):
            text = text[1:]
        return text

    def score(self, completion: str, answer: str | None, **row: Any) -> float | None:
        if answer is None:
            return None
        got = self.extract_answer(completion)
        if got is None or len(got) > _MAX_DIGITS:
            return 0.0
        return 1.0 if int(got) == int(str(answer).strip()) else 0.0

    @staticmethod
    def step_is_correct(step: str) -> bool | None:
        """Whether a ``a<op>b=c`` step line is arithmetically right (None for any other line, e.g. ``Answer:``).

        A local check only: it does not see whether ``a`` and ``b`` were copied from the right place. Used to
        measure how many outcome-correct solutions reached their answer through a wrong step ("lucky" paths).
        """
        m = _STEP_RE.match(step)
        if m is None:
            return None
        a, op, b, c = int(m.group(1)), m.group(2), int(m.group(3)), int(m.group(4))
        return c == (a + b if op == "+" else a - b if op == "-" else a * b)
