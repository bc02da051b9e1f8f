"""A server worker dies with its server, however the server died.

``bentoml serve`` starts each worker through circus, as a direct child in a session of its own, so
neither a signal to the server's process group nor the end of the terminal reaches it. A server
killed with ``kill -9`` stops nothing itself: its workers would go on serving, holding the port, so
a restart on that port fails. Each worker therefore asks the kernel for SIGKILL when its parent
dies (Linux's ``PR_SET_PDEATHSIG``), and watches its parent's pid as well (any POSIX system). The
server states its pid in SERVER_PID_ENV, so a worker whose server died while it was still starting
(before it could ask) knows, because its parent is some other process by then.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import signal
import sys
import threading
import time

from serving.metrics import process_alive

SERVER_PID_ENV = "TXT2IMG_SERVER_PID"  # set by the serving process, read by its workers
PARENT_CHECK_INTERVAL_S = 1.0
_PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>


def tie_workers_to_server() -> None:
    """At the service's import: in the serving process, state its pid for its workers; in a worker,
    end this process within about a second of its server's end (at once if the server is gone already).

    Outside a server (a test importing the service) it only sets SERVER_PID_ENV, which the next
    ``bentoml serve`` sets again for its own workers.
    """
    import bentoml

    if bentoml.server_context.worker_index is None:
        os.environ[SERVER_PID_ENV] = str(os.getpid())
        return
    server_pid = int(os.environ.get(SERVER_PID_ENV) or os.getppid())
    if server_pid != os.getppid() and process_alive(server_pid):  # started by another process than the one named
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
