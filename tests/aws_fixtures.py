"""Offline AWS for the SageMaker tests: moto, JumpStart specs in local-metadata mode, no network.

The specs are generated from the catalog's JumpStart entries in the shape of the real spec in
``tests/fixtures/jumpstart_specs/``, which is copied in unchanged for its model.
"""

from __future__ import annotations

import copy
import json
import shutil
import socket
from pathlib import Path

import pytest

CAPTURED_SPECS = Path(__file__).resolve().parent / "fixtures" / "jumpstart_specs"
FIXTURE_MODEL = "huggingface-txt2img-conflictx-complex-lineart"
REGION = "us-west-2"
ACCOUNT = "123456789012"
ROLE = f"arn:aws:iam::{ACCOUNT}:role/txt2img-sagemaker"
JUMPSTART_BUCKET = f"jumpstart-cache-prod-{REGION}"
_DLC = "763104351884.dkr.ecr.{region}.amazonaws.com/huggingface-pytorch-{scope}:1.10.2-transformers4.17.0-{device}"
GPU_SUFFIX = "gpu-py38-cu113-ubuntu20.04"
CPU_SUFFIX = "cpu-py38-ubuntu20.04"
HOSTING_GPU_IMAGE = _DLC.format(region=REGION, scope="inference", device=GPU_SUFFIX)
HOSTING_CPU_IMAGE = _DLC.format(region=REGION, scope="inference", device=CPU_SUFFIX)
TRAINING_GPU_IMAGE = _DLC.format(region=REGION, scope="training", device=GPU_SUFFIX)
TRAINING_SCRIPT_KEY = "source-directory-tarballs/stabilityai/transfer_learning/txt2img/prepack/v1.0.3/sourcedir.tar.gz"
GPU_FAMILIES = ("g4dn", "g5", "g6", "p3", "p4d", "local_gpu")
CPU_FAMILIES = ("m5", "c5", "t2", "local")


def _variants(scope: str) -> dict:
    aliases = {
        region: {
            "cpu_ecr_uri_1": _DLC.format(region=region, scope=scope, device=CPU_SUFFIX),
            "gpu_ecr_uri_2": _DLC.format(region=region, scope=scope, device=GPU_SUFFIX),
        }
        for region in (REGION, "us-east-1", "eu-west-1")
    }
    families = {family: "$gpu_ecr_uri_2" for family in GPU_FAMILIES} | {
        family: "$cpu_ecr_uri_1" for family in CPU_FAMILIES
    }
    return {
        "regional_aliases": aliases,
        "variants": {family: {"regional_properties": {"image_uri": alias}} for family, alias in families.items()},
    }


# The inference container's variables as JumpStart's specs list them: (name, type, default, required_for_model_class).
INFERENCE_ENVIRONMENT = (
    ("SAGEMAKER_PROGRAM", "text", "inference.py", True),
    ("SAGEMAKER_SUBMIT_DIRECTORY", "text", "/opt/ml/model/code", False),
    ("ENDPOINT_SERVER_TIMEOUT", "int", 3600, True),
    ("MODEL_CACHE_ROOT", "text", "/opt/ml/model", True),
    ("SAGEMAKER_ENV", "text", "1", True),
    ("SAGEMAKER_MODEL_SERVER_WORKERS", "int", 1, True),
)


def _inference_environment() -> list[dict]:
    return [
        {"name": name, "type": kind, "default": default, "scope": "container", "required_for_model_class": required}
        for name, kind, default, required in INFERENCE_ENVIRONMENT
    ]


def _hosting_fields(model_id: str, prefix: str) -> dict:
    """Where the inference container, script and artifacts are, and how the endpoint is called."""
    return {
        "hosting_ecr_specs": {
            "framework": "huggingface",
            "framework_version": "1.10.2",
            "py_version": "py38",
            "huggingface_transformers_version": "4.17.0",
        },
        "hosting_artifact_key": f"{prefix}/{model_id}/artifacts/inference/v1.0.0/",
        "hosting_script_key": "source-directory-tarballs/huggingface/inference/txt2img/v1.1.0/sourcedir.tar.gz",
        "hosting_prepacked_artifact_key": f"{prefix}/{model_id}/artifacts/inference-prepack/v1.0.0/",
        "hosting_prepacked_artifact_version": "1.0.0",
        "hosting_use_script_uri": False,
    }


def _training_fields(model_id: str, hosting_ecr_specs: dict) -> dict:
    """What a fine-tunable model's spec adds: the training container, script, artifact and instances."""
    return dict(
        training_ecr_specs=dict(hosting_ecr_specs),
        training_artifact_key=f"stabilityai-training/train-{model_id}.tar.gz",
        training_script_key=TRAINING_SCRIPT_KEY,
        hyperparameters=[{"name": "max_steps", "type": "text", "default": "None", "scope": "algorithm"}],
        default_training_instance_type="ml.g5.2xlarge",
        supported_training_instance_types=["ml.g4dn.2xlarge", "ml.g5.2xlarge", "ml.p3.2xlarge"],
        training_instance_type_variants=_variants("training"),
    )


def generated_spec(model_id: str, version: str, hf_repo: str, fine_tunable: bool) -> dict:
    """A JumpStart txt2img spec with the fields the SDK reads, shaped like the real fixture."""
    prefix = "stabilityai-txt2img" if model_id.startswith("model-") else "huggingface-txt2img"
    spec = {
        "model_id": model_id,
        "url": f"https://huggingface.co/{hf_repo}",
        "version": version,
        "min_sdk_version": "2.189.0",
        "training_supported": fine_tunable,
        "incremental_training_supported": False,
        **_hosting_fields(model_id, prefix),
        "inference_vulnerable": False,
        "inference_dependencies": [],
        "inference_vulnerabilities": [],
        "training_vulnerable": False,
        "training_dependencies": [],
        "training_vulnerabilities": [],
        "deprecated": False,
        "inference_environment_variables": _inference_environment(),
        "metrics": [],
        "default_inference_instance_type": "ml.p3.2xlarge",
        "supported_inference_instance_types": ["ml.p3.2xlarge", "ml.g4dn.xlarge", "ml.g4dn.2xlarge"],
        "model_kwargs": {},
        "deploy_kwargs": {},
        "predictor_specs": {
            "supported_content_types": ["application/json", "application/x-text"],
            "supported_accept_types": ["application/json", "application/json;verbose", "application/json;jpeg"],
            "default_content_type": "application/x-text",
            "default_accept_type": "application/json;jpeg",
        },
        "inference_enable_network_isolation": True,
        "resource_name_base": model_id.replace("huggingface-", "hf-")[:50],
        "hosting_instance_type_variants": _variants("inference"),
        "hosting_artifact_s3_data_type": "S3Prefix",
        "hosting_artifact_compression_type": "None",
    }
    if fine_tunable:
        spec.update(_training_fields(model_id, spec["hosting_ecr_specs"]))
    return spec


def write_jumpstart_specs(root: Path, *, captured: bool = True) -> Path:
    """Write a local-metadata JumpStart catalog for every JumpStart id of our catalog into ``root``;
    with ``captured``, the real captured spec replaces the generated one for its model."""
    from catalog.store import load_catalog

    manifest = []
    for entry in load_catalog(user_dir=root / "no-user-catalog"):
        if entry.source != "jumpstart" or entry.jumpstart is None:
            continue
        model_id, version = entry.jumpstart.model_id, entry.jumpstart.version
        spec_key = f"community_models/{model_id}/specs_v{version}.json"
        spec = generated_spec(model_id, version, entry.hf_repo, entry.fine_tunable)
        (root / spec_key).parent.mkdir(parents=True, exist_ok=True)
        (root / spec_key).write_text(json.dumps(spec), encoding="utf-8")
        manifest.append({"model_id": model_id, "version": version, "min_version": "2.189.0", "spec_key": spec_key})
    if captured:
        captured_manifest = json.loads((CAPTURED_SPECS / "models_manifest.json").read_text(encoding="utf-8"))
        for item in captured_manifest:
            target = root / item["spec_key"]
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(CAPTURED_SPECS / item["spec_key"], target)
        captured_ids = {item["model_id"] for item in captured_manifest}
        manifest = [item for item in manifest if item["model_id"] not in captured_ids] + captured_manifest
    (root / "models_manifest.json").write_text(json.dumps(manifest), encoding="utf-8")
    return root


def forbid_network(monkeypatch) -> list:
    """Make any socket connection to a non-loopback address fail; returns the list of attempts,
    so a caller can also fail when some library swallowed the error."""
    real_connect = socket.socket.connect
    attempts: list = []

    def guarded_connect(sock, address):
        host = address[0] if isinstance(address, tuple) else address
        if isinstance(host, str) and host not in ("127.0.0.1", "::1", "localhost") and sock.family != socket.AF_UNIX:
            attempts.append(address)
            raise AssertionError(f"test tried to open a network connection to {address}")
        return real_connect(sock, address)

    monkeypatch.setattr(socket.socket, "connect", guarded_connect)
    return attempts


def _drop_empty_describe_fields(monkeypatch) -> None:
    """moto answers ``"VpcConfig": {}`` where AWS omits the key; sagemaker-core's shapes reject that."""
    import moto.sagemaker.responses as responses

    for name in ("describe_model", "describe_endpoint_config", "describe_endpoint"):
        original = getattr(responses.SageMakerResponse, name)

        def without_empty(self, _original=original):
            answer = _original(self)
            result = getattr(answer, "result", None)
            if isinstance(result, dict):
                for key in [key for key, value in result.items() if value == {}]:
                    del result[key]
            return answer

        monkeypatch.setattr(responses.SageMakerResponse, name, without_empty)


@pytest.fixture
def no_network(monkeypatch):
    """No test may leave the machine: a module that talks to (moto's) AWS uses this for all its tests."""
    attempts = forbid_network(monkeypatch)
    yield
    assert not attempts, f"the test tried to reach the network: {attempts}"


@pytest.fixture(scope="session")
def jumpstart_specs(tmp_path_factory) -> Path:
    return write_jumpstart_specs(tmp_path_factory.mktemp("jumpstart_specs"))


@pytest.fixture
def aws(monkeypatch, tmp_path, jumpstart_specs):
    """A moto AWS account with credentials, region, JumpStart specs and an empty txt2img home."""
    from moto import mock_aws

    for variable in ("AWS_PROFILE", "AWS_REGION", "AWS_SESSION_TOKEN", "TXT2IMG_SAGEMAKER_ROLE"):
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", REGION)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("SAGEMAKER_VALIDATE_ROLE", "false")
    monkeypatch.setenv("AWS_JUMPSTART_MANIFEST_LOCAL_ROOT_DIR_OVERRIDE", str(jumpstart_specs))
    monkeypatch.setenv("AWS_JUMPSTART_SPECS_LOCAL_ROOT_DIR_OVERRIDE", str(jumpstart_specs))
    _drop_empty_describe_fields(monkeypatch)
    with mock_aws():
        import boto3

        yield boto3.Session(region_name=REGION)


def make_bucket(session, name: str) -> None:
    session.client("s3").create_bucket(Bucket=name, CreateBucketConfiguration={"LocationConstraint": REGION})


def copy_spec(model_id: str, specs_root: Path) -> dict:
    manifest = json.loads((specs_root / "models_manifest.json").read_text(encoding="utf-8"))
    item = next(item for item in manifest if item["model_id"] == model_id)
    return copy.deepcopy(json.loads((specs_root / item["spec_key"]).read_text(encoding="utf-8")))


@pytest.fixture
def sent_requests(monkeypatch) -> list[tuple[str, dict]]:
    """Every (operation, parameters) pair boto3 sends, in order, for fields moto does not echo back."""
    from botocore.client import BaseClient

    sent: list[tuple[str, dict]] = []
    original = BaseClient._make_api_call

    def recording(client, operation_name, api_params):
        try:
            recorded = copy.deepcopy(api_params)
        except TypeError:  # an upload's open stream; its other parameters are what tests read
            recorded = dict(api_params)
        sent.append((operation_name, recorded))
        return original(client, operation_name, api_params)

    monkeypatch.setattr(BaseClient, "_make_api_call", recording)
    return sent
