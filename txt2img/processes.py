"""Processes the project starts that must not outlive the process that started them.

Both ``bentoml serve`` (through circus) and torchrun start their workers in sessions of their own,
so neither a signal to the parent's process group nor a ``kill -9`` of the parent reaches them: a
serving worker would keep the port, a training rank would keep training and hold the name's claim.
Each such child calls ``die_with_parent`` as early as it can.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import threading
import time
from collections.abc import Callable

PARENT_CHECK_INTERVAL_S = 1.0
_PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process, but alive
        return True
    return True


def die_with_parent(parent_pid: int) -> None:
    """End this process as soon as ``parent_pid`` is no longer its parent, whatever ended the parent.

    The kernel sends SIGKILL when the parent dies (Linux's ``PR_SET_PDEATHSIG``); a thread watching the
    parent pid covers other kernels, and a parent that died before this was called ends this one at once.
    """
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent_pid:  # handed to init or a subreaper already
        os.kill(os.getpid(), signal.SIGKILL)
    threading.Thread(target=_watch_parent, args=(parent_pid,), name="die-with-parent", daemon=True).start()


def kill_when_parent_dies(parent_pid: int) -> Callable[[], None]:
    """A ``preexec_fn`` for a child started with ``subprocess.Popen``: the kernel ends it (SIGKILL) when the
    thread that started it ends (keep that thread alive as long as its process), and a parent already
    gone ends it before it runs. For children that do not call ``die_with_parent`` themselves."""

    def before_exec() -> None:
        if sys.platform.startswith("linux"):
            ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if os.getppid() != parent_pid:
            os._exit(1)

    return before_exec


def _watch_parent(parent_pid: int) -> None:
    while os.getppid() == parent_pid:
        time.sleep(PARENT_CHECK_INTERVAL_S)
    os.kill(os.getpid(), signal.SIGKILL)
