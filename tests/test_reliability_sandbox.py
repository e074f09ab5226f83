"""Issue 14, defect 13: the sandbox's memory cap holds for the sandbox as a whole, not per process: a memory
cgroup where one can be made, else fewer processes with a share of the cap each."""

from __future__ import annotations

import os
import sys
import textwrap
from pathlib import Path

import pytest

if not sys.platform.startswith("linux"):
    pytest.skip("the sandbox is Linux-only", allow_module_level=True)

from test_sandbox import _UNAVAILABLE

from thinktree.rewards import sandbox as sb
from thinktree.rewards.sandbox import run_code
from thinktree.rewards.sandbox.cgroup import _parents, memory_cgroup_available

pytestmark = pytest.mark.skipif(_UNAVAILABLE is not None, reason=f"sandbox unavailable here: {_UNAVAILABLE}")
CGROUPS = memory_cgroup_available()

CHILD_MB = 80
# Fork 6 children; each touches CHILD_MB MiB, reports, and holds it. After a while the parent counts the children
# that reported and are still alive: they hold their memory at the same time. Prints "held N" (or "fork failed").
HOLDERS = textwrap.dedent(f"""
    import os, select, time
    r, w = os.pipe()
    kids = []
    for i in range(6):
        try:
            pid = os.fork()
        except OSError:
            print("fork failed", flush=True)
            break
        if pid == 0:
            try:
                with open("/proc/self/oom_score_adj", "w") as f:
                    f.write("1000")  # the kernel kills children first, not the counting parent
            except OSError:
                pass
            try:
                block = b"\\x01" * ({CHILD_MB} << 20)
            except MemoryError:
                os._exit(3)
            os.write(w, b"x")
            time.sleep(30)
            os._exit(0)
        kids.append(pid)
    ready, end = 0, time.monotonic() + 4.0
    while time.monotonic() < end:
        if select.select([r], [], [], 0.1)[0]:
            ready += len(os.read(r, 64))
    alive = sum(1 for pid in kids if os.waitpid(pid, os.WNOHANG) == (0, 0))
    print("ready", ready, "held", min(ready, alive), flush=True)
""")


def _held(stdout: str) -> int:
    words = stdout.split()
    assert "held" in words, stdout
    return int(words[words.index("held") + 1])


@pytest.mark.skipif(not CGROUPS, reason="no memory cgroup can be created here")
def test_cgroup_caps_the_sandbox_as_a_whole() -> None:
    memory_mb, disk_mb = 200, 32
    result = run_code(HOLDERS, memory_mb=memory_mb, disk_mb=disk_mb, timeout_s=20, memory_cap="cgroup")
    assert result.memory_cap == "cgroup"
    held = _held(result.stdout)
    # per process each child fits (80 < 200 MiB); 6 x 80 = 480 MiB would pass a per-process cap
    assert 1 <= held and held * CHILD_MB <= memory_mb + disk_mb, result
    # one process alone may use most of the cap
    big = run_code("b = b'1' * (150 << 20); print(len(b) >> 20)", memory_mb=memory_mb, timeout_s=20)
    assert big.ok and big.stdout == "150\n" and big.memory_cap == "cgroup", big
    # over the whole cap: the kernel stops it and the verdict says why
    over = run_code(
        "import os\nfor _ in range(2):\n    os.fork()\nb = b'1' * (120 << 20)\nimport time; time.sleep(3)",
        memory_mb=memory_mb, disk_mb=disk_mb, timeout_s=20, memory_cap="cgroup",
    )  # fmt: skip
    assert not over.ok and over.memory_cap == "cgroup"
    assert over.error is not None and over.error.startswith("memory limit exceeded"), over


@pytest.mark.skipif(not CGROUPS, reason="no memory cgroup can be created here")
def test_cgroups_are_removed_after_the_run() -> None:
    version, parent = _parents()[0]
    mine = f"thinktree-sandbox-{os.getpid()}-"
    for cap in ("auto", "cgroup"):
        assert run_code("print(1)", memory_cap=cap).memory_cap == "cgroup"
    assert not [p for p in parent.iterdir() if p.name.startswith(mine)]


def test_rlimit_cap_gives_fewer_processes_a_share_each() -> None:
    memory_mb = 200  # 4 processes at most, 50 MiB of address space each
    result = run_code(HOLDERS, memory_mb=memory_mb, timeout_s=20, memory_cap="rlimit")
    assert result.memory_cap == "rlimit"
    assert _held(result.stdout) * CHILD_MB <= memory_mb, result
    assert "fork failed" in result.stdout  # RLIMIT_NPROC: the parent and at most 3 children
    small = run_code("b = b'1' * (20 << 20); print(len(b) >> 20)", memory_mb=memory_mb, memory_cap="rlimit")
    assert small.ok and small.stdout == "20\n", small
    big = run_code("b = b'1' * (80 << 20)", memory_mb=memory_mb, memory_cap="rlimit")
    assert not big.ok and big.error == "MemoryError", big


def test_memory_cap_option_is_checked(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="memory_cap must be one of"):
        run_code("pass", memory_cap="none")
    monkeypatch.setenv("THINKTREE_SANDBOX_CGROUP", str(tmp_path / "no-such-cgroup"))
    with pytest.raises(sb.SandboxUnavailableError, match="no memory cgroup"):
        run_code("pass", memory_cap="cgroup")
    assert run_code("print(1)").memory_cap == "rlimit"  # auto: falls back to the rlimit cap
