"""serving/safety.py in this process, on the tiny checker whose verdict the test chooses."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from tiny_safety_checker import save_tiny_safety_checker

from serving.safety import SafetyChecker


def noise_images(count: int, size=(64, 48)) -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)) for _ in range(count)]


@pytest.mark.parametrize("flag_everything", [True, False])
def test_a_saved_checker_loads_from_a_folder_and_gives_its_verdict(tmp_path, flag_everything):
    checker = SafetyChecker.load(
        str(save_tiny_safety_checker(tmp_path, flag_everything=flag_everything)), local_files_only=True
    )
    images = noise_images(3)
    checked, flags = checker.check(images)
    assert flags == [flag_everything] * 3
    for original, image in zip(images, checked):
        assert image.size == original.size
        if flag_everything:
            assert not np.asarray(image).any()  # black
        else:
            assert image is original


def test_no_images_no_verdicts(tmp_path):
    checker = SafetyChecker.load(str(save_tiny_safety_checker(tmp_path, flag_everything=True)), local_files_only=True)
    assert checker.check([]) == ([], [])


def test_a_folder_without_a_checker_fails_to_load(tmp_path):
    with pytest.raises(OSError):
        SafetyChecker.load(str(tmp_path), local_files_only=True)
