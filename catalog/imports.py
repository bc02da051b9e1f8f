"""``txt2img catalog add``: register a model the user brings as a catalog entry (``source: imported``).

Three kinds of SOURCE:

* a local diffusers folder: the family comes from ``model_index.json`` and the component configs;
* a Hub repo id (``owner/name``) in diffusers layout: recorded now, its weights downloaded on first
  use under the same rules as the catalog's own Hub models (serving's TXT2IMG_ALLOW_DOWNLOADS,
  export's --allow-download). Its configs (a few KB) are read to detect the family; offline and
  uncached, ``--family`` says it instead;
* a single-file checkpoint (``.safetensors``, AUTOMATIC1111's layout): the family comes from its
  header (catalog/checkpoint_files.py); the pipeline's configuration, which such a file lacks, comes
  from the family's base repo (its configs must be in the HF cache or downloadable) or ``--config``.

Local weights are copied into ``TXT2IMG_HOME/models/NAME`` (the folder a training run of that name
would use, so ``catalog remove`` frees both), or with ``link`` recorded where they are. The name is
claimed as training claims it (catalog.store.claim_name). Nothing here imports torch.

A LoRA file (``--base ID``) branches off in ``_describe_file``: it is checked against its base
(catalog/lora_files.py) and registered as a LoRA of that base, served as a trained LoRA is.
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from catalog.checkpoint_files import (
    OPEN_CLIP_WIDTH,
    ImportRefused,
    TensorInfo,
    detect_family,
    is_lora,
    read_header,
    sha256_of,
)
from catalog.families import FAMILIES
from catalog.lora_files import check_against_base, lora_family, read_lora
from catalog.paths import follow_umask, staging_directory, writing
from catalog.schema import ID_PATTERN, CatalogEntry
from catalog.store import claim_name, load_catalog, write_entry

# Families whose weights have the same names and shapes: only the configuration tells them apart.
SAME_WEIGHTS = {"sd2": {"sd2", "sd2-base"}, "sd2-base": {"sd2", "sd2-base"}}
# What diffusers' from_single_file reads from a config repo (loaders/single_file.py).
CONFIG_PATTERNS = ["**/*.json", "*.json", "*.txt", "**/*.txt", "**/*.model"]
CONFIG_SUFFIXES = (".json", ".txt", ".model")
COPIED_CONFIG_DIR = "config"  # beside a copied single file: the configuration of a local --config folder
# Pipeline classes only one family runs; StableDiffusionPipeline models are told apart by text width.
PIPELINE_FAMILIES = {
    family.pipeline_class: name
    for name, family in FAMILIES.items()
    if family.pipeline_class != "StableDiffusionPipeline"
}
CLIP_WIDTH_FAMILIES = {768: "sd1", 32: "tiny"}
HUB_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")


@dataclass(frozen=True)
class ImportRequest:
    source: str
    name: str
    destination: Path  # where a copy goes: TXT2IMG_HOME/models/NAME
    link: bool = False
    family: str | None = None  # the user's word, where the files cannot tell (sd2 against sd2-base)
    config: str | None = None  # a single file's configuration: a Hub repo or a diffusers folder
    base: str | None = None  # the catalog id of the model a LoRA file adapts


def fetch_command(repo: str) -> str:
    return f"hf download {repo} --include '*.json' --include '*.txt' --include '*.model'"


def config_folder(config: str, local_files_only: bool) -> Path:
    """A local folder holding the pipeline configuration ``config`` names (a folder, or a Hub repo's
    configs from the HF cache, downloaded unless ``local_files_only``); refuses saying what to fetch."""
    folder = Path(config).expanduser()
    if folder.is_dir():
        if not (folder / "model_index.json").is_file():
            raise ImportRefused(f"config folder {folder} is not a diffusers folder: it has no model_index.json")
        return folder
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import RepositoryNotFoundError

    try:
        return Path(snapshot_download(config, allow_patterns=CONFIG_PATTERNS, local_files_only=local_files_only))
    except RepositoryNotFoundError:
        raise ImportRefused(f"config {config} is neither a folder nor a Hub repo you can reach") from None
    except (OSError, ValueError):
        raise ImportRefused(
            f"the configuration this checkpoint needs is {config}, which is not in the Hugging Face cache and "
            f"cannot be downloaded now; fetch it with `{fetch_command(config)}` or pass --config FOLDER "
            "(a diffusers folder of the same architecture)"
        ) from None


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise ImportRefused(f"cannot read {path}: {error}") from None
    if not isinstance(data, dict):
        raise ImportRefused(f"{path} is not a JSON object")
    return data


def folder_family(folder: Path) -> str:
    """The family of a diffusers folder, from model_index.json's pipeline class and the component configs."""
    class_name = _read_json(folder / "model_index.json").get("_class_name")
    if class_name in PIPELINE_FAMILIES:
        return PIPELINE_FAMILIES[class_name]
    if class_name != "StableDiffusionPipeline":
        known = ", ".join(["StableDiffusionPipeline", *PIPELINE_FAMILIES])
        raise ImportRefused(f"{folder} holds a {class_name} pipeline; the families txt2img serves are {known}")
    width = _read_json(folder / "unet" / "config.json").get("cross_attention_dim")
    if width in CLIP_WIDTH_FAMILIES:
        return CLIP_WIDTH_FAMILIES[width]
    if width == OPEN_CLIP_WIDTH:
        prediction = _read_json(folder / "scheduler" / "scheduler_config.json").get("prediction_type")
        return "sd2" if prediction == "v_prediction" else "sd2-base"
    raise ImportRefused(f"{folder}: a StableDiffusionPipeline of text width {width} matches no family")


def folder_resolution(folder: Path, family: str) -> int:
    """The native size: the UNet's latent size times the VAE's downscaling, else the family's own."""
    unet = folder / "unet" / "config.json"
    vae = folder / "vae" / "config.json"
    if unet.is_file() and vae.is_file():
        sample_size = _read_json(unet).get("sample_size")
        levels = len(_read_json(vae).get("block_out_channels") or [])
        if isinstance(sample_size, int) and levels:
            return sample_size * 2 ** (levels - 1)
    return FAMILIES[family].native_size


def _chosen_family(found: str, request: ImportRequest, what: str) -> str:
    if request.family is None or request.family == found:
        return found
    if request.family in SAME_WEIGHTS.get(found, ()):
        return request.family
    raise ImportRefused(f"--family {request.family} does not fit {what}, which is {found}")


def describe_source(request: ImportRequest, user_dir: Path | None = None) -> dict[str, Any]:
    """The entry fields SOURCE gives (family, resolution, where it lives), read before anything is written;
    a LoRA's base is looked up in the catalog of ``user_dir``."""
    path = Path(request.source).expanduser()
    if path.is_file():
        return _describe_file(path.resolve(), request, user_dir)
    if request.config is not None:
        raise ImportRefused("--config is for a single-file checkpoint; a folder or Hub repo has its own configuration")
    if request.base is not None:
        raise ImportRefused("--base is for a LoRA file (.safetensors); a folder or Hub repo is a whole model")
    if path.is_dir():
        return _describe_folder(path.resolve(), request)
    if HUB_REPO_ID.match(request.source) and not request.source.endswith(".safetensors"):
        if request.link:
            raise ImportRefused("--link is for local files and folders; a Hub repo stays in the HF cache")
        return _describe_hub_repo(request)
    raise ImportRefused(f"{request.source} is not a file, a folder nor a Hub repo id (owner/name)")


def _describe_folder(folder: Path, request: ImportRequest) -> dict[str, Any]:
    if not (folder / "model_index.json").is_file():
        raise ImportRefused(f"{folder} is not a diffusers folder: it has no model_index.json")
    if not any(folder.rglob("*.safetensors")):
        raise ImportRefused(f"{folder} holds no .safetensors weights; pickled weights (.bin) are refused")
    family = _chosen_family(folder_family(folder), request, str(folder))
    return {"family": family, "resolution": folder_resolution(folder, family), "imported_from": str(folder)}


def _describe_file(path: Path, request: ImportRequest, user_dir: Path | None) -> dict[str, Any]:
    tensors = read_header(path)
    if request.base is not None or is_lora(tensors):
        return _describe_lora(path, tensors, request, user_dir)
    found = detect_family(tensors, path)
    family = _chosen_family(found, request, f"the checkpoint {path.name}")
    config = request.config or FAMILIES[family].single_file_config
    if config is None:
        raise ImportRefused(f"a {family} checkpoint has no base repo to take its configuration from; pass --config")
    folder = config_folder(config, local_files_only=False)
    config_family = folder_family(folder)
    if config_family not in SAME_WEIGHTS.get(family, {family}):
        raise ImportRefused(f"config {config} is a {config_family} pipeline, but {path.name} is a {family} checkpoint")
    if request.family is None:
        family = config_family  # sd2 against sd2-base: the configuration knows
    local_config = Path(config).expanduser()
    return {
        "family": family,
        "resolution": folder_resolution(folder, family),
        "imported_from": str(path),
        "config": str(local_config.resolve()) if local_config.is_dir() else config,
    }


def _describe_lora(
    path: Path, tensors: dict[str, TensorInfo], request: ImportRequest, user_dir: Path | None
) -> dict[str, Any]:
    """A LoRA file's entry fields, once its family and every layer fit the base ``--base`` names."""
    if not is_lora(tensors):
        raise ImportRefused(f"{path} is not a LoRA adapter (no lora_* keys); --base is for LoRA files")
    if request.base is None:
        raise ImportRefused(f"{path} is a LoRA adapter: pass --base ID, the catalog model it adapts")
    if request.config is not None or request.family is not None:
        raise ImportRefused("a LoRA file takes its family and configuration from --base; drop --family and --config")
    base = load_catalog(user_dir).get(request.base)
    lora = read_lora(tensors, path)
    family = lora_family(lora, path)
    if family is not None and family not in SAME_WEIGHTS.get(base.family, {base.family}):
        raise ImportRefused(f"{path.name} is a LoRA for {family} models, but the base '{base.id}' is {base.family}")
    if base.method == "lora":
        raise ImportRefused(f"the base '{base.id}' is itself a LoRA; give the model it adapts")
    check_against_base(lora, base, _base_config_folder(base), path)
    return {
        "family": base.family,
        "resolution": base.resolution,
        "imported_from": str(path),
        "base": base.id,
        "method": "lora",
    }


def _base_config_folder(base: CatalogEntry) -> Path | None:
    """The diffusers folder configuring ``base`` (None for tiny-sd, built in code)."""
    if base.source == "builtin":
        return None
    if base.config is not None:
        return config_folder(base.config, local_files_only=False)
    if base.artifact is not None:
        return Path(base.artifact).expanduser()
    return config_folder(base.hf_repo or "", local_files_only=False)


def _describe_hub_repo(request: ImportRequest) -> dict[str, Any]:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import RepositoryNotFoundError

    repo = request.source
    try:
        folder = Path(snapshot_download(repo, allow_patterns=CONFIG_PATTERNS))
    except RepositoryNotFoundError:
        raise ImportRefused(
            f"no Hub repo {repo} (or it is gated or private: `hf auth login` and accept its terms)"
        ) from None
    except (OSError, ValueError):
        if request.family is None:
            raise ImportRefused(
                f"cannot read {repo}'s configuration (offline, and not in the HF cache): pass --family, "
                f"or fetch it with `{fetch_command(repo)}`"
            ) from None
        family = request.family
        return {"family": family, "resolution": FAMILIES[family].native_size, "imported_from": repo, "hf_repo": repo}
    if not (folder / "model_index.json").is_file():
        raise ImportRefused(
            f"{repo} is not in diffusers layout (no model_index.json); add its .safetensors file instead"
        )
    family = _chosen_family(folder_family(folder), request, repo)
    return {"family": family, "resolution": folder_resolution(folder, family), "imported_from": repo, "hf_repo": repo}


def check_name(name: str, user_dir: Path | None = None) -> None:
    if not ID_PATTERN.match(name):
        raise ImportRefused(
            f"invalid model name '{name}': use lowercase letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    if name in load_catalog(user_dir):
        raise ImportRefused(f"model '{name}' already exists in the catalog; pick another --name")


def import_model(request: ImportRequest, user_dir: Path | None = None) -> CatalogEntry:
    """Register SOURCE under NAME: detect, claim the name, copy (or link) the weights, write the entry."""
    check_name(request.name, user_dir)
    fields = describe_source(request, user_dir)
    with claim_name(request.name, user_dir):
        check_name(request.name, user_dir)  # registered by another process while this one read the source
        if request.destination.exists():
            raise ImportRefused(f"{request.destination} already exists; pick another --name or remove that folder")
        if "hf_repo" not in fields:
            fields |= _stored_weights(fields, request)
        entry = CatalogEntry(id=request.name, source="imported", **fields)
        try:
            write_entry(entry, user_dir)
        except BaseException:
            shutil.rmtree(request.destination, ignore_errors=True)
            raise
    return entry


def _stored_weights(fields: dict[str, Any], request: ImportRequest) -> dict[str, Any]:
    """Copy the source into the destination (or, linked, leave it); returns artifact, link, a file's sha256
    and, for a copied file configured from a local folder, the copy of that configuration."""
    source = Path(fields["imported_from"])
    stored: dict[str, Any] = {"link": request.link}
    if source.is_file():
        stored["sha256"] = sha256_of(source)
    if request.link:
        return stored | {"artifact": str(source)}
    config = Path(fields.get("config") or "")
    local_config = source.is_file() and config.is_absolute() and config.is_dir()
    staging = staging_directory(request.destination.parent, request.destination.name)
    try:
        with writing(request.destination):
            if source.is_file():
                shutil.copyfile(source, staging / source.name)
            else:
                shutil.copytree(source, staging, dirs_exist_ok=True)
            if local_config:
                _copy_configuration(config, staging / COPIED_CONFIG_DIR)
            follow_umask(staging)
            staging.rename(request.destination)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if local_config:  # a copy needs nothing outside TXT2IMG_HOME, not even the folder it was configured from
        stored["config"] = str(request.destination / COPIED_CONFIG_DIR)
    artifact = request.destination / source.name if source.is_file() else request.destination
    return stored | {"artifact": str(artifact)}


def _copy_configuration(folder: Path, target: Path) -> None:
    """The files of ``folder`` that configure a pipeline (what CONFIG_PATTERNS fetches from a repo)."""
    for path in sorted(folder.rglob("*")):
        if path.is_file() and path.suffix in CONFIG_SUFFIXES:
            copied = target / path.relative_to(folder)
            copied.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, copied)
