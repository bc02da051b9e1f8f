"""Load: a bounded run of POST /txt2img against a real ``bentoml serve`` on tiny-sd, 64 requests in flight.

It starts its own server on 127.0.0.1 (loopback only) and sends a fixed number of requests
(default 1,000), never more than ``--concurrency`` at once. It reports latency p50/p99, throughput
and status counts, and the worker's resident memory (RSS) when ready, after 100 requests and at
the end, to show whether memory grows with traffic.

    PYTHONPATH=. python bench/load.py [--requests 1000] [--concurrency 64] [--steps 2]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from collections import Counter

import httpx
import psutil
from serving_common import HEIGHT, TORCH_THREADS, WIDTH, run_in_own_session, running_server

from serving.bentoml_compat import WORKER_MODULE

CHECKPOINTS = (100,)  # RSS is also read when ready and at the end


def worker_rss(home: str) -> int:
    """Resident bytes of the BentoML worker of the server whose TXT2IMG_HOME is ``home``."""
    for process in psutil.process_iter(["cmdline"]):
        try:
            if WORKER_MODULE in " ".join(process.info["cmdline"] or []):
                if process.environ().get("TXT2IMG_HOME") == home:
                    return process.memory_info().rss
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    raise RuntimeError(f"no BentoML worker with TXT2IMG_HOME={home}")


async def one_request(client: httpx.AsyncClient, payload: dict) -> tuple[str, float]:
    started = time.perf_counter()
    try:
        response = await client.post("/txt2img", json=payload)
        outcome = str(response.status_code)
    except httpx.HTTPError as error:
        outcome = type(error).__name__
    return outcome, time.perf_counter() - started


async def load(url: str, payload: dict, count: int, first_seed: int, concurrency: int) -> list[tuple[str, float]]:
    """``count`` requests, at most ``concurrency`` of them in flight; (status, seconds) for each."""
    gate = asyncio.Semaphore(concurrency)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:

        async def gated(seed: int) -> tuple[str, float]:
            async with gate:
                return await one_request(client, {**payload, "seed": seed})

        return await asyncio.gather(*(gated(first_seed + index) for index in range(count)))


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(fraction * (len(ordered) - 1)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--steps", type=int, default=2)
    args = parser.parse_args()
    run_in_own_session()

    payload = {"prompt": "a red cube on a table", "width": WIDTH, "height": HEIGHT, "num_inference_steps": args.steps}
    # The queue must hold every request in flight, or the run would measure 429s.
    home = tempfile.mkdtemp(prefix="txt2img-load-")
    with running_server(home, max_queue=str(args.concurrency)) as url:
        assert url.startswith("http://127.0.0.1:"), url
        rss = {0: worker_rss(home)}
        results: list[tuple[str, float]] = []
        started = time.perf_counter()
        done = 0
        for stop in [*(c for c in CHECKPOINTS if c < args.requests), args.requests]:
            results += asyncio.run(load(url, payload, stop - done, done, args.concurrency))
            done = stop
            rss[done] = worker_rss(home)
        elapsed = time.perf_counter() - started

    latencies = [seconds for _, seconds in results]
    statuses = Counter(status for status, _ in results)
    print(
        f"tiny-sd, CPU, {WIDTH}x{HEIGHT}, {args.steps} steps, torch threads {TORCH_THREADS}, "
        f"{args.requests} requests, {args.concurrency} in flight"
    )
    print(f"  statuses      {dict(sorted(statuses.items()))}")
    print(f"  throughput    {len(results) / elapsed:.2f} requests/s ({elapsed:.1f} s)")
    print(f"  latency p50   {statistics.median(latencies):.2f} s")
    print(f"  latency p99   {percentile(latencies, 0.99):.2f} s")
    for requests, value in rss.items():
        print(f"  worker RSS after {requests:>5} requests: {value / 2**20:.0f} MiB")


if __name__ == "__main__":
    main()
