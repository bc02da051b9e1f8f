"""Shared by the serving benchmarks: start a real ``bentoml serve`` on tiny-sd, and the in-process baseline."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import httpx

from catalog.tiny_sd import build_tiny_sd_pipeline

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT / "tests"))  # the launcher the tests use, so both start the server alike
import bentoml_server  # noqa: E402

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


@contextlib.contextmanager
def running_server(home: str | None = None, **settings: str):
    """A ``bentoml serve`` subprocess on tiny-sd with ``TXT2IMG_*`` settings; yields its URL once ready."""
    home = Path(home or tempfile.mkdtemp(prefix="txt2img-bench-"))
    with bentoml_server.running_server(
        home, ready_timeout_s=300, **{"torch_threads": str(TORCH_THREADS), **settings}
    ) as url:
        yield url


def in_process_pipeline():
    """tiny-sd as a plain diffusers pipeline, the way a script without any server would run it."""
    import torch

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
