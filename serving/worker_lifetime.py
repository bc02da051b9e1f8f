"""A server worker dies with its server, however the server died.

``bentoml serve`` starts each worker through circus, as a direct child in a session of its own, so
neither a signal to the server's process group nor the end of the terminal reaches it. A server
killed with ``kill -9`` stops nothing itself: its workers would go on serving, holding the port, so
a restart on that port fails. Each worker therefore asks the kernel for SIGKILL when its parent
dies (Linux's ``PR_SET_PDEATHSIG``), and watches its parent's pid as well (any POSIX system, and the
parent that died before the request was made).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import signal
import sys
import threading
import time

PARENT_CHECK_INTERVAL_S = 1.0
_PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>


def die_with_server() -> None:
    """In a ``bentoml serve`` worker, end this process within about a second of its server's end.

    Outside a server (a test making the service in its own process) it does nothing: that process's
    parent is not a server.
    """
    import bentoml

    if bentoml.server_context.worker_index is None:
        return
    server_pid = os.getppid()
    if sys.platform == "linux":
        libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    threading.Thread(target=_watch_parent, args=(server_pid,), name="die-with-server", daemon=True).start()


def _watch_parent(server_pid: int) -> None:
    # Once the server is gone this process has been handed to another parent (init or a subreaper).
    while os.getppid() == server_pid:
        time.sleep(PARENT_CHECK_INTERVAL_S)
    os.kill(os.getpid(), signal.SIGKILL)
