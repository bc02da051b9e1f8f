"""LoRA files in and out (issue 23, items 6 and 7): `txt2img export NAME --format a1111` writes kohya's
layout, `txt2img catalog add FILE --name NAME --base ID` imports kohya and diffusers files, and the
round trip gives the same images. The refusals are judged from safetensors headers alone."""

from __future__ import annotations

import hashlib
import io
from pathlib import Path

import httpx
import pytest
import yaml
from bentoml_server import offline_server
from header_only import write_header_only
from PIL import Image
from safetensors import safe_open
from serving_finetunes import save_lora_adapter

from catalog.checkpoint_files import ImportRefused
from catalog.schema import CatalogEntry
from catalog.store import write_entry

TINY_TO_K = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k"
TINY_TO_Q = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q"
TEXT_FC1 = "lora_te_text_model_encoder_layers_4_mlp_fc1"


def _kohya_layer(module: str, down: list[int], up: list[int]) -> dict[str, list[int]]:
    return {f"{module}.lora_down.weight": down, f"{module}.lora_up.weight": up, f"{module}.alpha": []}


# tiny-sd's cross-attention to_k takes text of width 32 and gives 64; its self-attention to_q 64 -> 64.
FITTING = _kohya_layer(TINY_TO_K, [4, 32], [64, 4]) | _kohya_layer(TINY_TO_Q, [4, 64], [64, 4])


def _refused(result, *phrases: str) -> None:
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr
    for phrase in phrases:
        assert phrase in result.stderr, result.stderr


def _png(run_cli, folder: Path, model: str) -> bytes:
    out = folder / f"{model}.png"
    run_cli("generate", model, "a photo of a red dog", "--seed", "7", "--steps", "2", "-o", str(out), check_rc=0)
    return Image.open(out).tobytes()  # the pixels: the file's recipe names the model


def _register_lora(home: Path, name: str, folder: Path) -> None:
    entry = CatalogEntry(
        id=name, source="finetune", family="tiny", resolution=64, base="tiny-sd", method="lora", artifact=str(folder)
    )
    write_entry(entry, user_dir=home / "catalog")


def test_a_lora_exported_for_a1111_and_imported_back_gives_the_same_images(tmp_path, run_cli, txt2img_home):
    _register_lora(txt2img_home, "styled", save_lora_adapter(tmp_path / "styled", text_encoder=True))
    exported = tmp_path / "styled_a1111.safetensors"
    run_cli("export", "styled", str(exported), "--format", "a1111", check_rc=0)

    with safe_open(str(exported), "pt") as tensors:
        keys = list(tensors.keys())
        alphas = {key: tensors.get_tensor(key).item() for key in keys if key.endswith(".alpha")}
    modules = {key.split(".")[0] for key in keys}
    assert all(key.startswith(("lora_unet_", "lora_te_text_model_")) for key in keys), keys[:5]
    assert any(key.startswith("lora_te_") for key in keys) and TINY_TO_K + ".lora_down.weight" in keys
    assert {
        f"{module}.{part}" for module in modules for part in ("lora_down.weight", "lora_up.weight", "alpha")
    } == set(keys)
    assert set(alphas.values()) == {4.0}  # rank 4, alpha 4: the scale diffusers trained and loads with

    added = run_cli("catalog", "add", str(exported), "--name", "styled-back", "--base", "tiny-sd", check_rc=0)
    assert "styled-back (LoRA of tiny-sd, tiny, 64 px)" in added.stdout
    entry = yaml.safe_load((txt2img_home / "catalog" / "styled-back.yaml").read_text())
    copy = txt2img_home / "models" / "styled-back" / exported.name
    assert (entry["source"], entry["method"], entry["base"], entry["family"]) == ("imported", "lora", "tiny-sd", "tiny")
    assert entry["artifact"] == str(copy) and entry["sha256"] == hashlib.sha256(exported.read_bytes()).hexdigest()
    exported.unlink()  # the copy in TXT2IMG_HOME is what serves

    original = _png(run_cli, tmp_path, "styled")
    assert _png(run_cli, tmp_path, "styled-back") == original
    assert _png(run_cli, tmp_path, "tiny-sd") != original


def test_a_diffusers_lora_file_imports_and_generates_and_serves_as_its_fine_tune(tmp_path, run_cli, txt2img_home):
    folder = save_lora_adapter(tmp_path / "adapter")
    _register_lora(txt2img_home, "trained", folder)
    weights = folder / "pytorch_lora_weights.safetensors"
    run_cli("catalog", "add", str(weights), "--name", "brought", "--base", "tiny-sd", check_rc=0)
    assert _png(run_cli, tmp_path, "brought") == _png(run_cli, tmp_path, "trained")

    def served(http, model) -> bytes:
        body = {"prompt": "a green boat", "model": model, "seed": 5, "num_inference_steps": 2}
        response = http.post("/txt2img", json=body)
        assert response.status_code == 200, response.text[:300]
        return Image.open(io.BytesIO(response.content)).tobytes()  # the pixels: the PNG's recipe names the model

    with offline_server(txt2img_home) as url, httpx.Client(base_url=url, timeout=120) as http:
        assert served(http, "brought") == served(http, "trained") != served(http, "tiny-sd")


def test_a_header_that_fits_the_base_is_described_as_its_lora(tmp_path, txt2img_home):
    from catalog.imports import ImportRequest, describe_source

    path = write_header_only(tmp_path / "fits.safetensors", FITTING)
    fields = describe_source(ImportRequest(str(path), "fits", tmp_path / "fits", base="tiny-sd"))
    assert fields == {
        "family": "tiny",
        "resolution": 64,
        "imported_from": str(path),
        "base": "tiny-sd",
        "method": "lora",
    }


def test_keys_that_match_no_module_of_the_base_are_refused_with_count_and_examples(tmp_path, run_cli):
    strays = _kohya_layer("lora_unet_mid_block_attentions_9_proj_in", [4, 64], [64, 4])
    path = write_header_only(tmp_path / "partial.safetensors", FITTING | strays)
    result = run_cli("catalog", "add", str(path), "--name", "partial", "--base", "tiny-sd")
    _refused(result, "3 of its 9 keys match no module of the base 'tiny-sd'", "lora_unet_mid_block_attentions_9")


def test_a_shape_that_does_not_fit_the_base_is_refused_naming_the_layer(tmp_path, run_cli):
    shapes = FITTING | {f"{TINY_TO_Q}.lora_up.weight": [80, 4]}
    path = write_header_only(tmp_path / "wide.safetensors", shapes)
    result = run_cli("catalog", "add", str(path), "--name", "wide", "--base", "tiny-sd")
    _refused(result, f"layer {TINY_TO_Q}.lora_up.weight has shape [80, 4]", "weight [64, 64]")


def test_a_lora_of_another_family_is_refused_naming_both(tmp_path, run_cli):
    path = write_header_only(tmp_path / "sd15.safetensors", _kohya_layer(TINY_TO_K, [4, 768], [320, 4]))
    result = run_cli("catalog", "add", str(path), "--name", "sd15", "--base", "tiny-sd")
    _refused(result, "is a LoRA for sd1 models, but the base 'tiny-sd' is tiny")


@pytest.mark.parametrize(
    ("name", "options", "phrase"),
    [
        ("style.ckpt", ["--base", "tiny-sd"], "arbitrary code"),
        ("style.safetensors", [], "pass --base ID"),
        ("style.safetensors", ["--base", "tiny-sd", "--family", "tiny"], "drop --family and --config"),
        ("style.safetensors", ["--base", "no-such-model"], "no-such-model"),
    ],
)
def test_lora_imports_are_refused_in_one_line(tmp_path, run_cli, txt2img_home, name, options, phrase):
    path = tmp_path / name
    if name.endswith(".ckpt"):
        path.write_bytes(b"PK\x03\x04" + b"\0" * 64)  # torch.save's zip archive
    else:
        write_header_only(path, FITTING)
    _refused(run_cli("catalog", "add", str(path), "--name", "style", *options), phrase)
    assert not list(txt2img_home.glob("catalog/*.yaml")) and not (txt2img_home / "models").exists()


def test_a1111_export_of_a_model_that_is_no_lora_is_refused(tmp_path, run_cli):
    _refused(run_cli("export", "tiny-sd", "--format", "a1111"), "'tiny-sd' is not a LoRA")


def test_a_base_in_a_diffusers_folder_is_checked_from_its_configuration(tmp_path, txt2img_home):
    """The base's modules come from its configs on the meta device: the folder's weights may be absent."""
    from catalog.imports import ImportRequest, describe_source
    from catalog.tiny_sd import build_tiny_sd_pipeline

    folder = tmp_path / "full"
    build_tiny_sd_pipeline().save_pretrained(folder, safe_serialization=True)
    for weights in folder.rglob("*.safetensors"):
        weights.unlink()
    entry = CatalogEntry(
        id="full", source="finetune", family="tiny", resolution=64, base="tiny-sd", method="full", artifact=str(folder)
    )
    write_entry(entry, user_dir=txt2img_home / "catalog")
    text_layer = _kohya_layer(TEXT_FC1, [4, 32], [37, 4])  # tiny-sd's CLIP MLP: 32 -> 37
    path = write_header_only(tmp_path / "fits.safetensors", FITTING | text_layer)
    assert describe_source(ImportRequest(str(path), "fits", tmp_path / "fits", base="full"))["base"] == "full"

    bad = write_header_only(
        tmp_path / "bad.safetensors", FITTING | text_layer | {f"{TEXT_FC1}.lora_up.weight": [36, 4]}
    )
    with pytest.raises(ImportRefused, match=f"layer {TEXT_FC1}.lora_up.weight has shape"):
        describe_source(ImportRequest(str(bad), "bad", tmp_path / "bad", base="full"))
