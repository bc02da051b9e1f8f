"""Where a pipeline runs and how it is tuned there: fp16 + fast attention + channels_last on CUDA, fp32 on the CPU."""

from __future__ import annotations

import importlib.util
import logging

from serving.settings import ServingSettings

logger = logging.getLogger(__name__)


def visible_gpu_count() -> int:
    """The CUDA GPUs this process may use (CUDA_VISIBLE_DEVICES applies), 0 without CUDA.

    ``torch.cuda.device_count`` asks NVML and leaves CUDA uninitialised, so the ``bentoml serve``
    process can count the GPUs before it starts the workers that use them.
    """
    import torch

    return torch.cuda.device_count()


def serving_gpu_count(settings: ServingSettings) -> int:
    """The GPUs a server's workers share: those visible, unless the settings name a device other than CUDA."""
    return visible_gpu_count() if settings.device in ("auto", "cuda") else 0


def serving_worker_count(settings: ServingSettings) -> int:
    """``workers`` when set, else one worker per GPU the server uses; 1 without a GPU."""
    if settings.workers is not None:
        return settings.workers
    return max(1, serving_gpu_count(settings))


def pick_device(settings: ServingSettings, worker_index: int | None = None) -> str:
    """The device named in the settings, or the best one present; applies ``torch_threads`` on the way.

    On CUDA, server worker ``worker_index`` (BentoML counts from 1) gets GPU ``worker_index - 1``,
    round robin when there are more workers than GPUs; outside a server, GPU 0.
    """
    import torch

    if settings.torch_threads is not None:
        torch.set_num_threads(settings.torch_threads)
    device = settings.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    if device != "cuda":
        return device
    gpu = 0 if worker_index is None else (worker_index - 1) % torch.cuda.device_count()
    # Code that allocates on "cuda" without an index (kernels, compile) lands on this GPU too.
    torch.cuda.set_device(gpu)
    return f"cuda:{gpu}"


def is_cuda(device: str) -> bool:
    return device.startswith("cuda")


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
    if not is_cuda(device):
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

    if not is_cuda(device):
        return None
    return int(torch.cuda.get_device_properties(device).total_memory * 0.8)


def release_device_memory(device: str) -> None:
    """Return freed blocks to the device after a pipeline was dropped."""
    import gc

    import torch

    gc.collect()
    if is_cuda(device):
        torch.cuda.empty_cache()
        logger.info("CUDA memory allocated after eviction: %.2f GiB", torch.cuda.memory_allocated(device) / 2**30)
