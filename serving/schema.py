"""The one definition of a generation request (shared by ``/txt2img``, ``/images``, ``/invocations`` and
``txt2img generate``) and of what ``/images`` answers."""

from __future__ import annotations

import random
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from serving.settings import ServingSettings
from txt2img.errors import InputError

SchedulerName = Literal["ddim", "pndm", "euler", "euler-a", "dpm++", "unipc", "lms"]
ImageFormat = Literal["png", "jpeg"]


class GenerationSettings(BaseModel):
    """What to generate, apart from how many: a prompt, the model and the sampling settings."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = Field(None, description="Catalog id; defaults to the server's TXT2IMG_MODEL.")
    prompt: str = Field(min_length=1)
    negative_prompt: str | None = None
    width: int | None = Field(None, gt=0, multiple_of=8, description="Pixels; defaults to the model's native size.")
    height: int | None = Field(None, gt=0, multiple_of=8, description="Pixels; defaults to the model's native size.")
    num_inference_steps: int = Field(25, ge=1)
    # Finite and bounded: an infinite or huge scale is accepted by the pipeline and yields a black image.
    guidance_scale: float = Field(
        7.5, ge=0, le=50, allow_inf_nan=False, description="Classifier-free guidance; 1 or less disables it."
    )
    seed: int | None = Field(
        None, ge=0, lt=2**63, description="Seed of the first image; image i uses seed + i. Random when absent."
    )
    scheduler: SchedulerName | None = Field(None, description="Sampler; defaults to the model's own.")
    format: ImageFormat = "png"


class ImageRequest(GenerationSettings):
    """One image (``POST /txt2img``, which answers with the image itself)."""

    @model_validator(mode="before")
    @classmethod
    def _one_image(cls, data: Any) -> Any:
        # Before /images existed, /txt2img took num_images; 1 still works, more points to the new route.
        if isinstance(data, dict) and "num_images" in data:
            if data["num_images"] != 1:
                raise ValueError(
                    f"num_images is {data['num_images']}, but POST /txt2img answers with one image; "
                    "POST /images takes the same body and answers with num_images base64 images"
                )
            data = {name: value for name, value in data.items() if name != "num_images"}
        return data


class GenerationRequest(GenerationSettings):
    """What to generate and how many images; ``/images``, ``/invocations`` and ``txt2img generate`` use it."""

    num_images: int = Field(1, ge=1)

    def image_seeds(self) -> list[int]:
        """The seed of each image: ``seed``, ``seed + 1``, ...; a random start when no seed was given."""
        first = self.seed if self.seed is not None else random.randrange(2**63 - self.num_images)
        return [first + index for index in range(self.num_images)]


class GeneratedImage(BaseModel):
    seed: int = Field(description="The seed that generated this image; send it back to get the same image.")
    image: str = Field(description="The encoded image (PNG or JPEG, as the request's format says), in base64.")
    nsfw_content_detected: bool | None = Field(
        None, description="The safety checker flagged it (it is black then); null while TXT2IMG_SAFETY_CHECKER is off."
    )


class GeneratedImages(BaseModel):
    """What ``POST /images`` answers: every image of the request with its seed, in seed order."""

    format: ImageFormat
    images: list[GeneratedImage]


def describe_validation_error(error) -> list[dict]:
    """pydantic's errors as ``{"field", "message"}`` pairs a person can read."""
    return describe_errors(error.errors(include_url=False, include_input=False, include_context=False))


def describe_errors(errors: list[dict]) -> list[dict]:
    """pydantic's error items (``loc``, ``msg``) as ``{"field", "message"}`` pairs."""
    return [{"field": ".".join(str(part) for part in item["loc"]), "message": item["msg"]} for item in errors]


class LimitExceeded(InputError, ValueError):
    """A request asks for more than the server's configured limits allow."""

    def __init__(self, field: str, limit: int, value: int):
        self.field = field
        self.limit = limit
        self.value = value
        super().__init__(f"{field} is {value}, above the limit of {limit}")

    def as_json(self) -> dict:
        return {"error": str(self), "field": self.field, "limit": self.limit, "value": self.value}


def check_limits(request: GenerationRequest, settings: ServingSettings, width: int, height: int) -> None:
    """Raise LimitExceeded for the first field that breaks a limit; width and height are the resolved size."""
    checks = [
        ("num_inference_steps", settings.max_steps, request.num_inference_steps),
        ("num_images", settings.max_images, request.num_images),
        ("width*height", settings.max_pixels, width * height),
        ("prompt", settings.max_prompt_length, len(request.prompt)),
        ("negative_prompt", settings.max_prompt_length, len(request.negative_prompt or "")),
    ]
    for field, limit, value in checks:
        if value > limit:
            raise LimitExceeded(field, limit, value)
