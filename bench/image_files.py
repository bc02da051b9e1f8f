"""OpenAI image links: one fetch costs the same with 20,000 images kept as with none, and fetches leave
the server's other routes alone.

1. In process: the median time of ``ImageFiles.get`` on one image, in a folder holding only it and in
   one holding 20,000 more; the ratio should be about 1.0 (no work proportional to the folder).
2. A real ``bentoml serve`` on tiny-sd (one worker, one torch thread) whose image folder holds
   20,000 images: the median ``/readyz`` latency while 4 clients fetch an image link in a loop,
   against the same with no clients; each client stops after ``--fetches`` fetches.

    PYTHONPATH=. python bench/image_files.py [--files 20000] [--gets 500] [--probes 100] [--fetches 400]
"""

from __future__ import annotations

import argparse
import socket
import statistics
import tempfile
import threading
import time
from pathlib import Path

import httpx
from serving_common import running_server

from serving.image_files import SHARED_FOLDER_PREFIX, ImageFiles

CLIENTS = 4


def fill(folder: Path, count: int) -> None:
    for index in range(count):
        (folder / f"{index:032d}.png").write_bytes(b"x" * 100)


def median_get_s(folder: Path, extra_files: int, gets: int) -> float:
    fill(folder, extra_files)
    files = ImageFiles(folder, sweep_interval_s=None)
    name = files.add(b"y" * 2000, "png")
    timings = []
    for _ in range(gets):
        started = time.perf_counter()
        files.get(name)
        timings.append(time.perf_counter() - started)
    return statistics.median(timings)


def median_readyz_s(url: str, probes: int) -> float:
    timings = []
    with httpx.Client(timeout=60) as client:
        for _ in range(probes):
            started = time.perf_counter()
            client.get(f"{url}/readyz").raise_for_status()
            timings.append(time.perf_counter() - started)
    return statistics.median(timings)


def fetch_in_a_loop(link: str, fetches: int, stop: threading.Event) -> None:
    with httpx.Client(timeout=60) as client:
        for _ in range(fetches):
            if stop.is_set():
                return
            client.get(link).raise_for_status()


def server_image_link(url: str) -> str:
    request = {"prompt": "a red cube", "size": "64x64", "num_inference_steps": 2, "response_format": "url"}
    response = httpx.post(f"{url}/v1/images/generations", json=request, timeout=300)
    response.raise_for_status()
    return response.json()["data"][0]["url"]


def readyz_under_fetches(url: str, files: int, probes: int, fetches: int) -> tuple[float, float]:
    link = server_image_link(url)
    [folder] = [  # the server's folder: the one holding the image just made
        path
        for path in Path(tempfile.gettempdir()).glob(f"{SHARED_FOLDER_PREFIX}{socket.gethostname()}-*")
        if (path / link.rsplit("/", 1)[1]).exists()
    ]
    fill(folder, files)
    idle = median_readyz_s(url, probes)
    stop = threading.Event()
    clients = [threading.Thread(target=fetch_in_a_loop, args=(link, fetches, stop)) for _ in range(CLIENTS)]
    for client in clients:
        client.start()
    try:
        busy = median_readyz_s(url, probes)
    finally:
        stop.set()
        for client in clients:
            client.join()
    return idle, busy


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=20_000)
    parser.add_argument("--gets", type=int, default=500)
    parser.add_argument("--probes", type=int, default=100)
    parser.add_argument("--fetches", type=int, default=400, help="fetches per client at most")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as empty, tempfile.TemporaryDirectory() as crowded:
        alone = median_get_s(Path(empty), 0, args.gets)
        among_many = median_get_s(Path(crowded), args.files, args.gets)
    print(f"ImageFiles.get: {alone * 1e6:.0f} us alone, {among_many * 1e6:.0f} us among {args.files} files")
    print(f"fetch ratio ({args.files} files / empty folder): {among_many / alone:.2f}  (target: about 1.0)")
    with running_server() as url:
        idle, busy = readyz_under_fetches(url, args.files, args.probes, args.fetches)
    print(f"/readyz median: {idle * 1e3:.1f} ms idle, {busy * 1e3:.1f} ms with {CLIENTS} clients fetching images")
    print(f"/readyz ratio (fetching / idle): {busy / idle:.2f}")


if __name__ == "__main__":
    main()
