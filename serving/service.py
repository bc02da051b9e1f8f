"""The BentoML service: ``POST /txt2img`` (one image), ``POST /images`` (several), SageMaker's
``/ping`` + ``/invocations``, ``GET /models``, and the web playground at ``/ui`` (``/`` leads there;
BentoML's Swagger UI moves to ``/docs``).

Run it with ``bentoml serve`` from the repository root (``bentofile.yaml`` names it). It warms the
catalog model named by env ``TXT2IMG_MODEL`` (default ``tiny-sd``) before ``/readyz`` says ready;
other catalog models load on first use. Every ``TXT2IMG_*`` setting is in serving/settings.py.
"""

from __future__ import annotations

import asyncio
from typing import Any

import bentoml
from fastapi import FastAPI, Request
from PIL import Image
from starlette.responses import JSONResponse, Response, StreamingResponse

from catalog.paths import txt2img_home
from serving.generation_queue import GenerationQueue, GenerationResult, Job
from serving.http_errors import error_response, log_client_errors_as_one_line
from serving.images import image_base64
from serving.invocations import (
    JSON_CONTENT,
    TEXT_CONTENT,
    JumpStartPayload,
    UnsupportedMediaType,
    encode_images,
    image_encoding,
    parse_json_body,
    parse_media_type,
)
from serving.manager import PipelineManager
from serving.metrics import serving_metrics
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

# The route reads its body by hand (two content types, JumpStart's error answers), so FastAPI cannot
# infer it; this states it for the OpenAPI document.
INVOCATIONS_REQUEST_BODY = {
    "required": True,
    "content": {
        JSON_CONTENT: {"schema": JumpStartPayload.model_json_schema()},
        TEXT_CONTENT: {"schema": {"type": "string", "description": "The prompt."}},
    },
}

sagemaker_app = FastAPI(
    title="txt2img SageMaker protocol",
    description="GET /ping and POST /invocations, JumpStart's txt2img wire format; GET /models.",
    docs_url="/sagemaker/docs",
    openapi_url="/sagemaker/openapi.json",
)


@bentoml.service(
    # Our own queue bounds the wait and answers 429/504; BentoML's timer must not cut in first.
    traffic={"timeout": 3600},
    workers=1,
    resources={"gpu": 1},
)
@bentoml.asgi_app(sagemaker_app, path="/")
@bentoml.asgi_app(playground_app, path="/")
class Txt2Img:
    def __init__(self) -> None:
        log_client_errors_as_one_line()  # here, in the worker, after BentoML has set logging up
        self.settings = ServingSettings()
        self.manager = PipelineManager(self.settings)
        self.manager.entry(self.settings.model)  # an unknown TXT2IMG_MODEL stops the server right away
        self.queue = GenerationQueue(self.manager, self.settings, serving_metrics())
        self.queue.start(warm_model=self.settings.model)

    def __is_ready__(self) -> bool:
        return self.queue.ready.is_set()

    @bentoml.api(route="/txt2img", input_spec=ImageRequest)
    async def txt2img(self, ctx: bentoml.Context, **settings: Any) -> Image.Image:
        """One image, answered as PNG or JPEG (the request's format) with headers X-Seed and X-Batch-Images."""
        request = GenerationRequest(**settings)
        try:
            [result] = await self._generate([request], ctx.request)
        except Exception as error:
            return self._error_response(error, ctx)
        ctx.response.headers["X-Seed"] = str(result.seeds[0])
        ctx.response.headers["X-Batch-Images"] = str(result.batch_images)
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
        images = [
            GeneratedImage(seed=seed, image=image_base64(image, request.format))
            for seed, image in zip(result.seeds, result.images)
        ]
        return GeneratedImages(format=request.format, images=images)

    @sagemaker_app.get("/ping")
    def ping(self) -> Response:
        """SageMaker's health check: 200 once the default model is warm."""
        if self.queue.ready.is_set():
            return Response(status_code=200)
        return JSONResponse({"error": self.queue.warm_up_error or "warming up"}, status_code=503)

    @sagemaker_app.post("/invocations", openapi_extra={"requestBody": INVOCATIONS_REQUEST_BODY})
    async def invocations(self, request: Request) -> Response:
        """JumpStart's txt2img contract: application/json or application/x-text in, generated_images out."""
        try:
            encoding = image_encoding(request.headers.get("accept"))
            content_type, _ = parse_media_type(request.headers.get("content-type"), JSON_CONTENT)
            body = await request.body()
            if content_type == TEXT_CONTENT:
                prompt = body.decode("utf-8", errors="replace")
                requests = [GenerationRequest(model=self.settings.model, prompt=prompt)]
            elif content_type == JSON_CONTENT:
                payload = JumpStartPayload.model_validate(parse_json_body(body))
                prompt = payload.prompt
                requests = payload.generation_requests(self.settings.model)
            else:
                raise UnsupportedMediaType(
                    f"unsupported content type '{content_type}'; use {JSON_CONTENT} or {TEXT_CONTENT}"
                )
            results = await self._generate(requests, request)
        except Exception as error:
            return error_response(error)
        images = encode_images([image for result in results for image in result.images], encoding)
        if content_type == TEXT_CONTENT:
            return JSONResponse({"generated_image": images[0], "prompt": prompt})
        return JSONResponse({"generated_images": images, "prompt": prompt})

    @sagemaker_app.get("/models")
    def models(self) -> dict:
        """The catalog ids this server may serve, and which of them are loaded now."""
        loaded = self.manager.loaded_ids()
        return {
            "default": self.settings.model,
            "loaded": loaded,
            "models": [{"id": model_id, "loaded": model_id in loaded} for model_id in self.manager.catalog.ids()],
        }

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
            job = self._job(GenerationRequest.model_validate(parse_json_body(await request.body())))
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


Txt2Img.add_asgi_middleware(OpenAPI30Docs, service=Txt2Img)  # /docs.json as valid OpenAPI 3.0
Txt2Img.add_asgi_middleware(PlaygroundHome)  # / redirects to /ui; Swagger UI at /docs
