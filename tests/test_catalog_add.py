"""`txt2img catalog add`: the models people bring, as they bring them (issue #22, item 3).

A single-file checkpoint in AUTOMATIC1111's layout is written from tiny-sd's own weights, added and
generated with; detection reads safetensors headers only, so most cases here are header-only files
whose tensors do not even exist on disk.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import shutil
from pathlib import Path

import httpx
import pytest
import yaml
from a1111_checkpoint import write_a1111_checkpoint
from bentoml_server import offline_server
from header_only import write_header_only
from PIL import Image

from catalog.checkpoint_files import ImportRefused, detect_family, read_header
from catalog.imports import ImportRequest, describe_source
from catalog.tiny_families import build_tiny_sdxl_pipeline
from catalog.tiny_sd import build_tiny_sd_pipeline

OFFLINE = {"HF_HUB_OFFLINE": "1", "TXT2IMG_TORCH_THREADS": "1"}

SD_UNET = {
    "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": [320, 768],
    "model.diffusion_model.out.2.weight": [4, 320, 3, 3],
}
SD_UNET_KEY = next(iter(SD_UNET))
LAYOUTS = {
    "sd1": SD_UNET | {"cond_stage_model.transformer.text_model.embeddings.position_embedding.weight": [77, 768]},
    "sd2": {
        "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": [320, 1024],
        "cond_stage_model.model.transformer.resblocks.0.mlp.c_fc.weight": [4096, 1024],
    },
    "sdxl": {
        "model.diffusion_model.input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight": [640, 2048],
        "conditioner.embedders.0.transformer.text_model.embeddings.position_embedding.weight": [77, 768],
        "conditioner.embedders.1.model.transformer.resblocks.9.mlp.c_proj.bias": [1280],
    },
    "flux": {"double_blocks.0.img_attn.qkv.weight": [9216, 3072], "single_blocks.0.linear1.weight": [21504, 3072]},
    "flux-in-ldm-layout": {"model.diffusion_model.double_blocks.0.img_attn.qkv.weight": [9216, 3072]},
}


@pytest.mark.parametrize(("layout", "family"), [(name, name.split("-")[0]) for name in LAYOUTS])
def test_the_family_comes_from_the_header_alone(tmp_path, layout, family):
    path = write_header_only(tmp_path / "model.safetensors", LAYOUTS[layout])
    assert detect_family(read_header(path), path) == family


def test_tiny_sd_in_a1111_layout_is_the_tiny_family(tmp_path):
    path = write_a1111_checkpoint(build_tiny_sd_pipeline(), tmp_path / "tiny.safetensors")
    tensors = read_header(path)
    assert any(name.startswith("cond_stage_model.transformer.text_model.") for name in tensors)
    assert detect_family(tensors, path) == "tiny"


def test_a_clip_layout_of_another_width_is_refused_naming_it(tmp_path):
    shapes = {**LAYOUTS["sd1"], SD_UNET_KEY: [320, 512]}
    path = write_header_only(tmp_path / "odd.safetensors", shapes)
    with pytest.raises(ImportRefused, match="cross-attention width is 512"):
        detect_family(read_header(path), path)


def _config_folder(folder: Path, width: int, prediction: str) -> Path:
    """The configuration files of an SD-shaped diffusers folder (no weights: detection reads configs)."""
    for sub in ("unet", "vae", "scheduler"):
        (folder / sub).mkdir(parents=True)
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    (folder / "unet" / "config.json").write_text(json.dumps({"cross_attention_dim": width, "sample_size": 64}))
    (folder / "vae" / "config.json").write_text(json.dumps({"block_out_channels": [128, 256, 512, 512]}))
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps({"prediction_type": prediction}))
    return folder


def test_sd2_against_sd2_base_is_decided_by_the_configuration_or_the_user(tmp_path):
    checkpoint = str(write_header_only(tmp_path / "sd2.safetensors", LAYOUTS["sd2"]))
    base = str(_config_folder(tmp_path / "base", 1024, "epsilon"))
    v = str(_config_folder(tmp_path / "v", 1024, "v_prediction"))

    def describe(**options):
        return describe_source(ImportRequest(checkpoint, "x", tmp_path / "x", **options))

    assert (describe(config=base)["family"], describe(config=base)["resolution"]) == ("sd2-base", 512)
    assert describe(config=v)["family"] == "sd2"
    assert describe(config=v, family="sd2-base")["family"] == "sd2-base"
    with pytest.raises(ImportRefused, match="--family sd1 does not fit"):
        describe(config=v, family="sd1")
    sd1_config = str(_config_folder(tmp_path / "sd1", 768, "epsilon"))
    with pytest.raises(ImportRefused, match="is a sd1 pipeline"):
        describe(config=sd1_config)


def _one_line_refusal(result, *phrases: str) -> None:
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr
    for phrase in phrases:
        assert phrase in result.stderr


def _entry(home: Path, name: str) -> dict:
    return yaml.safe_load((home / "catalog" / f"{name}.yaml").read_text())


def _png(run_cli, folder: Path, model: str, prompt: str) -> bytes:
    """The pixels of the PNG `txt2img generate` writes for ``model`` at a fixed seed and 3 steps."""
    out = folder / f"{model}.png"
    run_cli("generate", model, prompt, "--seed", "7", "--steps", "3", "-o", str(out), check_rc=0)
    return Image.open(out).tobytes()  # the pixels: the file's recipe names the model


def test_a1111_checkpoint_added_generates_tiny_sds_image(tmp_path, run_cli, cli_env, txt2img_home):
    """The done-when of the issue: the same weights in AUTOMATIC1111's layout give the same PNG, byte for
    byte (from_single_file maps every tensor back to its own place; nothing is re-quantised)."""
    pipeline = build_tiny_sd_pipeline()
    config = tmp_path / "tiny-sd-config"
    pipeline.save_pretrained(config, safe_serialization=True)
    checkpoint = write_a1111_checkpoint(pipeline, tmp_path / "tinyCivitai_v10.safetensors")
    cli_env.update(OFFLINE, HF_HUB_CACHE=str(tmp_path / "empty-cache"))

    added = run_cli("catalog", "add", str(checkpoint), "--name", "civitai-tiny", "--config", str(config), check_rc=0)
    assert "civitai-tiny (tiny, 64 px)" in added.stdout
    entry = _entry(txt2img_home, "civitai-tiny")
    copy = txt2img_home / "models" / "civitai-tiny" / checkpoint.name
    assert entry["source"] == "imported" and entry["family"] == "tiny" and entry["resolution"] == 64
    assert entry["imported_from"] == str(checkpoint) and entry["config"] == str(copy.parent / "config")
    assert entry["link"] is False and entry["artifact"] == str(copy)
    assert entry["sha256"] == hashlib.sha256(checkpoint.read_bytes()).hexdigest()
    assert copy.read_bytes() == checkpoint.read_bytes()
    shutil.rmtree(config)  # a copy needs neither the file nor the folder it was configured from
    checkpoint.unlink()

    assert _png(run_cli, tmp_path, "civitai-tiny", "a photo of a red dog") == _png(
        run_cli, tmp_path, "tiny-sd", "a photo of a red dog"
    )


def test_added_models_serve_a_checkpoint_as_tiny_sd_and_an_sdxl_folder_as_sdxl(tmp_path, run_cli, txt2img_home):
    pipeline = build_tiny_sd_pipeline()
    pipeline.save_pretrained(tmp_path / "config", safe_serialization=True)
    checkpoint = write_a1111_checkpoint(pipeline, tmp_path / "served.safetensors")
    run_cli("catalog", "add", str(checkpoint), "--name", "served", "--config", str(tmp_path / "config"), check_rc=0)
    build_tiny_sdxl_pipeline().save_pretrained(tmp_path / "sdxl", safe_serialization=True)
    run_cli("catalog", "add", str(tmp_path / "sdxl"), "--name", "my-sdxl", check_rc=0)

    def native(http, model) -> bytes:
        body = {"prompt": "a green boat", "model": model, "seed": 5, "num_inference_steps": 2}
        response = http.post("/txt2img", json=body)
        assert response.status_code == 200, response.text[:300]
        return Image.open(io.BytesIO(response.content)).tobytes()  # the pixels: the PNG's recipe names the model

    def a1111(http, model) -> bytes:
        """The pixels: AUTOMATIC1111's PNGs carry their parameters, the model's name among them. The
        sampler is AUTOMATIC1111's default, not tiny-sd's own, so the copy's scheduler config counts."""
        body = {"prompt": "a green boat", "seed": 5, "steps": 2, "width": 64, "height": 64}
        body["override_settings"] = {"sd_model_checkpoint": model}
        response = http.post("/sdapi/v1/txt2img", json=body)
        assert response.status_code == 200, response.text[:300]
        return Image.open(io.BytesIO(base64.b64decode(response.json()["images"][0]))).tobytes()

    with offline_server(txt2img_home) as url, httpx.Client(base_url=url, timeout=120) as http:
        for route in (native, a1111):
            assert route(http, "served") == route(http, "tiny-sd"), route.__name__
        listed = {model["id"]: model for model in http.get("/models").json()["models"]}
        assert listed["my-sdxl"]["family"] == "sdxl", listed["my-sdxl"]
        assert Image.open(
            io.BytesIO(
                http.post(
                    "/txt2img", json={"prompt": "a boat", "model": "my-sdxl", "seed": 5, "num_inference_steps": 2}
                ).content
            )
        ).size == (64, 64)


def test_a_linked_folder_is_recorded_in_place_and_loads_as_tiny_sd(tmp_path, run_cli, txt2img_home):
    import numpy as np
    import torch

    from catalog.pipelines import load_pipeline
    from catalog.store import load_catalog

    folder = tmp_path / "my-diffusers-model"
    build_tiny_sd_pipeline().save_pretrained(folder, safe_serialization=True)
    run_cli("catalog", "add", str(folder), "--name", "linked", "--link", check_rc=0)
    entry = _entry(txt2img_home, "linked")
    assert (entry["family"], entry["resolution"], entry["link"]) == ("tiny", 64, True)
    assert entry["artifact"] == str(folder) and "sha256" not in entry and "config" not in entry
    assert not (txt2img_home / "models" / "linked").exists()

    catalog = load_catalog()
    loaded = load_pipeline(catalog.get("linked"), catalog)

    def image(pipe):
        generator = torch.Generator().manual_seed(1)
        return pipe("a cat", num_inference_steps=2, generator=generator, output_type="np").images

    assert np.array_equal(image(loaded), image(build_tiny_sd_pipeline()))

    run_cli("catalog", "remove", "linked", "--yes", check_rc=0)
    assert (folder / "model_index.json").is_file()  # the user's own folder stays


def test_a_copied_folder_is_removed_with_its_entry(tmp_path, run_cli, txt2img_home):
    folder = tmp_path / "model"
    build_tiny_sd_pipeline().save_pretrained(folder, safe_serialization=True)
    run_cli("catalog", "add", str(folder), "--name", "copied", check_rc=0)
    copy = txt2img_home / "models" / "copied"
    assert _entry(txt2img_home, "copied")["artifact"] == str(copy) and (copy / "unet").is_dir()
    run_cli("catalog", "remove", "copied", "--yes", check_rc=0)
    assert not copy.exists() and not (txt2img_home / "catalog" / "copied.yaml").exists()
    assert (folder / "unet").is_dir()


def test_a_hub_repo_is_recorded_and_offline_use_is_refused_clearly(tmp_path, run_cli, cli_env, txt2img_home):
    cli_env.update(OFFLINE, HF_HUB_CACHE=str(tmp_path / "empty-cache"))
    refused = run_cli("catalog", "add", "someone/their-model", "--name", "theirs")
    _one_line_refusal(refused, "pass --family", "hf download someone/their-model --include '*.json'")

    linked = run_cli("catalog", "add", "someone/their-model", "--name", "theirs", "--family", "sd1", "--link")
    _one_line_refusal(linked, "--link is for local files and folders")
    configured = run_cli("catalog", "add", "someone/their-model", "--name", "theirs", "--config", str(tmp_path))
    _one_line_refusal(configured, "--config is for a single-file checkpoint")
    run_cli("catalog", "add", "someone/their-model", "--name", "theirs", "--family", "sd1", check_rc=0)
    entry = _entry(txt2img_home, "theirs")
    assert (entry["hf_repo"], entry["family"], entry["resolution"]) == ("someone/their-model", "sd1", 512)
    assert "artifact" not in entry and not (txt2img_home / "models" / "theirs").exists()

    result = run_cli("export", "theirs", str(tmp_path / "out"))
    _one_line_refusal(result, "not in the local Hugging Face cache")


@pytest.mark.parametrize("name", ["model.ckpt", "model.pt", "disguised.safetensors"])
def test_pickled_checkpoints_are_refused_with_the_reason(tmp_path, run_cli, name):
    path = tmp_path / name
    path.write_bytes(b"PK\x03\x04" + b"\0" * 64)  # torch.save's zip archive
    _one_line_refusal(run_cli("catalog", "add", str(path), "--name", "pickled"), "pickled", "arbitrary code")


def test_an_unknown_layout_is_refused_naming_what_was_found(tmp_path, run_cli):
    shapes = {f"encoder.layers.{i}.weight": [8, 8] for i in range(3)} | {"lm_head.weight": [8, 8]}
    path = write_header_only(tmp_path / "llm.safetensors", shapes)
    _one_line_refusal(
        run_cli("catalog", "add", str(path), "--name", "llm"),
        "matches no known family",
        "4 tensors",
        "encoder.layers. (3)",
        "lm_head.weight (1)",
    )


def test_a_lora_file_is_refused_as_a_lora(tmp_path, run_cli):
    path = write_header_only(tmp_path / "style.safetensors", {"lora_unet_down_blocks_0.lora_down.weight": [4, 320]})
    _one_line_refusal(run_cli("catalog", "add", str(path), "--name", "style"), "is a LoRA adapter")


def _cache_repo(cache: Path, repo: str, folder: Path) -> None:
    """Put ``folder`` into the HF cache ``cache`` as the snapshot of ``repo``, as a download would."""
    revision = "0" * 40
    repo_folder = cache / f"models--{repo.replace('/', '--')}"
    shutil.copytree(folder, repo_folder / "snapshots" / revision)
    (repo_folder / "refs").mkdir()
    (repo_folder / "refs" / "main").write_text(revision)


def test_a_missing_configuration_offline_names_what_to_fetch(tmp_path, run_cli, cli_env, txt2img_home):
    cache = tmp_path / "cache"
    cli_env.update(OFFLINE, HF_HUB_CACHE=str(cache))
    path = write_header_only(tmp_path / "dreamy.safetensors", LAYOUTS["sd1"])
    result = run_cli("catalog", "add", str(path), "--name", "dreamy")
    repo = "stable-diffusion-v1-5/stable-diffusion-v1-5"
    _one_line_refusal(result, f"hf download {repo} --include '*.json' --include '*.txt' --include '*.model'")

    _cache_repo(cache, repo, _config_folder(tmp_path / "fetched", 768, "epsilon"))  # what that command fetches
    run_cli("catalog", "add", str(path), "--name", "dreamy", "--link", check_rc=0)
    entry = _entry(txt2img_home, "dreamy")
    assert (entry["family"], entry["resolution"], entry["config"]) == ("sd1", 512, repo)


def test_a_checkpoint_configured_from_a_cached_repo_generates_offline(tmp_path, cli_env, run_cli):
    """The configuration comes from the HF cache, as the family's base repo's would; nothing is downloaded."""
    pipeline = build_tiny_sd_pipeline()
    pipeline.save_pretrained(tmp_path / "tiny", safe_serialization=True)
    cache = tmp_path / "cache"
    _cache_repo(cache, "someone/tiny-sd", tmp_path / "tiny")
    checkpoint = write_a1111_checkpoint(pipeline, tmp_path / "tiny.safetensors")
    cli_env.update(OFFLINE, HF_HUB_CACHE=str(cache))
    run_cli("catalog", "add", str(checkpoint), "--name", "tiny-file", "--config", "someone/tiny-sd", check_rc=0)

    assert _png(run_cli, tmp_path, "tiny-file", "a blue car") == _png(run_cli, tmp_path, "tiny-sd", "a blue car")


def test_a_taken_or_invalid_name_is_refused_before_any_copy(tmp_path, run_cli, txt2img_home):
    folder = tmp_path / "model"
    build_tiny_sd_pipeline().save_pretrained(folder, safe_serialization=True)
    _one_line_refusal(run_cli("catalog", "add", str(folder), "--name", "tiny-sd"), "'tiny-sd' already exists")
    _one_line_refusal(run_cli("catalog", "add", str(folder), "--name", "My Model"), "invalid model name")
    (txt2img_home / "models" / "trained").mkdir(parents=True)  # a training run's folder holds the name too
    _one_line_refusal(run_cli("catalog", "add", str(folder), "--name", "trained"), "already exists")
    assert sorted(p.name for p in (txt2img_home / "models").iterdir()) == ["trained"]
    assert not list(txt2img_home.glob("catalog/*.yaml"))
