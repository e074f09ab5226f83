"""Caller side of one sandboxed run: :func:`run_code` validates the request, claims a sandbox uid, starts the
launcher (``python -I -S -B -c _BOOTSTRAP``), feeds it its config, reads stdout/stderr/status incrementally
under the wall-clock deadline, stops and reaps the launcher's tree, and turns the status into a verdict."""

from __future__ import annotations

import marshal
import os
import selectors
import signal
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass

from . import launcher
from .cgroup import MemoryCgroup, create_memory_cgroup
from .kernel import WORKDIR
from .result import (
    SandboxError,
    SandboxResult,
    SandboxUnavailableError,
    _final_status,
    _NamespaceError,
    _verdict,
)
from .uids import _kill_uid, _slots

DEFAULT_HIDE_PATHS: tuple[str, ...] = ("/root", "/home")
MAX_CODE_BYTES = 1 << 20

# The launcher: imports this package's launcher module (and its kernel module) from the directory given as
# argv[1] under a private package name (with -I -S the package itself is not importable) and starts it.
_BOOTSTRAP = (
    "import sys\n"
    "pkg = type(sys)('_thinktree_sandbox')\n"
    "pkg.__path__ = [sys.argv[1]]\n"
    "sys.modules[pkg.__name__] = pkg\n"
    "from _thinktree_sandbox.launcher import _launcher_main\n"
    "_launcher_main()\n"
)
_NS_UNAVAILABLE: dict[bool, str] = {}  # is_root -> why namespaces could not be created (cached per process)
MEMORY_CAPS = ("auto", "cgroup", "rlimit")
RLIMIT_MAX_PROCS = 4
"""Without a memory cgroup the sandbox gets at most this many processes (and threads): RLIMIT_NPROC, and each
process ``memory_mb / procs`` of address space, so all of them together stay within ``memory_mb``."""


def run_code(
    code: str,
    *,
    timeout_s: float = 2.0,
    cpu_s: int = 2,
    memory_mb: int = 256,
    max_output_bytes: int = 4096,
    max_file_bytes: int = 1_000_000,
    max_procs: int = 32,
    max_open_files: int = 64,
    disk_mb: int = 32,
    python: str | None = None,
    hide_paths: Sequence[str] = DEFAULT_HIDE_PATHS,
    allow_network_fallback: bool = False,
    uid_base: int | None = None,
    memory_cap: str = "auto",
) -> SandboxResult:
    """Run ``code`` (a Python program) in the sandbox and return the verdict (see the module docstring).

    ``timeout_s``: wall clock for the whole run (start-up included); ``memory_mb``: the memory of the sandbox as
    a whole, every process of it together (see ``memory_cap``); ``cpu_s``, ``max_file_bytes``, ``max_procs``
    (processes + threads), ``max_open_files``: per-process rlimits;
    ``max_output_bytes``: kept of stdout and of stderr each; ``disk_mb``: size of the private /tmp.
    ``python``: interpreter for the code (default: the base interpreter of this one), always run with
    ``-I -S`` (standard library only). ``hide_paths``: dirs covered by an empty tmpfs. ``uid_base``: first
    sandbox uid (root only). ``allow_network_fallback``: run with rlimits only where namespaces are
    unavailable instead of raising :class:`SandboxUnavailableError`.

    ``memory_cap``: how ``memory_mb`` is enforced. ``"cgroup"``: a memory cgroup per run limited to ``memory_mb +
    disk_mb`` (the private /tmp is memory too), swap off, plus RLIMIT_AS ``memory_mb`` per process (a single
    process gets a clean ``MemoryError``); :class:`SandboxUnavailableError` where no cgroup can be made.
    ``"rlimit"``: at most ``min(max_procs, RLIMIT_MAX_PROCS)`` processes and threads, each ``memory_mb`` divided by
    that number of address space. ``"auto"`` (default): the cgroup where one can be made, else the rlimits.
    ``SandboxResult.memory_cap`` says which one held the run.

    Raises :class:`SandboxError` if the sandbox itself fails; anything the code does is a verdict.
    """
    if not isinstance(code, str):
        raise TypeError(f"code must be str, got {type(code).__name__}")
    code_bytes = code.encode("utf-8", "surrogatepass")
    if len(code_bytes) > MAX_CODE_BYTES:
        raise ValueError(f"code is {len(code_bytes)} bytes; the limit is {MAX_CODE_BYTES}")
    if timeout_s <= 0 or cpu_s <= 0 or memory_mb <= 0 or max_procs <= 0 or max_output_bytes < 0:
        raise ValueError("timeout_s, cpu_s, memory_mb and max_procs must be positive")
    if memory_cap not in MEMORY_CAPS:
        raise ValueError(f"memory_cap must be one of {MEMORY_CAPS}, got {memory_cap!r}")
    limits = {
        "cpu_s": int(cpu_s),
        "memory_bytes": int(memory_mb) << 20,
        "max_file_bytes": int(max_file_bytes),
        "max_procs": int(max_procs),
        "max_open_files": max(int(max_open_files), 16),
    }
    py = os.path.realpath(python or getattr(sys, "_base_executable", None) or sys.executable)
    root = os.geteuid() == 0
    fallback_reason = _NS_UNAVAILABLE.get(root)
    if fallback_reason is not None and not allow_network_fallback:
        raise SandboxUnavailableError(_unavailable_msg(fallback_reason))
    while True:
        mode = ("root" if root else "userns") if fallback_reason is None else "none"
        group, run_limits = _memory_cap(memory_cap, limits, memory_mb, disk_mb)
        try:
            return _run_once(
                code, mode, py, run_limits, timeout_s, max_output_bytes, disk_mb, hide_paths, uid_base, group
            )
        except _NamespaceError as exc:
            _NS_UNAVAILABLE[root] = str(exc)
            if not allow_network_fallback:
                raise SandboxUnavailableError(_unavailable_msg(str(exc))) from None
            fallback_reason = str(exc)


def _memory_cap(
    memory_cap: str, limits: dict[str, int], memory_mb: int, disk_mb: int
) -> tuple[MemoryCgroup | None, dict[str, int]]:
    """The run's memory cgroup (None: rlimits alone) and its rlimits (see ``run_code``'s ``memory_cap``)."""
    group = None
    if memory_cap != "rlimit":
        group = create_memory_cgroup((int(memory_mb) + int(disk_mb)) << 20)
        if group is None and memory_cap == "cgroup":
            raise SandboxUnavailableError(
                "memory_cap='cgroup': no memory cgroup can be created here (cgroup v2 with the memory controller "
                "delegated, or cgroup v1's memory hierarchy, writable; see THINKTREE_SANDBOX_CGROUP)"
            )
    if group is not None:
        return group, limits
    procs = min(limits["max_procs"], RLIMIT_MAX_PROCS)  # rlimits alone: fewer processes, each a share
    return None, {**limits, "max_procs": procs, "memory_bytes": (int(memory_mb) << 20) // procs}


def _unavailable_msg(reason: str) -> str:
    return (
        f"cannot create the sandbox namespaces ({reason}); refusing to run model code without network "
        "isolation. Pass allow_network_fallback=True to run with rlimits only (see thinktree.rewards.sandbox)."
    )


def _shadow_points(py_root: str, hide_paths: Sequence[str], drop_uid: bool) -> list[str]:
    """Top-level dirs the init process covers with a tmpfs (the hidden ones plus, when we drop to another uid,
    the first ancestor of the interpreter's prefix that others cannot traverse, e.g. /root for pyenv)."""
    points = [os.path.realpath(p) for p in hide_paths if os.path.isdir(p)]
    if drop_uid:
        parts = py_root.strip("/").split("/")
        for i in range(1, len(parts)):
            anc = "/" + "/".join(parts[:i])
            try:
                if not os.stat(anc).st_mode & stat.S_IXOTH:
                    points.append(anc)
                    break
            except OSError:
                break
    points = sorted(set(points) - {"/", "/tmp", "/dev", "/proc"})
    return [p for p in points if not any(p != q and p.startswith(q + "/") for q in points)]


def _traversable_python(python: str) -> str:
    """Fallback mode (no mount namespace to bind the prefix back): an interpreter the sandbox uid can run."""
    for cand in (python, "/usr/bin/python3", "/usr/local/bin/python3"):
        cand = os.path.realpath(cand)
        if os.path.isfile(cand) and not _shadow_points(os.path.dirname(os.path.dirname(cand)), (), True):
            return cand
    raise SandboxError(
        f"{python} is not reachable by an unprivileged uid and namespaces are unavailable; pass python= an "
        "interpreter outside private directories"
    )


def _alive(pid: int) -> bool:
    """True while the child ``pid`` has not exited (does not reap it)."""
    try:
        return os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is None
    except ChildProcessError:
        return False


@dataclass
class _Resources:
    """What one run holds on the host; :meth:`release` frees whatever was acquired, however far it got."""

    lock_fd: int = -1  # the sandbox uid's lock (root)
    host_workdir: str | None = None  # fallback mode's work dir
    status_r: int = -1
    status_w: int = -1
    proc: subprocess.Popen[bytes] | None = None  # the launcher
    cgroup: MemoryCgroup | None = None  # the run's memory cgroup (removed once the run is over)

    def release(self) -> None:
        proc = self.proc
        if proc is not None:
            if proc.returncode is None:
                _finish(proc, kill_group=True)
            for pipe in (proc.stdin, proc.stdout, proc.stderr):
                if pipe is not None:
                    pipe.close()
        for fd in (self.status_r, self.status_w):
            if fd >= 0:
                os.close(fd)
        if self.lock_fd >= 0:
            os.close(self.lock_fd)
        if self.host_workdir is not None:
            _rmtree(self.host_workdir)
        if self.cgroup is not None:
            self.cgroup.remove()


def _run_once(
    code: str,
    mode: str,
    python: str,
    limits: dict[str, int],
    timeout_s: float,
    max_output_bytes: int,
    disk_mb: int,
    hide_paths: Sequence[str],
    uid_base: int | None,
    group: MemoryCgroup | None,
) -> SandboxResult:
    t0 = time.monotonic()
    deadline = t0 + timeout_s
    root = mode in ("root", "none") and os.geteuid() == 0
    res = _Resources(cgroup=group)
    try:
        uid, gid, python = _claim_identity(res, mode, root, python, uid_base, deadline)
        cfg = _launcher_config(
            code, mode, python, uid, gid, root, res.host_workdir, limits, disk_mb, hide_paths
        )
        proc = _spawn(res, python, cfg)
        bufs, totals, timed_out = _pump(proc, res.status_r, deadline, max_output_bytes)
        _finish(proc, kill_group=mode == "none")
        if root and (timed_out or mode == "none"):
            _kill_uid(uid)
        oom = group is not None and group.oom_killed()
    finally:
        res.release()
    result = _verdict(bufs, totals, timed_out, timeout_s, time.monotonic() - t0, max_output_bytes, mode)
    result.memory_cap = "rlimit" if group is None else "cgroup"
    if oom:  # the kernel killed a process of the sandbox (maybe a child, while the main one exited 0): not ok
        result.ok = False
        result.error = (
            f"memory limit exceeded: the sandbox's {group.limit_bytes >> 20} MiB (killed by the kernel)"
        )
    return result


def _claim_identity(
    res: _Resources, mode: str, root: bool, python: str, uid_base: int | None, deadline: float
) -> tuple[int, int, str]:
    """``(uid, gid, python)`` for the code: as root an exclusive sandbox uid (its lock kept in ``res``); in
    fallback mode also a host work dir it owns and (as root) an interpreter that uid can reach."""
    uid, gid = os.getuid(), os.getgid()
    if root:
        uid, res.lock_fd = _slots(uid_base).acquire(deadline)
        gid = uid
    if mode == "none":
        if root:
            python = _traversable_python(python)
        res.host_workdir = tempfile.mkdtemp(prefix="thinktree-sandbox-work-")
        os.chmod(res.host_workdir, 0o700)
        if root:
            os.chown(res.host_workdir, uid, gid)
    return uid, gid, python


def _launcher_config(
    code: str,
    mode: str,
    python: str,
    uid: int,
    gid: int,
    drop: bool,
    host_workdir: str | None,
    limits: dict[str, int],
    disk_mb: int,
    hide_paths: Sequence[str],
) -> dict:
    """The launcher's config (sent marshalled on its stdin; ``status_fd`` is added by :func:`_spawn`)."""
    py_root = os.path.dirname(os.path.dirname(python))
    return {
        "mode": mode,
        "parent_pid": os.getpid(),
        "uid": uid,
        "gid": gid,
        "drop": drop,
        "python": python,
        "py_root": py_root,
        "shadow": _shadow_points(py_root, hide_paths, drop) if mode != "none" else [],
        "workdir": host_workdir or WORKDIR,
        "disk_bytes": int(disk_mb) << 20,
        "limits": limits,
        "code": code,
    }


def _spawn(res: _Resources, python: str, cfg: dict) -> subprocess.Popen[bytes]:
    """Start the launcher (its own session, no inherited fds but the status pipe, a minimal env), send cfg."""
    res.status_r, res.status_w = os.pipe()
    cfg["status_fd"] = res.status_w
    package_dir = os.path.dirname(os.path.realpath(launcher.__file__))
    res.proc = proc = subprocess.Popen(
        [python, "-I", "-S", "-B", "-c", _BOOTSTRAP, package_dir],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        pass_fds=(res.status_w,),
        close_fds=True,
        start_new_session=True,
        cwd="/",
        env={"PATH": "/usr/bin:/bin", "LC_ALL": "C.UTF-8"},
    )
    os.close(res.status_w)
    res.status_w = -1
    if res.cgroup is not None:  # the launcher waits for its config: it has forked nothing yet
        try:
            res.cgroup.add(proc.pid)
        except OSError as exc:
            raise SandboxError(
                f"cannot move the sandbox into its memory cgroup {res.cgroup.path}: {exc}"
            ) from exc
    assert proc.stdin is not None and proc.stdout is not None and proc.stderr is not None
    try:
        proc.stdin.write(marshal.dumps(cfg))
        proc.stdin.close()
    except BrokenPipeError:
        pass
    return proc


def _pump(
    proc: subprocess.Popen[bytes], status_r: int, deadline: float, cap: int
) -> tuple[dict[str, bytearray], dict[str, int], bool]:
    """Read stdout/stderr/status until all close, the deadline passes, or (after the final status) a grace."""
    assert proc.stdout is not None and proc.stderr is not None
    bufs = {"out": bytearray(), "err": bytearray(), "status": bytearray()}
    totals = dict.fromkeys(bufs, 0)
    caps = {"out": cap, "err": cap, "status": 1 << 16}
    grace_until: float | None = None
    timed_out = False
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout.fileno(), selectors.EVENT_READ, "out")
        sel.register(proc.stderr.fileno(), selectors.EVENT_READ, "err")
        sel.register(status_r, selectors.EVENT_READ, "status")
        while sel.get_map():
            now = time.monotonic()
            if grace_until is not None and now >= grace_until:
                break
            if now >= deadline:
                timed_out = grace_until is None
                break
            limit = deadline if grace_until is None else min(deadline, grace_until)
            for key, _ in sel.select(min(limit - now, 0.25)):
                data = os.read(key.fd, 1 << 16)
                if not data:
                    sel.unregister(key.fd)
                    continue
                name = key.data
                room = caps[name] - len(bufs[name])
                if room > 0:
                    bufs[name] += data[:room]
                totals[name] += len(data)
                if name == "status" and grace_until is None and _final_status(bufs["status"]) is not None:
                    # the code has exited; leftovers (fallback mode: orphaned children) get a short grace
                    grace_until = time.monotonic() + 0.2
    return bufs, totals, timed_out


def _finish(proc: subprocess.Popen[bytes], kill_group: bool) -> None:
    """Stop the launcher's tree and reap the launcher (see the module docstring)."""
    if _alive(proc.pid):
        try:
            proc.send_signal(signal.SIGTERM)  # launcher SIGKILLs its init child via pidfd, reaps it, exits
        except ProcessLookupError:
            pass
        end = time.monotonic() + 1.0
        while _alive(proc.pid) and time.monotonic() < end:
            time.sleep(0.005)
    if kill_group or _alive(proc.pid):
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # launcher not reaped yet: its pgid cannot have been recycled
        except (ProcessLookupError, PermissionError):
            pass
    proc.wait()


def _rmtree(path: str) -> None:
    """Remove a fallback-mode work dir, whatever modes the code left on its contents."""
    import shutil

    for _ in range(3):
        for dirpath, dirnames, _files in os.walk(path):
            for d in dirnames:
                try:
                    os.chmod(os.path.join(dirpath, d), 0o700, follow_symlinks=False)
                except OSError:
                    pass
        shutil.rmtree(path, ignore_errors=True)
        if not os.path.exists(path):
            return
