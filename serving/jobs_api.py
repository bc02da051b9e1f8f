"""The jobs API: generation that outlives its request and the server.

* ``POST /jobs``: the body of ``/images`` plus an optional ``webhook`` URL; answers 202 with the job's
  id, status and URLs. An ``Idempotency-Key`` header gives the same job for the same key and body,
  and 409 for the same key with another body.
* ``GET /jobs/{id}``: status, progress, queue position and, once it succeeded, the image URLs with seeds.
* ``GET /jobs/{id}/images/{index}``: one image of a succeeded job.
* ``DELETE /jobs/{id}``: cancel; a running job stops at its next denoising step.
* ``GET /jobs?limit=&offset=``: the jobs, newest first.

A job is checked at submission as ``/images`` checks a request (the same model resolution and limits,
through the Engine, with the same 4xx answers), and its seeds are drawn then and stored, so a job run
again after a crash gives the same images. The store is serving/jobs.py, the runner serving/jobs_runner.py.
"""

from __future__ import annotations

import hashlib

from fastapi import Depends, FastAPI, Header, Request
from pydantic import Field
from starlette.responses import FileResponse, JSONResponse

from serving.engine import Engine, current_engine
from serving.http_errors import GENERATION_ERRORS, ErrorBody, add_error_handlers, error_response
from serving.jobs import StoredJob
from serving.jobs_runner import JobRunner, image_urls, job_path
from serving.json_body import read_json_object
from serving.schema import GenerationRequest
from serving.train_progress import training_details
from serving.webhooks import check_webhook_url
from txt2img.errors import InputError, Txt2ImgError

MAX_PAGE = 100
MAX_IDEMPOTENCY_KEY = 255


class JobRequest(GenerationRequest):
    """``POST /jobs``'s body: a ``/images`` request and where to send the job's events."""

    webhook: str | None = Field(
        None, description="URL the job's events (started, succeeded, failed, canceled) are POSTed to, signed."
    )


class JobNotFound(Txt2ImgError):
    http_status = 404

    def __init__(self, job_id: str):
        super().__init__(f"no job with id {job_id!r} (finished jobs are kept for TXT2IMG_JOBS_MAX_AGE)")


class IdempotencyConflict(Txt2ImgError):
    http_status = 409

    def __init__(self, key: str, job_id: str):
        super().__init__(f"Idempotency-Key {key!r} was used for job {job_id} with another body; use a new key")


# The route reads its body with the JSON policy of every route (serving/json_body.py) before the model,
# so FastAPI cannot infer it; this states it for the OpenAPI document.
JOB_REQUEST_BODY = {"required": True, "content": {"application/json": {"schema": JobRequest.model_json_schema()}}}

jobs_app = FastAPI(title="txt2img jobs", docs_url=None, redoc_url=None, openapi_url="/jobs/openapi.json")
add_error_handlers(jobs_app, error_response)
JOB_ERRORS = {status: {"description": meaning, "model": ErrorBody} for status, meaning in GENERATION_ERRORS.items()}


def current_jobs() -> JobRunner:
    """The job runner of the worker serving this request."""
    import bentoml

    return bentoml.get_current_service().jobs


def job_answer(runner: JobRunner, job: StoredJob) -> dict:
    """What the jobs API says about ``job``."""
    answer = {
        "id": job.id,
        "status": job.status,
        "created": job.created,
        "started": job.started,
        "finished": job.finished,
        "progress": {"steps_done": job.steps_done, "total_steps": job.total_steps},
        "queue_position": runner.store.queue_position(job) if job.status == "queued" else None,
        "seeds": job.seeds,
        "urls": {"get": job_path(job.id), "cancel": job_path(job.id)},
    }
    if job.kind == "train":
        answer.update(training_details(job))
    elif job.status == "succeeded":
        answer["images"] = image_urls(job)
    if job.status == "failed":
        answer["error"] = job.error
    return answer


@jobs_app.post(
    "/jobs",
    status_code=202,
    openapi_extra={"requestBody": JOB_REQUEST_BODY},
    responses={
        **JOB_ERRORS,
        409: {"description": "The Idempotency-Key was used with another body.", "model": ErrorBody},
    },
)
async def submit_job(
    request: Request,
    idempotency_key: str | None = Header(None),
    engine: Engine = Depends(current_engine),
    runner: JobRunner = Depends(current_jobs),
) -> JSONResponse:
    """Queue a job; 202 with its id, status and URLs."""
    body = await request.body()
    read_json_object(body)  # the JSON policy of every route, before the model's own checks
    job_request = JobRequest.model_validate_json(body)
    if idempotency_key is not None and not 0 < len(idempotency_key) <= MAX_IDEMPOTENCY_KEY:
        raise InputError(f"Idempotency-Key must be 1 to {MAX_IDEMPOTENCY_KEY} characters")
    if job_request.webhook is not None:
        check_webhook_url(job_request.webhook, engine.settings)
    generation = GenerationRequest.model_validate(job_request.model_dump(exclude={"webhook"}))
    queued = engine.job(generation)  # the model resolved and every limit checked, as on /images
    fixed = generation.model_copy(update={"seed": queued.seeds[0]})  # so that a rerun gives the same images
    body_hash = hashlib.sha256(job_request.model_dump_json().encode()).hexdigest()
    job, added = runner.store.add(
        fixed.model_dump(mode="json"),
        queued.seeds,
        generation.num_inference_steps,
        webhook=job_request.webhook,
        idempotency_key=idempotency_key,
        body_hash=body_hash,
    )
    if not added and job.body_hash != body_hash:
        raise IdempotencyConflict(idempotency_key, job.id)
    runner.wake()
    return JSONResponse(job_answer(runner, job), status_code=202)


@jobs_app.get("/jobs", responses={400: {"model": ErrorBody}})
def list_jobs(limit: str = "20", offset: str = "0", runner: JobRunner = Depends(current_jobs)) -> dict:
    """The jobs, newest first, ``limit`` (1 to 100) at a time from ``offset``."""
    page_size = _query_int("limit", limit, 1, MAX_PAGE)
    start = _query_int("offset", offset, 0, None)
    jobs = runner.store.page(page_size, start)
    total = runner.store.count()
    following = f"/jobs?limit={page_size}&offset={start + page_size}" if start + page_size < total else None
    return {"jobs": [job_answer(runner, job) for job in jobs], "total": total, "next": following}


@jobs_app.get("/jobs/{job_id}", responses={404: {"model": ErrorBody}})
def get_job(job_id: str, runner: JobRunner = Depends(current_jobs)) -> dict:
    """The job's status, progress, queue position and, once it succeeded, its images with their seeds."""
    return job_answer(runner, _stored(runner, job_id))


@jobs_app.get("/jobs/{job_id}/images/{index}", response_class=FileResponse, responses={404: {"model": ErrorBody}})
def job_image(job_id: str, index: str, runner: JobRunner = Depends(current_jobs)) -> FileResponse:
    """One image of a succeeded job, in the format the job asked for."""
    job = _stored(runner, job_id)
    if job.status != "succeeded" or not index.isdigit() or int(index) >= job.image_count:
        raise JobNotFound(f"{job_id}/images/{index}")
    return FileResponse(runner.store.image_path(job, int(index)), media_type=f"image/{job.image_format}")


@jobs_app.delete("/jobs/{job_id}", responses={404: {"model": ErrorBody}})
def cancel_job(job_id: str, runner: JobRunner = Depends(current_jobs)) -> dict:
    """Cancel: a queued job at once, a running one at its next denoising step; a finished one stays as it is."""
    job, canceled_now = runner.store.cancel(job_id)
    if job is None:
        raise JobNotFound(job_id)
    if canceled_now:
        runner.notify(job, "canceled")  # canceled before it ran: no runner will say so
    return job_answer(runner, job)


def _stored(runner: JobRunner, job_id: str) -> StoredJob:
    job = runner.store.get(job_id)
    if job is None:
        raise JobNotFound(job_id)
    return job


def _query_int(name: str, text: str, least: int, most: int | None) -> int:
    if not text.isdigit() or int(text) < least or (most is not None and int(text) > most):
        bounds = f"{least} to {most}" if most is not None else f"{least} or more"
        raise InputError(f"query parameter {name} is {text!r}; it must be an integer, {bounds}")
    return int(text)
