"""Dataset validation: JumpStart's layout, several concepts, and every bad dataset named clearly."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from training.dataset import DATASET_INFO, MIN_INSTANCE_IMAGES, DatasetError, load_dataset
from training.demo_dataset import write_demo_dataset
from training.hyperparameters import Hyperparameters

REPO = Path(__file__).resolve().parents[1]
FLUX_ID = "huggingface-txt2img-black-forest-labs-flux-1-schnell"


@pytest.fixture
def dataset_dir(tmp_path) -> Path:
    return write_demo_dataset(tmp_path / "data")


def _info(folder: Path, data) -> None:
    (folder / DATASET_INFO).write_text(data if isinstance(data, str) else json.dumps(data))


def test_jumpstart_layout(dataset_dir):
    dataset = load_dataset(dataset_dir, Hyperparameters(), family_resolution=64)
    (concept,) = dataset.concepts
    assert concept.instance_prompt == "a photo of sks red toy"
    assert concept.class_prompt == "a photo of a toy"
    assert [p.name for p in concept.instance_images] == [f"red-{i}.png" for i in range(4)]
    assert concept.class_data_dir == dataset_dir / "class_data_dir"
    assert concept.subject == "sks red toy"
    assert dataset.resolution == 64
    assert len(dataset.fingerprint) == 64


def test_resolution_hyperparameter_overrides_family(dataset_dir):
    assert load_dataset(dataset_dir, Hyperparameters(resolution=32), family_resolution=64).resolution == 32


def test_fingerprint_follows_content(dataset_dir):
    first = load_dataset(dataset_dir, Hyperparameters(), 64).fingerprint
    assert load_dataset(dataset_dir, Hyperparameters(), 64).fingerprint == first
    from PIL import Image

    Image.new("RGB", (64, 64), "green").save(dataset_dir / "red-0.png")
    assert load_dataset(dataset_dir, Hyperparameters(), 64).fingerprint != first


def test_several_concepts(tmp_path):
    folder = write_demo_dataset(tmp_path / "data", ("red", "blue"), images_per_subject=3)
    dataset = load_dataset(folder, Hyperparameters(with_prior_preservation=True), 64)
    assert [c.instance_prompt for c in dataset.concepts] == ["a photo of sks red toy", "a photo of sks blue toy"]
    assert dataset.concepts[1].class_data_dir == folder / "blue" / "class_data_dir"
    assert dataset.num_instance_images == 6


def test_missing_json(dataset_dir):
    (dataset_dir / DATASET_INFO).unlink()
    with pytest.raises(DatasetError, match=r"dataset_info\.json: missing"):
        load_dataset(dataset_dir, Hyperparameters(), 64)


@pytest.mark.parametrize("text", ["{not json", "[1, 2]", '{"class_prompt": "a dog"}', '{"instance_prompt": ""}'])
def test_invalid_json(dataset_dir, text):
    _info(dataset_dir, text)
    with pytest.raises(DatasetError, match=r"dataset_info\.json"):
        load_dataset(dataset_dir, Hyperparameters(), 64)


def test_no_images(tmp_path):
    folder = tmp_path / "empty"
    folder.mkdir()
    _info(folder, {"instance_prompt": "a photo of sks dog"})
    with pytest.raises(DatasetError, match="no images"):
        load_dataset(folder, Hyperparameters(), 64)


def test_too_few_images(dataset_dir):
    for path in sorted(dataset_dir.glob("*.png"))[MIN_INSTANCE_IMAGES - 1 :]:
        path.unlink()
    with pytest.raises(DatasetError, match=f"only {MIN_INSTANCE_IMAGES - 1} image"):
        load_dataset(dataset_dir, Hyperparameters(), 64)


def test_corrupt_image_is_named(dataset_dir):
    (dataset_dir / "red-2.png").write_bytes((dataset_dir / "red-2.png").read_bytes()[:100])
    with pytest.raises(DatasetError, match=r"red-2\.png: corrupt or unreadable"):
        load_dataset(dataset_dir, Hyperparameters(), 64)


def test_prior_preservation_needs_class_prompt(dataset_dir):
    _info(dataset_dir, {"instance_prompt": "a photo of sks red toy"})
    assert load_dataset(dataset_dir, Hyperparameters(), 64).concepts[0].class_prompt is None
    with pytest.raises(DatasetError, match="'class_prompt' must be a non-empty string"):
        load_dataset(dataset_dir, Hyperparameters(with_prior_preservation=True), 64)


def test_concept_folder_must_stay_inside(tmp_path):
    folder = write_demo_dataset(tmp_path / "data", ("red", "blue"))
    _info(folder, {"concepts": [{"instance_data_dir": "../elsewhere", "instance_prompt": "sks"}]})
    with pytest.raises(DatasetError, match="must stay inside"):
        load_dataset(folder, Hyperparameters(), 64)
    _info(folder, {"concepts": [{"instance_data_dir": "red", "instance_prompt": "sks", "colour": "red"}]})
    with pytest.raises(DatasetError, match="unknown key"):
        load_dataset(folder, Hyperparameters(), 64)


def test_untrainable_base_is_refused_before_any_work(dataset_dir, txt2img_home):
    from training.dreambooth import TrainingSetupError, train

    with pytest.raises(TrainingSetupError, match="flux"):
        train(dataset_dir, FLUX_ID, "my-flux", Hyperparameters(), progress=False)
    assert not (txt2img_home / "catalog").exists() and not (txt2img_home / "models").exists()


def test_bad_dataset_on_the_cli_is_one_line_and_exit_code_2(dataset_dir, txt2img_home):
    (dataset_dir / "red-1.png").write_bytes(b"not a png")
    result = subprocess.run(
        [sys.executable, "-m", "txt2img", "train", str(dataset_dir), "--base", "tiny-sd", "--name", "mine"],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO), "TXT2IMG_HOME": str(txt2img_home)},
        timeout=120,
    )
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0
    assert "red-1.png: corrupt or unreadable image" in result.stderr
    assert not (txt2img_home / "catalog").exists() and not (txt2img_home / "models").exists()
