"""Turning a catalog entry into a diffusers pipeline, and exporting it as a self-contained folder.

Shared by ``txt2img export``, the serving pipeline manager, the trainer and the deployer, so
that every part loads a model the same way: safetensors only, Hub repos through the HF cache.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import yaml

from catalog.checkpoint_files import ImportRefused
from catalog.imports import config_folder
from catalog.lora_files import kohya_tensors
from catalog.notices import drop_torchvision_fallback_notices
from catalog.paths import follow_umask, staging_directory, writing
from catalog.schema import CatalogEntry
from catalog.store import Catalog
from catalog.tiny_families import TINY_PIPELINES
from txt2img.errors import InputError

LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
EXPORT_MANIFEST = "txt2img.yaml"


class ModelLoadError(InputError, RuntimeError):
    """A catalog model cannot be turned into a pipeline; the message says why and what to do.

    A server answers 503: the model may load later (once fetched, or once memory frees up)."""

    http_status = 503
    retry_after_s = 60


def lora_weights_file(entry: CatalogEntry) -> Path:
    """The adapter file of a local LoRA fine-tune."""
    artifact = Path(entry.artifact or "")
    return artifact if artifact.suffix == ".safetensors" else artifact / LORA_WEIGHT_NAME


def _require_local_artifact(entry: CatalogEntry) -> Path:
    assert entry.artifact is not None  # the schema guarantees it for fine-tunes
    if entry.artifact.startswith("s3://"):
        raise ModelLoadError(
            f"model '{entry.id}' lives on S3 ({entry.artifact}); deploy it with `txt2img deploy {entry.id}` "
            "or download and extract the artifact, then register the local folder"
        )
    path = Path(entry.artifact).expanduser()
    if not path.exists():
        raise ModelLoadError(f"model '{entry.id}': its artifact {path} does not exist")
    return path


def load_base_pipeline(
    entry: CatalogEntry,
    *,
    weights: Path | None = None,
    torch_dtype: Any = None,
    local_files_only: bool = False,
    **from_pretrained_kwargs: Any,
):
    """The pipeline of an entry that carries its own full weights (not a LoRA).

    ``weights`` is a folder ``export_model`` wrote for this entry (BentoML's model store keeps
    such folders); when given, it is loaded instead of the entry's own source, a LoRA included,
    since an export holds it fused into its base.
    """
    if weights is None and entry.method == "lora":
        raise ModelLoadError(f"model '{entry.id}' is a LoRA adapter; load its base '{entry.base}' first")
    drop_torchvision_fallback_notices()  # diffusers imports the pipeline's class while loading it
    if weights is None and entry.source == "builtin":  # tiny-sd, or a test's tiny stand-in of another family
        pipeline = TINY_PIPELINES[entry.family]()
        return pipeline if torch_dtype is None else pipeline.to(dtype=torch_dtype)

    from diffusers import DiffusionPipeline

    if weights is not None:
        location = str(weights)
    elif entry.artifact is not None:
        location = str(_require_local_artifact(entry))
    else:
        location = entry.hf_repo
    try:
        if weights is None and entry.config is not None:
            return _load_single_file(entry, torch_dtype, local_files_only, **from_pretrained_kwargs)
        return DiffusionPipeline.from_pretrained(
            location,
            torch_dtype=torch_dtype,
            use_safetensors=True,  # refuse pickled checkpoints: they can run arbitrary code
            local_files_only=local_files_only,
            **from_pretrained_kwargs,
        )
    except (OSError, ValueError) as error:
        hint = (
            " It is not in the local Hugging Face cache and downloads are off."
            if local_files_only
            else " Check the network, your HF token (`huggingface-cli login`) and the repo's license terms."
        )
        reason = str(error).strip().rstrip(".")
        raise ModelLoadError(f"cannot load model '{entry.id}' from {location}: {reason}.{hint}") from error


def _load_single_file(entry: CatalogEntry, torch_dtype: Any, local_files_only: bool, **kwargs: Any):
    """An imported single-file checkpoint, configured from ``entry.config`` (a folder, or a Hub repo's
    configs from the HF cache: resolved here, since diffusers would download them whatever
    ``local_files_only`` says). The pipeline class is the one the configuration names."""
    import diffusers

    try:
        config = config_folder(entry.config or "", local_files_only)
    except ImportRefused as error:
        raise ModelLoadError(f"cannot load model '{entry.id}': {error}") from None
    class_name = json.loads((config / "model_index.json").read_text(encoding="utf-8"))["_class_name"]
    return getattr(diffusers, class_name).from_single_file(
        str(_require_local_artifact(entry)),
        config=str(config),
        torch_dtype=torch_dtype,
        local_files_only=True,  # the configuration is local by now, and the weights are a local file
        **kwargs,
    )


def apply_lora(pipeline, entry: CatalogEntry, adapter_name: str | None = None) -> str:
    """Load a LoRA fine-tune's adapter onto its already-loaded base; returns the adapter name."""
    weights = lora_weights_file(_lora_entry_checked(entry))
    adapter_name = adapter_name or entry.id.replace(".", "_")
    pipeline.load_lora_weights(str(weights.parent), weight_name=weights.name, adapter_name=adapter_name)
    return adapter_name


def _lora_entry_checked(entry: CatalogEntry) -> CatalogEntry:
    _require_local_artifact(entry)
    if not lora_weights_file(entry).is_file():
        raise ModelLoadError(f"model '{entry.id}': no adapter file at {lora_weights_file(entry)}")
    return entry


def export_a1111(entry: CatalogEntry, destination: Path) -> Path:
    """Write a LoRA's adapter as one ``.safetensors`` in kohya's key layout, alphas included: the file
    AUTOMATIC1111 (``models/Lora``) and ComfyUI load."""
    if entry.method != "lora":
        raise InputError(f"model '{entry.id}' is not a LoRA; --format a1111 writes LoRA adapters")
    destination = destination.expanduser()
    if destination.exists():
        raise InputError(f"{destination} already exists")
    tensors = kohya_tensors(lora_weights_file(_lora_entry_checked(entry)))
    metadata = {"ss_network_module": "networks.lora", "ss_base_model_version": entry.family, "txt2img_id": entry.id}
    staging = staging_directory(destination.parent, destination.name)
    try:  # written beside the destination and renamed into place: a failure never leaves half a file
        with writing(destination):
            _save_tensors(tensors, staging / destination.name, metadata)
            follow_umask(staging)
            (staging / destination.name).rename(destination)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return destination


def _save_tensors(tensors: dict[str, Any], path: Path, metadata: dict[str, str]) -> None:
    from safetensors.torch import save_file

    save_file({key: value.contiguous() for key, value in tensors.items()}, str(path), metadata=metadata)


def load_pipeline(entry: CatalogEntry, catalog: Catalog, **kwargs: Any):
    """A ready pipeline for any catalog entry; a LoRA fine-tune comes as an active adapter on its base."""
    if entry.method != "lora":
        return load_base_pipeline(entry, **kwargs)
    pipeline = load_base_pipeline(catalog.get(entry.base), **kwargs)
    apply_lora(pipeline, entry)
    return pipeline


def export_model(model_id: str, destination: Path, catalog: Catalog, local_files_only: bool = True) -> Path:
    """Write a self-contained diffusers folder (safetensors) for any catalog model.

    A LoRA is fused into its base so the folder needs nothing else. The folder is assembled
    beside ``destination`` and renamed into place, so a failure never leaves half a model.
    """
    return export_entry(catalog.get(model_id), destination, catalog, local_files_only)


def export_entry(entry: CatalogEntry, destination: Path, catalog: Catalog, local_files_only: bool = True) -> Path:
    """``export_model`` for an entry that need not be in ``catalog`` (only its base must be): the
    unregistered result of a run in a SageMaker training container, say."""
    destination = destination.expanduser()
    if destination.exists() and any(destination.iterdir()):
        raise FileExistsError(f"{destination} exists and is not empty")
    pipeline = load_pipeline(entry, catalog, local_files_only=local_files_only)
    if entry.method == "lora":
        pipeline.fuse_lora()
        pipeline.unload_lora_weights()
    with writing(destination):
        _save_export(pipeline, entry, destination)
    return destination


def exported_entry(folder: Path) -> CatalogEntry:
    """The catalog entry a folder written by ``export_model`` was exported from (its manifest says)."""
    manifest = yaml.safe_load((folder / EXPORT_MANIFEST).read_text(encoding="utf-8"))
    return CatalogEntry.model_validate(manifest["exported_from"])


def _save_export(pipeline: Any, entry: CatalogEntry, destination: Path) -> None:
    staging = staging_directory(destination.parent, destination.name)
    try:
        pipeline.save_pretrained(staging, safe_serialization=True)
        manifest = {"exported_from": entry.model_dump(mode="json", exclude_none=True)}
        (staging / EXPORT_MANIFEST).write_text(yaml.safe_dump(manifest, sort_keys=False), encoding="utf-8")
        follow_umask(staging)
        if destination.exists():
            destination.rmdir()
        staging.rename(destination)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
