"""``txt2img generate`` as a user runs it: a subprocess writing real image files."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture()
def run(tmp_path):
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]),
        "TXT2IMG_HOME": str(tmp_path / "home"),
        "TXT2IMG_TORCH_THREADS": "1",
    }

    def run_cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "txt2img", "generate", *args],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )

    return run_cli


def test_generates_numbered_images_with_their_seeds(run, tmp_path):
    result = run(
        "tiny-sd",
        "a red cube",
        "-o",
        "out/cube.png",
        "--steps",
        "2",
        "--seed",
        "7",
        "-n",
        "2",
        "--width",
        "48",
        "--height",
        "32",
        "--negative",
        "blurry",
    )
    assert result.returncode == 0, result.stderr
    assert "out/cube-0.png  (seed 7)" in result.stdout
    assert "out/cube-1.png  (seed 8)" in result.stdout
    images = [Image.open(tmp_path / "out" / f"cube-{index}.png") for index in range(2)]
    assert all(image.format == "PNG" and image.size == (48, 32) for image in images)
    assert images[0].tobytes() != images[1].tobytes()


@pytest.fixture()
def safety_checker_on(tmp_path, monkeypatch):
    """TXT2IMG_SAFETY_CHECKER on, with a tiny checker that flags every image; before ``run`` reads the environment."""
    from tiny_safety_checker import save_tiny_safety_checker

    checker = save_tiny_safety_checker(tmp_path / "checker", flag_everything=True)
    monkeypatch.setenv("TXT2IMG_SAFETY_CHECKER", "on")
    monkeypatch.setenv("TXT2IMG_SAFETY_CHECKER_REPO", str(checker))


def test_the_safety_checker_blacks_out_what_it_flags_and_says_so(safety_checker_on, run, tmp_path):
    import numpy as np

    result = run("tiny-sd", "a red cube", "-o", "cube.png", "--steps", "2", "--seed", "7")
    assert result.returncode == 0, result.stderr
    assert "cube.png  (seed 7)  flagged by the safety checker: black" in result.stdout
    assert not np.asarray(Image.open(tmp_path / "cube.png")).any()


def test_jpeg_by_suffix(run, tmp_path):
    assert run("tiny-sd", "a red cube", "-o", "a.jpg", "--steps", "1").returncode == 0
    assert Image.open(tmp_path / "a.jpg").format == "JPEG"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["tiny-sdd", "a cat"], "unknown model id 'tiny-sdd'. Did you mean: tiny-sd?"),
        (["tiny-sd", "a cat", "--width", "60"], "--width: Input should be a multiple of 8"),
        (["tiny-sd", "a cat", "--steps", "0"], "--steps: Input should be greater than or equal to 1"),
        (["tiny-sd", "a cat", "--scheduler", "magic"], "--scheduler: Input should be"),
        (["tiny-sd", "a cat", "-o", "out.gif"], "use a .png, .jpg or .jpeg file name"),
        (["tiny-sd", "a cat", "--guidance", "inf"], "--guidance: Input should be a finite number"),
        (["tiny-sd", "a cat", "--guidance", "1e30"], "--guidance: Input should be less than or equal to 50"),
    ],
)
def test_bad_input_is_one_line_and_exit_code_2(run, args, message):
    result = run(*args)
    assert result.returncode == 2
    assert result.stderr.startswith("txt2img: error: ")
    assert message in result.stderr
    assert "Traceback" not in result.stderr
