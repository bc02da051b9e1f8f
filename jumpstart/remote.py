"""Remote DreamBooth on SageMaker: JumpStart training jobs and Automatic Model Tuning, whose
result comes back into the catalog as a fine-tune that ``txt2img deploy`` can deploy.

``launch_remote_training`` and ``launch_remote_tuning`` are what ``txt2img train --remote`` and
``txt2img tune --remote`` call; both take the same ``Hyperparameters`` as the local trainer.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from catalog.schema import CatalogEntry
from jumpstart.errors import AwsContext, SageMakerError, aws_context, aws_errors
from jumpstart.specs import TRAINING_ENTRY_SCRIPT, TrainingSpec
from training.hyperparameters import JUMPSTART_NAMES, Hyperparameters

DATASET_INFO = "dataset_info.json"
# What JumpStart's training script prints when compute_fid is on, and how SageMaker reads it.
METRIC_DEFINITIONS = {"fid_score": {"Name": "fid_score", "Regex": r"fid_score=([-+]?\d\.?\d*)"}}
# name -> (low, high, logarithmic); the ranges JumpStart's own tuning example searches.
DEFAULT_TUNING_RANGES: dict[str, tuple[float, float, bool]] = {
    "learning_rate": (1e-7, 3e-6, False),
    "max_steps": (50, 400, False),
}
POLL_SECONDS = 30.0
FINISHED = ("Completed", "Failed", "Stopped")


@dataclass(frozen=True)
class RemoteJobSetup:
    """What a remote training or tuning job needs, checked and uploaded before anything starts."""

    context: AwsContext
    base: CatalogEntry
    name: str
    spec: TrainingSpec
    instance_type: str
    data_uri: str
    output_path: str
    dataset_fingerprint: str | None


def dataset_fingerprint(folder: Path) -> str:
    """A sha256 over every file's relative path and bytes: the same data gives the same value."""
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest.update(path.relative_to(folder).as_posix().encode("utf-8") + b"\0")
        with path.open("rb") as stream:
            for block in iter(lambda: stream.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def _check_local_dataset(folder: Path) -> None:
    if not folder.is_dir():
        raise SageMakerError(f"training data {folder} is not a folder (or pass an s3://bucket/prefix/ ending in '/')")
    info = folder / DATASET_INFO
    if not info.is_file():
        raise SageMakerError(
            f"{folder} has no {DATASET_INFO}; JumpStart training needs one like "
            '{"instance_prompt": "a photo of sks dog", "class_prompt": "a photo of a dog"}'
        )
    try:
        prompt = json.loads(info.read_text(encoding="utf-8")).get("instance_prompt")
    except (json.JSONDecodeError, AttributeError):
        prompt = None
    if not isinstance(prompt, str) or not prompt.strip():
        raise SageMakerError(f'{info} must be a JSON object with a non-empty "instance_prompt"')


def _job_stem(name: str, limit: int) -> str:
    """A SageMaker job-name stem: letters, digits and '-', at most ``limit`` characters."""
    return re.sub(r"[^a-zA-Z0-9]+", "-", name).strip("-")[:limit].rstrip("-")


def prepare_remote_job(
    data: str,
    base: str,
    name: str,
    hyperparameters: Hyperparameters,
    *,
    instance_type: str | None,
    s3_prefix: str | None,
    role: str | None,
    region: str | None,
) -> RemoteJobSetup:
    """Check the request, resolve JumpStart's training spec, and upload local data to S3."""
    from catalog.index import UnknownModelError
    from catalog.schema import ID_PATTERN
    from catalog.store import load_catalog
    from jumpstart.s3 import default_s3_prefix, join_s3, split_s3_uri, upload_folder
    from jumpstart.specs import training_spec

    catalog = load_catalog()
    try:
        base_entry = catalog.get(base)
    except UnknownModelError as error:
        raise SageMakerError(str(error)) from error
    if base_entry.source != "jumpstart" or not base_entry.fine_tunable or base_entry.jumpstart is None:
        fine_tunable = [entry.id for entry in catalog if entry.fine_tunable]
        raise SageMakerError(
            f"SageMaker JumpStart cannot fine-tune '{base}'; remote training works for: {', '.join(fine_tunable)}"
        )
    if not ID_PATTERN.match(name):
        raise SageMakerError(f"invalid model name '{name}': use lowercase letters, digits, '.', '_' or '-'")
    if name in catalog:
        raise SageMakerError(f"the catalog already has a model '{name}'; choose another name")
    if hyperparameters.method != "full":
        raise SageMakerError("JumpStart's training script makes full fine-tunes only; drop method=lora for --remote")
    if s3_prefix is not None:
        split_s3_uri(s3_prefix)
    if data.startswith("s3://"):
        split_s3_uri(data)
        if not data.endswith("/"):
            raise SageMakerError(f"an S3 training prefix must end with '/': {data}/")
    else:
        _check_local_dataset(Path(data).expanduser())

    context = aws_context(region, role, need_role=True)
    spec = training_spec(base_entry.jumpstart.model_id, context.region, instance_type)
    prefix = s3_prefix or default_s3_prefix(context)
    fingerprint = None
    data_uri = data
    if not data.startswith("s3://"):
        folder = Path(data).expanduser()
        fingerprint = dataset_fingerprint(folder)
        data_uri = upload_folder(context, folder, join_s3(prefix, "datasets", fingerprint[:16]), f"uploading {folder}")
    return RemoteJobSetup(
        context=context,
        base=base_entry,
        name=name,
        spec=spec,
        instance_type=instance_type or spec.default_instance_type,
        data_uri=data_uri,
        output_path=join_s3(prefix, "jobs", name),
        dataset_fingerprint=fingerprint,
    )


def _model_trainer(setup: RemoteJobSetup, hyperparameters: Hyperparameters):
    """A sagemaker 3.x ModelTrainer running JumpStart's training container and script."""
    from sagemaker.core.helper.session_helper import Session
    from sagemaker.core.training.configs import Compute, OutputDataConfig, SourceCode
    from sagemaker.train import ModelTrainer

    return ModelTrainer(
        training_image=setup.spec.image_uri,
        role=setup.context.role,
        compute=Compute(instance_type=setup.instance_type, instance_count=1),
        source_code=SourceCode(source_dir=setup.spec.script_uri, entry_script=TRAINING_ENTRY_SCRIPT),
        hyperparameters=hyperparameters.sagemaker_strings(),
        base_job_name=_job_stem(setup.name, 47),
        output_data_config=OutputDataConfig(s3_output_path=setup.output_path),
        sagemaker_session=Session(boto_session=setup.context.session),
    )


def _input_channels(setup: RemoteJobSetup) -> list:
    from sagemaker.core.training.configs import InputData

    return [
        InputData(channel_name="training", data_source=setup.data_uri),
        InputData(channel_name="model", data_source=setup.spec.base_model_uri),
    ]


def register_training_job(
    context: AwsContext,
    job_name: str,
    name: str,
    base: CatalogEntry,
    hyperparameters: Hyperparameters,
    *,
    dataset_fingerprint: str | None = None,
    metrics: dict[str, float | None] | None = None,
) -> CatalogEntry:
    """Add the finished training job's model artifact to the catalog as fine-tune ``name``."""
    from catalog.store import write_entry

    with aws_errors(f"reading training job {job_name}"):
        job = context.client("sagemaker").describe_training_job(TrainingJobName=job_name)
    if job["TrainingJobStatus"] != "Completed":
        raise SageMakerError(f"training job {job_name} is {job['TrainingJobStatus']}, not Completed")
    entry = CatalogEntry(
        id=name,
        source="finetune",
        family=base.family,
        resolution=base.resolution,
        description=f"DreamBooth fine-tune of {base.id}, trained on SageMaker by job {job_name} ({context.region}).",
        license=base.license,
        languages=base.languages,
        tags=["sagemaker", "dreambooth"],
        base=base.id,
        method="full",
        artifact=job["ModelArtifacts"]["S3ModelArtifacts"],
        hyperparameters=hyperparameters.model_dump(mode="json"),
        dataset_fingerprint=dataset_fingerprint,
        metrics=metrics,
        created=datetime.now(timezone.utc),
    )
    write_entry(entry)
    return entry


def _wait(describe, name: str, poll_seconds: float, status_key: str, detail) -> dict:
    """Poll ``describe()`` with a spinner until the job finishes; a failed job is an error."""
    from rich.console import Console
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    columns = (SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn())
    with Progress(*columns, transient=True, console=Console(stderr=True)) as progress:
        task = progress.add_task(f"{name}: starting", total=None)
        while True:
            with aws_errors(f"waiting for {name}"):
                description = describe()
            status = description[status_key]
            progress.update(task, description=f"{name}: {detail(description)}")
            if status in FINISHED:
                if status != "Completed":
                    reason = description.get("FailureReason") or "no reason given"
                    raise SageMakerError(f"{name} ended {status}: {reason}")
                return description
            try:
                time.sleep(poll_seconds)
            except KeyboardInterrupt:
                raise SageMakerError(f"stopped waiting; {name} keeps running on SageMaker") from None


def launch_remote_training(
    data: str,
    base: str,
    name: str,
    hyperparameters: Hyperparameters,
    *,
    instance_type: str | None = None,
    s3_prefix: str | None = None,
    role: str | None = None,
    region: str | None = None,
    wait: bool = True,
    poll_seconds: float = POLL_SECONDS,
) -> CatalogEntry | str:
    """Run a JumpStart DreamBooth training job; with ``wait``, register and return the catalog
    entry of its result, otherwise return the training job's name at once."""
    setup = prepare_remote_job(
        data, base, name, hyperparameters, instance_type=instance_type, s3_prefix=s3_prefix, role=role, region=region
    )
    trainer = _model_trainer(setup, hyperparameters)
    with aws_errors("starting the training job", setup.instance_type):
        trainer.train(input_data_config=_input_channels(setup), wait=False)
    job_name = trainer._latest_training_job.training_job_name  # ModelTrainer keeps the job it started here
    if not wait:
        return job_name
    sagemaker = setup.context.client("sagemaker")
    _wait(
        lambda: sagemaker.describe_training_job(TrainingJobName=job_name),
        f"training job {job_name}",
        poll_seconds,
        "TrainingJobStatus",
        lambda job: job.get("SecondaryStatus", job["TrainingJobStatus"]),
    )
    return register_training_job(
        setup.context, job_name, name, setup.base, hyperparameters, dataset_fingerprint=setup.dataset_fingerprint
    )


def tuning_ranges(ranges: dict[str, tuple[float, float, bool]]) -> dict[str, Any]:
    """SageMaker parameter ranges: IntegerParameter for integer hyperparameters, else ContinuousParameter."""
    import typing

    from sagemaker.core.parameter import ContinuousParameter, IntegerParameter

    result: dict[str, Any] = {}
    for name, (low, high, logarithmic) in ranges.items():
        if name not in JUMPSTART_NAMES:
            raise SageMakerError(
                f"cannot tune '{name}' remotely: JumpStart's script knows {', '.join(JUMPSTART_NAMES)}"
            )
        if not low < high or (logarithmic and low <= 0):
            raise SageMakerError(
                f"bad range for {name}: need low < high (and low > 0 for a log scale), got {low}..{high}"
            )
        annotation = Hyperparameters.model_fields[name].annotation
        scaling = "Logarithmic" if logarithmic else "Linear"
        if annotation is int or int in typing.get_args(annotation):
            result[name] = IntegerParameter(int(low), int(high), scaling_type=scaling)
        else:
            result[name] = ContinuousParameter(float(low), float(high), scaling_type=scaling)
    return result


def launch_remote_tuning(
    data: str,
    base: str,
    name: str,
    hyperparameters: Hyperparameters,
    ranges: dict[str, tuple[float, float, bool]] | None = None,
    *,
    max_jobs: int = 7,
    max_parallel_jobs: int = 7,
    objective: str = "fid_score",
    instance_type: str | None = None,
    s3_prefix: str | None = None,
    role: str | None = None,
    region: str | None = None,
    wait: bool = True,
    poll_seconds: float = POLL_SECONDS,
) -> CatalogEntry | str:
    """Automatic Model Tuning (Bayesian, minimising ``objective``) over ``ranges``; with ``wait``,
    the best training job becomes catalog entry ``name``, otherwise the tuning job's name is returned."""
    from sagemaker.train.tuner import HyperparameterTuner

    if objective not in METRIC_DEFINITIONS:
        raise SageMakerError(
            f"JumpStart's training script reports only {', '.join(METRIC_DEFINITIONS)}, not '{objective}'"
        )
    if not 1 <= max_parallel_jobs <= max_jobs:
        raise SageMakerError(f"need 1 <= max_parallel_jobs <= max_jobs, got {max_parallel_jobs} and {max_jobs}")
    parameter_ranges = tuning_ranges(ranges or DEFAULT_TUNING_RANGES)
    # The objective is only printed by the training script when it computes FID.
    hyperparameters = hyperparameters.model_copy(update={"compute_fid": True})
    setup = prepare_remote_job(
        data, base, name, hyperparameters, instance_type=instance_type, s3_prefix=s3_prefix, role=role, region=region
    )
    tuner = HyperparameterTuner(
        model_trainer=_model_trainer(setup, hyperparameters),
        objective_metric_name=objective,
        hyperparameter_ranges=parameter_ranges,
        metric_definitions=[METRIC_DEFINITIONS[objective]],
        objective_type="Minimize",
        strategy="Bayesian",
        max_jobs=max_jobs,
        max_parallel_jobs=max_parallel_jobs,
        base_tuning_job_name=_job_stem(name, 19),  # tuning job names are capped at 32 characters
    )
    with aws_errors("starting the tuning job", setup.instance_type):
        tuner.tune(inputs=_input_channels(setup), wait=False)
    tuning_job = tuner.latest_tuning_job.hyper_parameter_tuning_job_name
    if not wait:
        return tuning_job
    sagemaker = setup.context.client("sagemaker")
    description = _wait(
        lambda: sagemaker.describe_hyper_parameter_tuning_job(HyperParameterTuningJobName=tuning_job),
        f"tuning job {tuning_job}",
        poll_seconds,
        "HyperParameterTuningJobStatus",
        lambda job: (
            ", ".join(f"{count} {state}" for state, count in job.get("TrainingJobStatusCounters", {}).items() if count)
            or job["HyperParameterTuningJobStatus"]
        ),
    )
    best = description.get("BestTrainingJob")
    if not best:
        raise SageMakerError(f"tuning job {tuning_job} finished without a best training job")
    tuned = {
        key: value for key, value in best.get("TunedHyperParameters", {}).items() if key in Hyperparameters.model_fields
    }
    final = best.get("FinalHyperParameterTuningJobObjectiveMetric") or {}
    return register_training_job(
        setup.context,
        best["TrainingJobName"],
        name,
        setup.base,
        Hyperparameters.model_validate({**hyperparameters.model_dump(), **tuned}),
        dataset_fingerprint=setup.dataset_fingerprint,
        metrics={objective: final.get("Value")},
    )
