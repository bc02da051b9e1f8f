"""Training checkpoints: written atomically every N steps, found again by ``--resume``.

A checkpoint is a folder ``checkpoint-<step>/`` holding what ``Accelerator.save_state`` writes
(the trained tensors, optimizer, lr scheduler, loss scaler and each process's RNG state) and
``training_state.json`` (step, loss history, process count and what the run was made with).
Every process writes its part into a staging folder that rank 0 renames into place once all
are done, so a kill at any moment leaves either a complete checkpoint or none.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

from catalog.paths import follow_umask, writing

STATE_FILE = "training_state.json"
_CHECKPOINT_NAME = re.compile(r"^checkpoint-(\d+)$")
_STAGING_PREFIX = ".checkpoint-"
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


def save_checkpoint(accelerator: Any, directory: Path, step: int, state: dict[str, Any]) -> Path:
    """Write ``checkpoint-<step>`` atomically (every process takes part) and drop all but the newest few."""
    final = directory / f"checkpoint-{step}"
    staging = directory / f"{_STAGING_PREFIX}{step}.staging"  # one name every process agrees on
    is_main = accelerator.is_main_process
    with writing(final):
        if is_main:
            shutil.rmtree(staging, ignore_errors=True)
            staging.mkdir(parents=True)
        accelerator.wait_for_everyone()
        try:
            accelerator.save_state(str(staging))
            accelerator.wait_for_everyone()
            if is_main:
                _publish(staging, final, state)
        except BaseException:
            if is_main:
                shutil.rmtree(staging, ignore_errors=True)
            raise
    if is_main:
        for _, old in list_checkpoints(directory)[:-KEEP_CHECKPOINTS]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    if not is_main and accelerator.is_local_main_process:
        # Another machine of a multi-node job (SageMaker): its ranks wrote a local copy nobody publishes.
        shutil.rmtree(staging, ignore_errors=True)
    return final


def _publish(staging: Path, final: Path, state: dict[str, Any]) -> None:
    """Add the run's own state, make every file durable, then rename the folder into place."""
    (staging / STATE_FILE).write_text(json.dumps(state), encoding="utf-8")
    follow_umask(staging)
    for path in staging.rglob("*"):
        if path.is_file():
            _fsync(path)
    os.rename(staging, final)
    _fsync(final.parent)


def load_checkpoint_state(path: Path) -> dict[str, Any] | None:
    """The run's own state saved in a checkpoint folder (``Accelerator.load_state`` reads the rest);
    None for a checkpoint of txt2img's trainer before it ran on accelerate, which it cannot continue."""
    state_file = path / STATE_FILE
    if not state_file.is_file():
        return None
    return json.loads(state_file.read_text(encoding="utf-8"))


def remove_stale_staging(directory: Path) -> None:
    """Delete half-written checkpoint folders a killed run left behind."""
    if directory.is_dir():
        for path in directory.glob(f"{_STAGING_PREFIX}*"):
            shutil.rmtree(path, ignore_errors=True)
