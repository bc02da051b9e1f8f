"""Synthetic DreamBooth datasets drawn with PIL: a coloured "toy" on varied backgrounds.

They let the tests, ``bench/train_speed.py`` and the quick start run a real training job with
no photos at hand. Each subject is one shape and colour seen at several positions and sizes,
like photos of one object from a few angles.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from PIL import Image, ImageDraw

from training.dataset import DATASET_INFO

SUBJECTS = {
    "red": ((220, 30, 30), "ellipse"),
    "blue": ((30, 60, 220), "rectangle"),
    "green": ((40, 160, 60), "ellipse"),
    "purple": ((130, 40, 170), "rectangle"),
}


def draw_subject(subject: str, size: int, seed: int) -> Image.Image:
    """One "photo" of ``subject``: its shape, at a random place and size, on a random muted background."""
    colour, shape = SUBJECTS[subject]
    rng = random.Random(seed)
    background = tuple(rng.randint(90, 170) for _ in range(3))
    image = Image.new("RGB", (size, size), background)
    draw = ImageDraw.Draw(image)
    extent = rng.randint(size // 2, size * 3 // 4)
    left, top = rng.randint(0, size - extent), rng.randint(0, size - extent)
    box = (left, top, left + extent, top + extent)
    getattr(draw, shape)(box, fill=colour)
    inner = extent // 4
    draw.rectangle((left + inner, top + inner, left + 2 * inner, top + 2 * inner), fill=(240, 220, 40))
    return image


def write_demo_dataset(
    directory: Path, subjects: tuple[str, ...] = ("red",), *, images_per_subject: int = 4, size: int = 64
) -> Path:
    """Write a dataset folder: JumpStart's single-subject layout for one subject, ``concepts`` for more."""
    directory.mkdir(parents=True, exist_ok=True)
    concepts = []
    for subject in subjects:
        folder = directory if len(subjects) == 1 else directory / subject
        folder.mkdir(parents=True, exist_ok=True)
        for index in range(images_per_subject):
            draw_subject(subject, size, seed=1000 * list(SUBJECTS).index(subject) + index).save(
                folder / f"{subject}-{index}.png"
            )
        concepts.append(
            {
                "instance_data_dir": folder.name if len(subjects) > 1 else ".",
                "instance_prompt": f"a photo of sks {subject} toy",
                "class_prompt": "a photo of a toy",
            }
        )
    if len(subjects) == 1:
        info = {key: concepts[0][key] for key in ("instance_prompt", "class_prompt")}
    else:
        info = {"concepts": concepts}
    (directory / DATASET_INFO).write_text(json.dumps(info, indent=2), encoding="utf-8")
    return directory
