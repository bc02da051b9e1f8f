"""A server worker dies with its server, however the server died.

``bentoml serve`` starts each worker through circus, as a direct child in a session of its own, so
neither a signal to the server's process group nor the end of the terminal reaches it. A server
killed with ``kill -9`` stops nothing itself: its workers would go on serving, holding the port, so
a restart on that port fails. Each worker therefore asks the kernel for SIGKILL when its parent
dies (Linux's ``PR_SET_PDEATHSIG``), and watches its parent's pid as well (txt2img/processes.py). The
server states its pid in SERVER_PID_ENV, so a worker whose server died while it was still starting
(before it could ask) knows, because its parent is some other process by then.
"""

from __future__ import annotations

import os

from txt2img.processes import die_with_parent, process_alive

SERVER_PID_ENV = "TXT2IMG_SERVER_PID"  # set by the serving process, read by its workers


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
    die_with_parent(server_pid)
