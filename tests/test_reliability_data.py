"""Issue 14, defects 4 and 11: a single data file serving both splits is split by a stable hash of the question
(held-out never overlaps train; the log says so); README's "Your own data" command works as written."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from thinktree.rewards import get_task
from thinktree.trainer.config import load_config

ROOT = Path(__file__).resolve().parents[1]


def _rows(n: int) -> list[dict]:
    return [
        {"question": f"Q{i}: what is {i} + 2?", "answer": f"{i} + 2 = {i + 2}\n#### {i + 2}"}
        for i in range(n)
    ]


def _write(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _held_out(question: str, frac: float) -> bool:
    """The documented rule, computed here independently: blake2b-64 of the whitespace-normalised question."""
    h = int.from_bytes(hashlib.blake2b(" ".join(question.split()).encode(), digest_size=8).digest(), "big")
    return h / 2**64 < frac


@pytest.mark.parametrize("frac", [0.1, 0.5])
def test_single_file_is_split_by_question_hash(
    tmp_path: Path, frac: float, caplog: pytest.LogCaptureFixture
) -> None:
    rows = _rows(200)
    rows.append({"question": "  Q7:  what is 7 + 2? ", "answer": "#### 9"})  # Q7 again, other spacing
    f = _write(tmp_path / f"all-{frac}.jsonl", rows)
    task = get_task("gsm8k", path=f, test_frac=frac)
    with caplog.at_level(logging.INFO):
        train, test = task.load("train"), task.load("test")
    want_test = [r["question"].strip() for r in rows if _held_out(r["question"], frac)]
    want_train = [r["question"].strip() for r in rows if not _held_out(r["question"], frac)]
    assert sorted(test["question"]) == sorted(want_test) and sorted(train["question"]) == sorted(want_train)
    assert set(train["question"]).isdisjoint(test["question"])
    assert len(train) + len(test) == len(rows) and 0 < len(test) < len(rows)
    assert sum("Q7:" in q for q in test["question"]) in (0, 2)  # the duplicate lands with its twin
    assert f"{f} serves both splits: split by a stable hash of the question" in caplog.text
    assert f"{len(want_train)} train / {len(want_test)} test rows" in caplog.text
    # a subsample of the test split stays inside it
    assert set(task.load("test", n=3, seed=5)["question"]) <= set(want_test)


def test_directory_splits_are_taken_as_given(tmp_path: Path) -> None:
    _write(tmp_path / "train.jsonl", _rows(10))
    _write(tmp_path / "test.jsonl", _rows(3))
    task = get_task("gsm8k", path=tmp_path)
    assert len(task.load("train")) == 10 and len(task.load("test")) == 3


def test_empty_split_and_bad_fraction_are_clear_errors(tmp_path: Path) -> None:
    rows = _rows(3)
    f = _write(tmp_path / "few.jsonl", rows)
    frac = 0.01
    empty = "test" if not any(_held_out(r["question"], frac) for r in rows) else "train"
    with pytest.raises(
        ValueError, match=rf"{re.escape(str(f))}: none of its 3 rows falls in the '{empty}' split"
    ):
        get_task("gsm8k", path=f, test_frac=frac).load(empty)
    with pytest.raises(ValueError, match="test_frac must be between 0 and 1"):
        get_task("gsm8k", path=f, test_frac=1.0).load("train")


def test_unknown_task_option_names_it() -> None:
    with pytest.raises(
        ValueError, match=r"task 'gsm8k' has no option\(s\) 'digits' \(its options: path, hub_id"
    ):
        get_task("gsm8k", path="x.jsonl", digits=1)
    with pytest.raises(ValueError, match=r"task 'arith' has no option\(s\) 'path'"):
        get_task("arith", path="x.jsonl")
    assert get_task("arith", digits=1).digits == 1


def _readme_own_data() -> tuple[str, list[str]]:
    """The "Your own data" snippet of the README: the data-writing Python and the thinktree command's argv."""
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Your own data", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```bash\n(.*?)```", section, re.DOTALL).group(1)
    script = re.search(r"python - <<'EOF'\n(.*?)\nEOF\n", block, re.DOTALL).group(1)
    command = [ln for ln in block.splitlines() if ln.startswith("thinktree ")]
    assert len(command) == 1, block
    return script, shlex.split(command[0])


def test_readme_own_data_command_loads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The README command's recipe, overrides, task options and data, as ``thinktree train`` reads them."""
    script, argv = _readme_own_data()
    assert argv[:4] == ["thinktree", "train", "--config", "recipes/quickstart.yaml"]
    monkeypatch.chdir(tmp_path)
    exec(compile(script, "README", "exec"), {})  # writes mydata.jsonl
    cfg = load_config(ROOT / argv[3], argv[4:])
    task = get_task(cfg.task.name, **cfg.task.kwargs)
    train = task.load("train", n=cfg.task.train_size, seed=cfg.seed)
    test = task.load("test", n=cfg.task.eval_size, seed=cfg.seed)
    assert len(train) > 300 and 10 < len(test) <= cfg.task.eval_size
    assert set(train["question"]).isdisjoint(test["question"])
    assert all(s.endswith(f"Answer: {a}") for s, a in zip(train["solution"], train["answer"]))


@pytest.mark.slow
def test_readme_own_data_command_runs(tmp_path: Path) -> None:
    """The README snippet exactly as written, in a fresh directory (the quickstart recipe: a few minutes)."""
    script, argv = _readme_own_data()
    (tmp_path / "recipes").symlink_to(ROOT / "recipes")
    subprocess.run([sys.executable, "-"], input=script, text=True, cwd=tmp_path, check=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "thinktree.trainer.cli", *argv[1:]]
    done = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, env=env, timeout=1800)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((tmp_path / "runs" / "mydata" / "summary.json").read_text())
    assert summary
