"""A full disk during export, training or a catalog write: one line, exit 1, nothing half-written.

The disk is real: a 256 KiB tmpfs mounted for the test (root can mount here; elsewhere the tests
skip, saying why). tiny-sd's weights alone are larger than that.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from training.demo_dataset import write_demo_dataset


@pytest.fixture
def full_disk(tmp_path):
    mount_point = tmp_path / "disk"
    mount_point.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mount_point)], capture_output=True, text=True
    )
    if mounted.returncode:
        pytest.skip(f"cannot mount a small tmpfs here: {mounted.stderr.strip()}")
    yield mount_point
    subprocess.run(["umount", str(mount_point)], check=True)


def _one_line_failure(result: subprocess.CompletedProcess, what: Path) -> None:
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    # Progress may come first (training's bars are on stderr); the failure is the one last line.
    assert result.stderr.splitlines()[-1] == f"txt2img: cannot write {what}: no space left on device"


def test_export_onto_a_full_disk(full_disk, run_cli):
    destination = full_disk / "exported"

    result = run_cli("export", "tiny-sd", str(destination))

    _one_line_failure(result, destination)
    assert list(full_disk.iterdir()) == []  # no half model, no staging folder


def test_training_onto_a_full_disk_leaves_nothing_that_blocks_the_next_run(full_disk, tmp_path, run_cli, cli_env):
    data = write_demo_dataset(tmp_path / "data")
    cli_env["TXT2IMG_HOME"] = str(full_disk)
    command = ("train", str(data), "--base", "tiny-sd", "--name", "full", "--hp", "max_steps=2")
    model_dir = full_disk / "models" / "full" / "model"

    first = run_cli(*command)
    _one_line_failure(first, model_dir)
    assert not (full_disk / "models" / "full").exists()
    assert "full" not in run_cli("catalog", "list", "--json").stdout

    second = run_cli(*command)  # the same failure, not "already holds a run; pass --resume"
    _one_line_failure(second, model_dir)
