"""Sandbox for model-written code: hostile payloads get a verdict in time and leave the host unharmed.

Every hostile payload is itself bounded (fork bombs stop at a few hundred processes, memory bombs at twice the
limit, loops at a deadline), so a sandbox bug fails a test instead of taking the machine down.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

if not sys.platform.startswith("linux"):
    pytest.skip("the sandbox is Linux-only", allow_module_level=True)

from thinktree.rewards import sandbox as sb
from thinktree.rewards.code_steps import (
    OUTPUT_TEMPLATE,
    collect_code,
    execute_step,
    execute_steps,
    extract_code_blocks,
    format_output,
    has_output,
)
from thinktree.rewards.sandbox import SandboxPool, SandboxResult, run_code, run_many

ROOT = os.geteuid() == 0
SLACK_S = 1.0  # a verdict must come back within timeout_s + SLACK_S


def _probe() -> str | None:
    """Why the sandbox cannot isolate here (the tests then skip), or None. Other failures fail loudly."""
    try:
        run_code("pass", timeout_s=10)
    except sb.SandboxUnavailableError as exc:
        return str(exc)
    return None


_UNAVAILABLE = _probe()
pytestmark = pytest.mark.skipif(
    _UNAVAILABLE is not None, reason=f"sandbox namespaces unavailable here: {_UNAVAILABLE}"
)


def _sandbox_processes() -> list[int]:
    """Leaked processes: children of ours (launchers) and, as root, live processes of a sandbox uid that no
    running sandbox holds (its lock is free; other test processes' sandboxes hold theirs)."""
    me = str(os.getpid())
    uids = sb.sandbox_uid_range() if ROOT else range(0)
    children, by_uid = [], {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            uid = os.stat(f"/proc/{name}").st_uid
            with open(f"/proc/{name}/stat") as fh:
                ppid = fh.read().rpartition(")")[2].split()[1]
        except (OSError, IndexError):
            continue
        if ppid == me:
            children.append(int(name))
        if uid in uids:
            by_uid.setdefault(uid, []).append(int(name))
    leaked = children
    for uid, pids in by_uid.items():
        with _unless_in_use(uid) as free:
            if free:
                leaked += [pid for pid in pids if _uid_of(pid) == uid]
    return leaked


def _uid_of(pid: int) -> int | None:
    try:
        return os.stat(f"/proc/{pid}").st_uid
    except OSError:
        return None


@contextlib.contextmanager
def _unless_in_use(uid: int) -> Iterator[bool]:
    """Yields False while a sandbox (of any process) runs as ``uid``; else True, holding its lock meanwhile."""
    fd = os.open(os.path.join(sb._slots(None).lock_dir, f"uid-{uid}.lock"), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
        else:
            yield True
    finally:
        os.close(fd)


def _host_temp_dirs() -> set[str]:
    """Fallback-mode work dirs on the host not belonging to a running sandbox (a concurrent test run's)."""
    found = set()
    for name in os.listdir(tempfile.gettempdir()):
        if name.startswith("thinktree-sandbox-work-"):
            try:
                owner = os.stat(os.path.join(tempfile.gettempdir(), name)).st_uid
            except OSError:
                continue
            if not (ROOT and owner in sb.sandbox_uid_range()):
                found.add(name)
                continue
            with _unless_in_use(owner) as free:
                if free and os.path.exists(os.path.join(tempfile.gettempdir(), name)):
                    found.add(name)
    return found


@pytest.fixture(autouse=True)
def _host_unharmed() -> Iterator[None]:
    """After every test: no sandbox process, temp dir or fd of ours left behind."""
    temps, fds = _host_temp_dirs(), set(os.listdir("/proc/self/fd"))
    yield
    deadline = time.monotonic() + 2.0
    while _sandbox_processes() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert _sandbox_processes() == []
    assert _host_temp_dirs() <= temps
    assert len(set(os.listdir("/proc/self/fd")) - fds) <= 1  # listdir's own fd


def _timed(code: str, **kwargs: object) -> tuple[SandboxResult, float]:
    t0 = time.monotonic()
    result = run_code(textwrap.dedent(code), **kwargs)  # type: ignore[arg-type]
    return result, time.monotonic() - t0


# --------------------------------------------------------------------------------------------- basics


def test_print() -> None:
    result, wall = _timed("print(2+2)")
    assert result.ok and result.stdout == "4\n" and result.exit_code == 0, result
    assert result.stderr == "" and result.error is None and not result.timed_out
    assert result.isolation == "namespaces"
    assert wall < 2.0 + SLACK_S


def test_identity_and_confinement() -> None:
    """Unprivileged, no capabilities, no_new_privs + seccomp, private /tmp, /dev and /proc."""
    result, _ = _timed(
        """
        import os
        status = dict(l.split(":", 1) for l in open("/proc/self/status"))
        print(os.getuid(), os.getgid(), os.getgroups(), os.getcwd())
        print(status["CapEff"].strip(), status["CapPrm"].strip(), status["CapBnd"].strip())
        print(status["NoNewPrivs"].strip(), status["Seccomp"].strip())
        print(sorted(os.listdir("/tmp")), sorted(os.listdir("/dev")))
        print(sorted(int(p) for p in os.listdir("/proc") if p.isdigit()))
        print(oct(os.stat(".").st_mode & 0o777), os.stat(".").st_uid == os.getuid())
        print(sorted(os.environ))
        """
    )
    assert result.ok, result
    ids, caps, privs, dirs, pids, work, env = result.stdout.splitlines()
    uid, gid = (int(x) for x in ids.split()[:2])
    if ROOT:
        assert uid in sb.sandbox_uid_range() and gid == uid
    else:
        assert uid == 0  # root of its own user namespace, without any capability
        assert caps.split()[2] == "0000000000000000"
    assert ids.endswith("[] /tmp/work")
    assert caps.split()[:2] == ["0000000000000000", "0000000000000000"]
    assert privs == "1 2"
    assert dirs == "['work'] ['fd', 'full', 'null', 'random', 'stderr', 'stdin', 'stdout', 'urandom', 'zero']"
    assert pids == "[1, 2]"  # its own pid namespace: init + itself
    assert work == "0o700 True"
    assert env == "['HOME', 'LANG', 'LC_ALL', 'MALLOC_ARENA_MAX', 'PATH', 'TMPDIR']"


def test_no_inherited_fds_or_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("THINKTREE_TEST_SECRET", "hunter2")
    fd = os.open(__file__, os.O_RDONLY)
    os.set_inheritable(fd, True)
    try:
        result, _ = _timed("import os; print(sorted(os.listdir('/proc/self/fd'))); print(dict(os.environ))")
    finally:
        os.close(fd)
    assert result.ok, result
    fds = eval(result.stdout.splitlines()[0])  # noqa: S307 - our own literal
    assert set(fds) <= {"0", "1", "2", "3"}  # 3 = listdir's own
    assert "hunter2" not in result.stdout


def test_exit_codes() -> None:
    r3, _ = _timed("import sys; sys.exit(3)")
    assert (r3.ok, r3.exit_code, r3.error) == (False, 3, "exit code 3")
    r5, _ = _timed("import os; print('bye', flush=True); os._exit(5)")
    assert (r5.ok, r5.exit_code, r5.stdout) == (False, 5, "bye\n")
    r0, _ = _timed("raise SystemExit(0)")
    assert r0.ok and r0.exit_code == 0
    rv, _ = _timed("raise ValueError('nope')")
    assert rv.exit_code == 1 and rv.error == "ValueError: nope" and "Traceback" in rv.stderr


def test_deep_recursion() -> None:
    result, _ = _timed("def f(n): return f(n + 1)\nf(0)")
    assert not result.ok and result.exit_code == 1
    assert result.error is not None and result.error.startswith("RecursionError")
    crash, _ = _timed("import ctypes; ctypes.string_at(0)")  # a segfault in the child, not in us
    assert crash.killed_by_signal == signal.SIGSEGV and crash.exit_code == -signal.SIGSEGV
    assert crash.error == "killed by signal SIGSEGV"


# --------------------------------------------------------------------------------------------- time


def test_infinite_loop_times_out() -> None:
    code = """
    import signal, time
    for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(s, signal.SIG_IGN)
    deadline = time.time() + 30   # bounded: ends by itself if the sandbox fails to stop it
    while time.time() < deadline:
        pass
    """
    result, wall = _timed(code, timeout_s=1.0, cpu_s=10)
    assert result.timed_out and not result.ok and result.exit_code is None
    assert result.error == "timeout after 1s"
    assert 1.0 <= wall < 1.0 + SLACK_S


def test_sleep_times_out() -> None:
    result, wall = _timed("import time; print('start', flush=True); time.sleep(30)", timeout_s=1.0)
    assert result.timed_out and result.stdout == "start\n"
    assert wall < 1.0 + SLACK_S


def test_cpu_limit() -> None:
    code = "import time\nt = time.time() + 30\nwhile time.time() < t: pass"
    result, wall = _timed(code, timeout_s=8.0, cpu_s=1)
    assert not result.timed_out, result
    assert result.killed_by_signal in (signal.SIGXCPU, signal.SIGKILL)
    assert wall < 8.0


# --------------------------------------------------------------------------------------------- processes


def test_fork_bomb_is_bounded() -> None:
    code = """
    import os, time
    n = 0
    for i in range(300):           # bounded: a few hundred processes at most
        try:
            pid = os.fork()
        except OSError as e:
            print("fork failed", i, e.errno, flush=True)
            break
        if pid == 0:
            time.sleep(30)
            os._exit(0)
        n += 1
    print("forked", n)
    """
    result, wall = _timed(code, timeout_s=5.0, max_procs=32)
    assert result.ok, result
    failed, forked = result.stdout.splitlines()
    assert failed.startswith("fork failed") and failed.endswith(" 11")  # EAGAIN from RLIMIT_NPROC
    assert int(forked.split()[1]) < 32
    assert wall < 5.0
    # the sleeping children died with the sandbox's pid namespace (checked by the autouse fixture too)
    assert _sandbox_processes() == []


def test_escaped_children_are_killed_on_timeout() -> None:
    code = """
    import os, signal, time
    for i in range(10):                       # bounded: at most 21 processes
        if os.fork() == 0:
            os.setsid()                       # leave the process group
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            if os.fork() == 0:                # double fork: re-parented daemon
                time.sleep(30)
            os._exit(0)
    time.sleep(30)
    """
    result, wall = _timed(code, timeout_s=1.0)
    assert result.timed_out
    assert wall < 1.0 + SLACK_S
    assert _sandbox_processes() == []


def test_threads_are_bounded() -> None:
    code = """
    import threading, time
    n = 0
    for i in range(200):
        try:
            threading.Thread(target=time.sleep, args=(0.5,), daemon=True).start()
            n += 1
        except RuntimeError:
            break
    print(n)
    """
    result, _ = _timed(code, max_procs=16)
    assert result.ok, result
    assert 0 < int(result.stdout) < 16


def test_cannot_kill_the_caller() -> None:
    code = """
    import os, signal
    for target in (os.getppid(), 1, -1, 0):
        try:
            os.kill(target, signal.SIGKILL) if target else None
        except OSError as e:
            print(target, type(e).__name__)
    """
    result, _ = _timed(code)
    assert result.stdout.startswith("1 PermissionError\n")  # getppid() is the namespace's init
    # kill(-1) can only reach the sandbox's own processes (itself): we are alive and got a verdict
    assert result.killed_by_signal in (None, signal.SIGKILL)
    assert os.getpid() > 0 and threading.main_thread().is_alive()


FORGE_VERDICT = """
import os
for pid in ("1", "self/../1"):
    for fd in range(3, 64):
        try:
            with open(f"/proc/{pid}/fd/{fd}", "w") as fh:   # the init's status pipe, if it were reachable
                fh.write("exit 0\\n")
            print("FORGED", fd)
        except OSError:
            pass
os._exit(7)
"""


def test_cannot_forge_the_verdict() -> None:
    result, _ = _timed(FORGE_VERDICT)
    assert "FORGED" not in result.stdout
    assert result.exit_code == 7 and not result.ok


def test_privileges_cannot_be_regained() -> None:
    code = """
    import ctypes, os
    libc = ctypes.CDLL(None, use_errno=True)
    for name, call in [("setuid", lambda: os.setuid(0)), ("setgroups", lambda: os.setgroups([0]))]:
        try:
            call(); print(name, "ok")
        except PermissionError:
            print(name, "denied")
    for flags in (0x10000000, 0x40000000, 0x00020000):   # CLONE_NEWUSER, CLONE_NEWNET, CLONE_NEWNS
        print("unshare", libc.unshare(flags), ctypes.get_errno())
    print("mount", libc.mount(b"none", b"/mnt", b"tmpfs", 0, None), ctypes.get_errno())
    """
    result, _ = _timed(code)
    assert result.ok, result
    lines = result.stdout.splitlines()
    assert lines[:2] == ["setuid denied", "setgroups denied"]
    assert lines[2:5] == ["unshare -1 1"] * 3  # EPERM (seccomp / no capability)
    assert lines[5] == "mount -1 1"


# --------------------------------------------------------------------------------------------- memory, output, files


def test_memory_bomb() -> None:
    code = """
    chunks = []
    for i in range(16):                    # bounded: 16 x 16 MiB = 2x the limit
        chunks.append(bytearray(16 << 20))
    print("allocated", len(chunks))
    """
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    result, wall = _timed(code, memory_mb=128, timeout_s=10.0)
    assert not result.ok and not result.timed_out
    assert result.error == "MemoryError" or result.killed_by_signal is not None, result
    assert "allocated" not in result.stdout
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 32 << 10  # KiB: ours did not grow
    assert wall < 10.0


def test_huge_output_is_capped() -> None:
    code = """
    import sys
    line = "x" * 65535 + "\\n"
    for _ in range(1024):                  # bounded: 64 MiB
        sys.stdout.write(line)
    sys.stderr.write("e" * 100000)
    """
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    result, _ = _timed(code, timeout_s=10.0, max_output_bytes=4096)
    assert result.ok, result.error
    assert result.truncated
    assert len(result.stdout) == 4096 and set(result.stdout) <= {"x", "\n"}
    assert len(result.stderr) == 4096
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 32 << 10


def test_file_size_and_disk_limits() -> None:
    big, _ = _timed("open('big', 'wb').write(b'x' * 2_000_000)", max_file_bytes=1_000_000)
    assert not big.ok and big.error is not None and "File too large" in big.error
    full, _ = _timed(
        "for i in range(64): open(f'f{i}', 'wb').write(b'x' * 500_000)", disk_mb=8, max_file_bytes=1_000_000
    )
    assert not full.ok and full.error is not None and "No space left" in full.error
    ok, _ = _timed("open('a.txt', 'w').write('hi'); print(open('a.txt').read())")
    assert ok.ok and ok.stdout == "hi\n"


@pytest.fixture
def world_writable_dir() -> Iterator[Path]:
    """A host dir everyone may write (mode 0777) in a place the sandbox can see."""
    base = Path("/var/tmp") if os.path.isdir("/var/tmp") else Path(tempfile.gettempdir())
    path = base / f"thinktree-sandbox-test-{uuid.uuid4().hex}"
    path.mkdir()
    path.chmod(0o777)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_cannot_write_outside_workdir(world_writable_dir: Path, tmp_path: Path) -> None:
    name = f"escape-{uuid.uuid4().hex}"
    targets = [
        world_writable_dir / name,
        tmp_path / name,
        Path(tempfile.gettempdir()) / name,
        Path(__file__).resolve().parent / name,
        Path("/") / name,
    ]
    code = f"""
    import os
    for path in {[str(t) for t in targets] + ["../" + name]!r}:
        try:
            with open(path, "w") as fh:
                fh.write("pwned")
            print("WROTE", path)
        except OSError as e:
            print("failed", path, e.errno)
    """
    result, _ = _timed(code)
    assert result.ok, result
    assert "WROTE" not in result.stdout
    assert result.stdout.count("failed") == len(targets) + 1
    assert f"failed {world_writable_dir / name} 30" in result.stdout  # EROFS: the host tree is read-only
    for target in targets:
        assert not target.exists()


def test_cannot_read_root_only_file(world_writable_dir: Path) -> None:
    if not ROOT:
        pytest.skip(
            "not root: the sandbox runs as our own uid inside a user namespace, so it can read what we can"
        )
    secret_dir = world_writable_dir / "d"
    secret_dir.mkdir(mode=0o755)
    secret_dir.chmod(0o755)
    secret = secret_dir / "secret.txt"
    secret.write_text("TOPSECRET")
    secret.chmod(0o600)
    code = f"""
    import os
    for path in [{str(secret)!r}, "/etc/shadow"]:
        try:
            print("READ", open(path).read())
        except OSError as e:
            print("failed", e.errno)
    try:
        print(os.listdir("/root"))
    except OSError as e:
        print("failed", e.errno)
    """
    result, _ = _timed(code)
    assert result.ok, result
    assert "TOPSECRET" not in result.stdout and "READ" not in result.stdout
    lines = result.stdout.splitlines()
    assert lines[0] == "failed 13"  # EACCES
    assert lines[1] in ("failed 13", "failed 2")  # /etc/shadow may not exist
    assert "secret" not in lines[2]


# --------------------------------------------------------------------------------------------- network


def test_network_is_off() -> None:
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    listener.settimeout(0.3)
    port = listener.getsockname()[1]
    abstract = f"\0thinktree-sandbox-test-{uuid.uuid4().hex}"
    unix = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    unix.bind(abstract)
    unix.listen(1)
    unix.settimeout(0.3)
    code = f"""
    import socket
    print(sorted(name for _, name in socket.if_nameindex()))
    attempts = [
        (socket.AF_INET, ("127.0.0.1", {port})),
        (socket.AF_INET, ("1.1.1.1", 53)),
        (socket.AF_INET6, ("::1", {port})),
        (socket.AF_UNIX, {abstract!r}),
    ]
    for family, addr in attempts:
        s = socket.socket(family, socket.SOCK_STREAM)
        s.settimeout(2)
        try:
            s.connect(addr)
            print("CONNECTED", addr)
        except OSError as e:
            print("failed", e.errno)
    try:
        socket.socket(socket.AF_INET, socket.SOCK_DGRAM).sendto(b"x", ("8.8.8.8", 53))
        print("SENT")
    except OSError as e:
        print("failed", e.errno)
    """
    try:
        result, _ = _timed(code, timeout_s=5.0)
        for sock in (listener, unix):
            with pytest.raises(TimeoutError):
                sock.accept()  # nobody reached our host sockets
    finally:
        listener.close()
        unix.close()
    assert result.ok, result
    assert result.stdout.splitlines()[0] == "['lo']"  # a new network namespace: loopback only, and down
    assert "CONNECTED" not in result.stdout and "SENT" not in result.stdout
    assert result.stdout.count("failed") == 5


# --------------------------------------------------------------------------------------------- parallel


def test_many_in_parallel() -> None:
    codes = [f"import time; time.sleep(0.3); print({i} * {i})" for i in range(16)]
    threads_before = threading.active_count()
    t0 = time.monotonic()
    with SandboxPool(max_workers=4) as pool:
        results = pool.run_many(codes)
    wall = time.monotonic() - t0
    assert [r.stdout for r in results] == [f"{i * i}\n" for i in range(16)]
    assert all(r.ok for r in results)
    assert wall < 16 * 0.3  # really parallel (4 waves of ~0.35 s plus start-up)
    assert threading.active_count() == threads_before
    assert _sandbox_processes() == []


def test_hostile_neighbours_do_not_starve_others() -> None:
    """One uid per running sandbox: fork bombs in some sandboxes do not use up the others' process budget."""
    bomb = textwrap.dedent(
        """
        import os, time
        for i in range(200):
            try:
                if os.fork() == 0:
                    time.sleep(30); os._exit(0)
            except OSError:
                break
        time.sleep(1.5)
        """
    )
    normal = "import threading; t = threading.Thread(target=print, args=('ok',)); t.start(); t.join()"
    results = run_many([bomb, normal] * 3, max_workers=6, timeout_s=5.0, max_procs=32)
    assert [r.stdout for r in results[1::2]] == ["ok\n"] * 3
    assert all(r.ok for r in results)


# --------------------------------------------------------------------------------------------- other modes


def test_refuses_without_namespaces_unless_allowed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sb._NS_UNAVAILABLE, ROOT, "simulated: unshare not permitted")
    with pytest.raises(sb.SandboxUnavailableError, match="allow_network_fallback"):
        run_code("print(1)")
    result = run_code("import os; print(2 + 2, os.getuid() != 0)", allow_network_fallback=True)
    assert result.ok and result.isolation == "fallback"
    assert result.stdout == ("4 True\n" if ROOT else "4 False\n")
    code = """
    import os, time
    for i in range(10):
        if os.fork() == 0:
            os.setsid(); time.sleep(30); os._exit(0)
    time.sleep(30)
    """
    result, wall = _timed(code, timeout_s=1.0, allow_network_fallback=True)
    assert result.timed_out and wall < 1.0 + SLACK_S
    # the autouse fixture checks the setsid'd children and the host temp dir are gone


@pytest.mark.skipif(not ROOT, reason="needs root to start a process as an unprivileged user")
def test_unprivileged_caller_uses_a_user_namespace(world_writable_dir: Path) -> None:
    """The non-root path: the same guarantees through an unprivileged user namespace."""
    setpriv, python = shutil.which("setpriv"), "/usr/bin/python3"
    if setpriv is None or not os.access(python, os.X_OK):
        pytest.skip("needs setpriv and /usr/bin/python3 to run the sandbox as an unprivileged user")
    module = world_writable_dir / "sandbox_copy"  # a package copy the unprivileged user can surely read
    shutil.copytree(Path(sb.__file__).parent, module, ignore=shutil.ignore_patterns("__pycache__"))
    script = world_writable_dir / "check.py"
    script.write_text(
        textwrap.dedent(
            """
            import importlib.util, json, sys
            spec = importlib.util.spec_from_file_location(
                "sb", sys.argv[1] + "/__init__.py", submodule_search_locations=[sys.argv[1]]
            )
            sb = importlib.util.module_from_spec(spec)
            sys.modules["sb"] = sb
            spec.loader.exec_module(sb)
            try:
                sb.run_code("pass")
            except sb.SandboxUnavailableError as e:
                print(json.dumps({"unavailable": str(e)}))
                raise SystemExit(0)
            codes = {
                "print": "print(2 + 2)",
                "net": "import socket; socket.create_connection(('127.0.0.1', 9), timeout=1)",
                "write": "open('/var/tmp/thinktree-escape', 'w')",
                "fork": "import os, time\\nfor i in range(300):\\n    if os.fork() == 0: time.sleep(9); os._exit(0)",
                "mount": "import ctypes; print(ctypes.CDLL(None).umount2(b'/tmp', 2))",
                "loop": "while True: pass",
                "forge": sys.argv[2],
            }
            out = {k: vars(sb.run_code(c, timeout_s=1.0, max_procs=16)) for k, c in codes.items()}
            print(json.dumps(out))
            """
        )
    )
    for path in (*module.iterdir(), script):
        path.chmod(0o644)
    module.chmod(0o755)
    proc = subprocess.run(
        [
            setpriv,
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            python,
            "-I",
            str(script),
            str(module),
            FORGE_VERDICT,
        ],
        capture_output=True,
        text=True,
        timeout=30,
        cwd="/",
    )
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    if "unavailable" in out:
        pytest.skip(f"unprivileged user namespaces are disabled here: {out['unavailable']}")
    assert out["print"]["stdout"] == "4\n" and out["print"]["isolation"] == "namespaces"
    assert "Network is unreachable" in out["net"]["error"]
    assert "Read-only file system" in out["write"]["error"]
    assert not os.path.exists("/var/tmp/thinktree-escape")
    assert "Resource temporarily unavailable" in out["fork"]["error"]
    assert out["mount"]["stdout"] == "-1\n"  # capabilities dropped: the mounts cannot be undone
    assert out["loop"]["timed_out"] and out["loop"]["wall_s"] < 1.0 + SLACK_S
    assert out["forge"]["exit_code"] == 7 and "FORGED" not in out["forge"]["stdout"]


# --------------------------------------------------------------------------------------------- code steps

STEP = "Let me compute it.\n```python\nx = 6 * 7\nprint(x)\n```\n"


def test_extract_code_blocks() -> None:
    text = "a\n```python\nprint(1)\n```\nb\n```py\nprint(2)\n```\n```\nnot code\n```\n```python\nunclosed"
    assert extract_code_blocks(text) == ["print(1)\n", "print(2)\n"]
    assert extract_code_blocks("no code here") == []
    assert extract_code_blocks("") == []


def test_execute_step_appends_output() -> None:
    out = execute_step(STEP)
    assert out == STEP + OUTPUT_TEMPLATE.format(body="42") == STEP + "```output\n42\n```\n"
    assert has_output(out) and not has_output(STEP)
    assert execute_step(out) == out  # re-executed: the old output block is replaced, same text
    assert execute_step("Just words, no code.") == "Just words, no code."
    no_newline = "```python\nprint('hi')\n```"
    assert execute_step(no_newline) == no_newline + "\n```output\nhi\n```\n"


def test_model_written_output_is_not_trusted() -> None:
    fake = STEP + "```output\n41\n```\nSo the answer is 41.\n"
    assert execute_step(fake) == STEP + "```output\n42\n```\nSo the answer is 41.\n"
    for dangling in ("```output", "```output\n", "\n```output\n"):  # stop string kept by the backend
        assert execute_step(STEP + dangling) == STEP + "```output\n42\n```\n"
    glued = "```python\nprint(1)\n```"
    assert execute_step(glued + "```output\n") == glued + "\n```output\n1\n```\n"


def test_execute_step_reports_errors_and_timeouts() -> None:
    err = execute_step("```python\nprint('partial')\nprint(y)\n```\n")
    assert err.endswith("```output\npartial\nNameError: name 'y' is not defined\n```\n")
    slow = execute_step("```python\nwhile True: pass\n```\n", timeout_s=0.5)
    assert slow.endswith("```output\nTimeoutError: timeout after 0.5s\n```\n")
    long = execute_step("```python\nprint('z' * 10000)\n```\n", max_output_bytes=100)
    assert long.endswith("```output\n" + "z" * 100 + "\n[output truncated]\n```\n")


def test_execute_step_with_prelude() -> None:
    previous = ["Define x.\n```python\nx = 5\nprint('noise')\n```\n```output\nnoise\n```\n", "Think."]
    out = execute_step("```python\nprint(x + 1)\n```\n", prelude=collect_code(previous))
    assert out.endswith("```output\n6\n```\n")
    assert collect_code(previous) == "x = 5\nprint('noise')\n"


def test_execute_steps_batched() -> None:
    texts = [f"```python\nprint({i} + 1)\n```\n" for i in range(6)] + ["no code", STEP]
    with SandboxPool(max_workers=3) as pool:
        out = execute_steps(texts, pool)
        assert [t.rsplit("```output\n", 1)[-1] for t in out[:6]] == [f"{i + 1}\n```\n" for i in range(6)]
        assert out[6] == "no code"
        assert out[7].endswith("```output\n42\n```\n")
        with pytest.raises(ValueError):
            execute_steps(texts, pool, preludes=["x = 1"])
    assert execute_steps(["```python\nprint(x)\n```\n"], preludes=["x = 'p'"]) == [
        "```python\nprint(x)\n```\n```output\np\n```\n"
    ]


def test_format_output() -> None:
    ok = SandboxResult(True, "1\n2\n", "", 0, False, None, None, 0.1)
    assert format_output(ok) == "1\n2"
    bad = SandboxResult(False, "", "Traceback...\nZeroDivisionError: division by zero\n", 1, False, None,
                        "ZeroDivisionError: division by zero", 0.1)  # fmt: skip
    assert format_output(bad) == "ZeroDivisionError: division by zero"
