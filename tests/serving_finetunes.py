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


UNET_ATTENTION = ("to_q", "to_k", "to_v", "to_out.0")


def save_lora_adapter(
    folder: Path,
    text_encoder: bool = False,
    seed: int = 1,
    *,
    rank: int = 4,
    alpha: int | None = None,
    unet_targets: tuple[str, ...] = UNET_ATTENTION,
) -> Path:
    """A LoRA of ``rank`` (alpha: ``alpha``, else the rank) on tiny-sd's UNet modules ``unet_targets`` (its
    attention, unless told) and, with ``text_encoder``, its text encoder's attention, with random (not zero)
    weights drawn from ``seed`` so it changes the images."""
    import torch
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig, inject_adapter_in_model
    from peft.utils import get_peft_model_state_dict

    from catalog.tiny_sd import build_tiny_sd_pipeline

    pipeline = build_tiny_sd_pipeline()
    modules = {"unet": (pipeline.unet, list(unet_targets))}
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


SUBJECT_LORA_ID = "tiny-subject-lora"
STYLE_LORA_ID = "tiny-style-lora"
FULL_LORA_ID = "tiny-full-lora"  # a LoRA of tiny-full, not of tiny-sd


def train_composable_loras(home: Path) -> None:
    """Two LoRAs trained by ``txt2img train`` on tiny-sd (a subject and a style, a few steps at a high
    rate so that each changes the images), and a LoRA of the full fine-tune tiny-full, under ``home``,
    which must hold ``register_finetunes``' models."""
    import os

    import torch
    from subject_dataset import write_dataset

    from training.dreambooth import train
    from training.hyperparameters import Hyperparameters

    previous_home, previous_threads = os.environ.get("TXT2IMG_HOME"), torch.get_num_threads()
    os.environ["TXT2IMG_HOME"] = str(home)
    torch.set_num_threads(1)
    try:
        for index, lora_id in enumerate((SUBJECT_LORA_ID, STYLE_LORA_ID)):
            data = write_dataset(home / "data" / lora_id, count=3 + index)
            hyperparameters = Hyperparameters(
                method="lora", lora_rank=4, max_steps=4, learning_rate=5e-2, seed=index, validation_prompts=[]
            )
            train(data, "tiny-sd", lora_id, hyperparameters, progress=False)
    finally:
        torch.set_num_threads(previous_threads)
        if previous_home is None:
            os.environ.pop("TXT2IMG_HOME")
        else:
            os.environ["TXT2IMG_HOME"] = previous_home
    adapter = save_lora_adapter(home / "models" / FULL_LORA_ID, seed=3)
    entry = CatalogEntry(
        id=FULL_LORA_ID,
        source="finetune",
        family="tiny",
        resolution=64,
        base=FULL_ID,
        method="lora",
        artifact=str(adapter),
    )
    write_entry(entry, user_dir=home / "catalog")


def write_random_loras(home: Path, count: int, rank: int = 64) -> list[str]:
    """``count`` LoRAs of tiny-sd with random weights (rank ``rank`` on every UNet attention projection, in
    the diffusers key layout catalog/lora_files.py reads), registered in ``home``'s catalog; their ids."""
    import torch
    from safetensors.torch import save_file

    from catalog.pipelines import LORA_WEIGHT_NAME
    from catalog.tiny_sd import build_tiny_sd_components

    unet = build_tiny_sd_components()["unet"]
    layers = {
        name: module
        for name, module in unet.named_modules()
        if isinstance(module, torch.nn.Linear)
        and name.rsplit(".", 1)[-1] in ("to_q", "to_k", "to_v", "0")
        and ".attn" in name
    }
    ids = []
    for index in range(count):
        generator = torch.Generator().manual_seed(100 + index)
        tensors = {}
        for name, layer in layers.items():
            tensors[f"unet.{name}.lora.down.weight"] = torch.randn(rank, layer.in_features, generator=generator) * 0.01
            tensors[f"unet.{name}.lora.up.weight"] = torch.randn(layer.out_features, rank, generator=generator) * 0.01
        lora_id = f"tiny-random-lora-{index:02d}"
        folder = home / "models" / lora_id
        folder.mkdir(parents=True)
        save_file(tensors, str(folder / LORA_WEIGHT_NAME))
        common = {"source": "finetune", "family": "tiny", "resolution": 64, "base": "tiny-sd", "method": "lora"}
        write_entry(CatalogEntry(id=lora_id, artifact=str(folder), **common), user_dir=home / "catalog")
        ids.append(lora_id)
    return ids
