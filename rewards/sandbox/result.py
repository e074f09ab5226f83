"""The verdict of one sandboxed run (:class:`SandboxResult`), the sandbox's own errors, and how the launcher's
status report becomes a verdict."""

from __future__ import annotations

import errno
import signal
from dataclasses import dataclass


class SandboxError(RuntimeError):
    """The sandbox itself failed (not the code): setup error, launcher crash. Never a verdict on the code."""


class SandboxUnavailableError(SandboxError):
    """Namespaces cannot be created here and ``allow_network_fallback`` is False."""


@dataclass
class SandboxResult:
    """Verdict of one execution. ``ok`` means: exited with status 0 within the limits."""

    ok: bool
    stdout: str
    stderr: str
    exit_code: int | None  # the process's exit status; ``-signum`` when killed by a signal; None on timeout
    timed_out: bool
    killed_by_signal: int | None
    error: str | None  # short reason when not ok: "timeout after 2s", "MemoryError", "exit code 3", ...
    wall_s: float
    truncated: bool = False  # stdout or stderr was longer than max_output_bytes
    isolation: str = "namespaces"  # "namespaces" or "fallback" (rlimits/uid only, see module docstring)
    memory_cap: str = "rlimit"  # "cgroup" (one limit for the whole sandbox) or "rlimit" (see run_code)


class _NamespaceError(Exception):
    """The host does not allow the sandbox's namespaces (a structural errno): fall back or refuse."""


# errnos meaning "this host does not allow it" (cached: fall back or refuse); others (EAGAIN, ENOMEM, ENOSPC:
# e.g. too many namespaces right now) are raised as SandboxError without marking namespaces unavailable
_STRUCTURAL_ERRNOS = {errno.EPERM, errno.EACCES, errno.ENOSYS, errno.EINVAL, errno.ENOENT, errno.ENOTDIR}


def _final_status(status: bytes) -> tuple[str, str] | None:
    for line in status.decode("utf-8", "replace").splitlines():
        kind, _, rest = line.partition(" ")
        if kind in ("exit", "signal", "error", "nserror"):
            return kind, rest
    return None


def _verdict(
    bufs: dict[str, bytearray],
    totals: dict[str, int],
    timed_out: bool,
    timeout_s: float,
    wall_s: float,
    cap: int,
    mode: str,
) -> SandboxResult:
    stdout = bytes(bufs["out"]).decode("utf-8", "replace")
    stderr = bytes(bufs["err"]).decode("utf-8", "replace")
    truncated = totals["out"] > cap or totals["err"] > cap
    isolation = "fallback" if mode == "none" else "namespaces"
    final = _final_status(bufs["status"])
    exit_code: int | None = None
    sig: int | None = None
    error: str | None = None
    if final is not None and final[0] == "nserror":
        err, _, msg = final[1].partition(" ")
        if int(err) in _STRUCTURAL_ERRNOS:
            raise _NamespaceError(msg)
        raise SandboxError(f"sandbox setup failed (transient?): {msg}")
    if final is not None and final[0] == "error":
        raise SandboxError(f"sandbox setup failed: {final[1]}")
    if timed_out:
        error = f"timeout after {timeout_s:g}s"
    elif final is None:
        raise SandboxError(f"sandbox launcher died without a verdict; stderr: {stderr[-500:]!r}")
    elif final[0] == "signal":
        sig = int(final[1])
        exit_code = -sig
        name = _signame(sig)
        if sig == signal.SIGXCPU:
            error = "cpu time limit exceeded (SIGXCPU)"
        elif sig == signal.SIGXFSZ:
            error = "file size limit exceeded (SIGXFSZ)"
        else:
            error = f"killed by signal {name}"
    else:
        exit_code = int(final[1])
        if exit_code != 0:
            error = _last_line(stderr) or f"exit code {exit_code}"
    ok = not timed_out and exit_code == 0
    return SandboxResult(ok, stdout, stderr, exit_code, timed_out, sig, error, wall_s, truncated, isolation)


def _signame(sig: int) -> str:
    try:
        return signal.Signals(sig).name
    except ValueError:
        return str(sig)


def _last_line(text: str) -> str | None:
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    return lines[-1][:300] if lines else None
