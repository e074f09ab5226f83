"""Linux interfaces of the launcher (run in the launcher process and its children, before the model's code):
namespace/mount/prctl/seccomp constants, libc calls through ctypes, the sandbox's filesystem view (private
mount namespace), the capability drop (user-namespace mode) and the seccomp deny-list.

Trusted code, standard library only (``ctypes`` and ``os``): it is imported by the launcher bootstrap of
:mod:`thinktree.rewards.sandbox.runner` under ``python -I -S``, where the package itself is not importable.
"""

from __future__ import annotations

import ctypes
import os

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
