"""Which weights a DreamBooth run trains (the whole UNet, or LoRA adapters; optionally the text
encoder), and how they are saved: mid-run as a checkpoint, at the end as a loadable model."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from catalog.pipelines import LORA_WEIGHT_NAME
from training.hyperparameters import Hyperparameters

# The attention projections diffusers' LoRA loader expects adapters on.
UNET_LORA_TARGETS = ["to_k", "to_q", "to_v", "to_out.0"]
TEXT_ENCODER_LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]


@dataclass
class TrainableModels:
    """The pipeline's modules that receive gradients in this run."""

    method: str
    unet: Any
    text_encoder: Any | None

    def modules(self) -> dict[str, Any]:
        modules = {"unet": self.unet}
        if self.text_encoder is not None:
            modules["text_encoder"] = self.text_encoder
        return modules

    def parameters(self) -> list[Any]:
        return [p for module in self.modules().values() for p in module.parameters() if p.requires_grad]

    def train(self, mode: bool = True) -> None:
        for module in self.modules().values():
            module.train(mode)


def _cast(module: Any, dtype: Any) -> Any:
    # diffusers warns on every dtype cast, even a no-op one; skip those.
    return module if module.dtype == dtype else module.to(dtype=dtype)


def prepare_trainable(pipeline: Any, hyperparameters: Hyperparameters, frozen_dtype: Any) -> TrainableModels:
    """Freeze what stays fixed, add LoRA adapters if asked, and return what trains.

    Frozen weights are cast to ``frozen_dtype`` (fp16/bf16 on a GPU) to save memory; trained
    weights stay fp32 so small updates are not rounded away.
    """
    import torch

    unet, text_encoder, vae = pipeline.unet, pipeline.text_encoder, pipeline.vae
    for module in (unet, text_encoder, vae):
        module.requires_grad_(False)
    _cast(vae, frozen_dtype)
    train_text_encoder = hyperparameters.train_text_encoder
    if not train_text_encoder:
        _cast(text_encoder, frozen_dtype)

    if hyperparameters.method == "lora":
        from peft import LoraConfig

        _cast(unet, frozen_dtype)
        rank = hyperparameters.lora_rank
        # alpha == rank: the adapter's scale is 1, which is what load_lora_weights assumes.
        unet.add_adapter(
            LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian", target_modules=UNET_LORA_TARGETS)
        )
        if train_text_encoder:
            from peft import inject_adapter_in_model

            _cast(text_encoder, frozen_dtype)
            # peft's own injection: transformers' add_adapter refuses every peft release on PyPI today.
            inject_adapter_in_model(
                LoraConfig(
                    r=rank, lora_alpha=rank, init_lora_weights="gaussian", target_modules=TEXT_ENCODER_LORA_TARGETS
                ),
                text_encoder,
            )
        for module in (unet, text_encoder) if train_text_encoder else (unet,):
            for parameter in module.parameters():
                if parameter.requires_grad:
                    parameter.data = parameter.data.to(torch.float32)
    else:
        _cast(unet, torch.float32).requires_grad_(True)
        if train_text_encoder:
            _cast(text_encoder, torch.float32).requires_grad_(True)

    if hyperparameters.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
        if train_text_encoder:
            text_encoder.gradient_checkpointing_enable()
    return TrainableModels(hyperparameters.method, unet, text_encoder if train_text_encoder else None)


def save_trained_model(pipeline: Any, trainable: TrainableModels, directory: Path) -> None:
    """Write the result into ``directory`` (which must not exist yet): a diffusers folder for a
    full fine-tune, ``pytorch_lora_weights.safetensors`` for LoRA. Both use safetensors."""
    import torch

    if trainable.method == "lora":
        from diffusers import StableDiffusionPipeline
        from diffusers.utils import convert_state_dict_to_diffusers
        from peft.utils import get_peft_model_state_dict

        def adapter_tensors(module: Any) -> dict[str, Any]:
            tensors = convert_state_dict_to_diffusers(get_peft_model_state_dict(module))
            return {key: value.detach().to("cpu", torch.float32).contiguous() for key, value in tensors.items()}

        StableDiffusionPipeline.save_lora_weights(
            str(directory),
            unet_lora_layers=adapter_tensors(trainable.unet),
            text_encoder_lora_layers=adapter_tensors(trainable.text_encoder) if trainable.text_encoder else None,
            weight_name=LORA_WEIGHT_NAME,
            safe_serialization=True,
        )
        return
    # A full fine-tune ships in fp32 like its base; the frozen parts may have been cast down.
    for module in (pipeline.unet, pipeline.text_encoder, pipeline.vae):
        _cast(module, torch.float32)
    pipeline.save_pretrained(str(directory), safe_serialization=True)
