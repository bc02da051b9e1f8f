"""The training scripts a SageMaker job can run, each one object behind one interface.

``jumpstart.remote`` creates the training and tuning jobs the same way whatever runs in them;
everything that differs between the scripts is here: what each refuses, which container runs it and
where its code comes from, the hyperparameters and metric definitions its jobs get, what a tuning
job may search and how its jobs are evaluated, and how its result is tagged in the catalog.

- ``jumpstart``: JumpStart's own training script (``transfer_learning.py``), as JumpStart's
  estimator runs it: full fine-tunes of JumpStart models on one instance, minimising its fid_score.
- ``txt2img``: this package's trainer, packed by ``jumpstart.trainer_source`` and started by
  ``jumpstart.sagemaker_entry``: LoRA or full, several subjects, every GPU of every instance, and in a
  tuning job any local objective over any numeric hyperparameter.

A third trainer is one more class here and one more entry in ``TRAINERS``.
"""

from __future__ import annotations

import json
import tempfile
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path

from catalog.schema import CatalogEntry
from catalog.store import Catalog
from jumpstart.errors import AwsContext, SageMakerError
from jumpstart.s3 import join_s3, upload_files
from jumpstart.sagemaker_entry import EVALUATION_KEY, INFERENCE_CODE_KEY, METRIC_WEIGHT_NAMES, METRICS_CHANNEL
from jumpstart.specs import TRAINING_ENTRY_SCRIPT, training_spec
from jumpstart.trainer_source import (
    ARCHIVE_NAME,
    DEFAULT_INSTANCE_TYPE,
    TRAINING_CONTAINER,
    build_source_archive,
    job_hyperparameters,
)
from training.dataset import DATASET_INFO, DreamBoothDataset
from training.dreambooth import trainable_base
from training.evaluation import EvaluationSettings
from training.hyperparameters import JUMPSTART_NAMES, Hyperparameters
from training.metrics import METRIC_DIRECTIONS, METRIC_EXTRACTOR, MissingWeights, local_weights
from training.tuning import DEFAULT_RANGES, objective_first
from txt2img.errors import InputError

# Marks a catalog entry whose artifact is txt2img's trainer output (a diffusers folder), not JumpStart's.
TXT2IMG_TRAINER_TAG = "txt2img-trainer"
# Marks such an entry whose model.tar.gz also holds code/inference.py for the Hugging Face inference
# container (jobs packed since training.servable existed): ``txt2img deploy`` serves it as it is.
INFERENCE_CODE_TAG = "inference-code"
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
# The trainer `--trainer` picks when not given.
DEFAULT_TRAINER = "jumpstart"


@dataclass(frozen=True)
class TrainingContainer:
    """What runs a trainer's job: the image, the instance type, the channels it reads besides the
    training data, and the S3 URI of its code where that is already in S3 (JumpStart's script)."""

    image_uri: str
    instance_type: str
    channels: dict[str, str]
    source_uri: str | None = None


@dataclass(frozen=True)
class TuningPlan:
    """How the training jobs of a tuning job run and are read, checked before anything is uploaded."""

    hyperparameters: Hyperparameters  # what every job gets besides the searched ones
    metric_definitions: list[dict]  # how SageMaker reads the objective (and other metrics) from the job's log
    evaluation: EvaluationSettings | None = None  # how each job evaluates its model, the objective first
    weight_files: tuple[tuple[Path, str], ...] = ()  # (local file, path in the metrics channel)


class RemoteTrainer(ABC):
    """One training script a SageMaker training or tuning job can run."""

    name: str  # as --trainer names it
    # What its training jobs print that SageMaker should read (outside a tuning job).
    training_metric_definitions: list[dict]
    # What `tune --remote` searches without --range: name -> (low, high, logarithmic).
    default_ranges: dict[str, tuple[float, float, bool]]
    # Why `tune --remote` refuses the evaluation options; None where each job evaluates as a local trial.
    evaluation_refusal: str | None

    @abstractmethod
    def check_base(self, catalog: Catalog, base: CatalogEntry, instance_count: int) -> None:
        """Refuse a base model, or a number of instances, this trainer cannot train on."""

    @abstractmethod
    def check_hyperparameters(self, hyperparameters: Hyperparameters) -> None:
        """Refuse hyperparameters this trainer cannot honour."""

    @abstractmethod
    def check_dataset(self, folder: Path, dataset: DreamBoothDataset) -> None:
        """Refuse a dataset the local loader accepted but this trainer cannot read."""

    @abstractmethod
    def container(self, context: AwsContext, base: CatalogEntry, instance_type: str | None) -> TrainingContainer:
        """The container (and instance type: ``instance_type``, or this trainer's default) a job runs in."""

    @abstractmethod
    def job_source(self, context: AwsContext, container: TrainingContainer, job_prefix: str) -> str:
        """The S3 URI of the code the job runs, uploaded under ``job_prefix`` if it is not in S3 yet."""

    @abstractmethod
    def job_hyperparameters(
        self, hyperparameters: Hyperparameters, base: CatalogEntry, name: str, source_uri: str
    ) -> dict[str, str]:
        """The job's hyperparameters, the ones that make the container's toolkit run ``source_uri`` included."""

    @abstractmethod
    def check_tunable(self, name: str) -> None:
        """Refuse to search hyperparameter ``name`` (known to be numeric) if the script ignores it."""

    @abstractmethod
    def plan_tuning(
        self, objective: str, evaluation: EvaluationSettings | None, hyperparameters: Hyperparameters
    ) -> TuningPlan:
        """How a tuning job's training jobs reach and report ``objective``; refuses what they cannot."""

    @abstractmethod
    def tuning_inputs(self, context: AwsContext, plan: TuningPlan, job_prefix: str) -> tuple[dict, dict]:
        """(static hyperparameters, channels) the plan adds to every training job, uploaded under ``job_prefix``."""

    @abstractmethod
    def catalog_tags(self, job: dict) -> list[str]:
        """The tags that say, in the catalog, what the finished training job ``job`` (as described)
        made, besides sagemaker and dreambooth."""


class JumpStartTrainer(RemoteTrainer):
    """JumpStart's training script, run as JumpStart's estimator runs it."""

    name = "jumpstart"
    training_metric_definitions = list(METRIC_DEFINITIONS.values())
    default_ranges = DEFAULT_TUNING_RANGES
    evaluation_refusal = "JumpStart's script evaluates on its own (--trainer txt2img evaluates as a local trial)"

    def check_base(self, catalog: Catalog, base: CatalogEntry, instance_count: int) -> None:
        if base.source != "jumpstart" or not base.fine_tunable or base.jumpstart is None:
            fine_tunable = [entry.id for entry in catalog if entry.fine_tunable]
            raise SageMakerError(
                f"SageMaker JumpStart cannot fine-tune '{base.id}'; remote training works for: "
                f"{', '.join(fine_tunable)} (or any Stable Diffusion 1.x/2.x model with --trainer txt2img)"
            )
        if instance_count != 1:
            raise SageMakerError("JumpStart's training script runs on one instance; use --trainer txt2img for several")

    def check_hyperparameters(self, hyperparameters: Hyperparameters) -> None:
        if hyperparameters.method != "full":
            raise SageMakerError(
                "JumpStart's training script makes full fine-tunes only; drop method=lora, or add --trainer txt2img"
            )
        if hyperparameters.sharding != "none":
            raise SageMakerError(
                f"JumpStart's training script does not shard; drop sharding={hyperparameters.sharding}, "
                "or add --trainer txt2img"
            )

    def check_dataset(self, folder: Path, dataset: DreamBoothDataset) -> None:
        if dataset.multi_concept:
            raise SageMakerError(
                f"{folder / DATASET_INFO} lists several concepts; JumpStart's training script reads one "
                '({"instance_prompt": ..., "class_prompt": ...}): train it with --trainer txt2img, or split it'
            )

    def container(self, context: AwsContext, base: CatalogEntry, instance_type: str | None) -> TrainingContainer:
        spec = training_spec(base.jumpstart.model_id, context.region, instance_type)
        return TrainingContainer(
            image_uri=spec.image_uri,
            instance_type=instance_type or spec.default_instance_type,
            # The script reads the base model from a channel; ours downloads it.
            channels={"model": spec.base_model_uri},
            source_uri=spec.script_uri,
        )

    def job_source(self, context: AwsContext, container: TrainingContainer, job_prefix: str) -> str:
        return container.source_uri  # JumpStart's script, where JumpStart keeps it

    def job_hyperparameters(
        self, hyperparameters: Hyperparameters, base: CatalogEntry, name: str, source_uri: str
    ) -> dict[str, str]:
        return {
            **hyperparameters.sagemaker_strings(),
            "sagemaker_program": TRAINING_ENTRY_SCRIPT,
            "sagemaker_submit_directory": source_uri,
        }

    def check_tunable(self, name: str) -> None:
        if name not in JUMPSTART_NAMES:
            raise SageMakerError(
                f"cannot tune '{name}' remotely: JumpStart's script knows {', '.join(JUMPSTART_NAMES)}"
                " (txt2img's trainer, --trainer txt2img, tunes any numeric hyperparameter)"
            )

    def plan_tuning(
        self, objective: str, evaluation: EvaluationSettings | None, hyperparameters: Hyperparameters
    ) -> TuningPlan:
        if evaluation is not None:
            raise SageMakerError(
                "JumpStart's training script evaluates on its own; evaluation settings need --trainer txt2img"
            )
        if objective not in METRIC_DEFINITIONS:
            raise SageMakerError(
                f"JumpStart's training script reports only {', '.join(METRIC_DEFINITIONS)}, not '{objective}'"
                " (txt2img's trainer, --trainer txt2img, reports every metric of txt2img evaluate)"
            )
        return TuningPlan(
            # The objective is only printed by the training script when it computes FID.
            hyperparameters=hyperparameters.model_copy(update={"compute_fid": True}),
            metric_definitions=list(METRIC_DEFINITIONS.values()),
        )

    def tuning_inputs(self, context: AwsContext, plan: TuningPlan, job_prefix: str) -> tuple[dict, dict]:
        return {}, {}  # the script needs nothing but its hyperparameters to report fid_score

    def catalog_tags(self, job: dict) -> list[str]:
        return []  # deployed on JumpStart's own container, as JumpStart's models are


class Txt2ImgTrainer(RemoteTrainer):
    """This package's trainer on the Hugging Face PyTorch training container, under torchrun."""

    name = "txt2img"
    training_metric_definitions = []  # it evaluates (and prints metrics) only in a tuning job
    # The local study's ranges: learning_rate on a log scale.
    default_ranges = {search.name: (search.low, search.high, search.log) for search in DEFAULT_RANGES}
    evaluation_refusal = None

    def check_base(self, catalog: Catalog, base: CatalogEntry, instance_count: int) -> None:
        try:
            trainable_base(catalog, base.id)  # the local trainer's refusals, before anything is uploaded
        except InputError as error:
            raise SageMakerError(str(error)) from error
        if base.source == "finetune":
            raise SageMakerError(
                f"'{base.id}' is a fine-tune on this machine; the SageMaker container has only the built-in "
                "catalog, so train on its base, or locally"
            )

    def check_hyperparameters(self, hyperparameters: Hyperparameters) -> None:
        """Every method and hyperparameter of the local trainer works in its job: nothing to refuse."""

    def check_dataset(self, folder: Path, dataset: DreamBoothDataset) -> None:
        """It reads every dataset the local loader accepts, several concepts included: nothing to refuse."""

    def container(self, context: AwsContext, base: CatalogEntry, instance_type: str | None) -> TrainingContainer:
        chosen_type = instance_type or DEFAULT_INSTANCE_TYPE
        return TrainingContainer(
            image_uri=TRAINING_CONTAINER.image(context.region, chosen_type, "training"),
            instance_type=chosen_type,
            channels={},
        )

    def job_source(self, context: AwsContext, container: TrainingContainer, job_prefix: str) -> str:
        """Pack txt2img's trainer and upload it under ``job_prefix``/source."""
        uri = join_s3(job_prefix, "source", ARCHIVE_NAME)
        with tempfile.TemporaryDirectory(prefix="txt2img-trainer-") as workdir:
            upload_files(context, [(build_source_archive(Path(workdir)), uri)], "uploading txt2img's trainer")
        return uri

    def job_hyperparameters(
        self, hyperparameters: Hyperparameters, base: CatalogEntry, name: str, source_uri: str
    ) -> dict[str, str]:
        return job_hyperparameters(hyperparameters, base.id, name, source_uri)

    def check_tunable(self, name: str) -> None:
        """It takes any numeric hyperparameter: nothing to refuse."""

    def plan_tuning(
        self, objective: str, evaluation: EvaluationSettings | None, hyperparameters: Hyperparameters
    ) -> TuningPlan:
        """Each job evaluates its model as a local trial does (default: the objective alone), the
        objective first, so any local objective works in its direction."""
        if objective not in METRIC_DIRECTIONS:
            raise SageMakerError(f"unknown objective '{objective}'; choose one of {', '.join(METRIC_DIRECTIONS)}")
        evaluation = objective_first(evaluation or EvaluationSettings(metrics=[objective]), objective)
        return TuningPlan(
            hyperparameters=hyperparameters,
            metric_definitions=[
                {"Name": metric, "Regex": TXT2IMG_METRIC_REGEX.format(name=metric)} for metric in evaluation.metrics
            ],
            evaluation=evaluation,
            weight_files=tuple(metric_weight_files(evaluation)),  # before anything is uploaded
        )

    def tuning_inputs(self, context: AwsContext, plan: TuningPlan, job_prefix: str) -> tuple[dict, dict]:
        """The evaluation settings, and the metric networks from this machine in the metrics channel."""
        # The container's own environment says where the networks are (jumpstart.sagemaker_entry).
        static = {EVALUATION_KEY: json.dumps(plan.evaluation.model_dump(mode="json", exclude={"weights"}))}
        if not plan.weight_files:
            return static, {}
        weights_uri = join_s3(job_prefix, "metric-weights")
        upload_files(
            context,
            [(path, join_s3(weights_uri, key)) for path, key in plan.weight_files],
            "uploading the metric networks",
        )
        return static, {METRICS_CHANNEL: weights_uri + "/"}

    def catalog_tags(self, job: dict) -> list[str]:
        tags = [TXT2IMG_TRAINER_TAG]
        if job.get("HyperParameters", {}).get(INFERENCE_CODE_KEY):  # its source packed the inference code
            tags.append(INFERENCE_CODE_TAG)
        return tags


def metric_weight_files(evaluation: EvaluationSettings) -> list[tuple[Path, str]]:
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


TRAINERS: dict[str, RemoteTrainer] = {trainer.name: trainer for trainer in (JumpStartTrainer(), Txt2ImgTrainer())}


def remote_trainer(name: str) -> RemoteTrainer:
    """The trainer ``--trainer`` names; a SageMakerError listing the others for an unknown name."""
    try:
        return TRAINERS[name]
    except KeyError:
        raise SageMakerError(f"unknown trainer '{name}'; choose one of {', '.join(TRAINERS)}") from None
