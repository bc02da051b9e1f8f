"""The run's own per-step log: one JSON line per optimizer step (step, total_steps, loss, lr, time)
in ``steps.jsonl`` in the run's folder, written as the run goes.

It is what a person (or a server running the trainer as a child process, serving/train_runner.py)
reads to follow a run: the loss curve so far, the learning rate and how fast steps go. A resumed run
keeps the lines up to its checkpoint's step and drops the ones after it, which it trains again.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from catalog.paths import atomic_write_text

STEP_LOG = "steps.jsonl"


def start_step_log(output_dir: Path, first_step: int) -> None:
    """Keep the lines of steps up to ``first_step`` (the step a run starts or resumes from), drop the rest."""
    kept = [line for line in read_step_log(output_dir) if line["step"] <= first_step]
    atomic_write_text(output_dir / STEP_LOG, "".join(json.dumps(line) + "\n" for line in kept))


def append_step(output_dir: Path, step: int, total_steps: int, loss: float, lr: float) -> None:
    line = {"step": step, "total_steps": total_steps, "loss": loss, "lr": lr, "time": time.time()}
    with open(output_dir / STEP_LOG, "a", encoding="utf-8") as log:
        log.write(json.dumps(line) + "\n")


def read_step_log(output_dir: Path) -> list[dict]:
    """The logged steps, in order; a last line still being written is left out."""
    try:
        text = (output_dir / STEP_LOG).read_text(encoding="utf-8")
    except FileNotFoundError:
        return []
    lines = []
    for line in text.splitlines():
        try:
            lines.append(json.loads(line))
        except json.JSONDecodeError:
            break
    return lines
