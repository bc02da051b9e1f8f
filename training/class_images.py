"""Prior preservation's class images: generated once from the base model, cached in the dataset.

Each concept's ``class_data_dir`` is filled up to ``num_class_images`` with images of its
``class_prompt``; images already there (the user's or an earlier run's) are reused, so a second
run generates nothing.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from pathlib import Path
from typing import Any

from catalog.paths import atomic_write_bytes
from training.dataset import Concept
from training.images import list_images

GENERATED_PREFIX = "txt2img-class-"
INFERENCE_STEPS = 25
# Generating several at once is faster on a GPU; on a CPU it only costs memory.
GPU_BATCH = 4


def _png_bytes(image: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def ensure_class_images(
    pipeline: Any,
    concept: Concept,
    count: int,
    *,
    resolution: int,
    seed: int,
    on_image: Callable[[], None] | None = None,
) -> list[Path]:
    """Make sure ``concept.class_data_dir`` holds ``count`` images; returns the ones to train on."""
    import torch

    assert concept.class_prompt is not None  # the dataset checks this when prior preservation is on
    existing = list_images(concept.class_data_dir)
    missing = count - len(existing)
    if missing <= 0:
        return existing[:count]
    concept.class_data_dir.mkdir(parents=True, exist_ok=True)
    device = pipeline.unet.device
    batch = GPU_BATCH if device.type == "cuda" else 1
    index = 0
    while missing > 0:
        size = min(batch, missing)
        names = []
        while len(names) < size:
            path = concept.class_data_dir / f"{GENERATED_PREFIX}{index:05d}.png"
            if not path.exists():
                names.append(path)
            index += 1
        # One seed per file name: regenerating a deleted image gives the same picture.
        generators = [torch.Generator(device).manual_seed(seed + int(p.stem[len(GENERATED_PREFIX) :])) for p in names]
        with torch.autocast(device.type, enabled=device.type == "cuda"):
            images = pipeline(
                [concept.class_prompt] * size,
                height=resolution,
                width=resolution,
                num_inference_steps=INFERENCE_STEPS,
                generator=generators,
            ).images
        for image, path in zip(images, names):
            atomic_write_bytes(path, _png_bytes(image))
            if on_image:
                on_image()
        missing -= size
    return list_images(concept.class_data_dir)[:count]
