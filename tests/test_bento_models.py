"""Catalog models in BentoML's model store: the manager loads them first, and a built Bento carries them.

The end-to-end test saves a LoRA fine-tune into one BentoML home, builds a Bento from a copy of the
repository, moves the Bento as a file into a second, empty BentoML home, and serves it from another
folder, offline, with a txt2img home that has never heard of the fine-tune.
"""

from __future__ import annotations

import base64
import io
import os
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
from bentoml_server import REPO_ROOT, server_process
from PIL import Image
from serving_finetunes import LORA_ID, register_finetunes

from catalog.store import load_catalog
from serving.bentoml_compat import check_tag_name
from serving.model_store import bento_model_name

BENTOML = str(Path(sys.executable).parent / "bentoml")
PROMPT = "a photo of sks dog"
SEED = 7


def test_store_names_are_valid_tags_for_every_catalog_id():
    names = {bento_model_name(entry.id) for entry in load_catalog()}
    for name in names:
        check_tag_name(name)  # raises for a name BentoML refuses
    assert len(names) == len(load_catalog())  # no two ids share a store name
    assert bento_model_name("tiny-sd") == "txt2img-tiny-sd"


def generate(pipeline) -> np.ndarray:
    from serving.generation import BatchItem, generate_images

    [image] = generate_images(
        pipeline, [BatchItem(PROMPT, None, SEED)], width=64, height=64, num_inference_steps=2, guidance_scale=7.5
    )
    return np.asarray(image, dtype=np.int16)


def make_manager(stored):
    from serving.manager import PipelineManager
    from serving.settings import ServingSettings

    return PipelineManager(ServingSettings(device="cpu", torch_threads=1), stored=stored)


def test_manager_prefers_the_store_and_learns_store_only_fine_tunes(tmp_path):
    """A fused LoRA from the store serves without its catalog file; stored tiny-sd weights beat the built-in ones."""
    import torch

    from catalog.pipelines import export_model, exported_entry, load_pipeline
    from catalog.tiny_sd import build_tiny_sd_pipeline
    from serving.model_store import StoredModel

    finetunes = tmp_path / "finetunes"
    register_finetunes(finetunes)
    finetune_catalog = load_catalog(user_dir=finetunes / "catalog")
    lora_folder = export_model(LORA_ID, tmp_path / "lora", finetune_catalog)
    altered = build_tiny_sd_pipeline()
    with torch.no_grad():
        altered.unet.conv_out.bias.add_(0.5)
    altered.save_pretrained(tmp_path / "tiny", safe_serialization=True)
    stored = {
        LORA_ID: StoredModel(exported_entry(lora_folder), "txt2img-tiny-lora:v1", lora_folder),
        "tiny-sd": StoredModel(load_catalog().get("tiny-sd"), "txt2img-tiny-sd:v1", tmp_path / "tiny"),
    }

    manager = make_manager(stored)  # TXT2IMG_HOME is empty: no catalog file names the LoRA
    lora = manager.pipeline_for(manager.entry(LORA_ID))
    assert manager.loaded_ids() == [LORA_ID]  # its own pipeline, not an adapter on a base
    assert not lora.get_list_adapters()
    adapter = generate(load_pipeline(finetune_catalog.get(LORA_ID), finetune_catalog))
    assert np.abs(generate(lora) - adapter).mean() < 1

    builtin = generate(build_tiny_sd_pipeline())
    assert np.abs(generate(manager.pipeline_for(manager.entry("tiny-sd"))) - builtin).mean() > 1
    assert LORA_ID not in make_manager({}).catalog


def test_a_stored_entry_whose_base_is_unknown_is_left_out_and_said(tmp_path):
    from catalog.schema import CatalogEntry
    from serving.model_store import StoredModel, with_stored_entries

    orphan = CatalogEntry(
        id="orphan", source="finetune", family="tiny", resolution=64, base="gone", method="full", artifact="/nowhere"
    )
    catalog, problems = with_stored_entries(load_catalog(), [StoredModel(orphan, "txt2img-orphan:v1", tmp_path)])
    assert "orphan" not in catalog and "tiny-sd" in catalog
    assert [(problem.entry_id, problem.field) for problem in problems] == [("orphan", "base")]


def run(command: list[str], env: dict[str, str], cwd: Path) -> str:
    result = subprocess.run(command, env=env, cwd=cwd, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"{command} failed:\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}"
    return result.stdout


def copy_of_repository(destination: Path) -> Path:
    ignored = shutil.ignore_patterns(".git", ".venv", "__pycache__", "*.egg-info", ".ruff_cache", "tests", "bench")
    shutil.copytree(REPO_ROOT, destination, ignore=ignored)
    return destination


def decoded(answer: dict) -> np.ndarray:
    data = base64.b64decode(answer["images"][0]["image"])
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.int16)


def test_a_built_bento_serves_a_fine_tune_only_its_store_holds(tmp_path):
    build_home, serve_home = tmp_path / "bentoml-build", tmp_path / "bentoml-serve"
    finetunes = tmp_path / "finetunes"
    register_finetunes(finetunes)
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO_ROOT),
        "BENTOML_HOME": str(build_home),
        "BENTOML_DO_NOT_TRACK": "true",
        "TXT2IMG_HOME": str(finetunes),
        "TXT2IMG_TORCH_THREADS": "1",
    }
    saved = run([sys.executable, "-m", "txt2img", "bento-model", "save", LORA_ID], env, tmp_path)
    assert f"as BentoML model {bento_model_name(LORA_ID)}:" in saved
    assert LORA_ID in run([sys.executable, "-m", "txt2img", "bento-model", "list"], env, tmp_path)

    # Built from a copy, with nothing but the Bento's own files on the path.
    project = copy_of_repository(tmp_path / "project")
    build_env = {**env, "PYTHONPATH": "", "TXT2IMG_BENTO_MODELS": LORA_ID}
    built = run([BENTOML, "build", "-o", "tag"], build_env, project)
    tag = built.strip().splitlines()[-1].removeprefix("__tag__:")
    bento_file = tmp_path / "txt2img.bento"
    run([BENTOML, "export", tag, str(bento_file)], build_env, tmp_path)
    shutil.rmtree(build_home)  # the store the weights came from is gone
    run([BENTOML, "import", str(bento_file)], {**env, "BENTOML_HOME": str(serve_home)}, tmp_path)

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    offline = {"PYTHONPATH": "", "HF_HUB_OFFLINE": "1"}
    settings = {"local_files_only": "1", "torch_threads": "1", "model": LORA_ID}
    with server_process(
        tmp_path / "fresh-home", bentoml_home=serve_home, bento=tag, cwd=elsewhere, env=offline, **settings
    ) as (url, _):
        listing = httpx.get(f"{url}/models", timeout=30).json()
        assert listing["default"] == LORA_ID and LORA_ID in listing["loaded"]
        served = {model["id"]: model for model in listing["models"]}
        assert served[LORA_ID]["bento_model"].startswith(f"{bento_model_name(LORA_ID)}:")
        assert "bento_model" not in served["tiny-sd"]  # not packed: built in code, as ever
        request = {"prompt": PROMPT, "seed": SEED, "num_inference_steps": 2}
        images = {
            model_id: decoded(httpx.post(f"{url}/images", json={**request, "model": model_id}, timeout=120).json())
            for model_id in (LORA_ID, "tiny-sd")
        }
    assert np.abs(images[LORA_ID] - images["tiny-sd"]).mean() > 1

    # The image is the fine-tune's: the same as its adapter on tiny-sd gives here.
    from catalog.pipelines import load_pipeline

    catalog = load_catalog(user_dir=finetunes / "catalog")
    expected = generate(load_pipeline(catalog.get(LORA_ID), catalog))
    assert np.abs(images[LORA_ID] - expected).mean() < 1


def test_packing_a_model_not_in_the_store_stops_with_the_command_to_run(tmp_path):
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO_ROOT),
        "BENTOML_HOME": str(tmp_path / "bentoml"),
        "TXT2IMG_BENTO_MODELS": "nope",
    }
    result = subprocess.run(
        [sys.executable, "-c", "import serving.service"], env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode != 0
    assert "TXT2IMG_BENTO_MODELS names nope, not in BentoML's model store" in result.stderr
    assert "txt2img bento-model save nope" in result.stderr


def test_save_refuses_an_unknown_id_in_one_line_and_list_says_when_the_store_is_empty(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "BENTOML_HOME": str(tmp_path / "bentoml")}

    def cli(*args: str) -> subprocess.CompletedProcess:
        command = [sys.executable, "-m", "txt2img", "bento-model", *args]
        return subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)

    refused = cli("save", "tiny-sdx")
    assert refused.returncode == 2
    assert refused.stderr.startswith("txt2img: error: unknown model id 'tiny-sdx'. Did you mean: tiny-sd?")
    listing = cli("list")
    assert listing.returncode == 0 and listing.stdout == ""
    assert "no catalog model in BentoML's model store" in listing.stderr
