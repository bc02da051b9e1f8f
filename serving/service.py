"""The BentoML service: ``POST /txt2img``, SageMaker's ``/ping`` + ``/invocations``, and ``GET /models``.

Run it with ``bentoml serve`` from the repository root (``bentofile.yaml`` names it). It warms the
catalog model named by env ``TXT2IMG_MODEL`` (default ``tiny-sd``) before ``/readyz`` says ready;
other catalog models load on first use. Every ``TXT2IMG_*`` setting is in serving/settings.py.
"""

from __future__ import annotations

import asyncio

import bentoml
from fastapi import FastAPI, Request
from PIL import Image
from starlette.responses import JSONResponse, Response

from serving.generation_queue import GenerationQueue, GenerationResult, Job
from serving.http_errors import error_response
from serving.images import MEDIA_TYPES, image_base64, image_bytes
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
from serving.metrics import own_prometheus_dir, serving_metrics
from serving.schema import GenerationRequest, check_limits
from serving.settings import ServingSettings

own_prometheus_dir()  # so that a second server beside this one cannot wipe its metrics (serving/metrics.py)

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
class Txt2Img:
    def __init__(self) -> None:
        self.settings = ServingSettings()
        self.manager = PipelineManager(self.settings)
        self.manager.entry(self.settings.model)  # an unknown TXT2IMG_MODEL stops the server right away
        self.queue = GenerationQueue(self.manager, self.settings, serving_metrics())
        self.queue.start(warm_model=self.settings.model)

    def __is_ready__(self) -> bool:
        return self.queue.ready.is_set()

    @bentoml.api(route="/txt2img")
    async def txt2img(self, request: GenerationRequest, /, ctx: bentoml.Context) -> Image.Image:
        """Generate images. One image comes back as image/png or image/jpeg; several as JSON with base64 images."""
        try:
            [result] = await self._generate([request], ctx.request)
        except Exception as error:
            response = error_response(error)
        else:
            response = self._txt2img_response(request, result)
        ctx.response.status_code = response.status_code
        return response

    @sagemaker_app.get("/ping")
    def ping(self) -> Response:
        """SageMaker's health check: 200 once the default model is warm."""
        if self.queue.ready.is_set():
            return Response(status_code=200)
        return JSONResponse({"error": self.queue.warm_up_error or "warming up"}, status_code=503)

    @sagemaker_app.post("/invocations")
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
        """The catalog ids this server may serve, which of them are loaded now, and the catalog files it skipped."""
        self.manager.refresh_catalog()
        loaded = self.manager.loaded_ids()
        return {
            "default": self.settings.model,
            "loaded": loaded,
            "models": [{"id": model_id, "loaded": model_id in loaded} for model_id in self.manager.catalog.ids()],
            "catalog_problems": [problem.as_json() for problem in self.manager.catalog_problems],
        }

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

    def _txt2img_response(self, request: GenerationRequest, result: GenerationResult) -> Response:
        headers = {"X-Batch-Images": str(result.batch_images)}
        if len(result.images) == 1:
            headers["X-Seed"] = str(result.seeds[0])
            content = image_bytes(result.images[0], request.format)
            return Response(content, media_type=MEDIA_TYPES[request.format], headers=headers)
        images = [
            {"seed": seed, "image": image_base64(image, request.format)}
            for seed, image in zip(result.seeds, result.images)
        ]
        return JSONResponse({"format": request.format, "images": images}, headers=headers)
