"""Crash-safe JSONL storage of search trees, and resumable searches.

One record per line: ``{"key": tree key, "tree": Tree.to_dict(), "result": SearchResult.summary() or null}``.
Each line is written whole with a single ``write`` + ``flush`` + ``fsync``, so a killed run leaves at most a
partial LAST line; opening a store detects it (no trailing newline, or not valid JSON) and truncates it away, so
later appends start on a clean line.

Resume with :func:`search_resumable`: prompts whose key is already stored are skipped, the rest are searched in
chunks and appended as each chunk finishes. Tree seeds derive from (base seed, key) — see ``tree_rng`` — so a
resumed run with the same ``rng`` seed produces exactly the trees an uninterrupted run would have.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np

from thinktree.search.budget import SearchResult, base_seed_from
from thinktree.search.tree import Tree
from thinktree.search.types import Trajectory

__all__ = ["TreeStore", "search_resumable"]

log = logging.getLogger(__name__)


def _dumps(record: dict) -> bytes:
    return (json.dumps(record, sort_keys=True, separators=(",", ":"), ensure_ascii=False) + "\n").encode()


class TreeStore:
    """Append-only JSONL file of trees (one per line). Opening it truncates a partial last line."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._repair()

    def _repair(self) -> None:
        """Cut a trailing partial line (a write interrupted by a kill) so that appends start clean."""
        if not self.path.exists():
            return
        data = self.path.read_bytes()
        good = len(data)
        if data and not data.endswith(b"\n"):
            good = data.rfind(b"\n") + 1
        elif data:
            last_start = data.rfind(b"\n", 0, len(data) - 1) + 1
            try:
                json.loads(data[last_start:])
            except ValueError:
                good = last_start
        if good < len(data):
            log.warning("TreeStore %s: dropping a partial last line (%d bytes)", self.path, len(data) - good)
            with open(self.path, "r+b") as f:
                f.truncate(good)
                f.flush()
                os.fsync(f.fileno())

    def append(self, item: SearchResult | Tree) -> None:
        """Write one tree (with its result summary, for a SearchResult) as one line: write + flush + fsync."""
        if isinstance(item, SearchResult):
            record = {"key": item.tree.key, "tree": item.tree.to_dict(), "result": item.summary()}
        elif isinstance(item, Tree):
            record = {"key": item.key, "tree": item.to_dict(), "result": None}
        else:
            raise TypeError(f"TreeStore.append: expected a SearchResult or Tree, got {type(item).__name__}")
        line = _dumps(record)
        with open(self.path, "ab") as f:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())

    def records(self) -> Iterator[dict]:
        """The raw records, in file order; a partial last line (written after opening) is ignored."""
        if not self.path.exists():
            return
        with open(self.path, "rb") as f:
            lines = f.read().split(b"\n")
        for n, raw in enumerate(lines):
            if not raw.strip():
                continue
            try:
                yield json.loads(raw)
            except ValueError:
                if n == len(lines) - 1:  # no newline after it: an interrupted write
                    log.warning("TreeStore %s: ignoring a partial last line", self.path)
                    return
                raise ValueError(f"TreeStore {self.path}: line {n + 1} is not valid JSON") from None

    def load(self) -> list[Tree]:
        """All stored trees, in file order."""
        return [Tree.from_dict(r["tree"]) for r in self.records()]

    def results(self) -> list[dict]:
        """The stored result summaries (None for bare trees), in file order."""
        return [r.get("result") for r in self.records()]

    def done_keys(self) -> set[int]:
        """Keys of the stored trees (prompts a resumed search skips)."""
        return {r["key"] for r in self.records()}

    def __len__(self) -> int:
        return sum(1 for _ in self.records())


def search_resumable(
    store: TreeStore,
    prompts: Sequence[Trajectory],
    search_fn: Callable[..., list[SearchResult]],
    *args,
    rng: np.random.Generator,
    chunk_size: int | None = None,
    **kwargs,
) -> list[SearchResult]:
    """Run ``search_fn(chunk, *args, rng=..., **kwargs)`` (``search`` or a baseline) on the prompts whose key
    is not yet in ``store``, ``chunk_size`` prompts per call (None = all at once), appending each result as its
    chunk finishes. Returns the new results only (``store.load()`` has them all).

    One base seed is drawn from ``rng``; every chunk's call gets a fresh generator that yields that same base
    seed, so the trees equal those of a single ``search_fn(prompts, rng=np.random.default_rng(seed))`` call where
    ``seed = rng.integers(0, 2**63)`` — whether or not the run was interrupted and resumed.
    """
    if chunk_size is not None and chunk_size <= 0:
        raise ValueError(f"search_resumable: chunk_size must be positive or None, got {chunk_size!r}")
    seed = base_seed_from(rng)
    done = store.done_keys()
    todo = [p for p in prompts if p.key not in done]
    step = chunk_size or max(1, len(todo))
    results: list[SearchResult] = []
    for start in range(0, len(todo), step):
        chunk = todo[start : start + step]
        for result in search_fn(chunk, *args, rng=np.random.default_rng(seed), **kwargs):
            store.append(result)
            results.append(result)
    return results
