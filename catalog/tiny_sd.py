"""The built-in demo model ``tiny-sd``: a complete Stable Diffusion pipeline with tiny random weights.

It is built in code, the way diffusers' own tests build theirs, so it needs no download and
loads in a fraction of a second. Every weight comes from a fixed seed, so two builds are
identical and the same generation seed gives the same image. It draws noise, not pictures:
it exists so that serving, training and tests run anywhere, offline.

Random weights alone would make a model that cannot learn what a prompt means in a short
fine-tune, so a few choices give it conditioning that training can bind to images (the tests
check that a fine-tune's images prefer their own prompt):

- whole words are tokens (a small vocabulary of prompt words, with characters for the rest), so
  two prompts that differ in a word differ in a token, not in a few characters out of 77;
- the text encoder's token embeddings are large against its position embeddings, so its hidden
  states are ruled by the prompt's words rather than by where they stand;
- the VAE's posterior is narrow and its latents are scaled to unit variance, so a training latent
  is the image's own code, not posterior noise nor a whisper beside the diffusion noise;
- it predicts velocity (v-prediction, as Stable Diffusion 2), which asks the model for the image
  itself at the noisiest steps, the steps where only the prompt can tell what to draw.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from catalog.notices import drop_torchvision_fallback_notices

TINY_SD_ID = "tiny-sd"
TINY_SD_RESOLUTION = 64
_WEIGHT_SEED = 0
_SPECIAL_TOKENS = ("<|startoftext|>", "<|endoftext|>")
# Words that are one token each: common prompt words, and the rare identifiers DreamBooth prompts use.
_PROMPT_WORDS = """
a an the of in on at with and by for from to under over near its his her their this
photo photograph picture painting drawing sketch portrait render illustration oil watercolor digital
art style cinematic realistic detailed high quality close up view shot lighting light
red blue green yellow purple orange pink black white gray brown golden silver colorful
toy ball box dog cat bird horse car house tree flower mountain village city street forest
river lake sea beach sky sun moon night day snow rain castle robot astronaut man woman
child person face cup bowl table chair book sofa room garden field road bridge boat
small large big tiny old new beautiful cute happy sitting standing riding running wearing
sks zwx ohwx xyz
""".split()
# Token embeddings this many times CLIP's initial scale (position embeddings keep theirs).
_TOKEN_EMBEDDING_GAIN = 30.0
# A posterior log-variance this low makes a sampled latent its image's mean to within 0.3%.
_POSTERIOR_LOGVAR = -12.0
# Brings this VAE's latents of the demo photos to about unit variance (SD's 0.18215 does so for SD's).
_LATENT_SCALING_FACTOR = 3.9


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
    """Write a CLIP vocabulary where each of ``_PROMPT_WORDS`` is one token and any other text is
    spelled in bytes (every byte is a token, alone and word-final)."""
    alphabet = _byte_level_alphabet()
    tokens = alphabet + [char + "</w>" for char in alphabet]
    merges = []
    for word in _PROMPT_WORDS:
        # Merges grow each word from its end ("o</w>", "to</w>", ... "photo</w>"). Every merge ends in
        # a word-final token, so only one merge can apply in a word at a time: no two words' merges
        # interfere, whatever their order.
        suffix = word[-1] + "</w>"
        for char in reversed(word[:-1]):
            merged = char + suffix
            if merged not in tokens:
                tokens.append(merged)
                merges.append(f"{char} {suffix}")
            suffix = merged
    vocab = {token: index for index, token in enumerate(tokens + list(_SPECIAL_TOKENS))}
    (directory / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    (directory / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{m}\n" for m in merges), encoding="utf-8")


def stable_diffusion_scheduler(prediction_type: str = "epsilon"):
    """DDIM with Stable Diffusion's noise schedule (scaled linear betas 0.00085 to 0.012)."""
    from diffusers import DDIMScheduler

    return DDIMScheduler(
        prediction_type=prediction_type,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        # Stated rather than left to the default: a scheduler swapped in takes its own default for an
        # unstated setting (Euler: "linspace"), where a saved copy's config states DDIM's.
        timestep_spacing="leading",
    )


def _tiny_tokenizer():
    """A CLIP tokenizer over the tiny character vocabulary."""
    from transformers import CLIPTokenizer

    with tempfile.TemporaryDirectory() as folder:
        write_tiny_tokenizer_files(Path(folder))
        # from_pretrained reads both files eagerly (in transformers 4 and 5 alike);
        # model_max_length must be set, or encoding overflows.
        return CLIPTokenizer.from_pretrained(folder, model_max_length=77)


def _tiny_unet():
    """tiny-sd's UNet, its weights drawn from the seeded global RNG."""
    import torch
    from diffusers import UNet2DConditionModel

    torch.manual_seed(_WEIGHT_SEED)
    return UNet2DConditionModel(
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


def _tiny_vae():
    """tiny-sd's VAE, with a small fixed posterior log-variance."""
    import torch
    from diffusers import AutoencoderKL

    torch.manual_seed(_WEIGHT_SEED)
    vae = AutoencoderKL(
        block_out_channels=(32, 64),
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        latent_channels=4,
        sample_size=TINY_SD_RESOLUTION,
        scaling_factor=_LATENT_SCALING_FACTOR,
    )
    with torch.no_grad():  # quant_conv's last 4 channels are the posterior's log-variance
        vae.quant_conv.bias[vae.config.latent_channels :] = _POSTERIOR_LOGVAR
    return vae


def _tiny_text_encoder(tokenizer):
    """tiny-sd's CLIP text encoder over ``tokenizer``'s vocabulary, with amplified token embeddings."""
    import torch
    from transformers import CLIPTextConfig, CLIPTextModel

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
    with torch.no_grad():
        text_encoder.get_input_embeddings().weight.mul_(_TOKEN_EMBEDDING_GAIN)
    return text_encoder


def build_tiny_sd_components() -> dict:
    """The modules of ``tiny-sd``, identical on every call and leaving the global RNG untouched."""
    import torch

    tokenizer = _tiny_tokenizer()
    with torch.random.fork_rng(devices=[]):
        unet, vae, text_encoder = _tiny_unet(), _tiny_vae(), _tiny_text_encoder(tokenizer)
    return {
        "unet": unet.eval(),
        "vae": vae.eval(),
        "text_encoder": text_encoder.eval(),
        "tokenizer": tokenizer,
        "scheduler": stable_diffusion_scheduler(prediction_type="v_prediction"),
        "safety_checker": None,
        "feature_extractor": None,
        "image_encoder": None,
    }


def build_tiny_sd_pipeline():
    """A ready ``StableDiffusionPipeline`` for ``tiny-sd`` on the CPU, in fp32."""
    drop_torchvision_fallback_notices()
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline(**build_tiny_sd_components(), requires_safety_checker=False)
