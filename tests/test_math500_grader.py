"""MATH-500 grader: equivalent forms, extraction, timeouts off the main thread, and self-agreement on 500 rows."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from thinktree.rewards import REWARDS, get_task
from thinktree.rewards.tasks import math500
from thinktree.rewards.tasks.base import last_boxed

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"

CASES = [
    ("\\frac{1}{2}", "Answer: 0.5", 1.0),
    ("\\frac{1}{2}", "so we get $\\boxed{\\dfrac{1}{2}}$.", 1.0),
    ("\\frac{1}{2}", "The answer is $\\frac12$.", 1.0),
    ("\\frac{1}{2}", "\\boxed{0.51}", 0.0),
    ("2\\sqrt{2}", "\\boxed{\\sqrt{8}}", 1.0),
    ("2\\sqrt{2}", "\\boxed{\\sqrt{2}}", 0.0),
    ("(2,\\infty)", "Answer: (2, \\infty)", 1.0),
    ("(-\\infty, 0]", "\\boxed{(-\\infty,0)}", 0.0),
    ("\\left(\\frac{3}{5},\\frac{8}{3}\\right]", "Answer: $(3/5, 8/3]$", 1.0),
    ("3", "\\boxed{x=3}", 1.0),
    ("3", "\\boxed{x=4}", 0.0),
    ("90^\\circ", "Answer: 90", 1.0),
    ("90", "\\boxed{90^\\circ}", 1.0),
    ("\\frac{270}7\\text{ degrees}", "Answer: $\\frac{270}{7}$", 1.0),
    ("\\text{Evelyn}", "Answer: Evelyn", 1.0),
    ("\\text{Evelyn}", "\\boxed{\\text{Evelyn}}", 1.0),
    ("\\text{Evelyn}", "Answer: Bob", 0.0),
    ("\\text{(C)}", "\\boxed{C}", 1.0),
    ("\\text{(C)}", "\\boxed{\\text{(B)}}", 0.0),
    ("\\text{east}", "The answer is east.", 1.0),
    ("\\left( 3, \\frac{\\pi}{2} \\right)", "\\boxed{(3, \\pi/2)}", 1.0),
    ("1 \\pm \\sqrt{19}", "\\boxed{1+\\sqrt{19}, 1-\\sqrt{19}}", 1.0),
    (
        "\\begin{pmatrix} -2 \\\\ -14 \\\\ -7 \\end{pmatrix}",
        "\\boxed{\\begin{pmatrix}-2\\\\-14\\\\-7\\end{pmatrix}}",
        1.0,
    ),
    ("5.4 \\text{ cents}", "\\boxed{5.4}", 1.0),
    ("864 \\mbox{ inches}^2", "Answer: 864", 1.0),
    ("1\\frac{4}{5}", "\\boxed{\\frac{9}{5}}", 1.0),
    ("p - q", "\\boxed{p-q}", 1.0),
    ("p - q", "\\boxed{q - p}", 0.0),
    ("\\cot x", "\\boxed{\\frac{\\cos x}{\\sin x}}", 1.0),
    ("-\\frac{\\pi}{6}", "\\boxed{-\\pi/6}", 1.0),
    ("10", "First \\boxed{5}, then correcting: \\boxed{10}", 1.0),
    ("10", "\\boxed{10}... wait, \\boxed{5}", 0.0),
    ("\\frac{14}{3}", "so the result is\n14/3", 1.0),
    ("\\frac{14}{3}", "Answer:\n$\\frac{14}{3}$", 1.0),
    ("\\frac{14}{3}", "", 0.0),
]


@pytest.mark.parametrize(("answer", "completion", "expected"), CASES)
def test_math500_grader_cases(answer: str, completion: str, expected: float) -> None:
    assert REWARDS["math500"]([completion], answer=[answer]) == [expected]


def test_math500_extract_answer() -> None:
    task = get_task("math500")
    assert task.extract_answer("x \\boxed{\\frac{a}{\\sqrt{b}}} y") == "\\frac{a}{\\sqrt{b}}"
    assert task.extract_answer("The answer is $\\(4\\)$.") == "4"
    assert task.extract_answer("junk \\boxed{unclosed") == "junk \\boxed{unclosed"
    assert last_boxed("\\boxed{1} and \\boxed{unclosed") == "1"
    assert last_boxed("\\fbox{7}") == "7" and last_boxed("none") is None


def test_math500_grades_off_the_main_thread() -> None:
    cases = [(a, c, e) for a, c, e in CASES if e == 1.0 and "boxed" in c][:8]
    task = get_task("math500")
    with ThreadPoolExecutor(4) as pool:
        got = list(pool.map(lambda t: task.reward([t[1]], answer=[t[0]])[0], cases))
    assert got == [1.0] * len(cases)


def test_math500_timeout_scores_zero(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(math500, "verify_answer", lambda gold, cand: time.sleep(5) or True)
    task = get_task("math500", timeout=0.2)
    t0 = time.perf_counter()
    assert task.reward(["\\boxed{0.5}"], answer=["\\frac{1}{2}"]) == [0.0]
    assert time.perf_counter() - t0 < 2
    with pytest.raises(math500.VerifyTimeout):
        math500.call_with_timeout(lambda: time.sleep(1), 0.05)
    with pytest.raises(ZeroDivisionError):
        math500.call_with_timeout(lambda: 1 / 0, 1)


@pytest.mark.skipif(not (DATA / "math500" / "test.jsonl").exists(), reason="shared MATH-500 data not present")
def test_math500_self_agreement() -> None:
    """Each reference solution scores 1.0 against its own boxed answer, including through math_verify alone."""
    task = get_task("math500", path=DATA / "math500")
    rows = task.raw_rows("test")
    ds = task.load("test")
    assert len(rows) == 500
    refs, answers = [r["solution"] for r in rows], ds["answer"]
    assert task.reward(refs, answer=answers) == [1.0] * 500
    assert task.reward(ds["solution"], answer=answers) == [1.0] * 500
    # math_verify alone (no exact-match fast path): the boxed answer against itself
    failures = [a for a in answers if not math500.verify_answer(a, a)]
    print(f"math500 self-agreement through math_verify: {500 - len(failures)}/500; failures: {failures}")
    assert len(failures) <= 5  # >= 99%
    # and the grader is not trivially permissive: a reference scored against another problem's answer
    others = answers[1:] + answers[:1]
    distinct = [i for i in range(500) if math500._squash(answers[i]) != math500._squash(others[i])]
    scores = task.reward([refs[i] for i in distinct], answer=[others[i] for i in distinct])
    false_pos = [(answers[i], others[i]) for i, s in zip(distinct, scores) if s]
    print(f"math500 cross-answer false positives: {len(false_pos)}/{len(distinct)}: {false_pos}")
    assert len(false_pos) <= len(distinct) // 100
