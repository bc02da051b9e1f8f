"""Each worker's job runner: claims queued jobs from the store, runs them through the worker's Engine
(the queue, batching and limits of every route), records progress and results, and sends webhooks.

The runner keeps up to two batches of jobs (``2 * max_batch_size``) in the generation queue at once,
so that jobs batch as ``/images`` requests do and the next batch waits while one runs. A cancel
asked for through the store stops a running job at its next denoising step (the queue's stop check).
A sweeper thread applies TXT2IMG_JOBS_MAX_AGE and TXT2IMG_JOBS_MAX_BYTES, and queues again the jobs
of a worker that died, off the request path.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import threading
import time
from collections.abc import Iterator

from serving.engine import Engine
from serving.generation_queue import GenerationResult, Job, QueueFull
from serving.images import image_bytes
from serving.jobs import JobStore, StoredJob
from serving.recipes import recipe_metadata, result_recipes
from serving.schema import GenerationRequest
from serving.webhooks import WebhookSender

logger = logging.getLogger(__name__)

POLL_S = 0.2  # how often progress is recorded and cancels are read, and an idle runner looks for jobs
IN_FLIGHT_BATCHES = 2  # batches of jobs in the generation queue: one runs while the next waits


def job_path(job_id: str) -> str:
    return f"/jobs/{job_id}"


def image_urls(job: StoredJob) -> list[dict]:
    """Each image of a succeeded job with its seed and the path that serves it."""
    return [{"seed": seed, "url": f"{job_path(job.id)}/images/{index}"} for index, seed in enumerate(job.seeds)]


class JobRunner:
    """The store, and the threads of one worker that run its jobs and keep it tidy."""

    def __init__(self, engine: Engine, store: JobStore | None = None) -> None:
        self.engine = engine
        self.store = store or JobStore(engine.settings.jobs_db)
        self.webhooks = WebhookSender(engine.settings)
        self._running: dict[str, tuple[StoredJob, Job]] = {}
        # Requests waiting for a job to end (GET /jobs/{id}?wait=): each an event on its request's loop.
        self._end_waiters: dict[str, list[tuple[asyncio.AbstractEventLoop, asyncio.Event]]] = {}
        self._end_waiters_lock = threading.Lock()
        self._wake = threading.Event()
        self._threads = [
            threading.Thread(target=self._run, name="txt2img-jobs", daemon=True),
            threading.Thread(target=self._sweep, name="txt2img-jobs-sweeper", daemon=True),
        ]

    def start(self) -> None:
        """Queue again what a killed server left running, then start taking jobs."""
        orphans = self.store.requeue_orphans()
        if orphans:
            logger.info("%d interrupted jobs queued again", len(orphans))
        self.webhooks.start()
        for thread in self._threads:
            thread.start()

    def wake(self) -> None:
        """A job was queued: look now rather than at the next poll."""
        self._wake.set()

    @contextlib.contextmanager
    def end_signal(self, job_id: str) -> Iterator[asyncio.Event]:
        """An event of the calling request's loop, set when this worker ends ``job_id`` (a job that another
        worker or server runs ends unseen here: the waiter reads the store again now and then)."""
        waiter = (asyncio.get_running_loop(), asyncio.Event())
        with self._end_waiters_lock:
            self._end_waiters.setdefault(job_id, []).append(waiter)
        try:
            yield waiter[1]
        finally:
            with self._end_waiters_lock:
                waiters = self._end_waiters.get(job_id, [])
                if waiter in waiters:
                    waiters.remove(waiter)
                if not waiters:
                    self._end_waiters.pop(job_id, None)

    def ended(self, job_id: str) -> None:
        """``job_id`` ended (its end is in the store): wake the requests waiting for it."""
        with self._end_waiters_lock:
            waiters = list(self._end_waiters.get(job_id, []))
        for loop, event in waiters:
            loop.call_soon_threadsafe(event.set)

    def notify(self, job: StoredJob, event: str) -> None:
        """Send ``event`` to the job's webhook, if it has one."""
        if job.webhook is None:
            return
        details: dict = {"status": job.status}
        if event == "succeeded":
            details["images"] = image_urls(job)
        elif event == "failed":
            details["error"] = job.error
        self.webhooks.send(job.webhook, job.id, event, details)

    def _run(self) -> None:
        while True:
            try:
                self._claim_more()
                self._follow_running()
            except Exception:  # a broken database must not end the worker's job runs for good
                logger.exception("job runner step failed")
            self._wake.wait(POLL_S)
            self._wake.clear()

    def _claim_more(self) -> None:
        while len(self._running) < IN_FLIGHT_BATCHES * self.engine.settings.max_batch_size:
            stored = self.store.claim(os.getpid())
            if stored is None or not self._submit(stored):
                return

    def _submit(self, stored: StoredJob) -> bool:
        """Put a claimed job in the generation queue; False when the queue is full (the job goes back)."""
        try:
            queued = self.engine.job(GenerationRequest.model_validate(stored.request))
            queued.deadline = math.inf  # a job waits as long as it takes; only a cancel stops it
            self.engine.queue.submit(queued)
        except QueueFull:
            self.store.release(stored.id)
            return False
        except Exception as error:  # a model that cannot load now, a limit lowered since submission
            self._finish(stored, None, error)
            return True
        queued.future.add_done_callback(lambda _: self._wake.set())
        self._running[stored.id] = (stored, queued)
        self.notify(stored, "started")
        return True

    def _follow_running(self) -> None:
        done = [job_id for job_id, (_, queued) in self._running.items() if queued.future.done()]
        steps_done = {job_id: queued.steps_done for job_id, (_, queued) in self._running.items()}
        canceled = self.store.progress(steps_done) if steps_done else set()
        for job_id in done:
            stored, queued = self._running.pop(job_id)
            self._complete(stored, queued, job_id in canceled)
        for job_id in canceled.difference(done):
            self._running[job_id][1].abandoned.set()  # the queue stops the call at its next step

    def _complete(self, stored: StoredJob, queued: Job, canceled: bool) -> None:
        if canceled or queued.future.cancelled():
            self._finish(stored, None, None)
            return
        error = queued.future.exception()
        self._finish(stored, None if error else queued.future.result(), error)

    def _finish(self, stored: StoredJob, result: GenerationResult | None, error: BaseException | None) -> None:
        """Record how the job ended (result: succeeded; error: failed; neither: canceled) and tell its webhook."""
        if result is not None:
            encoded = [
                image_bytes(image, stored.image_format, metadata=recipe_metadata(recipe))
                for recipe, image in zip(result_recipes(result), result.images)
            ]
            finished, event = self.store.succeed(stored, encoded), "succeeded"
        elif error is not None:
            finished, event = self.store.fail(stored.id, str(error)), "failed"
        else:
            finished, event = self.store.mark_canceled(stored.id), "canceled"
        self.ended(stored.id)
        if finished is not None:
            self.notify(finished, event)

    def _sweep(self) -> None:
        settings = self.engine.settings
        while True:
            try:
                self.store.sweep(settings.jobs_max_age, settings.jobs_max_bytes)
                self.store.requeue_orphans()
            except Exception:
                logger.exception("job sweep failed")
            time.sleep(settings.jobs_sweep_interval_s)
