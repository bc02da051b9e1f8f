"""``txt2img train``: fine-tune a catalog model on a folder of photos (DreamBooth, full or LoRA).

Imports only click at startup; the trainer and torch load when the command runs.
"""

from __future__ import annotations

from pathlib import Path

import click

from jumpstart.trainers import DEFAULT_TRAINER
from training.distributed import launch_training
from training.dreambooth import TrainingInterrupted, train
from training.hyperparameters import parse_hyperparameters
from txt2img.cli.deploy import remote_job_options, run_remote_training, trainer_option
from txt2img.cli.options import refuse_local_options
from txt2img.errors import InputError, Interrupted


def _hyperparameters(pairs: tuple[str, ...], method: str | None):
    hyperparameters = parse_hyperparameters(pairs)
    if method:
        if any(pair.partition("=")[0].strip() == "method" for pair in pairs) and hyperparameters.method != method:
            raise InputError(f"--method {method} contradicts --hp method={hyperparameters.method}")
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
@click.option(
    "--processes",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="Train data-parallel in this many processes (torchrun): one per GPU, or CPU processes without one.",
)
@trainer_option
@click.option(
    "--instance-count",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="With --remote --trainer txt2img: train data-parallel on this many instances.",
)
@remote_job_options
@click.pass_context
def train_command(
    context: click.Context,
    data_dir: str,
    base: str,
    name: str,
    method: str | None,
    pairs: tuple[str, ...],
    resume: bool,
    processes: int,
    trainer: str,
    instance_count: int,
    **remote_options,
) -> None:
    """Fine-tune MODEL_ID on the photos in DATA_DIR and register the result as NEW_ID.

    DATA_DIR holds the instance images and dataset_info.json ({"instance_prompt": ...,
    "class_prompt": ...}), as for SageMaker JumpStart; see docs/training.md. With --remote
    the job runs on SageMaker (JumpStart's script, or this trainer with --trainer txt2img), and
    DATA_DIR may be an s3:// prefix ending in '/'.
    """
    hyperparameters = _hyperparameters(pairs, method)
    if remote_options["remote"]:
        refuse_local_options(context, ("resume",), "a SageMaker job runs to completion on its own")
        if processes > 1:
            raise InputError("--processes is for local runs; a SageMaker job's instance type sets its GPUs")
        run_remote_training(
            data_dir, base, name, hyperparameters, trainer=trainer, instance_count=instance_count, **remote_options
        )
        return
    for option, value, default in (("--trainer", trainer, DEFAULT_TRAINER), ("--instance-count", instance_count, 1)):
        if value != default:
            raise InputError(f"{option} is for --remote runs; on this machine use --processes")
    if data_dir.startswith("s3://"):
        raise InputError(f"{data_dir} is on S3: add --remote to train on SageMaker, or download it first")
    if processes > 1:
        launch_training(processes, Path(data_dir), base, name, hyperparameters, resume=resume)
        return
    _log_to_stderr()

    try:
        entry = train(Path(data_dir), base, name, hyperparameters, resume=resume)
    except TrainingInterrupted as error:
        raise Interrupted(f"{error}; continue with the same command plus --resume") from None
    click.echo(f"registered {entry.id} ({entry.method} fine-tune of {entry.base}) at {entry.artifact}")
    click.echo(f"try it: txt2img catalog show {entry.id}")
