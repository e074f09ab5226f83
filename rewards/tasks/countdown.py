"""``countdown``: reach a target from given numbers with + - * / (each number used at most once).

Format (plain ASCII)::

    question  Use 3 7 25 50 to make 82
    prompt    Use 3 7 25 50 to make 82\\n
    solution  50-25=25\\n25*3=75\\n75+7=82\\nAnswer: (50-25)*3+7
    answer    a canonical expression reaching the target; extra columns ``numbers`` (list[int]), ``target`` (int)

Problems are generated backwards so a solution always exists: the numbers are combined in random order with
random operations (intermediate results stay positive integers; division only when exact), and the final value
is the target. The grader never calls ``eval``: a tiny recursive-descent parser accepts only integers, ``+ - * /``
and parentheses, evaluates with exact ``Fraction`` arithmetic, and checks that the numbers used are a sub-multiset
of the given ones. Without ``numbers``/``target`` columns the grader reads them from ``question`` or ``prompts``,
and failing that uses the reference expression's numbers and value.
"""

from __future__ import annotations

import random
import re
from collections import Counter
from fractions import Fraction
from typing import TYPE_CHECKING, Any

from thinktree.rewards.tasks.base import Task, check_split, synth_rows, task

if TYPE_CHECKING:
    import datasets

_STEP_RE = re.compile(r"^\s*(\d+)\s*([-+*/])\s*(\d+)\s*=\s*(\d+)\s*$")
_QUESTION_RE = re.compile(r"Use ((?:\d+ )*\d+) to make (\d+)")
_ANSWER_RE = re.compile(r"Answer\s*:([^\n]*)")
_TOKEN_RE = re.compile(r"\s*(?:(\d+)|([-+*/()]))")
_UNICODE_OPS = str.maketrans({"\u00d7": "*", "\u00f7": "/", "\u2212": "-", "\u2013": "-"})
MAX_EXPR_CHARS = 200
MAX_DEPTH = 20
MAX_INT_DIGITS = 6
_PREC = {"+": 1, "-": 1, "*": 2, "/": 2}


class ExpressionError(ValueError):
    """The text is not a valid countdown expression (syntax, size, division by zero)."""


def evaluate(expr: str) -> tuple[Fraction, list[int]]:
    """The exact value of ``expr`` and the integer literals it uses; raises :class:`ExpressionError`."""
    if len(expr) > MAX_EXPR_CHARS:
        raise ExpressionError("expression too long")
    tokens: list[str] = []
    pos, expr = 0, expr.rstrip()
    while pos < len(expr):
        m = _TOKEN_RE.match(expr, pos)
        if m is None:
            raise ExpressionError(f"unexpected character {expr[pos:].lstrip()[:1]!r}")
        if m.group(1) is not None and len(m.group(1)) > MAX_INT_DIGITS:
            raise ExpressionError("number too long")
        tokens.append(m.group(1) or m.group(2))
        pos = m.end()
    used: list[int] = []
    i = 0

    def peek() -> str | None:
        return tokens[i] if i < len(tokens) else None

    def expr_(depth: int) -> Fraction:
        nonlocal i
        value = term(depth)
        while peek() in ("+", "-"):
            op = tokens[i]
            i += 1
            rhs = term(depth)
            value = value + rhs if op == "+" else value - rhs
        return value

    def term(depth: int) -> Fraction:
        nonlocal i
        value = factor(depth)
        while peek() in ("*", "/"):
            op = tokens[i]
            i += 1
            rhs = factor(depth)
            if op == "*":
                value *= rhs
            elif rhs == 0:
                raise ExpressionError("division by zero")
            else:
                value /= rhs
        return value

    def factor(depth: int) -> Fraction:
        nonlocal i
        tok = peek()
        if tok is None:
            raise ExpressionError("unexpected end of expression")
        if tok.isdigit():
            i += 1
            used.append(int(tok))
            return Fraction(int(tok))
        if tok == "(":
            if depth >= MAX_DEPTH:
                raise ExpressionError("parentheses nested too deeply")
            i += 1
            value = expr_(depth + 1)
            if peek() != ")":
                raise ExpressionError("missing ')'")
            i += 1
            return value
        raise ExpressionError(f"unexpected token {tok!r}")

    if not tokens:
        raise ExpressionError("empty expression")
    value = expr_(0)
    if i != len(tokens):
        raise ExpressionError(f"unexpected token {tokens[i]!r}")
    return value, used


def _render(node: Any) -> tuple[str, int]:
    """Text and precedence of an expression tree ``int | (op, left, right)``, with minimal parentheses."""
    if isinstance(node, int):
        return str(node), 3
    op, left, right = node
    (ls, lp), (rs, rp) = _render(left), _render(right)
    p = _PREC[op]
    if lp < p:
        ls = f"({ls})"
    if rp < p or (rp == p and op in "-/"):
        rs = f"({rs})"
    return f"{ls}{op}{rs}", p


@task("countdown")
class CountdownTask(Task):
    """Reach ``target`` from ``count`` (inclusive range) numbers in 1..``max_number``; target in 1..``max_target``."""

    system_prompt = (
        "Reach the target number using the given numbers, each at most once, with + - * / and parentheses. "
        "Work step by step, one step per line: each step combines two numbers, written as 'a+b=c'. "
        "Finish with a final line 'Answer: <expression>'."
    )
    default_n = {"train": 10_000, "test": 500}

    def __init__(
        self,
        count: tuple[int, int] = (3, 4),
        max_number: int = 25,
        max_target: int = 200,
        test_frac: float = 0.1,
    ) -> None:
        if not 2 <= count[0] <= count[1] or max_number < 2 or max_target < 2:
            raise ValueError("countdown: need 2 <= count[0] <= count[1], max_number >= 2 and max_target >= 2")
        self.count, self.max_number, self.max_target, self.test_frac = (
            count,
            max_number,
            max_target,
            test_frac,
        )

    def sample(self, rng: random.Random) -> dict[str, Any] | None:
        """One problem with its worked solution, or None if the random combination missed the target range."""
        numbers = [rng.randint(1, self.max_number) for _ in range(rng.randint(*self.count))]
        pool: list[tuple[int, Any]] = [(v, v) for v in numbers]
        steps = []
        while len(pool) > 1:
            a, ea = pool.pop(rng.randrange(len(pool)))
            b, eb = pool.pop(rng.randrange(len(pool)))
            if a < b:
                (a, ea), (b, eb) = (b, eb), (a, ea)
            ops = ["+", "*"] + (["-"] if a > b else []) + (["/"] if b > 1 and a % b == 0 else [])
            op = rng.choice(ops)
            c = {"+": a + b, "-": a - b, "*": a * b, "/": a // b if b else 0}[op]
            steps.append(f"{a}{op}{b}={c}")
            pool.append((c, (op, ea, eb)))
        target, tree = pool[0]
        if not 1 <= target <= self.max_target or target in numbers:
            return None
        expression = _render(tree)[0]
        shown = sorted(numbers)
        question = f"Use {' '.join(map(str, shown))} to make {target}"
        return {
            "question": question,
            "prompt": self.prompt(question),
            "answer": expression,
            "solution": "\n".join([*steps, f"Answer: {expression}"]),
            "numbers": shown,
            "target": target,
        }

    def load(self, split: str = "train", n: int | None = None, seed: int = 0) -> datasets.Dataset:
        import datasets

        check_split(split)

        def make(rng: random.Random) -> tuple[str, dict]:
            while (row := self.sample(rng)) is None:
                pass
            return row["question"], row

        rows = synth_rows(
            self.name, make, split, self.default_n[split] if n is None else n, seed, self.test_frac
        )
        return datasets.Dataset.from_list(rows)

    def extract_answer(self, completion: str) -> str | None:
        """The expression after the last ``Answer:`` (else the last non-empty line), cut at any ``=``."""
        matches = _ANSWER_RE.findall(completion)
        if matches:
            text = matches[-1]
        else:
            lines = [ln for ln in completion.splitlines() if ln.strip()]
            text = lines[-1] if lines else ""
        text = text.split("=")[0].translate(_UNICODE_OPS).strip().strip("$`").rstrip(".").strip()
        return text or None

    def score(
        self,
        completion: str,
        answer: str | None,
        numbers: Any = None,
        target: Any = None,
        question: Any = None,
        prompts: Any = None,
        **row: Any,
    ) -> float | None:
        if numbers is None or target is None:
            numbers, target = self._numbers_target(answer, question, prompts)
            if numbers is None:
                return None
        expr = self.extract_answer(completion)
        if expr is None:
            return 0.0
        try:
            value, used = evaluate(expr)
        except ExpressionError:
            return 0.0
        given = re.findall(r"\d+", numbers) if isinstance(numbers, str) else numbers
        if Counter(used) - Counter(int(x) for x in given):
            return 0.0  # a number not given, or used more often than given
        return 1.0 if value == Fraction(int(target)) else 0.0

    @staticmethod
    def _numbers_target(answer: Any, question: Any, prompts: Any) -> tuple[list[int] | None, int | None]:
        """Numbers and target read from the question/prompt text, else from the reference expression."""
        for text in (question, prompts):
            text = text if isinstance(text, str) else (str(text) if text is not None else "")
            m = _QUESTION_RE.search(text)
            if m:
                return [int(x) for x in m.group(1).split()], int(m.group(2))
        if isinstance(answer, str):
            try:
                value, used = evaluate(answer)
            except ExpressionError:
                return None, None
            if value.denominator == 1:
                return used, int(value)
        return None, None

    @staticmethod
    def check_steps(steps: list[str], numbers: Any) -> bool:
        """Whether every ``a<op>b=c`` step line is right and uses numbers still available (process check).

        The pool starts as the given ``numbers``; a step takes ``a`` and ``b`` out of it and puts ``c`` in, so a
        number is used at most once and only intermediate results that exist can be reused. Other lines (the
        ``Answer:`` line) are not checked here: the outcome verifier grades them.
        """
        pool = Counter(int(x) for x in (re.findall(r"\d+", numbers) if isinstance(numbers, str) else numbers))
        for text in steps:
            for line in text.splitlines():
                m = _STEP_RE.match(line)
                if m is None:
                    continue
                a, op, b, c = int(m.group(1)), m.group(2), int(m.group(3)), int(m.group(4))
                value = {"+": a + b, "-": a - b, "*": a * b, "/": a // b if b and a % b == 0 else None}[op]
                need = Counter([a, b])
                if value != c or need - pool:
                    return False
                pool = pool - need + Counter([c])
        return True
