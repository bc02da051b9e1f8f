"""A DreamBooth dataset in JumpStart's layout, for the training and tuning tests."""

from __future__ import annotations

import json
from pathlib import Path


def write_dataset(directory: Path, count: int = 3) -> Path:
    """JumpStart's layout: a few 64 px photos of one subject and dataset_info.json."""
    from PIL import Image, ImageDraw

    directory.mkdir(parents=True, exist_ok=True)
    for index in range(count):
        image = Image.new("RGB", (64, 64), (120, 130, 140))
        ImageDraw.Draw(image).ellipse((8 + 4 * index, 16, 40 + 4 * index, 48), fill=(220, 40, 40))
        image.save(directory / f"{index}.png")
    info = {"instance_prompt": "a photo of sks toy", "class_prompt": "a photo of toy"}
    (directory / "dataset_info.json").write_text(json.dumps(info), encoding="utf-8")
    return directory
