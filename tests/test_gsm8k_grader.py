"""GSM8K grader: hand-written edge cases, and agreement with all 1,319 test references."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from thinktree.rewards import REWARDS, get_task
from thinktree.rewards.tasks.gsm8k import reference_solution

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"

CASES = [
    ("18", "Janet sells 9 eggs.\n#### 18", 1.0),
    ("18", "She makes 9 * 2 = 18 dollars.\nThe answer is 18.", 1.0),
    ("18", "Answer: $18.00", 1.0),
    ("18", "so $\\boxed{18}$ dollars", 1.0),
    ("18", "so $\\boxed{\\$18}$", 1.0),
    ("18", "She makes 9 * 2 = $18 every day.", 1.0),
    ("18", "Q: eggs?\nA: 18", 1.0),
    ("18", "Answer: 18 dollars", 1.0),
    ("18", "Answer: 18. Hope this helps!", 1.0),
    ("18", "The answer is: \\$18.", 1.0),
    ("18", "I think 5 + 13 = 18", 1.0),
    ("18", "Answer: 19", 0.0),
    ("18", "First 18 eggs...\nAnswer: 20", 0.0),
    ("18", "The final answer is 17, not 18 as I said", 0.0),
    ("18", "Answer: eighteen", 0.0),
    ("18", "", 0.0),
    ("18", "no numbers at all", 0.0),
    ("1000", "Answer: 1,000", 1.0),
    ("1000", "Answer: $1,000.00.", 1.0),
    ("1000", "Answer: 1000.0", 1.0),
    ("1,080", "Answer: 1080", 1.0),
    ("100000000", "Answer: 100000001", 0.0),
    ("-5", "Answer: -5", 1.0),
    ("-5", "Answer: \u22125", 1.0),
    ("-5", "Answer: 5", 0.0),
    ("-5", "It drops from 10 to 10-15 = -5", 1.0),
    ("5", "It drops from 10 by 10-5", 1.0),
    ("0.5", "Answer: .5", 1.0),
    ("0.5", "Answer: 1/2", 1.0),
    ("0.5", "\\boxed{\\frac{1}{2}}", 1.0),
    ("0.75", "The answer is 3/4 of a pie", 1.0),
    ("0.75", "The answer is 0.76", 0.0),
    ("1/3", "Answer: 0.3333333", 1.0),
    ("1/3", "Answer: 0.33", 0.0),
    ("50", "Answer: 50%", 1.0),
    ("7", "#### 7\nAnswer: 9", 1.0),  # '####' outranks 'Answer:'
    ("7", "Answer:\n7", 1.0),  # a marker with no number falls through to the last number
    ("1000000", "Answer: 1{,}000{,}000", 1.0),
]


@pytest.mark.parametrize(("answer", "completion", "expected"), CASES)
def test_gsm8k_grader_cases(answer: str, completion: str, expected: float) -> None:
    assert REWARDS["gsm8k"]([completion], answer=[answer]) == [expected]


def test_gsm8k_extract_answer() -> None:
    task = get_task("gsm8k")
    assert task.extract_answer("Answer: $1,234.50") == "1234.5"
    assert task.extract_answer("#### -7") == "-7"
    assert task.extract_answer("nothing") is None


def _load(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


@pytest.mark.skipif(not (DATA / "gsm8k" / "test.jsonl").exists(), reason="shared GSM8K data not present")
def test_gsm8k_grader_agrees_with_all_test_references() -> None:
    rows = _load(DATA / "gsm8k" / "test.jsonl")
    assert len(rows) == 1319
    task = get_task("gsm8k")
    refs = [r["answer"] for r in rows]
    answers, solutions = zip(*(reference_solution(ref) for ref in refs))

    def changed(text: str, answer: str) -> str:
        body, _, final = text.rpartition("\n")
        return body + "\n" + re.sub(r"-?[\d,]+", str(int(answer) + 1), final, count=1)

    wrong = [changed(ref, a) for ref, a in zip(refs, answers)]
    wrong_solutions = [changed(s, a) for s, a in zip(solutions, answers)]
    assert task.reward(refs, answer=list(answers)) == [1.0] * len(rows)
    assert task.reward(list(solutions), answer=list(answers)) == [1.0] * len(rows)
    assert task.reward(wrong, answer=list(answers)) == [0.0] * len(rows)
    assert task.reward(wrong_solutions, answer=list(answers)) == [0.0] * len(rows)
    # the raw '#### 1,080' reference also works as the answer column
    assert task.reward(list(solutions), answer=refs) == [1.0] * len(rows)
