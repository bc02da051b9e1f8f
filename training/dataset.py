"""Reading and validating a DreamBooth dataset folder (JumpStart's layout, or several concepts).

JumpStart's layout is a folder of instance images plus ``dataset_info.json`` holding
``{"instance_prompt": ..., "class_prompt": ...}`` and, optionally, ``class_data_dir/`` with
class images. txt2img also accepts ``{"concepts": [...]}``, each concept naming its own
``instance_data_dir`` (relative to the dataset folder), prompts and optional ``class_data_dir``.

Everything is checked before any training work starts; each problem raises ``DatasetError``
with a message naming the file at fault.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from training.hyperparameters import Hyperparameters
from training.images import list_images, read_rgb
from txt2img.errors import InputError

DATASET_INFO = "dataset_info.json"
CLASS_DATA_DIR = "class_data_dir"
# The DreamBooth paper fine-tunes on 3 to 5 photos of a subject; fewer cannot show what the
# subject looks like apart from one pose and background.
MIN_INSTANCE_IMAGES = 3
_CONCEPT_KEYS = {"instance_data_dir", "instance_prompt", "class_prompt", "class_data_dir"}


class DatasetError(InputError, ValueError):
    """The dataset folder cannot be trained on; the message names the problem and the file."""


@dataclass
class Concept:
    """One subject: its photos, the prompt that names it, and its class for prior preservation."""

    instance_prompt: str
    class_prompt: str | None
    instance_images: list[Path]
    class_data_dir: Path
    class_images: list[Path] = field(default_factory=list)

    @property
    def subject(self) -> str:
        """The words naming the subject, e.g. "sks dog" for "a photo of sks dog"."""
        prompt = self.instance_prompt.strip()
        for prefix in ("a photo of ", "a picture of ", "an image of "):
            if prompt.lower().startswith(prefix):
                return prompt[len(prefix) :]
        return prompt


@dataclass
class DreamBoothDataset:
    """A validated dataset: its concepts, the training resolution and a content fingerprint."""

    concepts: list[Concept]
    resolution: int
    center_crop: bool
    fingerprint: str
    # dataset_info.json lists "concepts" (txt2img's layout) rather than being JumpStart's one-concept file.
    multi_concept: bool = False

    @property
    def num_instance_images(self) -> int:
        return sum(len(concept.instance_images) for concept in self.concepts)


def _read_info(data_dir: Path) -> dict[str, Any]:
    info_path = data_dir / DATASET_INFO
    if not data_dir.is_dir():
        raise DatasetError(f"{data_dir}: not a directory")
    if not info_path.is_file():
        raise DatasetError(f'{info_path}: missing; it must hold {{"instance_prompt": ..., "class_prompt": ...}}')
    try:
        info = json.loads(info_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise DatasetError(f"{info_path}: invalid JSON: {error}") from None
    if not isinstance(info, dict):
        raise DatasetError(f"{info_path}: must be a JSON object")
    return info


def _prompt(raw: dict[str, Any], key: str, where: str, required: bool) -> str | None:
    value = raw.get(key)
    if value is None and not required:
        return None
    if not isinstance(value, str) or not value.strip():
        raise DatasetError(f"{where}: '{key}' must be a non-empty string")
    return value.strip()


def _concept_specs(info: dict[str, Any], info_path: Path) -> list[tuple[dict[str, Any], str]]:
    """Each concept's raw mapping with a label for error messages."""
    if "concepts" not in info:
        return [({**info, "instance_data_dir": "."}, str(info_path))]
    concepts = info["concepts"]
    if not isinstance(concepts, list) or not concepts:
        raise DatasetError(f"{info_path}: 'concepts' must be a non-empty list")
    specs = []
    for index, raw in enumerate(concepts):
        where = f"{info_path}: concepts[{index}]"
        if not isinstance(raw, dict):
            raise DatasetError(f"{where}: must be an object")
        unknown = sorted(set(raw) - _CONCEPT_KEYS)
        if unknown:
            raise DatasetError(f"{where}: unknown key(s) {unknown}; expected {sorted(_CONCEPT_KEYS)}")
        if not isinstance(raw.get("instance_data_dir"), str):
            raise DatasetError(f"{where}: 'instance_data_dir' must be a folder name")
        specs.append((raw, where))
    return specs


def _inside(root: Path, relative: str, where: str, key: str) -> Path:
    path = (root / relative).resolve()
    if path != root.resolve() and root.resolve() not in path.parents:
        raise DatasetError(f"{where}: '{key}' must stay inside {root}")
    return path


def _check_readable(paths: list[Path]) -> None:
    for path in paths:
        try:
            read_rgb(path)
        except (OSError, SyntaxError, ValueError) as error:
            raise DatasetError(f"{path}: corrupt or unreadable image ({error})") from None


def _fingerprint(info_path: Path, concepts: list[Concept], root: Path) -> str:
    digest = hashlib.sha256()
    digest.update(info_path.read_bytes())
    for concept in concepts:
        for path in concept.instance_images:
            digest.update(str(path.relative_to(root.resolve())).encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()


def load_dataset(data_dir: Path, hyperparameters: Hyperparameters, family_resolution: int) -> DreamBoothDataset:
    """Validate ``data_dir`` and describe it; raises DatasetError on the first problem found."""
    data_dir = Path(data_dir).expanduser()
    info = _read_info(data_dir)
    info_path = data_dir / DATASET_INFO
    concepts = []
    for raw, where in _concept_specs(info, info_path):
        instance_dir = _inside(data_dir, raw["instance_data_dir"], where, "instance_data_dir")
        instance_prompt = _prompt(raw, "instance_prompt", where, required=True)
        class_prompt = _prompt(raw, "class_prompt", where, required=hyperparameters.with_prior_preservation)
        if "class_data_dir" in raw:
            if not isinstance(raw["class_data_dir"], str):
                raise DatasetError(f"{where}: 'class_data_dir' must be a folder name")
            class_dir = _inside(data_dir, raw["class_data_dir"], where, "class_data_dir")
        else:  # JumpStart's place: class_data_dir/ beside the instance images
            class_dir = instance_dir / CLASS_DATA_DIR
        if not instance_dir.is_dir():
            raise DatasetError(f"{instance_dir}: instance image folder does not exist ({where})")
        images = list_images(instance_dir)
        if len(images) < MIN_INSTANCE_IMAGES:
            found = "no images" if not images else f"only {len(images)} image(s)"
            raise DatasetError(
                f"{instance_dir}: {found} (.png, .jpg, .jpeg); DreamBooth needs at least {MIN_INSTANCE_IMAGES}"
            )
        _check_readable(images)
        class_images = list_images(class_dir)[: hyperparameters.num_class_images]
        if hyperparameters.with_prior_preservation:
            _check_readable(class_images)
        assert instance_prompt is not None  # required=True above
        concepts.append(Concept(instance_prompt, class_prompt, images, class_dir, class_images))
    return DreamBoothDataset(
        concepts=concepts,
        resolution=hyperparameters.resolution or family_resolution,
        center_crop=hyperparameters.center_crop,
        fingerprint=_fingerprint(info_path, concepts, data_dir),
        multi_concept="concepts" in info,
    )
