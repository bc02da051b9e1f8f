"""``txt2img generate``: generate images from a catalog model in this process, without a server.

It holds the server's limits (``TXT2IMG_MAX_*``, serving/settings.py) unless ``--no-limits`` lifts
them, and makes the images ``TXT2IMG_MAX_BATCH_SIZE`` at a time, writing each batch as it is made.
"""

from __future__ import annotations

from pathlib import Path
from typing import get_args

import click

from catalog.paths import atomic_write_bytes, require_folder
from catalog.store import CatalogError
from serving.generation import BatchItem, generate_images, is_out_of_memory
from serving.images import image_bytes
from serving.manager import PipelineManager
from serving.recipes import Recipe, model_sha, read_recipe, recipe, recipe_metadata
from serving.safety import SafetyChecker
from serving.schema import (
    LIMIT_SETTINGS,
    SCHEDULER_CLASSES,
    FamilyRefusal,
    GenerationRequest,
    LimitExceeded,
    PromptSyntax,
    check_limits,
    describe_validation_error,
    with_model_defaults,
)
from serving.settings import ServingSettings
from txt2img.errors import InputError, first_error

FORMATS_BY_SUFFIX = {".png": "png", ".jpg": "jpeg", ".jpeg": "jpeg"}
OPTION_NAMES = {
    "num_inference_steps": "--steps",
    "guidance_scale": "--guidance",
    "negative_prompt": "--negative",
    "true_cfg_scale": "--true-cfg",
}


# The setting behind each field ``serving.schema.check_limits`` names.
def output_paths(output: Path, count: int) -> list[Path]:
    """``out.png`` for one image; ``out-0.png``, ``out-1.png``, ... for several."""
    if count == 1:
        return [output]
    return [output.with_name(f"{output.stem}-{index}{output.suffix}") for index in range(count)]


@click.command("generate")
@click.argument("model_id", required=False)
@click.argument("prompt", required=False)
@click.option(
    "--from",
    "from_image",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Make the image in FILE (a PNG or JPEG txt2img wrote) again from the recipe it carries, instead of "
    "MODEL_ID PROMPT; options given beside it change that recipe.",
)
@click.option(
    "-o",
    "--output",
    type=click.Path(dir_okay=False, path_type=Path),
    default=Path("out.png"),
    show_default=True,
    help="Image file (.png, .jpg); with -n N, numbered files beside it.",
)
@click.option("--seed", type=int, help="Seed of the first image (image i uses seed + i). Random if absent.")
@click.option("--steps", type=int, help="Denoising steps.  [default: the model family's]")
@click.option("--width", type=int, help="Pixels, a multiple of 8.  [default: the model's native size]")
@click.option("--height", type=int, help="Pixels, a multiple of 8.  [default: the model's native size]")
@click.option("--negative", help="Negative prompt (on Flux, with --true-cfg above 1).")
@click.option("--guidance", type=float, help="Guidance scale.  [default: the model family's]")
@click.option("--true-cfg", type=float, help="Flux only: true classifier-free guidance, above 1 to use --negative.")
@click.option(
    "--scheduler",
    help=f"One the model's family fits, of {', '.join(SCHEDULER_CLASSES)}.  [default: the model's own]",
)
@click.option(
    "--prompt-syntax",
    type=click.Choice(sorted(get_args(PromptSyntax))),
    help="'a1111' reads AUTOMATIC1111's (word:1.2) weights and prompts past 77 tokens.  [default: plain]",
)
@click.option("-n", "--num-images", type=int, default=1, show_default=True, help="How many images.")
@click.option(
    "--no-limits",
    is_flag=True,
    help="Lift the server's limits on steps, images, pixels and prompt length (TXT2IMG_MAX_*) for this run.",
)
def generate(
    model_id,
    prompt,
    from_image,
    output,
    seed,
    steps,
    width,
    height,
    negative,
    guidance,
    true_cfg,
    scheduler,
    prompt_syntax,
    num_images,
    no_limits,
):
    """Generate images from catalog model MODEL_ID locally, TXT2IMG_MAX_BATCH_SIZE at a time, each
    written as soon as it is made, its recipe embedded; progress (images done of all) goes to stderr."""
    image_format = FORMATS_BY_SUFFIX.get(output.suffix.lower())
    if image_format is None:
        raise InputError(f"cannot write '{output}': use a .png, .jpg or .jpeg file name")
    options = {
        "model": model_id,
        "prompt": prompt,
        "negative_prompt": negative,
        "width": width,
        "height": height,
        "num_inference_steps": steps,
        "guidance_scale": guidance,
        "true_cfg_scale": true_cfg,
        "seed": seed,
        "scheduler": scheduler,
        "prompt_syntax": prompt_syntax,
        "num_images": num_images,
        "format": image_format,
    }
    given = {name: value for name, value in options.items() if value is not None}
    made = _given_recipe(from_image, model_id, prompt)
    recipe_fields = made.generation_request().model_dump(exclude_none=True, exclude={"format"}) if made else {}
    request = _request({**recipe_fields, **given})
    require_folder(output.parent, "output folder")
    with ImageProgress(request.num_images) as progress:
        _run(request, output, progress, limits=not no_limits, made_with=made.model_sha if made else None)


def _given_recipe(from_image: Path | None, model_id: str | None, prompt: str | None) -> Recipe | None:
    """``--from``'s recipe (None without it); MODEL_ID PROMPT or --from, not both."""
    if from_image is None:
        if model_id is None or prompt is None:
            raise InputError("give MODEL_ID and PROMPT, or --from IMAGE to make an image again")
        return None
    if model_id is not None:
        raise InputError("give either --from IMAGE or MODEL_ID PROMPT, not both")
    return read_recipe(from_image.read_bytes(), str(from_image))


def _request(options: dict):
    """The GenerationRequest of these options; a refused value is one line naming its option."""
    from pydantic import ValidationError

    try:
        return GenerationRequest(**options)
    except ValidationError as error:
        problems = [
            f"{OPTION_NAMES.get(p['field'], '--' + p['field'].replace('_', '-'))}: {p['message']}"
            for p in describe_validation_error(error)
        ]
        raise InputError("; ".join(problems)) from None


def _settings():
    """The server's settings (TXT2IMG_*), a bad value refused in one line."""
    from pydantic import ValidationError

    try:
        return ServingSettings()
    except ValidationError as error:
        field, _, message = first_error(error).partition(": ")
        raise InputError(f"TXT2IMG_{field.upper()}: {message}") from None


def _with_model_defaults(request, entry):
    """``serving.schema.with_model_defaults``: the family's defaults; a field it cannot use is refused in one
    line that names the options."""
    try:
        return with_model_defaults(request, entry)
    except FamilyRefusal as error:
        message = str(error)
        for field, option in OPTION_NAMES.items():
            message = message.replace(field, option)
        raise InputError(message) from None


def _check_server_limits(request, settings, width: int, height: int) -> None:
    """``serving.schema.check_limits``, refused in one line that says which setting lifts it."""
    try:
        check_limits(request, settings, width, height)
    except LimitExceeded as error:
        if error.field == "width*height":  # name the size as it was asked for, the model's own side included
            reason = f"{width}x{height} is {error.value} pixels, above the limit of {error.limit}"
        else:
            reason = str(error)
        setting = LIMIT_SETTINGS.get(error.field, "its TXT2IMG_MAX_* setting")
        raise InputError(f"{reason}: raise {setting} or pass --no-limits") from None


def _run(request, output: Path, progress: ImageProgress, limits: bool, made_with: str | None = None) -> None:
    """Load the model, then generate and write the images batch by batch; ``made_with`` is the model_sha of
    the recipe being made again."""
    settings = _settings()
    try:
        manager = PipelineManager(settings)
        entry = manager.entry(request.model)
    except CatalogError as error:
        raise InputError(f"the catalog is invalid; first problem: {error.problems[0]}") from None
    if made_with is not None and model_sha(entry) != made_with:  # the bytes will differ: say why up front
        click.echo(
            f"txt2img: note: model '{entry.id}' is not the one that made the image (its catalog entry changed)",
            err=True,
        )
    request = _with_model_defaults(request, entry)
    width, height = request.width, request.height
    if limits:
        _check_server_limits(request, settings, width, height)
    manager.check_loras(entry, request.loras)  # a recipe's LoRAs (generate --from), held to the server's rules
    progress.loading(request.model)
    pipeline = manager.pipeline_for(entry, request.loras)
    checker = _safety_checker(settings, manager.device, manager.load_dtype) if settings.safety_checker else None
    seeds = request.image_seeds()
    paths = output_paths(output, len(seeds))
    batch_size = settings.max_batch_size  # memory is that of one batch, however many images are asked for
    for start in range(0, len(seeds), batch_size):
        batch = seeds[start : start + batch_size]
        progress.generating(manager.device, request.num_inference_steps)
        images = _generate_batch(pipeline, request, batch, width, height, progress)
        images, flags = checker.check(images) if checker else (images, [False] * len(images))
        recipes = [recipe(entry, request, width, height, seed) for seed in batch]
        _write(images, paths[start : start + len(batch)], recipes, flags, request.format)
        progress.images_done(start + len(batch))


def _generate_batch(pipeline, request, seeds: list[int], width: int, height: int, progress: ImageProgress) -> list:
    """One pipeline call (serving.generation's, as the server makes it); running out of memory is one line."""
    try:
        return generate_images(
            pipeline,
            [BatchItem(request.prompt, request.negative_prompt, seed, request.prompt_syntax) for seed in seeds],
            width=width,
            height=height,
            num_inference_steps=request.num_inference_steps,
            guidance_scale=request.guidance_scale,
            scheduler=request.scheduler,
            true_cfg_scale=request.true_cfg_scale,
            on_step=progress.step,
        )
    except LimitExceeded as error:
        raise InputError(str(error).replace("num_inference_steps", "--steps")) from None
    except Exception as error:
        if not is_out_of_memory(error):
            raise
        kept = f" ({progress.done} of {progress.total} written, and kept)" if progress.done else ""
        raise InputError(
            f"out of memory making {len(seeds)} image(s) of {width}x{height}{kept}: "
            "ask for a smaller size, or fewer images at a time with TXT2IMG_MAX_BATCH_SIZE"
        ) from None


def _write(images: list, paths: list[Path], recipes: list[Recipe], flags: list[bool], image_format: str) -> None:
    for image, path, made, flagged in zip(images, paths, recipes, flags):
        atomic_write_bytes(path, image_bytes(image, image_format, metadata=recipe_metadata(made)))
        click.echo(f"{path}  (seed {made.seed})" + ("  flagged by the safety checker: black" if flagged else ""))


def _safety_checker(settings, device, dtype):
    """TXT2IMG_SAFETY_CHECKER's checker, as the server loads it: it blacks out the images it flags."""
    try:
        return SafetyChecker.load(
            settings.safety_checker_repo, device=device, dtype=dtype, local_files_only=settings.local_files_only
        )
    except OSError as error:
        raise InputError(
            f"TXT2IMG_SAFETY_CHECKER is on, but no safety checker loads from {settings.safety_checker_repo}: {error}"
        ) from None


class ImageProgress:
    """Progress on stderr: on a terminal a live bar of images done of all and of the running batch's
    steps; elsewhere (a log, a pipe) one line per batch, ``generated 16/100 images``."""

    def __init__(self, total: int) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

        self.total = total
        self.done = 0
        self.console = Console(stderr=True)
        self.bar = Progress(
            SpinnerColumn(),
            TextColumn("{task.description}"),
            BarColumn(),
            TextColumn("{task.completed}/{task.total}"),
            TimeElapsedColumn(),
            console=self.console,
            transient=True,
        )
        self.task = self.bar.add_task("starting", total=None)
        self.images = None

    def __enter__(self) -> ImageProgress:
        if self.console.is_terminal:  # elsewhere a live bar prints only its last frame, or a blank line
            self.bar.start()
        return self

    def __exit__(self, *exc_info) -> None:
        if self.console.is_terminal:
            self.bar.stop()

    def loading(self, model_id: str) -> None:
        self.bar.update(self.task, description=f"loading {model_id}", total=None, completed=0)

    def generating(self, device: str, steps: int) -> None:
        if self.images is None:
            self.images = self.bar.add_task("images", total=self.total)
        self.bar.update(self.task, description=f"steps on {device}", total=steps, completed=0)

    def step(self, done: int) -> None:
        self.bar.update(self.task, completed=done)

    def images_done(self, done: int) -> None:
        self.done = done
        self.bar.update(self.images, completed=done)
        if not self.console.is_terminal:
            self.console.print(f"generated {done}/{self.total} images", soft_wrap=True)
