"""The job store (serving/jobs.py) on a real SQLite file: claims across processes, orphans, retention."""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import queue
import subprocess
import sys
import time
from pathlib import Path

from serving.jobs import JobStore

REQUEST = {"prompt": "a cat", "num_inference_steps": 2, "seed": 7, "format": "png"}


def add_jobs(store: JobStore, count: int) -> list[str]:
    return [store.add(REQUEST, [7], 2)[0].id for _ in range(count)]


def claim_all(folder: str, claimed, most: int) -> None:
    """Claim until nothing is queued, ``most`` times at most (so that a claim that repeats itself ends)."""
    store = JobStore(Path(folder))
    for _ in range(most):
        job = store.claim(os.getpid())
        if job is None:
            return
        claimed.put(job.id)


def test_each_job_is_claimed_once_by_processes_claiming_at_once(tmp_path):
    store = JobStore(tmp_path)
    ids = add_jobs(store, 60)
    context = multiprocessing.get_context("spawn")
    claimed = context.Queue()
    claimers = [context.Process(target=claim_all, args=(str(tmp_path), claimed, len(ids))) for _ in range(4)]
    for process in claimers:
        process.start()
    for process in claimers:
        process.join(120)
    taken = []
    with contextlib.suppress(queue.Empty):
        while True:
            taken.append(claimed.get(timeout=2))
    assert sorted(taken) == sorted(ids)  # every job once: none twice, none missed
    assert {store.get(job_id).status for job_id in ids} == {"running"}


def test_jobs_are_claimed_oldest_first_and_listed_newest_first(tmp_path):
    store = JobStore(tmp_path)
    ids = add_jobs(store, 3)
    assert store.claim(os.getpid()).id == ids[0]
    assert [job.id for job in store.page(10, 0)] == ids[::-1]
    assert [job.id for job in store.page(1, 1)] == [ids[1]]
    assert store.queue_position(store.get(ids[2])) == 1


def test_a_dead_workers_running_job_is_queued_again_and_a_live_ones_is_not(tmp_path):
    store = JobStore(tmp_path)
    mine, orphan = add_jobs(store, 2)
    store.claim(os.getpid())
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    store.claim(dead.pid)
    assert store.requeue_orphans() == [orphan]
    assert store.get(orphan).status == "queued"
    assert store.get(mine).status == "running"


def test_seeds_are_stored_with_the_job(tmp_path):
    store = JobStore(tmp_path)
    job, _ = store.add({**REQUEST, "seed": 123}, [123, 124], 2)
    assert JobStore(tmp_path).get(job.id).seeds == [123, 124]


def finished_job(store: JobStore, size: int, finished_ago_s: float = 0) -> str:
    job, _ = store.add(REQUEST, [7], 2)
    store.claim(os.getpid())
    store.succeed(job, [b"x" * size])
    with store._connect() as connection:
        connection.execute("UPDATE jobs SET finished = ? WHERE id = ?", (time.time() - finished_ago_s, job.id))
    return job.id


def test_retention_deletes_jobs_past_the_age_then_the_oldest_past_the_bytes(tmp_path):
    store = JobStore(tmp_path)
    ancient = finished_job(store, 10, finished_ago_s=1000)
    old = finished_job(store, 100, finished_ago_s=30)
    newer = finished_job(store, 100, finished_ago_s=20)
    newest = finished_job(store, 100, finished_ago_s=10)
    queued = store.add(REQUEST, [7], 2)[0].id
    assert sorted(store.sweep(max_age_s=500, max_bytes=250)) == sorted([ancient, old])
    assert store.get(ancient) is None and store.get(old) is None
    assert not (store.images / old).exists()
    assert (store.images / newest / "0.png").read_bytes() == b"x" * 100
    assert {store.get(job_id).status for job_id in (newer, newest)} == {"succeeded"}
    assert store.get(queued).status == "queued"  # unfinished jobs are never swept


def test_cancel_ends_a_queued_job_at_once_and_flags_a_running_one(tmp_path):
    store = JobStore(tmp_path)
    running, queued = add_jobs(store, 2)
    store.claim(os.getpid())
    job, now = store.cancel(queued)
    assert (job.status, now) == ("canceled", True)
    job, now = store.cancel(running)
    assert (job.status, job.cancel_requested, now) == ("running", True, False)
    assert store.progress({running: 1, queued: 0}) == {running}
    assert store.get(running).steps_done == 1
    assert store.cancel("no-such-job") == (None, False)


def test_a_running_job_whose_worker_fell_silent_is_queued_again_though_its_pid_is_alive(tmp_path):
    store = JobStore(tmp_path)
    [job_id] = add_jobs(store, 1)
    store.claim(os.getpid())  # a live process id: after a container restart, a new process may have it
    assert store.requeue_orphans(silent_after_s=60) == []
    store.progress({job_id: 1})
    with store._connect() as connection:
        connection.execute("UPDATE jobs SET heartbeat = ? WHERE id = ?", (time.time() - 61, job_id))
    assert store.requeue_orphans(silent_after_s=60) == [job_id]
    assert store.get(job_id).status == "queued"
