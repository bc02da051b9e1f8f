"""Making the output of a SageMaker training job deployable as it stands.

SageMaker packs the job's /opt/ml/model into its model.tar.gz. After a successful run, rank 0 in
the container adds what the Hugging Face inference container needs to serve that archive with
txt2img's ``code/inference.py``, so that ``txt2img deploy NAME`` creates the endpoint from the
job's own artifact: no download, repack or upload.

* ``code/``: the inference code as ``jumpstart.package.write_inference_code`` wrote it where the
  job was started; it travels in the job's source archive (``jumpstart.trainer_source``), since
  the training container has neither the serving package nor the jumpstart one.
* ``fused/`` for a LoRA run: its adapter (``model/``) fused into the base, a complete diffusers
  folder. The endpoint could instead download the base from the Hub and load the adapter at start,
  but that needs network access and a token for gated repos on the endpoint, peft in the
  inference container, and a Hub repo, which tiny-sd (built in code) does not have. Fusing here,
  where the base is already in the cache, costs the size of the base in the archive.

A full fine-tune's ``model/`` is already a diffusers folder. ``code/inference.py`` looks for the
pipeline in those folders (its PIPELINE_FOLDERS).
"""

from __future__ import annotations

import shutil
from pathlib import Path

from catalog.pipelines import export_entry
from catalog.schema import CatalogEntry
from catalog.store import load_catalog

SERVING_CODE_DIR = "code"
FUSED_DIR = "fused"


def add_serving_code(entry: CatalogEntry, output_dir: Path, inference_code: Path) -> None:
    """Put the packed inference code (and, for a LoRA, the fused pipeline) next to the run's model."""
    if entry.method == "lora":
        # The base was downloaded (or built) by this run; nothing new is fetched.
        export_entry(entry, output_dir / FUSED_DIR, load_catalog(), local_files_only=True)
    # Last: an archive with code/ holds everything that code needs.
    shutil.copytree(inference_code, output_dir / SERVING_CODE_DIR)
