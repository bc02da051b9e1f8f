"""``txt2img deploy`` and ``txt2img endpoints list|invoke|delete``, plus the click options that
``txt2img train --remote`` and ``txt2img tune --remote`` share.

Only click is imported here; boto3 and sagemaker load when a command runs.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from pathlib import Path

import click

from catalog.paths import require_folder
from jumpstart.autoscaling import DEFAULT_TARGET_BACKLOG, DEFAULT_TARGET_INVOCATIONS, Scaling
from jumpstart.deploy import deploy as deploy_model
from jumpstart.endpoints import (
    decode_images,
    delete_endpoint,
    invoke_endpoint,
    invoke_url,
    list_endpoints,
    request_body,
    write_images,
)
from jumpstart.errors import aws_context
from jumpstart.records import recorded_region
from jumpstart.remote import launch_remote_training, launch_remote_tuning
from jumpstart.trainers import DEFAULT_TRAINER, TRAINERS
from txt2img.errors import InputError
from txt2img.extras import require_extra


def aws_options(function: Callable) -> Callable:
    """--region and --role, read by every command that talks to SageMaker."""
    function = click.option(
        "--role",
        envvar="TXT2IMG_SAGEMAKER_ROLE",
        help="IAM role ARN SageMaker runs as (env TXT2IMG_SAGEMAKER_ROLE). See docs/sagemaker.md.",
    )(function)
    return click.option("--region", help="AWS region; default: AWS_REGION or your AWS config.")(function)


def remote_job_options(function: Callable) -> Callable:
    """The options of ``train --remote`` / ``tune --remote``, passed on as keyword arguments."""
    decorators = [
        click.option(
            "--remote", is_flag=True, help="Run on SageMaker (the script --trainer names) instead of this machine."
        ),
        click.option("--instance-type", help="SageMaker training instance, e.g. ml.g5.2xlarge; default: JumpStart's."),
        click.option("--s3-prefix", help="Where data and results go; default s3://sagemaker-REGION-ACCOUNT/txt2img."),
        click.option(
            "--wait/--no-wait", default=True, show_default=True, help="Wait and register the result in the catalog."
        ),
        aws_options,
    ]
    return functools.reduce(lambda wrapped, decorator: decorator(wrapped), reversed(decorators), function)


def trainer_option(function: Callable) -> Callable:
    """--trainer: which training script a SageMaker job of ``train``/``tune --remote`` runs."""
    return click.option(
        "--trainer",
        type=click.Choice(list(TRAINERS)),
        default=DEFAULT_TRAINER,
        show_default=True,
        help="With --remote: JumpStart's training script, or txt2img's own trainer (LoRA, several subjects, "
        "every GPU of --instance-type under torchrun; tune: any objective, any numeric hyperparameter).",
    )(function)


def run_remote_training(data: str, base: str, name: str, hyperparameters, **remote_options) -> None:
    """What ``txt2img train --remote`` does: launch, wait, register, and say so.

    ``remote_options`` are the keyword arguments ``remote_job_options`` adds, ``remote`` included.
    """
    require_extra("aws")

    remote_options.pop("remote", None)
    result = launch_remote_training(data, base, name, hyperparameters, **remote_options)
    _report_remote(result, "training")


def run_remote_tuning(data: str, base: str, name: str, hyperparameters, ranges=None, **remote_options) -> None:
    """What ``txt2img tune --remote`` does; ``remote_options`` may also hold max_jobs, max_parallel_jobs, objective."""
    require_extra("aws")

    remote_options.pop("remote", None)
    result = launch_remote_tuning(data, base, name, hyperparameters, ranges, **remote_options)
    _report_remote(result, "tuning")


def _report_remote(result, kind: str) -> None:
    if isinstance(result, str):
        click.echo(f"started SageMaker {kind} job {result}; it keeps running (and billing) on AWS")
        return
    metrics = "".join(f", {name}={value}" for name, value in (result.metrics or {}).items())
    click.echo(f"registered {result.id}: {result.artifact}{metrics}")
    click.echo(f"deploy it:  txt2img deploy {result.id}")


@click.command("deploy")
@click.argument("model_id")
@click.option("--instance-type", help="e.g. ml.g4dn.xlarge; default: JumpStart's for JumpStart models.")
@click.option("--endpoint-name", help="Default: <model>-<UTC timestamp>.")
@aws_options
@click.option("--async", "is_async", is_flag=True, help="Create an asynchronous endpoint (long generations).")
@click.option("--output", help="s3:// prefix where an --async endpoint writes its results.")
@click.option("--s3-prefix", help="Where local models are uploaded; default s3://sagemaker-REGION-ACCOUNT/txt2img.")
@click.option("--wait/--no-wait", default=True, show_default=True, help="Wait until the endpoint is InService.")
@click.option(
    "--safety-checker",
    is_flag=True,
    help="Pack the safety checker of TXT2IMG_SAFETY_CHECKER_REPO and switch it on: flagged images come back "
    "black, listed in nsfw_content_detected (models on this machine only).",
)
@click.option(
    "--min-instances",
    type=click.IntRange(min=0),
    help="Autoscale from this many instances (0 only with --async); the endpoint starts with it (at least 1).",
)
@click.option("--max-instances", type=click.IntRange(min=1), help="Autoscale up to this many instances.")
@click.option(
    "--target-invocations",
    type=float,
    help="Scaling target per instance: invocations a minute (default 5), or queued requests with --async (default 2).",
)
def deploy(
    model_id: str,
    instance_type: str | None,
    endpoint_name: str | None,
    region: str | None,
    role: str | None,
    is_async: bool,
    output: str | None,
    s3_prefix: str | None,
    wait: bool,
    safety_checker: bool,
    min_instances: int | None,
    max_instances: int | None,
    target_invocations: float | None,
) -> None:
    """Deploy MODEL_ID (JumpStart id, fine-tune or tiny-sd) to a SageMaker endpoint."""
    if is_async != (output is not None):
        raise InputError("--async and --output s3://... go together")
    if (min_instances is None) != (max_instances is None):
        raise InputError("--min-instances and --max-instances go together")
    if target_invocations is not None and min_instances is None:
        raise InputError("--target-invocations needs --min-instances and --max-instances")
    if min_instances is not None and not wait:
        raise InputError("autoscaling needs --wait: SageMaker registers an endpoint only once it is InService")
    require_extra("aws")

    scaling = None
    if min_instances is not None:
        if target_invocations is None:
            target_invocations = DEFAULT_TARGET_BACKLOG if is_async else DEFAULT_TARGET_INVOCATIONS
        scaling = Scaling(min_instances, max_instances, target_invocations, is_async=is_async)

    result = deploy_model(
        model_id,
        instance_type=instance_type,
        endpoint_name=endpoint_name,
        role=role,
        region=region,
        async_output=output,
        s3_prefix=s3_prefix,
        scaling=scaling,
        wait=wait,
        safety_checker=safety_checker,
    )
    name = result.endpoint_name
    kind = "async endpoint" if result.is_async else "endpoint"
    click.echo(f"{kind} {name} ({result.instance_type}, {result.region}) serves {result.model_id}: {result.status}")
    if scaling is not None:
        click.echo(f"autoscaling: {scaling.min_instances}-{scaling.max_instances} instances, target {scaling.target}")
    region_flag = f" --region {result.region}"
    click.echo(f'invoke:   txt2img endpoints invoke {name} "a prompt" -o images/{region_flag}')
    click.echo(
        f"clean up: txt2img endpoints delete {name}{region_flag}   (it is billed per instance-hour until deleted)"
    )


@click.group("endpoints")
def endpoints() -> None:
    """List, invoke and delete SageMaker endpoints (and invoke the local server with --url)."""


@endpoints.command("list")
@click.option("--region", help="AWS region; default: AWS_REGION or your AWS config.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON array.")
def list_command(region: str | None, as_json: bool) -> None:
    """Endpoints in the region and every endpoint txt2img deployed, with the model each serves,
    instances (current/desired) and autoscaling range (min-max)."""
    from dataclasses import asdict

    require_extra("aws")

    found = list_endpoints(region)
    if as_json:
        click.echo(json.dumps([asdict(info) for info in found], indent=2))
        return
    if not found:
        click.echo("no endpoints")
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{len(found)} endpoint(s)", title_justify="left")
    for column in ("name", "region", "status", "model", "instance", "instances", "scaling", "created"):
        table.add_column(column, overflow="fold")
    for info in found:
        counts = "" if info.current_instances is None else f"{info.current_instances}/{info.desired_instances}"
        table.add_row(
            info.name,
            info.region,
            info.status,
            info.model_id or "",
            info.instance_type or "",
            counts,
            info.scaling or "",
            info.created or "",
        )
    Console().print(table)


@endpoints.command("invoke")
@click.argument("name")
@click.argument("prompt")
@click.option("-o", "--output-dir", type=click.Path(path_type=Path), default=Path("."), show_default=True)
@click.option("--seed", type=int)
@click.option("--steps", "num_inference_steps", type=click.IntRange(min=1))
@click.option("--width", type=click.IntRange(min=8))
@click.option("--height", type=click.IntRange(min=8))
@click.option("--guidance-scale", type=float)
@click.option("--negative-prompt")
@click.option("--num-images", "num_images_per_prompt", type=click.IntRange(min=1))
@click.option("--url", help="Talk to a local server instead, e.g. http://localhost:3000 (`bentoml serve`).")
@click.option("--region", help="AWS region of the endpoint; default: where txt2img recorded it.")
def invoke_command(name: str, prompt: str, output_dir: Path, url: str | None, region: str | None, **parameters) -> None:
    """Generate images from PROMPT on endpoint NAME and write them as JPEG files."""
    require_folder(output_dir, "output folder")

    for side in ("width", "height"):
        if parameters[side] is not None and parameters[side] % 8:
            raise InputError(f"--{side} must be divisible by 8")
    body = request_body(prompt, **parameters)
    if url:
        answer = invoke_url(url, body)
    else:
        require_extra("aws")

        answer = invoke_endpoint(aws_context(region or recorded_region(name)), name, body)
    images = decode_images(answer)
    for path in write_images(images, output_dir, name):
        click.echo(f"wrote {path}")


@endpoints.command("delete")
@click.argument("name")
@click.option("--region", help="AWS region of the endpoint; default: where txt2img recorded it.")
def delete_command(name: str, region: str | None) -> None:
    """Delete endpoint NAME with its autoscaling, endpoint config and model (stops its billing)."""
    require_extra("aws")

    for deleted in delete_endpoint(name, region):
        click.echo(f"deleted {deleted}")
