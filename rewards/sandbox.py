"""Run untrusted, model-written Python in an OS-level sandbox (Linux only).

``run_code(code)`` executes ``code`` in a fresh ``python -I -S -B`` interpreter and returns a
:class:`SandboxResult`; :class:`SandboxPool` / :func:`run_many` run many snippets in parallel (a thread pool
driving subprocesses; no ``preexec_fn``, so it is safe to call from threads).

Process layout (``L`` = launcher, ``I`` = init, ``U`` = user code)::

    caller ──Popen(start_new_session, close_fds, minimal env)──> L: python -I -S -B -c BOOTSTRAP sandbox.py
      L  reads its config (marshal, incl. the code) from stdin, PR_SET_PDEATHSIG=SIGKILL,
         unshare(NEWNS|NEWNET|NEWPID|NEWIPC|NEWUTS [|NEWUSER when not root]), fork ──> I
      I  = pid 1 of the new pid namespace (PDEATHSIG=SIGKILL, not dumpable): builds the mount namespace,
         writes main.py, fork ──> U, waits for U, reports its exit status on a private status pipe
         (close-on-exec: the code cannot write a verdict), exits. When I exits the kernel SIGKILLs every
         process left in the namespace (fork bombs, daemons, setsid'd children).
      U  = setrlimit(...), umask 077, chdir /tmp/work, PR_SET_NO_NEW_PRIVS, drop privileges, seccomp filter,
         close every fd but 0/1/2, execve(python -I -S -B -X utf8 main.py) with a minimal environment
         (PATH, HOME, TMPDIR, LANG, LC_ALL, MALLOC_ARENA_MAX=2). Standard library only (``-S``).

What is enforced, and how (root = the caller runs as uid 0, the case in tests and CI):

* **Privileges.** root: ``setgroups([])``, ``setresgid``, ``setresuid`` (in that order) to a *dedicated*
  unprivileged uid/gid before any model code runs (``execve`` happens after the drop), plus
  ``PR_SET_NO_NEW_PRIVS`` (setuid binaries cannot elevate). The uid is taken from a range
  (default ``2_000_000_000 + slot``, configurable with ``uid_base`` or ``THINKTREE_SANDBOX_UID_BASE``), one
  uid per *concurrently running* sandbox, allocated with ``flock`` on lock files in a root-only directory, so
  slots are exclusive across threads *and* processes (e.g. several training ranks on one host). Why: RLIMIT_NPROC
  counts every process of a uid system-wide; with one shared uid (``nobody``) a fork bomb in one sandbox would
  make every other sandbox's ``fork``/``execve`` fail, and other daemons running as ``nobody`` would count too.
  A uid far above normal accounts and systemd's dynamic/container ranges has no other processes, so
  ``max_procs`` is exactly the per-sandbox process/thread budget and a pool of N uses at most
  ``N * max_procs`` processes. Not root: an unprivileged user namespace is entered instead (uid 0 inside, our
  own uid outside); after setting up the mounts every capability is dropped (bounding set, ambient set,
  ``capset`` to zero, securebits NOROOT|NO_SETUID_FIXUP locked) so the code cannot undo the mounts.
* **Resources** (per process): RLIMIT_CPU (``cpu_s``, SIGXCPU then SIGKILL one second later), RLIMIT_AS
  (``memory_mb``), RLIMIT_FSIZE (``max_file_bytes``), RLIMIT_NPROC (``max_procs``; counts threads too),
  RLIMIT_NOFILE (``max_open_files``), RLIMIT_CORE=0, RLIMIT_MEMLOCK=0, RLIMIT_MSGQUEUE=0; hard limits equal
  the soft ones (except CPU), so the code cannot raise them. The private /tmp is a size-limited tmpfs
  (``disk_mb``, 4096 inodes).
* **Wall clock.** The caller enforces ``timeout_s`` for the whole run. On expiry the launcher is told to
  SIGKILL its init child through a pidfd (race-free); init's death SIGKILLs the whole pid namespace and the
  launcher reaps it; a launcher that does not exit within 1 s is killed with ``os.killpg(SIGKILL)`` on its
  process group (safe: it is not reaped before that, so its pgid cannot be recycled). The verdict returns
  within ``timeout_s`` + ~0.1 s however the code behaves. If the caller dies, PDEATHSIG tears everything down.
* **Output.** stdout/stderr are pipes read incrementally with ``selectors``; only the first
  ``max_output_bytes`` of each are kept, the rest is read and discarded (``truncated=True``).
* **Network.** A new network namespace (``unshare(CLONE_NEWNET)``, OS-enforced): no interfaces but a
  loopback that is down, so every ``connect``/``sendto`` fails, including to 127.0.0.1 and to abstract unix
  sockets of the host. If namespaces cannot be created the sandbox refuses to run
  (:class:`SandboxUnavailableError`) unless ``allow_network_fallback=True`` (then: rlimits + uid drop + a host
  temp dir only, no network/mount/pid isolation).
* **Files.** A private mount namespace (propagation private): the whole tree is re-mounted read-only and
  nosuid (``mount_setattr(AT_RECURSIVE)``), so nothing outside the sandbox's own tmpfs can be written, even
  world-writable dirs like /var/tmp or /run/lock (and even if the uid drop had failed). /tmp is a fresh tmpfs
  (root-owned 0755) containing the working dir ``/tmp/work`` (owned by the sandbox uid, mode 0700, cwd, HOME,
  TMPDIR); it disappears with the namespace, so no temp dir can leak. /dev is a tmpfs with only null, zero,
  full, random, urandom (no GPUs, disks, ttys); /proc is a fresh procfs of the new pid namespace (host
  processes invisible); ``hide_paths`` (default /root, /home) are covered by empty read-only tmpfs. Reading:
  the dropped uid is subject to normal permissions, so root-only files (/etc/shadow, 0600 files, /root) are
  unreadable. If the interpreter lives under a hidden or non-world-traversable dir (e.g. pyenv in /root), only
  its prefix is bind-mounted back, read-only, at the same path.
* **IPC / signals.** New IPC and UTS namespaces; the code cannot signal the caller (different uid, other pid
  namespace) and cannot inherit any of our file descriptors (``close_fds``, fresh interpreter).
* **Syscalls.** A small seccomp deny-list (x86_64, aarch64): no new user namespaces (``unshare``/``clone``
  with CLONE_NEWUSER; ``clone3`` gets ENOSYS so libc falls back to ``clone``), no setns, ptrace,
  process_vm_readv/writev, bpf, perf_event_open, userfaultfd, keyrings, io_uring; other ABIs (i386, x32)
  refused. It narrows the kernel attack surface; it is not an allow-list.

What this sandbox does NOT protect against (it is not a VM):

* kernel bugs: the code runs on the host kernel with almost the full syscall surface (the seccomp filter is
  a short deny-list), so a kernel exploit escapes it;
* reading world-readable files: the filesystem is visible read-only (/etc, /usr, the project checkout,
  world-readable data, the interpreter's site-packages, /sys); only ``hide_paths`` are covered;
* total memory: RLIMIT_AS is per process, so ``max_procs`` processes can use up to ``max_procs * memory_mb``
  plus ``disk_mb`` of tmpfs (no cgroup is used); pick ``max_procs`` accordingly;
* CPU and memory side channels (Spectre-class, cache timing), timing of the host, fair scheduling: the code
  competes for the CPUs it runs on (RLIMIT_CPU bounds each process's CPU time only);
* exhaustion of kernel objects not covered by rlimits (e.g. inodes of pipes, epoll instances within
  ``max_open_files``) and abusing /dev/urandom entropy;
* in the fallback mode (``allow_network_fallback=True`` when namespaces are unavailable): network, writing
  world-writable host dirs (bounded by RLIMIT_FSIZE), reading world-readable files anywhere, seeing host
  processes; leftover processes are still killed (the launcher is a child subreaper and SIGKILLs and reaps
  every descendant; as root the sandbox uid is also swept), but zombies orphaned to a non-reaping host init
  would keep counting against that uid's RLIMIT_NPROC;
* non-root callers: the user-namespace mode relies on unprivileged user namespaces (a large kernel attack
  surface, disabled on some distributions; then the sandbox refuses or falls back).
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import marshal
import os
import random
import resource
import selectors
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

__all__ = [
    "SandboxError",
    "SandboxPool",
    "SandboxResult",
    "SandboxUnavailableError",
    "run_code",
    "run_many",
    "sandbox_uid_range",
]

# ------------------------------------------------------------------------------------------- public API

DEFAULT_UID_BASE = 2_000_000_000
UID_SLOTS = 256
DEFAULT_HIDE_PATHS: tuple[str, ...] = ("/root", "/home")
MAX_CODE_BYTES = 1 << 20


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


def sandbox_uid_range(uid_base: int | None = None) -> range:
    """The uids the sandbox may run code as (when running as root)."""
    base = _uid_base(uid_base)
    return range(base, base + UID_SLOTS)


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
) -> SandboxResult:
    """Run ``code`` (a Python program) in the sandbox and return the verdict (see the module docstring).

    ``timeout_s``: wall clock for the whole run (start-up included); ``cpu_s``, ``memory_mb`` (address
    space), ``max_file_bytes``, ``max_procs`` (processes + threads), ``max_open_files``: per-process rlimits;
    ``max_output_bytes``: kept of stdout and of stderr each; ``disk_mb``: size of the private /tmp.
    ``python``: interpreter for the code (default: the base interpreter of this one), always run with
    ``-I -S`` (standard library only). ``hide_paths``: dirs covered by an empty tmpfs. ``uid_base``: first
    sandbox uid (root only). ``allow_network_fallback``: run with rlimits only where namespaces are
    unavailable instead of raising :class:`SandboxUnavailableError`.

    Raises :class:`SandboxError` if the sandbox itself fails; anything the code does is a verdict.
    """
    if not isinstance(code, str):
        raise TypeError(f"code must be str, got {type(code).__name__}")
    code_bytes = code.encode("utf-8", "surrogatepass")
    if len(code_bytes) > MAX_CODE_BYTES:
        raise ValueError(f"code is {len(code_bytes)} bytes; the limit is {MAX_CODE_BYTES}")
    if timeout_s <= 0 or cpu_s <= 0 or memory_mb <= 0 or max_procs <= 0 or max_output_bytes < 0:
        raise ValueError("timeout_s, cpu_s, memory_mb and max_procs must be positive")
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
        try:
            return _run_once(
                code, mode, py, limits, timeout_s, max_output_bytes, disk_mb, hide_paths, uid_base
            )
        except _NamespaceError as exc:
            _NS_UNAVAILABLE[root] = str(exc)
            if not allow_network_fallback:
                raise SandboxUnavailableError(_unavailable_msg(str(exc))) from None
            fallback_reason = str(exc)


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


# ------------------------------------------------------------------------------------------- caller side

# The launcher: this file's launcher section, exec'ed alone (line numbers kept) and started.
_BOOTSTRAP = (
    "import ctypes, marshal, os, resource, signal, sys\n"
    "p = sys.argv[1]\n"
    "with open(p) as f:\n"
    "    s = f.read()\n"
    "i = s.index('\\n# @@ launcher @@\\n')\n"
    "exec(compile('\\n' * s.count('\\n', 0, i) + s[i:], p, 'exec'))\n"
    "_launcher_main()\n"
)
_NS_UNAVAILABLE: dict[bool, str] = {}  # is_root -> why namespaces could not be created (cached per process)


class _NamespaceError(Exception):
    pass


# errnos meaning "this host does not allow it" (cached: fall back or refuse); others (EAGAIN, ENOMEM, ENOSPC:
# e.g. too many namespaces right now) are raised as SandboxError without marking namespaces unavailable
_STRUCTURAL_ERRNOS = {errno.EPERM, errno.EACCES, errno.ENOSYS, errno.EINVAL, errno.ENOENT, errno.ENOTDIR}


def _unavailable_msg(reason: str) -> str:
    return (
        f"cannot create the sandbox namespaces ({reason}); refusing to run model code without network "
        "isolation. Pass allow_network_fallback=True to run with rlimits only (see thinktree.rewards.sandbox)."
    )


def _uid_base(uid_base: int | None) -> int:
    if uid_base is None:
        uid_base = int(os.environ.get("THINKTREE_SANDBOX_UID_BASE", DEFAULT_UID_BASE))
    if not 1000 <= uid_base <= 4_294_967_294 - UID_SLOTS:
        raise ValueError(f"uid_base {uid_base} out of range")
    return uid_base


def _id_mapped(path: str, first: int, count: int) -> bool:
    """Is [first, first+count) inside one range of /proc/self/{uid,gid}_map (ids we can setresuid to)?"""
    try:
        with open(path) as fh:
            for line in fh:
                inner, _outer, length = (int(x) for x in line.split())
                if inner <= first and first + count <= inner + length:
                    return True
    except (OSError, ValueError):
        return True  # no user-namespace info: assume the full range
    return False


class _UidSlots:
    """Exclusive sandbox uids: one flock'ed lock file per uid in a root-only directory (cross-process)."""

    def __init__(self, base: int) -> None:
        self.base = base
        if not (
            _id_mapped("/proc/self/uid_map", base, UID_SLOTS)
            and _id_mapped("/proc/self/gid_map", base, UID_SLOTS)
        ):
            raise SandboxError(
                f"sandbox uids {base}..{base + UID_SLOTS - 1} are not mapped in this user namespace; "
                "set THINKTREE_SANDBOX_UID_BASE (or uid_base=) to an unused mapped range"
            )
        self.lock_dir = self._lock_dir()
        self._next = random.randrange(UID_SLOTS)
        self._mutex = threading.Lock()

    @staticmethod
    def _lock_dir() -> str:
        parent = "/run" if os.access("/run", os.W_OK) else tempfile.gettempdir()
        path = os.path.join(parent, f"thinktree-sandbox-uids-{os.geteuid()}")
        try:
            os.mkdir(path, 0o700)
        except FileExistsError:
            pass
        st = os.lstat(path)
        if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o077:
            raise SandboxError(
                f"{path} is not a private directory owned by us; refusing to use it for uid locks"
            )
        return path

    def acquire(self, deadline: float) -> tuple[int, int]:
        """Returns (uid, lock fd). Waits (polling) while all slots are busy, up to ``deadline``."""
        while True:
            with self._mutex:
                start = self._next
                self._next = (self._next + 1) % UID_SLOTS
            for i in range(UID_SLOTS):
                uid = self.base + (start + i) % UID_SLOTS
                fd = os.open(
                    os.path.join(self.lock_dir, f"uid-{uid}.lock"),
                    os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW,
                    0o600,
                )
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    os.close(fd)
                    continue
                return uid, fd
            if time.monotonic() > deadline:
                raise SandboxError(f"all {UID_SLOTS} sandbox uids are busy")
            time.sleep(0.02)


_SLOTS: dict[int, _UidSlots] = {}
_SLOTS_LOCK = threading.Lock()


def _slots(uid_base: int | None) -> _UidSlots:
    base = _uid_base(uid_base)
    with _SLOTS_LOCK:
        if base not in _SLOTS:
            _SLOTS[base] = _UidSlots(base)
        return _SLOTS[base]


def _kill_uid(uid: int, wait_s: float = 2.0) -> None:
    """SIGKILL every process of a sandbox uid (root only; the uid is exclusively ours while its lock is held)."""
    deadline = time.monotonic() + wait_s
    while True:
        pids = _pids_of_uid(uid, zombies=False)
        if not pids or time.monotonic() > deadline:
            return
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.01)


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
) -> SandboxResult:
    t0 = time.monotonic()
    deadline = t0 + timeout_s
    root = mode in ("root", "none") and os.geteuid() == 0
    uid, gid, lock_fd, host_workdir = os.getuid(), os.getgid(), -1, None
    status_r = status_w = -1
    proc: subprocess.Popen[bytes] | None = None
    try:
        if root:
            uid, lock_fd = _slots(uid_base).acquire(deadline)
            gid = uid
        if mode == "none":
            if root:
                python = _traversable_python(python)
            host_workdir = tempfile.mkdtemp(prefix="thinktree-sandbox-work-")
            os.chmod(host_workdir, 0o700)
            if root:
                os.chown(host_workdir, uid, gid)
        py_root = os.path.dirname(os.path.dirname(python))
        cfg = {
            "mode": mode,
            "parent_pid": os.getpid(),
            "uid": uid,
            "gid": gid,
            "drop": root,
            "python": python,
            "py_root": py_root,
            "shadow": _shadow_points(py_root, hide_paths, root) if mode != "none" else [],
            "workdir": host_workdir or WORKDIR,
            "disk_bytes": int(disk_mb) << 20,
            "limits": limits,
            "code": code,
        }
        status_r, status_w = os.pipe()
        cfg["status_fd"] = status_w
        proc = subprocess.Popen(
            [python, "-I", "-S", "-B", "-c", _BOOTSTRAP, os.path.realpath(__file__)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            pass_fds=(status_w,),
            close_fds=True,
            start_new_session=True,
            cwd="/",
            env={"PATH": "/usr/bin:/bin", "LC_ALL": "C.UTF-8"},
        )
        os.close(status_w)
        status_w = -1
        assert proc.stdin is not None and proc.stdout is not None and proc.stderr is not None
        try:
            proc.stdin.write(marshal.dumps(cfg))
            proc.stdin.close()
        except BrokenPipeError:
            pass
        bufs, totals, timed_out = _pump(proc, status_r, deadline, max_output_bytes)
        _finish(proc, kill_group=mode == "none")
        if root and (timed_out or mode == "none"):
            _kill_uid(uid)
    finally:
        if proc is not None:
            if proc.returncode is None:
                _finish(proc, kill_group=True)
            for pipe in (proc.stdin, proc.stdout, proc.stderr):
                if pipe is not None:
                    pipe.close()
        for fd in (status_r, status_w):
            if fd >= 0:
                os.close(fd)
        if lock_fd >= 0:
            os.close(lock_fd)
        if host_workdir is not None:
            _rmtree(host_workdir)
    return _verdict(bufs, totals, timed_out, timeout_s, time.monotonic() - t0, max_output_bytes, mode)


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


# ------------------------------------------------------------------------------------------- launcher side
# @@ launcher @@
# Everything from the line above to the end of the file is also exec'ed on its own by ``_BOOTSTRAP`` in the
# launcher process (and its children): trusted code only, using only ctypes, marshal, os, resource, signal and
# sys (imported by the bootstrap), so the launcher starts fast. It runs before the model's code is exec'ed.

CLONE_NEWNS = 0x00020000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000

MS_RDONLY = 0x1
MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_NOEXEC = 0x8
MS_REMOUNT = 0x20
MS_BIND = 0x1000
MS_REC = 0x4000
MS_PRIVATE = 0x40000

PR_SET_PDEATHSIG = 1
PR_SET_DUMPABLE = 4
PR_SET_CHILD_SUBREAPER = 36
PR_CAPBSET_DROP = 24
PR_SET_SECUREBITS = 28
PR_SET_NO_NEW_PRIVS = 38
PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_CLEAR_ALL = 4
# NOROOT | NOROOT_LOCKED | NO_SETUID_FIXUP | NO_SETUID_FIXUP_LOCKED | KEEP_CAPS_LOCKED | NO_CAP_AMBIENT_RAISE(+LOCKED)
SECUREBITS_LOCKDOWN = 0x01 | 0x02 | 0x04 | 0x08 | 0x20 | 0x40 | 0x80

SYS_MOUNT_SETATTR = 442  # same number on every architecture (new-style syscall)
SYS_CAPSET = {"x86_64": 126, "aarch64": 91}.get(os.uname().machine, -1)
AT_FDCWD = -100
AT_RECURSIVE = 0x8000
MOUNT_ATTR_RDONLY = 0x1
MOUNT_ATTR_NOSUID = 0x2

PR_SET_SECCOMP = 22
SECCOMP_MODE_FILTER = 2
SECCOMP_RET_ALLOW = 0x7FFF0000
SECCOMP_RET_ERRNO = 0x00050000
EPERM, ENOSYS = 1, 38
# arch -> (AUDIT_ARCH, {syscall: nr} of the syscalls the seccomp filter refuses)
_SECCOMP_ARCH = {
    "x86_64": (
        0xC000003E,
        {
            "unshare": 272, "clone": 56, "setns": 308, "ptrace": 101, "process_vm_readv": 310,
            "process_vm_writev": 311, "bpf": 321, "perf_event_open": 298, "userfaultfd": 323, "keyctl": 250,
            "add_key": 248, "request_key": 249, "io_uring_setup": 425, "io_uring_enter": 426,
            "io_uring_register": 427, "clone3": 435,
        },
    ),
    "aarch64": (
        0xC00000B7,
        {
            "unshare": 97, "clone": 220, "setns": 268, "ptrace": 117, "process_vm_readv": 270,
            "process_vm_writev": 271, "bpf": 280, "perf_event_open": 241, "userfaultfd": 282, "keyctl": 219,
            "add_key": 217, "request_key": 218, "io_uring_setup": 425, "io_uring_enter": 426,
            "io_uring_register": 427, "clone3": 435,
        },
    ),
}  # fmt: skip

WORKDIR = "/tmp/work"  # the path the code sees (inside the private /tmp tmpfs)
_EXIT_SETUP_FAILED = 125


def _pids_of_uid(uid: int, zombies: bool = True) -> list[int]:
    """Processes whose real uid is ``uid`` (scan of /proc), optionally without zombies."""
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/status") as fh:
                fields = dict(line.split(":", 1) for line in fh if ":" in line)
            if int(fields["Uid"].split()[0]) == uid and (
                zombies or not fields["State"].strip().startswith("Z")
            ):
                found.append(int(name))
        except (OSError, ValueError, KeyError):
            continue
    return found


def _kill_and_reap_children() -> None:
    """Fallback mode, in the launcher (a child subreaper, so orphaned descendants are re-parented to it):
    SIGKILL and reap every descendant, including ones that setsid()'d away from the process group."""
    me = str(os.getpid())
    while True:
        for name in os.listdir("/proc"):
            try:
                with open(f"/proc/{name}/stat") as fh:
                    ppid = fh.read().rpartition(")")[2].split()[1]
            except (OSError, IndexError):
                continue
            if ppid == me:
                try:
                    os.kill(int(name), signal.SIGKILL)
                except ProcessLookupError:
                    pass
        try:
            os.waitpid(-1, 0)
            while os.waitpid(-1, os.WNOHANG)[0]:
                pass
        except ChildProcessError:
            return


_libc: ctypes.CDLL | None = None


def _c() -> ctypes.CDLL:
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    return _libc


def _check(ret: int, what: str) -> None:
    if ret != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def _mount(src: str | None, target: str, fstype: str | None, flags: int, data: str | None = None) -> None:
    def enc(s: str | None) -> bytes | None:
        return None if s is None else s.encode()

    _check(
        _c().mount(enc(src), enc(target), enc(fstype), ctypes.c_ulong(flags), enc(data)), f"mount {target}"
    )


class _MountAttr(ctypes.Structure):
    _fields_ = [
        ("attr_set", ctypes.c_uint64),
        ("attr_clr", ctypes.c_uint64),
        ("propagation", ctypes.c_uint64),
        ("userns_fd", ctypes.c_uint64),
    ]


def _make_tree_readonly() -> None:
    """Every mount of this (private) mount namespace becomes read-only and nosuid."""
    attr = _MountAttr(MOUNT_ATTR_RDONLY | MOUNT_ATTR_NOSUID, 0, 0, 0)
    libc = _c()
    libc.syscall.restype = ctypes.c_long
    ret = libc.syscall(
        ctypes.c_long(SYS_MOUNT_SETATTR),
        ctypes.c_int(AT_FDCWD),
        b"/",
        ctypes.c_uint(AT_RECURSIVE),
        ctypes.byref(attr),
        ctypes.c_size_t(ctypes.sizeof(attr)),
    )
    if ret == 0:
        return
    # kernels < 5.12: remount each mount point (keeping the flags a user namespace may have locked)
    keep = {"nodev": MS_NODEV, "noexec": MS_NOEXEC, "nosuid": MS_NOSUID}
    with open("/proc/self/mountinfo") as fh:
        entries = [line.split() for line in fh]
    for fields in entries:
        target = fields[4].encode().decode("unicode_escape")
        flags = MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID
        for opt in fields[5].split(","):
            flags |= keep.get(opt, 0)
        try:
            _mount(None, target, None, flags)
        except OSError:
            if target == "/":
                raise


def _write(path: str, text: str) -> None:
    fd = os.open(path, os.O_WRONLY)
    try:
        os.write(fd, text.encode())
    finally:
        os.close(fd)


def _setup_filesystem(cfg: dict) -> None:
    """In init (pid 1 of the new namespaces, still privileged): the sandbox's view of the filesystem."""
    _mount(None, "/", None, MS_REC | MS_PRIVATE)  # nothing we do propagates to the host
    py_root: str = cfg["py_root"]
    py_fd = os.open(py_root, os.O_PATH | os.O_DIRECTORY)
    devs = {
        name: os.open(f"/dev/{name}", os.O_PATH) for name in ("null", "zero", "full", "random", "urandom")
    }
    _make_tree_readonly()
    # hidden dirs (and a non-traversable ancestor of the interpreter): empty tmpfs, read-only afterwards
    for point in cfg["shadow"]:
        _mount("tmpfs", point, "tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, "size=64k,nr_inodes=256,mode=755")
    # private /tmp with the working dir
    _mount(
        "tmpfs", "/tmp", "tmpfs", MS_NOSUID | MS_NODEV, f"size={cfg['disk_bytes']},nr_inodes=4096,mode=755"
    )
    os.mkdir(WORKDIR, 0o700)
    if cfg["drop"]:
        os.chown(WORKDIR, cfg["uid"], cfg["gid"])
    # the interpreter's prefix, if it is now covered (or was never traversable by the sandbox uid): its
    # mount point is created before the covering tmpfs becomes read-only, the bind mount goes on top after
    rebind = any(py_root == p or py_root.startswith(p.rstrip("/") + "/") for p in [*cfg["shadow"], "/tmp"])
    if rebind:
        os.makedirs(py_root, 0o755, exist_ok=True)
    for point in cfg["shadow"]:
        _mount(None, point, None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC)
    if rebind:
        # recursive, unless py_root is itself covered: a recursive bind would copy the covering tmpfs too
        rec = 0 if py_root in cfg["shadow"] else MS_REC
        _mount(f"/proc/self/fd/{py_fd}", py_root, None, MS_BIND | rec)
        _mount(None, py_root, None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID)
    os.close(py_fd)
    # minimal /dev
    _mount("tmpfs", "/dev", "tmpfs", MS_NOSUID | MS_NOEXEC, "size=64k,nr_inodes=64,mode=755")
    for name, fd in devs.items():
        os.close(os.open(f"/dev/{name}", os.O_CREAT | os.O_WRONLY, 0o666))
        _mount(f"/proc/self/fd/{fd}", f"/dev/{name}", None, MS_BIND)
        os.close(fd)
    for name, target in (("fd", "/proc/self/fd"), ("stdin", "fd/0"), ("stdout", "fd/1"), ("stderr", "fd/2")):
        os.symlink(target, f"/dev/{name}")
    _mount(None, "/dev", None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NOEXEC)
    # procfs of the new pid namespace (host processes invisible)
    try:
        _mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
    except OSError:
        if cfg["mode"] == "root":
            raise  # in a user namespace a masked host /proc can forbid this; the old one then stays (read-only)


def _drop_capabilities() -> None:
    """User-namespace mode: give up every capability for good (exec as ns-root must not regain them)."""
    libc = _c()
    _check(libc.prctl(PR_SET_SECUREBITS, SECUREBITS_LOCKDOWN, 0, 0, 0), "PR_SET_SECUREBITS")
    libc.prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0)
    for cap in range(64):
        if libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) != 0:
            break  # EINVAL past the last capability
    header = (ctypes.c_uint32 * 2)(0x20080522, 0)  # _LINUX_CAPABILITY_VERSION_3, this thread
    data = (ctypes.c_uint32 * 6)()  # effective/permitted/inheritable x 2, all zero
    _check(libc.syscall(ctypes.c_long(SYS_CAPSET), header, data), "capset")


def _seccomp_program() -> list[tuple[int, int, int, int]] | None:
    """A small deny-list (classic BPF): no new user namespaces (``unshare``/``clone`` with CLONE_NEWUSER;
    ``clone3`` gets ENOSYS so libc falls back to ``clone``), no setns, ptrace, process_vm_*, bpf,
    perf_event_open, userfaultfd, keyrings, io_uring; foreign ABIs (i386, x32) refused. None: unknown arch."""
    arch = _SECCOMP_ARCH.get(os.uname().machine)
    if arch is None:
        return None
    audit_arch, nrs = arch
    ld_w_abs, jeq_k, jge_k, jset_k, ret_k = 0x20, 0x15, 0x35, 0x45, 0x06
    deny, nosys, allow = SECCOMP_RET_ERRNO | EPERM, SECCOMP_RET_ERRNO | ENOSYS, SECCOMP_RET_ALLOW
    blocked = [nr for name, nr in nrs.items() if name not in ("unshare", "clone", "clone3")]
    prog: list[tuple[int, int, int, int]] = [
        (ld_w_abs, 0, 0, 4),  # seccomp_data.arch
        (jeq_k, 1, 0, audit_arch),
        (ret_k, 0, 0, deny),
        (ld_w_abs, 0, 0, 0),  # seccomp_data.nr
        (jge_k, 0, 1, 0x40000000),  # x32 syscalls (x86_64) / out of range
        (ret_k, 0, 0, deny),
        (jeq_k, 0, 1, nrs["clone3"]),
        (ret_k, 0, 0, nosys),
    ]
    for nr in blocked:
        prog += [(jeq_k, 0, 1, nr), (ret_k, 0, 0, deny)]
    prog += [
        (jeq_k, 2, 0, nrs["unshare"]),
        (jeq_k, 1, 0, nrs["clone"]),
        (ret_k, 0, 0, allow),
        (ld_w_abs, 0, 0, 16),  # low 32 bits of args[0] (flags; little-endian)
        (jset_k, 0, 1, CLONE_NEWUSER),
        (ret_k, 0, 0, deny),
        (ret_k, 0, 0, allow),
    ]
    return prog


def _install_seccomp() -> None:
    prog = _seccomp_program()
    if prog is None:
        return

    class SockFilter(ctypes.Structure):
        _fields_ = [
            ("code", ctypes.c_uint16),
            ("jt", ctypes.c_uint8),
            ("jf", ctypes.c_uint8),
            ("k", ctypes.c_uint32),
        ]

    class SockFprog(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.POINTER(SockFilter))]

    filters = (SockFilter * len(prog))(*(SockFilter(*ins) for ins in prog))
    fprog = SockFprog(len(prog), filters)
    libc = _c()
    libc.prctl.argtypes = None
    _check(libc.prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.byref(fprog), 0, 0), "seccomp")


def _exec_user(cfg: dict, status_fd: int) -> None:
    """The user-code process: limits, privilege drop, then exec the interpreter. Never returns.

    Failures are reported on the status pipe (close-on-exec, so the code itself never holds it): an exit
    status chosen by the code can never be mistaken for a sandbox failure."""
    try:
        libc = _c()
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        for sig in (signal.SIGPIPE, signal.SIGXFSZ, signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_SETMASK, set())
        lim = cfg["limits"]
        rlimits = [
            (resource.RLIMIT_CORE, 0, 0),
            (resource.RLIMIT_CPU, lim["cpu_s"], lim["cpu_s"] + 1),
            (resource.RLIMIT_AS, lim["memory_bytes"], lim["memory_bytes"]),
            (resource.RLIMIT_FSIZE, lim["max_file_bytes"], lim["max_file_bytes"]),
            (resource.RLIMIT_NOFILE, lim["max_open_files"], lim["max_open_files"]),
            (resource.RLIMIT_MEMLOCK, 0, 0),
            (resource.RLIMIT_MSGQUEUE, 0, 0),
        ]
        nproc = lim["max_procs"]
        if cfg["mode"] == "none" and not cfg["drop"]:
            nproc += len(_pids_of_uid(os.getuid()))  # the limit counts all our processes: give headroom
        rlimits.append((resource.RLIMIT_NPROC, nproc, nproc))
        for which, soft, hard in rlimits:
            _, cur_hard = resource.getrlimit(which)
            if cur_hard != resource.RLIM_INFINITY:
                soft, hard = min(soft, cur_hard), min(hard, cur_hard)
            resource.setrlimit(which, (soft, hard))
        os.umask(0o077)
        os.chdir(cfg["workdir"])
        _check(libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "PR_SET_NO_NEW_PRIVS")
        if cfg["drop"]:
            uid, gid = cfg["uid"], cfg["gid"]
            os.setgroups([])
            os.setresgid(gid, gid, gid)
            os.setresuid(uid, uid, uid)
            if os.getresuid() != (uid, uid, uid) or os.getresgid() != (gid, gid, gid) or os.getgroups():
                raise OSError("privilege drop did not take effect")
            try:
                os.setuid(0)
            except PermissionError:
                pass
            else:
                raise OSError("could regain root after the privilege drop")
        elif cfg["mode"] == "userns":
            _drop_capabilities()
        _install_seccomp()
        os.closerange(3, status_fd)
        os.closerange(status_fd + 1, 1 << 16)
        env = {
            "PATH": "/usr/local/bin:/usr/bin:/bin",
            "HOME": cfg["workdir"],
            "TMPDIR": cfg["workdir"],
            "LANG": "C.UTF-8",
            "LC_ALL": "C.UTF-8",
            "MALLOC_ARENA_MAX": "2",  # glibc reserves 64 MiB of address space per arena: threads vs RLIMIT_AS
        }
        py = cfg["python"]
        os.execve(py, [py, "-I", "-S", "-B", "-X", "utf8", "main.py"], env)
    except BaseException as exc:  # noqa: BLE001 - report and exit, never fall through into the caller
        try:
            os.write(status_fd, f"error cannot start the code's interpreter: {exc!r}\n".encode())
        finally:
            os._exit(126)


def _init_main(cfg: dict, status_fd: int, launcher_pid: int) -> None:
    """pid 1 of the new pid namespace: set up, run the user process, report its status. Never returns."""
    code = 0
    try:
        _c().prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        # not dumpable: same-uid code (user-namespace mode) cannot open /proc/1/fd/* (our status pipe)
        _c().prctl(PR_SET_DUMPABLE, 0, 0, 0, 0)
        os.umask(0o022)
        # in a new pid namespace our parent lies outside it and getppid() is 0
        if os.getppid() != (launcher_pid if cfg["mode"] == "none" else 0):
            os._exit(1)  # the launcher already died
        try:
            if cfg["mode"] != "none":
                _setup_filesystem(cfg)
        except OSError as exc:
            os.write(status_fd, f"nserror {exc.errno or 0} filesystem setup: {exc}\n".encode())
            os._exit(_EXIT_SETUP_FAILED)
        try:
            path = os.path.join(cfg["workdir"], "main.py")
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            with os.fdopen(fd, "wb") as fh:
                fh.write(cfg["code"].encode("utf-8", "surrogatepass"))
        except Exception as exc:  # noqa: BLE001
            os.write(status_fd, f"error {exc!r}\n".encode())
            os._exit(_EXIT_SETUP_FAILED)
        user = os.fork()
        if user == 0:
            _exec_user(cfg, status_fd)
        while True:
            pid, wstatus = os.waitpid(-1, 0)
            if pid == user:
                break
        if os.WIFSIGNALED(wstatus):
            os.write(status_fd, f"signal {os.WTERMSIG(wstatus)}\n".encode())
        else:
            os.write(status_fd, f"exit {os.waitstatus_to_exitcode(wstatus)}\n".encode())
    except BaseException as exc:  # noqa: BLE001
        try:
            os.write(status_fd, f"error init: {exc!r}\n".encode())
        finally:
            code = _EXIT_SETUP_FAILED
    os._exit(code)


def _launcher_main() -> None:
    """Entry point of the launcher process (see the module docstring)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})  # delivered once on_term is installed
    cfg = marshal.loads(sys.stdin.buffer.read())
    status_fd: int = cfg["status_fd"]
    os.set_inheritable(status_fd, False)
    libc = _c()
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != cfg["parent_pid"]:
        os._exit(1)  # the caller already died
    null = os.open("/dev/null", os.O_RDWR)
    os.dup2(null, 0)
    os.close(null)
    mode = cfg["mode"]
    if mode != "none":
        flags = CLONE_NEWNS | CLONE_NEWNET | CLONE_NEWPID | CLONE_NEWIPC | CLONE_NEWUTS
        outer_uid, outer_gid = os.getuid(), os.getgid()
        try:
            if mode == "userns":
                flags |= CLONE_NEWUSER
            _check(libc.unshare(flags), "unshare")
            if mode == "userns":
                _write("/proc/self/setgroups", "deny")
                _write("/proc/self/uid_map", f"0 {outer_uid} 1")
                _write("/proc/self/gid_map", f"0 {outer_gid} 1")
        except OSError as exc:
            os.write(status_fd, f"nserror {exc.errno or 0} {exc.strerror or exc}\n".encode())
            os._exit(_EXIT_SETUP_FAILED)
    if mode == "none":
        libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    me = os.getpid()
    child = os.fork()
    if child == 0:
        _init_main(cfg, status_fd, me)
    os.close(status_fd)
    pidfd = os.pidfd_open(child)  # child not reaped yet: this refers to it, no pid-reuse race

    def on_term(signum: int, frame: object) -> None:
        try:
            signal.pidfd_send_signal(pidfd, signal.SIGKILL)  # init dies => the kernel kills its pid namespace
        except OSError:
            pass  # already exited

    signal.signal(signal.SIGTERM, on_term)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})
    os.waitpid(child, 0)
    if mode == "none":
        _kill_and_reap_children()
    os._exit(0)
