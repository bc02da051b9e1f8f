"""Shared test fixtures: every test gets its own empty txt2img home."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from bentoml_server import SESSION_MAX_QUEUE, SESSION_REQUEST_TIMEOUT_S, offline_server
from chromium_browser import launched_chromium
from serving_finetunes import register_finetunes

REPO_ROOT = Path(__file__).resolve().parents[1]

# Fixture modules: their fixtures reach every test module by name, none imports them.
pytest_plugins = ["aws_fixtures", "postgres_server", "family_stand_ins"]


@pytest.fixture(autouse=True)
def txt2img_home(tmp_path_factory, monkeypatch) -> Path:
    """An empty TXT2IMG_HOME, so tests never read or write the user's real catalog."""
    home = tmp_path_factory.mktemp("txt2img-home")
    monkeypatch.setenv("TXT2IMG_HOME", str(home))
    return home


@pytest.fixture
def one_torch_thread():
    """One torch thread: on a small shared CPU it beats one per core, which spin against other jobs."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def no_local_metric_weights(tmp_path, monkeypatch):
    """No metric weights from the user's environment or HF cache may leak into a test."""
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    for name in ("INCEPTION", "CLIP", "DINO"):
        monkeypatch.delenv(f"TXT2IMG_{name}_PATH", raising=False)


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


# One `bentoml serve` for the whole session, shared by the serving and protocol test modules.
@pytest.fixture(scope="session")
def server_home(tmp_path_factory) -> Path:
    home = tmp_path_factory.mktemp("serving-home")
    register_finetunes(home)
    return home


@pytest.fixture(scope="session")
def server(server_home):
    settings = {
        "max_loaded_models": "1",  # LRU eviction shows with two full models
        "max_steps": "1000",  # long requests for the timeout and disconnect tests
        "max_queue": str(SESSION_MAX_QUEUE),
        "request_timeout_s": str(SESSION_REQUEST_TIMEOUT_S),
    }
    with offline_server(server_home, **settings) as url:
        yield url


# tests/test_train_jobs.py: two workers, so that a model one of them trains is served by both.
@pytest.fixture(scope="module")
def training_server(tmp_path_factory) -> Iterator[tuple[str, Path]]:
    home = tmp_path_factory.mktemp("training-home")
    settings = {"workers": "2", "train_max_images": "6", "train_max_image_pixels": str(256 * 256)}
    with offline_server(home, env={"OMP_NUM_THREADS": "1"}, **settings) as url:
        yield url, home


# tests/test_docs_examples.py: the docs' reader, one temporary home and working folder, and one server
# sharing that home, so that a model the README trains is served by name.
@pytest.fixture(scope="module")
def docs_server(tmp_path_factory) -> Iterator[tuple[str, Path, Path]]:
    home = tmp_path_factory.mktemp("docs-home")
    workdir = tmp_path_factory.mktemp("docs-workdir")
    with offline_server(home) as url:
        yield url, home, workdir


@pytest.fixture(scope="module")
def browser():
    """Debian's Chromium, headless, for the playground's tests (never a browser Playwright downloads)."""
    with launched_chromium() as chromium:
        yield chromium
