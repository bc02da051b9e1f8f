"""What SageMaker JumpStart says about a model: its containers, artifacts, environment and instance types.

Everything is read through the sagemaker 3.x JumpStart helpers, so the
``AWS_JUMPSTART_*_LOCAL_ROOT_DIR_OVERRIDE`` local-metadata mode works as well as the live S3 catalog.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from jumpstart.errors import SageMakerError

# Room for several base64 JPEGs in one response (SageMaker's default is about 6 MB);
# the JumpStart text-to-image notebook sets the same value.
MAX_RESPONSE_SIZE = "20000000"
TRAINING_ENTRY_SCRIPT = "transfer_learning.py"


@dataclass(frozen=True)
class HostingSpec:
    """How JumpStart hosts one model in one region."""

    model_id: str
    version: str
    image_uri: str
    model_data: str
    environment: dict[str, str]
    network_isolation: bool
    default_instance_type: str
    supported_instance_types: list[str] = field(default_factory=list)
    resource_name_base: str | None = None


@dataclass(frozen=True)
class TrainingSpec:
    """How JumpStart fine-tunes one model in one region."""

    model_id: str
    version: str
    image_uri: str
    script_uri: str
    base_model_uri: str
    default_instance_type: str
    supported_instance_types: list[str] = field(default_factory=list)


def _quietly(function, *args, **kwargs):
    """Call a JumpStart helper without its 'wildcard version' log chatter on the console."""
    import logging

    logger = logging.getLogger("sagemaker")
    previous = logger.level
    logger.setLevel(logging.ERROR)
    try:
        return function(*args, **kwargs)
    finally:
        logger.setLevel(previous)


def model_specs(model_id: str, region: str, version: str = "*"):
    """JumpStart's spec object for ``model_id``; a SageMakerError when JumpStart does not know it."""
    from botocore.exceptions import ClientError
    from sagemaker.core.jumpstart.accessors import JumpStartModelsAccessor

    try:
        return _quietly(JumpStartModelsAccessor.get_model_specs, region=region, model_id=model_id, version=version)
    except KeyError as error:
        raise SageMakerError(f"SageMaker JumpStart has no model '{model_id}' in {region}") from error
    except ClientError as error:
        raise SageMakerError(f"cannot read the SageMaker JumpStart catalog in {region}: {error}") from error


def _image(model_id: str, region: str, instance_type: str, scope: str) -> str:
    from sagemaker.core import image_uris

    try:
        return _quietly(
            image_uris.retrieve,
            framework=None,
            region=region,
            model_id=model_id,
            model_version="*",
            image_scope=scope,
            instance_type=instance_type,
        )
    except ValueError as error:
        raise SageMakerError(
            f"JumpStart has no {scope} container of '{model_id}' for {instance_type}: {error}"
        ) from error


def hosting_spec(model_id: str, region: str, instance_type: str | None = None) -> HostingSpec:
    """The container, artifact and environment JumpStart deploys ``model_id`` with."""
    from sagemaker.core import model_uris

    specs = model_specs(model_id, region)
    instance_type = instance_type or specs.default_inference_instance_type
    # Like JumpStart's own deploy: only the variables its model class requires, as strings.
    environment = {
        variable.name: str(variable.default)
        for variable in specs.inference_environment_variables
        if variable.required_for_model_class
    }
    environment["MMS_MAX_RESPONSE_SIZE"] = MAX_RESPONSE_SIZE
    model_data = _quietly(
        model_uris.retrieve, region=region, model_id=model_id, model_version="*", model_scope="inference"
    )
    return HostingSpec(
        model_id=model_id,
        version=specs.version,
        image_uri=_image(model_id, region, instance_type, "inference"),
        model_data=model_data,
        environment=environment,
        network_isolation=bool(specs.inference_enable_network_isolation),
        default_instance_type=specs.default_inference_instance_type,
        supported_instance_types=list(specs.supported_inference_instance_types or []),
        resource_name_base=getattr(specs, "resource_name_base", None),
    )


def training_spec(model_id: str, region: str, instance_type: str | None = None) -> TrainingSpec:
    """The container, training script and base weights JumpStart fine-tunes ``model_id`` with."""
    from sagemaker.core import model_uris, script_uris

    specs = model_specs(model_id, region)
    if not specs.training_supported:
        raise SageMakerError(f"SageMaker JumpStart cannot fine-tune '{model_id}' (training_supported is false)")
    instance_type = instance_type or specs.default_training_instance_type
    return TrainingSpec(
        model_id=model_id,
        version=specs.version,
        image_uri=_image(model_id, region, instance_type, "training"),
        script_uri=_quietly(
            script_uris.retrieve, region=region, model_id=model_id, model_version="*", script_scope="training"
        ),
        base_model_uri=_quietly(
            model_uris.retrieve, region=region, model_id=model_id, model_version="*", model_scope="training"
        ),
        default_instance_type=specs.default_training_instance_type,
        supported_instance_types=list(specs.supported_training_instance_types or []),
    )


@dataclass(frozen=True)
class HuggingFaceContainer:
    """One release of the Hugging Face PyTorch containers, as sagemaker.core's image_uris names it."""

    transformers: str
    pytorch: str
    python: str

    def image(self, region: str, instance_type: str, scope: str) -> str:
        """The image URI for ``scope`` ("inference" or "training") on ``instance_type`` in ``region``."""
        from sagemaker.core import image_uris

        try:
            return image_uris.retrieve(
                framework="huggingface",
                region=region,
                version=self.transformers,
                base_framework_version=self.pytorch,
                py_version=self.python,
                instance_type=instance_type,
                image_scope=scope,
            )
        except ValueError as error:
            raise SageMakerError(
                f"no Hugging Face {scope} container for {instance_type} in {region}: {error}"
            ) from error
