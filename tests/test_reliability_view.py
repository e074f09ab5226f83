"""Issue 14, defect 12: ``thinktree view`` on a directory, a malformed line, a non-tree record, a truncated last
line or an empty file: one-line errors (exit 2) or notices, never a traceback or silence."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_view import make_tree

from thinktree.search.store import TreeStore
from thinktree.trainer.cli import main
from thinktree.trainer.view import load_trees


def _store(path: Path, keys: tuple[int, ...] = (7, 8)) -> Path:
    store = TreeStore(path)
    for key in keys:
        store.append(make_tree(key))
    return path


def _error_line(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("thinktree view: ") and "Traceback" not in err, err
    return lines[0]


def test_directory_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _store(tmp_path / "round-01" / "trees.jsonl")
    assert main(["view", str(tmp_path / "round-01")]) == 2
    line = _error_line(capsys)
    assert (
        f"{tmp_path / 'round-01'} is a directory; pass a JSONL file (JSONL files in it: trees.jsonl)" in line
    )
    assert not (tmp_path / "round-01.html").exists()


@pytest.mark.parametrize(
    ("bad", "expected"),
    [
        ('{"key": 3, "tree": \n', "line 2 is not valid JSON"),
        ("[1, 2]\n", "line 2 is a JSON list, not a record"),
        ('{"key": 3, "tree": {"prompt": "x"}}\n', "line 2 is not a search tree (KeyError"),
    ],
)
def test_malformed_line_names_file_and_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], bad: str, expected: str
) -> None:
    path = tmp_path / "trees.jsonl"
    good = _store(tmp_path / "good.jsonl").read_text().splitlines(keepends=True)
    path.write_text(good[0] + bad + good[1])
    assert main(["view", str(path)]) == 2
    line = _error_line(capsys)
    assert f"{path}: {expected}" in line
    assert not path.with_suffix(".html").exists()


def test_truncated_last_line_is_a_notice(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = _store(tmp_path / "trees.jsonl")
    record = json.dumps({"key": 9, "tree": make_tree(9).to_dict(), "result": None})
    with open(path, "a") as f:
        f.write(record[:40])  # a killed write: no newline
    assert main(["view", str(path)]) == 0
    captured = capsys.readouterr()
    assert (
        f"thinktree view: notice: {path}: line 3 is incomplete (40 bytes, no newline): skipped"
        in captured.err
    )
    assert path.with_suffix(".html").read_text().count('<section class="tree"') == 2
    assert [t.key for t in load_trees(path)[0]] == [7, 8]


def test_empty_file_is_a_notice(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "trees.jsonl"
    path.write_text("")
    assert main(["view", str(path)]) == 0
    assert f"thinktree view: notice: {path} holds no records (an empty file)" in capsys.readouterr().err
    assert "No trees." in path.with_suffix(".html").read_text()


def test_missing_file_and_bad_signals(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["view", str(tmp_path / "nope.jsonl")]) == 2
    assert f"{tmp_path / 'nope.jsonl'}: no such file" in _error_line(capsys)
    path = _store(tmp_path / "trees.jsonl")
    signals = tmp_path / "signals.jsonl"
    signals.write_text("not json\n{}\n")
    assert main(["view", str(path), "--signals", str(signals)]) == 2
    assert f"{signals}: line 1 is not valid JSON" in _error_line(capsys)
