"""Fixtures for tests/test_families.py: each family's tiny stand-in registered as a catalog model of that
family, and one ``bentoml serve`` of all of them (registered as a plugin in conftest.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from bentoml_server import REPO_ROOT, offline_server

from catalog.store import write_entry
from catalog.tiny_families import STAND_IN_IDS, TINY_PIPELINES, stand_in_entries

# Served from BentoML's model store (``txt2img bento-model save``), so that a stored export of it is what serves.
BENTO_STAND_IN = STAND_IN_IDS["flux"]


def register_stand_ins(home: Path) -> None:
    """Add each family's stand-in (but tiny-sd, which is built in) to the user catalog of txt2img home ``home``."""
    for entry in stand_in_entries():
        write_entry(entry, home / "catalog")


def save_to_bento_store(home: Path, model_id: str) -> None:
    """``txt2img bento-model save`` into the BentoML home ``bentoml serve`` will use for ``home``."""
    env = {
        **os.environ,
        "TXT2IMG_HOME": str(home),
        "BENTOML_HOME": str(home / "bentoml"),
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])),
    }
    saved = subprocess.run(
        [sys.executable, "-m", "txt2img", "bento-model", "save", model_id],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert saved.returncode == 0, saved.stderr


@pytest.fixture(scope="module")
def stand_in_pipelines():
    """One built tiny pipeline per family, shared by a module's tests."""
    return {name: build() for name, build in TINY_PIPELINES.items()}


@pytest.fixture(scope="module")
def stand_in_home(tmp_path_factory) -> Path:
    """A txt2img home whose catalog holds every family's stand-in, with the Flux one in BentoML's model store."""
    home = tmp_path_factory.mktemp("families-home")
    register_stand_ins(home)
    save_to_bento_store(home, BENTO_STAND_IN)
    return home


@pytest.fixture(scope="module")
def families_server(stand_in_home) -> Iterator[str]:
    """One ``bentoml serve`` of every family's stand-in, the Flux one by default (its warm-up included)."""
    settings = {"model": STAND_IN_IDS["flux"], "max_loaded_models": str(len(STAND_IN_IDS) + 1)}
    with offline_server(stand_in_home, **settings) as url:
        yield url


@pytest.fixture(scope="module")
def families_http(families_server) -> Iterator:
    """An HTTP client of ``families_server``."""
    import httpx

    with httpx.Client(base_url=families_server, timeout=120) as client:
        yield client
