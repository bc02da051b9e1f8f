"""Sharding a full fine-tune across processes (``sharding=fsdp``): PyTorch's FSDP2
(``torch.distributed.fsdp.fully_shard``) through accelerate.

Under plain DDP every process holds the whole UNet, its gradients and AdamW's two moments. Under
FSDP each process keeps 1/N of each (every ``_no_split_modules`` block of the UNet is its own unit,
gathered just in time for its forward and backward pass), so parameter and optimizer memory per
process falls by about N. Checkpoints hold each process's shards (torch.distributed.checkpoint,
through ``Accelerator.save_state``); the finished model is the full UNet, gathered for rank 0.
"""

from __future__ import annotations

import os
from typing import Any

from training.hyperparameters import Hyperparameters
from txt2img.errors import InputError

MIB = 1024**2


class ShardingSetupError(InputError, ValueError):
    """Sharding cannot work in this run as launched; nothing was done."""


def fsdp_plugin(hyperparameters: Hyperparameters) -> Any:
    """accelerate's FSDP2 settings for this run, or None without sharding."""
    if hyperparameters.sharding != "fsdp":
        return None
    from accelerate.utils import FullyShardedDataParallelPlugin

    return FullyShardedDataParallelPlugin(
        fsdp_version=2,
        # Each UNet block (its ``_no_split_modules``) is gathered alone, so no process ever holds the whole UNet.
        auto_wrap_policy="transformer_based_wrap",
        reshard_after_forward=True,
        # Each process saves and loads its own shards: no process ever gathers the optimizer state.
        state_dict_type="SHARDED_STATE_DICT",
    )


def check_sharding(hyperparameters: Hyperparameters, processes: int) -> None:
    """Refuse sharding where it cannot help or cannot checkpoint, before any work."""
    if hyperparameters.sharding != "fsdp":
        return
    if hyperparameters.method == "lora":
        raise ShardingSetupError(
            "sharding=fsdp splits a full fine-tune; LoRA's adapters fit every process (sharding=none)"
        )
    if hyperparameters.train_text_encoder:
        raise ShardingSetupError("sharding=fsdp splits the UNet alone; set train_text_encoder=false or sharding=none")
    if processes < 2:
        raise ShardingSetupError(
            "sharding=fsdp splits the model across processes; train with --processes 2 or more, or sharding=none"
        )
    if int(os.environ.get("LOCAL_WORLD_SIZE", processes)) != processes:
        # Each process writes its shards into the checkpoint folder on its own machine's disk.
        raise ShardingSetupError(
            "sharding=fsdp trains on one machine (its checkpoint shards are written to one disk); "
            "use one instance, or sharding=none"
        )


def shard_on_cpu(accelerator: Any, plugin: Any) -> None:
    """Let accelerate run FSDP on CPU processes (gloo), which torch's FSDP2 supports.

    accelerate 1.16 takes an ``fsdp_plugin`` only for accelerator devices and otherwise silently
    trains with DDP. This sets the distributed type its GPU path sets, in both places it keeps it.
    """
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType

    if accelerator.distributed_type == DistributedType.FSDP:
        return  # on GPUs accelerate took the plugin itself
    if accelerator.mixed_precision != "no":
        plugin.set_mixed_precision(accelerator.mixed_precision)
    accelerator.state.fsdp_plugin = plugin
    accelerator.state.distributed_type = DistributedType.FSDP
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP


def full_module(accelerator: Any, module: Any) -> Any:
    """The whole of a sharded ``module`` as a plain module on rank 0 (every process must call this;
    the others get None), for saving and drawing validation images as without sharding."""
    import torch
    from torch.distributed.fsdp import FSDPModule

    state = accelerator.get_state_dict(module, unwrap=False)  # gathered on rank 0 only, in CPU memory
    if not accelerator.is_main_process:
        return None
    # fully_shard turned the module's class into a subclass of FSDPModule and of its own class.
    own_class = next(cls for cls in type(module).__mro__ if not issubclass(cls, FSDPModule))
    with torch.device("meta"):  # no second copy of the weights: the gathered tensors become the module's
        plain = own_class.from_config(module.config)
    plain.load_state_dict(state, assign=True)
    return plain.to(accelerator.device)


def local_state_bytes(modules: list[Any], optimizer: Any) -> int:
    """Bytes of trained parameters and optimizer state this process holds: a shard's local part
    when sharded, the whole tensor otherwise (gradients are freed after each step)."""
    import torch

    def local(tensor: Any) -> int:
        part = tensor.to_local() if hasattr(tensor, "to_local") else tensor
        return part.numel() * part.element_size()

    parameters = sum(local(p) for module in modules for p in module.parameters() if p.requires_grad)
    tensors = [value for state in optimizer.state.values() for value in state.values()]
    states = sum(local(value) for value in tensors if isinstance(value, torch.Tensor))
    return parameters + states
