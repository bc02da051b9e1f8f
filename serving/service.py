"""The BentoML service: the worker's engine, and every protocol's routes wired onto it. Each protocol is
a module that owns its routes, request models and error answers:

* serving/txt2img_api.py: ``POST /txt2img`` (one image) and ``POST /images`` (several), BentoML APIs;
* serving/sagemaker_api.py: SageMaker's ``/ping`` and JumpStart's ``/invocations``, and ``GET /models``;
* serving/openai_images.py: OpenAI's Images API under ``/v1``;
* serving/a1111.py: AUTOMATIC1111's API under ``/sdapi/v1``;
* serving/jobs_api.py: jobs that outlive the request (``/jobs``), run by serving/jobs_runner.py;
* serving/train_jobs_api.py: training jobs (``POST /jobs/train``), run by serving/train_runner.py;
* serving/playground.py: the web playground at ``/ui`` (``/`` leads there; BentoML's Swagger UI moves to ``/docs``).

Every route generates through the worker's one Engine (serving/engine.py): the same request model,
limits, queue and batching. Run it with ``bentoml serve`` from the repository root (``bentofile.yaml``
names it). It warms the catalog model named by env ``TXT2IMG_MODEL`` (default ``tiny-sd``) before
``/readyz`` says ready; other catalog models load on first use. Every ``TXT2IMG_*`` setting is in
serving/settings.py. Every route, the ones mounted or added later included, sits behind
serving/guard.py's middleware (TXT2IMG_API_TOKEN, TXT2IMG_MAX_BODY_BYTES); the safety checker runs
in the generation queue. Models saved into BentoML's model store (``txt2img bento-model save``) are
found there first, and ``bentoml build`` packs those env ``TXT2IMG_BENTO_MODELS`` names
(serving/model_store.py).
"""

from __future__ import annotations

import sys
from typing import Any

import bentoml
from PIL import Image

from catalog.paths import NotAFolder, txt2img_home
from serving import txt2img_api
from serving.a1111 import a1111_app
from serving.device import serving_gpu_count, serving_worker_count
from serving.engine import Engine
from serving.guard import BearerTokenAuth, ContentTypeGuard, HostOriginGuard, RequestBodyLimit, SecurityHeaders
from serving.http_errors import JSONErrorBodies, log_client_errors_as_one_line
from serving.image_files import share_image_folder
from serving.jobs_runner import JobRunner
from serving.metrics import own_prometheus_dir
from serving.model_store import bento_models_to_pack
from serving.openai_images import openai_app
from serving.openapi import OpenAPI30Docs
from serving.playground import PlaygroundHome, playground_app
from serving.sagemaker_api import sagemaker_app
from serving.schema import GeneratedImages, GenerationRequest, ImageRequest
from serving.settings import ServingSettings
from serving.slow_clients import close_connections_without_a_head
from serving.train_jobs_api import jobs_app  # /jobs, with the training routes added (serving/train_jobs_api.py)
from serving.train_runner import TrainingRunner
from serving.worker_lifetime import tie_workers_to_server

try:
    txt2img_home()  # a home that cannot be a folder stops `bentoml serve` here, in one line, before any worker starts
except NotAFolder as error:
    sys.exit(f"txt2img: error: {error}")
own_prometheus_dir()  # so that a second server beside this one cannot wipe its metrics (serving/metrics.py)
share_image_folder()  # so that any worker can serve an OpenAI "url" image that another one made
tie_workers_to_server()  # so that a killed server leaves no worker holding its port (serving/worker_lifetime.py)
close_connections_without_a_head()  # before BentoML starts uvicorn in a worker (serving/slow_clients.py)

# ``bentoml serve`` reads the worker count from the decorator when it imports this module, before
# any worker starts, so both counts are settled here. BentoML shows every worker the first
# SERVER_GPUS GPUs (CUDA_VISIBLE_DEVICES) and each worker takes its own one (serving/device.py).
SERVER_SETTINGS = ServingSettings()
SERVER_GPUS = serving_gpu_count(SERVER_SETTINGS)
SERVER_WORKERS = serving_worker_count(SERVER_SETTINGS)


@bentoml.service(
    # Our own queue bounds the wait and answers 429/504; BentoML's timer must not cut in first.
    traffic={"timeout": 3600},
    # One worker per GPU by default, each a process with its own device, queue and model cache.
    workers=SERVER_WORKERS,
    resources={"gpu": max(1, SERVER_GPUS)},  # at least 1: BentoCloud reads it as the GPUs to give a replica
)
@bentoml.asgi_app(sagemaker_app, path="/")  # mounted last: it would take the paths of any mounted after it
@bentoml.asgi_app(jobs_app, path="/")
@bentoml.asgi_app(playground_app, path="/")
@bentoml.asgi_app(a1111_app, path="/sdapi/v1")
@bentoml.asgi_app(openai_app, path="/v1")
class Txt2Img:
    def __init__(self) -> None:
        log_client_errors_as_one_line()  # here, in the worker, after BentoML has set logging up
        self.engine = Engine(ServingSettings(), worker_index=bentoml.server_context.worker_index)
        self.engine.start()
        self.jobs = JobRunner(self.engine)  # the store every worker shares, under TXT2IMG_HOME
        self.jobs.start()
        self.training = TrainingRunner(self.engine, self.jobs)  # POST /jobs/train, one child trainer at a time
        self.training.start()

    def __is_ready__(self) -> bool:
        return self.engine.queue.ready.is_set()

    @bentoml.api(route="/txt2img", input_spec=ImageRequest)
    async def txt2img(self, ctx: bentoml.Context, **fields: Any) -> Image.Image:
        """One image, answered as PNG or JPEG (the request's format) with headers X-Seed and X-Batch-Images,
        and X-NSFW-Content-Detected (true: the image is black) when the safety checker is on."""
        return await txt2img_api.one_image(self.engine, ctx, fields)

    @bentoml.api(route="/images", input_spec=GenerationRequest)
    async def images(self, ctx: bentoml.Context, **fields: Any) -> GeneratedImages:
        """num_images images as base64 PNG or JPEG in JSON, each with its seed, and header X-Batch-Images."""
        return await txt2img_api.several_images(self.engine, ctx, fields)


# The first added is the outermost: auth refuses a stranger before a byte of the body is read.
Txt2Img.add_asgi_middleware(SecurityHeaders)  # CSP, nosniff, no framing: /ui, /docs, served images (refusals too)
Txt2Img.add_asgi_middleware(BearerTokenAuth)  # TXT2IMG_API_TOKEN, on every route but the health checks
Txt2Img.add_asgi_middleware(HostOriginGuard)  # without a token: loopback or TXT2IMG_ALLOWED_HOSTS, own Origin
Txt2Img.add_asgi_middleware(ContentTypeGuard)  # 415 for a body of a type its route does not take
Txt2Img.add_asgi_middleware(RequestBodyLimit)  # TXT2IMG_MAX_BODY_BYTES, on every route
# What `bentoml build` packs into the Bento; empty unless TXT2IMG_BENTO_MODELS names stored models.
Txt2Img.models.extend(bento_models_to_pack())
Txt2Img.add_asgi_middleware(OpenAPI30Docs, service=Txt2Img)  # /docs.json as valid OpenAPI 3.0
Txt2Img.add_asgi_middleware(JSONErrorBodies)  # the framework's plain-text 404/405 as JSON too
Txt2Img.add_asgi_middleware(PlaygroundHome)  # / redirects to /ui; Swagger UI at /docs
