"""Where a pipeline runs and how it is tuned there: fp16 + fast attention + channels_last on CUDA, fp32 on the CPU."""

from __future__ import annotations

import importlib.util
import logging

from serving.settings import ServingSettings

logger = logging.getLogger(__name__)


def pick_device(settings: ServingSettings) -> str:
    """The device named in the settings, or the best one present; applies ``torch_threads`` on the way."""
    import torch

    if settings.torch_threads is not None:
        torch.set_num_threads(settings.torch_threads)
    if settings.device != "auto":
        return settings.device
    if torch.cuda.is_available():
        return "cuda"
    if torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def pick_dtype(settings: ServingSettings, device: str):
    """fp16 on accelerators (bf16 on request), fp32 on the CPU where half precision is slow."""
    import torch

    by_name = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
    if settings.dtype != "auto":
        return by_name[settings.dtype]
    return torch.float32 if device == "cpu" else torch.float16


def optimize_for_device(pipeline, device: str, settings: ServingSettings) -> str:
    """Move ``pipeline`` to ``device`` and switch on that device's speed-ups; returns the attention used."""
    import torch

    pipeline.to(device)
    pipeline.set_progress_bar_config(disable=True)
    if device != "cuda":
        return "default"
    attention = settings.attention
    if attention == "auto":
        attention = "xformers" if importlib.util.find_spec("xformers") else "sdpa"
    if attention == "xformers":
        pipeline.enable_xformers_memory_efficient_attention()
    else:
        from diffusers.models.attention_processor import AttnProcessor2_0

        pipeline.unet.set_attn_processor(AttnProcessor2_0())
        pipeline.vae.set_attn_processor(AttnProcessor2_0())
    pipeline.unet.to(memory_format=torch.channels_last)
    pipeline.vae.to(memory_format=torch.channels_last)
    # Tiling only kicks in above the VAE's tile size, so native-size images pay nothing for it.
    pipeline.vae.enable_tiling()
    if settings.compile:
        # Regional compilation compiles each repeated block once: about the same speed, far less compile time.
        pipeline.unet.compile_repeated_blocks(fullgraph=True)
    return attention


def weights_bytes(pipeline) -> int:
    """Bytes held by the parameters and buffers of a pipeline's modules, each module counted once."""
    import torch

    seen: set[int] = set()
    total = 0
    for component in pipeline.components.values():
        if not isinstance(component, torch.nn.Module) or id(component) in seen:
            continue
        seen.add(id(component))
        for tensor in [*component.parameters(), *component.buffers()]:
            total += tensor.numel() * tensor.element_size()
    return total


def default_memory_budget(device: str) -> int | None:
    """80% of the GPU's memory on CUDA; no byte budget elsewhere (the model count still bounds it)."""
    import torch

    if device != "cuda":
        return None
    return int(torch.cuda.get_device_properties(0).total_memory * 0.8)


def release_device_memory(device: str) -> None:
    """Return freed blocks to the device after a pipeline was dropped."""
    import gc

    import torch

    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
        logger.info("CUDA memory allocated after eviction: %.2f GiB", torch.cuda.memory_allocated() / 2**30)
