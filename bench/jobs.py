"""Jobs against /images: the same load through ``POST /jobs`` + waiting and through ``POST /images``.

One server runs tiny-sd on the CPU (64x64, 4 steps, default batching, one torch thread). N requests
at concurrency 32 go through ``POST /images``, then N jobs at the same concurrency through
``POST /jobs``, each client asking ``GET /jobs/{id}?wait=30`` (the answer waits for the job to end)
until its job is done and then fetching its image; ``--poll-every 0.25`` polls plainly instead, at
that interval, each poll answered at once. Rounds alternate between the two so that load from other
processes hits both alike. Prints the throughput of each and their ratio (target: jobs at least 0.9x
of /images), the submit latency p50/p99 of ``POST /jobs``, and the job database's size (the images
in it included). With
``--jobs-db postgresql://...`` the jobs live in that PostgreSQL database (TXT2IMG_JOBS_DB) instead of
the SQLite file under the server's TXT2IMG_HOME.

    PYTHONPATH=. python bench/jobs.py [--jobs 500] [--rounds 1] [--poll-every S] [--jobs-db postgresql://...]
"""

from __future__ import annotations

import argparse
import functools
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
from serving_common import PAYLOAD, STEPS, TORCH_THREADS, WIDTH, run_in_own_session, running_server

from serving.jobs import JobStore

CONCURRENCY = 32
WAIT_S = 30  # GET /jobs/{id}?wait=: the server answers once the job has ended, or after this long


def through_images(client: httpx.Client, seed: int) -> None:
    client.post("/images", json={**PAYLOAD, "seed": seed}).raise_for_status()


def through_jobs(client: httpx.Client, seed: int, poll_every_s: float | None) -> float:
    """Submit, wait (or poll every ``poll_every_s``) until done, fetch the image; the submit's latency in seconds."""
    started = time.perf_counter()
    answer = client.post("/jobs", json={**PAYLOAD, "seed": seed})
    submit_s = time.perf_counter() - started
    answer.raise_for_status()
    job_path = answer.json()["urls"]["get"]
    wait = {} if poll_every_s else {"wait": WAIT_S}
    while (job := client.get(job_path, params=wait).json())["status"] in ("queued", "running"):
        time.sleep(poll_every_s or 0)
    if job["status"] != "succeeded":
        raise RuntimeError(f"job {job['id']} ended {job['status']}: {job.get('error')}")
    client.get(job["images"][0]["url"]).raise_for_status()
    return submit_s


def timed_round(url: str, send, count: int) -> tuple[float, list]:
    """Wall seconds for ``count`` calls of ``send`` at CONCURRENCY, and what each returned."""
    with httpx.Client(base_url=url, timeout=600, limits=httpx.Limits(max_connections=CONCURRENCY)) as client:
        started = time.perf_counter()
        with ThreadPoolExecutor(CONCURRENCY) as pool:
            results = list(pool.map(lambda seed: send(client, seed), range(count)))
        return time.perf_counter() - started, results


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def print_report(count: int, images_s: float, jobs_s: float, submits: list[float], store: JobStore, how: str) -> None:
    images_rate, jobs_rate = count / images_s, count / jobs_s
    print(f"tiny-sd {WIDTH}px, {STEPS} steps, {count} per side, concurrency {CONCURRENCY}, {TORCH_THREADS} thread")
    print(f"/images            {images_rate:7.2f} images/s")
    print(f"/jobs + {how:10} {jobs_rate:7.2f} images/s   ratio {jobs_rate / images_rate:.2f}x (target >= 0.9x)")
    p50_ms, p99_ms = statistics.median(submits) * 1000, percentile(submits, 0.99) * 1000
    print(f"submit latency     p50 {p50_ms:.1f} ms   p99 {p99_ms:.1f} ms")
    print(f"job database       {store.database_bytes() / 1024:.0f} KiB on {store.database}, images included")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=500, help="requests per side per round")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--poll-every", type=float, help="poll plainly at this interval (s) instead of ?wait=")
    parser.add_argument("--jobs-db", help="a postgresql:// URL for the job store; default: SQLite in the server's home")
    args = parser.parse_args()
    run_in_own_session()
    home = Path(tempfile.mkdtemp(prefix="txt2img-bench-jobs-"))
    images_s = jobs_s = 0.0
    submits: list[float] = []
    store_setting = {"jobs_db": args.jobs_db} if args.jobs_db else {}
    with running_server(str(home), max_queue=str(CONCURRENCY * 2), **store_setting) as url:
        timed_round(url, through_images, CONCURRENCY)  # warm both paths before timing
        jobs = functools.partial(through_jobs, poll_every_s=args.poll_every)
        timed_round(url, jobs, CONCURRENCY)
        for _ in range(args.rounds):
            images_s += timed_round(url, through_images, args.jobs)[0]
            elapsed, latencies = timed_round(url, jobs, args.jobs)
            jobs_s += elapsed
            submits += latencies
    store = JobStore(args.jobs_db or home / "jobs")
    how = f"polls/{args.poll_every:g}s" if args.poll_every else "?wait="
    print_report(args.jobs * args.rounds, images_s, jobs_s, submits, store, how)


if __name__ == "__main__":
    main()
