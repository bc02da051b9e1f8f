"""Images that carry their recipe: the settings that made an image, written into the image and read back.

Every image the service or ``txt2img generate`` writes embeds two records (serving/infotext.py formats them
and serving/images.py writes them):

* ``parameters``: AUTOMATIC1111's one-paragraph infotext, which A1111's "PNG Info", Civitai and
  ``/sdapi/v1/png-info`` read (``parameters_text`` is its one formatter);
* ``txt2img``: the Recipe as JSON, complete enough for ``txt2img generate --from`` to make the same image.

A PNG holds them as text chunks; a JPEG or WebP in EXIF (UserComment the infotext, as A1111 writes it,
ImageDescription the JSON). The model's ``model_sha`` is the SHA-256 of its catalog entry (``model_sha``):
it names what the catalog loads (the Hub repo, or a fine-tune's artifact, base and training data), is
known without reading gigabytes of weights, and changes when the entry does.
"""

from __future__ import annotations

import hashlib
import json
from importlib.metadata import version

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from catalog.schema import CatalogEntry
from serving import infotext
from serving.generation_queue import GenerationResult
from serving.images import RECIPE_KEY, image_metadata

# The A1111 route reads the sampler tables here, beside the recipe they belong to.
from serving.infotext import FLOW_MATCHING_SAMPLERS as FLOW_MATCHING_SAMPLERS
from serving.infotext import SAMPLERS as SAMPLERS
from serving.infotext import recipe_records
from serving.schema import GenerationRequest, LoraWeight
from txt2img.errors import InputError


class Recipe(BaseModel):
    """Everything that made one image: the one definition of the ``txt2img`` chunk."""

    model_config = ConfigDict(extra="forbid", strict=True)

    model: str = Field(description="Catalog id.")
    model_sha: str = Field(description="SHA-256 of the model's catalog entry (serving/recipes.py model_sha).")
    loras: list[LoraWeight] = Field(default_factory=list, description="The LoRAs applied, sorted by id.")
    prompt: str
    negative_prompt: str | None = None
    prompt_syntax: str = "plain"
    seed: int
    width: int
    height: int
    num_inference_steps: int
    guidance_scale: float
    scheduler: str | None = Field(description="Sampler; null: the model's own.")
    txt2img_version: str = Field(description="The txt2img package that made the image.")

    def generation_request(self) -> GenerationRequest:
        """The request that makes this image again."""
        fields = self.model_dump(include=set(GenerationRequest.model_fields))
        return GenerationRequest(**{name: value for name, value in fields.items() if value is not None})


class RecipeError(InputError, ValueError):
    """An image without a txt2img recipe, or with one this version cannot read."""


def model_sha(entry: CatalogEntry) -> str:
    """SHA-256 of the catalog entry's definition (its JSON, keys sorted), hex."""
    definition = json.dumps(entry.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(definition.encode("utf-8")).hexdigest()


def package_version() -> str:
    return version("txt2img")


def recipe(entry: CatalogEntry, request: GenerationRequest, width: int, height: int, seed: int) -> Recipe:
    """The recipe of the image ``request`` makes with ``seed`` from ``entry`` at width x height."""
    return Recipe(
        model=entry.id,
        model_sha=model_sha(entry),
        loras=sorted(request.loras, key=lambda lora: lora.model),
        prompt=request.prompt,
        negative_prompt=request.negative_prompt,
        prompt_syntax=getattr(request, "prompt_syntax", "plain"),  # a field of requests once prompt syntax lands
        seed=seed,
        width=width,
        height=height,
        num_inference_steps=request.num_inference_steps,
        guidance_scale=request.guidance_scale,
        scheduler=request.scheduler,
        txt2img_version=package_version(),
    )


def result_recipes(result: GenerationResult) -> list[Recipe]:
    """The recipe of each image of a served request, in seed order."""
    job = result.job
    return [recipe(job.entry, job.request, job.width, job.height, seed) for seed in result.seeds]


def parameters_text(made: Recipe) -> str:
    """A1111's infotext of ``made`` (serving/infotext.py writes it)."""
    return infotext.parameters_text(made.model_dump(mode="json"))


def recipe_metadata(made: Recipe) -> dict[str, str]:
    """What serving/images.py embeds: the infotext and the recipe's JSON."""
    return recipe_records(made.model_dump(mode="json"))


def read_recipe(data: bytes, source: str) -> Recipe:
    """The recipe embedded in an image's bytes; RecipeError names ``source`` and what is wrong."""
    metadata = image_metadata(data)
    if metadata is None:
        raise RecipeError(f"{source} is not an image txt2img can read")
    text = metadata.get(RECIPE_KEY)
    if text is None:
        raise RecipeError(f"{source} carries no txt2img recipe (no '{RECIPE_KEY}' chunk)")
    try:
        return Recipe.model_validate_json(text)
    except ValidationError as error:
        first = error.errors(include_url=False)[0]
        where = ".".join(str(part) for part in first["loc"]) or "the chunk"
        raise RecipeError(f"{source} has a malformed txt2img recipe: {where}: {first['msg']}") from None
