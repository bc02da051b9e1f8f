"""What a finished run leaves for a person to look at: validation images for the DreamBooth
evaluation prompts, a contact sheet of them, and a loss curve, as PNGs drawn with matplotlib, and the
losses behind the curve as JSON (the playground draws them again, live)."""

from __future__ import annotations

import re
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

from PIL import Image

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
CAPTION_HEIGHT = 44  # pixels under each tile of a contact sheet: three lines of prompt


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


def _figure(width_px: int, height_px: int):
    """A matplotlib figure of that many pixels at 100 dpi, drawn by the Agg backend: files only, no display
    (servers and CI have none), and no pyplot, whose global state is not for threads."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width_px / 100, height_px / 100), dpi=100)
    FigureCanvasAgg(figure)
    return figure


def contact_sheet(images: list[tuple[str, Image.Image]], path: Path, tile: int = 256) -> None:
    """A grid of images, each ``tile`` pixels wide, under a caption of its prompt (up to three lines)."""
    columns = min(len(images), 4)
    rows = -(-len(images) // columns)
    width, height = columns * tile, rows * (tile + CAPTION_HEIGHT)
    figure = _figure(width, height)
    for index, (prompt, image) in enumerate(images):
        left, bottom = (index % columns) * tile, height - (index // columns + 1) * (tile + CAPTION_HEIGHT)
        axis = figure.add_axes((left / width, bottom / height, tile / width, tile / height))  # exact pixels
        axis.imshow(image.convert("RGB"), aspect="auto")
        axis.set_title("\n".join(textwrap.wrap(prompt, tile // 7)[:3]), fontsize=8, pad=3)
        axis.set_axis_off()
    figure.savefig(path, dpi=100, facecolor="white")


def running_average(losses: list[float], keep: float = 0.9) -> list[float]:
    """The exponential moving average that shows a loss's trend through its per-step noise."""
    smoothed, average = [], losses[0] if losses else 0.0
    for value in losses:
        average = keep * average + (1 - keep) * value
        smoothed.append(average)
    return smoothed


def loss_curve_figure(losses: list[float], size: tuple[int, int] = (640, 360)):
    """Per-step training loss with its running average, against the step, with ticks and a legend."""
    from matplotlib.ticker import MaxNLocator

    figure = _figure(*size)
    axis = figure.add_subplot()
    steps = range(1, len(losses) + 1)
    marker = "o" if len(losses) == 1 else None  # one step is a point, not a line
    axis.plot(steps, losses, color="0.65", linewidth=1, marker=marker, label="loss per step")
    axis.plot(steps, running_average(losses), color="tab:blue", linewidth=2, marker=marker, label="running average")
    axis.set_title(f"training loss ({len(losses)} steps)")
    axis.set_xlabel("step")
    axis.set_ylabel("loss")
    axis.xaxis.set_major_locator(MaxNLocator(integer=True))
    axis.grid(alpha=0.3)
    axis.legend(loc="upper right")
    figure.tight_layout()
    return figure


def loss_curve(losses: list[float], path: Path, size: tuple[int, int] = (640, 360)) -> None:
    """``loss_curve_figure`` as a PNG of ``size`` pixels."""
    loss_curve_figure(losses, size).savefig(path, dpi=100, facecolor="white")
