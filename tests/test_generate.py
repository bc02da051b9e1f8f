"""``txt2img generate`` as a user runs it: a subprocess writing real image files."""

from __future__ import annotations

import os
import resource
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture()
def generate_env(tmp_path) -> dict[str, str]:
    """The environment ``run`` runs ``txt2img generate`` in; a test may add settings before it runs."""
    return {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]),
        "TXT2IMG_HOME": str(tmp_path / "home"),
        "TXT2IMG_TORCH_THREADS": "1",
    }


def cap_address_space(gigabytes: int = 4) -> None:
    """Run in each ``txt2img generate`` child: an allocation past this fails at once, as it would on a
    small machine, so a run that ignores its limits fails here without taking the test machine's memory."""
    limit = gigabytes << 30
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))


@pytest.fixture()
def run(tmp_path, generate_env):
    def run_cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "txt2img", "generate", *args],
            cwd=tmp_path,
            env=generate_env,
            capture_output=True,
            text=True,
            timeout=300,
            preexec_fn=cap_address_space,
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


def test_images_come_max_batch_size_at_a_time_each_written_as_it_is_made(generate_env, tmp_path):
    generate_env["TXT2IMG_MAX_BATCH_SIZE"] = "2"
    command = [sys.executable, "-m", "txt2img", "generate", "tiny-sd", "a red cube", "-o", "cube.png"]
    process = subprocess.Popen(
        [*command, "--steps", "1", "--seed", "5", "-n", "5"],
        cwd=tmp_path,
        env=generate_env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=cap_address_space,
    )
    progress = []
    for line in process.stderr:
        progress.append(line.strip())
        # Each line comes after its batch's files: those files are there, whatever comes next.
        done = int(line.split()[1].split("/")[0])
        assert all((tmp_path / f"cube-{index}.png").is_file() for index in range(done)), progress
    assert process.wait(timeout=300) == 0, progress
    assert progress == ["generated 2/5 images", "generated 4/5 images", "generated 5/5 images"]
    assert [line.split("(seed ")[1] for line in process.stdout.read().splitlines()] == ["5)", "6)", "7)", "8)", "9)"]


@pytest.mark.parametrize(
    ("args", "settings", "message"),
    [
        (["-n", "2000"], {}, "num_images is 2000, above the limit of 8: raise TXT2IMG_MAX_IMAGES"),
        (["-n", "3"], {"TXT2IMG_MAX_IMAGES": "2"}, "num_images is 3, above the limit of 2: raise TXT2IMG_MAX_IMAGES"),
        (["--steps", "151"], {}, "num_inference_steps is 151, above the limit of 150: raise TXT2IMG_MAX_STEPS"),
        (
            ["--width", "99999992", "--height", "64"],
            {},
            "99999992x64 is 6399999488 pixels, above the limit of 1048576: raise TXT2IMG_MAX_PIXELS",
        ),
        (["--width", "99999992"], {}, "99999992x64 is 6399999488 pixels"),  # the model's own height
    ],
)
def test_the_servers_limits_hold_in_one_line_naming_how_to_lift_them(
    run, generate_env, tmp_path, args, settings, message
):
    generate_env.update(settings)
    result = run("tiny-sd", "a red cube", "-o", "cube.png", *args)
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith("txt2img: error: ") and result.stderr.count("\n") == 1, result.stderr
    assert message in result.stderr and "or pass --no-limits" in result.stderr
    assert not list(tmp_path.glob("cube*.png"))


def test_no_limits_lifts_them(run, generate_env, tmp_path):
    generate_env["TXT2IMG_MAX_IMAGES"] = "1"
    result = run("tiny-sd", "a red cube", "-o", "cube.png", "--steps", "1", "-n", "2", "--no-limits")
    assert result.returncode == 0, result.stderr
    assert sorted(path.name for path in tmp_path.glob("cube*.png")) == ["cube-0.png", "cube-1.png"]


def test_running_out_of_memory_without_limits_is_one_line_naming_the_size(run):
    result = run("tiny-sd", "a red cube", "--steps", "1", "--width", "99999992", "--height", "64", "--no-limits")
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith("txt2img: error: out of memory") and result.stderr.count("\n") == 1, result.stderr
    assert "99999992x64" in result.stderr


def test_out_of_memory_is_told_apart_on_every_device():
    import torch

    from serving.generation import is_out_of_memory

    cuda = torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
    cpu = RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 40000000000 bytes.")
    assert all(is_out_of_memory(error) for error in (cuda, cpu, MemoryError()))
    assert not is_out_of_memory(RuntimeError("expected all tensors to be on the same device"))
    assert not is_out_of_memory(ValueError("can't allocate memory"))
