"""The one way tests and benchmarks start the service: a real ``bentoml serve`` subprocess.

Test tooling, not product code, so it lives beside the tests (the wheel and the Bento leave it out);
bench/serving_common.py imports it with tests/ on ``sys.path``.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import psutil

from serving.bentoml_compat import WORKER_MODULE

REPO_ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextlib.contextmanager
def running_server(home: Path, **options) -> Iterator[str]:
    """``server_process`` for callers that need only the URL."""
    with server_process(home, **options) as (url, _):
        yield url


@contextlib.contextmanager
def offline_server(home: Path, env: dict[str, str] | None = None, **settings: str) -> Iterator[str]:
    """``running_server`` as most tests want it: one torch thread (the cores are shared), and Hub models
    only from an empty HF cache of its own, never downloaded."""
    offline = {"HF_HOME": str(Path(home) / "hf"), "HF_HUB_OFFLINE": "1", **(env or {})}
    with running_server(home, env=offline, **{"torch_threads": "1", "local_files_only": "1", **settings}) as url:
        yield url


@contextlib.contextmanager
def server_process(
    home: Path,
    *,
    bentoml_home: Path | None = None,
    log_path: Path | None = None,
    env: dict[str, str] | None = None,
    ready_timeout_s: float = 240,
    bento: str | None = None,
    cwd: Path = REPO_ROOT,
    ready_path: str = "/readyz",
    port: int | None = None,
    **settings: str,
) -> Iterator[tuple[str, subprocess.Popen]]:
    """``bentoml serve`` from the repository root on ``port`` (default: a free one); yields (URL, process)
    once ``ready_path`` (``/readyz``: the default model is warm; ``/livez``: the server answers) is 200.

    With ``bento`` (a built Bento's tag) it serves that Bento instead, from folder ``cwd``.

    ``home`` becomes TXT2IMG_HOME; the log goes to ``log_path`` (default ``home/server.log``) and
    BentoML's home is ``bentoml_home`` (default ``home/bentoml``). Each keyword becomes a
    ``TXT2IMG_<NAME>`` setting (``max_queue="16"``), and ``env`` adds other variables. The server
    leads its own process group; that group and every process the server started are stopped on
    the way out, whatever happened.
    """
    server_env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])),
        "TXT2IMG_HOME": str(home),
        "BENTOML_HOME": str(bentoml_home or Path(home) / "bentoml"),
        "TXT2IMG_MODEL": "tiny-sd",
        **{f"TXT2IMG_{name.upper()}": value for name, value in settings.items()},
        **(env or {}),
    }
    log_path = log_path or Path(home) / "server.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    url = f"http://127.0.0.1:{port or free_port()}"
    with log_path.open("ab") as log:
        process = subprocess.Popen(
            [
                str(Path(sys.executable).parent / "bentoml"),
                "serve",
                *filter(None, [bento]),
                "-p",
                url.rsplit(":", 1)[1],
            ],
            cwd=cwd,
            env=server_env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            wait_until_ready(process, url, log_path, ready_timeout_s, ready_path)
            yield url, process
        finally:
            _stop(process)


def wait_until_ready(
    process: subprocess.Popen, url: str, log_path: Path, timeout_s: float = 240, path: str = "/readyz"
) -> None:
    """Wait for ``path`` to answer 200; fail with the log's tail if the server exits or takes too long."""
    deadline = time.monotonic() + timeout_s
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"bentoml serve exited with {process.returncode}:\n{log_path.read_text()[-3000:]}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"bentoml serve not ready in {timeout_s:.0f} s:\n{log_path.read_text()[-3000:]}")
        with contextlib.suppress(httpx.TransportError):
            if httpx.get(f"{url}{path}", timeout=2).status_code == 200:
                return
        time.sleep(0.5)


# The limits of the test session's shared server (conftest.py's ``server`` fixture) that tests rely on.
SESSION_REQUEST_TIMEOUT_S = 15
SESSION_MAX_QUEUE = 16


def _stop(process: subprocess.Popen) -> None:
    # BentoML starts its worker in a session of its own, out of reach of the server's process group:
    # note every descendant first, so that none outlives the server.
    descendants = []
    with contextlib.suppress(psutil.NoSuchProcess):
        descendants = psutil.Process(process.pid).children(recursive=True)
    # SIGTERM first, so that BentoML shuts its workers down; SIGKILL for whatever is left.
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(timeout=30)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    _, alive = psutil.wait_procs(descendants, timeout=10)
    for leftover in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            leftover.kill()


def service_workers(server: subprocess.Popen) -> list[psutil.Process]:
    """The BentoML worker processes of a running ``bentoml serve``."""
    children = psutil.Process(server.pid).children(recursive=True)
    return [child for child in children if WORKER_MODULE in " ".join(child.cmdline())]
