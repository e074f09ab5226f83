"""Run untrusted, model-written Python in an OS-level sandbox (Linux only).

``run_code(code)`` executes ``code`` in a fresh ``python -I -S -B`` interpreter and returns a
:class:`SandboxResult`; :class:`SandboxPool` / :func:`run_many` run many snippets in parallel (a thread pool
driving subprocesses; no ``preexec_fn``, so it is safe to call from threads).

Process layout (``L`` = launcher, ``I`` = init, ``U`` = user code)::

    caller ──Popen(start_new_session, close_fds, minimal env)──> L: python -I -S -B -c BOOTSTRAP <package dir>
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
* **Memory of the sandbox as a whole** (``memory_mb``, every process of it together; ``run_code``'s
  ``memory_cap``). Where a memory cgroup can be made (root with cgroup v1's memory hierarchy, or cgroup v2 with the
  memory controller available below our cgroup or below ``THINKTREE_SANDBOX_CGROUP``): each run gets its own
  cgroup, limited to ``memory_mb + disk_mb`` (the tmpfs /tmp is memory too), swap off; the launcher is moved into
  it before it forks, so every sandbox process is inside; the kernel OOM-kills past the limit (the verdict says
  "memory limit exceeded"); the cgroup is removed after the run. Elsewhere, rlimits alone: RLIMIT_NPROC at most
  ``RLIMIT_MAX_PROCS`` (4) processes and threads, each with RLIMIT_AS ``memory_mb / 4``, so that all of them
  together stay within ``memory_mb`` (fewer threads are possible there). ``SandboxResult.memory_cap`` says which.
* **Resources** (per process): RLIMIT_CPU (``cpu_s``, SIGXCPU then SIGKILL one second later), RLIMIT_AS
  (``memory_mb``; with the rlimit memory cap its share, above), RLIMIT_FSIZE (``max_file_bytes``), RLIMIT_NPROC (``max_procs``; counts threads too),
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
* memory beyond the cap's accounting: with the rlimit cap, RLIMIT_AS bounds address space per process, and the
  ``disk_mb`` tmpfs and kernel memory (page tables, pipes, sockets) come on top; a non-root caller in fallback mode
  (no namespaces) gets RLIMIT_NPROC headroom for its own processes, so there only each process is bounded;
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

Modules: :mod:`.result` (the verdict and the errors), :mod:`.runner` (the caller side of one run:
:func:`run_code`), :mod:`.cgroup` (the per-run memory cgroup), :mod:`.pool` (parallel runs), :mod:`.uids` (sandbox uid slots), :mod:`.launcher` (the
``L``, ``I`` and ``U`` processes) and :mod:`.kernel` (namespaces, mounts, capabilities, seccomp).
``launcher`` and ``kernel`` are all the launcher process loads (standard library only, imported by the
bootstrap under a private package name): they must import nothing else from this package.
"""

from __future__ import annotations

from .kernel import WORKDIR as WORKDIR
from .pool import SandboxPool, run_many
from .result import SandboxError, SandboxResult, SandboxUnavailableError
from .runner import _NS_UNAVAILABLE as _NS_UNAVAILABLE  # the tests simulate a host without namespaces
from .runner import DEFAULT_HIDE_PATHS as DEFAULT_HIDE_PATHS
from .runner import MAX_CODE_BYTES as MAX_CODE_BYTES
from .runner import run_code
from .uids import DEFAULT_UID_BASE as DEFAULT_UID_BASE
from .uids import UID_SLOTS as UID_SLOTS
from .uids import _slots as _slots  # the tests take uid locks to tell leaked processes from running ones
from .uids import sandbox_uid_range

__all__ = [
    "SandboxError",
    "SandboxPool",
    "SandboxResult",
    "SandboxUnavailableError",
    "run_code",
    "run_many",
    "sandbox_uid_range",
]
