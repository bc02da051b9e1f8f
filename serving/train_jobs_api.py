"""Training jobs over HTTP: ``POST /jobs/train`` fine-tunes a catalog model on uploaded photos.

* ``POST /jobs/train``, multipart/form-data: ``images`` (3 to TXT2IMG_TRAIN_MAX_IMAGES files),
  ``instance_prompt``, ``class_prompt`` (optional: prior preservation), ``name``, ``base`` (default: the
  server's model), ``method`` (``lora``, the default, or ``full``), ``webhook``, and each hyperparameter
  as its own field under its JumpStart name (``max_steps=30``). 202 with the job's id, status, kind and URLs.
* ``GET /jobs/{id}``, ``DELETE /jobs/{id}`` and webhooks as every job (serving/jobs_api.py); a cancel
  checkpoints the run and stops it, and ``POST /jobs/{id}/resume`` continues it from that checkpoint.
* ``GET /jobs/{id}/validation/{name}``: a validation image the run wrote.
* ``GET /models/{id}``: the catalog entry a job made (any worker knows it at once: the catalog is re-read).

Uploads are checked as bad input first (serving/train_uploads.py); the run is serving/train_runner.py.
"""

from __future__ import annotations

import shutil
import uuid

from fastapi import Depends, Request
from starlette.responses import FileResponse, JSONResponse

from serving.engine import Engine, current_engine
from serving.http_errors import ErrorBody
from serving.jobs_api import JOB_ERRORS, JobNotFound, current_jobs, job_answer, jobs_app
from serving.jobs_runner import JobRunner
from serving.train_progress import validation_image_file
from serving.train_runner import NoRoomToTrain, TrainingRunner, training_room_problem
from serving.train_uploads import read_training_form, write_job_folder
from serving.webhooks import check_webhook_url
from txt2img.errors import Txt2ImgError


class NotResumable(Txt2ImgError):
    http_status = 409


def current_training() -> TrainingRunner:
    """The training runner of the worker serving this request."""
    import bentoml

    return bentoml.get_current_service().training


TRAIN_FORM = {
    "required": True,
    "content": {
        "multipart/form-data": {
            "schema": {
                "type": "object",
                "required": ["images", "instance_prompt", "name"],
                "properties": {
                    "images": {"type": "array", "items": {"type": "string", "format": "binary"}},
                    "instance_prompt": {"type": "string"},
                    "class_prompt": {"type": "string"},
                    "name": {"type": "string"},
                    "base": {"type": "string"},
                    "method": {"type": "string", "enum": ["lora", "full"]},
                    "webhook": {"type": "string"},
                },
                "additionalProperties": {"type": "string", "description": "A hyperparameter, JumpStart's name."},
            }
        }
    },
}


@jobs_app.post(
    "/jobs/train",
    status_code=202,
    openapi_extra={"requestBody": TRAIN_FORM},
    responses={
        **JOB_ERRORS,
        409: {"description": "The model name is taken.", "model": ErrorBody},
        503: {"description": "The GPU has no room to train beside the loaded models.", "model": ErrorBody},
    },
)
async def submit_training(
    request: Request,
    engine: Engine = Depends(current_engine),
    runner: JobRunner = Depends(current_jobs),
    training: TrainingRunner = Depends(current_training),
) -> JSONResponse:
    """Queue a fine-tune of ``base`` on the photos; 202 with its id, status, kind and URLs."""
    form = await read_training_form(request, engine.settings, runner.store)
    if form.webhook is not None:
        check_webhook_url(form.webhook, engine.settings)
    problem = training_room_problem(engine)
    if problem is not None:
        raise NoRoomToTrain(problem)
    job_id = str(uuid.uuid4())
    folder = runner.store.images / job_id
    data_dir = write_job_folder(folder, form)
    try:
        job, _ = runner.store.add(
            form.request(data_dir),
            [],
            form.hyperparameters.max_steps or 0,
            webhook=form.webhook,
            kind="train",
            job_id=job_id,
        )
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    training.wake()
    return JSONResponse(job_answer(runner, job), status_code=202)


@jobs_app.post(
    "/jobs/{job_id}/resume", status_code=202, responses={404: {"model": ErrorBody}, 409: {"model": ErrorBody}}
)
def resume_training(
    job_id: str, runner: JobRunner = Depends(current_jobs), training: TrainingRunner = Depends(current_training)
) -> JSONResponse:
    """Queue a canceled training job again: it continues from its last checkpoint, under the same id."""
    job = runner.store.requeue_canceled(job_id)
    if job is None:
        stored = runner.store.get(job_id)
        if stored is None:
            raise JobNotFound(job_id)
        raise NotResumable(f"job {job_id} is a {stored.kind} job, {stored.status}; only a canceled training resumes")
    training.wake()
    return JSONResponse(job_answer(runner, job), status_code=202)


@jobs_app.get(
    "/jobs/{job_id}/validation/{name:path}", response_class=FileResponse, responses={404: {"model": ErrorBody}}
)
def validation_image(job_id: str, name: str, runner: JobRunner = Depends(current_jobs)) -> FileResponse:
    """A validation image the training job's run wrote (the names ``GET /jobs/{id}`` lists)."""
    job = runner.store.get(job_id)
    path = validation_image_file(job, name) if job is not None and job.kind == "train" else None
    if path is None:
        raise JobNotFound(f"{job_id}/validation/{name}")
    return FileResponse(path, media_type="image/png")


@jobs_app.get("/models/{model_id}", responses={404: {"model": ErrorBody}})
def model_entry(model_id: str, engine: Engine = Depends(current_engine)) -> dict:
    """A catalog entry, as this worker serves it (the catalog is re-read for an id it does not know yet)."""
    return engine.manager.entry(model_id).model_dump(mode="json", exclude_none=True)
