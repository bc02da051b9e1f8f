"""A training job's upload (``POST /jobs/train``'s multipart form), checked as bad input first.

Every check runs before anything is written: the count of photos, each one decoded under a pixel cap
(a decompression bomb is refused from its header, before its pixels are), files that are not images
refused one by one by their number and name, the name of the new model free (the catalog, the name
claims of running trainers, and the training jobs that will create it), the base trainable and the
hyperparameters those of ``txt2img train --hp`` with the same errors. Only then are the photos written,
EXIF orientation applied, as ``NN.png`` in the job's own folder: an uploaded file's name is never a path.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, ImageOps, UnidentifiedImageError
from starlette.datastructures import UploadFile
from starlette.requests import Request

from catalog.schema import ID_PATTERN
from catalog.store import NameInUse, claim_name, load_catalog
from serving.jobs import JobStore
from serving.settings import ServingSettings
from training.dataset import DATASET_INFO
from training.dreambooth import default_output_dir, trainable_base
from training.hyperparameters import Hyperparameters
from txt2img.cli.options import parse_hyperparameters
from txt2img.errors import InputError, Txt2ImgError

MIN_IMAGES = 3
# The form fields that are not hyperparameters; every other field is one, under its JumpStart name.
JOB_FIELDS = ("images", "instance_prompt", "class_prompt", "name", "base", "method", "webhook")
MAX_FIELDS = 64
PHOTOS_DIR = "photos"


class NameTaken(Txt2ImgError):
    http_status = 409


@dataclass
class TrainingForm:
    """A checked upload: the job's request, and its photos decoded and upright."""

    name: str
    base: str
    method: str
    instance_prompt: str
    class_prompt: str | None
    hyperparameters: Hyperparameters
    pairs: list[str]  # the hyperparameters as the form gave them, for the trainer's --hp
    webhook: str | None
    photos: list[Image.Image] = field(default_factory=list)

    def request(self, data_dir: Path) -> dict:
        """What the job store keeps: everything the trainer's command line is made from."""
        return {
            "name": self.name,
            "base": self.base,
            "method": self.method,
            "instance_prompt": self.instance_prompt,
            "class_prompt": self.class_prompt,
            "hyperparameters": self.pairs,
            "data_dir": str(data_dir),
        }


async def read_training_form(request: Request, settings: ServingSettings, store: JobStore) -> TrainingForm:
    """The checked form of ``request``; raises InputError (400), NameTaken (409) or UnknownModelError (404)."""
    from starlette.exceptions import HTTPException
    from starlette.formparsers import MultiPartException

    try:
        form = await request.form(max_files=settings.train_max_images + 1, max_fields=MAX_FIELDS)
    except (HTTPException, MultiPartException) as error:
        detail = getattr(error, "detail", None) or getattr(error, "message", str(error))
        raise InputError(f"the multipart form cannot be read: {detail}") from None
    texts = {key: value for key, value in form.multi_items() if isinstance(value, str)}
    uploads = [value for key, value in form.multi_items() if key == "images" and isinstance(value, UploadFile)]
    stray = sorted({key for key, value in form.multi_items() if not isinstance(value, str) and key != "images"})
    if stray:
        raise InputError(f"only field 'images' takes files; got files in {', '.join(stray)}")
    checked = _check_fields(texts, settings, store)
    _check_count(len(uploads), settings.train_max_images)
    checked.photos = _decode_all(uploads, settings.train_max_image_pixels)
    return checked


def _decode_all(uploads: list[UploadFile], max_pixels: int) -> list[Image.Image]:
    """Every upload decoded; else one 400 naming each file that is not a readable image within the cap."""
    photos, problems = [], []
    for index, upload in enumerate(uploads, start=1):
        try:
            photos.append(_decode(index, upload, max_pixels))
        except InputError as error:
            problems.append(str(error))
    if problems:
        raise InputError("; ".join(problems))
    return photos


def _check_count(count: int, most: int) -> None:
    if not MIN_IMAGES <= count <= most:
        raise InputError(f"a training job takes {MIN_IMAGES} to {most} files in field 'images'; got {count}")


def _check_fields(texts: dict[str, str], settings: ServingSettings, store: JobStore) -> TrainingForm:
    for required in ("name", "instance_prompt"):
        if not texts.get(required, "").strip():
            raise InputError(f"field '{required}' is required")
    method = texts.get("method", "lora")
    if method not in ("lora", "full"):
        raise InputError(f"field 'method' is {method!r}; use 'lora' or 'full'")
    class_prompt = texts.get("class_prompt", "").strip() or None
    pairs = [f"{key}={value}" for key, value in texts.items() if key not in JOB_FIELDS]
    if class_prompt and not any(pair.startswith("with_prior_preservation=") for pair in pairs):
        pairs.append("with_prior_preservation=true")  # a class prompt asks for prior preservation
    hyperparameters = parse_hyperparameters(tuple(pairs))  # the errors of `txt2img train --hp`
    hyperparameters.method = method
    name = texts["name"].strip()
    base = texts.get("base", "").strip() or settings.model
    _check_name_free(name, store)
    trainable_base(load_catalog(), base)
    return TrainingForm(
        name, base, method, texts["instance_prompt"].strip(), class_prompt, hyperparameters, pairs, texts.get("webhook")
    )


def _check_name_free(name: str, store: JobStore) -> None:
    """409 when ``name`` is in the catalog, claimed by a running trainer, or left by another run."""
    if not ID_PATTERN.match(name):
        raise InputError(
            f"invalid model name {name!r}: use lowercase letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    if name in load_catalog():
        raise NameTaken(f"model '{name}' already exists in the catalog; pick another name")
    try:
        with claim_name(name):
            pass
    except NameInUse as error:
        raise NameTaken(str(error)) from None
    pending = store.unfinished_training_named(name)
    if pending is not None:
        raise NameTaken(
            f"model '{name}' is what training job {pending.id} ({pending.status}) creates; pick another name"
        )
    output_dir = default_output_dir(name)
    if output_dir.exists() and any(output_dir.iterdir()):
        raise NameTaken(f"{output_dir} already holds a run of '{name}'; pick another name")


def _decode(index: int, upload: UploadFile, max_pixels: int) -> Image.Image:
    """The upload's image, upright (EXIF orientation applied), in RGB; the pixel cap is read from the
    header, so a bomb is refused before its pixels are decoded. A file name that is a path is refused
    (it is never used as one: the photos are written as NN.png, but a client sending one is confused)."""
    shown = repr((upload.filename or "")[:80])
    if any(mark in (upload.filename or "") for mark in ("/", "\\")) or upload.filename in (".", ".."):
        raise InputError(f"file {index} ({shown}) has a path for a name; send a plain file name")
    upload.file.seek(0)
    try:
        with Image.open(upload.file) as image:
            if image.width * image.height > max_pixels:
                raise InputError(
                    f"file {index} ({shown}) is {image.width}x{image.height} pixels, more than "
                    f"TXT2IMG_TRAIN_MAX_IMAGE_PIXELS ({max_pixels})"
                )
            image.load()
            return ImageOps.exif_transpose(image).convert("RGB")
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError, SyntaxError, ValueError) as error:
        if isinstance(error, Image.DecompressionBombError):
            raise InputError(f"file {index} ({shown}) decodes to too many pixels (a decompression bomb)") from None
        raise InputError(f"file {index} ({shown}) is not an image this server can read") from None


def write_job_folder(folder: Path, form: TrainingForm) -> Path:
    """The photos as ``photos/NN.png`` and dataset_info.json in ``folder`` (the job's own); the data folder.
    On any failure nothing is left."""
    data_dir = folder / PHOTOS_DIR
    try:
        data_dir.mkdir(parents=True)
        for number, photo in enumerate(form.photos, start=1):
            photo.save(data_dir / f"{number:02d}.png")
        info = {"instance_prompt": form.instance_prompt}
        if form.class_prompt:
            info["class_prompt"] = form.class_prompt
        (data_dir / DATASET_INFO).write_text(json.dumps(info), encoding="utf-8")
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    return data_dir
