"""A strict JSON-lines reader shared by the file-backed tasks (gsm8k, math500).

Every problem raises one ``ValueError`` naming the file, the line number and the field, and nothing is returned
half-loaded: invalid UTF-8, invalid JSON, a line that is not an object, a missing field, a field that is not a
string, or an empty (whitespace-only) field. Blank lines are skipped.

A single file that serves both splits is split by :func:`hash_split`: each row goes to ``test`` or ``train`` by a
stable hash of its question (whitespace-normalised, seed-independent, as the synthetic tasks split), so the held-out
prompts never overlap the training ones, and the log says so.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path

from thinktree.rewards.tasks.base import check_split, split_of

logger = logging.getLogger(__name__)
_ANNOUNCED: set[tuple[str, float]] = set()


def read_jsonl(
    path: str | os.PathLike[str],
    fields: Sequence[str],
    validate: Callable[[dict[str, str]], str | None] | None = None,
) -> list[dict[str, str]]:
    """The rows of ``path``, each a dict with exactly ``fields`` (non-empty strings).

    ``validate(row)`` may return an error message (naming the field) for a task-specific check.
    """
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise ValueError(f"{path}: cannot read file ({e.strerror or e})") from e
    rows: list[dict[str, str]] = []
    for lineno, line_bytes in enumerate(raw.split(b"\n"), start=1):
        where = f"{path}, line {lineno}"
        try:
            line = line_bytes.decode("utf-8")
        except UnicodeDecodeError as e:
            raise ValueError(f"{where}: invalid UTF-8 at byte {e.start} of the line") from e
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{where}: invalid JSON ({e.msg} at column {e.colno})") from e
        if not isinstance(obj, dict):
            raise ValueError(f"{where}: expected a JSON object, got {type(obj).__name__}")
        row: dict[str, str] = {}
        for field in fields:
            if field not in obj:
                raise ValueError(f"{where}: missing field {field!r}")
            value = obj[field]
            if not isinstance(value, str):
                raise ValueError(f"{where}: field {field!r} must be a string, got {type(value).__name__}")
            if not value.strip():
                raise ValueError(f"{where}: field {field!r} is empty")
            row[field] = value
        problem = validate(row) if validate is not None else None
        if problem:
            raise ValueError(f"{where}: {problem}")
        rows.append(row)
    if not rows:
        raise ValueError(f"{path}: no rows")
    return rows


def resolve_split_file(path: str | os.PathLike[str], split: str) -> Path:
    """``path`` itself if it is a file, else ``path/<split>.jsonl``; a clear error if that does not exist."""
    p = Path(path)
    if p.is_file():
        return p
    if p.is_dir():
        f = p / f"{split}.jsonl"
        if f.is_file():
            return f
        have = sorted(x.name for x in p.glob("*.jsonl"))
        raise ValueError(f"{p}: no {split}.jsonl for split {split!r} (found: {have})")
    raise ValueError(f"{p}: no such file or directory")


def hash_split(
    rows: Sequence[dict[str, str]],
    split: str,
    test_frac: float,
    source: str | os.PathLike[str],
    key: str = "question",
) -> list[dict[str, str]]:
    """The rows of one file that belong to ``split``: ``test`` when the stable hash of ``row[key]`` (whitespace
    normalised) falls below ``test_frac``, else ``train``; identical questions always land together."""
    check_split(split)
    if not 0.0 < test_frac < 1.0:
        raise ValueError(f"task.kwargs.test_frac must be between 0 and 1 (exclusive), got {test_frac!r}")
    sides = [split_of(" ".join(r[key].split()), test_frac) for r in rows]
    counts = {s: sides.count(s) for s in ("train", "test")}
    if (str(source), test_frac) not in _ANNOUNCED:
        _ANNOUNCED.add((str(source), test_frac))
        logger.info(
            "%s serves both splits: split by a stable hash of the question, test_frac %g: %d train / %d test rows, "
            "none in both (pass a directory with train.jsonl and test.jsonl to choose the splits yourself)",
            source, test_frac, counts["train"], counts["test"],
        )  # fmt: skip
    mine = [r for r, s in zip(rows, sides) if s == split]
    if not mine:
        raise ValueError(
            f"{source}: none of its {len(rows)} rows falls in the {split!r} split (a single file is split by a hash "
            f"of the question, test_frac {test_frac:g}); add rows, change task.kwargs.test_frac, or pass a directory "
            "with train.jsonl and test.jsonl"
        )
    return mine
