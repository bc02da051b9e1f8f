"""Shared test fixtures: every test gets its own empty txt2img home."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def txt2img_home(tmp_path_factory, monkeypatch) -> Path:
    """An empty TXT2IMG_HOME, so tests never read or write the user's real catalog."""
    home = tmp_path_factory.mktemp("txt2img-home")
    monkeypatch.setenv("TXT2IMG_HOME", str(home))
    return home


@pytest.fixture
def cli_env(txt2img_home) -> dict[str, str]:
    """Environment for running ``python -m txt2img`` in a subprocess against this checkout."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    return env


@pytest.fixture
def run_cli(cli_env):
    """Run the txt2img CLI as a user would, returning the completed process."""
    import subprocess

    def run(*args: str, check_rc: int | None = None) -> subprocess.CompletedProcess:
        result = subprocess.run(
            [sys.executable, "-m", "txt2img", *args], capture_output=True, text=True, env=cli_env, timeout=300
        )
        if check_rc is not None:
            assert result.returncode == check_rc, result.stderr
        return result

    return run
