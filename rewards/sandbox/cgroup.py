"""A memory cgroup per sandboxed run: the cap on the sandbox as a whole (every process of it together).

:func:`create_memory_cgroup` makes a child cgroup below the caller's own cgroup (or below
``THINKTREE_SANDBOX_CGROUP``, a parent directory delegated for the purpose) with the memory limit set and swap
forbidden, in the cgroup v2 hierarchy when its ``memory`` controller can be enabled there, else in cgroup v1's
``memory`` hierarchy. The caller moves the launcher into it before the launcher reads its config (so before it
forks anything): every process of the sandbox inherits it. ``None`` when no memory cgroup can be made here (no
controller, not root, read-only cgroupfs): the caller then caps memory with rlimits alone (see the package doc).

Caller side only (the launcher process never imports this module).
"""

from __future__ import annotations

import itertools
import os
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path

ENV_PARENT = "THINKTREE_SANDBOX_CGROUP"
_COUNTER = itertools.count()
_LOCK = threading.Lock()


@dataclass
class MemoryCgroup:
    """One run's cgroup: ``path``, its hierarchy ``version`` (1 or 2) and its limit in bytes."""

    path: Path
    version: int
    limit_bytes: int

    def add(self, pid: int) -> None:
        """Move process ``pid`` (and so its future children) into the cgroup."""
        (self.path / "cgroup.procs").write_text(f"{pid}\n")

    def oom_killed(self) -> bool:
        """Whether the kernel killed a process of the sandbox for exceeding the limit."""
        name = "memory.events" if self.version == 2 else "memory.oom_control"
        try:
            fields = dict(
                line.split() for line in (self.path / name).read_text().splitlines() if line.strip()
            )
        except (OSError, ValueError):
            return False
        if "oom_kill" in fields:
            return int(fields["oom_kill"]) > 0
        return self.version == 1 and _failcnt(self.path) > 0

    def remove(self, timeout_s: float = 2.0) -> bool:
        """SIGKILL whatever is left in it and remove it; False if it could not be removed in ``timeout_s``."""
        end = time.monotonic() + timeout_s
        while True:
            try:
                self.path.rmdir()
                return True
            except FileNotFoundError:
                return True
            except OSError:
                if time.monotonic() >= end:
                    return False
            for pid in _procs(self.path):
                try:
                    os.kill(pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
            time.sleep(0.01)


def _failcnt(path: Path) -> int:
    try:
        return int((path / "memory.failcnt").read_text())
    except (OSError, ValueError):
        return 0


def _procs(path: Path) -> list[int]:
    try:
        return [int(x) for x in (path / "cgroup.procs").read_text().split()]
    except (OSError, ValueError):
        return []


def _lines(path: str) -> list[str]:
    try:
        return Path(path).read_text().splitlines()
    except OSError:
        return []


def _mounts() -> dict[str, Path]:
    """``{"v2": mount point, "memory": v1 memory mount point}`` of the cgroup filesystems present."""
    found: dict[str, Path] = {}
    for line in _lines("/proc/self/mounts"):
        parts = line.split()
        if len(parts) < 4:
            continue
        point, fstype, options = parts[1], parts[2], parts[3].split(",")
        if fstype == "cgroup2":
            found.setdefault("v2", Path(point))
        elif fstype == "cgroup" and "memory" in options:
            found.setdefault("memory", Path(point))
    return found


def _own_paths() -> dict[str, str]:
    """This process's cgroup path per hierarchy: ``{"v2": "/a/b", "memory": "/x"}``."""
    out: dict[str, str] = {}
    for line in _lines("/proc/self/cgroup"):
        _, controllers, path = line.split(":", 2)
        if controllers == "":
            out["v2"] = path
        elif "memory" in controllers.split(","):
            out["memory"] = path
    return out


def _parents() -> list[tuple[int, Path]]:
    """Candidate parent cgroups, best first: the configured one, else v2 then v1 below our own cgroup."""
    configured = os.environ.get(ENV_PARENT)
    if configured:
        p = Path(configured)
        return [(2 if (p / "cgroup.controllers").exists() else 1, p)]
    mounts, own = _mounts(), _own_paths()
    found = []
    if "v2" in mounts and "v2" in own:
        found.append((2, mounts["v2"] / own["v2"].lstrip("/")))
    if "memory" in mounts and "memory" in own:
        found.append((1, mounts["memory"] / own["memory"].lstrip("/")))
    return found


def _v2_memory_enabled(parent: Path) -> bool:
    """Whether children of ``parent`` get the memory controller (enabling it when allowed)."""
    try:
        if "memory" in (parent / "cgroup.subtree_control").read_text().split():
            return True
        if "memory" not in (parent / "cgroup.controllers").read_text().split():
            return False
        (parent / "cgroup.subtree_control").write_text("+memory")  # EBUSY when the parent holds processes
        return True
    except OSError:
        return False


def _make(version: int, parent: Path, limit_bytes: int) -> MemoryCgroup | None:
    if version == 2 and not _v2_memory_enabled(parent):
        return None
    with _LOCK:
        name = f"thinktree-sandbox-{os.getpid()}-{next(_COUNTER)}"
    path = parent / name
    try:
        path.mkdir()
    except OSError:
        return None
    group = MemoryCgroup(path, version, limit_bytes)
    try:
        if version == 2:
            (path / "memory.max").write_text(str(limit_bytes))
            if (path / "memory.swap.max").exists():
                (path / "memory.swap.max").write_text("0")
        else:
            (path / "memory.limit_in_bytes").write_text(str(limit_bytes))
            if (path / "memory.memsw.limit_in_bytes").exists():  # memory + swap: no swapping past the limit
                (path / "memory.memsw.limit_in_bytes").write_text(str(limit_bytes))
    except OSError:
        group.remove(0)
        return None
    return group


def create_memory_cgroup(limit_bytes: int) -> MemoryCgroup | None:
    """A fresh cgroup limited to ``limit_bytes`` (all its processes together), or None if none can be made."""
    for version, parent in _parents():
        if parent.is_dir():
            group = _make(version, parent, limit_bytes)
            if group is not None:
                return group
    return None


def memory_cgroup_available() -> bool:
    """Whether :func:`create_memory_cgroup` works here (makes and removes a probe cgroup)."""
    group = create_memory_cgroup(64 << 20)
    if group is None:
        return False
    group.remove()
    return True
