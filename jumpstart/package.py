"""Packing a catalog model that lives on this machine into a SageMaker ``model.tar.gz``.

The archive holds the exported diffusers folder at its root and, under ``code/``, the container's
entry point ``inference.py``, the wire format it imports (``serving/invocations.py`` with its body
reader and image encoder, and the recipe records of serving/infotext.py, WIRE_MODULES, copied as they
are, so the endpoint and the local ``/invocations`` route answer alike, images carrying the same
recipe), the model's identity for those recipes, and the pip requirements the Hugging Face container
installs first.
"""

from __future__ import annotations

import json
import shutil
import tarfile
from pathlib import Path

from catalog import families
from catalog.pipelines import ModelLoadError, export_model
from catalog.store import load_catalog
from jumpstart import inference_script
from jumpstart.errors import SageMakerError
from serving import images, infotext, invocations, json_body
from serving.recipes import model_sha, package_version
from serving.safety import FEATURE_EXTRACTOR_FOLDER, SAFETY_CHECKER_FOLDER, SafetyChecker
from serving.settings import ServingSettings

# The wire format and what it imports, and the recipe records every image carries, copied as they are
# into the archive's code/serving/.
WIRE_MODULES = (invocations, json_body, images, infotext)
# The family table (defaults and refusals by pipeline class), copied as it is into the archive's code/catalog/.
FAMILY_MODULE = families
FAMILY_PACKAGE_INIT = '"""The pipeline families, copied from txt2img\'s catalog package."""\n'

# What code/inference.py needs beyond the Hugging Face inference container's own packages.
CONTAINER_REQUIREMENTS = ("diffusers>=0.31,<1", "accelerate>=0.34", "safetensors>=0.4")
WIRE_PACKAGE_INIT = '"""JumpStart\'s text-to-image wire format, copied from txt2img\'s serving package."""\n'


def write_inference_code(code_dir: Path, model: dict[str, str] | None = None) -> None:
    """Fill ``code_dir`` with inference.py, the wire format it imports, and requirements.txt; and with
    ``model`` (``model_identity``), which every image's recipe names, when the archive's model is known."""

    code_dir.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(inference_script.__file__, code_dir / "inference.py")
    # The same package path as in this checkout, so inference.py imports it the same way in both.
    wire_package = code_dir / "serving"
    wire_package.mkdir()
    (wire_package / "__init__.py").write_text(WIRE_PACKAGE_INIT, encoding="utf-8")
    for module in WIRE_MODULES:
        shutil.copyfile(module.__file__, wire_package / Path(module.__file__).name)
    family_package = code_dir / "catalog"
    family_package.mkdir()
    (family_package / "__init__.py").write_text(FAMILY_PACKAGE_INIT, encoding="utf-8")
    shutil.copyfile(FAMILY_MODULE.__file__, family_package / Path(FAMILY_MODULE.__file__).name)
    (code_dir / "requirements.txt").write_text("\n".join(CONTAINER_REQUIREMENTS) + "\n", encoding="utf-8")
    if model is not None:
        (code_dir / inference_script.MODEL_IDENTITY_FILE).write_text(json.dumps(model), encoding="utf-8")


def model_identity(model_id: str) -> dict[str, str]:
    """What an image's recipe says of the model that made it (serving/recipes.py's Recipe): its catalog
    id, the SHA-256 of its catalog entry, and this txt2img's version."""
    return {
        "model": model_id,
        "model_sha": model_sha(load_catalog().get(model_id)),
        "txt2img_version": package_version(),
    }


def add_safety_checker(model_dir: Path, location: str) -> None:
    """Make the checker in ``location`` (TXT2IMG_SAFETY_CHECKER_REPO) the exported pipeline's own, as an
    SD 1.x repo holds it: ``safety_checker`` and ``feature_extractor`` folders, named in model_index.json."""
    index_path = model_dir / "model_index.json"
    index = json.loads(index_path.read_text(encoding="utf-8"))
    if SAFETY_CHECKER_FOLDER not in index:
        raise SageMakerError(f"a {index['_class_name']} has no safety checker; deploy without --safety-checker")
    try:  # the deployer's HF cache or folder only, as the export of the model itself
        checker = SafetyChecker.load(location, local_files_only=True)
    except OSError as error:
        raise SageMakerError(
            f"no safety checker in {location}: {error}. Fetch it with `huggingface-cli download {location} "
            f"--include '{SAFETY_CHECKER_FOLDER}/*' '{FEATURE_EXTRACTOR_FOLDER}/*'`, or set TXT2IMG_SAFETY_CHECKER_REPO"
        ) from error
    for folder in (SAFETY_CHECKER_FOLDER, FEATURE_EXTRACTOR_FOLDER):
        shutil.rmtree(model_dir / folder, ignore_errors=True)
    checker.save(model_dir)
    index[SAFETY_CHECKER_FOLDER] = ["stable_diffusion", "StableDiffusionSafetyChecker"]
    index[FEATURE_EXTRACTOR_FOLDER] = ["transformers", "CLIPImageProcessor"]
    index_path.write_text(json.dumps(index, indent=2), encoding="utf-8")


def build_model_archive(model_id: str, workdir: Path, safety_checker: bool = False) -> Path:
    """Export ``model_id`` and pack it with the inference code, and with the safety checker of
    TXT2IMG_SAFETY_CHECKER_REPO if asked; returns the archive path in ``workdir``."""
    from rich.console import Console

    model_dir = workdir / "model"
    with Console(stderr=True).status(f"exporting {model_id} ..."):
        try:
            export_model(model_id, model_dir, load_catalog())
        except ModelLoadError as error:
            raise SageMakerError(str(error)) from error
    if safety_checker:
        add_safety_checker(model_dir, ServingSettings().safety_checker_repo)
    write_inference_code(model_dir / "code", model_identity(model_id))
    archive = workdir / "model.tar.gz"
    with Console(stderr=True).status("packing model.tar.gz ..."), tarfile.open(archive, "w:gz") as tar:
        for path in sorted(model_dir.rglob("*")):
            tar.add(path, arcname=path.relative_to(model_dir).as_posix(), recursive=False)
    return archive
