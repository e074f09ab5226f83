"""Tasks: registry, synthetic generators and their graders, file loaders, bad data, garbage completions."""

from __future__ import annotations

import json
import string
from pathlib import Path

import pytest

from thinktree.rewards import REWARDS, TASKS, get_task
from thinktree.rewards.tasks.countdown import ExpressionError, evaluate

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
ALL_TASKS = ("arith", "countdown", "gsm8k", "math500")
GARBAGE = [
    "",
    None,
    "   \n\n  ",
    "9" * 1_000_000,
    "Answer: " + "1" * 100_000,
    "(" * 5000 + "1" + ")" * 5000,
    "\\boxed{" * 300,
    "}}}{{{\\boxed{}",
    "Answer: \u00bd \u2203x \U0001f600 \u202e\u0000",
    "\udcff\ud800 lone surrogates",
    ["not", "messages"],
    [{"role": "assistant"}],
    {"content": 42},
    12345,
]


# --------------------------------------------------------------------------------------------- registry


def test_registry_lists_all_tasks() -> None:
    assert set(ALL_TASKS) <= set(REWARDS)
    assert set(ALL_TASKS) <= set(TASKS)
    for name in ALL_TASKS:
        assert REWARDS[name].__name__ == name
        assert TASKS[name].name == name
    with pytest.raises(KeyError, match="known tasks"):
        get_task("nope")
    # called the way TRL calls reward functions: everything by keyword, plus non-column extras
    got = REWARDS["gsm8k"](
        prompts=["p", "q"],
        completions=["Answer: 3", "4"],
        completion_ids=[[1], [2]],
        trainer_state=object(),
        answer=["3", "3"],
    )
    assert got == [1.0, 0.0]


@pytest.mark.parametrize("name", ALL_TASKS)
def test_chat_messages(name: str) -> None:
    msgs = get_task(name).chat_messages("What is 2+2?")
    assert [m["role"] for m in msgs] == ["system", "user"]
    assert msgs[1]["content"] == "What is 2+2?"
    system = msgs[0]["content"]
    assert "step" in system and "one" in system and "per line" in system and "Answer:" in system


@pytest.mark.parametrize("name", ALL_TASKS)
@pytest.mark.parametrize("completion", GARBAGE, ids=range(len(GARBAGE)))
def test_garbage_scores_zero(name: str, completion: object) -> None:
    answer = {"arith": "12", "countdown": "3*4", "gsm8k": "12", "math500": "\\frac{1}{2}"}[name]
    extra = {"numbers": [[3, 4, 5]], "target": [12]} if name == "countdown" else {}
    assert REWARDS[name]([completion], answer=[answer], **extra) == [0.0]


@pytest.mark.parametrize("name", ALL_TASKS)
def test_conversational_completions_and_missing_reference(name: str) -> None:
    task = get_task(name)
    answer = {"arith": "12", "countdown": "3*4", "gsm8k": "12", "math500": "12"}[name]
    extra = {"numbers": [[3, 4, 5]] * 2, "target": [12] * 2} if name == "countdown" else {}
    convo = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "ok\nAnswer: 3*4"}]
    if name != "countdown":
        convo[-1]["content"] = "ok\nAnswer: 12"
    assert task.reward([convo, "Answer: 13"], answer=[answer] * 2, **extra) == [1.0, 0.0]
    if name != "countdown":
        assert task.reward(["Answer: 12"], answer=[None]) == [None]
    with pytest.raises(ValueError, match="completions but"):
        task.reward(["a", "b"], answer=["1"])


# ------------------------------------------------------------------------------------------- synthetic


@pytest.mark.parametrize("name", ["arith", "countdown"])
def test_synthetic_loader(name: str) -> None:
    task = get_task(name)
    ds = task.load("train", n=300, seed=3)
    assert len(ds) == 300
    assert {"question", "prompt", "answer", "solution"} <= set(ds.column_names)
    assert task.load("train", n=300, seed=3).to_list() == ds.to_list()
    assert task.load("train", n=300, seed=4)["question"] != ds["question"]
    assert len(set(ds["question"])) == 300
    for row in ds:
        assert row["prompt"] == task.prompt(row["question"]) and row["prompt"].endswith("\n")
        assert set(row["prompt"] + row["solution"]) <= set(string.printable)
        lines = row["solution"].split("\n")
        assert lines[-1] == f"Answer: {row['answer']}" and all(lines)
    with pytest.raises(ValueError, match="split"):
        task.load("validation", n=1)


@pytest.mark.parametrize("name", ["arith", "countdown"])
def test_synthetic_splits_disjoint(name: str) -> None:
    task = get_task(name)
    train = set(task.load("train", n=3000, seed=0)["question"]) | set(
        task.load("train", n=500, seed=7)["question"]
    )
    test = set(task.load("test", n=300, seed=0)["question"]) | set(
        task.load("test", n=300, seed=1)["question"]
    )
    assert len(test) > 300 and not train & test


@pytest.mark.parametrize("name", ["arith", "countdown"])
def test_synthetic_solutions_score_one_and_wrong_answers_zero(name: str) -> None:
    task = get_task(name)
    ds = task.load("test", n=400, seed=11)
    cols = {k: ds[k] for k in ds.column_names if k not in ("answer",)}
    assert task.reward(ds["solution"], answer=ds["answer"], **cols) == [1.0] * len(ds)
    wrong = [s.rsplit("Answer:", 1)[0] + f"Answer: {t}+1" for s, t in zip(ds["solution"], ds["answer"])]
    if name == "arith":
        wrong = [
            s.rsplit("Answer:", 1)[0] + f"Answer: {int(a) + 1}" for s, a in zip(ds["solution"], ds["answer"])
        ]
    assert task.reward(wrong, answer=ds["answer"], **cols) == [0.0] * len(ds)


def test_arith_format_and_extraction() -> None:
    task = get_task("arith", ops=(3, 3), digits=1)
    row = task.make_row([23, 45, 2, 7], ["+", "*", "-"])
    assert row["question"] == "23+45*2-7" and row["prompt"] == "23+45*2-7=?\n"
    assert row["solution"] == "45*2=90\n23+90=113\n113-7=106\nAnswer: 106" and row["answer"] == "106"
    assert all(len(q) <= 11 for q in task.load("train", n=50)["question"])  # 4 one-digit operands
    assert task.extract_answer("x\nAnswer: -42\n") == "-42"
    assert task.extract_answer("113-7=106") == "106"
    assert task.extract_answer("5-9=-4") == "-4"
    assert task.extract_answer("113-7") == "7"
    assert task.extract_answer("no digits") is None
    assert task.is_correct("23+90=113\n113-7=106\nAnswer: 106", "106")
    assert not task.is_correct("Answer: 106", "107")
    with pytest.raises(ValueError, match="could only generate"):
        get_task("arith", ops=(1, 1), digits=1, operators="+").load("train", n=1000)


def test_countdown_rules() -> None:
    task = get_task("countdown")
    kw = {"numbers": [3, 7, 25, 50], "target": 75}

    def ok(text: str) -> bool:
        return task.is_correct(text, "(50-25)*3", **kw)

    assert ok("50-25=25\n25*3=75\nAnswer: (50-25)*3")
    assert ok("Answer: 3*(50-25) = 75.")
    assert ok("Answer: 3 \u00d7 (50 \u2212 25)")
    assert ok("(50-25)*3")  # last line when there is no Answer:
    assert ok("Answer: 50+25")
    assert not ok("Answer: 50/(7-3)*3*2")  # 2 is not given
    assert not ok("Answer: 25*3+25-25")  # reuses 25
    assert not ok("Answer: 75")  # 75 is not given
    assert not ok("Answer: 50+25+0")  # 0 is not given
    assert not ok("Answer: (50-25)*3+7")  # wrong value
    assert not ok("Answer: 25*3/(7-7)")  # division by zero
    assert not ok("Answer: __import__('os').system('echo hi')")
    assert not ok("Answer: -(-75)")  # no unary operators
    assert not ok("Answer: 50 25")
    assert not ok("Answer: (" * 50 + "75" + ")" * 50)
    assert task.is_correct("Answer: 50*3/2", "50*3/2", numbers=[50, 3, 2], target=75)
    assert task.is_correct("Answer: 50+25", "x", numbers="3 7 25 50", target="75")
    assert not task.is_correct("Answer: 50/2*3/1", "x", numbers=[50, 3, 2], target=75)  # 1 not given


def test_countdown_parser() -> None:
    assert evaluate("(50-25)*3") == (75, [50, 25, 3])
    assert evaluate("7/2*2")[0] == 7
    for bad in ["", "1+", "(1", "1)", "2**3", "1 +* 2", "1.5", "os", "1e3", "-1", "9" * 7, "1+" * 200 + "1"]:
        with pytest.raises(ExpressionError):
            evaluate(bad)


def test_countdown_reads_numbers_from_text_when_columns_missing() -> None:
    task = get_task("countdown")
    row = task.load("train", n=1, seed=5)[0]
    sol, ans = row["solution"], row["answer"]
    assert task.reward([sol], answer=[ans], question=[row["question"]]) == [1.0]
    assert task.reward([sol], answer=[ans], prompts=[row["prompt"]]) == [1.0]
    assert task.reward([sol], answer=[ans]) == [1.0]  # from the reference expression itself
    assert task.reward(["Answer: 1+1"], answer=[ans], prompts=[row["prompt"]]) == [0.0]
    assert task.reward([sol], answer=[None]) == [None]


# -------------------------------------------------------------------------------------- file-backed tasks


def _write(tmp_path: Path, name: str, rows: list[dict]) -> Path:
    f = tmp_path / name
    f.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return f


GSM_ROWS = [
    {
        "question": f"Q{i}: how many?",
        "answer": f"a = {i}*2 = <<{i}*2={2 * i}>>{2 * i}\nso {2 * i}\n#### {2 * i:,}",
    }
    for i in range(1, 700, 3)
]


def test_gsm8k_loader(tmp_path: Path) -> None:
    _write(tmp_path, "train.jsonl", GSM_ROWS)
    _write(tmp_path, "test.jsonl", GSM_ROWS[:5])
    task = get_task("gsm8k", path=tmp_path)
    ds = task.load("train")
    assert len(ds) == len(GSM_ROWS) and ds[0]["question"] == "Q1: how many?"
    assert set(ds.column_names) == {"question", "prompt", "answer", "solution"}
    last = ds[-1]
    assert last["answer"] == "1394" and last["solution"] == "a = 697*2 = 1394\nso 1394\nAnswer: 1394"
    assert last["prompt"].startswith("Question: Q697") and last["prompt"].endswith("\n")
    sub = task.load("train", n=10, seed=1)
    assert len(sub) == 10 and sub.to_list() == task.load("train", n=10, seed=1).to_list()
    assert sub.to_list()[:5] == task.load("train", n=5, seed=1).to_list()
    assert sub["question"] != task.load("train", n=10, seed=2)["question"]
    assert len(task.load("test", n=100)) == 5
    single = get_task("gsm8k", path=tmp_path / "train.jsonl")  # one file, both splits: split by a hash
    assert set(single.load("train")["question"]).isdisjoint(single.load("test")["question"])
    assert task.reward(ds["solution"], answer=ds["answer"]) == [1.0] * len(ds)
    with pytest.raises(ValueError, match="no such file"):
        get_task("gsm8k", path=tmp_path / "missing").load("train")
    (tmp_path / "test.jsonl").unlink()
    with pytest.raises(ValueError, match="test.jsonl"):
        task.load("test")


def test_math500_loader(tmp_path: Path) -> None:
    rows = [
        {
            "question": "What is $1/2$?",
            "answer": "It is\n\n$\\boxed{\\frac{1}{2}}$.\n[asy]\ndraw(x);\n[/asy]",
        },
        {"question": "Name?", "answer": "Clearly $\\boxed{\\text{Evelyn}}$.The answer is: \\text{Evelyn}"},
    ]
    _write(tmp_path, "test.jsonl", rows)
    task = get_task("math500", path=tmp_path)
    ds = task.load()
    assert ds["answer"] == ["\\frac{1}{2}", "\\text{Evelyn}"]
    assert ds[0]["solution"] == "It is\n$\\boxed{\\frac{1}{2}}$.\nAnswer: \\frac{1}{2}"
    assert ds[1]["solution"] == "Clearly $\\boxed{\\text{Evelyn}}$.\nAnswer: \\text{Evelyn}"
    assert ds[0]["prompt"].startswith("Problem: What is") and ds[0]["prompt"].endswith("\n")
    assert len(task.load("test", n=1, seed=3)) == 1
    with pytest.raises(ValueError, match="only a 'test' split"):
        task.load("train")


@pytest.mark.skipif(not (DATA / "gsm8k" / "test.jsonl").exists(), reason="shared GSM8K data not present")
def test_real_data_loads() -> None:
    gsm = get_task("gsm8k", path=DATA / "gsm8k")
    assert len(gsm.load("train")) == 7473 and len(gsm.load("test")) == 1319
    m = get_task("math500", path=DATA / "math500").load("test")
    assert len(m) == 500 and all(m["answer"])
    assert all(s.split("\n")[-1] == f"Answer: {a}" for s, a in zip(m["solution"], m["answer"]))


# --------------------------------------------------------------------------------------------- bad data

GOOD = json.dumps({"question": "Q?", "answer": "2+2 \\boxed{4}\n#### 4"}) + "\n"
BAD_LINES = {
    "missing field": (json.dumps({"question": "Q?"}) + "\n", "field 'answer'", "missing"),
    "empty question": (
        json.dumps({"question": "  ", "answer": "#### 4 \\boxed{4}"}) + "\n",
        "field 'question'",
        "empty",
    ),
    "invalid json": ('{"question": "Q?", "answer": \n', "", "invalid JSON"),
    "non-utf8": (b'{"question": "Q\xff?", "answer": "#### 4 \\\\boxed{4}"}\n', "", "UTF-8"),
    "not a string": (
        json.dumps({"question": 3, "answer": "#### 4 \\boxed{4}"}) + "\n",
        "field 'question'",
        "string",
    ),
}


@pytest.mark.parametrize("name", ["gsm8k", "math500"])
@pytest.mark.parametrize("problem", list(BAD_LINES))
def test_bad_data_names_file_line_field(tmp_path: Path, name: str, problem: str) -> None:
    bad, field, what = BAD_LINES[problem]
    f = tmp_path / "test.jsonl"
    f.write_bytes(GOOD.encode() * 2 + (bad if isinstance(bad, bytes) else bad.encode()) + GOOD.encode())
    with pytest.raises(ValueError) as err:
        get_task(name, path=f).load("test")
    msg = str(err.value)
    assert str(f) in msg and "line 3" in msg and field in msg and what in msg


@pytest.mark.parametrize(
    ("name", "answer", "needle"),
    [("gsm8k", "no final line", "####"), ("math500", "no boxed answer", "boxed")],
)
def test_bad_reference_names_line(tmp_path: Path, name: str, answer: str, needle: str) -> None:
    f = _write(tmp_path, "test.jsonl", [{"question": "Q?", "answer": answer}])
    with pytest.raises(ValueError, match=rf"line 1: field 'answer'.*{needle}"):
        get_task(name, path=f).load("test")


def test_empty_file(tmp_path: Path) -> None:
    f = tmp_path / "test.jsonl"
    f.write_text("\n\n")
    with pytest.raises(ValueError, match="no rows"):
        get_task("gsm8k", path=f).load("test")


@pytest.mark.parametrize(
    ("step", "expected"),
    [
        ("45*2=90\n", True),
        ("23+90=113", True),
        ("113-7=106\n", True),
        ("3-8=-5", True),
        ("24-2=28\n", False),
        ("5+7=13", False),
        ("Answer: 106", None),
        ("45*2", None),
        ("", None),
    ],
)
def test_arith_step_check(step: str, expected: bool | None) -> None:
    from thinktree.rewards.tasks.arith import ArithTask

    assert ArithTask.step_is_correct(step) is expected
    worked = get_task("arith", ops=(3, 3), digits=2).load("train", n=20, seed=0)
    for row in worked:  # every line of a worked solution is right
        assert all(ArithTask.step_is_correct(s) is not False for s in row["solution"].split("\n"))
