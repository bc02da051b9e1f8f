"""SageMaker JumpStart's text-to-image wire format: requests parsed and checked, answers and errors rendered.

This one module speaks the format for both servers that speak it: the local ``POST /invocations``
route (serving/sagemaker_api.py) and the ``code/inference.py`` that ``txt2img deploy`` packs into a
model archive for the Hugging Face inference container (jumpstart/inference_script.py). The packer
copies this file, the body reader and the image encoder it uses (serving/json_body.py,
serving/images.py) into the archive as ``code/serving/``, so they must import nothing but the
standard library, PIL and numpy (inside the function that makes RGB arrays): no other txt2img
module, no pydantic.

The contract, from JumpStart's txt2img spec (``predictor_specs``) and its example notebook:

* Content types: ``application/json``, an object with the keys in PARAMETER_NAMES, or
  ``application/x-text``, whose body is the prompt. Without a Content-Type the body is JSON (the
  container's rule; the local server requires a Content-Type, see serving/guard.py).
* Accept types: ``application/json;jpeg`` gives base64 JPEGs. It is the spec's default, so no
  Accept, ``*/*`` and ``application/*`` get it too. ``application/json`` and
  ``application/json;verbose`` give H x W x 3 arrays of RGB values.
* The answer is ``{"generated_images": [...], "prompt": <as sent>}``. An ``application/x-text``
  request gets ``{"generated_image": <one image>, "prompt": <the text>}``.
* Image k of an answer (each prompt in turn, ``num_images_per_prompt`` times) uses seed
  ``seed + k``, so every prompt of a list gets its own seeds. Without ``seed`` the first is random.
* An error is ``{"error": <message>}`` with the status of its InvocationError subclass.
* With a safety checker on (TXT2IMG_SAFETY_CHECKER), the answer adds ``"nsfw_content_detected"``,
  one boolean per image in answer order; a flagged image is black. JumpStart clients ignore the key.
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass, field

from serving.images import image_base64
from serving.json_body import BodyError, json_type, read_json, utf8_text

JSON_CONTENT = "application/json"
TEXT_CONTENT = "application/x-text"
CONTENT_TYPES = (JSON_CONTENT, TEXT_CONTENT)
JPEG_ACCEPT = "application/json;jpeg"
ARRAY_ACCEPT = "application/json"
VERBOSE_ACCEPT = "application/json;verbose"
ACCEPT_TYPES = (ARRAY_ACCEPT, VERBOSE_ACCEPT, JPEG_ACCEPT)  # the spec's supported_accept_types
DEFAULT_ACCEPT = JPEG_ACCEPT  # the spec's default_accept_type
WILDCARD_ACCEPTS = ("*/*", "application/*")  # any of ACCEPT_TYPES would do, so the default answers
_PROMPTS = {"oneOf": [{"type": "string", "minLength": 1}, {"type": "array", "items": {"type": "string"}}]}
_SIZE = {"type": "integer", "minimum": 8, "multipleOf": 8}
# JumpStart's script leaves absent fields to the pipeline; here the model's family (catalog/families.py)
# fills them, on the local server and in the packed script alike: 50 steps and 7.5 for Stable Diffusion.
_FAMILY_DEFAULT = "Defaults to the model family's (50 steps and guidance 7.5 for Stable Diffusion 1 and 2)."
# The application/json body as JSON Schema (OpenAPI 3.0 flavour), stated once: the local server's
# OpenAPI document shows it, and its keys are the parameters both servers accept.
REQUEST_SCHEMA = {
    "type": "object",
    "additionalProperties": False,
    "required": ["prompt"],
    "properties": {
        "prompt": _PROMPTS,
        "width": _SIZE,
        "height": _SIZE,
        "num_inference_steps": {"type": "integer", "minimum": 1, "description": _FAMILY_DEFAULT},
        "guidance_scale": {"type": "number", "description": _FAMILY_DEFAULT},
        "negative_prompt": _PROMPTS,
        "num_images_per_prompt": {"type": "integer", "minimum": 1, "default": 1},
        "seed": {"type": "integer", "minimum": 0},
        "batch_size": {"type": "integer", "minimum": 1, "default": 1},
        "eta": {"type": "number"},
        # serving/schema.py's PromptSyntax (this file cannot import it: it runs alone in the container, which
        # serves plain prompts only); tests/test_prompt_syntax.py holds the two lists equal.
        "prompt_syntax": {"type": "string", "enum": ["plain", "a1111"], "default": "plain"},
        # serving/schema.py's LoraWeight, as above; the container serves one model and refuses them.
        "loras": {
            "type": "array",
            "items": {
                "type": "object",
                "additionalProperties": False,
                "required": ["model"],
                "properties": {
                    "model": {"type": "string", "minLength": 1, "description": "A LoRA's catalog id."},
                    "scale": {"type": "number", "minimum": -4, "maximum": 4, "default": 1.0},
                },
            },
            "default": [],
        },
    },
}
PARAMETER_NAMES = tuple(REQUEST_SCHEMA["properties"])
SEED_END = 2**63  # image seeds stay below it: torch takes them, and so does the local server
RANDOM_SEED_END = 2**32  # random first seeds, as the local server draws them
JPEG_QUALITY = 90


class InvocationError(ValueError):
    """A request outside the contract; the message names the problem, ``status`` is its HTTP status."""

    status = 400

    def as_json(self) -> dict:
        return {"error": str(self)}


class UnsupportedContentType(InvocationError):
    status = 415


class NotAcceptable(InvocationError):
    status = 406


@dataclass(frozen=True)
class WantedImage:
    """One image of an answer: what to draw and from which seed."""

    prompt: str
    negative_prompt: str | None
    seed: int


@dataclass(frozen=True)
class Invocation:
    """A request that keeps the contract, with JumpStart's defaults filled in."""

    prompt: str | list[str]  # as sent: the answer echoes it
    negative_prompt: str | list[str] | None
    width: int | None  # None: the model's native size
    height: int | None
    num_inference_steps: int | None  # None: the model family's default
    guidance_scale: float | None  # 1 or less turns guidance, and so the negative prompt, off; None: the family's
    num_images_per_prompt: int
    seed: int | None
    batch_size: int  # prompts per pipeline call in the container; the local server batches on its own
    one_image: bool  # application/x-text: the answer holds one ``generated_image``
    prompt_syntax: object = (
        "plain"  # as sent: the local server's GenerationRequest checks it, the container refuses a1111
    )
    # As sent, like prompt_syntax, null included: the local server's GenerationRequest checks it (strictly, as
    # /images does), the container refuses anything but [].
    loras: object = field(default_factory=list)

    @property
    def prompts(self) -> list[str]:
        return [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)

    @property
    def image_count(self) -> int:
        return len(self.prompts) * self.num_images_per_prompt

    def wanted_images(self) -> list[WantedImage]:
        """Every image of the answer in order; image k uses ``seed + k``."""
        prompts = self.prompts
        if isinstance(self.negative_prompt, list):
            negatives = self.negative_prompt
        else:
            negatives = [self.negative_prompt] * len(prompts)
        first = self.seed if self.seed is not None else random.randrange(RANDOM_SEED_END)
        pairs = [pair for pair in zip(prompts, negatives) for _ in range(self.num_images_per_prompt)]
        return [WantedImage(prompt, negative, first + k) for k, (prompt, negative) in enumerate(pairs)]


def _split_media_type(value: str) -> tuple[str, list[str]]:
    """``"Application/JSON; jpeg"`` -> ``("application/json", ["jpeg"])``."""
    parts = [part.strip().lower() for part in value.split(";")]
    return parts[0], [part for part in parts[1:] if part]


def negotiate_accept(accept: str | None) -> str:
    """The accept type (one of ACCEPT_TYPES) to answer ``accept`` with; the first supported alternative wins."""
    if accept is None or not accept.strip():
        return DEFAULT_ACCEPT
    for alternative in accept.split(","):
        media_type, parameters = _split_media_type(alternative)
        flags = {parameter for parameter in parameters if not parameter.startswith("q=")}
        if media_type in WILDCARD_ACCEPTS and not flags:
            return DEFAULT_ACCEPT
        if media_type == JSON_CONTENT and flags <= {"jpeg", "verbose"}:
            if "jpeg" in flags:
                return JPEG_ACCEPT
            return VERBOSE_ACCEPT if flags else ARRAY_ACCEPT
    raise NotAcceptable(f"unsupported accept type '{accept}'; use one of: {', '.join(ACCEPT_TYPES)}")


def unsupported_content_type(content_type: str, accepted: tuple[str, ...] = CONTENT_TYPES) -> str | None:
    """Why a body of ``content_type`` is refused where the media types ``accepted`` are taken, UTF-8 only;
    None when it is taken. The local server refuses bodies on every route with these words
    (serving/guard.py), so both servers say the same to the same request."""
    media_type, parameters = _split_media_type(content_type)
    if media_type not in accepted:
        return f"unsupported content type '{content_type}'; use one of: {', '.join(accepted)}"
    charsets = {parameter.split("=", 1)[1].strip('"') for parameter in parameters if parameter.startswith("charset=")}
    if charsets - {"utf-8", "utf8"}:
        return f"unsupported charset in content type '{content_type}'; send UTF-8"
    return None


def parse_request(body: bytes | str, content_type: str | None) -> Invocation:
    """Check a request body against the contract; raises InvocationError naming the first problem.
    Without a content type the body is JSON, as SageMaker's container reads it (the local server
    requires one: serving/guard.py)."""
    content_type = content_type or JSON_CONTENT
    problem = unsupported_content_type(content_type)
    if problem is not None:
        raise UnsupportedContentType(problem)
    media_type, _ = _split_media_type(content_type)
    what = f"the {media_type} body"
    try:
        if media_type == TEXT_CONTENT:
            text = utf8_text(body, what)
            if not text:
                raise InvocationError("the application/x-text body is empty; it must be the prompt")
            return _invocation({"prompt": text}, one_image=True)
        payload = read_json(body, what)
    except BodyError as error:  # the reader's refusals, answered in this format
        raise InvocationError(str(error)) from None
    if not isinstance(payload, dict):
        raise InvocationError(f"the JSON body must be an object, not {json_type(payload)}")
    unknown = sorted(set(payload) - set(PARAMETER_NAMES))
    if unknown:
        raise InvocationError(f"unknown parameter(s) {unknown}; allowed: {list(PARAMETER_NAMES)}")
    return _invocation(payload, one_image=False)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _int_at_least(payload: dict, name: str, least: int, default: int | None) -> int | None:
    value = payload.get(name)
    if value is None:
        return default
    if not _is_int(value) or value < least:
        raise InvocationError(f"'{name}' must be an integer >= {least}, not {json.dumps(value)[:40]}")
    return value


def _number(payload: dict, name: str, default: float | None) -> float | None:
    value = payload.get(name)
    if value is None:
        return default
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise InvocationError(f"'{name}' must be a number, not {json.dumps(value)[:40]}")
    try:
        number = float(value)
    except OverflowError:  # an integer beyond any float
        number = math.inf
    if not math.isfinite(number):  # JSON as Python reads it has NaN, Infinity and 1e999
        raise InvocationError(f"'{name}' must be a finite number")
    return number


def _prompt_list(payload: dict, name: str, required: bool) -> str | list[str] | None:
    value = payload.get(name)
    if value is None and not required:
        return None
    if isinstance(value, str) and (value or not required):
        return value
    if isinstance(value, list) and value and all(isinstance(item, str) and (item or not required) for item in value):
        return value
    if required:
        raise InvocationError(f"'{name}' must be a non-empty string or a non-empty list of non-empty strings")
    raise InvocationError(f"'{name}' must be a string or a non-empty list of strings")


def _invocation(payload: dict, one_image: bool) -> Invocation:
    prompt = _prompt_list(payload, "prompt", required=True)
    negative = _prompt_list(payload, "negative_prompt", required=False)
    if isinstance(negative, list) and (not isinstance(prompt, list) or len(negative) != len(prompt)):
        raise InvocationError("a list 'negative_prompt' needs a 'prompt' list of the same length")
    sizes = {}
    for name in ("width", "height"):
        value = payload.get(name)
        if value is not None and (not _is_int(value) or value < 8 or value % 8):
            raise InvocationError(f"'{name}' must be an integer divisible by 8, not {json.dumps(value)[:40]}")
        sizes[name] = value
    _number(payload, "eta", None)  # checked as JumpStart checks it, then left out: see docs/serving.md
    invocation = Invocation(
        prompt=prompt,
        negative_prompt=negative,
        width=sizes["width"],
        height=sizes["height"],
        num_inference_steps=_int_at_least(payload, "num_inference_steps", 1, None),
        guidance_scale=_number(payload, "guidance_scale", None),
        num_images_per_prompt=_int_at_least(payload, "num_images_per_prompt", 1, 1),
        seed=_int_at_least(payload, "seed", 0, None),
        batch_size=_int_at_least(payload, "batch_size", 1, 1),
        one_image=one_image,
        prompt_syntax=payload.get("prompt_syntax", "plain"),
        loras=payload.get("loras", []),
    )
    if invocation.seed is not None and invocation.seed + invocation.image_count > SEED_END:
        raise InvocationError(
            f"'seed' is too large: image seeds (seed + k) must stay below 2**63, got {invocation.seed}"
        )
    return invocation


def encode_image(image, accept_type: str, metadata: dict[str, str] | None = None):
    """A PIL image as the accept type wants it: a base64 JPEG string (``metadata``, its recipe, in EXIF),
    or nested lists of RGB values."""
    if accept_type == JPEG_ACCEPT:
        return image_base64(image, "jpeg", quality=JPEG_QUALITY, metadata=metadata)
    import numpy as np

    return np.asarray(image.convert("RGB"), dtype=np.uint8).tolist()


def render_response(
    invocation: Invocation,
    images: list,
    accept_type: str,
    nsfw_content_detected: list[bool] | None = None,
    metadata: list[dict[str, str]] | None = None,
) -> str:
    """The JSON answer to ``invocation``: its images, in wanted_images order, encoded for ``accept_type``
    (each with its ``metadata`` when given), and the safety checker's verdict on each when one ran."""
    metadata = metadata or [None] * len(images)
    encoded = [encode_image(image, accept_type, recipe) for image, recipe in zip(images, metadata)]
    if invocation.one_image:
        answer = {"generated_image": encoded[0], "prompt": invocation.prompt}
    else:
        answer = {"generated_images": encoded, "prompt": invocation.prompt}
    if nsfw_content_detected is not None:
        answer["nsfw_content_detected"] = nsfw_content_detected
    return json.dumps(answer)


def render_error(error: InvocationError) -> str:
    return json.dumps(error.as_json())
