"""``txt2img demo ...``: material to try the product with before you have your own.

``photos`` writes the synthetic DreamBooth dataset the tests train on (training/demo_dataset.py),
so the docs' running example needs no photos and no ``python -c``.
"""

from __future__ import annotations

from pathlib import Path

import click

from training.demo_dataset import SUBJECTS, write_demo_dataset
from txt2img.errors import InputError


@click.group("demo")
def app() -> None:
    """Demo material for trying txt2img offline.

    \b
    txt2img demo photos toy-photos
    txt2img train toy-photos --base tiny-sd --name red-toy --hp max_steps=10 --hp learning_rate=2e-3
    """


@app.command("photos")
@click.argument("directory", type=click.Path(file_okay=False, path_type=Path))
@click.option(
    "--subject",
    "subjects",
    multiple=True,
    metavar="COLOUR",
    help="A toy to draw: red, blue, green or purple (repeatable; default red). "
    "Several make a `concepts` dataset, one folder each.",
)
@click.option("--images", type=click.IntRange(min=3, max=100), default=4, show_default=True, help="Photos per toy.")
@click.option("--size", type=click.IntRange(min=8, max=1024), default=64, show_default=True, help="Photo side, px.")
def photos(directory: Path, subjects: tuple[str, ...], images: int, size: int) -> None:
    """Write a DreamBooth dataset folder of drawn toy photos into DIRECTORY (new or empty).

    Each toy is one shape and colour at several places and sizes; its instance prompt is
    "a photo of sks <colour> toy" and its class prompt "a photo of a toy".
    """
    unknown = [subject for subject in subjects if subject not in SUBJECTS]
    if unknown:
        raise InputError(f"--subject {unknown[0]!r} is not one of {', '.join(SUBJECTS)}")
    if directory.exists() and any(directory.iterdir()):
        raise InputError(f"{directory} is not empty; name a new or empty folder")
    subjects = tuple(dict.fromkeys(subjects)) or ("red",)
    write_demo_dataset(directory, subjects, images_per_subject=images, size=size)
    prompts = ", ".join(f'"a photo of sks {subject} toy"' for subject in subjects)
    click.echo(f"wrote {len(subjects) * images} photos and dataset_info.json to {directory} (prompts: {prompts})")
