"""txt2img train/tune --remote: the JumpStart training and tuning jobs sent to SageMaker, and the
catalog entry their result becomes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from aws_fixtures import JUMPSTART_BUCKET, REGION, ROLE, TRAINING_GPU_IMAGE, TRAINING_SCRIPT_KEY, make_bucket
from PIL import Image

from jumpstart.errors import SageMakerError
from jumpstart.polling import WaitFailed
from jumpstart.remote import launch_remote_training, launch_remote_tuning
from jumpstart.trainers import TRAINERS, RemoteTrainer, TrainingContainer, TuningPlan
from training.dataset import DatasetError, load_dataset
from training.hyperparameters import Hyperparameters

# No test here may leave the machine.
pytestmark = pytest.mark.usefixtures("no_network")

BASE = "model-txt2img-stabilityai-stable-diffusion-v2-1-base"
SCRIPT_URI = f"s3://{JUMPSTART_BUCKET}/{TRAINING_SCRIPT_KEY}"
BASE_MODEL_URI = f"s3://{JUMPSTART_BUCKET}/stabilityai-training/train-{BASE}.tar.gz"


@pytest.fixture
def jumpstart_bucket(aws):
    """JumpStart's regional bucket with its training script, and the user's bucket my-txt2img."""
    make_bucket(aws, JUMPSTART_BUCKET)
    aws.client("s3").put_object(Bucket=JUMPSTART_BUCKET, Key=TRAINING_SCRIPT_KEY, Body=b"script tarball")
    make_bucket(aws, "my-txt2img")
    return aws


@pytest.fixture
def dataset(tmp_path) -> Path:
    folder = tmp_path / "dog"
    folder.mkdir()
    for index, color in enumerate([(200, 100, 50), (50, 100, 200), (100, 200, 50)]):
        Image.new("RGB", (8, 8), color).save(folder / f"dog-{index}.png")
    info = {"instance_prompt": "a photo of sks dog", "class_prompt": "a photo of a dog"}
    (folder / "dataset_info.json").write_text(json.dumps(info))
    (folder / "class_data_dir").mkdir()
    Image.new("RGB", (8, 8), (90, 90, 90)).save(folder / "class_data_dir" / "dog-class-0.png")
    (folder / "notes.txt").write_text("not training data")
    return folder


def _fingerprint(folder: Path) -> str:
    """The fingerprint the local trainer records for ``folder``."""
    return load_dataset(folder, Hyperparameters(), 512).fingerprint


def _channels(job: dict) -> dict[str, str]:
    return {
        channel["ChannelName"]: channel["DataSource"]["S3DataSource"]["S3Uri"] for channel in job["InputDataConfig"]
    }


def test_remote_training_uploads_data_runs_jumpstart_job_and_registers_the_result(
    jumpstart_bucket, dataset, sent_requests
):
    hyperparameters = Hyperparameters.from_pairs(
        ["max_steps=200", "learning_rate=1e-6", "with_prior_preservation=true"]
    )

    entry = launch_remote_training(
        str(dataset),
        BASE,
        "sks-dog",
        hyperparameters,
        instance_type="ml.g5.2xlarge",
        s3_prefix="s3://my-txt2img/work",
        role=ROLE,
        poll_seconds=0,
    )

    sagemaker = jumpstart_bucket.client("sagemaker")
    [summary] = sagemaker.list_training_jobs()["TrainingJobSummaries"]
    job = sagemaker.describe_training_job(TrainingJobName=summary["TrainingJobName"])
    assert job["TrainingJobName"].startswith("sks-dog-")
    assert job["AlgorithmSpecification"]["TrainingImage"] == TRAINING_GPU_IMAGE
    assert job["RoleArn"] == ROLE
    assert job["ResourceConfig"]["InstanceType"] == "ml.g5.2xlarge"
    # JumpStart's estimator way of running its script: the container's toolkit reads these two.
    assert job["HyperParameters"] == {
        **hyperparameters.sagemaker_strings(),
        "sagemaker_program": "transfer_learning.py",
        "sagemaker_submit_directory": SCRIPT_URI,
    }
    assert job["HyperParameters"]["max_steps"] == "200" and job["HyperParameters"]["with_prior_preservation"] == "True"
    sent = next(params for operation, params in sent_requests if operation == "CreateTrainingJob")
    assert sent["AlgorithmSpecification"]["MetricDefinitions"] == [
        {"Name": "fid_score", "Regex": r"fid_score=([-+]?\d\.?\d*)"}
    ]
    # The data goes beside the job's output, in a prefix of its own.
    data_key = f"work/jobs/sks-dog/{job['TrainingJobName']}/dataset/"
    assert _channels(job) == {"training": f"s3://my-txt2img/{data_key}", "model": BASE_MODEL_URI}
    assert job["OutputDataConfig"]["S3OutputPath"] == "s3://my-txt2img/work/jobs/sks-dog"
    listed = jumpstart_bucket.client("s3").list_objects_v2(Bucket="my-txt2img", Prefix=data_key)
    # What the dataset loader accepted, nothing else (notes.txt stays home).
    assert sorted(item["Key"].removeprefix(data_key) for item in listed["Contents"]) == [
        "class_data_dir/dog-class-0.png",
        "dataset_info.json",
        "dog-0.png",
        "dog-1.png",
        "dog-2.png",
    ]

    assert entry.id == "sks-dog" and entry.source == "finetune" and entry.method == "full"
    assert (entry.base, entry.family, entry.resolution) == (BASE, "sd2-base", 512)
    assert entry.artifact == job["ModelArtifacts"]["S3ModelArtifacts"]
    assert entry.artifact.startswith("s3://my-txt2img/work/jobs/sks-dog/")
    assert entry.hyperparameters == hyperparameters.model_dump(mode="json")
    assert entry.dataset_fingerprint == _fingerprint(dataset)
    from catalog.store import load_catalog

    assert load_catalog().get("sks-dog") == entry


def test_remote_training_result_is_deployable_on_the_jumpstart_container(jumpstart_bucket, dataset):
    from jumpstart.deploy import deploy

    entry = launch_remote_training(
        str(dataset), BASE, "sks-dog", Hyperparameters(), s3_prefix="s3://my-txt2img/w", role=ROLE, poll_seconds=0
    )
    deploy("sks-dog", role=ROLE, endpoint_name="sks-dog", instance_type="ml.g4dn.xlarge", poll_seconds=0)
    container = jumpstart_bucket.client("sagemaker").describe_model(ModelName="sks-dog")["PrimaryContainer"]
    assert container["ModelDataUrl"] == entry.artifact
    assert container["Image"].endswith(
        "huggingface-pytorch-inference:1.10.2-transformers4.17.0-gpu-py38-cu113-ubuntu20.04"
    )


def test_remote_training_with_s3_prefix_uploads_nothing_and_no_wait_returns_the_job(jumpstart_bucket, sent_requests):
    job_name = launch_remote_training("s3://my-txt2img/dogs/", BASE, "dog2", Hyperparameters(), role=ROLE, wait=False)

    assert isinstance(job_name, str) and job_name.startswith("dog2-")
    job = jumpstart_bucket.client("sagemaker").describe_training_job(TrainingJobName=job_name)
    assert _channels(job)["training"] == "s3://my-txt2img/dogs/"
    assert job["ResourceConfig"]["InstanceType"] == "ml.g5.2xlarge"  # the spec's default training instance
    uploads = [
        params["Key"] for operation, params in sent_requests if operation in ("PutObject", "CreateMultipartUpload")
    ]
    assert not any("dogs" in key or "datasets" in key for key in uploads)
    from catalog.store import load_catalog

    assert "dog2" not in load_catalog()


@pytest.mark.parametrize(
    ("data", "base", "name", "pairs", "message"),
    [
        ("s3://my-txt2img/dogs", BASE, "x", [], "must end with '/'"),
        ("DATASET", "huggingface-txt2img-conflictx-complex-lineart", "x", [], "cannot fine-tune"),
        ("DATASET", BASE, "tiny-sd", [], "already has a model 'tiny-sd'"),
        ("DATASET", BASE, "x", ["method=lora"], "full fine-tunes only"),
        ("DATASET", BASE, "x", ["sharding=fsdp"], "does not shard"),
        ("MULTI_CONCEPT", BASE, "x", [], "lists several concepts; JumpStart's training script reads one"),
    ],
)
def test_remote_training_refuses_bad_requests_before_starting(
    jumpstart_bucket, dataset, data, base, name, pairs, message
):
    if data == "MULTI_CONCEPT":
        concept = {"instance_data_dir": ".", "instance_prompt": "a photo of sks dog"}
        (dataset / "dataset_info.json").write_text(json.dumps({"concepts": [concept]}))
    data = str(dataset) if data in ("DATASET", "MULTI_CONCEPT") else data
    with pytest.raises(SageMakerError, match=message):
        launch_remote_training(data, base, name, Hyperparameters.from_pairs(pairs), role=ROLE)
    assert jumpstart_bucket.client("sagemaker").list_training_jobs()["TrainingJobSummaries"] == []


@pytest.mark.parametrize(
    ("spoil", "pairs"),
    [
        (lambda folder: (folder / "dataset_info.json").unlink(), []),
        (lambda folder: (folder / "dog-2.png").unlink(), []),
        (lambda folder: (folder / "dog-1.png").write_bytes(b"not a png"), []),
        (
            lambda folder: (folder / "dataset_info.json").write_text('{"instance_prompt": "sks"}'),
            ["with_prior_preservation=true"],
        ),
    ],
    ids=["no-dataset-info", "too-few-images", "corrupt-image", "prior-preservation-without-class-prompt"],
)
def test_remote_training_refuses_a_bad_folder_as_local_training_does(
    jumpstart_bucket, dataset, spoil, pairs, sent_requests
):
    spoil(dataset)
    hyperparameters = Hyperparameters.from_pairs(pairs)
    with pytest.raises(DatasetError) as local:
        load_dataset(dataset, hyperparameters, 512)
    sent_requests.clear()

    with pytest.raises(DatasetError) as remote:
        launch_remote_training(str(dataset), BASE, "x", hyperparameters, role=ROLE, s3_prefix="s3://my-txt2img/w")
    assert str(remote.value) == str(local.value)
    assert sent_requests == []  # refused before any AWS call, upload or job


def test_a_failed_training_job_is_an_error_and_is_not_registered(jumpstart_bucket, dataset, monkeypatch):
    from moto.sagemaker.models import FakeTrainingJob

    from catalog.store import load_catalog

    original_init = FakeTrainingJob.__init__

    def failing_init(self, *args, **kwargs):
        original_init(self, *args, **kwargs)
        self.training_job_status = "Failed"
        self.failure_reason = "AlgorithmError: ExecuteUserScriptError"

    monkeypatch.setattr(FakeTrainingJob, "__init__", failing_init)
    with pytest.raises(WaitFailed, match=r"^training job sick-dog-\S+ ended Failed: AlgorithmError: ExecuteUser"):
        launch_remote_training(
            str(dataset), BASE, "sick-dog", Hyperparameters(), s3_prefix="s3://my-txt2img/w", role=ROLE, poll_seconds=0
        )
    assert "sick-dog" not in load_catalog()


@pytest.mark.usefixtures("one_torch_thread")
def test_one_folder_has_one_fingerprint_trained_locally_and_on_sagemaker(jumpstart_bucket, tmp_path):
    from catalog.store import load_catalog
    from training.demo_dataset import write_demo_dataset
    from training.dreambooth import train

    folder = write_demo_dataset(tmp_path / "toy")
    local = train(
        folder, "tiny-sd", "toy-here", Hyperparameters(max_steps=1, validation_prompts=["a toy"]), progress=False
    )
    remote = launch_remote_training(
        str(folder), BASE, "toy-there", Hyperparameters(), s3_prefix="s3://my-txt2img/w", role=ROLE, poll_seconds=0
    )

    catalog = load_catalog()
    assert catalog.get("toy-here").dataset_fingerprint == local.dataset_fingerprint
    assert catalog.get("toy-there").dataset_fingerprint == remote.dataset_fingerprint == local.dataset_fingerprint
    assert local.dataset_fingerprint == _fingerprint(folder)


def test_remote_tuning_sends_bayesian_fid_search_and_registers_the_best_job(jumpstart_bucket, dataset):
    sagemaker = jumpstart_bucket.client("sagemaker")
    # moto names every tuning job's best training job "FakeTrainingJobName"; give it a real one.
    best_artifacts = "s3://my-txt2img/tune/FakeTrainingJobName/output"
    sagemaker.create_training_job(
        TrainingJobName="FakeTrainingJobName",
        AlgorithmSpecification={"TrainingImage": TRAINING_GPU_IMAGE, "TrainingInputMode": "File"},
        RoleArn=ROLE,
        OutputDataConfig={"S3OutputPath": best_artifacts},
        ResourceConfig={"InstanceType": "ml.g5.2xlarge", "InstanceCount": 1, "VolumeSizeInGB": 30},
        StoppingCondition={"MaxRuntimeInSeconds": 3600},
    )
    hyperparameters = Hyperparameters.from_pairs(["with_prior_preservation=true", "seed=5"])

    entry = launch_remote_tuning(
        str(dataset),
        BASE,
        "tuned-dog",
        hyperparameters,
        s3_prefix="s3://my-txt2img/w",
        role=ROLE,
        poll_seconds=0,
    )

    [summary] = sagemaker.list_hyper_parameter_tuning_jobs()["HyperParameterTuningJobSummaries"]
    tuning = sagemaker.describe_hyper_parameter_tuning_job(
        HyperParameterTuningJobName=summary["HyperParameterTuningJobName"]
    )
    config = tuning["HyperParameterTuningJobConfig"]
    assert config["Strategy"] == "Bayesian"
    assert config["HyperParameterTuningJobObjective"] == {"Type": "Minimize", "MetricName": "fid_score"}
    assert config["ResourceLimits"] == {"MaxNumberOfTrainingJobs": 7, "MaxParallelTrainingJobs": 7}
    assert config["ParameterRanges"]["ContinuousParameterRanges"] == [
        {"Name": "learning_rate", "MinValue": "1e-07", "MaxValue": "3e-06", "ScalingType": "Linear"}
    ]
    assert config["ParameterRanges"]["IntegerParameterRanges"] == [
        {"Name": "max_steps", "MinValue": "50", "MaxValue": "400", "ScalingType": "Linear"}
    ]
    definition = tuning["TrainingJobDefinition"]
    assert definition["AlgorithmSpecification"]["MetricDefinitions"] == [
        {"Name": "fid_score", "Regex": r"fid_score=([-+]?\d\.?\d*)"}
    ]
    assert definition["AlgorithmSpecification"]["TrainingImage"] == TRAINING_GPU_IMAGE
    static = definition["StaticHyperParameters"]
    expected = {k: v for k, v in hyperparameters.sagemaker_strings().items() if k not in ("learning_rate", "max_steps")}
    expected["compute_fid"] = "True"  # the objective is only printed when FID is computed
    assert {k: v for k, v in static.items() if not k.startswith("sagemaker_")} == expected
    assert static["sagemaker_submit_directory"] == SCRIPT_URI and static["sagemaker_program"] == "transfer_learning.py"
    channels = _channels(definition)
    assert (
        channels["model"] == BASE_MODEL_URI
        and channels["training"] == f"s3://my-txt2img/w/jobs/tuned-dog/{tuning['HyperParameterTuningJobName']}/dataset/"
    )

    assert entry.id == "tuned-dog" and entry.base == BASE
    assert entry.artifact == f"{best_artifacts}/FakeTrainingJobName/output/model.tar.gz"
    assert entry.dataset_fingerprint == _fingerprint(dataset)
    assert entry.metrics == {
        "fid_score": tuning["BestTrainingJob"]["FinalHyperParameterTuningJobObjectiveMetric"]["Value"]
    }
    assert entry.hyperparameters["compute_fid"] is True and entry.hyperparameters["seed"] == 5


def test_remote_tuning_ranges_follow_the_caller(jumpstart_bucket, dataset):
    job = launch_remote_tuning(
        "s3://my-txt2img/dogs/",
        BASE,
        "t2",
        Hyperparameters(),
        {"learning_rate": (1e-7, 1e-5, True), "num_class_images": (50, 200, False)},
        max_jobs=4,
        max_parallel_jobs=2,
        role=ROLE,
        wait=False,
    )
    tuning = jumpstart_bucket.client("sagemaker").describe_hyper_parameter_tuning_job(HyperParameterTuningJobName=job)
    config = tuning["HyperParameterTuningJobConfig"]
    assert config["ResourceLimits"] == {"MaxNumberOfTrainingJobs": 4, "MaxParallelTrainingJobs": 2}
    assert config["ParameterRanges"]["ContinuousParameterRanges"] == [
        {"Name": "learning_rate", "MinValue": "1e-07", "MaxValue": "1e-05", "ScalingType": "Logarithmic"}
    ]
    assert config["ParameterRanges"]["IntegerParameterRanges"] == [
        {"Name": "num_class_images", "MinValue": "50", "MaxValue": "200", "ScalingType": "Linear"}
    ]


@pytest.mark.parametrize(
    ("ranges", "options", "message"),
    [
        ({"lora_rank": (2, 8, False)}, {}, "cannot tune 'lora_rank' remotely"),
        ({"learning_rate": (0.0, 1e-5, True)}, {}, "bad range for learning_rate"),
        (None, {"objective": "clip_score"}, "reports only fid_score"),
        (None, {"max_jobs": 2, "max_parallel_jobs": 3}, "max_parallel_jobs <= max_jobs"),
    ],
)
def test_remote_tuning_refuses_bad_requests(jumpstart_bucket, ranges, options, message):
    with pytest.raises(SageMakerError, match=message):
        launch_remote_tuning("s3://my-txt2img/dogs/", BASE, "t3", Hyperparameters(), ranges, role=ROLE, **options)
    assert (
        jumpstart_bucket.client("sagemaker").list_hyper_parameter_tuning_jobs()["HyperParameterTuningJobSummaries"]
        == []
    )


def test_txt2img_train_remote_runs_the_jumpstart_job(jumpstart_bucket, dataset, capsys):
    from txt2img.cli import main

    main(
        [
            "train",
            str(dataset),
            "--base",
            BASE,
            "--name",
            "cli-dog",
            "--hp",
            "max_steps=100",
            "--remote",
            "--instance-type",
            "ml.g4dn.2xlarge",
            "--s3-prefix",
            "s3://my-txt2img/cli",
            "--role",
            ROLE,
            "--region",
            REGION,
        ]
    )

    out = capsys.readouterr().out
    assert out.startswith("registered cli-dog: s3://my-txt2img/cli/jobs/cli-dog/")
    assert "txt2img deploy cli-dog" in out
    [summary] = jumpstart_bucket.client("sagemaker").list_training_jobs()["TrainingJobSummaries"]
    job = jumpstart_bucket.client("sagemaker").describe_training_job(TrainingJobName=summary["TrainingJobName"])
    assert job["ResourceConfig"]["InstanceType"] == "ml.g4dn.2xlarge"
    assert job["HyperParameters"]["max_steps"] == "100"


def test_remote_errors_are_one_line(jumpstart_bucket, capsys):
    from txt2img.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["tune", "s3://my-txt2img/dogs", "--base", BASE, "--name", "t4", "--remote", "--role", ROLE, "--no-wait"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == "txt2img: error: an S3 training prefix must end with '/': s3://my-txt2img/dogs/\n"


def test_txt2img_tune_remote_starts_automatic_model_tuning(jumpstart_bucket, capsys):
    from txt2img.cli import main

    main(
        [
            "tune",
            "s3://my-txt2img/dogs/",
            "--base",
            BASE,
            "--name",
            "cli-tuned",
            "--trials",
            "5",
            "--range",
            "learning_rate=1e-7:1e-5:log",
            "--hp",
            "seed=3",
            "--remote",
            "--no-wait",
            "--role",
            ROLE,
        ]
    )

    sagemaker = jumpstart_bucket.client("sagemaker")
    [summary] = sagemaker.list_hyper_parameter_tuning_jobs()["HyperParameterTuningJobSummaries"]
    assert summary["HyperParameterTuningJobName"] in capsys.readouterr().out
    tuning = sagemaker.describe_hyper_parameter_tuning_job(
        HyperParameterTuningJobName=summary["HyperParameterTuningJobName"]
    )
    config = tuning["HyperParameterTuningJobConfig"]
    assert config["ResourceLimits"] == {"MaxNumberOfTrainingJobs": 5, "MaxParallelTrainingJobs": 5}
    assert config["ParameterRanges"]["ContinuousParameterRanges"] == [
        {"Name": "learning_rate", "MinValue": "1e-07", "MaxValue": "1e-05", "ScalingType": "Logarithmic"}
    ]
    assert tuning["TrainingJobDefinition"]["StaticHyperParameters"]["seed"] == "3"


def test_txt2img_tune_needs_trials_locally(capsys):
    from txt2img.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["tune", "some-folder", "--base", "tiny-sd", "--name", "x"])
    assert exit_info.value.code == 2
    assert "--trials is required" in capsys.readouterr().err


def test_job_names_fit_sagemakers_limits():
    from datetime import datetime, timezone

    from jumpstart.remote import TUNING_JOB_NAME_LIMIT, unique_job_name

    now = datetime(2026, 11, 26, 14, 5, 9, tzinfo=timezone.utc)
    assert unique_job_name("my_dog.v2", 63, now) == "my-dog-v2-261126-140509"
    tuning = unique_job_name("a-very-long-model-name-for-tuning", TUNING_JOB_NAME_LIMIT, now)
    assert tuning == "a-very-long-model-261126-140509" and len(tuning) <= 32


# --- a third trainer ------------------------------------------------------------------------------

OWN_IMAGE = "111122223333.dkr.ecr.us-east-1.amazonaws.com/own-trainer:1"
OWN_EXTRAS = "s3://my-txt2img/own-extras/"
OWN_LOSS = {"Name": "instance_loss", "Regex": r"instance_loss=([0-9.]+)"}


class OwnScriptTrainer(RemoteTrainer):
    """A third trainer as a user would add one: their own image, and a script uploaded for each job."""

    name = "own-script"
    training_metric_definitions = [OWN_LOSS]
    default_ranges = {"learning_rate": (1e-6, 1e-4, True)}
    evaluation_refusal = "own-script reports its loss only"

    def check_base(self, catalog, base, instance_count):
        if base.id != "tiny-sd":
            raise SageMakerError(f"own-script trains tiny-sd only, not '{base.id}'")

    def check_hyperparameters(self, hyperparameters):
        if hyperparameters.max_steps > 1000:
            raise SageMakerError("own-script trains at most 1000 steps")

    def check_dataset(self, folder, dataset):
        if len(dataset.concepts[0].instance_images) > 10:
            raise SageMakerError("own-script reads at most 10 images")

    def container(self, context, base, instance_type):
        return TrainingContainer(OWN_IMAGE, instance_type or "ml.c5.xlarge", {"extras": OWN_EXTRAS})

    def job_source(self, context, container, job_prefix):
        uri = f"{job_prefix}/own/script.tar.gz"
        bucket, _, key = uri.removeprefix("s3://").partition("/")
        context.client("s3").put_object(Bucket=bucket, Key=key, Body=b"own script")
        return uri

    def job_hyperparameters(self, hyperparameters, base, name, source_uri):
        return {
            "max_steps": str(hyperparameters.max_steps),
            "learning_rate": str(hyperparameters.learning_rate),
            "model": base.id,
            "sagemaker_program": "own_train.py",
            "sagemaker_submit_directory": source_uri,
        }

    def check_tunable(self, name):
        if name != "learning_rate":
            raise SageMakerError(f"own-script tunes learning_rate only, not '{name}'")

    def plan_tuning(self, objective, evaluation, hyperparameters):
        if objective != "instance_loss":
            raise SageMakerError(f"own-script reports instance_loss, not '{objective}'")
        return TuningPlan(hyperparameters=hyperparameters, metric_definitions=[OWN_LOSS])

    def tuning_inputs(self, context, plan, job_prefix):
        return {"report_loss": "true"}, {}

    def catalog_tags(self, job):
        return ["own-script"]


@pytest.fixture
def own_trainer(monkeypatch) -> OwnScriptTrainer:
    """The third trainer, registered in the one table the remote path reads, and nowhere else."""
    trainer = OwnScriptTrainer()
    monkeypatch.setitem(TRAINERS, trainer.name, trainer)
    return trainer


def test_a_third_trainer_is_one_entry_in_the_trainers_table(jumpstart_bucket, dataset, sent_requests, own_trainer):
    from catalog.store import load_catalog

    hyperparameters = Hyperparameters(max_steps=20)

    entry = launch_remote_training(
        str(dataset),
        "tiny-sd",
        "own-dog",
        hyperparameters,
        trainer="own-script",
        s3_prefix="s3://my-txt2img/w",
        role=ROLE,
        poll_seconds=0,
    )

    sent = next(params for operation, params in sent_requests if operation == "CreateTrainingJob")
    job = sent["TrainingJobName"]
    assert sent["AlgorithmSpecification"] == {
        "TrainingImage": OWN_IMAGE,
        "TrainingInputMode": "File",
        "MetricDefinitions": [OWN_LOSS],
    }
    assert sent["ResourceConfig"]["InstanceType"] == "ml.c5.xlarge"
    source = f"s3://my-txt2img/w/jobs/own-dog/{job}/own/script.tar.gz"
    assert sent["HyperParameters"] == {
        "max_steps": "20",
        "learning_rate": str(hyperparameters.learning_rate),
        "model": "tiny-sd",
        "sagemaker_program": "own_train.py",
        "sagemaker_submit_directory": source,
    }
    assert _channels(sent) == {"training": f"s3://my-txt2img/w/jobs/own-dog/{job}/dataset/", "extras": OWN_EXTRAS}
    s3 = jumpstart_bucket.client("s3")
    assert (
        s3.get_object(Bucket="my-txt2img", Key=source.removeprefix("s3://my-txt2img/"))["Body"].read() == b"own script"
    )
    assert entry.tags == ["sagemaker", "dreambooth", "own-script"] and "by own-script's trainer" in entry.description
    assert load_catalog().get("own-dog") == entry

    refusals = [
        ((BASE, Hyperparameters()), "own-script trains tiny-sd only"),
        (("tiny-sd", Hyperparameters(max_steps=2000)), "own-script trains at most 1000 steps"),
    ]
    for (base, refused), message in refusals:
        with pytest.raises(SageMakerError, match=message):
            launch_remote_training(str(dataset), base, "own-2", refused, trainer="own-script", role=ROLE)
    for index in range(3, 12):
        Image.new("RGB", (8, 8), (index, 0, 0)).save(dataset / f"dog-{index}.png")
    with pytest.raises(SageMakerError, match="own-script reads at most 10 images"):
        launch_remote_training(str(dataset), "tiny-sd", "own-2", hyperparameters, trainer="own-script", role=ROLE)
    assert len(jumpstart_bucket.client("sagemaker").list_training_jobs()["TrainingJobSummaries"]) == 1


def test_a_third_trainer_tunes_over_its_own_ranges_and_metrics(jumpstart_bucket, own_trainer):
    sagemaker = jumpstart_bucket.client("sagemaker")
    with pytest.raises(SageMakerError, match="own-script tunes learning_rate only, not 'max_steps'"):
        launch_remote_tuning(
            "s3://my-txt2img/dogs/",
            "tiny-sd",
            "t",
            Hyperparameters(),
            {"max_steps": (5, 50, False)},
            objective="instance_loss",
            trainer="own-script",
            role=ROLE,
        )
    with pytest.raises(SageMakerError, match="own-script reports instance_loss, not 'fid_score'"):
        launch_remote_tuning(
            "s3://my-txt2img/dogs/", "tiny-sd", "t", Hyperparameters(), trainer="own-script", role=ROLE
        )

    job = launch_remote_tuning(
        "s3://my-txt2img/dogs/",
        "tiny-sd",
        "own-tuned",
        Hyperparameters(max_steps=30),
        objective="instance_loss",
        trainer="own-script",
        role=ROLE,
        wait=False,
    )

    tuning = sagemaker.describe_hyper_parameter_tuning_job(HyperParameterTuningJobName=job)
    config = tuning["HyperParameterTuningJobConfig"]
    assert config["HyperParameterTuningJobObjective"] == {"Type": "Minimize", "MetricName": "instance_loss"}
    assert config["ParameterRanges"] == {
        "ContinuousParameterRanges": [
            {"Name": "learning_rate", "MinValue": "1e-06", "MaxValue": "0.0001", "ScalingType": "Logarithmic"}
        ]
    }
    definition = tuning["TrainingJobDefinition"]
    assert definition["AlgorithmSpecification"]["MetricDefinitions"] == [OWN_LOSS]
    static = definition["StaticHyperParameters"]
    assert (static["max_steps"], static["model"], static["report_loss"]) == ("30", "tiny-sd", "true")
    assert "learning_rate" not in static  # the tuner sets it per job
