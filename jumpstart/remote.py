"""Remote DreamBooth on SageMaker: JumpStart training jobs and Automatic Model Tuning, whose
result comes back into the catalog as a fine-tune that ``txt2img deploy`` can deploy.

``launch_remote_training`` and ``launch_remote_tuning`` are what ``txt2img train --remote`` and
``txt2img tune --remote`` call; both take the same ``Hyperparameters`` as the local trainer, and a
local dataset folder goes through the local trainer's loader, so it is checked the same way and
gets the same fingerprint.

The jobs are created with plain boto3 calls under names chosen here, and run JumpStart's training
script the way JumpStart's own estimator does (``sagemaker_program`` and
``sagemaker_submit_directory`` hyperparameters read by the container's training toolkit). With
``trainer="txt2img"`` a training job runs this package's own trainer instead (LoRA, several
subjects, several GPUs and instances), from source packed by ``jumpstart.trainer_source``; in a
tuning job it also evaluates each model as a local trial does, so any of the local objectives can
be searched, over any numeric hyperparameter.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING

from catalog.index import UnknownModelError
from catalog.schema import ID_PATTERN, CatalogEntry
from catalog.store import load_catalog, write_entry
from jumpstart.errors import AwsContext, SageMakerError, aws_context, aws_errors
from jumpstart.polling import TRAINING_JOB, TUNING_JOB, wait_for
from jumpstart.s3 import default_s3_prefix, join_s3, split_s3_uri, upload_files
from jumpstart.sagemaker_entry import EVALUATION_KEY, INFERENCE_CODE_KEY, METRIC_WEIGHT_NAMES, METRICS_CHANNEL
from jumpstart.specs import TRAINING_ENTRY_SCRIPT, TrainingSpec, training_spec
from jumpstart.trainer_source import (
    ARCHIVE_NAME,
    DEFAULT_INSTANCE_TYPE,
    TRAINING_CONTAINER,
    build_source_archive,
    job_hyperparameters,
)
from training.dataset import DATASET_INFO, DreamBoothDataset, load_dataset
from training.dreambooth import trainable_base
from training.evaluation import EvaluationSettings
from training.hyperparameters import JUMPSTART_NAMES, Hyperparameters, numeric_kind
from training.metrics import METRIC_DIRECTIONS, METRIC_EXTRACTOR, MissingWeights, local_weights
from txt2img.errors import InputError

if TYPE_CHECKING:
    from training.evaluation import EvaluationSettings

# What JumpStart's training script prints when compute_fid is on, and how SageMaker reads it.
METRIC_DEFINITIONS = {"fid_score": {"Name": "fid_score", "Regex": r"fid_score=([-+]?\d\.?\d*)"}}
# How SageMaker reads the ``name=value`` lines of ``training.evaluation.metric_lines`` that txt2img's
# trainer prints in a tuning job; JumpStart's regex above would read 12 of fid_score=12.345678.
TXT2IMG_METRIC_REGEX = r"{name}=([-+]?[0-9]*\.?[0-9]+)"
# name -> (low, high, logarithmic); the ranges JumpStart's own tuning example searches.
DEFAULT_TUNING_RANGES: dict[str, tuple[float, float, bool]] = {
    "learning_rate": (1e-7, 3e-6, False),
    "max_steps": (50, 400, False),
}
# The sagemaker SDK's defaults for a training job: a 30 GB volume, stopped after an hour.
VOLUME_SIZE_GB = 30
MAX_RUNTIME_SECONDS = 3600
# Waiting for a job has no timeout, unlike waiting for an endpoint: SageMaker stops each training
# job after MAX_RUNTIME_SECONDS, and a job we stopped waiting for would not reach the catalog.
POLL_SECONDS = 30.0
# Which training script a remote training job runs: JumpStart's, or this package's own trainer.
TRAINERS = ("jumpstart", "txt2img")
# Marks a catalog entry whose artifact is txt2img's trainer output (a diffusers folder), not JumpStart's.
TXT2IMG_TRAINER_TAG = "txt2img-trainer"
# Marks such an entry whose model.tar.gz also holds code/inference.py for the Hugging Face inference
# container (jobs packed since training.servable existed): ``txt2img deploy`` serves it as it is.
INFERENCE_CODE_TAG = "inference-code"
# SageMaker's limits on job names.
TRAINING_JOB_NAME_LIMIT = 63
TUNING_JOB_NAME_LIMIT = 32


@dataclass(frozen=True)
class RemoteJobSetup:
    """What a remote training or tuning job needs, checked and uploaded before anything starts."""

    context: AwsContext
    base: CatalogEntry
    name: str
    job_name: str  # of the training or tuning job to create
    spec: TrainingSpec | None  # JumpStart's; None for txt2img's trainer
    image_uri: str
    instance_type: str
    data_uri: str
    output_path: str
    dataset_fingerprint: str | None
    trainer: str = "jumpstart"
    instance_count: int = 1
    source_uri: str | None = None  # txt2img's trainer: its uploaded sourcedir.tar.gz


def unique_job_name(name: str, limit: int, now: datetime | None = None) -> str:
    """``<name>-<UTC timestamp>`` in letters, digits and '-', at most ``limit`` characters."""
    stamp = (now or datetime.now(timezone.utc)).strftime("%y%m%d-%H%M%S")
    stem = re.sub(r"[^a-zA-Z0-9]+", "-", name).strip("-")[: limit - len(stamp) - 1].rstrip("-")
    return f"{stem}-{stamp}"


def _load_local_dataset(
    folder: Path, hyperparameters: Hyperparameters, base: CatalogEntry, trainer: str
) -> DreamBoothDataset:
    """The local trainer's checks and fingerprint; then what JumpStart's script cannot read."""

    dataset = load_dataset(folder, hyperparameters, base.resolution)
    if trainer == "jumpstart" and dataset.multi_concept:
        raise SageMakerError(
            f"{folder / DATASET_INFO} lists several concepts; JumpStart's training script reads one "
            '({"instance_prompt": ..., "class_prompt": ...}): train it with --trainer txt2img, or split it'
        )
    return dataset


def _dataset_files(folder: Path, dataset: DreamBoothDataset, hyperparameters: Hyperparameters) -> list[Path]:
    """The files the loader accepted, which are what the training script reads: dataset_info.json,
    each concept's instance images and, with prior preservation, its class images."""
    files = [folder / DATASET_INFO]
    for concept in dataset.concepts:
        files += concept.instance_images
        if hyperparameters.with_prior_preservation:
            files += concept.class_images
    return files


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
    trainer: str = "jumpstart",
    instance_count: int = 1,
) -> RemoteJobSetup:
    """Check the request, resolve the container (JumpStart's spec, or the Hugging Face training
    container for txt2img's trainer), and upload local data (and txt2img's trainer) to S3."""

    catalog = load_catalog()
    try:
        base_entry = catalog.get(base)
    except UnknownModelError as error:
        raise SageMakerError(str(error)) from error
    if trainer not in TRAINERS:
        raise SageMakerError(f"unknown trainer '{trainer}'; choose one of {', '.join(TRAINERS)}")
    if instance_count < 1:
        raise SageMakerError(f"--instance-count must be at least 1, got {instance_count}")
    if trainer == "txt2img":
        try:
            trainable_base(catalog, base)  # the local trainer's refusals, before anything is uploaded
        except InputError as error:
            raise SageMakerError(str(error)) from error
        if base_entry.source == "finetune":
            raise SageMakerError(
                f"'{base}' is a fine-tune on this machine; the SageMaker container has only the built-in "
                "catalog, so train on its base, or locally"
            )
    elif base_entry.source != "jumpstart" or not base_entry.fine_tunable or base_entry.jumpstart is None:
        fine_tunable = [entry.id for entry in catalog if entry.fine_tunable]
        raise SageMakerError(
            f"SageMaker JumpStart cannot fine-tune '{base}'; remote training works for: {', '.join(fine_tunable)}"
            " (or any Stable Diffusion 1.x/2.x model with --trainer txt2img)"
        )
    elif instance_count != 1:
        raise SageMakerError("JumpStart's training script runs on one instance; use --trainer txt2img for several")
    if not ID_PATTERN.match(name):
        raise SageMakerError(f"invalid model name '{name}': use lowercase letters, digits, '.', '_' or '-'")
    if name in catalog:
        raise SageMakerError(f"the catalog already has a model '{name}'; choose another name")
    if trainer == "jumpstart" and hyperparameters.method != "full":
        raise SageMakerError(
            "JumpStart's training script makes full fine-tunes only; drop method=lora, or add --trainer txt2img"
        )
    if s3_prefix is not None:
        split_s3_uri(s3_prefix)
    if data.startswith("s3://"):
        split_s3_uri(data)
        if not data.endswith("/"):
            raise SageMakerError(f"an S3 training prefix must end with '/': {data}/")
        dataset = None
    else:
        folder = Path(data).expanduser()
        dataset = _load_local_dataset(folder, hyperparameters, base_entry, trainer)
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

    context = aws_context(region, role, need_role=True)
    if trainer == "jumpstart":
        spec = training_spec(base_entry.jumpstart.model_id, context.region, instance_type)
        chosen_type = instance_type or spec.default_instance_type
        image_uri = spec.image_uri
    else:
        spec = None
        chosen_type = instance_type or DEFAULT_INSTANCE_TYPE
        image_uri = TRAINING_CONTAINER.image(context.region, chosen_type, "training")
    prefix = s3_prefix or default_s3_prefix(context)
    job = unique_job_name(name, job_name_limit)
    output_path = join_s3(prefix, "jobs", name)
    data_uri = data
    if dataset is not None:
        # Beside the job's output, and new for each job: no stale files of an earlier upload get in.
        data_uri = join_s3(output_path, job, "dataset") + "/"
        files = [
            (path, join_s3(data_uri, path.resolve().relative_to(folder.resolve()).as_posix()))
            for path in _dataset_files(folder, dataset, hyperparameters)
        ]
        upload_files(context, files, f"uploading {folder}")
    source_uri = _upload_trainer(context, join_s3(output_path, job, "source")) if trainer == "txt2img" else None
    return RemoteJobSetup(
        context=context,
        base=base_entry,
        name=name,
        job_name=job,
        spec=spec,
        image_uri=image_uri,
        instance_type=chosen_type,
        data_uri=data_uri,
        output_path=output_path,
        dataset_fingerprint=dataset.fingerprint if dataset is not None else None,
        trainer=trainer,
        instance_count=instance_count,
        source_uri=source_uri,
    )


def _upload_trainer(context: AwsContext, prefix: str) -> str:
    """Pack txt2img's trainer and upload it under ``prefix``; returns the archive's S3 URI."""
    import tempfile

    uri = join_s3(prefix, ARCHIVE_NAME)
    with tempfile.TemporaryDirectory(prefix="txt2img-trainer-") as workdir:
        upload_files(context, [(build_source_archive(Path(workdir)), uri)], "uploading txt2img's trainer")
    return uri


def _script_hyperparameters(setup: RemoteJobSetup, hyperparameters: Hyperparameters) -> dict[str, str]:
    """The hyperparameters plus the two that make the container's toolkit run the training script."""
    if setup.trainer == "txt2img":
        return job_hyperparameters(hyperparameters, setup.base.id, setup.name, setup.source_uri)
    return {
        **hyperparameters.sagemaker_strings(),
        "sagemaker_program": TRAINING_ENTRY_SCRIPT,
        "sagemaker_submit_directory": setup.spec.script_uri,
    }


def _job_definition(
    setup: RemoteJobSetup, metric_definitions: list[dict], more_channels: dict[str, str] | None = None
) -> dict:
    """What a training job and each training job of a tuning job share (all but hyperparameters):
    ``metric_definitions`` say how SageMaker reads the metrics the job prints."""

    def channel(name: str, uri: str) -> dict:
        s3 = {"S3DataType": "S3Prefix", "S3Uri": uri, "S3DataDistributionType": "FullyReplicated"}
        return {"ChannelName": name, "DataSource": {"S3DataSource": s3}, "InputMode": "File"}

    channels = [channel("training", setup.data_uri)]
    if setup.spec is not None:  # JumpStart's script reads the base model from a channel; ours downloads it
        channels.append(channel("model", setup.spec.base_model_uri))
    channels += [channel(name, uri) for name, uri in (more_channels or {}).items()]
    algorithm = {"TrainingImage": setup.image_uri, "TrainingInputMode": "File"}
    if metric_definitions:
        algorithm["MetricDefinitions"] = metric_definitions
    return {
        "AlgorithmSpecification": algorithm,
        "RoleArn": setup.context.role,
        "InputDataConfig": channels,
        "OutputDataConfig": {"S3OutputPath": setup.output_path},
        "ResourceConfig": {
            "InstanceType": setup.instance_type,
            "InstanceCount": setup.instance_count,
            "VolumeSizeInGB": VOLUME_SIZE_GB,
        },
        "StoppingCondition": {"MaxRuntimeInSeconds": MAX_RUNTIME_SECONDS},
    }


def register_training_job(
    context: AwsContext,
    job_name: str,
    name: str,
    base: CatalogEntry,
    hyperparameters: Hyperparameters,
    *,
    dataset_fingerprint: str | None = None,
    metrics: dict[str, float | None] | None = None,
    trainer: str = "jumpstart",
) -> CatalogEntry:
    """Add the finished training job's model artifact to the catalog as fine-tune ``name``."""

    with aws_errors(f"reading training job {job_name}"):
        job = context.client("sagemaker").describe_training_job(TrainingJobName=job_name)
    if job["TrainingJobStatus"] != "Completed":
        raise SageMakerError(f"training job {job_name} is {job['TrainingJobStatus']}, not Completed")
    tags = ["sagemaker", "dreambooth"]
    if trainer == "txt2img":
        tags.append(TXT2IMG_TRAINER_TAG)
        if job.get("HyperParameters", {}).get(INFERENCE_CODE_KEY):  # its source packed the inference code
            tags.append(INFERENCE_CODE_TAG)
    entry = CatalogEntry(
        id=name,
        source="finetune",
        family=base.family,
        resolution=base.resolution,
        description=(
            f"DreamBooth fine-tune of {base.id}, trained on SageMaker by {trainer}'s trainer in job {job_name} "
            f"({context.region})."
        ),
        license=base.license,
        languages=base.languages,
        tags=tags,
        base=base.id,
        method=hyperparameters.method,
        artifact=job["ModelArtifacts"]["S3ModelArtifacts"],
        hyperparameters=hyperparameters.model_dump(mode="json"),
        dataset_fingerprint=dataset_fingerprint,
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
    trainer: str = "jumpstart",
    instance_count: int = 1,
    wait: bool = True,
    poll_seconds: float = POLL_SECONDS,
) -> CatalogEntry | str:
    """Run a DreamBooth training job (JumpStart's script, or txt2img's trainer with torchrun over
    ``instance_count`` instances); with ``wait``, register and return the catalog entry of its
    result, otherwise return the training job's name at once."""

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
    with aws_errors("starting the training job", setup.instance_type):
        sagemaker.create_training_job(
            TrainingJobName=training_job,
            HyperParameters=_script_hyperparameters(setup, hyperparameters),
            # txt2img's trainer evaluates (and prints metrics) only in a tuning job.
            **_job_definition(setup, list(METRIC_DEFINITIONS.values()) if trainer == "jumpstart" else []),
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
    return register_training_job(
        setup.context,
        training_job,
        name,
        setup.base,
        hyperparameters,
        dataset_fingerprint=setup.dataset_fingerprint,
        trainer=trainer,
    )


def parameter_ranges(ranges: dict[str, tuple[float, float, bool]], trainer: str = "jumpstart") -> dict[str, list[dict]]:
    """SageMaker's ParameterRanges: integer ranges for integer hyperparameters, else continuous ones.
    JumpStart's script reads only its own names; txt2img's trainer takes any numeric hyperparameter."""
    found: dict[str, list[dict]] = {"IntegerParameterRanges": [], "ContinuousParameterRanges": []}
    for name, (low, high, logarithmic) in ranges.items():
        if trainer == "jumpstart" and name not in JUMPSTART_NAMES:
            raise SageMakerError(
                f"cannot tune '{name}' remotely: JumpStart's script knows {', '.join(JUMPSTART_NAMES)}"
                " (txt2img's trainer, --trainer txt2img, tunes any numeric hyperparameter)"
            )
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


def _metric_weight_files(evaluation: EvaluationSettings) -> list[tuple[Path, str]]:
    """(local file, path in the metrics channel) for every network ``evaluation``'s metrics need,
    found on this machine (never downloaded); raises SageMakerError naming a missing one."""

    files = []
    for extractor in sorted({METRIC_EXTRACTOR[name] for name in evaluation.metrics if name in METRIC_EXTRACTOR}):
        try:
            found = local_weights(extractor, getattr(evaluation.weights, extractor))
        except MissingWeights as error:
            needing = ", ".join(name for name in evaluation.metrics if METRIC_EXTRACTOR.get(name) == extractor)
            raise SageMakerError(
                f"{needing} cannot be computed on SageMaker, which gets its network from here: {error}"
            ) from None
        channel_name = METRIC_WEIGHT_NAMES[extractor]
        if found.is_file():
            files.append((found, channel_name))
        else:  # a model folder; a Hugging Face cache snapshot links its files, which are read through the links
            files += [
                (path, f"{channel_name}/{path.relative_to(found).as_posix()}")
                for path in sorted(found.rglob("*"))
                if path.is_file()
            ]
    return files


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
    trainer: str = "jumpstart",
    evaluation: EvaluationSettings | None = None,
    instance_type: str | None = None,
    s3_prefix: str | None = None,
    role: str | None = None,
    region: str | None = None,
    wait: bool = True,
    poll_seconds: float = POLL_SECONDS,
) -> CatalogEntry | str:
    """Automatic Model Tuning (Bayesian) of ``objective`` over ``ranges``; with ``wait``, the best
    training job becomes catalog entry ``name``, otherwise the tuning job's name is returned.

    JumpStart's script minimises its own fid_score. txt2img's trainer (``trainer="txt2img"``)
    evaluates each model with ``evaluation`` (``training.evaluation.EvaluationSettings``; default:
    the objective alone) as a local trial does, the objective first, so any local objective works in
    its direction; the networks its metrics need are uploaded from this machine.
    """

    if trainer == "txt2img":
        if objective not in METRIC_DIRECTIONS:
            raise SageMakerError(f"unknown objective '{objective}'; choose one of {', '.join(METRIC_DIRECTIONS)}")
        evaluation = evaluation or EvaluationSettings(metrics=[objective])
        others = [metric for metric in evaluation.metrics if metric != objective]
        evaluation = evaluation.model_copy(update={"metrics": [objective, *others]})
        weight_files = _metric_weight_files(evaluation)  # before anything is uploaded
        metric_definitions = [
            {"Name": metric, "Regex": TXT2IMG_METRIC_REGEX.format(name=metric)} for metric in evaluation.metrics
        ]
    else:
        if evaluation is not None:
            raise SageMakerError(
                "JumpStart's training script evaluates on its own; evaluation settings need --trainer txt2img"
            )
        if objective not in METRIC_DEFINITIONS:
            raise SageMakerError(
                f"JumpStart's training script reports only {', '.join(METRIC_DEFINITIONS)}, not '{objective}'"
                " (txt2img's trainer, --trainer txt2img, reports every metric of txt2img evaluate)"
            )
        metric_definitions = list(METRIC_DEFINITIONS.values())
        # The objective is only printed by the training script when it computes FID.
        hyperparameters = hyperparameters.model_copy(update={"compute_fid": True})
    if not 1 <= max_parallel_jobs <= max_jobs:
        raise SageMakerError(f"need 1 <= max_parallel_jobs <= max_jobs, got {max_parallel_jobs} and {max_jobs}")
    searched = parameter_ranges(ranges or DEFAULT_TUNING_RANGES, trainer)
    setup = prepare_remote_job(
        data,
        base,
        name,
        hyperparameters,
        instance_type=instance_type,
        s3_prefix=s3_prefix,
        role=role,
        region=region,
        job_name_limit=TUNING_JOB_NAME_LIMIT,
        trainer=trainer,
    )
    tuned_names = {each["Name"] for listed in searched.values() for each in listed}
    static = {
        key: value for key, value in _script_hyperparameters(setup, hyperparameters).items() if key not in tuned_names
    }
    channels = {}
    if trainer == "txt2img":
        import json

        # The container's own environment says where the networks are (jumpstart.sagemaker_entry).
        static[EVALUATION_KEY] = json.dumps(evaluation.model_dump(mode="json", exclude={"weights"}))
        if weight_files:
            weights_uri = join_s3(setup.output_path, setup.job_name, "metric-weights")
            upload_files(
                setup.context,
                [(path, join_s3(weights_uri, key)) for path, key in weight_files],
                "uploading the metric networks",
            )
            channels[METRICS_CHANNEL] = weights_uri + "/"
    sagemaker = setup.context.client("sagemaker")
    tuning_job = setup.job_name
    with aws_errors("starting the tuning job", setup.instance_type):
        sagemaker.create_hyper_parameter_tuning_job(
            HyperParameterTuningJobName=tuning_job,
            HyperParameterTuningJobConfig={
                "Strategy": "Bayesian",
                "HyperParameterTuningJobObjective": {
                    "Type": METRIC_DIRECTIONS[objective].capitalize(),
                    "MetricName": objective,
                },
                "ResourceLimits": {"MaxNumberOfTrainingJobs": max_jobs, "MaxParallelTrainingJobs": max_parallel_jobs},
                "ParameterRanges": searched,
                "TrainingJobEarlyStoppingType": "Off",
            },
            TrainingJobDefinition={
                **_job_definition(setup, metric_definitions, channels),
                "StaticHyperParameters": static,
            },
        )
    if not wait:
        return tuning_job
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
        setup.context,
        best["TrainingJobName"],
        name,
        setup.base,
        Hyperparameters.model_validate({**hyperparameters.model_dump(), **tuned}),
        dataset_fingerprint=setup.dataset_fingerprint,
        metrics={objective: final.get("Value")},
        trainer=trainer,
    )
