"""The one definition of a generation request (shared by every route and ``txt2img generate``), of what
``/images`` answers, and of the limits every request is held to.

The type policy is strict, on every route: a field takes a value of its own JSON type only
(``"steps": "5"`` and ``"seed": true`` are refused, never coerced), an integer field takes JSON
integers only, and text is Unicode scalar values only (serving/json_body.py).
"""

from __future__ import annotations

import random
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator

from serving.json_body import text_problem
from serving.settings import ServingSettings
from txt2img.errors import InputError

# The one list of schedulers a request may name, each with its diffusers class: the request models, the
# generation code, AUTOMATIC1111's sampler names and the playground (through /ui/api/catalog) read it.
SCHEDULER_CLASSES = {
    "ddim": "DDIMScheduler",
    "pndm": "PNDMScheduler",
    "euler": "EulerDiscreteScheduler",
    "euler-a": "EulerAncestralDiscreteScheduler",
    "dpm++": "DPMSolverMultistepScheduler",
    "unipc": "UniPCMultistepScheduler",
    "lms": "LMSDiscreteScheduler",
}
SchedulerName = Literal[tuple(SCHEDULER_CLASSES)]
# How a prompt is read (serving/prompts.py): "plain" passes it to the text encoder as written; "a1111" reads
# AUTOMATIC1111's weights ("(word:1.2)", "(word)", "[word]") and encodes a prompt past the encoder's 77
# tokens in chunks. /sdapi/v1 always reads a1111; every other route reads plain unless asked.
PromptSyntax = Literal["plain", "a1111"]
ImageFormat = Literal["png", "jpeg"]
# Seeds: torch takes any below 2**63, so every image's seed (seed + i) must stay below it. Random seeds are
# drawn below 2**32, as AUTOMATIC1111 draws them: exact in JavaScript and easy to read back.
SEED_END = 2**63
RANDOM_SEED_END = 2**32


def valid_text(text: str) -> str:
    problem = text_problem(text)
    if problem:
        raise ValueError(f"{problem}; send valid Unicode text")
    return text


# Text a tokenizer can read: what a pipeline would refuse mid-batch is refused at the door.
Text = Annotated[str, AfterValidator(valid_text)]


class GenerationSettings(BaseModel):
    """What to generate, apart from how many: a prompt, the model and the sampling settings."""

    model_config = ConfigDict(extra="forbid", strict=True)

    model: Text | None = Field(None, description="Catalog id; defaults to the server's TXT2IMG_MODEL.")
    prompt: Text = Field(min_length=1)
    negative_prompt: Text | None = None
    width: int | None = Field(None, gt=0, multiple_of=8, description="Pixels; defaults to the model's native size.")
    height: int | None = Field(None, gt=0, multiple_of=8, description="Pixels; defaults to the model's native size.")
    num_inference_steps: int = Field(25, ge=1)
    # Finite and bounded: an infinite or huge scale is accepted by the pipeline and yields a black image.
    guidance_scale: float = Field(
        7.5, ge=0, le=50, allow_inf_nan=False, description="Classifier-free guidance; 1 or less disables it."
    )
    seed: int | None = Field(
        None,
        ge=0,
        lt=SEED_END,
        description="Seed of the first image; image i uses seed + i, below 2**63. Random (below 2**32) when absent.",
    )
    scheduler: SchedulerName | None = Field(None, description="Sampler; defaults to the model's own.")
    prompt_syntax: PromptSyntax = Field(
        "plain",
        description="'a1111' reads AUTOMATIC1111's (word:1.2), (word) and [word] weights and prompts past 77 "
        "tokens; 'plain' passes the prompts as written.",
    )
    format: ImageFormat = "png"


class ImageRequest(GenerationSettings):
    """One image (``POST /txt2img``, which answers with the image itself)."""

    @model_validator(mode="before")
    @classmethod
    def _one_image(cls, data: Any) -> Any:
        # Before /images existed, /txt2img took num_images; 1 still works, more points to the new route.
        if isinstance(data, dict) and "num_images" in data:
            if type(data["num_images"]) is not int or data["num_images"] != 1:  # strict: true is not 1
                raise ValueError(
                    f"num_images is {data['num_images']}, but POST /txt2img answers with one image; "
                    "POST /images takes the same body and answers with num_images base64 images"
                )
            data = {name: value for name, value in data.items() if name != "num_images"}
        return data


class GenerationRequest(GenerationSettings):
    """What to generate and how many images; ``/images``, ``/invocations`` and ``txt2img generate`` use it."""

    num_images: int = Field(1, ge=1)

    @model_validator(mode="after")
    def _seeds_in_range(self) -> GenerationRequest:
        if self.seed is not None and self.seed + self.num_images > SEED_END:
            raise ValueError(
                f"seed {self.seed} with {self.num_images} images would give seeds of 2**63 or more; "
                f"the last image's seed (seed + num_images - 1) must stay below 2**63"
            )
        return self

    def image_seeds(self) -> list[int]:
        """The seed of each image: ``seed``, ``seed + 1``, ...; a random start below 2**32 when no seed was given."""
        first = self.seed if self.seed is not None else random.randrange(RANDOM_SEED_END)
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


# The setting behind each limit check_limits holds a request to, by the field it names.
LIMIT_SETTINGS = {
    "num_inference_steps": "TXT2IMG_MAX_STEPS",
    "num_images": "TXT2IMG_MAX_IMAGES",
    "width*height": "TXT2IMG_MAX_PIXELS",
    "prompt": "TXT2IMG_MAX_PROMPT_LENGTH",
    "negative_prompt": "TXT2IMG_MAX_PROMPT_LENGTH",
    "work": "TXT2IMG_MAX_WORK",
}
# What a limit's field means, where its name alone does not say.
LIMIT_NOTES = {"work": " (work is width x height x steps x images; TXT2IMG_MAX_WORK sets the limit)"}


class LimitExceeded(InputError, ValueError):
    """A request asks for more than the server's configured limits allow."""

    def __init__(self, field: str, limit: int, value: int):
        self.field = field
        self.limit = limit
        self.value = value
        super().__init__(f"{field} is {value}, above the limit of {limit}{LIMIT_NOTES.get(field, '')}")

    def as_json(self) -> dict:
        return {"error": str(self), "field": self.field, "limit": self.limit, "value": self.value}


def work(width: int, height: int, steps: int, images: int) -> int:
    """What a request costs the device, in pixel-steps: width x height x steps x images."""
    return width * height * steps * images


def check_limits(request: GenerationRequest, settings: ServingSettings, width: int, height: int) -> None:
    """Raise LimitExceeded for the first field that breaks a limit; width and height are the resolved size."""
    checks = [
        ("num_inference_steps", settings.max_steps, request.num_inference_steps),
        ("num_images", settings.max_images, request.num_images),
        ("width*height", settings.max_pixels, width * height),
        ("work", settings.max_work, work(width, height, request.num_inference_steps, request.num_images)),
        ("prompt", settings.max_prompt_length, len(request.prompt)),
        ("negative_prompt", settings.max_prompt_length, len(request.negative_prompt or "")),
    ]
    for field, limit, value in checks:
        if value > limit:
            raise LimitExceeded(field, limit, value)
