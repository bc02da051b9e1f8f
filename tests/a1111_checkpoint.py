"""Write a Stable Diffusion 1.x-shaped diffusers pipeline as one AUTOMATIC1111 (LDM) ``.safetensors``.

The inverse of what diffusers' ``from_single_file`` reads, written out for any number of blocks
and layers per block (diffusers' own script assumes SD 1.5's four), so that ``tiny-sd`` can stand
for a checkpoint downloaded from Civitai: ``model.diffusion_model.*`` (the UNet),
``first_stage_model.*`` (the VAE) and ``cond_stage_model.transformer.*`` (the CLIP text encoder).
"""

from __future__ import annotations

from pathlib import Path

UNET_RESNET_NAMES = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
VAE_RESNET_NAMES = {"conv_shortcut": "nin_shortcut"}
VAE_ATTENTION_NAMES = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def _renamed(state: dict, old_prefix: str, new_prefix: str, names: dict[str, str] | None = None) -> dict:
    """The tensors of ``state`` under ``old_prefix``, moved under ``new_prefix`` with their leading
    sub-module renamed by ``names``."""
    moved = {}
    for key, tensor in state.items():
        if not key.startswith(old_prefix + "."):
            continue
        rest = key[len(old_prefix) + 1 :]
        for old, new in (names or {}).items():
            if rest.startswith(old + "."):
                rest = new + rest[len(old) :]
                break
        moved[f"{new_prefix}.{rest}"] = tensor
    return moved


def unet_state_in_ldm_layout(unet) -> dict:
    state = unet.state_dict()
    per_block = unet.config.layers_per_block
    blocks = len(unet.config.block_out_channels)
    ldm = {}
    for old, new in {
        "time_embedding.linear_1": "time_embed.0",
        "time_embedding.linear_2": "time_embed.2",
        "conv_in": "input_blocks.0.0",
        "conv_norm_out": "out.0",
        "conv_out": "out.2",
        "mid_block.resnets.0": "middle_block.0",
        "mid_block.attentions.0": "middle_block.1",
        "mid_block.resnets.1": "middle_block.2",
    }.items():
        ldm |= _renamed(state, old, new, UNET_RESNET_NAMES if "resnets" in old else None)
    for block in range(blocks):
        for layer in range(per_block):
            index = 1 + block * (per_block + 1) + layer
            ldm |= _renamed(state, f"down_blocks.{block}.resnets.{layer}", f"input_blocks.{index}.0", UNET_RESNET_NAMES)
            ldm |= _renamed(state, f"down_blocks.{block}.attentions.{layer}", f"input_blocks.{index}.1")
        ldm |= _renamed(
            state, f"down_blocks.{block}.downsamplers.0.conv", f"input_blocks.{(block + 1) * (per_block + 1)}.0.op"
        )
        for layer in range(per_block + 1):
            index = block * (per_block + 1) + layer
            ldm |= _renamed(state, f"up_blocks.{block}.resnets.{layer}", f"output_blocks.{index}.0", UNET_RESNET_NAMES)
            ldm |= _renamed(state, f"up_blocks.{block}.attentions.{layer}", f"output_blocks.{index}.1")
        last = block * (per_block + 1) + per_block
        upsampler_slot = 2 if f"up_blocks.{block}.attentions.0.proj_in.weight" in state else 1
        ldm |= _renamed(state, f"up_blocks.{block}.upsamplers.0.conv", f"output_blocks.{last}.{upsampler_slot}.conv")
    assert len(ldm) == len(state), "a UNet tensor has no LDM name"
    return {f"model.diffusion_model.{key}": tensor for key, tensor in ldm.items()}


def vae_state_in_ldm_layout(vae) -> dict:
    state = vae.state_dict()
    blocks = len(vae.config.block_out_channels)
    ldm = {}
    for part in ("encoder", "decoder"):
        for old, new in {"conv_in": "conv_in", "conv_norm_out": "norm_out", "conv_out": "conv_out"}.items():
            ldm |= _renamed(state, f"{part}.{old}", f"{part}.{new}")
        ldm |= _renamed(state, f"{part}.mid_block.resnets.0", f"{part}.mid.block_1", VAE_RESNET_NAMES)
        ldm |= _renamed(state, f"{part}.mid_block.resnets.1", f"{part}.mid.block_2", VAE_RESNET_NAMES)
        ldm |= _renamed(state, f"{part}.mid_block.attentions.0", f"{part}.mid.attn_1", VAE_ATTENTION_NAMES)
    for block in range(blocks):
        ldm |= _renamed(state, f"encoder.down_blocks.{block}.resnets", f"encoder.down.{block}.block", None)
        ldm |= _renamed(
            state, f"encoder.down_blocks.{block}.downsamplers.0.conv", f"encoder.down.{block}.downsample.conv"
        )
        ldm |= _renamed(state, f"decoder.up_blocks.{block}.resnets", f"decoder.up.{blocks - 1 - block}.block", None)
        ldm |= _renamed(
            state, f"decoder.up_blocks.{block}.upsamplers.0.conv", f"decoder.up.{blocks - 1 - block}.upsample.conv"
        )
    for name in ("quant_conv", "post_quant_conv"):
        ldm |= _renamed(state, name, name)
    ldm = {key.replace("conv_shortcut", "nin_shortcut"): tensor for key, tensor in ldm.items()}
    for key, tensor in ldm.items():  # LDM's VAE attention is 1x1 convolutions, diffusers' linear layers
        if ".mid.attn_1." in key and key.endswith(".weight") and tensor.ndim == 2:
            ldm[key] = tensor[:, :, None, None]
    assert len(ldm) == len(state), "a VAE tensor has no LDM name"
    return {f"first_stage_model.{key}": tensor for key, tensor in ldm.items()}


def write_a1111_checkpoint(pipeline, path: Path) -> Path:
    """Write ``pipeline`` (UNet, VAE and CLIP text encoder) as one LDM-layout safetensors file."""
    from safetensors.torch import save_file

    text_state = pipeline.text_encoder.state_dict()
    # transformers 5 flattened CLIPTextModel; checkpoints keep the ``text_model.`` level of transformers 4.
    text = {
        f"cond_stage_model.transformer.{key if key.startswith('text_model.') else 'text_model.' + key}": tensor
        for key, tensor in text_state.items()
    }
    state = unet_state_in_ldm_layout(pipeline.unet) | vae_state_in_ldm_layout(pipeline.vae) | text
    save_file({key: tensor.contiguous() for key, tensor in state.items()}, str(path))
    return path
