"""Many sandboxed runs in parallel: :class:`SandboxPool` (a thread pool, each run its own subprocess tree) and
:func:`run_many`."""

from __future__ import annotations

import os
from collections.abc import Iterable
from concurrent.futures import Future, ThreadPoolExecutor

from .result import SandboxResult
from .runner import run_code
from .uids import UID_SLOTS


class SandboxPool:
    """Runs many sandboxed executions in parallel on a thread pool (each one its own subprocess tree).

    ``defaults`` are keyword arguments of :func:`run_code` applied to every run (overridable per call).
    Use as a context manager or call :meth:`close`.
    """

    def __init__(self, max_workers: int | None = None, **defaults: object) -> None:
        self.max_workers = max(1, max_workers or min(8, os.cpu_count() or 1))
        if self.max_workers > UID_SLOTS:
            raise ValueError(f"max_workers must be <= {UID_SLOTS} (one sandbox uid per running sandbox)")
        self.defaults = dict(defaults)
        self._executor = ThreadPoolExecutor(self.max_workers, thread_name_prefix="sandbox")

    def submit(self, code: str, **kwargs: object) -> Future[SandboxResult]:
        return self._executor.submit(run_code, code, **{**self.defaults, **kwargs})  # type: ignore[arg-type]

    def run(self, code: str, **kwargs: object) -> SandboxResult:
        return self.submit(code, **kwargs).result()

    def run_many(self, codes: Iterable[str], **kwargs: object) -> list[SandboxResult]:
        """Results in the order of ``codes``."""
        futures = [self.submit(code, **kwargs) for code in codes]
        return [f.result() for f in futures]

    def close(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> SandboxPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def run_many(
    codes: Iterable[str], *, max_workers: int | None = None, **kwargs: object
) -> list[SandboxResult]:
    """Run ``codes`` in parallel through a temporary :class:`SandboxPool`; results in input order."""
    with SandboxPool(max_workers) as pool:
        return pool.run_many(codes, **kwargs)
