"""Evaluating a catalog model on a DreamBooth dataset: generate the paper's prompts, then score them.

``evaluate_model`` computes ``fid_score``, ``clip_i``, ``clip_t``, ``dino`` and ``instance_loss``
as one ``EvaluationSettings`` asks. A metric whose network weights are not on this machine is
reported as skipped, with the reason, never as zero, and is known to be skipped before anything is
generated: images for the DreamBooth paper's 25 prompts per subject (or the user's own) are
generated only when some image metric can run. ``instance_loss`` needs no image at all.
The result is an ``EvaluationReport`` plus a JSON file (and an image grid when images were made)
on disk, and metric lines ``name=value`` in the form SageMaker's metric regexes read.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING

from pydantic import BaseModel, ConfigDict, Field, field_validator

from catalog.paths import atomic_write_text, txt2img_home
from catalog.pipelines import load_pipeline
from catalog.store import load_catalog
from training.dataset import load_dataset
from training.hyperparameters import Hyperparameters
from training.losses import denoising_loss
from training.metrics import (
    EXTRACTOR_LOADERS,
    METRIC_DIRECTIONS,
    METRIC_EXTRACTOR,
    ImageEmbedder,
    MetricWeights,
    MissingWeights,
    frechet_distance,
    mean_matched_cosine,
    mean_pairwise_cosine,
)
from txt2img.errors import InputError

if TYPE_CHECKING:
    from PIL.Image import Image

ALL_METRICS = tuple(METRIC_DIRECTIONS)
REPORT_FILE_NAME = "metrics.json"
GRID_FILE_NAME = "grid.png"
DEFAULT_INFERENCE_STEPS = 25

# The DreamBooth paper's evaluation prompts (Ruiz et al. 2023): "{}" is the subject, e.g. "sks dog".
RECONTEXTUALIZATION_PROMPTS = (
    "a {} in the jungle",
    "a {} in the snow",
    "a {} on the beach",
    "a {} on a cobblestone street",
    "a {} on top of pink fabric",
    "a {} on top of a wooden floor",
    "a {} with a city in the background",
    "a {} with a mountain in the background",
    "a {} with a blue house in the background",
    "a {} on top of a purple rug in a forest",
    "a {} with a wheat field in the background",
    "a {} with a tree and autumn leaves in the background",
    "a {} with the Eiffel Tower in the background",
    "a {} floating on top of water",
    "a {} floating in an ocean of milk",
    "a {} on top of green grass with sunflowers around it",
    "a {} on top of a mirror",
    "a {} on top of the sidewalk in a crowded street",
    "a {} on top of a dirt road",
    "a {} on top of a white rug",
)
ACCESSORIZATION_PROMPTS = (
    "a {} wearing a red hat",
    "a {} wearing a santa hat",
    "a {} wearing a rainbow scarf",
    "a {} wearing a black top hat and a monocle",
    "a {} in a chef outfit",
    "a {} in a firefighter outfit",
    "a {} in a police outfit",
    "a {} wearing pink glasses",
    "a {} wearing a yellow shirt",
    "a {} in a purple wizard outfit",
)
PROPERTY_PROMPTS = ("a red {}", "a purple {}", "a shiny {}", "a wet {}", "a cube shaped {}")

# Class nouns the paper treats as live subjects: they get accessories instead of half the scenes.
LIVE_CLASS_NOUNS = frozenset(
    {"dog", "cat", "puppy", "kitten", "animal", "pet", "person", "man", "woman", "boy", "girl", "child", "face"}
)
_LEADING_ARTICLES = ("a photo of a ", "a photo of an ", "a photo of ", "photo of ", "an ", "a ")


class EvaluationError(InputError, ValueError):
    """The evaluation cannot run with these inputs; the message says why."""


class EvaluationSettings(BaseModel):
    """How a model is evaluated: by ``txt2img evaluate``, and in every trial of ``txt2img tune``."""

    model_config = ConfigDict(extra="forbid")

    metrics: list[str] = Field(default_factory=lambda: list(ALL_METRICS), min_length=1)
    prompts: list[str] | None = Field(None, description="The user's prompts instead of the paper's.")
    prompts_per_subject: int | None = Field(None, ge=1, description="Only the first N paper prompts per subject.")
    images_per_prompt: int = Field(1, ge=1)
    inference_steps: int = Field(DEFAULT_INFERENCE_STEPS, ge=1)
    seed: int = 0
    weights: MetricWeights = Field(
        default_factory=MetricWeights.from_env,
        description="Resolved once, so every tuning worker reads the same weights.",
    )

    @field_validator("metrics")
    @classmethod
    def _known_metrics(cls, names: list[str]) -> list[str]:
        unknown = [name for name in names if name not in METRIC_DIRECTIONS]
        if unknown:
            raise ValueError(f"unknown metric(s) {', '.join(unknown)}; choose from {', '.join(ALL_METRICS)}")
        return list(dict.fromkeys(names))


class PromptImages(BaseModel):
    """The images generated for one prompt, and which dataset subject it portrays."""

    model_config = ConfigDict(extra="forbid")

    prompt: str
    concept: int | None = Field(description="Index of the dataset subject, or None for a user prompt.")
    images: list[str] = Field(default_factory=list, description="Paths of the generated PNGs.")


class EvaluationReport(BaseModel):
    """What ``txt2img evaluate`` measured, and where it wrote its files."""

    model_config = ConfigDict(extra="forbid")

    model_id: str
    data_dir: str
    created: datetime
    seed: int
    inference_steps: int
    images_per_prompt: int
    metrics: dict[str, float | None] = Field(description="Every requested metric; None when skipped.")
    skipped: dict[str, str] = Field(default_factory=dict, description="Skipped metric -> reason and remedy.")
    generations: list[PromptImages] = Field(default_factory=list)
    json_path: str | None = None
    grid_path: str | None = None


def subject_phrase(instance_prompt: str, class_prompt: str | None) -> str:
    """The words that name the subject, e.g. "sks dog" from "a photo of sks dog" and "a photo of dog"."""
    instance_words, class_words = instance_prompt.split(), (class_prompt or "").split()
    shared = 0
    while shared < min(len(instance_words), len(class_words)) - 1 and instance_words[shared] == class_words[shared]:
        shared += 1
    if shared:
        return " ".join(instance_words[shared:])
    lowered = instance_prompt.strip()
    for article in _LEADING_ARTICLES:
        if lowered.lower().startswith(article):
            return lowered[len(article) :].strip() or lowered
    return lowered


def dreambooth_prompts(subject: str, class_prompt: str | None) -> list[str]:
    """The paper's 25 prompts: live subjects get 10 scenes + 10 accessories, objects 20 scenes; both 5 properties."""
    class_noun = (class_prompt or subject).split()[-1].lower().strip(".,")
    if class_noun in LIVE_CLASS_NOUNS:
        templates = RECONTEXTUALIZATION_PROMPTS[:10] + ACCESSORIZATION_PROMPTS + PROPERTY_PROMPTS
    else:
        templates = RECONTEXTUALIZATION_PROMPTS + PROPERTY_PROMPTS
    return [template.format(subject) for template in templates]


def read_prompts_file(path: Path) -> list[str]:
    """One prompt a line; blank lines and lines starting with '#' are ignored."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as error:
        raise EvaluationError(f"cannot read prompts file {path}: {error.strerror or error}") from error
    prompts = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    if not prompts:
        raise EvaluationError(f"prompts file {path} holds no prompt")
    return prompts


def default_output_dir(model_id: str) -> Path:
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S%fZ")
    return txt2img_home() / "evaluations" / model_id / stamp


def metric_lines(metrics: dict[str, float | None]) -> list[str]:
    """``name=value`` lines in fixed-point notation, which SageMaker metric regexes such as
    ``fid_score=([-+]?\\d\\.?\\d*)`` read; skipped metrics print no line."""
    return [f"{name}={value:.6f}" for name, value in metrics.items() if value is not None]


def image_grid(images: list[Image], columns: int) -> Image:
    """Tile same-size images left to right, top to bottom."""
    from PIL import Image as PILImage

    width, height = images[0].size
    rows = math.ceil(len(images) / columns)
    grid = PILImage.new("RGB", (columns * width, rows * height), "white")
    for index, image in enumerate(images):
        corner = ((index % columns) * width, (index // columns) * height)
        grid.paste(image.convert("RGB").resize((width, height)), corner)
    return grid


def _load_images(paths: Iterable[Path]) -> list[Image]:
    from PIL import Image as PILImage

    images = []
    for path in paths:
        with PILImage.open(path) as image:
            images.append(image.convert("RGB"))
    return images


def _resolve_extractors(
    needed: set[str], injected: dict[str, ImageEmbedder] | None, weights: MetricWeights
) -> tuple[dict[str, ImageEmbedder], dict[str, str]]:
    """Load each extractor the requested metrics need; a missing one becomes a reason, not an error."""
    extractors, missing = {}, {}
    for name in sorted(needed):
        if injected and name in injected:
            extractors[name] = injected[name]
            continue
        location = getattr(weights, name)
        if location is None:
            missing[name] = f"no {name} weights configured; see `txt2img evaluate --help` for --{name}-path"
            continue
        try:
            extractors[name] = EXTRACTOR_LOADERS[name](location)
        except MissingWeights as error:
            missing[name] = str(error)
    return extractors, missing


@dataclass
class MetricPlan:
    """The requested metrics sorted out before any work: the extractors of those that can run here,
    and why the others cannot (their weights are missing)."""

    metrics: list[str]
    extractors: dict[str, ImageEmbedder]
    skipped: dict[str, str]

    @property
    def image_metrics(self) -> list[str]:
        """The metrics that can run and need generated images; none means nothing is generated."""
        return [name for name in self.metrics if name in METRIC_EXTRACTOR and name not in self.skipped]


def plan_metrics(
    settings: EvaluationSettings, feature_extractors: dict[str, ImageEmbedder] | None = None
) -> MetricPlan:
    """Load the extractors ``settings.metrics`` need (or take the injected ones) and name the skipped metrics."""
    needed = {METRIC_EXTRACTOR[name] for name in settings.metrics if name in METRIC_EXTRACTOR}
    extractors, missing = _resolve_extractors(needed, feature_extractors, settings.weights)
    skipped = {
        name: missing[METRIC_EXTRACTOR[name]] for name in settings.metrics if METRIC_EXTRACTOR.get(name) in missing
    }
    return MetricPlan(metrics=list(settings.metrics), extractors=extractors, skipped=skipped)


def _prompt_jobs(concepts: list, settings: EvaluationSettings) -> list[PromptImages]:
    """The prompts to generate: the user's, or the paper's for each subject (the first N of them)."""
    if settings.prompts:
        return [PromptImages(prompt=prompt, concept=None) for prompt in settings.prompts]
    return [
        PromptImages(prompt=prompt, concept=index)
        for index, concept in enumerate(concepts)
        for prompt in dreambooth_prompts(
            subject_phrase(concept.instance_prompt, concept.class_prompt), concept.class_prompt
        )[: settings.prompts_per_subject]
    ]


def _generate(
    pipeline,
    jobs: list[PromptImages],
    images_per_prompt: int,
    resolution: int,
    steps: int,
    seed: int,
    images_dir: Path,
    progress: bool,
) -> list[list[Image]]:
    """Generate ``images_per_prompt`` images per prompt, each from its own fixed seed, saving each PNG."""
    import torch
    from rich.console import Console
    from rich.progress import Progress

    images_dir.mkdir(parents=True, exist_ok=True)
    pipeline.set_progress_bar_config(disable=True)
    generated: list[list[Image]] = []
    with Progress(console=Console(stderr=True), disable=not progress, transient=True) as bar:
        task = bar.add_task("generating", total=len(jobs))
        for index, job in enumerate(jobs):
            generators = [
                torch.Generator(device="cpu").manual_seed(seed + index * images_per_prompt + k)
                for k in range(images_per_prompt)
            ]
            output = pipeline(
                job.prompt,
                num_images_per_prompt=images_per_prompt,
                generator=generators,
                height=resolution,
                width=resolution,
                num_inference_steps=steps,
                output_type="pil",
            )
            for k, image in enumerate(output.images):
                path = images_dir / f"{index:03d}-{k}.png"
                image.save(path)
                job.images.append(str(path))
            generated.append(list(output.images))
            bar.advance(task)
    return generated


def evaluate_pipeline(
    pipeline,
    concepts: list,
    settings: EvaluationSettings,
    *,
    model_id: str,
    data_dir: Path,
    resolution: int,
    output_dir: Path | None = None,
    feature_extractors: dict[str, ImageEmbedder] | None = None,
    progress: bool = True,
) -> EvaluationReport:
    """Evaluate an already-loaded pipeline on dataset ``concepts`` (each with instance/class prompts and images).

    Metrics run in ``settings.metrics`` order. Images are generated once, by the first image metric
    that can run, and not at all when none can, so a missing network costs nothing.
    """
    if not concepts:
        raise EvaluationError(f"dataset {data_dir} holds no subject")
    plan = plan_metrics(settings, feature_extractors)
    output_dir = output_dir or default_output_dir(model_id)
    output_dir.mkdir(parents=True, exist_ok=True)
    real = [_load_images(concept.instance_images) for concept in concepts]
    values: dict[str, float | None] = {}
    skipped = dict(plan.skipped)

    jobs: list[PromptImages] = []
    generated: list[list[Image]] = []
    grid_path = None
    for name in plan.metrics:
        if name in plan.skipped:
            continue
        if name in METRIC_EXTRACTOR and not generated:
            # The first image metric that can run generates the images, once, for all of them.
            jobs, generated, grid_path = _generate_for_metrics(
                pipeline, concepts, settings, resolution, output_dir, progress
            )
        extractor = plan.extractors.get(METRIC_EXTRACTOR.get(name, ""))
        try:
            values[name] = _compute(
                name, extractor, pipeline, concepts, jobs, generated, real, resolution, settings.seed
            )
        except EvaluationError as error:
            skipped[name] = str(error)

    report = EvaluationReport(
        model_id=model_id,
        data_dir=str(data_dir),
        created=datetime.now(timezone.utc),
        seed=settings.seed,
        inference_steps=settings.inference_steps,
        images_per_prompt=settings.images_per_prompt,
        metrics={name: values.get(name) for name in plan.metrics},
        skipped={name: skipped[name] for name in plan.metrics if name in skipped},
        generations=jobs,
        json_path=str(output_dir / REPORT_FILE_NAME),
        grid_path=str(grid_path) if grid_path else None,
    )
    atomic_write_text(output_dir / REPORT_FILE_NAME, report.model_dump_json(indent=2) + "\n")
    return report


def _generate_for_metrics(
    pipeline, concepts: list, settings: EvaluationSettings, resolution: int, output_dir: Path, progress: bool
) -> tuple[list[PromptImages], list[list[Image]], Path]:
    """The prompts, their generated images (saved under ``images/``) and the contact sheet of them all."""
    jobs = _prompt_jobs(concepts, settings)
    generated = _generate(
        pipeline,
        jobs,
        settings.images_per_prompt,
        resolution,
        settings.inference_steps,
        settings.seed,
        output_dir / "images",
        progress,
    )
    flat = [image for images in generated for image in images]
    columns = settings.images_per_prompt if settings.images_per_prompt > 1 else min(5, len(flat))
    grid_path = output_dir / GRID_FILE_NAME
    image_grid(flat, columns).save(grid_path)
    return jobs, generated, grid_path


def _compute(name: str, extractor, pipeline, concepts, jobs, generated, real, resolution: int, seed: int) -> float:
    """One metric's value; raises EvaluationError when the data cannot support it."""
    import numpy as np

    if name == "instance_loss":
        losses, counts = [], []
        for concept, images in zip(concepts, real):
            losses.append(denoising_loss(pipeline, images, concept.instance_prompt, resolution=resolution, seed=seed))
            counts.append(len(images))
        return float(np.average(losses, weights=counts))

    all_generated = [image for images in generated for image in images]
    if name == "fid_score":
        all_real = [image for images in real for image in images]
        if len(all_real) < 2 or len(all_generated) < 2:
            raise EvaluationError(
                f"FID needs at least 2 instance and 2 generated images (got {len(all_real)} and {len(all_generated)})"
            )
        return frechet_distance(extractor.embed_images(all_real), extractor.embed_images(all_generated))
    if name == "clip_t":
        texts = [job.prompt for job, images in zip(jobs, generated) for _ in images]
        return mean_matched_cosine(extractor.embed_images(all_generated), extractor.embed_texts(texts))
    # clip_i and dino: generated vs real images of the same subject, averaged over every pair.
    real_features = [extractor.embed_images(images) for images in real]
    all_real_features = np.concatenate(real_features)
    scores, counts = [], []
    for job, images in zip(jobs, generated):
        reference = all_real_features if job.concept is None else real_features[job.concept]
        scores.append(mean_pairwise_cosine(extractor.embed_images(images), reference))
        counts.append(len(images))
    return float(np.average(scores, weights=counts))


def evaluate_model(
    model_id: str,
    data_dir: Path,
    settings: EvaluationSettings | None = None,
    *,
    output_dir: Path | None = None,
    feature_extractors: dict[str, ImageEmbedder] | None = None,
    progress: bool = True,
) -> EvaluationReport:
    """Load catalog model ``model_id`` and the DreamBooth dataset in ``data_dir``, then evaluate as ``settings`` say."""

    return evaluate_entry(
        load_catalog().get(model_id),
        Path(data_dir),
        settings or EvaluationSettings(),
        output_dir=output_dir,
        feature_extractors=feature_extractors,
        progress=progress,
    )


def evaluate_entry(
    entry,
    data_dir: Path,
    settings: EvaluationSettings,
    *,
    hyperparameters=None,
    output_dir: Path | None = None,
    feature_extractors: dict[str, ImageEmbedder] | None = None,
    progress: bool = True,
) -> EvaluationReport:
    """Evaluate catalog entry ``entry``, registered or just trained with ``hyperparameters``, on the
    dataset in ``data_dir``: for ``txt2img evaluate``, each trial of ``txt2img tune`` and each
    training job of ``txt2img tune --remote --trainer txt2img``."""
    import torch

    catalog = load_catalog()
    dataset = load_dataset(Path(data_dir), hyperparameters or Hyperparameters(), entry.resolution)
    pipeline = load_pipeline(entry, catalog, local_files_only=True)
    if torch.cuda.is_available():
        pipeline = pipeline.to("cuda")
    return evaluate_pipeline(
        pipeline,
        dataset.concepts,
        settings,
        model_id=entry.id,
        data_dir=Path(data_dir),
        resolution=entry.resolution,
        output_dir=output_dir,
        feature_extractors=feature_extractors,
        progress=progress,
    )
