"""The engine every route generates through: the pipeline manager, the one generation queue, and the
checks a request passes before it is queued.

One ``Engine`` lives in each server worker (serving/service.py builds it); each protocol's routes
reach it with ``Depends(current_engine)``. Whatever the route, a request becomes GenerationRequests,
each is resolved against the catalog and held to the same limits here, and all of a route's
requests are queued at once so that they can share pipeline calls.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from catalog.schema import CatalogEntry
from serving.generation_queue import GenerationQueue, GenerationResult, Job
from serving.image_files import ImageFiles, server_image_folder
from serving.manager import PipelineManager
from serving.metrics import serving_metrics
from serving.model_store import stored_models
from serving.schema import GenerationRequest, LimitExceeded, check_limits, with_model_defaults, work
from serving.settings import ServingSettings


class Engine:
    """The worker's settings, models and queue, and the one way to generate with them."""

    def __init__(self, settings: ServingSettings, worker_index: int | None) -> None:
        self.settings = settings
        self.worker_index = worker_index  # 1, 2, ...: which GPU is this worker's
        self.manager = PipelineManager(settings, worker_index=worker_index, stored=stored_models())
        self.manager.entry(settings.model)  # an unknown TXT2IMG_MODEL stops the server right away
        self.queue = GenerationQueue(self.manager, settings, serving_metrics())
        self.image_files = ImageFiles(server_image_folder())  # OpenAI's response_format "url"

    def start(self) -> None:
        """Start generating: the queue warms the default model first."""
        self.queue.start(warm_model=self.settings.model)

    def resolve(self, request: GenerationRequest) -> tuple[CatalogEntry, GenerationRequest]:
        """``request``'s catalog entry, and the request checked against the entry's family with every field
        it left out filled in from the model's defaults (serving/schema.py ``with_model_defaults``).

        Routes that echo what they generated (A1111's infotext) resolve first, to echo the defaults used."""
        entry = self.manager.entry(request.model or self.settings.model)
        return entry, with_model_defaults(request, entry)

    def job(self, request: GenerationRequest) -> Job:
        """The queue's job for ``request``: its model resolved, its defaults filled in, its limits and LoRAs
        checked (serving/adapters.py says the rules)."""
        entry, request = self.resolve(request)
        self.queue.check_loadable(entry.id)
        check_limits(request, self.settings, request.width, request.height)
        self.manager.check_loras(entry, request.loras)
        return Job.create(entry, request, request.width, request.height, self.settings.request_timeout_s)

    async def generate(
        self, requests: list[GenerationRequest], client_gone: Callable[[], Awaitable[bool]] | None = None
    ) -> list[GenerationResult]:
        """Queue every request at once (so they can share pipeline calls) and wait for all of them.

        Every request is checked before any is queued; the work limit holds for all of them together.
        """
        jobs = [self.job(request) for request in requests]
        total_work = sum(work(job.width, job.height, job.request.num_inference_steps, len(job.seeds)) for job in jobs)
        if total_work > self.settings.max_work:
            raise LimitExceeded("work", self.settings.max_work, total_work)
        try:
            for job in jobs:
                self.queue.submit(job)
            return await asyncio.gather(*(self.queue.wait(job, client_gone=client_gone) for job in jobs))
        except BaseException:
            for job in jobs:
                job.abandoned.set()
            raise


def current_engine() -> Engine:
    """The engine of the service serving this request: FastAPI routes take it with ``Depends(current_engine)``."""
    import bentoml

    return bentoml.get_current_service().engine
