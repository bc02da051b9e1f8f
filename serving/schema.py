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

from catalog import families
from catalog.schema import CatalogEntry
from serving.json_body import text_problem
from serving.settings import ServingSettings
from txt2img.errors import InputError

# The one list of schedulers a request may name, each with its diffusers class, is the family table's: the
# request models, the generation code, AUTOMATIC1111's sampler names and the playground read it from here.
# Which of them a model can use is its family's (catalog/families.py); check_family refuses the others.
SCHEDULER_CLASSES = families.SCHEDULER_CLASSES
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


class LoraWeight(BaseModel):
    """A LoRA fine-tune applied on top of the request's model, at a strength (AUTOMATIC1111's ``<lora:NAME:SCALE>``)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    model: Text = Field(min_length=1, description="The LoRA's catalog id; its base must be the request's model.")
    # Bounded like A1111's slider range and then some: a huge scale is accepted by peft and yields noise.
    scale: float = Field(1.0, ge=-4, le=4, allow_inf_nan=False, description="Strength: 0 gives the base's image.")


class GenerationSettings(BaseModel):
    """What to generate, apart from how many: a prompt, the model and the sampling settings."""

    model_config = ConfigDict(extra="forbid", strict=True)

    model: Text | None = Field(None, description="Catalog id; defaults to the server's TXT2IMG_MODEL.")
    prompt: Text = Field(min_length=1)
    negative_prompt: Text | None = None
    width: int | None = Field(None, gt=0, multiple_of=8, description="Pixels; defaults to the model's native size.")
    height: int | None = Field(None, gt=0, multiple_of=8, description="Pixels; defaults to the model's native size.")
    num_inference_steps: int | None = Field(None, ge=1, description="Denoising steps; defaults to the model family's.")
    # Finite and bounded: an infinite or huge scale is accepted by the pipeline and yields a black image.
    guidance_scale: float | None = Field(
        None,
        ge=0,
        le=50,
        allow_inf_nan=False,
        description="Classifier-free guidance, 1 or less disables it; defaults to the model family's.",
    )
    true_cfg_scale: float | None = Field(
        None,
        ge=1,
        le=50,
        allow_inf_nan=False,
        description="Flux only: true classifier-free guidance, above 1, which a negative prompt needs there.",
    )
    seed: int | None = Field(
        None,
        ge=0,
        lt=SEED_END,
        description="Seed of the first image; image i uses seed + i, below 2**63. Random (below 2**32) when absent.",
    )
    scheduler: SchedulerName | None = Field(
        None, description="Sampler, one its model's family fits (GET /models lists them); defaults to the model's own."
    )
    loras: list[LoraWeight] = Field(
        default_factory=list,
        description="LoRA fine-tunes of the model to apply, each at its scale; at most TXT2IMG_MAX_LORAS.",
    )
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
    "loras": "TXT2IMG_MAX_LORAS",
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
        ("loras", settings.max_loras, len(request.loras)),
    ]
    for field, limit, value in checks:
        if value > limit:
            raise LimitExceeded(field, limit, value)


class FamilyRefusal(InputError, ValueError):
    """A request names a field or value its model's family cannot use; ``allowed`` says what it can."""

    def __init__(self, field: str, message: str, allowed: list):
        self.field = field
        self.allowed = allowed
        super().__init__(message)

    def as_json(self) -> dict:
        return {"error": str(self), "field": self.field, "allowed": self.allowed}


def check_family(request: GenerationSettings, entry: CatalogEntry) -> None:
    """Raise FamilyRefusal for the first field of ``request`` that ``entry``'s family cannot use."""
    family = families.family(entry.family)
    model = f"model '{entry.id}' (family {family.name})"
    if request.scheduler is not None and request.scheduler not in family.schedulers:
        allowed = list(family.schedulers)
        raise FamilyRefusal(
            "scheduler",
            f"scheduler '{request.scheduler}' does not fit {model}; it takes {', '.join(allowed)}, or none for its own",
            allowed,
        )
    if request.true_cfg_scale is not None and not family.true_cfg:
        raise FamilyRefusal(
            "true_cfg_scale",
            f"true_cfg_scale applies to Flux models only; {model} takes a negative prompt through guidance_scale",
            [None],
        )
    if request.negative_prompt and family.true_cfg and (request.true_cfg_scale or 1) <= 1:
        raise FamilyRefusal(
            "negative_prompt",
            f"negative_prompt applies to {model} only through true CFG (it is guidance-distilled): "
            "send true_cfg_scale above 1 with it (each step then runs twice)",
            ["true_cfg_scale > 1"],
        )


def with_model_defaults(request: GenerationRequest, entry: CatalogEntry) -> GenerationRequest:
    """``request`` checked against ``entry``'s family (check_family), with every field it left out given
    the model's default: its native size, and its family's steps and guidance."""
    check_family(request, entry)
    defaults = {"model": entry.id, **families.model_defaults(entry.family, entry.resolution)}
    missing = {name: value for name, value in defaults.items() if getattr(request, name) is None}
    return request.model_copy(update=missing)
