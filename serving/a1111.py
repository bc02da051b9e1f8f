"""AUTOMATIC1111's web UI API (``/sdapi/v1/...``) as a thin adapter over GenerationRequest.

``POST /sdapi/v1/txt2img`` becomes one GenerationRequest of ``batch_size * n_iter`` images for
the service's one queue; image i uses ``seed + i``, as in A1111. The answer is A1111's:
``images`` (base64 PNG, each with A1111's ``parameters`` text chunk), ``parameters`` (the request
with its defaults) and ``info`` (a JSON string with ``all_seeds`` and the rest).

LoRAs come as A1111's extra-network tags, ``<lora:NAME:SCALE>`` (``<lora:NAME>`` is scale 1) in the
prompt: read_lora_tags takes them out of the text and the request carries them as ``loras``. As in A1111
(modules/extra_networks.py), only the prompt is read, the negative prompt is passed as written, and
``disable_extra_networks: true`` leaves the tags in the text. NAME is a catalog id or the LoRA file's A1111
alias (``ss_output_name`` in its safetensors metadata); ``GET /sdapi/v1/loras`` lists them as A1111 does.

A1111 clients send every field of A1111's request, most at values that ask for nothing. This
module knows each of them: mapped fields are honoured, the others are accepted at neutral values
(NEUTRAL, and every hires-fix field while ``enable_hr`` is false) and refused with 422 naming the
field otherwise (``restore_faces: true``, a ``script_name``, a ControlNet unit, ...). A field this
module does not know is accepted only when empty (null, false, "", [] or {}).

The routes live on ``a1111_app``, which the service mounts at ``/sdapi/v1``; the service's own
/docs.json documents them.
"""

from __future__ import annotations

import base64
import binascii
import json
import random
import re
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi import Depends, FastAPI, Request
from pydantic import BaseModel, ConfigDict, Field
from safetensors import SafetensorError, safe_open
from starlette.responses import JSONResponse, Response

from catalog.families import Family, family
from catalog.pipelines import lora_weights_file
from catalog.schema import CatalogEntry
from catalog.store import Catalog
from serving.engine import Engine, current_engine
from serving.generation_queue import CallProgress, GenerationResult
from serving.http_errors import GENERATION_ERRORS, ErrorJSONResponse, add_error_handlers, error_answer
from serving.images import PARAMETERS_KEY, image_base64, image_metadata
from serving.json_body import read_json_object
from serving.recipes import FLOW_MATCHING_SAMPLERS, SAMPLERS, parameters_text, recipe_metadata, result_recipes
from serving.schema import GenerationRequest, Text

SAMPLER_LOOKUP = {alias.lower(): name for name, (_, aliases) in SAMPLERS.items() for alias in (name, *aliases)}
DEFAULT_SAMPLER = "Euler"  # A1111's sampler_index default, used when sampler_name is empty
SEED_RANGE = 4294967294  # A1111 draws a random seed below it
# What GET /sdapi/v1/options reports; override_settings may repeat any of these values.
FIXED_OPTIONS = {
    "sd_checkpoint_hash": None,
    "samples_format": "png",
    "sd_vae": "Automatic",
    "CLIP_stop_at_last_layers": 1,
    "eta_noise_seed_delta": 0,
}

# Fields of A1111's txt2img request with no equivalent here, and the values that ask for nothing.
ANY = object()  # every value is neutral: the field is metadata, or only matters for something refused here
NEUTRAL: dict[str, Any] = {
    "enable_hr": (False,),
    "restore_faces": (False,),
    "tiling": (False,),
    "styles": ([],),
    "subseed": ANY,  # used only with subseed_strength > 0
    "seed_enable_extras": ANY,  # older A1111's switch for the subseed fields, which must be neutral anyway
    "subseed_strength": (0,),
    "seed_resize_from_h": (0, -1),
    "seed_resize_from_w": (0, -1),
    "scheduler": ("automatic", "Automatic"),
    "eta": (0, 1),  # the eta of A1111's DDIM (0) and of its ancestral samplers (1), as here
    "s_churn": (0,),
    "s_tmax": (0,),
    "s_tmin": (0,),
    "s_noise": (1,),
    "s_min_uncond": (0,),
    "denoising_strength": ANY,  # img2img and hires fix only
    "do_not_save_samples": ANY,  # this server saves nothing
    "do_not_save_grid": ANY,
    "save_images": (False,),
    "override_settings_restore_afterwards": ANY,  # override_settings last one request here
    "refiner_checkpoint": ("",),
    "refiner_switch_at": ANY,  # used only with a refiner_checkpoint
    "firstpass_image": ("",),
    "comments": ANY,
    "force_task_id": ANY,
    "infotext": ("",),
    "script_name": ("",),
    "script_args": ([],),
    "distilled_cfg_scale": ANY,  # Forge's, for FLUX-type models
}
HIRES_FIX = {
    "firstphase_width",
    "firstphase_height",
    "hr_scale",
    "hr_upscaler",
    "hr_second_pass_steps",
    "hr_resize_x",
    "hr_resize_y",
    "hr_checkpoint_name",
    "hr_sampler_name",
    "hr_scheduler",
    "hr_prompt",
    "hr_negative_prompt",
    "hr_additional_modules",
    "hr_cfg",
    "hr_distilled_cfg",
}
# Our field names in errors, as an A1111 client knows them.
A1111_NAMES = {
    "num_images": "batch_size*n_iter",
    "num_inference_steps": "steps",
    "guidance_scale": "cfg_scale",
    "model": "override_settings.sd_model_checkpoint",
    "loras": "prompt's <lora:...> tags",
}
# An extra-network tag, ``<TYPE:ARGS>``, as A1111 finds them in a prompt (modules/extra_networks.py).
EXTRA_NETWORK_TAG = re.compile(r"<(\w+):([^>]+)>")
LORA_TAG_TYPES = ("lora", "lyco")  # A1111's Lora extension answers to both


class A1111RequestError(ValueError):
    """A field this server cannot honour; answered with 422 naming it."""

    def __init__(self, field: str, message: str):
        self.field = field
        super().__init__(f"{field}: {message}")


class Txt2ImgRequest(BaseModel):
    """The fields of A1111's txt2img request that map onto GenerationRequest, with A1111's defaults."""

    # Every other field is checked by unmapped_field_problem; strict, as every route's types are.
    model_config = ConfigDict(extra="ignore", strict=True)

    prompt: Text = ""
    negative_prompt: Text | None = ""
    width: int = 512
    height: int = 512
    steps: int | None = None  # absent: the model family's default (catalog/families.py)
    cfg_scale: float | None = None
    seed: int = -1
    batch_size: int = Field(1, ge=1)
    n_iter: int = Field(1, ge=1)
    sampler_name: Text | None = None
    sampler_index: Text | None = DEFAULT_SAMPLER
    override_settings: dict[str, Any] | None = None
    alwayson_scripts: dict[str, Any] | None = None
    send_images: bool = True
    disable_extra_networks: bool = False  # true: <lora:...> tags stay in the prompt, as text

    @property
    def sampler(self) -> str:
        """The A1111 sampler name asked for (sampler_name, else sampler_index), as A1111 spells it."""
        asked = self.sampler_name or self.sampler_index or DEFAULT_SAMPLER
        name = SAMPLER_LOOKUP.get(asked.lower())
        if name is None:
            raise A1111RequestError("sampler_name", f"unknown sampler '{asked}'; known: {', '.join(SAMPLERS)}")
        return name


def is_empty(value: Any) -> bool:
    return value is None or value is False or value in ("", [], {})


def unmapped_field_problem(name: str, value: Any, enable_hr: Any) -> str | None:
    """Why a field outside Txt2ImgRequest cannot be honoured, or None when it asks for nothing."""
    if name in HIRES_FIX:
        return None if enable_hr in (False, None) else "hires fix is not supported"
    if name in NEUTRAL:
        neutral = NEUTRAL[name]
        if neutral is ANY or value is None or value in neutral:
            return None
        return f"{json.dumps(value)} has no equivalent on this server; it accepts " + " or ".join(
            json.dumps(item) for item in neutral
        )
    if is_empty(value):
        return None
    return "not a field this server knows; it accepts unknown fields only when empty"


def alwayson_script_problem(script: Any) -> str | None:
    """An always-on script is accepted switched off: no args, or args starting with false (ADetailer's way)."""
    args = script.get("args", []) if isinstance(script, dict) else script
    if args in ([], None) or (isinstance(args, list) and args[0] is False):
        return None
    return "always-on scripts (ControlNet, ADetailer, ...) are not supported"


def parse_txt2img(body: bytes) -> tuple[Txt2ImgRequest, dict[str, Any]]:
    """The mapped request and the payload as sent; raises A1111RequestError for a field it cannot honour."""
    payload = read_json_object(body)
    mapped = Txt2ImgRequest.model_fields
    for name, value in payload.items():
        if name not in mapped:
            problem = unmapped_field_problem(name, value, payload.get("enable_hr"))
            if problem:
                raise A1111RequestError(name, problem)
    request = Txt2ImgRequest.model_validate(payload)
    for name, script in (request.alwayson_scripts or {}).items():
        problem = alwayson_script_problem(script)
        if problem:
            raise A1111RequestError(f"alwayson_scripts.{name}", problem)
    for name, value in (request.override_settings or {}).items():
        if name != "sd_model_checkpoint" and (name not in FIXED_OPTIONS or FIXED_OPTIONS[name] != value):
            raise A1111RequestError(
                f"override_settings.{name}", "only sd_model_checkpoint, or the values GET /sdapi/v1/options reports"
            )
    return request, payload


def checkpoint_id(title: str) -> str:
    """A checkpoint title (``"tiny-sd"``, or A1111's ``"name [hash]"``) as a catalog id."""
    return title.split(" [", 1)[0]


def requested_model(request: Txt2ImgRequest) -> str | None:
    """The catalog id of override_settings.sd_model_checkpoint; None for the server's default."""
    checkpoint = (request.override_settings or {}).get("sd_model_checkpoint")
    return checkpoint_id(str(checkpoint)) if checkpoint else None


def sampler_scheduler(sampler: str, family: Family | None) -> str:
    """Our scheduler for an A1111 sampler on a model of ``family`` (None: a DDPM family's)."""
    if family is None or not family.flow_matching:
        return SAMPLERS[sampler][0]
    if sampler not in FLOW_MATCHING_SAMPLERS:
        raise A1111RequestError(
            "sampler_name",
            f"sampler '{sampler}' does not fit a {family.name} model; it takes {', '.join(FLOW_MATCHING_SAMPLERS)}",
        )
    return FLOW_MATCHING_SAMPLERS[sampler]


@dataclass(frozen=True)
class LoraTag:
    """One ``<lora:NAME:SCALE>`` of a prompt: the name it gives and the strength."""

    name: str
    scale: float


def read_lora_tags(prompt: str) -> tuple[str, list[LoraTag]]:
    """``prompt`` without its extra-network tags, and its LoRA tags in order, as A1111 reads them (the tags are
    removed and nothing else: the spaces around them stay). A tag of another kind (``<hypernet:...>``) is
    refused with A1111RequestError: this server has nothing to apply it with."""
    tags = []

    def take(match: re.Match) -> str:
        if match[1] not in LORA_TAG_TYPES:
            raise A1111RequestError(
                "prompt",
                f"{match[0]}: extra networks of type '{match[1]}' are not supported; LoRAs are (<lora:NAME:SCALE>)",
            )
        tags.append(lora_tag(match[0], match[2].split(":")))
        return ""

    return EXTRA_NETWORK_TAG.sub(take, prompt), tags


def lora_tag(tag: str, items: list[str]) -> LoraTag:
    """A LoRA tag's arguments as A1111's Lora extension reads them: the name, then the strength (or ``te=``)
    and the UNet's (or ``unet=``, the same unless given), then ``dyn``. One strength is applied to both here,
    so a different UNet strength, or a ``dyn``, is refused."""
    named = dict(item.split("=", 1) for item in items if item.count("=") == 1)
    positional = [item for item in items if item.count("=") != 1]
    if not positional or not positional[0]:
        raise A1111RequestError("prompt", f"{tag}: the tag names no LoRA; write <lora:NAME:SCALE>")
    if len(positional) > 3 or "dyn" in named:
        raise A1111RequestError("prompt", f"{tag}: a dyn dimension is not supported; write <lora:NAME:SCALE>")
    strength = named.get("te", positional[1] if len(positional) > 1 else "1")
    scale = tag_number(tag, strength)
    if tag_number(tag, named.get("unet", positional[2] if len(positional) > 2 else strength)) != scale:
        raise A1111RequestError(
            "prompt", f"{tag}: a UNet strength apart from the text encoder's is not supported; give one strength"
        )
    return LoraTag(positional[0], scale)


def tag_number(tag: str, text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise A1111RequestError("prompt", f"{tag}: the strength {text!r} is not a number") from None


def safetensors_metadata(path: Path) -> dict[str, Any]:
    """A safetensors file's ``__metadata__`` as A1111 reads it (a value that is a JSON object is parsed), from
    the header alone; empty when the file cannot be read."""
    try:
        with safe_open(str(path), framework="numpy") as weights:
            metadata = weights.metadata() or {}
    except (OSError, SafetensorError):
        return {}
    return {name: json_object_or_text(value) for name, value in metadata.items()}


def json_object_or_text(value: str) -> Any:
    if not value.startswith("{"):
        return value
    try:
        return json.loads(value)
    except ValueError:
        return value


def a1111_lora(entry: CatalogEntry) -> dict[str, Any]:
    """A LoRA catalog entry as A1111's ``/sdapi/v1/loras`` lists one: ``name`` (the catalog id, which a tag
    names), ``alias`` (the file's ``ss_output_name``, kohya's name for it, else the name), ``path`` and the
    file's ``metadata``."""
    path = lora_weights_file(entry)
    metadata = safetensors_metadata(path)
    return {
        "name": entry.id,
        "alias": metadata.get("ss_output_name", entry.id),
        "path": str(path),
        "metadata": metadata,
    }


def lora_entries(catalog: Iterable[CatalogEntry]) -> list[CatalogEntry]:
    return [entry for entry in catalog if entry.method == "lora"]


def lora_weights(tags: list[LoraTag], catalog: Catalog | None) -> list[dict[str, Any]]:
    """The tags as a request's ``loras``: each name a catalog id, else the A1111 alias of a LoRA in
    ``catalog`` (the first one's, in catalog order). A name that is neither is passed on as it is, for the
    engine to refuse naming it, with the ids close to it."""
    known = catalog is None or all(tag.name in catalog for tag in tags)
    aliases = {} if known else {lora["alias"]: lora["name"] for lora in map(a1111_lora, lora_entries(catalog)[::-1])}
    return [
        {"model": tag.name if known or tag.name in catalog else aliases.get(tag.name, tag.name), "scale": tag.scale}
        for tag in tags
    ]


def generation_request(
    request: Txt2ImgRequest, family: Family | None = None, catalog: Catalog | None = None
) -> GenerationRequest:
    """One request for all ``batch_size * n_iter`` images of a model of ``family``; seed -1 draws a random
    seed as A1111 does. The prompt's LoRA tags become ``loras``, their names read against ``catalog``."""
    prompt, tags = (request.prompt, []) if request.disable_extra_networks else read_lora_tags(request.prompt)
    fields = {
        "model": requested_model(request),
        "prompt": prompt,
        "negative_prompt": request.negative_prompt or None,
        "width": request.width,
        "height": request.height,
        "num_inference_steps": request.steps,
        "guidance_scale": request.cfg_scale,
        "seed": random.randrange(SEED_RANGE) if request.seed == -1 else request.seed,
        "scheduler": sampler_scheduler(request.sampler, family),
        "num_images": request.batch_size * request.n_iter,
        "prompt_syntax": "a1111",  # what A1111 clients write
        "loras": lora_weights(tags, catalog),
    }
    return GenerationRequest(**{name: value for name, value in fields.items() if value is not None})


def txt2img_response(
    request: Txt2ImgRequest,
    payload: dict[str, Any],
    generation: GenerationRequest,
    result: GenerationResult,
    model: str,
) -> dict[str, Any]:
    """A1111's answer: ``images``, ``parameters`` (the request as sent, with defaults) and ``info`` (a JSON string)."""
    sampler = request.sampler
    recipes = result_recipes(result)
    texts = [parameters_text(recipe) for recipe in recipes]
    count = len(result.seeds)
    info = {
        "prompt": request.prompt,  # as sent: A1111 keeps the <lora:...> tags in the prompts it reports
        "all_prompts": [request.prompt] * count,
        "negative_prompt": request.negative_prompt or "",
        "all_negative_prompts": [request.negative_prompt or ""] * count,
        "seed": result.seeds[0],
        "all_seeds": result.seeds,
        "subseed": -1,
        "all_subseeds": [-1] * count,
        "width": generation.width,
        "height": generation.height,
        "sampler_name": sampler,
        "cfg_scale": generation.guidance_scale,
        "steps": generation.num_inference_steps,
        "batch_size": request.batch_size,
        "n_iter": request.n_iter,
        "sd_model_name": model,
        "sd_model_hash": None,
        "index_of_first_image": 0,
        "infotexts": texts,
        "job_timestamp": time.strftime("%Y%m%d%H%M%S"),
    }
    images = (
        [image_base64(image, "png", metadata=recipe_metadata(recipe)) for image, recipe in zip(result.images, recipes)]
        if request.send_images
        else []
    )
    used = {"steps": generation.num_inference_steps, "cfg_scale": generation.guidance_scale}
    parameters = {**request.model_dump(), **payload, **used, "sampler_name": sampler}
    return {"images": images, "parameters": parameters, "info": json.dumps(info)}


# One ``Name: value`` of an infotext's last line, as A1111 parses it (a value may be a quoted string).
INFOTEXT_FIELD = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')


def parse_infotext(text: str) -> dict[str, str]:
    """An infotext as A1111's ``parameters``: ``Prompt``, ``Negative prompt``, each ``Name: value`` of the
    last line (as text), and ``Size`` as ``Size-1`` and ``Size-2``."""
    *prompt_lines, last = text.strip().split("\n")
    found = INFOTEXT_FIELD.findall(last)
    fields = dict(found) if len(found) >= 3 else {}  # a last line of settings, not a prompt with a colon
    if not fields:
        prompt_lines.append(last)
    negative = [line for line in prompt_lines if line.startswith("Negative prompt:")]
    prompt = [line for line in prompt_lines if not line.startswith("Negative prompt:")]
    parameters = {"Prompt": "\n".join(prompt), "Negative prompt": negative[0][16:].strip() if negative else ""}
    for name, value in fields.items():
        width, _, height = value.partition("x")
        if name == "Size" and width.isdigit() and height.isdigit():
            parameters.update({"Size-1": width, "Size-2": height})
        else:
            parameters[name] = value
    return parameters


def decoded_image(payload: dict[str, Any]) -> bytes:
    """The bytes of a request's ``image``: base64, or a ``data:`` URL of it, as A1111 takes them."""
    image = payload.get("image")
    if not isinstance(image, str) or not image.strip():
        raise A1111RequestError("image", "a base64-encoded image is required")
    encoded = image.strip().partition(",")[2] if image.startswith("data:") else image.strip()
    try:
        return base64.b64decode(encoded, validate=True)
    except binascii.Error:
        raise A1111RequestError("image", "is not valid base64") from None


def png_info(body: bytes) -> dict[str, Any]:
    """A1111's ``/png-info`` answer: ``info`` (the infotext), ``items`` (the image's other text records,
    the ``txt2img`` recipe among them) and ``parameters`` (the infotext parsed)."""
    metadata = image_metadata(decoded_image(read_json_object(body)))
    if metadata is None:
        raise A1111RequestError("image", "is not an image this server can read (PNG, JPEG or WebP)")
    info = metadata.pop(PARAMETERS_KEY, "")
    return {"info": info, "items": metadata, "parameters": parse_infotext(info)}


class A1111ErrorBody(BaseModel):
    """A1111's error answer."""

    error: str = Field(description="The kind of error.")
    detail: str = Field(description="What is wrong, for a person to read.")
    body: str
    errors: str


# A1111 answers a field it cannot honour, or a broken limit, with 422 where our routes say 400.
A1111_UNPROCESSABLE = "A field this server cannot honour, a value it refuses, or a configured limit broken."


def a1111_error_answers(*statuses: int) -> dict[int, dict[str, Any]]:
    """The OpenAPI ``responses`` for these error statuses of an A1111 route."""
    meanings = {**GENERATION_ERRORS, 422: A1111_UNPROCESSABLE}
    return {status: {"description": meanings[status], "model": A1111ErrorBody} for status in statuses}


def a1111_error_response(error: Exception) -> JSONResponse:
    """Any error of the A1111 routes in A1111's shape ``{"error", "detail", "body", "errors"}``.

    A field this server cannot honour, and a broken limit, answer 422 as A1111's validation does;
    other errors keep the status our own routes give them.
    """
    if isinstance(error, A1111RequestError):
        status, message, headers = 422, str(error), {}
    else:
        answer = error_answer(error)
        _, message = answer.reworded(A1111_NAMES)
        status = 422 if answer.status == 400 else answer.status
        headers = answer.headers
    body = {"error": type(error).__name__, "detail": message, "body": "", "errors": message}
    return ErrorJSONResponse(body, status_code=status, headers=headers)


def sd_model(entry: CatalogEntry) -> dict[str, Any]:
    """A catalog entry as an A1111 checkpoint. The title is the catalog id, which override_settings takes;
    hash and sha256 are null, as A1111 reports checkpoints it has not hashed."""
    return {
        "title": entry.id,
        "model_name": entry.id,
        "hash": None,
        "sha256": None,
        "filename": entry.artifact or entry.hf_repo or entry.id,
        "config": None,
    }


def samplers() -> list[dict[str, Any]]:
    return [
        {"name": name, "aliases": aliases, "options": {"scheduler": scheduler}}
        for name, (scheduler, aliases) in SAMPLERS.items()
    ]


def options(default_model: str) -> dict[str, Any]:
    return {"sd_model_checkpoint": default_model, **FIXED_OPTIONS}


def check_options_unchanged(body: bytes, default_model: str) -> None:
    """``POST /sdapi/v1/options`` may only repeat what the server has: its settings are fixed for every client.

    A client picks a model per request with ``override_settings.sd_model_checkpoint`` instead.
    """
    current = options(default_model)
    for name, value in read_json_object(body).items():
        if name == "sd_model_checkpoint" and checkpoint_id(str(value)) == default_model:
            continue
        if current.get(name, ANY) != value:
            raise A1111RequestError(
                name,
                "this server's options are fixed (it serves many clients); choose the model of a request "
                "with override_settings.sd_model_checkpoint",
            )


def progress(running: CallProgress | None, waiting: int) -> dict[str, Any]:
    """A1111's progress report for the pipeline call running now; ``eta_relative`` in seconds."""
    done, total = (running.steps_done, running.total_steps) if running else (0, 0)
    fraction = done / total if total else 0.0
    elapsed = time.monotonic() - running.started if running else 0.0
    eta = elapsed / fraction * (1 - fraction) if fraction else 0.0
    state = {
        "skipped": False,
        "interrupted": False,
        "stopping_generation": False,
        "job": "txt2img" if running else "",
        "job_count": waiting + (1 if running else 0),
        "job_timestamp": "0",
        "job_no": 0,
        "sampling_step": done,
        "sampling_steps": total,
    }
    return {
        "progress": fraction,
        "eta_relative": eta,
        "state": state,
        "current_image": None,
        "textinfo": None,
        "current_task": None,
    }


# The route reads its body with the one reader, to answer every error in A1111's format; this states it.
A1111_REQUEST_BODY = {
    "required": True,
    "content": {"application/json": {"schema": Txt2ImgRequest.model_json_schema()}},
}

# The service's own /docs.json documents these routes; the app serves no documents of its own.
a1111_app = FastAPI(title="txt2img AUTOMATIC1111 API", docs_url=None, redoc_url=None, openapi_url=None)
add_error_handlers(a1111_app, a1111_error_response, A1111RequestError)


@a1111_app.post(
    "/txt2img",
    openapi_extra={"requestBody": A1111_REQUEST_BODY},
    responses=a1111_error_answers(422, 403, 404, 413, 429, 503, 504),
)
async def a1111_txt2img(request: Request, engine: Engine = Depends(current_engine)) -> Response:
    """AUTOMATIC1111's txt2img; errors in A1111's shape."""
    a1111_request, payload = parse_txt2img(await request.body())
    entry = engine.manager.entry(requested_model(a1111_request) or engine.settings.model)
    # Resolved first, so that the answer's parameters and infotext say which defaults were used.
    catalog = engine.manager.catalog
    _, generation = engine.resolve(generation_request(a1111_request, family(entry.family), catalog))
    [result] = await engine.generate([generation], request.is_disconnected)
    return JSONResponse(txt2img_response(a1111_request, payload, generation, result, generation.model))


@a1111_app.get("/sd-models")
def a1111_sd_models(engine: Engine = Depends(current_engine)) -> list:
    """The catalog, fine-tunes included, as A1111 checkpoints."""
    return [sd_model(entry) for entry in engine.manager.catalog]


@a1111_app.get("/loras")
def a1111_loras(engine: Engine = Depends(current_engine)) -> list:
    """The catalog's LoRA fine-tunes, as A1111 lists its LoRA files: ``name`` (what ``<lora:NAME:SCALE>``
    names), ``alias``, ``path`` and the file's ``metadata``."""
    engine.manager.refresh_catalog()
    return [a1111_lora(entry) for entry in lora_entries(engine.manager.catalog)]


@a1111_app.post("/refresh-loras")
def a1111_refresh_loras(engine: Engine = Depends(current_engine)) -> None:
    """Re-read the catalog, as A1111 re-reads its LoRA folder."""
    engine.manager.refresh_catalog()


@a1111_app.get("/samplers")
def a1111_samplers() -> list:
    """Our schedulers under A1111's sampler names."""
    return samplers()


@a1111_app.get("/schedulers")
def a1111_schedulers() -> list:
    """A1111's noise schedules: only "automatic", each sampler's own."""
    return [{"name": "automatic", "label": "Automatic", "aliases": None}]


@a1111_app.get("/options")
def a1111_options(engine: Engine = Depends(current_engine)) -> dict:
    """The settings A1111 clients read; sd_model_checkpoint is the server's default model."""
    return options(engine.settings.model)


@a1111_app.post("/options", responses=a1111_error_answers(422))
async def a1111_set_options(request: Request, engine: Engine = Depends(current_engine)) -> None:
    """Accepted only when it changes nothing; a request picks its model with override_settings."""
    check_options_unchanged(await request.body(), engine.settings.model)


@a1111_app.get("/progress")
def a1111_progress(engine: Engine = Depends(current_engine)) -> dict:
    """The running pipeline call: progress 0..1, steps and an ETA in seconds."""
    return progress(engine.queue.running(), engine.queue.depth())


@a1111_app.get("/scripts")
def a1111_scripts() -> dict:
    """No scripts or extensions here; clients ask before sending their arguments."""
    return {"txt2img": [], "img2img": []}


@a1111_app.post("/png-info", responses=a1111_error_answers(422))
async def a1111_png_info(request: Request) -> dict:
    """What an image carries: its infotext (``info``), other text records (``items``, our ``txt2img``
    recipe among them) and the infotext parsed (``parameters``), as A1111's PNG Info reads them."""
    return png_info(await request.body())
