"""Remote DreamBooth on SageMaker: JumpStart training jobs and Automatic Model Tuning, whose
result comes back into the catalog as a fine-tune that ``txt2img deploy`` can deploy.

``launch_remote_training`` and ``launch_remote_tuning`` are what ``txt2img train --remote`` and
``txt2img tune --remote`` call; both take the same ``Hyperparameters`` as the local trainer, and a
local dataset folder goes through the local trainer's loader, so it is checked the same way and
gets the same fingerprint.

The jobs are created with plain boto3 calls under names chosen here, the same way whichever
training script runs in them; what differs between the scripts (JumpStart's, run as JumpStart's own
estimator does, or this package's own trainer: LoRA, several subjects, several GPUs and instances,
and in a tuning job any local objective over any numeric hyperparameter) is the trainer object of
``jumpstart.trainers`` that ``trainer`` names.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from catalog.index import UnknownModelError
from catalog.schema import ID_PATTERN, CatalogEntry
from catalog.store import Catalog, load_catalog, write_entry
from jumpstart.errors import AwsContext, SageMakerError, aws_context, aws_errors
from jumpstart.polling import TRAINING_JOB, TUNING_JOB, wait_for
from jumpstart.s3 import default_s3_prefix, join_s3, split_s3_uri, upload_files
from jumpstart.trainers import DEFAULT_TRAINER, RemoteTrainer, TrainingContainer, TuningPlan, remote_trainer
from training.dataset import DATASET_INFO, DreamBoothDataset, load_dataset
from training.evaluation import EvaluationSettings
from training.hyperparameters import Hyperparameters, numeric_kind
from training.metrics import METRIC_DIRECTIONS

# The sagemaker SDK's defaults for a training job: a 30 GB volume, stopped after an hour.
VOLUME_SIZE_GB = 30
MAX_RUNTIME_SECONDS = 3600
# Waiting for a job has no timeout, unlike waiting for an endpoint: SageMaker stops each training
# job after MAX_RUNTIME_SECONDS, and a job we stopped waiting for would not reach the catalog.
POLL_SECONDS = 30.0
# SageMaker's limits on job names.
TRAINING_JOB_NAME_LIMIT = 63
TUNING_JOB_NAME_LIMIT = 32


@dataclass(frozen=True)
class RemoteJobSetup:
    """What a remote training or tuning job needs, checked and uploaded before anything starts."""

    context: AwsContext
    trainer: RemoteTrainer
    base: CatalogEntry
    name: str
    job_name: str  # of the training or tuning job to create
    container: TrainingContainer
    source_uri: str  # the code the container's toolkit runs
    data_uri: str
    output_path: str
    dataset_fingerprint: str | None
    instance_count: int = 1

    @property
    def job_prefix(self) -> str:
        """Where this job's own inputs go (data, code, metric networks): beside its output, new for each job."""
        return join_s3(self.output_path, self.job_name)


@dataclass(frozen=True)
class LocalDataset:
    """A dataset folder on this machine, as the local trainer's loader accepted it."""

    folder: Path
    dataset: DreamBoothDataset


def unique_job_name(name: str, limit: int, now: datetime | None = None) -> str:
    """``<name>-<UTC timestamp>`` in letters, digits and '-', at most ``limit`` characters."""
    stamp = (now or datetime.now(timezone.utc)).strftime("%y%m%d-%H%M%S")
    stem = re.sub(r"[^a-zA-Z0-9]+", "-", name).strip("-")[: limit - len(stamp) - 1].rstrip("-")
    return f"{stem}-{stamp}"


def _check_request(
    catalog: Catalog, base: str, name: str, hyperparameters: Hyperparameters, trainer_name: str, instance_count: int
) -> tuple[RemoteTrainer, CatalogEntry]:
    """The trainer and base entry of a request, once the request is one the trainer can run."""
    try:
        base_entry = catalog.get(base)
    except UnknownModelError as error:
        raise SageMakerError(str(error)) from error
    trainer = remote_trainer(trainer_name)
    if instance_count < 1:
        raise SageMakerError(f"--instance-count must be at least 1, got {instance_count}")
    trainer.check_base(catalog, base_entry, instance_count)
    if not ID_PATTERN.match(name):
        raise SageMakerError(f"invalid model name '{name}': use lowercase letters, digits, '.', '_' or '-'")
    if name in catalog:
        raise SageMakerError(f"the catalog already has a model '{name}'; choose another name")
    trainer.check_hyperparameters(hyperparameters)
    return trainer, base_entry


def _check_data(
    data: str, hyperparameters: Hyperparameters, base: CatalogEntry, trainer: RemoteTrainer, instance_count: int
) -> LocalDataset | None:
    """A local folder through the local trainer's loader, then the trainer's own refusals; None for an
    S3 prefix, which is read as it is."""
    if data.startswith("s3://"):
        split_s3_uri(data)
        if not data.endswith("/"):
            raise SageMakerError(f"an S3 training prefix must end with '/': {data}/")
        return None
    folder = Path(data).expanduser()
    dataset = load_dataset(folder, hyperparameters, base.resolution)
    trainer.check_dataset(folder, dataset)
    if instance_count > 1 and hyperparameters.with_prior_preservation:
        short = [c for c in dataset.concepts if len(c.class_images) < hyperparameters.num_class_images]
        if short:
            # The trainer's rank 0 draws missing class images on the first instance only; the
            # other instances would not see them.
            raise SageMakerError(
                f"with --instance-count {instance_count} and prior preservation, every concept needs its "
                f"{hyperparameters.num_class_images} class images in the dataset ({short[0].class_data_dir} "
                f"has {len(short[0].class_images)}): add them, lower num_class_images, or use one instance"
            )
    return LocalDataset(folder, dataset)


def _dataset_files(folder: Path, dataset: DreamBoothDataset, hyperparameters: Hyperparameters) -> list[Path]:
    """The files the loader accepted, which are what the training script reads: dataset_info.json,
    each concept's instance images and, with prior preservation, its class images."""
    files = [folder / DATASET_INFO]
    for concept in dataset.concepts:
        files += concept.instance_images
        if hyperparameters.with_prior_preservation:
            files += concept.class_images
    return files


def _upload_dataset(context: AwsContext, local: LocalDataset, hyperparameters: Hyperparameters, data_uri: str) -> None:
    """Upload the files the loader accepted, under ``data_uri``, as they lie in the folder."""
    folder = local.folder.resolve()
    files = [
        (path, join_s3(data_uri, path.resolve().relative_to(folder).as_posix()))
        for path in _dataset_files(local.folder, local.dataset, hyperparameters)
    ]
    upload_files(context, files, f"uploading {local.folder}")


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
    job_name_limit: int,
    trainer: str = DEFAULT_TRAINER,
    instance_count: int = 1,
) -> RemoteJobSetup:
    """Check the request, resolve the trainer's container, and upload local data (and the trainer's
    code, where it is not in S3 yet)."""

    chosen, base_entry = _check_request(load_catalog(), base, name, hyperparameters, trainer, instance_count)
    if s3_prefix is not None:
        split_s3_uri(s3_prefix)
    local = _check_data(data, hyperparameters, base_entry, chosen, instance_count)

    context = aws_context(region, role, need_role=True)
    container = chosen.container(context, base_entry, instance_type)
    output_path = join_s3(s3_prefix or default_s3_prefix(context), "jobs", name)
    job = unique_job_name(name, job_name_limit)
    job_prefix = join_s3(output_path, job)
    data_uri = data
    if local is not None:
        # Beside the job's output, and new for each job: no stale files of an earlier upload get in.
        data_uri = join_s3(job_prefix, "dataset") + "/"
        _upload_dataset(context, local, hyperparameters, data_uri)
    return RemoteJobSetup(
        context=context,
        trainer=chosen,
        base=base_entry,
        name=name,
        job_name=job,
        container=container,
        source_uri=chosen.job_source(context, container, job_prefix),
        data_uri=data_uri,
        output_path=output_path,
        dataset_fingerprint=local.dataset.fingerprint if local is not None else None,
        instance_count=instance_count,
    )


def _job_hyperparameters(setup: RemoteJobSetup, hyperparameters: Hyperparameters) -> dict[str, str]:
    """The hyperparameters as the trainer's job reads them, with those that make the container's toolkit run it."""
    return setup.trainer.job_hyperparameters(hyperparameters, setup.base, setup.name, setup.source_uri)


def _job_definition(
    setup: RemoteJobSetup, metric_definitions: list[dict], more_channels: dict[str, str] | None = None
) -> dict:
    """What a training job and each training job of a tuning job share (all but hyperparameters):
    ``metric_definitions`` say how SageMaker reads the metrics the job prints."""

    def channel(name: str, uri: str) -> dict:
        s3 = {"S3DataType": "S3Prefix", "S3Uri": uri, "S3DataDistributionType": "FullyReplicated"}
        return {"ChannelName": name, "DataSource": {"S3DataSource": s3}, "InputMode": "File"}

    channels = {"training": setup.data_uri, **setup.container.channels, **(more_channels or {})}
    algorithm = {"TrainingImage": setup.container.image_uri, "TrainingInputMode": "File"}
    if metric_definitions:
        algorithm["MetricDefinitions"] = metric_definitions
    return {
        "AlgorithmSpecification": algorithm,
        "RoleArn": setup.context.role,
        "InputDataConfig": [channel(name, uri) for name, uri in channels.items()],
        "OutputDataConfig": {"S3OutputPath": setup.output_path},
        "ResourceConfig": {
            "InstanceType": setup.container.instance_type,
            "InstanceCount": setup.instance_count,
            "VolumeSizeInGB": VOLUME_SIZE_GB,
        },
        "StoppingCondition": {"MaxRuntimeInSeconds": MAX_RUNTIME_SECONDS},
    }


def register_training_job(
    setup: RemoteJobSetup,
    job_name: str,
    hyperparameters: Hyperparameters,
    metrics: dict[str, float | None] | None = None,
) -> CatalogEntry:
    """Add the finished training job's model artifact to the catalog as fine-tune ``setup.name``."""

    context, base = setup.context, setup.base
    with aws_errors(f"reading training job {job_name}"):
        job = context.client("sagemaker").describe_training_job(TrainingJobName=job_name)
    if job["TrainingJobStatus"] != "Completed":
        raise SageMakerError(f"training job {job_name} is {job['TrainingJobStatus']}, not Completed")
    entry = CatalogEntry(
        id=setup.name,
        source="finetune",
        family=base.family,
        resolution=base.resolution,
        description=(
            f"DreamBooth fine-tune of {base.id}, trained on SageMaker by {setup.trainer.name}'s trainer in job "
            f"{job_name} ({context.region})."
        ),
        license=base.license,
        languages=base.languages,
        tags=["sagemaker", "dreambooth", *setup.trainer.catalog_tags(job)],
        base=base.id,
        method=hyperparameters.method,
        artifact=job["ModelArtifacts"]["S3ModelArtifacts"],
        hyperparameters=hyperparameters.model_dump(mode="json"),
        dataset_fingerprint=setup.dataset_fingerprint,
        metrics=metrics,
        created=datetime.now(timezone.utc),
    )
    write_entry(entry)
    return entry


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
    trainer: str = DEFAULT_TRAINER,
    instance_count: int = 1,
    wait: bool = True,
    poll_seconds: float = POLL_SECONDS,
) -> CatalogEntry | str:
    """Run a DreamBooth training job of ``trainer`` (``jumpstart.trainers``: JumpStart's script, or
    txt2img's trainer with torchrun over ``instance_count`` instances); with ``wait``, register and
    return the catalog entry of its result, otherwise return the training job's name at once."""

    setup = prepare_remote_job(
        data,
        base,
        name,
        hyperparameters,
        instance_type=instance_type,
        s3_prefix=s3_prefix,
        role=role,
        region=region,
        job_name_limit=TRAINING_JOB_NAME_LIMIT,
        trainer=trainer,
        instance_count=instance_count,
    )
    sagemaker = setup.context.client("sagemaker")
    training_job = setup.job_name
    with aws_errors("starting the training job", setup.container.instance_type):
        sagemaker.create_training_job(
            TrainingJobName=training_job,
            HyperParameters=_job_hyperparameters(setup, hyperparameters),
            **_job_definition(setup, setup.trainer.training_metric_definitions),
        )
    if not wait:
        return training_job
    wait_for(
        f"training job {training_job}",
        lambda: sagemaker.describe_training_job(TrainingJobName=training_job),
        TRAINING_JOB,
        poll_seconds=poll_seconds,
        still_running="its result will not be in the catalog; follow or stop it in the SageMaker console",
    )
    return register_training_job(setup, training_job, hyperparameters)


def parameter_ranges(ranges: dict[str, tuple[float, float, bool]], trainer: RemoteTrainer) -> dict[str, list[dict]]:
    """SageMaker's ParameterRanges: integer ranges for integer hyperparameters, else continuous ones,
    of the hyperparameters ``trainer`` lets a tuning job search."""
    found: dict[str, list[dict]] = {"IntegerParameterRanges": [], "ContinuousParameterRanges": []}
    for name, (low, high, logarithmic) in ranges.items():
        trainer.check_tunable(name)
        try:
            kind = numeric_kind(name)
        except ValueError as error:
            raise SageMakerError(f"cannot tune '{name}': {error}") from None
        if not low < high or (logarithmic and low <= 0):
            raise SageMakerError(
                f"bad range for {name}: need low < high (and low > 0 for a log scale), got {low}..{high}"
            )
        scaling = "Logarithmic" if logarithmic else "Linear"
        if kind is int:
            kind, bounds = "IntegerParameterRanges", (int(low), int(high))
        else:
            kind, bounds = "ContinuousParameterRanges", (float(low), float(high))
        found[kind].append(
            {"Name": name, "MinValue": str(bounds[0]), "MaxValue": str(bounds[1]), "ScalingType": scaling}
        )
    return {kind: listed for kind, listed in found.items() if listed}


@dataclass(frozen=True)
class TuningSearch:
    """What a tuning job searches and how far: the objective, SageMaker's ParameterRanges and its limits."""

    objective: str
    ranges: dict[str, list[dict]]
    max_jobs: int
    max_parallel_jobs: int

    def config(self) -> dict:
        """SageMaker's HyperParameterTuningJobConfig: a Bayesian search towards the objective's direction."""
        return {
            "Strategy": "Bayesian",
            "HyperParameterTuningJobObjective": {
                "Type": METRIC_DIRECTIONS[self.objective].capitalize(),
                "MetricName": self.objective,
            },
            "ResourceLimits": {
                "MaxNumberOfTrainingJobs": self.max_jobs,
                "MaxParallelTrainingJobs": self.max_parallel_jobs,
            },
            "ParameterRanges": self.ranges,
            "TrainingJobEarlyStoppingType": "Off",
        }


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
    trainer: str = DEFAULT_TRAINER,
    evaluation: EvaluationSettings | None = None,
    instance_type: str | None = None,
    s3_prefix: str | None = None,
    role: str | None = None,
    region: str | None = None,
    wait: bool = True,
    poll_seconds: float = POLL_SECONDS,
) -> CatalogEntry | str:
    """Automatic Model Tuning (Bayesian) of ``objective`` over ``ranges`` (default: the trainer's);
    with ``wait``, the best training job becomes catalog entry ``name``, otherwise the tuning job's
    name is returned.

    JumpStart's script minimises its own fid_score. txt2img's trainer (``trainer="txt2img"``)
    evaluates each model with ``evaluation`` (``training.evaluation.EvaluationSettings``; default:
    the objective alone) as a local trial does, the objective first, so any local objective works in
    its direction; the networks its metrics need are uploaded from this machine.
    """

    chosen = remote_trainer(trainer)
    plan = chosen.plan_tuning(objective, evaluation, hyperparameters)
    if not 1 <= max_parallel_jobs <= max_jobs:
        raise SageMakerError(f"need 1 <= max_parallel_jobs <= max_jobs, got {max_parallel_jobs} and {max_jobs}")
    search = TuningSearch(
        objective, parameter_ranges(ranges or chosen.default_ranges, chosen), max_jobs, max_parallel_jobs
    )
    setup = prepare_remote_job(
        data,
        base,
        name,
        plan.hyperparameters,
        instance_type=instance_type,
        s3_prefix=s3_prefix,
        role=role,
        region=region,
        job_name_limit=TUNING_JOB_NAME_LIMIT,
        trainer=trainer,
    )
    _start_tuning_job(setup, plan, search)
    if not wait:
        return setup.job_name
    return _register_best_job(setup, plan, objective, poll_seconds)


def _start_tuning_job(setup: RemoteJobSetup, plan: TuningPlan, search: TuningSearch) -> None:
    """Create the tuning job: every training job gets the plan's hyperparameters but the searched ones."""
    tuned_names = {each["Name"] for listed in search.ranges.values() for each in listed}
    static = {
        key: value for key, value in _job_hyperparameters(setup, plan.hyperparameters).items() if key not in tuned_names
    }
    more_static, channels = setup.trainer.tuning_inputs(setup.context, plan, setup.job_prefix)
    with aws_errors("starting the tuning job", setup.container.instance_type):
        setup.context.client("sagemaker").create_hyper_parameter_tuning_job(
            HyperParameterTuningJobName=setup.job_name,
            HyperParameterTuningJobConfig=search.config(),
            TrainingJobDefinition={
                **_job_definition(setup, plan.metric_definitions, channels),
                "StaticHyperParameters": {**static, **more_static},
            },
        )


def _register_best_job(setup: RemoteJobSetup, plan: TuningPlan, objective: str, poll_seconds: float) -> CatalogEntry:
    """Wait for the tuning job, then register its best training job, with its tuned hyperparameters."""
    sagemaker = setup.context.client("sagemaker")
    tuning_job = setup.job_name
    description = wait_for(
        f"tuning job {tuning_job}",
        lambda: sagemaker.describe_hyper_parameter_tuning_job(HyperParameterTuningJobName=tuning_job),
        TUNING_JOB,
        poll_seconds=poll_seconds,
        still_running="its best model will not be in the catalog; follow or stop it in the SageMaker console",
    )
    best = description.get("BestTrainingJob")
    if not best:
        raise SageMakerError(f"tuning job {tuning_job} finished without a best training job")
    tuned = {
        key: value for key, value in best.get("TunedHyperParameters", {}).items() if key in Hyperparameters.model_fields
    }
    final = best.get("FinalHyperParameterTuningJobObjectiveMetric") or {}
    return register_training_job(
        setup,
        best["TrainingJobName"],
        Hyperparameters.model_validate({**plan.hyperparameters.model_dump(), **tuned}),
        metrics={objective: final.get("Value")},
    )
