"""``txt2img generate``: generate images from a catalog model in this process, without a server."""

from __future__ import annotations

from pathlib import Path

import click

from txt2img.errors import InputError

FORMATS_BY_SUFFIX = {".png": "png", ".jpg": "jpeg", ".jpeg": "jpeg"}


def output_paths(output: Path, count: int) -> list[Path]:
    """``out.png`` for one image; ``out-0.png``, ``out-1.png``, ... for several."""
    if count == 1:
        return [output]
    return [output.with_name(f"{output.stem}-{index}{output.suffix}") for index in range(count)]


@click.command("generate")
@click.argument("model_id")
@click.argument("prompt")
@click.option(
    "-o",
    "--output",
    type=click.Path(dir_okay=False, path_type=Path),
    default=Path("out.png"),
    show_default=True,
    help="Image file (.png, .jpg); with -n N, numbered files beside it.",
)
@click.option("--seed", type=int, help="Seed of the first image (image i uses seed + i). Random if absent.")
@click.option("--steps", type=int, help="Denoising steps.  [default: 25]")
@click.option("--width", type=int, help="Pixels, a multiple of 8.  [default: the model's native size]")
@click.option("--height", type=int, help="Pixels, a multiple of 8.  [default: the model's native size]")
@click.option("--negative", help="Negative prompt.")
@click.option("--guidance", type=float, help="Guidance scale.  [default: 7.5]")
@click.option("--scheduler", help="ddim, pndm, euler, euler-a, dpm++, unipc or lms.  [default: the model's own]")
@click.option("-n", "--num-images", type=int, default=1, show_default=True, help="How many images.")
def generate(model_id, prompt, output, seed, steps, width, height, negative, guidance, scheduler, num_images):
    """Generate images from catalog model MODEL_ID locally, with a progress bar."""
    from pydantic import ValidationError

    from serving.schema import GenerationRequest, describe_validation_error

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
        "seed": seed,
        "scheduler": scheduler,
        "num_images": num_images,
        "format": image_format,
    }
    try:
        request = GenerationRequest(**{name: value for name, value in options.items() if value is not None})
    except ValidationError as error:
        names = {"num_inference_steps": "--steps", "guidance_scale": "--guidance", "negative_prompt": "--negative"}
        problems = [
            f"{names.get(p['field'], '--' + p['field'].replace('_', '-'))}: {p['message']}"
            for p in describe_validation_error(error)
        ]
        raise InputError("; ".join(problems)) from None
    from catalog.paths import atomic_write_bytes
    from serving.images import image_bytes

    images, seeds, flags = _run(request)
    paths = output_paths(output, len(images))
    for image, path, image_seed, flagged in zip(images, paths, seeds, flags):
        atomic_write_bytes(path, image_bytes(image, image_format))
        click.echo(f"{path}  (seed {image_seed})" + ("  flagged by the safety checker: black" if flagged else ""))


def _run(request):
    from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    from catalog.store import CatalogError
    from serving.generation import BatchItem, generate_images
    from serving.manager import PipelineManager
    from serving.schema import LimitExceeded
    from serving.settings import ServingSettings

    with Progress(
        SpinnerColumn(),
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TimeElapsedColumn(),
        transient=True,
    ) as progress:
        loading = progress.add_task(f"loading {request.model}", total=None)
        settings = ServingSettings()
        try:
            manager = PipelineManager(settings)
            entry = manager.entry(request.model)
            pipeline = manager.pipeline_for(entry)
        except CatalogError as error:
            raise InputError(f"the catalog is invalid; first problem: {error.problems[0]}") from None
        progress.remove_task(loading)
        steps = progress.add_task(f"generating on {manager.device}", total=request.num_inference_steps)
        seeds = request.image_seeds()
        size = entry.resolution
        try:
            images = generate_images(
                pipeline,
                [BatchItem(request.prompt, request.negative_prompt, seed) for seed in seeds],
                width=request.width or size,
                height=request.height or size,
                num_inference_steps=request.num_inference_steps,
                guidance_scale=request.guidance_scale,
                scheduler=request.scheduler,
                on_step=lambda done: progress.update(steps, completed=done),
            )
        except LimitExceeded as error:
            raise InputError(str(error).replace("num_inference_steps", "--steps")) from None
    if not settings.safety_checker:
        return images, seeds, [False] * len(images)
    images, flags = _safety_checked(images, settings, manager.device, manager.load_dtype)
    return images, seeds, flags


def _safety_checked(images, settings, device, dtype):
    """TXT2IMG_SAFETY_CHECKER, as the server applies it: flagged images black, and which they are."""
    from serving.safety import SafetyChecker

    try:
        checker = SafetyChecker.load(
            settings.safety_checker_repo, device=device, dtype=dtype, local_files_only=settings.local_files_only
        )
    except OSError as error:
        raise InputError(
            f"TXT2IMG_SAFETY_CHECKER is on, but no safety checker loads from {settings.safety_checker_repo}: {error}"
        ) from None
    return checker.check(images)
