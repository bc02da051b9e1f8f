"""``txt2img deploy``: put a catalog model on a SageMaker real-time or async endpoint.

Three kinds of model, one endpoint contract (JumpStart's text-to-image JSON):

* JumpStart ids run on JumpStart's own container and artifacts;
* fine-tunes trained on SageMaker by JumpStart's script (an ``s3://`` artifact) run on their base's
  JumpStart container;
* models on this machine (fine-tunes, tiny-sd) are exported, packed with ``code/inference.py``
  into a ``model.tar.gz``, uploaded, and run on a Hugging Face PyTorch inference container;
* fine-tunes trained on SageMaker by txt2img's own trainer run on that container too, from the
  training job's model.tar.gz as it is: the job put ``code/inference.py`` in it (training.servable).

Resources are created with plain boto3 calls so that, when one fails, exactly what was created
for this deployment is removed again.
"""

from __future__ import annotations

import re
import tempfile
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from catalog.index import UnknownModelError
from catalog.schema import CatalogEntry, Endpoint
from catalog.store import load_catalog
from jumpstart.autoscaling import Scaling, register_autoscaling, remove_autoscaling
from jumpstart.errors import AwsContext, SageMakerError, aws_context, aws_errors, explain_client_error
from jumpstart.inference_script import SAFETY_CHECKER_ENV
from jumpstart.package import build_model_archive
from jumpstart.polling import ENDPOINT, WaitFailed, wait_for
from jumpstart.records import forget_endpoint, record_endpoint
from jumpstart.s3 import default_s3_prefix, join_s3, split_s3_uri, upload_files
from jumpstart.specs import HuggingFaceContainer, hosting_spec
from jumpstart.trainers import INFERENCE_CODE_TAG, TXT2IMG_TRAINER_TAG

VARIANT_NAME = "AllTraffic"
ENDPOINT_NAME = re.compile(r"^[a-zA-Z0-9](-*[a-zA-Z0-9]){0,62}$")
# The Hugging Face PyTorch inference container for models deployed from local weights.
INFERENCE_CONTAINER = HuggingFaceContainer(transformers="4.49.0", pytorch="pytorch2.6.0", python="py312")
# A T4 GPU runs SD 1.x/2.x at 512-768 px; the CPU-only demo model needs no GPU.
DEFAULT_LOCAL_INSTANCE_TYPE = "ml.g4dn.xlarge"
DEFAULT_CPU_INSTANCE_TYPE = "ml.m5.xlarge"
# For every model on that container: packed here, or trained on SageMaker by txt2img's trainer.
LOCAL_MODEL_ENVIRONMENT = {
    "SAGEMAKER_PROGRAM": "inference.py",
    "SAGEMAKER_SUBMIT_DIRECTORY": "/opt/ml/model/code",
    "SAGEMAKER_CONTAINER_LOG_LEVEL": "20",
    "SAGEMAKER_MODEL_SERVER_TIMEOUT": "3600",
    "MMS_MAX_RESPONSE_SIZE": "20000000",
}
POLL_SECONDS = 20.0
# Endpoints start in 5-15 minutes; one still Creating after an hour is stuck.
ENDPOINT_TIMEOUT_SECONDS = 3600.0


@dataclass
class DeploymentPlan:
    """Everything ``create_endpoint`` sends to SageMaker, decided before anything is created."""

    model_id: str
    endpoint_name: str
    instance_type: str
    image_uri: str
    model_data: str | None  # None: a local model, packed and uploaded by ``deploy`` (which sets it)
    environment: dict[str, str]
    network_isolation: bool = False
    async_output: str | None = None
    local_archive: bool = False
    safety_checker: bool = False  # pack a safety checker and switch it on (local archives only)
    scaling: Scaling | None = None

    def primary_container(self) -> dict:
        if self.model_data is None:
            raise SageMakerError(f"model {self.model_id} has not been uploaded yet")
        container: dict = {"Image": self.image_uri, "Environment": dict(self.environment)}
        if self.model_data.endswith("/"):
            # JumpStart's prepacked artifacts are uncompressed S3 prefixes, not archives.
            container["ModelDataSource"] = {
                "S3DataSource": {"S3Uri": self.model_data, "S3DataType": "S3Prefix", "CompressionType": "None"}
            }
        else:
            container["ModelDataUrl"] = self.model_data
        return container

    def production_variant(self) -> dict:
        return {
            "VariantName": VARIANT_NAME,
            "ModelName": self.endpoint_name,
            "InstanceType": self.instance_type,
            "InitialInstanceCount": self.scaling.initial_instances if self.scaling else 1,
        }

    def async_inference_config(self) -> dict | None:
        if self.async_output is None:
            return None

        return {
            "OutputConfig": {
                "S3OutputPath": join_s3(self.async_output, "output"),
                "S3FailurePath": join_s3(self.async_output, "failures"),
            }
        }


@dataclass(frozen=True)
class DeployResult:
    model_id: str
    endpoint_name: str
    region: str
    instance_type: str
    status: str
    is_async: bool


def default_endpoint_name(stem: str, now: datetime | None = None) -> str:
    """``<stem>-<UTC timestamp>``, shortened to SageMaker's 63-character limit."""
    stamp = (now or datetime.now(timezone.utc)).strftime("%Y%m%d-%H%M%S")
    cleaned = re.sub(r"[^a-zA-Z0-9]+", "-", stem).strip("-")
    return f"{cleaned[: 63 - len(stamp) - 1].rstrip('-')}-{stamp}"


@dataclass(frozen=True)
class _DeploymentRequest:
    """What the user asked of ``plan_deployment``, for the planner of each container."""

    entry: CatalogEntry
    region: str
    instance_type: str | None
    endpoint_name: str | None
    async_output: str | None
    safety_checker: bool


def plan_deployment(
    model_id: str,
    region: str,
    *,
    instance_type: str | None = None,
    endpoint_name: str | None = None,
    async_output: str | None = None,
    safety_checker: bool = False,
) -> DeploymentPlan:
    """Decide container, artifact, environment and names for ``model_id``; creates nothing."""

    catalog = load_catalog()
    try:
        entry = catalog.get(model_id)
    except UnknownModelError as error:
        raise SageMakerError(str(error)) from error
    _check_names(endpoint_name, async_output)
    request = _DeploymentRequest(entry, region, instance_type, endpoint_name, async_output, safety_checker)
    s3_artifact = entry.source == "finetune" and (entry.artifact or "").startswith("s3://")
    if s3_artifact:
        if TXT2IMG_TRAINER_TAG in entry.tags:  # the job put code/inference.py into its model.tar.gz
            return _on_inference_container(request, _trainer_artifact(entry, safety_checker))
    if safety_checker and (entry.source == "jumpstart" or s3_artifact):
        raise SageMakerError(
            f"--safety-checker works for models on this machine, packed with txt2img's inference script; "
            f"'{entry.id}' runs on JumpStart's container, whose script txt2img cannot change"
        )
    if entry.source == "jumpstart":
        return _on_jumpstart_container(request, entry, None)
    if s3_artifact:
        base = catalog.get(entry.base)
        if base.source != "jumpstart":
            raise SageMakerError(
                f"model '{entry.id}' has an S3 artifact but its base '{base.id}' is not a JumpStart model, "
                "so there is no JumpStart container to run it on"
            )
        return _on_jumpstart_container(request, base, entry.artifact)
    # A model whose weights are on this machine: package, upload, Hugging Face container.
    return _on_inference_container(request, None)


def _check_names(endpoint_name: str | None, async_output: str | None) -> None:
    """Refuse an endpoint name SageMaker would refuse, and an async output that is not an S3 prefix."""
    if endpoint_name is not None and not ENDPOINT_NAME.match(endpoint_name):
        raise SageMakerError(
            f"invalid endpoint name '{endpoint_name}': up to 63 letters, digits and '-', starting and ending "
            "with a letter or digit"
        )
    if async_output is not None and not async_output.startswith("s3://"):
        raise SageMakerError(f"--output must be an s3:// prefix for async results, got '{async_output}'")


def _on_jumpstart_container(request: _DeploymentRequest, base: CatalogEntry, model_data: str | None) -> DeploymentPlan:
    """The request's model on the JumpStart container of ``base``, with JumpStart's own artifacts unless
    ``model_data``."""
    entry, instance_type = request.entry, request.instance_type
    spec = hosting_spec(base.jumpstart.model_id if base.jumpstart else base.id, request.region, instance_type)
    name_stem = entry.id if model_data else (spec.resource_name_base or entry.id)
    return DeploymentPlan(
        model_id=entry.id,
        endpoint_name=request.endpoint_name or default_endpoint_name(name_stem),
        instance_type=instance_type or spec.default_instance_type,
        image_uri=spec.image_uri,
        model_data=model_data or spec.model_data,
        environment=spec.environment,
        network_isolation=spec.network_isolation,
        async_output=request.async_output,
    )


def _on_inference_container(request: _DeploymentRequest, model_data: str | None) -> DeploymentPlan:
    """The request's model on the Hugging Face inference container with txt2img's ``code/inference.py``:
    from the archive ``model_data`` as it is, or (None) exported, packed and uploaded by ``deploy``."""
    entry = request.entry
    default_type = DEFAULT_CPU_INSTANCE_TYPE if entry.family == "tiny" else DEFAULT_LOCAL_INSTANCE_TYPE
    chosen_type = request.instance_type or default_type
    environment = dict(LOCAL_MODEL_ENVIRONMENT)
    if request.safety_checker:  # read by code/inference.py (jumpstart/inference_script.py)
        environment[SAFETY_CHECKER_ENV] = "on"
    return DeploymentPlan(
        model_id=entry.id,
        endpoint_name=request.endpoint_name or default_endpoint_name(entry.id),
        instance_type=chosen_type,
        image_uri=INFERENCE_CONTAINER.image(request.region, chosen_type, "inference"),
        model_data=model_data,
        environment=environment,
        async_output=request.async_output,
        local_archive=model_data is None,
        safety_checker=request.safety_checker,
    )


def _trainer_artifact(entry: CatalogEntry, safety_checker: bool) -> str:
    """The model.tar.gz of a SageMaker job of txt2img's trainer, if it can be served as it is."""

    if INFERENCE_CODE_TAG not in entry.tags:
        # Jobs packed before training.servable: the archive holds the model but no code/inference.py.
        raise SageMakerError(
            f"model '{entry.id}' was trained on SageMaker by an older txt2img, whose job left no inference code "
            f"in {entry.artifact}: train it again to deploy it, or download and extract that archive, register "
            "its model/ folder as a local fine-tune, and `txt2img deploy` that"
        )
    if safety_checker:
        raise SageMakerError(
            f"--safety-checker packs a checker into the model archive, and '{entry.id}' is deployed from its "
            "training job's model.tar.gz as it is: deploy it without the flag, or download and extract the "
            "archive, register its model as a local fine-tune and deploy that with --safety-checker"
        )
    return entry.artifact


def _endpoint_status(sagemaker, name: str) -> str | None:
    from botocore.exceptions import ClientError

    try:
        return sagemaker.describe_endpoint(EndpointName=name)["EndpointStatus"]
    except ClientError as error:
        if error.response.get("Error", {}).get("Code") == "ValidationException":
            return None  # SageMaker's answer for "no such endpoint"
        raise


def remove_resources(
    sagemaker, endpoint: str | None = None, config: str | None = None, models: tuple[str, ...] = ()
) -> list[str]:
    """Delete what is named, endpoint first; returns problems instead of raising, so all are tried."""
    from botocore.exceptions import ClientError

    problems = []
    steps = []
    if endpoint:
        steps.append(("endpoint", endpoint, lambda: sagemaker.delete_endpoint(EndpointName=endpoint)))
    if config:
        steps.append(("endpoint config", config, lambda: sagemaker.delete_endpoint_config(EndpointConfigName=config)))
    for model in models:
        steps.append(("model", model, lambda model=model: sagemaker.delete_model(ModelName=model)))
    for kind, name, delete in steps:
        try:
            delete()
        except ClientError as error:
            problems.append(explain_client_error(error, f"deleting {kind} {name}"))
    return problems


def ensure_name_is_free(context: AwsContext, name: str) -> None:
    """Refuse an endpoint name already in use, before anything is packed, uploaded or created."""
    with aws_errors(f"checking endpoint {name}"):
        status = _endpoint_status(context.client("sagemaker"), name)
    if status is not None:
        raise SageMakerError(
            f"endpoint {name} already exists in {context.region} ({status}). Pick another "
            f"--endpoint-name, or remove it with `txt2img endpoints delete {name}`"
        )


def create_endpoint(context: AwsContext, plan: DeploymentPlan) -> None:
    """Create model, endpoint config and endpoint; on any failure remove what this call created."""
    sagemaker = context.client("sagemaker")
    created: dict[str, str] = {}
    try:
        with aws_errors(f"creating model {plan.endpoint_name}", plan.instance_type):
            sagemaker.create_model(
                ModelName=plan.endpoint_name,
                PrimaryContainer=plan.primary_container(),
                ExecutionRoleArn=context.role,
                EnableNetworkIsolation=plan.network_isolation,
            )
        created["model"] = plan.endpoint_name
        config = {"EndpointConfigName": plan.endpoint_name, "ProductionVariants": [plan.production_variant()]}
        if plan.async_output is not None:
            config["AsyncInferenceConfig"] = plan.async_inference_config()
        with aws_errors(f"creating endpoint config {plan.endpoint_name}", plan.instance_type):
            sagemaker.create_endpoint_config(**config)
        created["config"] = plan.endpoint_name
        with aws_errors(f"creating endpoint {plan.endpoint_name}", plan.instance_type):
            sagemaker.create_endpoint(EndpointName=plan.endpoint_name, EndpointConfigName=plan.endpoint_name)
    except BaseException as error:
        problems = remove_resources(
            sagemaker, config=created.get("config"), models=(created["model"],) if "model" in created else ()
        )
        if problems and isinstance(error, SageMakerError):
            raise SageMakerError(f"{error}; cleanup: {'; '.join(problems)}") from error
        raise


def wait_for_endpoint(context: AwsContext, plan: DeploymentPlan, poll_seconds: float = POLL_SECONDS) -> str:
    """Poll until the endpoint is InService; a failed endpoint is removed with its config and model."""

    sagemaker = context.client("sagemaker")
    name = plan.endpoint_name
    try:
        description = wait_for(
            f"endpoint {name}",
            lambda: sagemaker.describe_endpoint(EndpointName=name),
            ENDPOINT,
            poll_seconds=poll_seconds,
            timeout_seconds=ENDPOINT_TIMEOUT_SECONDS,
            still_running=(
                f"it is billed once InService. Check it with `txt2img endpoints list`, "
                f"remove it with `txt2img endpoints delete {name}`"
            ),
        )
    except WaitFailed as failure:
        problems = remove_resources(sagemaker, name, name, (name,))
        cleanup = f"; cleanup: {'; '.join(problems)}" if problems else "; its endpoint, config and model were removed"
        raise WaitFailed(f"endpoint {name}", failure.status, f"{failure.reason}{cleanup}") from failure
    return description["EndpointStatus"]


def deploy(
    model_id: str,
    *,
    instance_type: str | None = None,
    endpoint_name: str | None = None,
    role: str | None = None,
    region: str | None = None,
    async_output: str | None = None,
    s3_prefix: str | None = None,
    scaling: Scaling | None = None,
    wait: bool = True,
    poll_seconds: float = POLL_SECONDS,
    safety_checker: bool = False,
) -> DeployResult:
    """Deploy ``model_id``, record the endpoint in the catalog, autoscale it when ``scaling`` is
    given (which needs ``wait``: only an InService variant can be registered), and return where it runs."""

    _check_deploy_options(s3_prefix, scaling, async_output, wait)
    context = aws_context(region, role, need_role=True)
    plan = plan_deployment(
        model_id,
        context.region,
        instance_type=instance_type,
        endpoint_name=endpoint_name,
        async_output=async_output,
        safety_checker=safety_checker,
    )
    plan.scaling = scaling
    ensure_name_is_free(context, plan.endpoint_name)
    if plan.local_archive:
        _upload_local_model(context, plan, s3_prefix)
    create_endpoint(context, plan)
    record_endpoint(
        plan.model_id,
        Endpoint(
            name=plan.endpoint_name,
            region=context.region,
            instance_type=plan.instance_type,
            created=datetime.now(timezone.utc),
        ),
    )
    status = _wait_and_autoscale(context, plan, poll_seconds) if wait else "Creating"
    return DeployResult(
        model_id=plan.model_id,
        endpoint_name=plan.endpoint_name,
        region=context.region,
        instance_type=plan.instance_type,
        status=status,
        is_async=plan.async_output is not None,
    )


def _check_deploy_options(s3_prefix: str | None, scaling: Scaling | None, async_output: str | None, wait: bool) -> None:
    """Refuse options that cannot work together, before anything is created."""
    if s3_prefix is not None:
        split_s3_uri(s3_prefix)  # a malformed prefix fails here
    if scaling is not None:
        if scaling.is_async != (async_output is not None):
            raise SageMakerError("Scaling.is_async must say whether the endpoint is async (async_output given)")
        if not wait:
            raise SageMakerError("autoscaling needs --wait: SageMaker registers a variant only once it is InService")


def _wait_and_autoscale(context: AwsContext, plan: DeploymentPlan, poll_seconds: float) -> str:
    """Wait for the endpoint, forgetting it if it failed, then autoscale it if ``plan.scaling`` asks; its status."""
    try:
        status = wait_for_endpoint(context, plan, poll_seconds)
    except WaitFailed:  # the endpoint was removed; on a timeout or Ctrl-C it is still there
        forget_endpoint(plan.endpoint_name)
        raise
    if plan.scaling is not None:
        _autoscale(context, plan)
    return status


def _autoscale(context: AwsContext, plan: DeploymentPlan) -> None:
    """Register the endpoint for autoscaling; if that fails, remove the endpoint as a failed start is."""

    name = plan.endpoint_name
    try:
        register_autoscaling(context, name, VARIANT_NAME, plan.scaling)
    except BaseException as error:
        _, problems = remove_autoscaling(context, name, (VARIANT_NAME,))
        problems += remove_resources(context.client("sagemaker"), name, name, (name,))
        forget_endpoint(name)
        if isinstance(error, SageMakerError):
            cleanup = f"cleanup: {'; '.join(problems)}" if problems else "its endpoint, config and model were removed"
            raise SageMakerError(f"{error}; {cleanup}") from error
        raise


def _upload_local_model(context: AwsContext, plan: DeploymentPlan, s3_prefix: str | None) -> None:
    prefix = s3_prefix or default_s3_prefix(context)
    plan.model_data = join_s3(prefix, "models", plan.endpoint_name, "model.tar.gz")
    with tempfile.TemporaryDirectory(prefix="txt2img-deploy-") as workdir:
        archive = build_model_archive(plan.model_id, Path(workdir), safety_checker=plan.safety_checker)
        upload_files(context, [(archive, plan.model_data)], f"uploading {plan.model_id} model.tar.gz")
