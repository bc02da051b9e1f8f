"""The job store (serving/jobs.py) on both its databases, a real SQLite file and a real PostgreSQL server:
claims across processes, idempotency, orphans, retention."""

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


def claim_all(location: Path | str, claimed, most: int, start) -> None:
    """Claim until nothing is queued, ``most`` times at most (so that a claim that repeats itself ends),
    starting with the other claimers (``start``, a barrier), so that claims really race."""
    store = JobStore(location)
    store.count()  # connected before the race starts
    start.wait(60)
    for _ in range(most):
        job = store.claim(os.getpid())
        if job is None:
            return
        claimed.put(job.id)


def test_each_job_is_claimed_once_by_processes_claiming_at_once(job_store_location):
    store = JobStore(job_store_location)
    ids = add_jobs(store, 200)
    context = multiprocessing.get_context("spawn")
    claimed, start = context.Queue(), context.Barrier(4)
    claimers = [
        context.Process(target=claim_all, args=(job_store_location, claimed, len(ids), start)) for _ in range(4)
    ]
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


def test_jobs_are_claimed_oldest_first_and_listed_newest_first(job_store_location):
    store = JobStore(job_store_location)
    ids = add_jobs(store, 3)
    assert store.claim(os.getpid()).id == ids[0]
    assert [job.id for job in store.page(10, 0)] == ids[::-1]
    assert [job.id for job in store.page(1, 1)] == [ids[1]]
    assert store.queue_position(store.get(ids[2])) == 1


def test_a_dead_workers_running_job_is_queued_again_and_a_live_ones_is_not(job_store_location):
    store = JobStore(job_store_location)
    mine, orphan = add_jobs(store, 2)
    store.claim(os.getpid())
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    store.claim(dead.pid)
    assert store.requeue_orphans() == [orphan]
    assert store.get(orphan).status == "queued"
    assert store.get(mine).status == "running"


def test_seeds_are_stored_with_the_job(job_store_location):
    store = JobStore(job_store_location)
    job, _ = store.add({**REQUEST, "seed": 123}, [123, 124], 2)
    assert JobStore(job_store_location).get(job.id).seeds == [123, 124]


def finished_job(store: JobStore, size: int, finished_ago_s: float = 0) -> str:
    job, _ = store.add(REQUEST, [7], 2)
    store.claim(os.getpid())
    store.succeed(job, [b"x" * size])
    with store.database.session() as session:
        session.execute("UPDATE jobs SET finished = ? WHERE id = ?", (time.time() - finished_ago_s, job.id))
    return job.id


def test_retention_deletes_jobs_past_the_age_then_the_oldest_past_the_bytes(job_store_location):
    store = JobStore(job_store_location)
    ancient = finished_job(store, 10, finished_ago_s=1000)
    old = finished_job(store, 100, finished_ago_s=30)
    newer = finished_job(store, 100, finished_ago_s=20)
    newest = finished_job(store, 100, finished_ago_s=10)
    queued = store.add(REQUEST, [7], 2)[0].id
    assert sorted(store.sweep(max_age_s=500, max_bytes=250)) == sorted([ancient, old])
    assert store.get(ancient) is None and store.get(old) is None
    assert store.image(old, 0) is None
    assert store.image(newest, 0) == b"x" * 100
    assert {store.get(job_id).status for job_id in (newer, newest)} == {"succeeded"}
    assert store.get(queued).status == "queued"  # unfinished jobs are never swept


def test_cancel_ends_a_queued_job_at_once_and_flags_a_running_one(job_store_location):
    store = JobStore(job_store_location)
    running, queued = add_jobs(store, 2)
    store.claim(os.getpid())
    job, now = store.cancel(queued)
    assert (job.status, now) == ("canceled", True)
    job, now = store.cancel(running)
    assert (job.status, job.cancel_requested, now) == ("running", True, False)
    assert store.progress({running: 1, queued: 0}) == {running}
    assert store.get(running).steps_done == 1
    assert store.cancel("no-such-job") == (None, False)


def test_a_running_job_whose_worker_fell_silent_is_queued_again_though_its_pid_is_alive(job_store_location):
    store = JobStore(job_store_location)
    [job_id] = add_jobs(store, 1)
    store.claim(os.getpid())  # a live process id: after a container restart, a new process may have it
    assert store.requeue_orphans(silent_after_s=60) == []
    store.progress({job_id: 1})
    with store.database.session() as session:
        session.execute("UPDATE jobs SET heartbeat = ? WHERE id = ?", (time.time() - 61, job_id))
    assert store.requeue_orphans(silent_after_s=60) == [job_id]
    assert store.get(job_id).status == "queued"


def add_with_key(location: Path | str, key: str, added) -> None:
    store = JobStore(location)
    job, new = store.add(REQUEST, [7], 2, idempotency_key=key, body_hash="h")
    added.put((job.id, new))


def test_one_idempotency_key_stores_one_job_though_processes_add_it_at_once(job_store_location):
    context = multiprocessing.get_context("spawn")
    added = context.Queue()
    adders = [context.Process(target=add_with_key, args=(job_store_location, "k1", added)) for _ in range(4)]
    for process in adders:
        process.start()
    for process in adders:
        process.join(120)
    answers = [added.get(timeout=10) for _ in adders]
    assert len({job_id for job_id, _ in answers}) == 1
    assert sorted(new for _, new in answers) == [False, False, False, True]
    assert JobStore(job_store_location).count() == 1


def test_a_store_written_before_the_added_columns_opens_and_keeps_its_jobs(job_store_location):
    """A jobs table from an older txt2img (without claimed_host, kind, origin_host) gains them when opened,
    instead of stopping the server at its first query."""
    from serving.jobs import ADDED_COLUMNS, open_database

    database = open_database(job_store_location)
    with database.session() as session:
        for column in ADDED_COLUMNS:
            session.execute(f"ALTER TABLE jobs DROP COLUMN {column}")
        session.execute(
            "INSERT INTO jobs (id, status, request, seeds, created, total_steps) VALUES (?, 'queued', ?, ?, ?, ?)",
            ("old-job", '{"prompt": "a cat"}', "[7]", time.time(), 2),
        )
    store = JobStore(job_store_location)
    assert store.get("old-job").kind == "generate"
    assert store.requeue_orphans() == []
    assert store.claim(os.getpid()).id == "old-job"
