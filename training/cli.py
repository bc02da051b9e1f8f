"""``txt2img train``: fine-tune a catalog model on a folder of photos (DreamBooth, full or LoRA).

Imports only click at startup; the trainer and torch load when the command runs.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import click

from serving.sagemaker_cli import remote_job_options, run_remote_training
from txt2img.errors import fail

INTERRUPTED_EXIT_CODE = 130


def _hyperparameters(pairs: tuple[str, ...], method: Optional[str]):
    from pydantic import ValidationError

    from training.hyperparameters import Hyperparameters

    try:
        hyperparameters = Hyperparameters.from_pairs(list(pairs))
    except ValidationError as error:
        detail = error.errors()[0]
        field = ".".join(str(part) for part in detail["loc"]) or "hyperparameters"
        fail(f"--hp {field}: {detail['msg']}")
    except ValueError as error:
        fail(f"--hp: {error}")
    if method:
        if any(pair.partition("=")[0].strip() == "method" for pair in pairs) and hyperparameters.method != method:
            fail(f"--method {method} contradicts --hp method={hyperparameters.method}")
        hyperparameters.method = method
    return hyperparameters


def _log_to_stderr() -> None:
    import logging

    from rich.console import Console
    from rich.logging import RichHandler

    handler = RichHandler(console=Console(stderr=True), show_path=False, show_time=False)
    logger = logging.getLogger("txt2img.training")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)


@click.command("train")
@click.argument("data_dir")
@click.option("--base", required=True, metavar="MODEL_ID", help="Catalog id to fine-tune, e.g. tiny-sd.")
@click.option("--name", required=True, metavar="NEW_ID", help="Catalog id of the new model.")
@click.option(
    "--method", type=click.Choice(["full", "lora"]), default=None, help="Full fine-tune (default) or LoRA adapter."
)
@click.option(
    "--hp",
    "pairs",
    multiple=True,
    metavar="KEY=VALUE",
    help="A hyperparameter, JumpStart's names (e.g. max_steps=400); repeatable.",
)
@click.option("--resume", is_flag=True, help="Continue the run of NEW_ID from its last checkpoint.")
@remote_job_options
def train_command(
    data_dir: str,
    base: str,
    name: str,
    method: Optional[str],
    pairs: tuple[str, ...],
    resume: bool,
    **remote_options,
) -> None:
    """Fine-tune MODEL_ID on the photos in DATA_DIR and register the result as NEW_ID.

    DATA_DIR holds the instance images and dataset_info.json ({"instance_prompt": ...,
    "class_prompt": ...}), as for SageMaker JumpStart; see docs/training.md. With --remote
    the job runs on SageMaker JumpStart, and DATA_DIR may be an s3:// prefix ending in '/'.
    """
    hyperparameters = _hyperparameters(pairs, method)
    if remote_options["remote"]:
        if resume:
            fail("--resume is for local runs; a SageMaker job runs to completion on its own")
        run_remote_training(data_dir, base, name, hyperparameters, **remote_options)
        return
    if data_dir.startswith("s3://"):
        fail(f"{data_dir} is on S3: add --remote to train on SageMaker, or download it first")
    _log_to_stderr()
    from catalog.index import UnknownModelError
    from catalog.pipelines import ModelLoadError
    from catalog.store import CatalogError
    from training.dataset import DatasetError
    from training.dreambooth import TrainingInterrupted, TrainingSetupError, train

    try:
        entry = train(Path(data_dir), base, name, hyperparameters, resume=resume)
    except (DatasetError, TrainingSetupError, UnknownModelError, ModelLoadError, CatalogError) as error:
        fail(str(error))
    except TrainingInterrupted as error:
        sys.stderr.write(f"txt2img: {error}; continue with the same command plus --resume\n")
        raise SystemExit(INTERRUPTED_EXIT_CODE)
    click.echo(f"registered {entry.id} ({entry.method} fine-tune of {entry.base}) at {entry.artifact}")
    click.echo(f"try it: txt2img catalog show {entry.id}")
