"""The BentoML service: ``POST /txt2img`` (one image), ``POST /images`` (several), SageMaker's
``/ping`` + ``/invocations``, ``GET /models``, OpenAI's Images API under ``/v1``, AUTOMATIC1111's
API under ``/sdapi/v1``, and the web playground at ``/ui`` (``/`` leads there; BentoML's Swagger UI
moves to ``/docs``). Every generating route is a thin adapter onto GenerationRequest and the one queue.

Run it with ``bentoml serve`` from the repository root (``bentofile.yaml`` names it). It warms the
catalog model named by env ``TXT2IMG_MODEL`` (default ``tiny-sd``) before ``/readyz`` says ready;
other catalog models load on first use. Every ``TXT2IMG_*`` setting is in serving/settings.py.
Every route, the ones mounted or added later included, sits behind serving/guard.py's middleware
(TXT2IMG_API_TOKEN, TXT2IMG_MAX_BODY_BYTES); the safety checker runs in the generation queue.
Models saved into BentoML's model store (``txt2img bento-model save``) are found there first, and
``bentoml build`` packs those env ``TXT2IMG_BENTO_MODELS`` names (serving/model_store.py).
"""

from __future__ import annotations

import asyncio
import os
from typing import Any

import bentoml
from fastapi import FastAPI, Request
from PIL import Image
from starlette.responses import JSONResponse, Response, StreamingResponse

from catalog.paths import txt2img_home
from serving import a1111, openai_images
from serving.device import serving_gpu_count, serving_worker_count
from serving.generation_queue import GenerationQueue, GenerationResult, Job
from serving.guard import BearerTokenAuth, RequestBodyLimit
from serving.http_errors import (
    INVOCATION_ERRORS,
    ErrorBody,
    JSONErrorBodies,
    error_response,
    log_client_errors_as_one_line,
)
from serving.image_files import ImageFiles, server_image_folder, share_image_folder
from serving.images import image_base64
from serving.invocation_requests import generation_requests
from serving.invocations import (
    JSON_CONTENT,
    REQUEST_SCHEMA,
    TEXT_CONTENT,
    negotiate_accept,
    parse_request,
    render_response,
)
from serving.manager import PipelineManager
from serving.metrics import own_prometheus_dir, serving_metrics
from serving.model_store import bento_models_to_pack, stored_models
from serving.openapi import OpenAPI30Docs
from serving.playground import (
    NotARunFile,
    PlaygroundHome,
    catalog_listing,
    fine_tune_runs,
    playground_app,
    progress_lines,
    run_file_response,
)
from serving.schema import GeneratedImage, GeneratedImages, GenerationRequest, ImageRequest, check_limits
from serving.settings import ServingSettings
from serving.slow_clients import close_connections_without_a_head
from serving.worker_lifetime import tie_workers_to_server

own_prometheus_dir()  # so that a second server beside this one cannot wipe its metrics (serving/metrics.py)
share_image_folder()  # so that any worker can serve an OpenAI "url" image that another one made
tie_workers_to_server()  # so that a killed server leaves no worker holding its port (serving/worker_lifetime.py)
close_connections_without_a_head()  # before BentoML starts uvicorn in a worker (serving/slow_clients.py)

# The route reads its body by hand (two content types, JumpStart's error answers), so FastAPI cannot
# infer it; this states it for the OpenAPI document.
INVOCATIONS_REQUEST_BODY = {
    "required": True,
    "content": {
        JSON_CONTENT: {"schema": REQUEST_SCHEMA},
        TEXT_CONTENT: {"schema": {"type": "string", "description": "The prompt."}},
    },
}

# Both read their bodies by hand, to answer every error in their own format; these state them.
OPENAI_REQUEST_BODY = {
    "required": True,
    "content": {JSON_CONTENT: {"schema": openai_images.ImageGenerationRequest.model_json_schema()}},
}
A1111_REQUEST_BODY = {
    "required": True,
    "content": {JSON_CONTENT: {"schema": a1111.Txt2ImgRequest.model_json_schema()}},
}

sagemaker_app = FastAPI(
    title="txt2img SageMaker protocol",
    description="GET /ping and POST /invocations, JumpStart's txt2img wire format; GET /models.",
    docs_url="/sagemaker/docs",
    openapi_url="/sagemaker/openapi.json",
)
# The service's own /docs.json documents these two; they serve no documents of their own.
openai_app = FastAPI(title="txt2img OpenAI Images API", docs_url=None, redoc_url=None, openapi_url=None)
a1111_app = FastAPI(title="txt2img AUTOMATIC1111 API", docs_url=None, redoc_url=None, openapi_url=None)

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
@bentoml.asgi_app(playground_app, path="/")
@bentoml.asgi_app(a1111_app, path="/sdapi/v1")
@bentoml.asgi_app(openai_app, path="/v1")
class Txt2Img:
    def __init__(self) -> None:
        log_client_errors_as_one_line()  # here, in the worker, after BentoML has set logging up
        self.settings = ServingSettings()
        self.worker_index = bentoml.server_context.worker_index  # 1, 2, ...: which GPU is this worker's
        self.manager = PipelineManager(self.settings, worker_index=self.worker_index, stored=stored_models())
        self.manager.entry(self.settings.model)  # an unknown TXT2IMG_MODEL stops the server right away
        self.queue = GenerationQueue(self.manager, self.settings, serving_metrics())
        self.queue.start(warm_model=self.settings.model)
        self.image_files = ImageFiles(server_image_folder())  # OpenAI's response_format "url"

    def __is_ready__(self) -> bool:
        return self.queue.ready.is_set()

    @bentoml.api(route="/txt2img", input_spec=ImageRequest)
    async def txt2img(self, ctx: bentoml.Context, **settings: Any) -> Image.Image:
        """One image, answered as PNG or JPEG (the request's format) with headers X-Seed and X-Batch-Images,
        and X-NSFW-Content-Detected (true: the image is black) when the safety checker is on."""
        request = GenerationRequest(**settings)
        try:
            [result] = await self._generate([request], ctx.request)
        except Exception as error:
            return self._error_response(error, ctx)
        ctx.response.headers["X-Seed"] = str(result.seeds[0])
        ctx.response.headers["X-Batch-Images"] = str(result.batch_images)
        if result.nsfw_content_detected is not None:  # the safety checker is on
            ctx.response.headers["X-NSFW-Content-Detected"] = str(result.nsfw_content_detected[0]).lower()
        image = result.images[0].convert("RGB")
        image.format = request.format.upper()  # BentoML encodes a returned image in its own format
        return image

    @bentoml.api(route="/images", input_spec=GenerationRequest)
    async def images(self, ctx: bentoml.Context, **settings: Any) -> GeneratedImages:
        """num_images images as base64 PNG or JPEG in JSON, each with its seed, and header X-Batch-Images."""
        request = GenerationRequest(**settings)
        try:
            [result] = await self._generate([request], ctx.request)
        except Exception as error:
            return self._error_response(error, ctx)
        ctx.response.headers["X-Batch-Images"] = str(result.batch_images)
        flags = result.nsfw_content_detected or [None] * len(result.images)
        images = [
            GeneratedImage(seed=seed, image=image_base64(image, request.format), nsfw_content_detected=flag)
            for seed, image, flag in zip(result.seeds, result.images, flags)
        ]
        return GeneratedImages(format=request.format, images=images)

    @sagemaker_app.get(
        "/ping",
        response_class=Response,  # an empty 200, as SageMaker expects
        responses={200: {"description": "Warm."}, 503: {"description": "Warming up.", "model": ErrorBody}},
    )
    def ping(self) -> Response:
        """SageMaker's health check: 200 once the default model is warm."""
        if self.queue.ready.is_set():
            return Response(status_code=200)
        return JSONResponse({"error": self.queue.warm_up_error or "warming up"}, status_code=503)

    @sagemaker_app.post(
        "/invocations",
        openapi_extra={"requestBody": INVOCATIONS_REQUEST_BODY},
        responses={
            status: {"description": description, "model": ErrorBody}
            for status, description in INVOCATION_ERRORS.items()
        },
    )
    async def invocations(self, request: Request) -> Response:
        """JumpStart's txt2img contract (serving/invocations.py): application/json or application/x-text in."""
        try:
            accept_type = negotiate_accept(request.headers.get("accept"))
            invocation = parse_request(await request.body(), request.headers.get("content-type"))
            results = await self._generate(generation_requests(invocation, self.settings), request)
        except Exception as error:
            return error_response(error)
        images = [image for result in results for image in result.images]
        flags = None
        if self.settings.safety_checker:
            flags = [flag for result in results for flag in result.nsfw_content_detected]
        return Response(render_response(invocation, images, accept_type, flags), media_type=accept_type)

    @sagemaker_app.get("/models")
    def models(self) -> dict:
        """The catalog ids this server may serve, which of them are loaded now, the BentoML model tag of those
        served from BentoML's model store, and the catalog files it skipped.

        Each worker has models of its own: "loaded" is that of the worker that answered, named in "worker"."""
        self.manager.refresh_catalog()
        loaded = self.manager.loaded_ids()
        stored = self.manager.stored
        return {
            "worker": {"index": self.worker_index, "pid": os.getpid(), "device": self.manager.device},
            "default": self.settings.model,
            "loaded": loaded,
            "models": [
                {"id": model_id, "loaded": model_id in loaded}
                | ({"bento_model": stored[model_id].tag} if model_id in stored else {})
                for model_id in self.manager.catalog.ids()
            ],
            "catalog_problems": [problem.as_json() for problem in self.manager.catalog_problems],
        }

    @openai_app.post(
        "/images/generations",
        openapi_extra={"requestBody": OPENAI_REQUEST_BODY},
        responses=openai_images.openai_error_answers(400, 403, 404, 413, 429, 503, 504),
    )
    async def openai_generations(self, request: Request) -> Response:
        """OpenAI's image generation (serving/openai_images.py); errors in OpenAI's shape."""
        try:
            openai_request = openai_images.parse_image_request(await request.body())
            [result] = await self._generate([openai_images.generation_request(openai_request)], request)
        except Exception as error:
            return openai_images.openai_error_response(error)

        def file_url(data: bytes, image_format: str) -> str:
            return str(request.url_for("openai_image_file", name=self.image_files.add(data, image_format)))

        return JSONResponse(openai_images.images_response(openai_request, result, file_url))

    @openai_app.get("/images/files/{name}", name="openai_image_file", responses=openai_images.openai_error_answers(404))
    def openai_image_file(self, name: str) -> Response:
        """An image of a response_format "url" answer, kept for an hour (serving/image_files.py)."""
        stored = self.image_files.get(name)
        if stored is None:
            return openai_images.openai_error(404, f"no image '{name}': its link expired or never existed")
        return Response(stored.data, media_type=stored.media_type)

    @openai_app.get("/models")
    def openai_models(self) -> dict:
        """The catalog in OpenAI's list format."""
        return openai_images.model_list(list(self.manager.catalog))

    @openai_app.get("/models/{model_id}", responses=openai_images.openai_error_answers(404))
    def openai_model(self, model_id: str) -> Response:
        try:
            return JSONResponse(openai_images.model_object(self.manager.entry(model_id)))
        except Exception as error:
            return openai_images.openai_error_response(error)

    @a1111_app.post(
        "/txt2img",
        openapi_extra={"requestBody": A1111_REQUEST_BODY},
        responses=a1111.a1111_error_answers(422, 403, 404, 413, 429, 503, 504),
    )
    async def a1111_txt2img(self, request: Request) -> Response:
        """AUTOMATIC1111's txt2img (serving/a1111.py); errors in A1111's shape."""
        try:
            a1111_request, payload = a1111.parse_txt2img(await request.body())
            generation = a1111.generation_request(a1111_request)
            [result] = await self._generate([generation], request)
        except Exception as error:
            return a1111.a1111_error_response(error)
        model = generation.model or self.settings.model
        return JSONResponse(a1111.txt2img_response(a1111_request, payload, generation, result, model))

    @a1111_app.get("/sd-models")
    def a1111_sd_models(self) -> list:
        """The catalog, fine-tunes included, as A1111 checkpoints."""
        return [a1111.sd_model(entry) for entry in self.manager.catalog]

    @a1111_app.get("/samplers")
    def a1111_samplers(self) -> list:
        """Our schedulers under A1111's sampler names."""
        return a1111.samplers()

    @a1111_app.get("/schedulers")
    def a1111_schedulers(self) -> list:
        """A1111's noise schedules: only "automatic", each sampler's own."""
        return [{"name": "automatic", "label": "Automatic", "aliases": None}]

    @a1111_app.get("/options")
    def a1111_options(self) -> dict:
        """The settings A1111 clients read; sd_model_checkpoint is the server's default model."""
        return a1111.options(self.settings.model)

    @a1111_app.post("/options", responses=a1111.a1111_error_answers(422))
    async def a1111_set_options(self, request: Request) -> Response:
        """Accepted only when it changes nothing; a request picks its model with override_settings."""
        try:
            a1111.check_options_unchanged(await request.body(), self.settings.model)
        except Exception as error:
            return a1111.a1111_error_response(error)
        return JSONResponse(None)

    @a1111_app.get("/progress")
    def a1111_progress(self) -> dict:
        """The running pipeline call: progress 0..1, steps and an ETA in seconds."""
        return a1111.progress(self.queue.running(), self.queue.depth())

    @a1111_app.get("/scripts")
    def a1111_scripts(self) -> dict:
        """No scripts or extensions here; clients ask before sending their arguments."""
        return {"txt2img": [], "img2img": []}

    @playground_app.get("/ui/api/catalog", include_in_schema=False)
    def playground_catalog(self, q: str = "") -> dict:
        """The catalog for the playground, ranked as ``txt2img catalog search q`` ranks it."""
        return catalog_listing(q, self.manager.loaded_ids(), self.settings.model)

    @playground_app.post("/ui/api/generate", include_in_schema=False)
    async def playground_generate(self, request: Request) -> Response:
        """``POST /images`` with progress: NDJSON lines while the job runs, then the images.

        A request refused before it is queued (bad input, a full queue) gets the same error answer as
        ``/images``; once the stream has begun, an error arrives as its last line."""
        try:
            job = self._job(GenerationRequest.model_validate_json(await request.body()))
            self.queue.submit(job)
        except Exception as error:
            return error_response(error)
        lines = progress_lines(self.queue, job, client_gone=request.is_disconnected)
        return StreamingResponse(lines, media_type="application/x-ndjson")

    @playground_app.get("/ui/api/runs", include_in_schema=False)
    def playground_runs(self) -> list:
        """The fine-tunes in TXT2IMG_HOME and the files their training, evaluation and tuning left."""
        return fine_tune_runs(txt2img_home())

    @playground_app.get("/ui/files/{path:path}", include_in_schema=False)
    def playground_file(self, path: str) -> Response:
        """A run's file, read-only; nothing outside TXT2IMG_HOME's run folders (see playground.run_file)."""
        try:
            return run_file_response(txt2img_home(), path)
        except NotARunFile:
            return JSONResponse({"error": f"no run file '{path}' in TXT2IMG_HOME"}, status_code=404)

    async def _generate(self, requests: list[GenerationRequest], http_request: Request) -> list[GenerationResult]:
        """Queue every request at once (so they can share pipeline calls) and wait for all of them."""
        jobs = [self._job(request) for request in requests]  # checks them all before queueing any
        try:
            for job in jobs:
                self.queue.submit(job)
            return await asyncio.gather(
                *(self.queue.wait(job, client_gone=http_request.is_disconnected) for job in jobs)
            )
        except BaseException:
            for job in jobs:
                job.abandoned.set()
            raise

    def _job(self, request: GenerationRequest) -> Job:
        entry = self.manager.entry(request.model or self.settings.model)
        width = request.width or entry.resolution
        height = request.height or entry.resolution
        check_limits(request, self.settings, width, height)
        return Job.create(entry, request, width, height, self.settings.request_timeout_s)

    @staticmethod
    def _error_response(error: Exception, ctx: bentoml.Context) -> JSONResponse:
        response = error_response(error)
        ctx.response.status_code = response.status_code  # BentoML gives the answer the context's status
        return response


# The first added is the outermost: auth refuses a stranger before a byte of the body is read.
Txt2Img.add_asgi_middleware(BearerTokenAuth)  # TXT2IMG_API_TOKEN, on every route but the health checks
Txt2Img.add_asgi_middleware(RequestBodyLimit)  # TXT2IMG_MAX_BODY_BYTES, on every route
# What `bentoml build` packs into the Bento; empty unless TXT2IMG_BENTO_MODELS names stored models.
Txt2Img.models.extend(bento_models_to_pack())
Txt2Img.add_asgi_middleware(OpenAPI30Docs, service=Txt2Img)  # /docs.json as valid OpenAPI 3.0
Txt2Img.add_asgi_middleware(JSONErrorBodies)  # the framework's plain-text 404/405 as JSON too
Txt2Img.add_asgi_middleware(PlaygroundHome)  # / redirects to /ui; Swagger UI at /docs
