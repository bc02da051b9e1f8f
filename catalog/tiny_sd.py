"""The built-in demo model ``tiny-sd``: a complete Stable Diffusion pipeline with tiny random weights.

It is built in code, the way diffusers' own tests build theirs, so it needs no download and
loads in a fraction of a second. Every weight comes from a fixed seed, so two builds are
identical and the same generation seed gives the same image. It draws noise, not pictures:
it exists so that serving, training and tests run anywhere, offline.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

TINY_SD_ID = "tiny-sd"
TINY_SD_RESOLUTION = 64
_WEIGHT_SEED = 0
_SPECIAL_TOKENS = ("<|startoftext|>", "<|endoftext|>")


def _byte_level_alphabet() -> list[str]:
    """The 256 printable characters CLIP's byte-level BPE uses to stand for raw bytes."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    codes = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            codes.append(256 + extra)
            extra += 1
    return [chr(code) for code in codes]


def write_tiny_tokenizer_files(directory: Path) -> None:
    """Write a character-level CLIP vocabulary (every byte, alone and word-final) and no merges."""
    alphabet = _byte_level_alphabet()
    tokens = alphabet + [char + "</w>" for char in alphabet] + list(_SPECIAL_TOKENS)
    vocab = {token: index for index, token in enumerate(tokens)}
    (directory / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    (directory / "merges.txt").write_text("#version: 0.2\n", encoding="utf-8")


def stable_diffusion_scheduler():
    """DDIM with Stable Diffusion's noise schedule (scaled linear betas 0.00085 to 0.012)."""
    from diffusers import DDIMScheduler

    return DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )


def build_tiny_sd_components() -> dict:
    """The modules of ``tiny-sd``, identical on every call and leaving the global RNG untouched."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    with tempfile.TemporaryDirectory() as folder:
        write_tiny_tokenizer_files(Path(folder))
        # from_pretrained reads both files eagerly (in transformers 4 and 5 alike);
        # model_max_length must be set, or encoding overflows.
        tokenizer = CLIPTokenizer.from_pretrained(folder, model_max_length=77)

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(_WEIGHT_SEED)
        unet = UNet2DConditionModel(
            block_out_channels=(32, 64),
            layers_per_block=2,
            sample_size=TINY_SD_RESOLUTION // 2,
            in_channels=4,
            out_channels=4,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            cross_attention_dim=32,
            attention_head_dim=8,
        )
        torch.manual_seed(_WEIGHT_SEED)
        vae = AutoencoderKL(
            block_out_channels=(32, 64),
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
            up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
            latent_channels=4,
            sample_size=TINY_SD_RESOLUTION,
        )
        torch.manual_seed(_WEIGHT_SEED)
        text_encoder = CLIPTextModel(
            CLIPTextConfig(
                vocab_size=len(tokenizer),
                hidden_size=32,
                intermediate_size=37,
                num_hidden_layers=5,
                num_attention_heads=4,
                max_position_embeddings=77,
                layer_norm_eps=1e-5,
                bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
            )
        )
    return {
        "unet": unet.eval(),
        "vae": vae.eval(),
        "text_encoder": text_encoder.eval(),
        "tokenizer": tokenizer,
        "scheduler": stable_diffusion_scheduler(),
        "safety_checker": None,
        "feature_extractor": None,
        "image_encoder": None,
    }


def build_tiny_sd_pipeline():
    """A ready ``StableDiffusionPipeline`` for ``tiny-sd`` on the CPU, in fp32."""
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline(**build_tiny_sd_components(), requires_safety_checker=False)
