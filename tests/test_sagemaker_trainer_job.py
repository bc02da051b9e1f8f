"""txt2img train --remote --trainer txt2img: this package's trainer as a SageMaker training job on the
Hugging Face PyTorch training container, the source it packs, and its entry point run for real."""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import yaml
from aws_fixtures import REGION, ROLE, make_bucket
from packed_inference import import_packed_inference
from tiny_metric_networks import tiny_clip_folder, tiny_inception

from jumpstart.errors import SageMakerError
from jumpstart.remote import launch_remote_training
from jumpstart.sagemaker_entry import torchrun_command
from training.demo_dataset import write_demo_dataset
from training.hyperparameters import Hyperparameters

# No test here may leave the machine.
pytestmark = pytest.mark.usefixtures("no_network")

# sagemaker.core's image_uris for huggingface 4.56.2 / pytorch2.8.0 / py312, training, GPU.
HF_TRAINING_IMAGE = (
    f"763104351884.dkr.ecr.{REGION}.amazonaws.com/"
    "huggingface-pytorch-training:2.8.0-transformers4.56.2-gpu-py312-cu129-ubuntu22.04"
)
JUMPSTART_BASE = "model-txt2img-stabilityai-stable-diffusion-v2-1-base"
HF_INFERENCE_CPU_IMAGE = (
    f"763104351884.dkr.ecr.{REGION}.amazonaws.com/"
    "huggingface-pytorch-inference:2.6.0-transformers4.49.0-cpu-py312-ubuntu22.04"
)


@pytest.fixture
def bucket(aws):
    make_bucket(aws, "my-txt2img")
    return aws


@pytest.fixture
def two_subjects(tmp_path) -> Path:
    return write_demo_dataset(tmp_path / "toys", ("red", "blue"), images_per_subject=3)


def _object(session, uri: str) -> bytes:
    bucket, _, key = uri.removeprefix("s3://").partition("/")
    return session.client("s3").get_object(Bucket=bucket, Key=key)["Body"].read()


def _toolkit_hps(hyperparameters: dict[str, str]) -> str:
    """SM_HPS as SageMaker's training toolkit writes it: each value JSON-decoded where it can be."""

    def decoded(value: str):
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            return value

    return json.dumps({key: decoded(value) for key, value in hyperparameters.items()})


def test_the_job_runs_our_trainer_on_every_gpu_of_several_instances(bucket, two_subjects, sent_requests):
    hyperparameters = Hyperparameters.from_pairs(
        ["method=lora", "max_steps=300", "with_prior_preservation=true", "num_class_images=1"]
    )
    for subject in ("red", "blue"):
        (two_subjects / subject / "class_data_dir").mkdir()
        shutil.copyfile(
            two_subjects / subject / f"{subject}-0.png", two_subjects / subject / "class_data_dir" / "c.png"
        )

    entry = launch_remote_training(
        str(two_subjects),
        "tiny-sd",
        "toys",
        hyperparameters,
        trainer="txt2img",
        instance_type="ml.g5.12xlarge",
        instance_count=2,
        s3_prefix="s3://my-txt2img/work",
        role=ROLE,
        poll_seconds=0,
    )

    sent = next(params for operation, params in sent_requests if operation == "CreateTrainingJob")
    job_name = sent["TrainingJobName"]
    assert job_name.startswith("toys-")
    assert sent["AlgorithmSpecification"]["TrainingImage"] == HF_TRAINING_IMAGE
    assert sent["ResourceConfig"] == {"InstanceType": "ml.g5.12xlarge", "InstanceCount": 2, "VolumeSizeInGB": 30}
    source_uri = f"s3://my-txt2img/work/jobs/toys/{job_name}/source/sourcedir.tar.gz"
    hps = sent["HyperParameters"]
    assert (hps["sagemaker_program"], hps["sagemaker_submit_directory"]) == ("txt2img_train.py", source_uri)
    assert (hps["txt2img_base"], hps["txt2img_name"]) == ("tiny-sd", "toys")
    assert hps["txt2img_inference_code"] == "inference_code"  # the folder of the source holding code/
    assert (hps["method"], hps["max_steps"], hps["with_prior_preservation"]) == ("lora", "300", "True")
    # Every one of our hyperparameters travels (JumpStart's names among them), not only JumpStart's.
    assert set(Hyperparameters.model_fields) <= set(hps)
    # One channel: the trainer downloads its base itself, unlike JumpStart's script.
    data_uri = f"s3://my-txt2img/work/jobs/toys/{job_name}/dataset/"
    assert [
        (channel["ChannelName"], channel["DataSource"]["S3DataSource"]["S3Uri"]) for channel in sent["InputDataConfig"]
    ] == [("training", data_uri)]
    uploaded = bucket.client("s3").list_objects_v2(
        Bucket="my-txt2img", Prefix=data_uri.removeprefix("s3://my-txt2img/")
    )
    assert sorted(item["Key"].rsplit("/dataset/", 1)[1] for item in uploaded["Contents"]) == [
        "blue/blue-0.png",
        "blue/blue-1.png",
        "blue/blue-2.png",
        "blue/class_data_dir/c.png",
        "dataset_info.json",
        "red/class_data_dir/c.png",
        "red/red-0.png",
        "red/red-1.png",
        "red/red-2.png",
    ]

    with tarfile.open(fileobj=io.BytesIO(_object(bucket, source_uri))) as tar:
        names = set(tar.getnames())
        requirements = tar.extractfile("requirements.txt").read().decode().split()
    assert {"txt2img_train.py", "training/distributed.py", "training/dreambooth.py", "catalog/models.yaml"} <= names
    assert "txt2img/errors.py" in names and not any(name.startswith(("serving/", "tests/")) for name in names)
    # What the job adds to its model as code/: write_inference_code's folder, as a local deploy packs it.
    assert {
        "inference_code/inference.py",
        "inference_code/serving/invocations.py",
        "inference_code/requirements.txt",
    } <= names
    assert not any("__pycache__" in name for name in names)
    assert any(line.startswith("diffusers") for line in requirements)
    assert not any(line.startswith(("torch", "bentoml")) for line in requirements)

    assert (entry.id, entry.source, entry.base, entry.method) == ("toys", "finetune", "tiny-sd", "lora")
    assert (
        entry.artifact
        == bucket.client("sagemaker").describe_training_job(TrainingJobName=job_name)["ModelArtifacts"][
            "S3ModelArtifacts"
        ]
    )
    assert {"txt2img-trainer", "inference-code"} <= set(entry.tags)
    from catalog.store import load_catalog

    assert load_catalog().get("toys") == entry


def test_the_entry_point_starts_torchrun_over_all_gpus_and_hosts():
    hyperparameters = Hyperparameters.from_pairs(["method=lora", "max_steps=300", "validation_prompts=a|b"])
    from jumpstart.trainer_source import job_hyperparameters

    sent = job_hyperparameters(hyperparameters, "tiny-sd", "toys", "s3://b/sourcedir.tar.gz")
    environment = {
        "SM_HOSTS": '["algo-1", "algo-2"]',
        "SM_CURRENT_HOST": "algo-2",
        "SM_NUM_GPUS": "4",
        "SM_HPS": _toolkit_hps(sent),
        "SM_CHANNEL_TRAINING": "/opt/ml/input/data/training",
        "SM_MODEL_DIR": "/opt/ml/model",
    }

    command = torchrun_command(environment)

    assert command[1:11] == [
        "-m",
        "torch.distributed.run",
        "--nnodes=2",
        "--node_rank=1",
        "--master_addr=algo-1",
        "--master_port=29500",
        "--nproc_per_node=4",
        "--max_restarts=0",
        "--module",
        "training.distributed",
    ]
    payload = json.loads(command[11])
    assert (payload["base"], payload["name"], payload["register"]) == ("tiny-sd", "toys", False)
    assert (payload["data_dir"], payload["output_dir"]) == ("/opt/ml/input/data/training", "/opt/ml/model")
    assert Hyperparameters.model_validate(payload["hyperparameters"]) == hyperparameters
    # Beside the entry point, where the toolkit extracted sourcedir.tar.gz.
    import jumpstart.sagemaker_entry

    source_dir = Path(jumpstart.sagemaker_entry.__file__).resolve().parent
    assert payload["inference_code"] == str(source_dir / "inference_code")
    # One instance: a standalone rendezvous on this host.
    single = torchrun_command({**environment, "SM_HOSTS": '["algo-1"]', "SM_CURRENT_HOST": "algo-1"})
    assert single[3:6] == ["--standalone", "--nnodes=1", "--nproc_per_node=4"]


@pytest.mark.usefixtures("one_torch_thread")
@pytest.mark.parametrize("method", ["lora", "full"])
def test_the_packed_source_alone_trains_a_model_the_inference_script_serves_as_it_is(tmp_path, method):
    """The container's view: only sourcedir.tar.gz on the path, run as the toolkit runs it (CPU, gloo);
    then the model directory, packed as SageMaker packs it, served by its own code/inference.py."""
    from jumpstart.trainer_source import build_source_archive, job_hyperparameters

    source = tmp_path / "code"
    source.mkdir()
    with tarfile.open(build_source_archive(tmp_path)) as tar:
        tar.extractall(source, filter="data")
    data = write_demo_dataset(tmp_path / "data", ("red", "blue"), images_per_subject=3)
    hyperparameters = Hyperparameters.from_pairs([f"method={method}", "max_steps=2", "validation_prompts=a red toy"])
    model_dir = tmp_path / "opt-ml-model"
    model_dir.mkdir()
    environment = {
        "PATH": os.environ["PATH"],
        "PYTHONPATH": str(source),
        "OMP_NUM_THREADS": "1",
        "TXT2IMG_HOME": str(tmp_path / "home"),
        "SM_HPS": _toolkit_hps(job_hyperparameters(hyperparameters, "tiny-sd", "toys", "s3://b/s.tar.gz")),
        "SM_CHANNEL_TRAINING": str(data),
        "SM_MODEL_DIR": str(model_dir),
        "SM_NUM_GPUS": "0",
        "CUDA_VISIBLE_DEVICES": "",
    }

    done = subprocess.run(
        [sys.executable, "txt2img_train.py"], cwd=source, env=environment, capture_output=True, text=True, timeout=300
    )

    assert done.returncode == 0, done.stderr[-3000:]
    assert (model_dir / "model").is_dir()
    written = yaml.safe_load((model_dir / "entry.yaml").read_text())
    assert (written["id"], written["base"], written["method"]) == ("toys", "tiny-sd", method)
    assert not (tmp_path / "home" / "catalog").exists()  # nothing registered in the container
    # The adapter stays as trained; the endpoint loads the complete pipeline fused from it.
    pipelines = {path.parent.relative_to(model_dir).as_posix() for path in model_dir.rglob("model_index.json")}
    assert pipelines == ({"fused"} if method == "lora" else {"model"})
    assert (model_dir / "model" / "pytorch_lora_weights.safetensors").is_file() == (method == "lora")
    from jumpstart.package import write_inference_code

    write_inference_code(tmp_path / "expected-code")
    assert _tree(model_dir / "code") == _tree(tmp_path / "expected-code")

    # SageMaker packs the model directory into model.tar.gz; the inference container extracts it to
    # /opt/ml/model and imports code/inference.py with code/ first on the path.
    archive = tmp_path / "model.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(model_dir, arcname=".")
    served = tmp_path / "opt-ml-model-served"
    with tarfile.open(archive) as tar:
        tar.extractall(served, filter="data")
    inference = import_packed_inference(served / "code")
    pipeline = inference.model_fn(str(served))
    body = {"prompt": "a red toy", "width": 32, "height": 32, "num_inference_steps": 2, "seed": 1}
    answer = json.loads(inference.transform_fn(pipeline, json.dumps(body), "application/json", None))
    [image] = answer["generated_images"]
    from PIL import Image

    with Image.open(io.BytesIO(base64.b64decode(image))) as decoded:
        assert (decoded.format, decoded.size) == ("JPEG", (32, 32))


def _tree(folder: Path) -> dict[str, bytes]:
    return {path.relative_to(folder).as_posix(): path.read_bytes() for path in folder.rglob("*") if path.is_file()}


def test_refusals_before_anything_is_uploaded(bucket, two_subjects, capsys):
    hyperparameters = Hyperparameters()
    with pytest.raises(SageMakerError, match="JumpStart's training script runs on one instance"):
        launch_remote_training(
            str(two_subjects), JUMPSTART_BASE, "toys", hyperparameters, instance_count=2, role=ROLE, poll_seconds=0
        )
    with pytest.raises(SageMakerError, match="train it with --trainer txt2img"):
        launch_remote_training(str(two_subjects), JUMPSTART_BASE, "toys", hyperparameters, role=ROLE, poll_seconds=0)
    with pytest.raises(SageMakerError, match="every concept needs its 100 class images"):
        launch_remote_training(
            str(two_subjects),
            "tiny-sd",
            "toys",
            Hyperparameters(with_prior_preservation=True),
            trainer="txt2img",
            instance_count=2,
            role=ROLE,
            poll_seconds=0,
        )
    assert bucket.client("sagemaker").list_training_jobs()["TrainingJobSummaries"] == []

    from txt2img.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["train", str(two_subjects), "--base", "tiny-sd", "--name", "toys", "--trainer", "txt2img"])
    assert exit_info.value.code == 2
    assert "--trainer is for --remote runs" in capsys.readouterr().err


def test_cli_runs_our_trainer_and_deploys_its_result_on_the_hugging_face_container(
    bucket, two_subjects, capsys, sent_requests
):
    from txt2img.cli import main

    main(
        ["train", str(two_subjects), "--base", "tiny-sd", "--name", "toys", "--method", "lora", "--remote"]
        + ["--trainer", "txt2img", "--instance-type", "ml.g5.12xlarge", "--s3-prefix", "s3://my-txt2img/cli"]
        + ["--role", ROLE, "--region", REGION]
    )
    assert capsys.readouterr().out.startswith("registered toys: s3://my-txt2img/cli/jobs/toys/")
    [summary] = bucket.client("sagemaker").list_training_jobs()["TrainingJobSummaries"]
    job = bucket.client("sagemaker").describe_training_job(TrainingJobName=summary["TrainingJobName"])
    assert job["HyperParameters"]["sagemaker_program"] == "txt2img_train.py"

    artifact = job["ModelArtifacts"]["S3ModelArtifacts"]
    sent_requests.clear()

    main(["deploy", "toys", "--endpoint-name", "toys", "--role", ROLE, "--region", REGION])

    # The job's own model.tar.gz (with its code/) on the Hugging Face inference container, not JumpStart's.
    container = bucket.client("sagemaker").describe_model(ModelName="toys")["PrimaryContainer"]
    assert container["Image"] == HF_INFERENCE_CPU_IMAGE  # tiny-sd's family: a CPU instance
    assert container["ModelDataUrl"] == artifact
    assert container["Environment"]["SAGEMAKER_SUBMIT_DIRECTORY"] == "/opt/ml/model/code"
    assert [operation for operation, _ in sent_requests if operation.startswith("Create")] == [
        "CreateModel",
        "CreateEndpointConfig",
        "CreateEndpoint",
    ]


# --- txt2img tune --remote --trainer txt2img ------------------------------------------------------


def _metric_networks(folder: Path) -> tuple[Path, Path]:
    """A TorchScript stand-in for Inception and a tiny CLIP folder, as a user keeps them locally."""
    import torch

    folder.mkdir()
    inception = folder / "inception-2015-12-05.pt"
    torch.jit.script(tiny_inception()).save(str(inception))
    return inception, tiny_clip_folder(folder / "clip")


def _best_training_job(session, hyperparameters: dict[str, str]) -> None:
    """moto names every tuning job's best training job "FakeTrainingJobName"; make it exist, as
    SageMaker's would, with the tuning job's static hyperparameters."""
    session.client("sagemaker").create_training_job(
        TrainingJobName="FakeTrainingJobName",
        AlgorithmSpecification={"TrainingImage": HF_TRAINING_IMAGE, "TrainingInputMode": "File"},
        RoleArn=ROLE,
        HyperParameters=hyperparameters,
        OutputDataConfig={"S3OutputPath": "s3://my-txt2img/tuned"},
        ResourceConfig={"InstanceType": "ml.g5.2xlarge", "InstanceCount": 1, "VolumeSizeInGB": 30},
        StoppingCondition={"MaxRuntimeInSeconds": 3600},
    )


def _tuning_job(session) -> dict:
    sagemaker = session.client("sagemaker")
    [summary] = sagemaker.list_hyper_parameter_tuning_jobs()["HyperParameterTuningJobSummaries"]
    return sagemaker.describe_hyper_parameter_tuning_job(
        HyperParameterTuningJobName=summary["HyperParameterTuningJobName"]
    )


def _keys(session, prefix: str) -> list[str]:
    listed = session.client("s3").list_objects_v2(Bucket="my-txt2img", Prefix=prefix).get("Contents", [])
    return sorted(item["Key"].removeprefix(prefix) for item in listed)


@pytest.mark.usefixtures("one_torch_thread")
def test_tuning_runs_our_trainer_evaluates_each_job_and_registers_the_best(bucket, two_subjects, tmp_path):
    from training.evaluation import EvaluationSettings
    from training.metrics import MetricWeights

    inception, clip = _metric_networks(tmp_path / "networks")
    evaluation = EvaluationSettings(
        metrics=["fid_score", "clip_t", "instance_loss"],
        prompts_per_subject=2,
        inference_steps=3,
        weights=MetricWeights(inception=str(inception), clip=str(clip), dino=None),
    )
    _best_training_job(bucket, {"txt2img_inference_code": "inference_code"})
    from jumpstart.remote import launch_remote_tuning

    entry = launch_remote_tuning(
        str(two_subjects),
        "tiny-sd",
        "tuned-toys",
        Hyperparameters(method="lora", max_steps=100),
        {"learning_rate": (1e-6, 1e-4, True), "lora_rank": (2, 16, False)},
        max_jobs=4,
        max_parallel_jobs=2,
        objective="clip_t",
        trainer="txt2img",
        evaluation=evaluation,
        s3_prefix="s3://my-txt2img/w",
        role=ROLE,
        poll_seconds=0,
    )

    tuning = _tuning_job(bucket)
    job = tuning["HyperParameterTuningJobName"]
    config = tuning["HyperParameterTuningJobConfig"]
    # clip_t grows as the images follow their prompts: maximised, where fid_score would be minimised.
    assert config["HyperParameterTuningJobObjective"] == {"Type": "Maximize", "MetricName": "clip_t"}
    assert config["ResourceLimits"] == {"MaxNumberOfTrainingJobs": 4, "MaxParallelTrainingJobs": 2}
    # lora_rank is not one of JumpStart's names; our trainer takes it.
    assert config["ParameterRanges"]["IntegerParameterRanges"] == [
        {"Name": "lora_rank", "MinValue": "2", "MaxValue": "16", "ScalingType": "Linear"}
    ]
    assert config["ParameterRanges"]["ContinuousParameterRanges"] == [
        {"Name": "learning_rate", "MinValue": "1e-06", "MaxValue": "0.0001", "ScalingType": "Logarithmic"}
    ]
    definition = tuning["TrainingJobDefinition"]
    algorithm = definition["AlgorithmSpecification"]
    assert algorithm["TrainingImage"] == HF_TRAINING_IMAGE
    # The objective first, then the others, each read by its own regex.
    assert [metric["Name"] for metric in algorithm["MetricDefinitions"]] == ["clip_t", "fid_score", "instance_loss"]
    static = definition["StaticHyperParameters"]
    assert static["sagemaker_program"] == "txt2img_train.py"
    assert (static["txt2img_base"], static["txt2img_name"], static["method"]) == ("tiny-sd", "tuned-toys", "lora")
    assert "lora_rank" not in static and "learning_rate" not in static  # the tuner sets them per job
    sent_evaluation = json.loads(static["txt2img_evaluation"])
    assert sent_evaluation["metrics"] == ["clip_t", "fid_score", "instance_loss"]
    assert (sent_evaluation["prompts_per_subject"], sent_evaluation["inference_steps"]) == (2, 3)
    assert "weights" not in sent_evaluation  # the container's own paths are set by its entry point
    # The networks travel from this machine in the metrics channel, under the names the entry point reads.
    weights_uri = f"s3://my-txt2img/w/jobs/tuned-toys/{job}/metric-weights/"
    channels = {c["ChannelName"]: c["DataSource"]["S3DataSource"]["S3Uri"] for c in definition["InputDataConfig"]}
    assert channels == {"training": f"s3://my-txt2img/w/jobs/tuned-toys/{job}/dataset/", "metrics": weights_uri}
    local_clip = sorted(f"clip/{path.relative_to(clip).as_posix()}" for path in clip.rglob("*") if path.is_file())
    assert _keys(bucket, weights_uri.removeprefix("s3://my-txt2img/")) == sorted(["inception.pt", *local_clip])

    assert (entry.id, entry.base, entry.method) == ("tuned-toys", "tiny-sd", "lora")
    assert entry.metrics == {
        "clip_t": tuning["BestTrainingJob"]["FinalHyperParameterTuningJobObjectiveMetric"]["Value"]
    }
    # Registered as our trainer's output: txt2img deploy serves its archive as it is.
    assert {"txt2img-trainer", "inference-code"} <= set(entry.tags)


def test_remote_tuning_refuses_what_cannot_be_computed_before_uploading(bucket, two_subjects, tmp_path, capsys):
    from jumpstart.remote import launch_remote_tuning
    from training.evaluation import EvaluationSettings
    from training.metrics import MetricWeights

    missing = EvaluationSettings(
        metrics=["fid_score"], weights=MetricWeights(inception=str(tmp_path / "nowhere.pt"), clip=None, dino=None)
    )
    refusals = [
        ({"objective": "fid_score", "evaluation": missing}, "fid_score cannot be computed on SageMaker"),
        ({"objective": "clip_score"}, "unknown objective 'clip_score'"),
        (
            {"ranges": {"mixed_precision": (0, 1, False)}},
            "cannot tune 'mixed_precision': 'mixed_precision' is not numeric",
        ),
    ]
    for options, message in refusals:
        options = {"objective": "instance_loss", **options}
        with pytest.raises(SageMakerError, match=message):
            launch_remote_tuning(
                str(two_subjects), "tiny-sd", "t", Hyperparameters(), trainer="txt2img", **options, role=ROLE
            )
    with pytest.raises(SageMakerError, match="evaluation settings need --trainer txt2img"):
        launch_remote_tuning(str(two_subjects), JUMPSTART_BASE, "t", Hyperparameters(), evaluation=missing, role=ROLE)
    assert bucket.client("s3").list_objects_v2(Bucket="my-txt2img").get("Contents") is None
    assert bucket.client("sagemaker").list_hyper_parameter_tuning_jobs()["HyperParameterTuningJobSummaries"] == []

    from txt2img.cli import main

    tune = ["tune", str(two_subjects), "--base", "tiny-sd", "--name", "t", "--trials", "2"]
    for arguments, message in [
        (["--trainer", "txt2img"], "--trainer is for --remote runs"),
        (["--remote", "--trainer", "txt2img", "--storage", "sqlite:///x.db", "--role", ROLE], "--storage is for local"),
    ]:
        with pytest.raises(SystemExit) as exit_info:
            main(tune + arguments)
        assert exit_info.value.code == 2
        [line] = capsys.readouterr().err.splitlines()
        assert message in line


def test_cli_tunes_remotely_with_our_trainer_over_the_local_studys_ranges(bucket, two_subjects, capsys):
    from txt2img.cli import main

    main(
        ["tune", str(two_subjects), "--base", "tiny-sd", "--name", "cli-toys", "--trials", "3", "--remote"]
        + ["--trainer", "txt2img", "--objective", "instance_loss", "--hp", "method=lora", "--steps", "4"]
        + ["--no-wait", "--s3-prefix", "s3://my-txt2img/cli", "--role", ROLE, "--region", REGION]
    )

    tuning = _tuning_job(bucket)
    assert tuning["HyperParameterTuningJobName"] in capsys.readouterr().out
    config = tuning["HyperParameterTuningJobConfig"]
    assert config["HyperParameterTuningJobObjective"] == {"Type": "Minimize", "MetricName": "instance_loss"}
    assert config["ResourceLimits"] == {"MaxNumberOfTrainingJobs": 3, "MaxParallelTrainingJobs": 3}
    # No --range: the local study's defaults, learning_rate on a log scale (JumpStart's script: linear).
    assert config["ParameterRanges"]["ContinuousParameterRanges"] == [
        {"Name": "learning_rate", "MinValue": "1e-07", "MaxValue": "3e-06", "ScalingType": "Logarithmic"}
    ]
    definition = tuning["TrainingJobDefinition"]
    evaluation = json.loads(definition["StaticHyperParameters"]["txt2img_evaluation"])
    assert (evaluation["metrics"], evaluation["inference_steps"]) == (["instance_loss"], 4)
    # instance_loss needs no network: nothing to upload, no metrics channel.
    assert [channel["ChannelName"] for channel in definition["InputDataConfig"]] == ["training"]


@pytest.mark.usefixtures("one_torch_thread")
def test_a_tuning_jobs_training_job_prints_the_metrics_its_definitions_read(bucket, two_subjects, tmp_path):
    """The container's view of one training job of the tuning job: the source, the metric networks and
    the hyperparameters exactly as the launcher sent them, run on CPU; SageMaker's regexes then read
    the objective and the other metrics from its output, equal to its evaluation report."""
    import re

    from jumpstart.remote import launch_remote_tuning
    from training.evaluation import EvaluationSettings
    from training.metrics import MetricWeights

    inception, _ = _metric_networks(tmp_path / "networks")
    evaluation = EvaluationSettings(
        metrics=["instance_loss"],
        prompts_per_subject=1,
        inference_steps=2,
        weights=MetricWeights(inception=str(inception), clip=None, dino=None),
    )
    launch_remote_tuning(
        str(two_subjects),
        "tiny-sd",
        "toys",
        Hyperparameters(method="lora", max_steps=2),
        {"learning_rate": (1e-6, 1e-4, True)},
        objective="fid_score",
        trainer="txt2img",
        evaluation=evaluation,
        role=ROLE,
        s3_prefix="s3://my-txt2img/w",
        wait=False,
    )
    definition = _tuning_job(bucket)["TrainingJobDefinition"]
    channels = {}
    for channel in definition["InputDataConfig"]:  # what SageMaker copies to /opt/ml/input/data/NAME
        prefix = channel["DataSource"]["S3DataSource"]["S3Uri"].removeprefix("s3://my-txt2img/")
        channels[channel["ChannelName"]] = local = tmp_path / "input" / channel["ChannelName"]
        for key in _keys(bucket, prefix):
            (local / key).parent.mkdir(parents=True, exist_ok=True)
            (local / key).write_bytes(_object(bucket, f"s3://my-txt2img/{prefix}{key}"))
    static = definition["StaticHyperParameters"]
    source = tmp_path / "code"
    source.mkdir()
    with tarfile.open(fileobj=io.BytesIO(_object(bucket, static["sagemaker_submit_directory"]))) as tar:
        tar.extractall(source, filter="data")
    output_data, model_dir = tmp_path / "output-data", tmp_path / "model"
    output_data.mkdir()
    model_dir.mkdir()
    environment = {
        "PATH": os.environ["PATH"],
        "PYTHONPATH": str(source),
        "OMP_NUM_THREADS": "1",
        "SM_HPS": _toolkit_hps({**static, "learning_rate": "2e-05"}),  # the tuner adds the searched value
        "SM_CHANNEL_TRAINING": str(channels["training"]),
        "SM_CHANNEL_METRICS": str(channels["metrics"]),
        "SM_MODEL_DIR": str(model_dir),
        "SM_OUTPUT_DATA_DIR": str(output_data),
        "SM_NUM_GPUS": "0",
        "CUDA_VISIBLE_DEVICES": "",
        "TXT2IMG_HOME": str(tmp_path / "home"),
    }

    done = subprocess.run(
        [sys.executable, "txt2img_train.py"], cwd=source, env=environment, capture_output=True, text=True, timeout=600
    )

    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((output_data / "evaluation" / "metrics.json").read_text())
    assert list(report["metrics"]) == ["fid_score", "instance_loss"]
    for metric in definition["AlgorithmSpecification"]["MetricDefinitions"]:
        [value] = re.findall(metric["Regex"], done.stdout)
        assert float(value) == pytest.approx(report["metrics"][metric["Name"]], abs=1e-6), metric["Name"]
    assert report["metrics"]["fid_score"] > 0  # the packed network scored real images, not nothing
    # The model is still complete and deployable: evaluating added nothing to it but code/ and fused/.
    assert {path.name for path in model_dir.iterdir()} >= {"model", "entry.yaml", "code", "fused"}
