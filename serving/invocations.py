"""SageMaker JumpStart's txt2img wire format, mapped onto our GenerationRequest and back.

A JumpStart client sends ``application/json`` (the fields below) or ``application/x-text`` (the raw
prompt) to ``POST /invocations`` and reads ``{"generated_images": [...], "prompt": ...}``; the images
are RGB arrays for ``Accept: application/json`` and base64 JPEGs for ``application/json;jpeg``.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from serving.images import image_base64, image_rgb_array
from serving.schema import GenerationRequest

JSON_CONTENT = "application/json"
TEXT_CONTENT = "application/x-text"
ACCEPT_TYPES = ("application/json", "application/json;jpeg", "application/json;verbose")

ImageEncoding = Literal["rgb-array", "jpeg"]


class UnsupportedMediaType(ValueError):
    """A request body's content type outside JumpStart's contract (HTTP 415)."""


class MalformedBody(ValueError):
    """A request body that is not valid UTF-8 JSON (HTTP 400)."""


class UnacceptableMediaType(ValueError):
    """An ``Accept`` type outside JumpStart's contract (HTTP 406)."""


class JumpStartPayload(BaseModel):
    """The JSON body of a JumpStart txt2img request; unknown keys are refused, as JumpStart does."""

    model_config = ConfigDict(extra="forbid")

    prompt: str | Annotated[list[Annotated[str, Field(min_length=1)]], Field(min_length=1)] = Field(min_length=1)
    width: int | None = Field(None, gt=0, multiple_of=8)
    height: int | None = Field(None, gt=0, multiple_of=8)
    num_inference_steps: int | None = Field(None, ge=1)
    guidance_scale: float | None = None
    negative_prompt: str | list[str] | None = None
    num_images_per_prompt: int = Field(1, ge=1)
    seed: int | None = Field(None, ge=0)
    batch_size: int = Field(1, ge=1, description="Accepted for compatibility; the server batches on its own.")
    eta: float | None = None

    @model_validator(mode="after")
    def _negatives_match_prompts(self) -> JumpStartPayload:
        if isinstance(self.negative_prompt, list) and (
            not isinstance(self.prompt, list) or len(self.negative_prompt) != len(self.prompt)
        ):
            raise ValueError("a list negative_prompt needs a prompt list of the same length")
        return self

    def generation_requests(self, model: str | None) -> list[GenerationRequest]:
        """One GenerationRequest per prompt, each asking for ``num_images_per_prompt`` images."""
        prompts = self.prompt if isinstance(self.prompt, list) else [self.prompt]
        if isinstance(self.negative_prompt, list):
            negatives = self.negative_prompt
        else:
            negatives = [self.negative_prompt] * len(prompts)
        # guidance_scale <= 1 disables guidance in JumpStart; ours too, clamped to our lower bound.
        guidance = None if self.guidance_scale is None else max(self.guidance_scale, 0.0)
        requests = []
        for index, (prompt, negative) in enumerate(zip(prompts, negatives)):
            fields = {
                "model": model,
                "prompt": prompt,
                "negative_prompt": negative,
                "width": self.width,
                "height": self.height,
                "num_inference_steps": self.num_inference_steps,
                "guidance_scale": guidance,
                "num_images": self.num_images_per_prompt,
                "seed": None if self.seed is None else self.seed + index * self.num_images_per_prompt,
            }
            requests.append(GenerationRequest(**{k: v for k, v in fields.items() if v is not None}))
        return requests


def parse_media_type(header: str | None, default: str) -> tuple[str, set[str]]:
    """The bare media type and its parameters, lowercase and without spaces."""
    parts = [part.strip().lower() for part in (header or default).split(";")]
    return parts[0], {part for part in parts[1:] if part}


def image_encoding(accept: str | None) -> ImageEncoding:
    """How ``Accept`` wants images encoded; raises UnacceptableMediaType for types JumpStart does not answer."""
    media_type, parameters = parse_media_type(accept, JSON_CONTENT)
    if media_type in ("*/*", "application/*"):
        media_type = JSON_CONTENT
    if media_type != JSON_CONTENT or not parameters <= {"jpeg", "verbose"}:
        raise UnacceptableMediaType(f"unsupported accept type '{accept}'; use one of: {', '.join(ACCEPT_TYPES)}")
    return "jpeg" if "jpeg" in parameters else "rgb-array"


def encode_images(images: list, encoding: ImageEncoding) -> list:
    if encoding == "jpeg":
        return [image_base64(image, "jpeg") for image in images]
    return [image_rgb_array(image) for image in images]


def parse_json_body(body: bytes) -> Any:
    try:
        return json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise MalformedBody(f"the body is not valid JSON: {error}") from error
