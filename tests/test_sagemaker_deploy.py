"""txt2img deploy: the exact SageMaker requests for JumpStart, SageMaker-trained and local models,
the records it keeps, and cleanup when AWS refuses."""

from __future__ import annotations

import io
import json
import os
import tarfile
from pathlib import Path

import pytest
import yaml
from aws_fixtures import (
    ACCOUNT,
    CAPTURED_SPECS,
    FIXTURE_MODEL,
    HOSTING_CPU_IMAGE,
    HOSTING_GPU_IMAGE,
    REGION,
    ROLE,
    copy_spec,
    make_bucket,
    write_jumpstart_specs,
)

from jumpstart.deploy import LOCAL_MODEL_ENVIRONMENT, deploy
from jumpstart.errors import SageMakerError

# No test here may leave the machine.
pytestmark = pytest.mark.usefixtures("no_network")

JUMPSTART_ENVIRONMENT = {
    "SAGEMAKER_PROGRAM": "inference.py",
    "ENDPOINT_SERVER_TIMEOUT": "3600",
    "MODEL_CACHE_ROOT": "/opt/ml/model",
    "SAGEMAKER_ENV": "1",
    "SAGEMAKER_MODEL_SERVER_WORKERS": "1",
    "MMS_MAX_RESPONSE_SIZE": "20000000",
}
V21_BASE = "model-txt2img-stabilityai-stable-diffusion-v2-1-base"
HF_GPU_IMAGE = (
    f"763104351884.dkr.ecr.{REGION}.amazonaws.com/"
    "huggingface-pytorch-inference:2.6.0-transformers4.49.0-gpu-py312-cu124-ubuntu22.04"
)


def _resources(session) -> tuple[list, list, list]:
    sagemaker = session.client("sagemaker")
    return (
        [item["EndpointName"] for item in sagemaker.list_endpoints()["Endpoints"]],
        [item["EndpointConfigName"] for item in sagemaker.list_endpoint_configs()["EndpointConfigs"]],
        [item["ModelName"] for item in sagemaker.list_models()["Models"]],
    )


def _captured_spec() -> dict:
    import json

    return json.loads(next((CAPTURED_SPECS / "community_models" / FIXTURE_MODEL).glob("specs_*.json")).read_text())


def test_jumpstart_spec_fixture_is_the_captured_one(jumpstart_specs):
    assert copy_spec(FIXTURE_MODEL, jumpstart_specs) == _captured_spec()


def test_generated_specs_agree_with_the_captured_one_where_the_tests_rely_on_it(tmp_path):
    """The other JumpStart ids run on generated specs; for the captured model they must say the same."""
    captured = _captured_spec()
    generated = copy_spec(FIXTURE_MODEL, write_jumpstart_specs(tmp_path / "specs", captured=False))

    for key in (
        "hosting_prepacked_artifact_key",
        "default_inference_instance_type",
        "resource_name_base",
        "inference_enable_network_isolation",
        "supported_inference_instance_types",
    ):
        assert generated[key] == captured[key], key

    def required_environment(spec):
        variables = spec["inference_environment_variables"]
        return {v["name"]: str(v["default"]) for v in variables if v["required_for_model_class"]}

    def images_here(spec):
        return spec["hosting_instance_type_variants"]["regional_aliases"][REGION]

    assert required_environment(generated) == required_environment(captured)
    assert images_here(generated) == images_here(captured)


def test_deploy_jumpstart_model_uses_jumpstart_container_and_artifacts(aws, sent_requests):
    result = deploy(FIXTURE_MODEL, role=ROLE, endpoint_name="lineart", poll_seconds=0)

    assert (result.endpoint_name, result.status, result.instance_type) == ("lineart", "InService", "ml.p3.2xlarge")
    sagemaker = aws.client("sagemaker")
    model = sagemaker.describe_model(ModelName="lineart")
    assert model["ExecutionRoleArn"] == ROLE
    create_model = next(params for operation, params in sent_requests if operation == "CreateModel")
    assert create_model["EnableNetworkIsolation"] is True  # the spec's inference_enable_network_isolation
    assert model["PrimaryContainer"] == {
        "Image": HOSTING_GPU_IMAGE,
        "ModelDataSource": {
            "S3DataSource": {
                "S3Uri": f"s3://jumpstart-cache-prod-{REGION}/huggingface-txt2img/{FIXTURE_MODEL}/artifacts/inference-prepack/v1.0.0/",
                "S3DataType": "S3Prefix",
                "CompressionType": "None",
            }
        },
        "Environment": JUMPSTART_ENVIRONMENT,
    }
    config = sagemaker.describe_endpoint_config(EndpointConfigName="lineart")
    assert config["ProductionVariants"][0]["InstanceType"] == "ml.p3.2xlarge"  # the spec's default
    assert config["ProductionVariants"][0]["ModelName"] == "lineart"
    assert "AsyncInferenceConfig" not in config
    assert sagemaker.describe_endpoint(EndpointName="lineart")["EndpointConfigName"] == "lineart"

    from catalog.paths import txt2img_home

    records = yaml.safe_load((txt2img_home() / "endpoints.yaml").read_text())["endpoints"]
    assert [
        (r["model_id"], r["endpoint"]["name"], r["endpoint"]["region"], r["endpoint"]["instance_type"]) for r in records
    ] == [(FIXTURE_MODEL, "lineart", REGION, "ml.p3.2xlarge")]


def test_deploy_jumpstart_model_on_a_cpu_instance_picks_the_cpu_image(aws):
    deploy(FIXTURE_MODEL, role=ROLE, endpoint_name="lineart-cpu", instance_type="ml.m5.xlarge", wait=False)

    sagemaker = aws.client("sagemaker")
    assert sagemaker.describe_model(ModelName="lineart-cpu")["PrimaryContainer"]["Image"] == HOSTING_CPU_IMAGE
    config = sagemaker.describe_endpoint_config(EndpointConfigName="lineart-cpu")
    assert config["ProductionVariants"][0]["InstanceType"] == "ml.m5.xlarge"


def test_default_endpoint_name_comes_from_the_spec(aws):
    result = deploy(FIXTURE_MODEL, role=ROLE, wait=False)
    assert result.endpoint_name.startswith("hf-txt2img-conflictx-complex-lineart-")
    assert _resources(aws)[0] == [result.endpoint_name]


def _register_finetune(**fields) -> None:
    from catalog.schema import CatalogEntry
    from catalog.store import write_entry

    write_entry(CatalogEntry(source="finetune", method="full", **fields))


def test_deploy_sagemaker_trained_finetune_uses_base_jumpstart_image_and_its_artifact(aws):
    artifact = "s3://my-results/jobs/dog/dog-20260101/output/model.tar.gz"
    _register_finetune(id="remote-dog", family="sd2-base", resolution=512, base=V21_BASE, artifact=artifact)

    deploy("remote-dog", role=ROLE, endpoint_name="remote-dog", instance_type="ml.g4dn.xlarge", poll_seconds=0)

    container = aws.client("sagemaker").describe_model(ModelName="remote-dog")["PrimaryContainer"]
    assert container == {"Image": HOSTING_GPU_IMAGE, "ModelDataUrl": artifact, "Environment": JUMPSTART_ENVIRONMENT}
    from catalog.store import load_catalog

    endpoints = load_catalog().get("remote-dog").endpoints
    assert [(e.name, e.region, e.instance_type) for e in endpoints] == [("remote-dog", REGION, "ml.g4dn.xlarge")]


TRAINER_ARTIFACT = "s3://my-results/jobs/toys/toys-260101-000000/output/model.tar.gz"


def _trainer_finetune(*tags: str, method: str = "lora") -> None:
    """A fine-tune as register_training_job records a job of txt2img's trainer."""
    from catalog.schema import CatalogEntry
    from catalog.store import write_entry

    write_entry(
        CatalogEntry(
            id="toys",
            source="finetune",
            family="sd2-base",
            resolution=512,
            base=V21_BASE,
            method=method,
            artifact=TRAINER_ARTIFACT,
            tags=["sagemaker", "dreambooth", "txt2img-trainer", *tags],
        )
    )


@pytest.mark.parametrize("method", ["lora", "full"])
def test_deploy_txt2img_trainer_result_serves_the_jobs_own_archive_on_the_hf_container(aws, sent_requests, method):
    _trainer_finetune("inference-code", method=method)

    result = deploy("toys", role=ROLE, endpoint_name="toys", poll_seconds=0)

    assert (result.status, result.instance_type) == ("InService", "ml.g4dn.xlarge")
    sagemaker = aws.client("sagemaker")
    container = sagemaker.describe_model(ModelName="toys")["PrimaryContainer"]
    # The job's model.tar.gz holds code/inference.py (training.servable): no repack, no upload.
    assert container == {
        "Image": HF_GPU_IMAGE,
        "ModelDataUrl": TRAINER_ARTIFACT,
        "Environment": LOCAL_MODEL_ENVIRONMENT,
    }
    [variant] = sagemaker.describe_endpoint_config(EndpointConfigName="toys")["ProductionVariants"]
    assert (variant["ModelName"], variant["InstanceType"]) == ("toys", "ml.g4dn.xlarge")
    assert sagemaker.describe_endpoint(EndpointName="toys")["EndpointConfigName"] == "toys"
    operations = [operation for operation, _ in sent_requests]
    assert not {"PutObject", "CreateMultipartUpload", "CreateBucket"} & set(operations)
    assert aws.client("s3").list_buckets()["Buckets"] == []
    from catalog.store import load_catalog

    assert [e.name for e in load_catalog().get("toys").endpoints] == ["toys"]


def test_deploy_txt2img_trainer_result_without_inference_code_says_what_to_do(aws, capsys):
    _trainer_finetune()  # registered from a job packed before its source carried the inference code
    from txt2img.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["deploy", "toys", "--endpoint-name", "toys", "--role", ROLE, "--region", REGION])

    assert exit_info.value.code == 2
    [line] = capsys.readouterr().err.strip().splitlines()
    assert "left no inference code in " + TRAINER_ARTIFACT in line
    assert "train it again" in line and "`txt2img deploy` that" in line
    assert _resources(aws) == ([], [], [])


def test_safety_checker_is_refused_for_a_txt2img_trainer_archive_served_as_it_is(aws):
    _trainer_finetune("inference-code")
    with pytest.raises(SageMakerError, match="deployed from its training job's model.tar.gz as it is"):
        deploy("toys", role=ROLE, endpoint_name="toys", safety_checker=True)
    assert _resources(aws) == ([], [], [])


def _local_finetune(tmp_path: Path) -> None:
    from catalog.pipelines import export_model
    from catalog.store import load_catalog

    weights = export_model("tiny-sd", tmp_path / "weights", load_catalog())
    _register_finetune(id="local-dog", family="tiny", resolution=64, base="tiny-sd", artifact=str(weights))


def test_deploy_local_finetune_packages_uploads_and_uses_hf_container(aws, tmp_path):
    _local_finetune(tmp_path)
    make_bucket(aws, "my-models")

    result = deploy(
        "local-dog",
        role=ROLE,
        endpoint_name="local-dog",
        instance_type="ml.g4dn.xlarge",
        s3_prefix="s3://my-models/txt2img",
        poll_seconds=0,
    )

    assert result.status == "InService"
    container = aws.client("sagemaker").describe_model(ModelName="local-dog")["PrimaryContainer"]
    assert container == {
        "Image": HF_GPU_IMAGE,
        "ModelDataUrl": "s3://my-models/txt2img/models/local-dog/model.tar.gz",
        "Environment": LOCAL_MODEL_ENVIRONMENT,
    }
    archive = (
        aws.client("s3").get_object(Bucket="my-models", Key="txt2img/models/local-dog/model.tar.gz")["Body"].read()
    )
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        names = set(tar.getnames())
        script = tar.extractfile("code/inference.py").read().decode()
        requirements = tar.extractfile("code/requirements.txt").read().decode()
    assert {
        "model_index.json",
        "unet/config.json",
        "unet/diffusion_pytorch_model.safetensors",
        "vae/config.json",
        "code/inference.py",
        "code/requirements.txt",
    } <= names
    from jumpstart import inference_script

    assert script == Path(inference_script.__file__).read_text()
    assert "diffusers" in requirements
    from catalog.store import load_catalog

    assert [e.name for e in load_catalog().get("local-dog").endpoints] == ["local-dog"]


def test_deploy_builtin_demo_uses_default_bucket_cpu_instance_and_async_config(aws):
    result = deploy("tiny-sd", role=ROLE, endpoint_name="tiny", async_output="s3://my-async/tiny", poll_seconds=0)

    assert result.is_async and result.instance_type == "ml.m5.xlarge"
    sagemaker = aws.client("sagemaker")
    container = sagemaker.describe_model(ModelName="tiny")["PrimaryContainer"]
    assert container["Image"] == HF_GPU_IMAGE.replace("gpu-py312-cu124", "cpu-py312")
    assert container["ModelDataUrl"] == f"s3://sagemaker-{REGION}-{ACCOUNT}/txt2img/models/tiny/model.tar.gz"
    config = sagemaker.describe_endpoint_config(EndpointConfigName="tiny")
    assert config["AsyncInferenceConfig"]["OutputConfig"] == {
        "S3OutputPath": "s3://my-async/tiny/output",
        "S3FailurePath": "s3://my-async/tiny/failures",
    }


def test_deploy_with_safety_checker_packs_one_and_switches_it_on(aws, tmp_path, monkeypatch):
    from tiny_safety_checker import save_tiny_safety_checker

    monkeypatch.setenv(
        "TXT2IMG_SAFETY_CHECKER_REPO", str(save_tiny_safety_checker(tmp_path / "checker", flag_everything=True))
    )
    make_bucket(aws, "my-models")
    deploy("tiny-sd", role=ROLE, endpoint_name="tiny", s3_prefix="s3://my-models/txt2img", safety_checker=True)

    container = aws.client("sagemaker").describe_model(ModelName="tiny")["PrimaryContainer"]
    assert container["Environment"] == {**LOCAL_MODEL_ENVIRONMENT, "TXT2IMG_SAFETY_CHECKER": "on"}
    archive = aws.client("s3").get_object(Bucket="my-models", Key="txt2img/models/tiny/model.tar.gz")["Body"].read()
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        names = set(tar.getnames())
        index = json.loads(tar.extractfile("model_index.json").read())
    assert {"safety_checker/model.safetensors", "feature_extractor/preprocessor_config.json"} <= names
    assert index["safety_checker"] == ["stable_diffusion", "StableDiffusionSafetyChecker"]


def test_deploy_with_safety_checker_missing_from_the_cache_says_how_to_fetch_it(aws, tmp_path, monkeypatch):
    monkeypatch.setenv("TXT2IMG_SAFETY_CHECKER_REPO", str(tmp_path / "nothing-here"))
    with pytest.raises(SageMakerError, match="no safety checker in .*huggingface-cli download"):
        deploy("tiny-sd", role=ROLE, endpoint_name="tiny", safety_checker=True)
    assert _resources(aws) == ([], [], [])


def test_safety_checker_is_refused_for_a_jumpstart_container(aws):
    with pytest.raises(SageMakerError, match="--safety-checker works for models on this machine"):
        deploy(FIXTURE_MODEL, role=ROLE, endpoint_name="lineart", safety_checker=True)
    assert _resources(aws) == ([], [], [])


def _fail_in_moto(monkeypatch, operation: str, code: str, message: str) -> None:
    from moto.sagemaker.exceptions import SagemakerClientError
    from moto.sagemaker.models import SageMakerModelBackend

    class InjectedError(SagemakerClientError):
        pass

    InjectedError.code = code

    def refuse(self, *args, **kwargs):
        raise InjectedError(message)

    monkeypatch.setattr(SageMakerModelBackend, operation, refuse)


def test_failed_endpoint_creation_removes_model_and_config_and_explains_quota(aws, monkeypatch):
    _fail_in_moto(
        monkeypatch,
        "create_endpoint",
        "ResourceLimitExceeded",
        "The account-level service limit 'ml.p3.2xlarge for endpoint usage' is 0 Instances",
    )
    with pytest.raises(SageMakerError, match=r"AWS quota reached for ml\.p3\.2xlarge .*Service Quotas"):
        deploy(FIXTURE_MODEL, role=ROLE, endpoint_name="no-quota", poll_seconds=0)
    assert _resources(aws) == ([], [], [])
    from catalog.paths import txt2img_home

    assert not (txt2img_home() / "endpoints.yaml").exists()


def test_unsupported_instance_type_is_explained_and_leaves_nothing(aws):
    # moto, like SageMaker, validates the endpoint config's instance type.
    with pytest.raises(SageMakerError, match=r"unsupported instance type 'ml\.m5\.nonsense'"):
        deploy(FIXTURE_MODEL, role=ROLE, endpoint_name="bad-type", instance_type="ml.m5.nonsense", poll_seconds=0)
    assert _resources(aws) == ([], [], [])


@pytest.mark.filterwarnings("ignore:Exception\\(InjectedError\\):UserWarning")
def test_access_denied_is_one_readable_line(aws, monkeypatch):
    _fail_in_moto(
        monkeypatch,
        "create_model",
        "AccessDeniedException",
        "User: arn:aws:iam::123456789012:user/dev is not authorized to perform: sagemaker:CreateModel",
    )
    with pytest.raises(SageMakerError) as caught:
        deploy(FIXTURE_MODEL, role=ROLE, endpoint_name="denied", poll_seconds=0)
    message = str(caught.value)
    assert message.startswith("AWS denied creating model denied: User:") and "sagemaker:CreateModel" in message
    assert "\n" not in message
    assert _resources(aws) == ([], [], [])


def test_endpoint_failing_while_starting_is_removed_with_config_and_model(aws, monkeypatch):
    from moto.sagemaker.models import FakeEndpoint

    original_init = FakeEndpoint.__init__

    def failing_init(self, *args, **kwargs):
        original_init(self, *args, **kwargs)
        self.endpoint_status = "Failed"
        self.failure_reason = "The primary container did not pass the ping health check"

    monkeypatch.setattr(FakeEndpoint, "__init__", failing_init)
    with pytest.raises(SageMakerError, match="ping health check; its endpoint, config and model were removed"):
        deploy(FIXTURE_MODEL, role=ROLE, endpoint_name="sick", poll_seconds=0)
    assert _resources(aws) == ([], [], [])
    from jumpstart.records import recorded_endpoints

    assert recorded_endpoints() == []


def test_existing_endpoint_is_refused_and_kept(aws):
    deploy(FIXTURE_MODEL, role=ROLE, endpoint_name="taken", wait=False)
    with pytest.raises(SageMakerError, match="endpoint taken already exists in us-west-2"):
        deploy(FIXTURE_MODEL, role=ROLE, endpoint_name="taken", wait=False)
    assert _resources(aws) == (["taken"], ["taken"], ["taken"])


@pytest.mark.parametrize(
    ("unset", "expected"),
    [
        (("AWS_DEFAULT_REGION",), "no AWS region: pass --region"),
        (("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"), "no AWS credentials: set AWS_ACCESS_KEY_ID"),
        ((), "no SageMaker execution role: pass --role"),
    ],
)
def test_missing_setup_is_one_line_and_exit_code_2(aws, monkeypatch, capsys, unset, expected):
    from txt2img.cli import main

    saved = {variable: os.environ[variable] for variable in unset}
    for variable in unset:
        monkeypatch.delenv(variable)
    arguments = ["deploy", FIXTURE_MODEL, "--endpoint-name", "x"] + (["--role", ROLE] if unset else [])
    with pytest.raises(SystemExit) as exit_info:
        main(arguments)
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert error.startswith(f"txt2img: error: {expected}") and error.count("\n") == 1
    for variable, value in saved.items():  # credentials and region back, to look into the account
        monkeypatch.setenv(variable, value)
    assert _resources(aws) == ([], [], [])


def test_cli_deploy_prints_how_to_invoke_and_clean_up(aws, capsys):
    from txt2img.cli import main

    main(["deploy", FIXTURE_MODEL, "--endpoint-name", "cli-ep", "--role", ROLE])
    out = capsys.readouterr().out
    assert (
        "endpoint cli-ep (ml.p3.2xlarge, us-west-2) serves huggingface-txt2img-conflictx-complex-lineart: InService"
        in out
    )
    assert 'txt2img endpoints invoke cli-ep "a prompt"' in out
    assert "txt2img endpoints delete cli-ep --region us-west-2" in out


def test_cli_async_needs_output(aws, capsys):
    from txt2img.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["deploy", FIXTURE_MODEL, "--async", "--role", ROLE])
    assert exit_info.value.code == 2
    assert "--async and --output s3://... go together" in capsys.readouterr().err


def test_cli_without_region_in_a_fresh_process_prints_one_line_and_no_traceback(tmp_path):
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    environment = {
        "PATH": os.environ["PATH"],
        "PYTHONPATH": str(root),
        "TXT2IMG_HOME": str(tmp_path / "home"),
        "HOME": str(tmp_path),
        "AWS_CONFIG_FILE": str(tmp_path / "none"),
        "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "none"),
        "AWS_EC2_METADATA_DISABLED": "true",
    }
    finished = subprocess.run(
        [sys.executable, "-m", "txt2img", "deploy", "tiny-sd", "--role", ROLE],
        capture_output=True,
        text=True,
        env=environment,
        cwd=tmp_path,
        timeout=120,
    )
    assert finished.returncode == 2
    assert finished.stderr == (
        "txt2img: error: no AWS region: pass --region (e.g. --region us-east-1), set AWS_REGION, "
        "or run `aws configure`\n"
    )


def test_leftover_config_with_the_same_name_is_reported_and_our_model_removed(aws, monkeypatch):
    # What SageMaker answers when an endpoint config of that name is left over (moto overwrites instead).
    _fail_in_moto(
        monkeypatch,
        "create_endpoint_config",
        "ValidationException",
        f'Cannot create already existing endpoint configuration "arn:aws:sagemaker:{REGION}:{ACCOUNT}:'
        'endpoint-config/leftover".',
    )
    with pytest.raises(SageMakerError, match="already existing endpoint configuration.*Pick another --endpoint-name"):
        deploy(FIXTURE_MODEL, role=ROLE, endpoint_name="leftover", poll_seconds=0)
    assert _resources(aws) == ([], [], [])
