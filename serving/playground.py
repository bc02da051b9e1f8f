"""The web playground at ``/ui``: the page itself, and the JSON it reads that no public route gives.

The page (serving/playground/: plain HTML, CSS and JS, nothing fetched from the internet) lists the
catalog, generates with per-step progress, compares models side by side and shows fine-tune runs.
It sends the same request body as ``POST /images``. This module holds the page's routes (on
``playground_app``, which the service mounts at ``/``), what they compute, and the middleware that
makes ``/`` lead here.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

from fastapi import Depends, FastAPI, Request
from starlette.responses import FileResponse, JSONResponse, RedirectResponse, Response, StreamingResponse
from starlette.staticfiles import StaticFiles

from catalog.families import FAMILIES
from catalog.index import load_index_skipping_bad_files
from catalog.paths import txt2img_home
from serving.bentoml_compat import SWAGGER_UI_PATH
from serving.engine import Engine, current_engine
from serving.generation_queue import GenerationQueue, Job
from serving.http_errors import add_error_handlers, error_response
from serving.images import image_base64
from serving.json_body import read_json_object
from serving.recipes import recipe_metadata, result_recipes
from serving.schema import SCHEDULER_CLASSES, GenerationRequest

logger = logging.getLogger(__name__)

PAGE_DIR = Path(__file__).with_name("playground")
# Everything a run leaves for people to look at lives in these folders of TXT2IMG_HOME
# (training/dreambooth.py, training/evaluation.py, training/tuning.py); nothing else there is served.
RUN_FOLDERS = ("models", "evaluations", "studies")
RUN_FILE_TYPES = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".json": "application/json"}
PROGRESS_INTERVAL_S = 0.2

# The page's own plumbing, not an API to build on: no docs of its own, and out of /docs.json.
playground_app = FastAPI(title="txt2img playground", docs_url=None, redoc_url=None, openapi_url=None)
playground_app.mount("/ui/static", StaticFiles(directory=PAGE_DIR), name="playground-static")


@playground_app.get("/ui", include_in_schema=False)
def playground_page() -> FileResponse:
    return FileResponse(PAGE_DIR / "index.html", headers={"Cache-Control": "no-cache"})


class PlaygroundHome:
    """ASGI middleware: ``GET /`` redirects to the playground, and BentoML's Swagger UI, which BentoML
    serves at ``/``, answers at ``/docs`` instead (its assets and ``docs.json`` are relative links)."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and scope["path"] == "/":
            await RedirectResponse("/ui")(scope, receive, send)
            return
        if scope["type"] == "http" and scope["path"] == "/docs":
            scope = {**scope, "path": SWAGGER_UI_PATH, "raw_path": SWAGGER_UI_PATH.encode()}
        await self.app(scope, receive, send)


def catalog_listing(query: str, loaded: list[str], default: str) -> dict[str, Any]:
    """Catalog entries for the page: ranked by ``txt2img catalog search``'s own ranking when there
    is a query, else every entry with the fine-tunes first; each says whether it is loaded now. A user
    catalog file that does not load is left out and named in ``catalog_problems``, as ``GET /models`` does."""
    index, problems = load_index_skipping_bad_files()
    if query.strip():
        entries = index.search(query)
    else:
        entries = sorted(index.entries, key=lambda entry: entry["source"] != "finetune")  # stable: catalog order
    return {
        "default": default,
        "loaded": loaded,
        "models": [{**entry, "loaded": entry["id"] in loaded} for entry in entries],
        "catalog_problems": [problem.as_json() for problem in problems],
        "schedulers": list(SCHEDULER_CLASSES),
        "families": {name: family.as_json() for name, family in FAMILIES.items()},
    }


def _folder_names(home: Path, folder: str) -> list[str]:
    """The names in ``home``'s run folder ``folder``, sorted; none when it is missing or leads out of home."""
    path = home / folder
    try:
        if not path.resolve().is_relative_to(home.resolve() / folder.split("/")[0]):
            return []  # a link leading out of home: not even listed
        return sorted(child.name for child in path.iterdir())
    except OSError:
        return []


def _files(home: Path, folder: str, suffix: str) -> list[str]:
    """The run files ending in ``suffix`` in ``folder``, as paths relative to ``home``."""
    found = (f"{folder}/{name}" for name in _folder_names(home, folder) if name.endswith(suffix))
    return [relative for relative in found if _file(home, relative)]


def _file(home: Path, relative: str) -> str | None:
    """``relative`` when it names a run file the page may fetch (``run_file``), else None."""
    try:
        run_file(home, relative)
    except NotARunFile:
        return None
    return relative


def _evaluations(home: Path, model_id: str) -> list[dict[str, Any]]:
    """Every ``txt2img evaluate`` report of a model, newest first (their folders are UTC time stamps)."""
    evaluations = []
    models_evaluations = f"evaluations/{model_id}"
    for stamp in reversed(_folder_names(home, models_evaluations)):
        folder = f"{models_evaluations}/{stamp}"
        try:
            # Read through run_file, as the page would fetch it: never through a link leading out of home.
            report = json.loads(run_file(home, f"{folder}/metrics.json").read_text(encoding="utf-8"))
        except (NotARunFile, OSError, ValueError):
            continue  # a report being written, damaged or out of reach is left out, not an error for the page
        evaluations.append(
            {
                "created": report.get("created"),
                "metrics": report.get("metrics", {}),
                "report": f"{folder}/metrics.json",
                "grid": _file(home, f"{folder}/grid.png"),
            }
        )
    return evaluations


def _tuning(home: Path, tuning: dict[str, Any] | None) -> dict[str, Any] | None:
    """A tuned fine-tune's study: the objective plot and each trial with its evaluation grid."""
    if not tuning:
        return None
    study = f"studies/{tuning.get('study')}"  # training/tuning.py's default_study_dir
    trials = [
        {**trial, "grid": _file(home, f"{study}/trials/{trial.get('number', 0):04d}/evaluation/grid.png")}
        for trial in tuning.get("trials", [])
    ]
    return {**tuning, "trials": trials, "objective_plot": _file(home, f"{study}/report/objective.png")}


def fine_tune_runs(home: Path) -> dict[str, Any]:
    """Each fine-tune in ``home``'s catalog with the files its training, evaluations and tuning left in
    ``home``, as paths relative to ``home`` (the page reads them through ``GET /ui/files/<path>``), and
    the catalog files left out, as ``catalog_listing`` names them."""
    index, problems = load_index_skipping_bad_files(home / "catalog")
    runs = []
    for entry in index.entries:
        if entry["source"] != "finetune":
            continue
        run = f"models/{entry['id']}"  # training/dreambooth.py's default_output_dir
        runs.append(
            {
                "model": entry,
                "contact_sheet": _file(home, f"{run}/contact_sheet.png"),
                "loss_curve": _file(home, f"{run}/loss_curve.png"),
                # The losses behind the curve (training/report.py's LOSS_HISTORY): the page draws them itself.
                "loss_history": _file(home, f"{run}/loss_curve.json"),
                "validation": _files(home, f"{run}/validation", ".png"),
                "evaluations": _evaluations(home, entry["id"]),
                "tuning": _tuning(home, entry.get("tuning")),
            }
        )
    return {"runs": runs, "catalog_problems": [problem.as_json() for problem in problems]}


class NotARunFile(Exception):
    """A path that names no run file inside TXT2IMG_HOME: outside it, hidden, or of another kind."""


def run_file(home: Path, relative: str) -> Path:
    """The file ``relative`` names under one of ``home``'s RUN_FOLDERS, symlinks resolved; raises
    NotARunFile for anything else (``..``, absolute paths, backslashes, a link leading out, a link to
    a file of another type, a name the file system refuses)."""
    parts = relative.split("/")
    if (
        relative.startswith("/")
        or "\\" in relative
        or "\x00" in relative
        or any(part == "" or part.startswith(".") for part in parts)  # "..", "." and hidden files
        or parts[0] not in RUN_FOLDERS
        or Path(relative).suffix.lower() not in RUN_FILE_TYPES
    ):
        raise NotARunFile(relative)
    root = home.resolve()
    try:
        path = (root / relative).resolve()
        is_file = path.is_file()
    except OSError:  # a name too long for the file system, a loop of links
        raise NotARunFile(relative) from None
    # resolve() follows every link, so a link anywhere in the path that leads out of home ends up outside.
    if not path.is_relative_to(root / parts[0]) or not is_file:
        raise NotARunFile(relative)
    if RUN_FILE_TYPES.get(path.suffix.lower()) != RUN_FILE_TYPES[Path(relative).suffix.lower()]:
        raise NotARunFile(relative)  # served as what its name says, never as what a link leads to
    return path


def run_file_response(home: Path, relative: str) -> FileResponse:
    path = run_file(home, relative)
    return FileResponse(path, media_type=RUN_FILE_TYPES[path.suffix.lower()])


def _error_line(error: Exception) -> dict[str, Any]:
    """The error answer ``POST /images`` would have given, as one line with its status inside."""
    try:
        response = error_response(error)
    except Exception:  # error_response re-raises what it does not know; the stream has begun, so say it here
        logger.exception("generation failed")
        return {"error": f"generation failed: {error}", "status": 500}
    return {**json.loads(response.body), "status": response.status_code}


async def progress_lines(
    queue: GenerationQueue, job: Job, client_gone: Callable[[], Awaitable[bool]]
) -> AsyncIterator[str]:
    """NDJSON for one queued job: ``{"step", "steps"}`` whenever its denoising advances, then either
    what ``POST /images`` answers (plus ``model``, ``width`` and ``height``) or ``{"error", "status"}``."""
    waiting = asyncio.ensure_future(queue.wait(job, client_gone=client_gone))
    reported = -1
    try:
        while not waiting.done():
            if job.steps_done != reported:
                reported = job.steps_done
                yield json.dumps({"step": reported, "steps": job.request.num_inference_steps}) + "\n"
            await asyncio.wait({waiting}, timeout=PROGRESS_INTERVAL_S)
        result = waiting.result()
    except Exception as error:
        yield json.dumps(_error_line(error)) + "\n"
        return
    finally:
        if not waiting.done():  # the client left mid-stream: let the queue drop or stop the job
            job.abandoned.set()
            waiting.cancel()
    request = job.request
    images = [
        {"seed": recipe.seed, "image": image_base64(image, request.format, metadata=recipe_metadata(recipe))}
        for recipe, image in zip(result_recipes(result), result.images)
    ]
    answer = {
        "format": request.format,
        "images": images,
        "model": job.entry.id,
        "width": job.width,
        "height": job.height,
        "batch_images": result.batch_images,
    }
    yield json.dumps(answer) + "\n"


def _not_a_run_file(error: NotARunFile) -> JSONResponse:
    return JSONResponse({"error": f"no run file '{error}' in TXT2IMG_HOME"}, status_code=404)


def _playground_error(error: Exception) -> Response:
    return _not_a_run_file(error) if isinstance(error, NotARunFile) else error_response(error)


add_error_handlers(playground_app, _playground_error, NotARunFile)


@playground_app.get("/ui/api/catalog", include_in_schema=False)
def playground_catalog(q: str = "", engine: Engine = Depends(current_engine)) -> dict:
    """The catalog for the page, ranked as ``txt2img catalog search q`` ranks it, and the schedulers."""
    return catalog_listing(q, engine.manager.loaded_ids(), engine.settings.model)


@playground_app.post("/ui/api/generate", include_in_schema=False)
async def playground_generate(request: Request, engine: Engine = Depends(current_engine)) -> Response:
    """``POST /images`` with progress: NDJSON lines while the job runs, then the images.

    A request refused before it is queued (bad input, a full queue) gets the same error answer as
    ``/images``; once the stream has begun, an error arrives as its last line."""
    job = engine.job(GenerationRequest.model_validate(read_json_object(await request.body())))
    engine.queue.submit(job)
    lines = progress_lines(engine.queue, job, client_gone=request.is_disconnected)
    return StreamingResponse(lines, media_type="application/x-ndjson")


@playground_app.get("/ui/api/runs", include_in_schema=False)
def playground_runs() -> dict:
    """The fine-tunes in TXT2IMG_HOME and the files their training, evaluation and tuning left."""
    return fine_tune_runs(txt2img_home())


@playground_app.get("/ui/files/{path:path}", include_in_schema=False)
def playground_file(path: str) -> Response:
    """A run's file, read-only; nothing outside TXT2IMG_HOME's run folders (see run_file)."""
    return run_file_response(txt2img_home(), path)
