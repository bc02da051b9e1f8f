"""txt2img's own trainer as a SageMaker training job: the container, the packed source, the hyperparameters.

``txt2img train --remote --trainer txt2img`` runs on the Hugging Face PyTorch training container
(torch, transformers and diffusers' CUDA stack already there), with ``sourcedir.tar.gz`` holding
the packages the trainer imports, ``requirements.txt`` for what the container lacks, the entry
point ``txt2img_train.py`` (``jumpstart/sagemaker_entry.py``), which starts torchrun over every
GPU of every instance, and ``inference_code/``, the ``code/`` folder the job adds to its model so
that ``txt2img deploy`` serves its model.tar.gz as it is (``training.servable``). The job itself
is created by ``jumpstart.remote`` like JumpStart's; ``jumpstart.trainers.Txt2ImgTrainer`` says
what differs.
"""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

from jumpstart import sagemaker_entry
from jumpstart.package import write_inference_code
from jumpstart.sagemaker_entry import BASE_KEY, INFERENCE_CODE_DIR, INFERENCE_CODE_KEY, NAME_KEY
from jumpstart.specs import HuggingFaceContainer
from training.hyperparameters import Hyperparameters

# The Hugging Face PyTorch training container (sagemaker.core's image_uris): PyTorch 2.8, Python 3.12.
TRAINING_CONTAINER = HuggingFaceContainer(transformers="4.56.2", pytorch="pytorch2.8.0", python="py312")
# One A10G (24 GB): LoRA or full SD 1.x/2.x fine-tunes at 512 px. ml.g5.12xlarge has four.
DEFAULT_INSTANCE_TYPE = "ml.g5.2xlarge"
ENTRY_POINT = "txt2img_train.py"
ARCHIVE_NAME = "sourcedir.tar.gz"
# What the trainer imports: the catalog (base models), the trainer, and txt2img's errors.
PACKAGES = ("catalog", "training", "txt2img")
# Already in the container (a pip upgrade would replace its CUDA build) or only for serving.
NOT_REQUIRED = ("torch", "bentoml", "fastapi")


def container_requirements() -> list[str]:
    """txt2img's own requirements (as installed) that the training container must add."""
    import re
    from importlib.metadata import requires

    found = []
    for requirement in requires("txt2img") or []:
        if "extra ==" in requirement:
            continue
        name = re.split(r"[<>=!~;\[ ]", requirement, maxsplit=1)[0]
        if name.lower() not in NOT_REQUIRED:
            found.append(requirement)
    return found


def build_source_archive(workdir: Path) -> Path:
    """Pack the trainer's packages, the entry point, requirements.txt and the inference code the
    job adds to its model (``training.servable``) into ``workdir/sourcedir.tar.gz``."""

    root = Path(__file__).resolve().parent.parent
    archive = workdir / ARCHIVE_NAME

    def add_bytes(tar: tarfile.TarFile, name: str, data: bytes) -> None:
        info = tarfile.TarInfo(name)
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))

    with tarfile.open(archive, "w:gz") as tar:
        tar.add(sagemaker_entry.__file__, arcname=ENTRY_POINT)
        add_bytes(tar, "requirements.txt", ("\n".join(container_requirements()) + "\n").encode())
        for package in PACKAGES:
            for path in sorted((root / package).rglob("*")):
                if path.is_file() and "__pycache__" not in path.parts and path.suffix != ".pyc":
                    tar.add(path, arcname=path.relative_to(root).as_posix())
        inference_code = workdir / sagemaker_entry.INFERENCE_CODE_DIR
        write_inference_code(inference_code)
        tar.add(inference_code, arcname=sagemaker_entry.INFERENCE_CODE_DIR)
    return archive


def job_hyperparameters(hyperparameters: Hyperparameters, base: str, name: str, source_uri: str) -> dict[str, str]:
    """Every trainer hyperparameter as a string (lists as JSON), the base and name, the packed inference
    code's folder, and the two that make the container's toolkit run the entry point from the uploaded source."""
    import json

    values = hyperparameters.model_dump(mode="json")
    strings = {key: json.dumps(value) if isinstance(value, list) else str(value) for key, value in values.items()}
    return {
        **strings,
        BASE_KEY: base,
        NAME_KEY: name,
        INFERENCE_CODE_KEY: INFERENCE_CODE_DIR,
        "sagemaker_program": ENTRY_POINT,
        "sagemaker_submit_directory": source_uri,
    }
