"""`txt2img demo photos`: the docs' running example makes its dataset with it, so it must be one trainers accept."""

from __future__ import annotations

from PIL import Image

from training.dataset import load_dataset
from training.hyperparameters import Hyperparameters


def test_demo_photos_writes_a_dataset_the_trainer_accepts(run_cli, tmp_path):
    folder = tmp_path / "toy-photos"
    result = run_cli("demo", "photos", str(folder), check_rc=0)
    assert f"wrote 4 photos and dataset_info.json to {folder}" in result.stdout
    dataset = load_dataset(folder, Hyperparameters(), family_resolution=64)
    [concept] = dataset.concepts
    assert concept.instance_prompt == "a photo of sks red toy" and concept.class_prompt == "a photo of a toy"
    assert len(concept.instance_images) == 4
    assert all(Image.open(path).size == (64, 64) for path in concept.instance_images)


def test_several_subjects_make_a_concepts_dataset(run_cli, tmp_path):
    folder = tmp_path / "toys"
    run_cli("demo", "photos", str(folder), "--subject", "red", "--subject", "blue", "--images", "3", "--size", "32")
    dataset = load_dataset(folder, Hyperparameters(), family_resolution=64)
    assert dataset.multi_concept
    assert [concept.instance_prompt for concept in dataset.concepts] == [
        "a photo of sks red toy",
        "a photo of sks blue toy",
    ]
    assert all(Image.open(path).size == (32, 32) for c in dataset.concepts for path in c.instance_images)


def test_a_folder_with_files_is_refused_in_one_line(run_cli, tmp_path):
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "holiday.jpg").write_bytes(b"not to be lost")
    result = run_cli("demo", "photos", str(folder), check_rc=2)
    assert result.stderr == f"txt2img: error: {folder} is not empty; name a new or empty folder\n"
    assert sorted(path.name for path in folder.iterdir()) == ["holiday.jpg"]


def test_bad_options_exit_2(run_cli, tmp_path):
    result = run_cli("demo", "photos", str(tmp_path / "x"), "--subject", "pink", check_rc=2)
    assert len(result.stderr.splitlines()) == 1 and "pink" in result.stderr
    run_cli("demo", "photos", str(tmp_path / "y"), "--images", "2", check_rc=2)
