"""Serving overhead: images/s over HTTP at concurrency 1 against a plain in-process pipeline call.

Both sides run tiny-sd on the CPU at 64x64, 4 steps, with the same torch thread count. Rounds
alternate between the two so that load from other processes hits both alike. Target: the service
keeps at least 95% of the in-process rate (at most 5% overhead).

    PYTHONPATH=. python bench/serving_overhead.py [--rounds 6] [--images 8]
"""

from __future__ import annotations

import argparse
import time

import httpx
from serving_common import (
    TORCH_THREADS,
    in_process_images,
    in_process_pipeline,
    post_image,
    run_in_own_session,
    running_server,
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--images", type=int, default=8, help="images per side per round")
    args = parser.parse_args()
    run_in_own_session()

    pipeline = in_process_pipeline()
    in_process_images(pipeline, [0])  # first call pays one-time setup; the server warms up too
    seconds = {"in-process": 0.0, "http": 0.0}
    with running_server() as url, httpx.Client(base_url=url, timeout=120) as client:
        post_image(client, 0)
        for round_index in range(args.rounds):
            seeds = range(round_index * args.images, (round_index + 1) * args.images)
            started = time.perf_counter()
            for seed in seeds:
                in_process_images(pipeline, [seed])
            seconds["in-process"] += time.perf_counter() - started
            started = time.perf_counter()
            for seed in seeds:
                post_image(client, seed)
            seconds["http"] += time.perf_counter() - started
    images = args.rounds * args.images
    rates = {name: images / total for name, total in seconds.items()}
    print(f"tiny-sd, CPU, 64x64, 4 steps, torch threads {TORCH_THREADS}, {images} images per side, concurrency 1")
    for name, rate in rates.items():
        print(f"  {name:<11} {rate:6.2f} images/s")
    ratio = rates["http"] / rates["in-process"]
    print(f"  http / in-process = {ratio:.3f}  (overhead {100 * (1 - ratio):+.1f}%; target <= 5%)")


if __name__ == "__main__":
    main()
