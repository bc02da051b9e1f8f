"""Tiny fine-tunes of tiny-sd for the serving tests: a full copy saved to disk, and a LoRA adapter made with peft."""

from __future__ import annotations

from pathlib import Path

from catalog.schema import CatalogEntry
from catalog.store import write_entry

FULL_ID = "tiny-full"
OTHER_FULL_ID = "tiny-full-copy"
LORA_ID = "tiny-lora"


def save_full_finetune(folder: Path) -> Path:
    from catalog.tiny_sd import build_tiny_sd_pipeline

    build_tiny_sd_pipeline().save_pretrained(folder, safe_serialization=True)
    return folder


def save_lora_adapter(
    folder: Path, text_encoder: bool = False, *, rank: int = 4, alpha: int | None = None, seed: int = 1
) -> Path:
    """A LoRA of ``rank`` (alpha: ``alpha``, else the rank) on tiny-sd's UNet attention (and, with
    ``text_encoder``, its text encoder's), with random (not zero) weights drawn from ``seed`` so it changes
    the images."""
    import torch
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig, inject_adapter_in_model
    from peft.utils import get_peft_model_state_dict

    from catalog.tiny_sd import build_tiny_sd_pipeline

    pipeline = build_tiny_sd_pipeline()
    modules = {"unet": (pipeline.unet, ["to_q", "to_k", "to_v", "to_out.0"])}
    if text_encoder:
        modules["text_encoder"] = (pipeline.text_encoder, ["q_proj", "k_proj", "v_proj", "out_proj"])
    generator = torch.Generator().manual_seed(seed)
    layers = {}
    for name, (module, targets) in modules.items():
        # peft's own injection: transformers' add_adapter on the text encoder wants a newer peft.
        inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=alpha or rank, target_modules=targets), module)
        with torch.no_grad():
            for parameter_name, parameter in module.named_parameters():
                if "lora_B" in parameter_name:
                    parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.5)
        layers[f"{name}_lora_layers"] = convert_state_dict_to_diffusers(get_peft_model_state_dict(module))
    StableDiffusionPipeline.save_lora_weights(folder, **layers, safe_serialization=True)
    return folder


def tiny_lora_entry(lora_id: str, folder: Path) -> CatalogEntry:
    """The catalog entry of a LoRA of tiny-sd saved in ``folder`` (``save_lora_adapter``)."""
    return CatalogEntry(
        id=lora_id, source="finetune", family="tiny", resolution=64, base="tiny-sd", method="lora", artifact=str(folder)
    )


def register_finetunes(home: Path) -> None:
    """Save the fine-tunes under ``home``/models and add them to the user catalog of txt2img home ``home``."""
    root = home / "models"
    catalog_dir = home / "catalog"
    full = save_full_finetune(root / FULL_ID)
    lora = save_lora_adapter(root / LORA_ID)
    common = {"source": "finetune", "family": "tiny", "resolution": 64, "base": "tiny-sd"}
    write_entry(CatalogEntry(id=FULL_ID, method="full", artifact=str(full), **common), user_dir=catalog_dir)
    write_entry(CatalogEntry(id=OTHER_FULL_ID, method="full", artifact=str(full), **common), user_dir=catalog_dir)
    write_entry(CatalogEntry(id=LORA_ID, method="lora", artifact=str(lora), **common), user_dir=catalog_dir)
