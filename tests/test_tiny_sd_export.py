"""The built-in demo model and `txt2img export`."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from serving_finetunes import save_lora_adapter

from catalog.pipelines import ModelLoadError, export_model, load_pipeline
from catalog.schema import CatalogEntry
from catalog.store import load_catalog, write_entry
from catalog.tiny_sd import build_tiny_sd_pipeline


def generate(pipeline, seed: int, steps: int = 2) -> np.ndarray:
    return pipeline(
        "a photo of sks dog",
        num_inference_steps=steps,
        height=64,
        width=64,
        generator=torch.Generator("cpu").manual_seed(seed),
        output_type="np",
    ).images[0]


def test_tiny_sd_builds_deterministically():
    first, second = build_tiny_sd_pipeline(), build_tiny_sd_pipeline()
    for name in ("unet", "vae", "text_encoder"):
        a, b = getattr(first, name).state_dict(), getattr(second, name).state_dict()
        assert all(torch.equal(a[key], b[key]) for key in a)


def test_tiny_sd_reads_prompt_words_as_whole_tokens_and_spells_the_rest():
    tokenizer = build_tiny_sd_pipeline().tokenizer
    assert tokenizer.tokenize("A photo of sks red toy") == [f"{word}</w>" for word in "a photo of sks red toy".split()]
    assert tokenizer.tokenize("quokka") == ["q", "u", "o", "k", "k", "a</w>"]
    assert tokenizer.tokenize("unto") == ["u", "n", "to</w>"]  # a listed word's ending is a token too


def test_tiny_sd_leaves_the_global_rng_alone():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    build_tiny_sd_pipeline()
    assert torch.equal(torch.rand(3), expected)


def test_two_step_generation_is_seed_deterministic():
    pipeline = build_tiny_sd_pipeline()
    image = generate(pipeline, seed=1)
    assert image.shape == (64, 64, 3)
    assert np.array_equal(image, generate(pipeline, seed=1))
    assert not np.array_equal(image, generate(pipeline, seed=2))


def test_export_round_trips_through_from_pretrained(tmp_path, run_cli):
    from diffusers import DiffusionPipeline

    target = tmp_path / "tiny-export"
    result = run_cli("export", "tiny-sd", str(target), check_rc=0)
    assert str(target) in result.stdout
    assert (target / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    assert not list(target.rglob("*.bin"))
    reloaded = DiffusionPipeline.from_pretrained(target, local_files_only=True)
    assert np.array_equal(generate(reloaded, seed=3), generate(build_tiny_sd_pipeline(), seed=3))


def test_an_exported_copy_samples_like_the_built_in_model_under_another_scheduler(tmp_path, run_cli):
    """A scheduler built from the built-in config takes its own defaults for the settings tiny-sd left
    unset, where a saved config states them: tiny-sd states them, so both agree under any sampler."""
    from diffusers import DiffusionPipeline, EulerDiscreteScheduler

    target = tmp_path / "tiny-export"
    run_cli("export", "tiny-sd", str(target), check_rc=0)
    built_in, reloaded = build_tiny_sd_pipeline(), DiffusionPipeline.from_pretrained(target, local_files_only=True)
    for pipeline in (built_in, reloaded):
        pipeline.scheduler = EulerDiscreteScheduler.from_config(pipeline.scheduler.config)
    assert np.array_equal(generate(reloaded, seed=3), generate(built_in, seed=3))


def test_export_refuses_a_non_empty_directory_and_unknown_ids(tmp_path, run_cli):
    (tmp_path / "keep.txt").write_text("precious")
    result = run_cli("export", "tiny-sd", str(tmp_path))
    assert result.returncode == 2 and "not an empty directory" in result.stderr
    assert (tmp_path / "keep.txt").read_text() == "precious"
    result = run_cli("export", "tiny-s", str(tmp_path / "new"))
    assert result.returncode == 2 and "Did you mean: tiny-sd" in result.stderr


def make_lora_finetune(tmp_path) -> CatalogEntry:
    """A tiny LoRA on tiny-sd with non-zero weights, registered as a user fine-tune."""
    entry = CatalogEntry(
        id="tiny-lora",
        source="finetune",
        family="tiny",
        resolution=64,
        base="tiny-sd",
        method="lora",
        artifact=str(save_lora_adapter(tmp_path / "lora")),
    )
    write_entry(entry)
    return entry


def test_export_fuses_a_lora_into_its_base(tmp_path):
    from diffusers import DiffusionPipeline

    entry = make_lora_finetune(tmp_path)
    catalog = load_catalog()
    with_adapter = generate(load_pipeline(entry, catalog), seed=4)
    assert not np.allclose(with_adapter, generate(build_tiny_sd_pipeline(), seed=4), atol=1e-3)

    exported = export_model("tiny-lora", tmp_path / "fused", catalog)
    fused = DiffusionPipeline.from_pretrained(exported, local_files_only=True)
    assert np.allclose(generate(fused, seed=4), with_adapter, atol=1e-4)


def test_missing_artifact_is_a_clear_error(tmp_path):
    entry = CatalogEntry(
        id="gone",
        source="finetune",
        family="tiny",
        resolution=64,
        base="tiny-sd",
        method="full",
        artifact=str(tmp_path / "deleted"),
    )
    write_entry(entry)
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_pipeline(entry, load_catalog())


def test_export_of_a_hub_model_reads_the_local_hf_cache(tmp_path, cli_env, run_cli):
    """A JumpStart id whose repo sits in the HF cache exports offline, with no download."""
    from diffusers import DiffusionPipeline

    entry = load_catalog().get("model-txt2img-stabilityai-stable-diffusion-v2-1-base")
    cache = tmp_path / "hf-cache"
    repo_folder = cache / f"models--{entry.hf_repo.replace('/', '--')}"
    revision = "0123456789abcdef0123456789abcdef01234567"
    build_tiny_sd_pipeline().save_pretrained(repo_folder / "snapshots" / revision, safe_serialization=True)
    (repo_folder / "refs").mkdir()
    (repo_folder / "refs" / "main").write_text(revision)
    cli_env.update(HF_HUB_CACHE=str(cache), HF_HUB_OFFLINE="1")

    run_cli("export", entry.id, str(tmp_path / "sd21"), check_rc=0)
    reloaded = DiffusionPipeline.from_pretrained(tmp_path / "sd21", local_files_only=True)
    assert np.array_equal(generate(reloaded, seed=5), generate(build_tiny_sd_pipeline(), seed=5))


def test_a_hub_model_missing_from_the_cache_fails_clearly(tmp_path, cli_env, run_cli):
    cli_env.update(HF_HUB_CACHE=str(tmp_path / "empty-cache"), HF_HUB_OFFLINE="1")
    result = run_cli("export", "huggingface-txt2img-nitrosocke-ghibli-diffusion", str(tmp_path / "out"))
    assert result.returncode == 2
    assert "not in the local Hugging Face cache" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()
