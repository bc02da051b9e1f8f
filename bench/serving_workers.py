"""Workers: throughput at concurrency 8 with one server worker and with two, side by side.

Two servers run tiny-sd on the CPU (64x64, 4 steps, default batching), one with
``TXT2IMG_WORKERS=1`` and one with ``TXT2IMG_WORKERS=2``, every worker on one torch thread. Eight
client threads keep each busy, each request on a new connection as separate clients would send
it (the kernel hands each connection to one of the workers). Rounds alternate between the two so
that load from other processes hits both alike. Target: two workers clearly beat one on two cores.

    PYTHONPATH=. python bench/serving_workers.py [--rounds 4] [--requests 32]
"""

from __future__ import annotations

import argparse
import os
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
from serving_common import PAYLOAD, STEPS, TORCH_THREADS, WIDTH, run_in_own_session, running_server

CONCURRENCY = 8


def post_image(url: str, seed: int) -> None:
    httpx.post(f"{url}/txt2img", json={**PAYLOAD, "seed": seed}, timeout=300).raise_for_status()


def http_round(url: str, seeds: list[int]) -> float:
    started = time.perf_counter()
    with ThreadPoolExecutor(CONCURRENCY) as pool:
        list(pool.map(lambda seed: post_image(url, seed), seeds))
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--requests", type=int, default=32, help="requests per server per round")
    args = parser.parse_args()
    run_in_own_session()

    worker_counts = (1, 2)
    seconds = dict.fromkeys(worker_counts, 0.0)
    load_before = os.getloadavg()[0]
    with running_server(workers="1") as one_worker, running_server(workers="2") as two_workers:
        urls = {1: one_worker, 2: two_workers}
        for url in urls.values():
            http_round(url, list(range(2 * CONCURRENCY)))  # warm every worker's scheduler and shapes
        for round_index in range(args.rounds):
            seeds = list(range(round_index * args.requests, (round_index + 1) * args.requests))
            for workers in worker_counts:
                seconds[workers] += http_round(urls[workers], seeds)
    images = args.rounds * args.requests
    rates = {workers: images / seconds[workers] for workers in worker_counts}
    print(
        f"tiny-sd, CPU ({os.cpu_count()} cores), {WIDTH}x{WIDTH}, {STEPS} steps, torch threads {TORCH_THREADS} "
        f"per worker, concurrency {CONCURRENCY}, {images} images per setup, "
        f"load average {load_before:.1f} before, {os.getloadavg()[0]:.1f} after"
    )
    for workers, rate in rates.items():
        print(f"  {workers} worker{'s' if workers > 1 else ''}  {rate:6.2f} images/s")
    print(f"  2 workers / 1 worker = {rates[2] / rates[1]:.3f}")


if __name__ == "__main__":
    main()
