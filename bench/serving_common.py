"""Shared by the serving benchmarks: start a real ``bentoml serve`` on tiny-sd, and the in-process baseline."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

REPO_ROOT = Path(__file__).resolve().parents[1]
# The settings every benchmark uses, on both sides of each comparison.
WIDTH = HEIGHT = 64
STEPS = 4
TORCH_THREADS = int(os.environ.get("BENCH_TORCH_THREADS", "1"))
PAYLOAD = {"prompt": "a red cube on a table", "width": WIDTH, "height": HEIGHT, "num_inference_steps": STEPS}


def run_in_own_session() -> None:
    """Re-run this script as the leader of a new session, unless it already is one.

    Linux's autogroup scheduler shares the CPU between sessions, and BentoML starts its worker in
    a session of its own. Without this the in-process baseline would share its session's CPU with
    whatever else the terminal runs, while the server got a full share: an unfair comparison.
    """
    if os.getsid(0) != os.getpid():
        sys.exit(subprocess.call([sys.executable, *sys.argv], start_new_session=True))


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextlib.contextmanager
def running_server(home: str | None = None, **settings: str):
    """A ``bentoml serve`` subprocess with ``TXT2IMG_*`` settings (default: tiny-sd); yields its URL once ready."""
    home = home or tempfile.mkdtemp(prefix="txt2img-bench-")
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]),
        "TXT2IMG_HOME": home,
        "TXT2IMG_MODEL": "tiny-sd",
        "TXT2IMG_TORCH_THREADS": str(TORCH_THREADS),
        **{f"TXT2IMG_{name.upper()}": value for name, value in settings.items()},
    }
    port = _free_port()
    log = open(Path(home) / "server.log", "wb")
    process = subprocess.Popen(
        [str(Path(sys.executable).parent / "bentoml"), "serve", "-p", str(port)],
        cwd=REPO_ROOT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while True:
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"server did not start; see {log.name}")
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                    break
            time.sleep(0.5)
        yield url
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=60)
        log.close()


def in_process_pipeline():
    """tiny-sd as a plain diffusers pipeline, the way a script without any server would run it."""
    import torch

    from catalog.tiny_sd import build_tiny_sd_pipeline

    torch.set_num_threads(TORCH_THREADS)
    pipeline = build_tiny_sd_pipeline()
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def in_process_images(pipeline, seeds: list[int]) -> None:
    """One plain pipeline call generating one image per seed."""
    import torch

    pipeline(
        prompt=[PAYLOAD["prompt"]] * len(seeds),
        width=WIDTH,
        height=HEIGHT,
        num_inference_steps=STEPS,
        generator=[torch.Generator("cpu").manual_seed(seed) for seed in seeds],
    )


def post_image(client: httpx.Client, seed: int) -> None:
    response = client.post("/txt2img", json={**PAYLOAD, "seed": seed})
    response.raise_for_status()
