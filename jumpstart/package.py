"""Packing a catalog model that lives on this machine into a SageMaker ``model.tar.gz``.

The archive holds the exported diffusers folder at its root and, under ``code/``, the JumpStart
contract inference script plus the pip requirements the Hugging Face container installs first.
"""

from __future__ import annotations

import tarfile
from pathlib import Path

from jumpstart.errors import SageMakerError

# What code/inference.py needs beyond the Hugging Face inference container's own packages.
CONTAINER_REQUIREMENTS = ("diffusers>=0.31,<1", "accelerate>=0.34", "safetensors>=0.4")


def inference_script_source() -> str:
    from jumpstart import inference_script

    return Path(inference_script.__file__).read_text(encoding="utf-8")


def build_model_archive(model_id: str, workdir: Path) -> Path:
    """Export ``model_id`` and pack it with the inference code; returns the archive path in ``workdir``."""
    from rich.console import Console

    from catalog.pipelines import ModelLoadError, export_model
    from catalog.store import load_catalog

    model_dir = workdir / "model"
    with Console(stderr=True).status(f"exporting {model_id} ..."):
        try:
            export_model(model_id, model_dir, load_catalog())
        except ModelLoadError as error:
            raise SageMakerError(str(error)) from error
    code_dir = model_dir / "code"
    code_dir.mkdir()
    (code_dir / "inference.py").write_text(inference_script_source(), encoding="utf-8")
    (code_dir / "requirements.txt").write_text("\n".join(CONTAINER_REQUIREMENTS) + "\n", encoding="utf-8")
    archive = workdir / "model.tar.gz"
    with Console(stderr=True).status("packing model.tar.gz ..."), tarfile.open(archive, "w:gz") as tar:
        for path in sorted(model_dir.rglob("*")):
            tar.add(path, arcname=path.relative_to(model_dir).as_posix(), recursive=False)
    return archive
