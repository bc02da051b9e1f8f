"""What a finished run leaves for a person to look at: validation images for the DreamBooth
evaluation prompts, a contact sheet of them, and a loss curve, all as PNGs drawn with PIL."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw

from training.dataset import DreamBoothDataset

# A prompt far from any usual subject class: it shows whether the fine-tune leaks its subject
# into everything (the "language drift" the DreamBooth paper's prior preservation counters).
OUT_OF_CLASS_PROMPT = "a photo of a lighthouse on a rocky coast"
VALIDATION_STEPS = 25
CONTACT_SHEET = "contact_sheet.png"
LOSS_CURVE = "loss_curve.png"
# The numbers behind the picture, one loss per optimizer step: to plot elsewhere or compare runs.
LOSS_HISTORY = "loss_curve.json"
VALIDATION_DIR = "validation"


def validation_prompts(dataset: DreamBoothDataset, custom: list[str] | None) -> list[str]:
    """The user's prompts, or for each concept the DreamBooth paper's kinds of check:
    the subject itself, recontextualised, restyled, its plain class, and something unrelated."""
    if custom:
        return list(custom)
    prompts: list[str] = []
    for concept in dataset.concepts:
        subject = concept.subject
        prompts += [f"a photo of {subject}", f"a photo of {subject} on a beach", f"a pencil sketch of {subject}"]
        if concept.class_prompt:
            prompts.append(concept.class_prompt)
    prompts.append(OUT_OF_CLASS_PROMPT)
    return list(dict.fromkeys(prompts))


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:60] or "prompt"


def generate_validation_images(
    pipeline: Any,
    prompts: list[str],
    directory: Path,
    *,
    resolution: int,
    seed: int,
    on_image: Callable[[], None] | None = None,
) -> list[tuple[str, Image.Image]]:
    """One image per prompt at a fixed seed, saved as ``NN-<prompt>.png`` in ``directory``."""
    import torch

    directory.mkdir(parents=True, exist_ok=True)
    device = pipeline.unet.device
    results = []
    for number, prompt in enumerate(prompts):
        generator = torch.Generator(device).manual_seed(seed)
        with torch.no_grad(), torch.autocast(device.type, enabled=device.type == "cuda"):
            image = pipeline(
                prompt, height=resolution, width=resolution, num_inference_steps=VALIDATION_STEPS, generator=generator
            ).images[0]
        image.save(directory / f"{number:02d}-{_slug(prompt)}.png")
        results.append((prompt, image))
        if on_image:
            on_image()
    return results


def _wrap(text: str, width_chars: int) -> list[str]:
    lines, line = [], ""
    for word in text.split():
        if line and len(line) + 1 + len(word) > width_chars:
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}".strip()
    return [*lines, line] if line else lines


def contact_sheet(images: list[tuple[str, Image.Image]], path: Path, tile: int = 256) -> None:
    """A grid of captioned images, each scaled to ``tile`` pixels wide."""
    columns = min(len(images), 4)
    rows = -(-len(images) // columns)
    caption_height = 44
    sheet = Image.new("RGB", (columns * tile, rows * (tile + caption_height)), "white")
    draw = ImageDraw.Draw(sheet)
    for index, (prompt, image) in enumerate(images):
        x, y = (index % columns) * tile, (index // columns) * (tile + caption_height)
        sheet.paste(image.convert("RGB").resize((tile, tile), Image.Resampling.LANCZOS), (x, y))
        for line_number, line in enumerate(_wrap(prompt, tile // 6)[:3]):
            draw.text((x + 4, y + tile + 2 + 13 * line_number), line, fill="black")
    sheet.save(path)


def loss_curve(losses: list[float], path: Path, size: tuple[int, int] = (640, 360)) -> None:
    """Per-step training loss (grey) with its running average (blue), on labelled axes."""
    width, height = size
    left, right, top, bottom = 60, 16, 28, 36
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    draw.text((left, 8), f"training loss ({len(losses)} steps)", fill="black")
    draw.rectangle((left, top, width - right, height - bottom), outline="black")
    if losses:
        low, high = min(losses), max(losses)
        span = (high - low) or 1.0
        plot_width, plot_height = width - left - right, height - top - bottom

        def point(step: int, value: float) -> tuple[float, float]:
            x = left + (step / max(len(losses) - 1, 1)) * plot_width
            return x, top + (1 - (value - low) / span) * plot_height

        smoothed, average = [], losses[0]
        for value in losses:
            average = 0.9 * average + 0.1 * value
            smoothed.append(average)
        for series, colour in ((losses, (170, 170, 170)), (smoothed, (31, 90, 200))):
            points = [point(step, value) for step, value in enumerate(series)]
            if len(points) > 1:
                draw.line(points, fill=colour, width=2)
            else:
                draw.ellipse((points[0][0] - 2, points[0][1] - 2, points[0][0] + 2, points[0][1] + 2), fill=colour)
        draw.text((4, top - 4), f"{high:.4g}", fill="black")
        draw.text((4, height - bottom - 8), f"{low:.4g}", fill="black")
        draw.text((left, height - bottom + 6), "1", fill="black")
        draw.text((width - right - 40, height - bottom + 6), str(len(losses)), fill="black")
        draw.text((width // 2 - 10, height - bottom + 18), "step", fill="black")
    image.save(path)
