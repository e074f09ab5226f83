"""Running ``accelerate launch`` with 2 CPU processes from the tests, with one retry for a known gloo start-up abort.

gloo's TCP transport occasionally aborts a rank while the process group starts ("terminate called without an active
exception", SIGABRT; pytorch/pytorch#188266, open). It happened once in this project's CI (a 2-process PRM test, which
then passed 4/4 alone), so a launch that died with exactly that message is retried once on a fresh port; any other
failure is returned as it is.
"""

from __future__ import annotations

import socket
import subprocess
import sys
from collections.abc import Callable

GLOO_ABORT = "terminate called without an active exception"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_launch(make_cmd: Callable[[], list[str]], **kwargs) -> subprocess.CompletedProcess:
    """``subprocess.run(make_cmd(), capture_output=True, text=True, **kwargs)``, once more after a gloo abort."""
    proc = subprocess.run(make_cmd(), capture_output=True, text=True, **kwargs)
    if proc.returncode != 0 and GLOO_ABORT in (proc.stdout or "") + (proc.stderr or ""):
        print(f"launch aborted in gloo start-up ({GLOO_ABORT!r}); retrying once", file=sys.stderr)
        proc = subprocess.run(make_cmd(), capture_output=True, text=True, **kwargs)
    return proc
