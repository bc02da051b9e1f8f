"""Training checkpoints: written atomically every N steps, found again by ``--resume``.

A checkpoint is a folder ``checkpoint-<step>/`` holding ``trainable.safetensors`` (the weights
being trained) and ``training_state.pt`` (optimizer, lr scheduler, step, RNG, loss history).
It is assembled under a temporary name and renamed into place, so a kill at any moment leaves
either a complete checkpoint or none.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path
from typing import Any

from catalog.paths import follow_umask, staging_directory, writing

WEIGHTS_FILE = "trainable.safetensors"
STATE_FILE = "training_state.pt"
_CHECKPOINT_NAME = re.compile(r"^checkpoint-(\d+)$")
# Keeping the previous checkpoint too means a corrupt disk write never costs the whole run.
KEEP_CHECKPOINTS = 2


def _fsync(path: Path) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def list_checkpoints(directory: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints in ``directory`` as (step, path), oldest first."""
    if not directory.is_dir():
        return []
    found = []
    for path in directory.iterdir():
        match = _CHECKPOINT_NAME.match(path.name)
        if match and path.is_dir():
            found.append((int(match.group(1)), path))
    return sorted(found)


def latest_checkpoint(directory: Path) -> Path | None:
    checkpoints = list_checkpoints(directory)
    return checkpoints[-1][1] if checkpoints else None


def save_checkpoint(directory: Path, step: int, weights: dict[str, Any], state: dict[str, Any]) -> Path:
    """Write ``checkpoint-<step>`` atomically and drop all but the newest few."""
    final = directory / f"checkpoint-{step}"
    with writing(final):
        _save_staged(final, weights, state)
    for _, old in list_checkpoints(directory)[:-KEEP_CHECKPOINTS]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _save_staged(final: Path, weights: dict[str, Any], state: dict[str, Any]) -> None:
    import torch
    from safetensors.torch import save_file

    directory = final.parent
    staging = staging_directory(directory, final.name)
    try:
        save_file({key: value.to("cpu") for key, value in weights.items()}, str(staging / WEIGHTS_FILE))
        torch.save(state, staging / STATE_FILE)
        follow_umask(staging)
        for name in (WEIGHTS_FILE, STATE_FILE):
            _fsync(staging / name)
        os.rename(staging, final)
        _fsync(directory)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def load_checkpoint(path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """The (weights, state) saved in a checkpoint folder."""
    import torch
    from safetensors.torch import load_file

    weights = load_file(str(path / WEIGHTS_FILE))
    # weights_only: the state holds tensors, numbers and strings, never code.
    state = torch.load(path / STATE_FILE, map_location="cpu", weights_only=True)
    return weights, state


def remove_stale_staging(directory: Path) -> None:
    """Delete half-written checkpoint folders a killed run left behind."""
    if directory.is_dir():
        for path in directory.glob(".checkpoint-*"):
            shutil.rmtree(path, ignore_errors=True)
