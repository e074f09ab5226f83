"""Sandbox uids (root callers): one dedicated uid per concurrently running sandbox, taken from a range and
held exclusively (across threads and processes) with ``flock`` on lock files in a root-only directory."""

from __future__ import annotations

import fcntl
import os
import random
import signal
import stat
import tempfile
import threading
import time

from .launcher import _pids_of_uid
from .result import SandboxError

DEFAULT_UID_BASE = 2_000_000_000
UID_SLOTS = 256


def sandbox_uid_range(uid_base: int | None = None) -> range:
    """The uids the sandbox may run code as (when running as root)."""
    base = _uid_base(uid_base)
    return range(base, base + UID_SLOTS)


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
