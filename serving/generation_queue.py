"""The generation queue: a bounded FIFO of requests and the one thread that owns the device.

Requests wait in arrival order. The thread takes the oldest one, adds every queued request that
can share its pipeline call (same base weights, size, steps, guidance, true CFG and scheduler) up to
``max_batch_size`` images, and runs them together, each image with its own seed and LoRA set (serving/mixed_loras.py;
sets that cannot mix stay apart: serving/manager.py ``batch_group``). A request whose
client left or whose time ran out is dropped from the queue, and a running call stops at the
next denoising step once all of its requests have given up.

One request cannot break the others: when a batched call fails, each of its requests runs again
alone, so only the guilty one fails. A model that fails to load (the warm-up's included) is
refused at once for RETRY_LOAD_AFTER_S, with the reason, while every other model is served.
"""

from __future__ import annotations

import asyncio
import logging
import math
import threading
import time
from collections import deque
from collections.abc import Awaitable, Callable
from concurrent.futures import Future
from dataclasses import dataclass, field

from catalog.families import family
from catalog.pipelines import ModelLoadError
from catalog.schema import CatalogEntry
from serving.generation import BatchItem, generate_images
from serving.manager import DownloadsForbidden, PipelineManager
from serving.prompts import PromptEmbeddingCache
from serving.safety import SafetyChecker
from serving.schema import GenerationRequest, with_model_defaults
from serving.settings import ServingSettings
from txt2img.errors import InputError, Txt2ImgError

logger = logging.getLogger(__name__)

WARM_UP_STEPS = 2
RETRY_LOAD_AFTER_S = 60  # a model that failed to load is refused at once for this long, then tried again


class QueueFull(Txt2ImgError):
    """The queue holds ``max_queue`` requests already; ``retry_after_s`` is a guess in seconds."""

    http_status = 429

    def __init__(self, retry_after_s: int):
        self.retry_after_s = retry_after_s
        super().__init__(f"the generation queue is full; retry in about {retry_after_s} s")


class GenerationTimeout(Txt2ImgError):
    """A request did not finish within ``request_timeout_s``."""

    http_status = 504

    def __str__(self) -> str:
        return f"generation timed out: {self.args[0]}"


class ClientGone(Txt2ImgError):
    """The client disconnected before its images were ready."""

    http_status = 499  # nginx's code; nobody reads it, but logs show why the request ended


@dataclass
class GenerationResult:
    images: list
    seeds: list[int]
    batch_images: int
    nsfw_content_detected: list[bool] | None = None  # per image, as the safety checker found; None while it is off
    job: Job | None = None  # the job that made them: its model, size and settings, for each image's recipe


@dataclass
class CallProgress:
    """The pipeline call running now, for progress reports (A1111's ``GET /sdapi/v1/progress``)."""

    started: float
    steps_done: int
    total_steps: int
    images: int


@dataclass(eq=False)
class Job:
    """One request waiting for, or running on, the device."""

    entry: CatalogEntry
    request: GenerationRequest
    width: int
    height: int
    seeds: list[int]
    deadline: float
    arrived: float = field(default_factory=time.monotonic)
    future: Future = field(default_factory=Future)
    abandoned: threading.Event = field(default_factory=threading.Event)
    call: CallProgress | None = None  # the pipeline call it runs in, once it runs
    lora_group: tuple | None = None  # its manager's batch_group, set on submission

    @property
    def steps_done(self) -> int:
        """Denoising steps of its pipeline call done so far (0 while it waits), for progress reports."""
        return self.call.steps_done if self.call is not None else 0

    @classmethod
    def create(cls, entry: CatalogEntry, request: GenerationRequest, width: int, height: int, timeout_s: float):
        """The job of ``request`` for ``entry``, whatever its caller: what it leaves out takes the model's
        defaults (a route's request has them already, from ``Engine.resolve``)."""
        request = with_model_defaults(request, entry)
        return cls(entry, request, width, height, request.image_seeds(), deadline=time.monotonic() + timeout_s)

    @property
    def batch_key(self) -> tuple:
        request = self.request
        return (
            self.lora_group,  # one pipeline call runs on one base; sets that cannot mix are in it too
            self.width,
            self.height,
            request.num_inference_steps,
            request.guidance_scale,
            request.true_cfg_scale,
            request.scheduler,
        )

    def gave_up(self) -> bool:
        return self.abandoned.is_set() or time.monotonic() > self.deadline


class GenerationQueue:
    """Accepts jobs from any thread or event loop and runs them, batched, on one generation thread."""

    def __init__(self, manager: PipelineManager, settings: ServingSettings, metrics=None):
        self.manager = manager
        self.settings = settings
        self.metrics = metrics
        self.ready = threading.Event()
        self.warm_up_error: str | None = None
        self._unavailable: str | None = None  # why nothing can be served (the safety checker did not load)
        self._failed_loads: dict[str, tuple[str, float]] = {}  # model id -> (reason, when)
        self._warm_model: str | None = None
        self._pending: deque[Job] = deque()
        self._condition = threading.Condition()
        self._seconds_per_image = 1.0
        self._thread: threading.Thread | None = None
        self.prompt_cache = PromptEmbeddingCache(int(settings.prompt_cache_mb * 2**20), self._count_prompt_lookup)
        self._running: CallProgress | None = None
        self.safety_checker: SafetyChecker | None = None  # loaded during warm-up when settings.safety_checker

    def start(self, warm_model: str) -> None:
        """Start the generation thread; it warms ``warm_model`` before taking requests."""
        self._warm_model = warm_model
        self._thread = threading.Thread(target=self._run, args=(warm_model,), name="txt2img-generation", daemon=True)
        self._thread.start()

    def check_loadable(self, model_id: str) -> None:
        """Raise ModelLoadError, with the reason, for a model that failed to load within RETRY_LOAD_AFTER_S."""
        if self._unavailable is not None:
            raise ModelLoadError(self._unavailable)
        failed = self._failed_loads.get(model_id)
        if failed is not None and time.monotonic() - failed[1] < RETRY_LOAD_AFTER_S:
            raise ModelLoadError(failed[0])

    def submit(self, job: Job) -> Future:
        job.lora_group = self.manager.batch_group(job.entry, job.request.loras)
        with self._condition:
            if len(self._pending) >= self.settings.max_queue:
                queued_images = sum(len(queued.seeds) for queued in self._pending)
                raise QueueFull(max(1, math.ceil(queued_images * self._seconds_per_image)))
            self._pending.append(job)
            self._report_depth()
            self._condition.notify()
        return job.future

    async def wait(self, job: Job, client_gone: Callable[[], Awaitable[bool]] | None = None) -> GenerationResult:
        """Wait for ``job`` without blocking the event loop; give up on timeout or disconnect."""
        waiting = asyncio.wrap_future(job.future)
        while True:
            remaining = job.deadline - time.monotonic()
            if remaining <= 0:
                job.abandoned.set()
                raise GenerationTimeout(f"not done within {self.settings.request_timeout_s:g} s")
            done, _ = await asyncio.wait({waiting}, timeout=min(remaining, 0.25))
            if done:
                if waiting.cancelled():  # dropped from the queue after its deadline passed
                    raise GenerationTimeout(f"not done within {self.settings.request_timeout_s:g} s")
                return waiting.result()
            if client_gone is not None and await client_gone():
                job.abandoned.set()
                raise ClientGone("the client disconnected")

    def depth(self) -> int:
        """Requests waiting, not counting the running call."""
        return len(self._pending)

    def running(self) -> CallProgress | None:
        """The pipeline call running now (a snapshot), or None when the device is idle."""
        running = self._running
        return None if running is None else CallProgress(**vars(running))

    def _count_prompt_lookup(self, hit: bool) -> None:
        if self.metrics is not None:
            self.metrics.prompt_cache_lookups.labels("hit" if hit else "miss").inc()

    def _report_depth(self) -> None:
        if self.metrics is not None:
            self.metrics.queue_depth.set(len(self._pending))

    def _run(self, warm_model: str) -> None:
        try:
            self._load_safety_checker()
            self._warm_up(warm_model)
        except Exception as error:  # /readyz and /ping answer 503 saying why; the queue serves what it can
            logger.exception("warm-up of %s failed", warm_model)
            self.warm_up_error = f"warm-up of '{warm_model}' failed: {error}"
            if self.settings.safety_checker and self.safety_checker is None:  # never serve unchecked images
                self._unavailable = f"the safety checker did not load: {error}"
            else:
                self._failed_loads[warm_model] = (self.warm_up_error, time.monotonic())
        else:
            self.ready.set()
        while True:
            batch = self._next_batch()
            self._run_batch(batch)

    def _load_safety_checker(self) -> None:
        if self.settings.safety_checker:
            self.safety_checker = SafetyChecker.load(
                self.settings.safety_checker_repo,
                device=self.manager.device,
                dtype=self.manager.load_dtype,
                local_files_only=self.settings.local_files_only,
            )
            logger.info("safety checker loaded from %s", self.settings.safety_checker_repo)

    def _warm_up(self, model_id: str) -> None:
        entry = self.manager.entry(model_id)
        pipeline = self.manager.pipeline_for(entry)
        size = entry.resolution
        # One short call runs every kernel once, and compiles the UNet when torch.compile is on.
        generate_images(
            pipeline,
            [BatchItem("warm-up", None, 0)],
            width=size,
            height=size,
            num_inference_steps=WARM_UP_STEPS,
            guidance_scale=family(entry.family).default_guidance,
        )
        logger.info("warmed up %s", model_id)

    def _next_batch(self) -> list[Job]:
        """Wait for the oldest live job, then gather the queued jobs that can share its pipeline call."""
        with self._condition:
            while True:
                while not self._pending:
                    self._condition.wait()
                head = self._pending.popleft()
                if self._refuse_unloadable(head):
                    continue
                if not head.gave_up():
                    break
                head.future.cancel()  # its waiter has already answered the client
            batch = [head]
            images = len(head.seeds)
            wait_until = time.monotonic() + self.settings.batch_wait_ms / 1000
            while True:
                for job in list(self._pending):
                    fits = images + len(job.seeds) <= self.settings.max_batch_size
                    if fits and job.batch_key == head.batch_key and not job.gave_up():
                        self._pending.remove(job)
                        batch.append(job)
                        images += len(job.seeds)
                remaining = wait_until - time.monotonic()
                if images >= self.settings.max_batch_size or remaining <= 0:
                    break
                self._condition.wait(remaining)
            self._report_depth()
        return batch

    def _refuse_unloadable(self, job: Job) -> bool:
        """Fail a job queued before its model's load failed (it would fail the same way); True when done so."""
        try:
            self.check_loadable(job.entry.id)
        except ModelLoadError as error:
            job.future.set_exception(error)
            return True
        return False

    def _run_batch(self, batch: list[Job]) -> None:
        """Run one pipeline call for ``batch`` and hand each job its images; a failed call of several
        requests runs each of them again alone, so that only the request at fault fails."""
        try:
            images, flags, steps_done = self._call(batch)
        except Exception as error:
            if len(batch) > 1 and not isinstance(error, ModelLoadError):  # a load fails alike for all
                logger.warning("a batch of %d requests failed (%s); running each alone", len(batch), error)
                for job in batch:
                    self._run_batch([job])
                return
            self._fail(batch, error)
            return
        self._deliver(batch, images, flags, steps_done)

    def _call(self, batch: list[Job]) -> tuple[list, list[bool] | None, int]:
        """One pipeline call for every image of ``batch``: the images, the safety flags, and the steps run."""
        head = batch[0]
        items = [
            BatchItem(job.request.prompt, job.request.negative_prompt, seed, job.request.prompt_syntax)
            for job in batch
            for seed in job.seeds
        ]
        started = time.monotonic()
        progress = CallProgress(started, 0, head.request.num_inference_steps, len(items))
        self._running = progress
        for job in batch:
            job.call = progress

        def count_step(done: int) -> None:
            progress.steps_done = done

        if self.metrics is not None:
            self.metrics.running_images.set(len(items))
        try:
            pipeline, adapter_mix = self.manager.pipeline_for_batch(
                [(job.entry, job.request.loras) for job in batch for _ in job.seeds], for_request=True
            )
            images = generate_images(
                pipeline,
                items,
                width=head.width,
                height=head.height,
                num_inference_steps=head.request.num_inference_steps,
                guidance_scale=head.request.guidance_scale,
                scheduler=head.request.scheduler,
                true_cfg_scale=head.request.true_cfg_scale,
                should_stop=lambda: all(job.gave_up() for job in batch),
                on_step=count_step,
                prompt_cache=self.prompt_cache,
                adapter_mix=adapter_mix,
            )
            flags = None
            if self.safety_checker is not None:  # here, so that every route gets checked images
                images, flags = self.safety_checker.check(images)
        finally:
            self._running = None
            if self.metrics is not None:
                self.metrics.running_images.set(0)
        elapsed = time.monotonic() - started
        self._seconds_per_image = 0.8 * self._seconds_per_image + 0.2 * elapsed / len(items)
        return images, flags, progress.steps_done

    def _fail(self, batch: list[Job], error: Exception) -> None:
        """Every request of a failed call hears why; a failed load is remembered (check_loadable)."""
        head = batch[0]
        if isinstance(error, ModelLoadError) and not isinstance(error, DownloadsForbidden):
            self._failed_loads[head.entry.id] = (str(error), time.monotonic())
        if not isinstance(error, (InputError, DownloadsForbidden)):  # the client's answer says it all
            logger.error("generation failed for %s", head.entry.id, exc_info=error)
        for job in batch:
            job.future.set_exception(error)

    def _deliver(self, batch: list[Job], images: list, flags: list[bool] | None, steps_done: int) -> None:
        """Count the call, then hand each job its images (in seed order) and safety flags."""
        head = batch[0]
        if head.entry.id == self._warm_model and not self.ready.is_set() and self._unavailable is None:
            self.warm_up_error = None  # the default model loaded after all (fetched since, or memory freed)
            self._failed_loads.pop(head.entry.id, None)
            self.ready.set()
        if steps_done < head.request.num_inference_steps:
            logger.info(
                "stopped after %d of %d steps: every request in the batch gave up",
                steps_done,
                head.request.num_inference_steps,
            )
            if self.metrics is not None:
                self.metrics.interrupted.inc()
        # Counted before any answer goes out, so a client that has its images finds them in /metrics.
        if self.metrics is not None:
            self.metrics.batch_images.observe(len(images))
            for job in batch:
                self.metrics.generation_seconds.labels(job.entry.id).observe(time.monotonic() - job.arrived)
        offset = 0
        for job in batch:
            count = len(job.seeds)
            job_flags = flags[offset : offset + count] if flags is not None else None
            job.future.set_result(
                GenerationResult(images[offset : offset + count], job.seeds, len(images), job_flags, job)
            )
            offset += count
