"""Batching: throughput at concurrency 8 with batching on and off, against the pipeline's own batch of 8.

Two servers run tiny-sd on the CPU (64x64, 4 steps): one batching up to 8 images per call and
waiting up to ``--wait-ms`` for a batch to fill, one with ``TXT2IMG_MAX_BATCH_SIZE=1``. Eight
client threads keep each busy. The baseline is one in-process pipeline call generating 8 images.
Rounds alternate between the three so that load from other processes hits all alike. Target:
batching on reaches at least 95% of the in-process batch-8 throughput.

    PYTHONPATH=. python bench/serving_batching.py [--rounds 4] [--wait-ms 50]
"""

from __future__ import annotations

import argparse
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
from serving_common import (
    TORCH_THREADS,
    in_process_images,
    in_process_pipeline,
    post_image,
    run_in_own_session,
    running_server,
)

CONCURRENCY = 8


def http_round(client: httpx.Client, seeds: list[int]) -> float:
    started = time.perf_counter()
    with ThreadPoolExecutor(CONCURRENCY) as pool:
        list(pool.map(lambda seed: post_image(client, seed), seeds))
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--requests", type=int, default=16, help="requests per server per round")
    parser.add_argument("--wait-ms", default="50", help="TXT2IMG_BATCH_WAIT_MS of the batching server")
    args = parser.parse_args()
    run_in_own_session()

    pipeline = in_process_pipeline()
    in_process_images(pipeline, list(range(CONCURRENCY)))
    seconds = {"in-process batch 8": 0.0, "http batching on": 0.0, "http batching off": 0.0}
    images = {name: 0 for name in seconds}
    with (
        running_server(max_batch_size="8", batch_wait_ms=args.wait_ms) as batching_url,
        running_server(max_batch_size="1") as single_url,
        httpx.Client(base_url=batching_url, timeout=300, limits=httpx.Limits(max_connections=16)) as batching,
        httpx.Client(base_url=single_url, timeout=300, limits=httpx.Limits(max_connections=16)) as single,
    ):
        http_round(batching, list(range(CONCURRENCY)))
        http_round(single, list(range(CONCURRENCY)))
        for round_index in range(args.rounds):
            seeds = list(range(round_index * args.requests, (round_index + 1) * args.requests))
            started = time.perf_counter()
            for start in range(0, len(seeds), CONCURRENCY):
                in_process_images(pipeline, seeds[start : start + CONCURRENCY])
            seconds["in-process batch 8"] += time.perf_counter() - started
            seconds["http batching on"] += http_round(batching, seeds)
            seconds["http batching off"] += http_round(single, seeds)
            for name in images:
                images[name] += len(seeds)
    rates = {name: images[name] / seconds[name] for name in seconds}
    print(
        f"tiny-sd, CPU, 64x64, 4 steps, torch threads {TORCH_THREADS}, concurrency {CONCURRENCY}, "
        f"{images['http batching on']} images per setup, batch wait {args.wait_ms} ms"
    )
    for name, rate in rates.items():
        print(f"  {name:<19} {rate:6.2f} images/s")
    baseline = rates["in-process batch 8"]
    print(f"  batching on / off            = {rates['http batching on'] / rates['http batching off']:.3f}")
    print(f"  batching on / in-process b8  = {rates['http batching on'] / baseline:.3f}  (target >= 0.95)")
    print(f"  batching off / in-process b8 = {rates['http batching off'] / baseline:.3f}")


if __name__ == "__main__":
    main()
