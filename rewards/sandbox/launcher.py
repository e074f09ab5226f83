"""The processes of one sandboxed run: the launcher (``L``), the init of the new pid namespace (``I``) and the
user-code process (``U``); see the package docstring for the layout.

Trusted code, standard library only: :data:`thinktree.rewards.sandbox.runner._BOOTSTRAP` imports this module
and :mod:`.kernel` in a fresh ``python -I -S -B`` under a private package name (the real package is not
importable there) and calls :func:`_launcher_main`. It must stay fast to start and import nothing else.
"""

from __future__ import annotations

import marshal
import os
import resource
import signal
import sys

from .kernel import (
    CLONE_NEWIPC,
    CLONE_NEWNET,
    CLONE_NEWNS,
    CLONE_NEWPID,
    CLONE_NEWUSER,
    CLONE_NEWUTS,
    PR_SET_CHILD_SUBREAPER,
    PR_SET_DUMPABLE,
    PR_SET_NO_NEW_PRIVS,
    PR_SET_PDEATHSIG,
    _c,
    _check,
    _drop_capabilities,
    _install_seccomp,
    _setup_filesystem,
    _write,
)

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
