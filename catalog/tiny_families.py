"""A tiny random pipeline for every family (catalog/families.py): what the tests serve in place of each
family's real models.

Like ``tiny-sd`` (catalog/tiny_sd.py), each is built in code from fixed seeds, with tokenizers made
from a generated vocabulary, so it needs no download, builds identically every time and leaves the
global RNG alone. They draw noise: they exist so that every family's pipeline class runs through
every route, the CLI, export and the Bento, on any CPU. ``TINY_PIPELINES`` holds one builder per
family; a family added to the table without one fails tests/test_families.py.

The configurations follow diffusers' own fast tests of FluxPipeline and StableDiffusionXLPipeline.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path

from catalog.families import FAMILY_NAMES
from catalog.notices import drop_torchvision_fallback_notices
from catalog.schema import CatalogEntry
from catalog.tiny_sd import _PROMPT_WORDS, build_tiny_sd_pipeline, write_tiny_tokenizer_files

TINY_RESOLUTION = 64
_WEIGHT_SEED = 0
_T5_SPECIAL_TOKENS = ("<pad>", "</s>", "<unk>")  # T5's ids 0, 1 and 2
_T5_WORD_START = "\u2581"  # sentencepiece's word-start mark
_T5_CHARACTERS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,;:!?'\"()[]-_/&+*=#@%"


def tiny_clip_tokenizer(max_length: int = 77):
    """tiny-sd's CLIP tokenizer: whole prompt words are tokens, any other text is spelled in bytes."""
    from transformers import CLIPTokenizer

    with tempfile.TemporaryDirectory() as folder:
        write_tiny_tokenizer_files(Path(folder))
        return CLIPTokenizer.from_pretrained(folder, model_max_length=max_length)


def tiny_t5_tokenizer(max_length: int = 512):
    """A T5 tokenizer over a generated unigram vocabulary: tiny-sd's prompt words, then characters for
    the rest. Built with ``tokenizers`` (no sentencepiece model file, no download); it saves and loads
    as a ``tokenizer.json``, as T5TokenizerFast does."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import T5TokenizerFast

    pieces = [(token, 0.0) for token in _T5_SPECIAL_TOKENS]
    pieces += [(_T5_WORD_START + word, -1.0) for word in _PROMPT_WORDS]  # a whole word beats its characters
    pieces += [(_T5_WORD_START, -2.0)] + [(char, -5.0) for char in _T5_CHARACTERS]
    unigram = Tokenizer(models.Unigram(pieces, unk_id=_T5_SPECIAL_TOKENS.index("<unk>")))
    unigram.normalizer = normalizers.NFKC()
    unigram.pre_tokenizer = pre_tokenizers.Metaspace()
    unigram.decoder = decoders.Metaspace()
    # T5 ends every sequence with </s>.
    unigram.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return T5TokenizerFast(
        tokenizer_object=unigram,
        extra_ids=0,
        pad_token="<pad>",
        eos_token="</s>",
        unk_token="<unk>",
        model_max_length=max_length,
    )


def _clip_text_config(tokenizer, **overrides):
    from transformers import CLIPTextConfig

    settings = {
        "vocab_size": len(tokenizer),
        "hidden_size": 32,
        "intermediate_size": 37,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "max_position_embeddings": 77,
        "layer_norm_eps": 1e-5,
        "projection_dim": 32,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    return CLIPTextConfig(**settings | overrides)


def _tiny_vae(latent_channels: int, **overrides):
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        block_out_channels=(16, 32),  # two blocks: latents are half the image's size
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        latent_channels=latent_channels,
        norm_num_groups=8,
        sample_size=TINY_RESOLUTION,
        **overrides,
    )


def build_tiny_flux_components() -> dict:
    """The modules of a tiny FluxPipeline: a two-block FluxTransformer2DModel, a CLIP and a T5 text
    encoder, a 4-channel VAE and flow-matching Euler; identical on every call."""
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
    from transformers import CLIPTextModel, T5Config, T5EncoderModel

    tokenizer = tiny_clip_tokenizer()
    tokenizer_2 = tiny_t5_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(_WEIGHT_SEED)
        transformer = FluxTransformer2DModel(
            patch_size=1,
            in_channels=16,  # FluxPipeline packs 2 x 2 patches of the 4 latent channels
            num_layers=1,
            num_single_layers=1,
            attention_head_dim=16,
            num_attention_heads=2,
            joint_attention_dim=32,  # T5's d_model
            pooled_projection_dim=32,  # CLIP's hidden size
            axes_dims_rope=[4, 4, 8],
            guidance_embeds=False,  # as FLUX.1 [schnell]
        )
        torch.manual_seed(_WEIGHT_SEED)
        text_encoder = CLIPTextModel(_clip_text_config(tokenizer))
        torch.manual_seed(_WEIGHT_SEED)
        text_encoder_2 = T5EncoderModel(
            T5Config(
                vocab_size=len(tokenizer_2),
                d_model=32,
                d_kv=8,
                d_ff=37,
                num_layers=2,
                num_heads=4,
                relative_attention_num_buckets=8,
                pad_token_id=tokenizer_2.pad_token_id,
                eos_token_id=tokenizer_2.eos_token_id,
                decoder_start_token_id=tokenizer_2.pad_token_id,
            )
        )
        torch.manual_seed(_WEIGHT_SEED)
        vae = _tiny_vae(4, use_quant_conv=False, use_post_quant_conv=False, shift_factor=0.0609, scaling_factor=1.5)
    return {
        "transformer": transformer.eval(),
        "text_encoder": text_encoder.eval(),
        "text_encoder_2": text_encoder_2.eval(),
        "tokenizer": tokenizer,
        "tokenizer_2": tokenizer_2,
        "vae": vae.eval(),
        "scheduler": FlowMatchEulerDiscreteScheduler(shift=1.0),
        "image_encoder": None,
        "feature_extractor": None,
    }


def build_tiny_flux_pipeline():
    """A ready tiny ``FluxPipeline`` on the CPU, in fp32."""
    drop_torchvision_fallback_notices()
    from diffusers import FluxPipeline

    return FluxPipeline(**build_tiny_flux_components())


def build_tiny_sdxl_components() -> dict:
    """The modules of a tiny StableDiffusionXLPipeline: a UNet with SDXL's text-and-time addition
    embeddings, two CLIP text encoders (the second with a projection), a VAE and Euler; identical on every call."""
    import torch
    from diffusers import EulerDiscreteScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    tokenizer = tiny_clip_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(_WEIGHT_SEED)
        unet = UNet2DConditionModel(
            block_out_channels=(32, 64),
            layers_per_block=1,
            sample_size=TINY_RESOLUTION // 2,
            in_channels=4,
            out_channels=4,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            attention_head_dim=(2, 4),
            use_linear_projection=True,
            addition_embed_type="text_time",
            addition_time_embed_dim=8,
            transformer_layers_per_block=(1, 1),
            projection_class_embeddings_input_dim=6 * 8 + 32,  # six size/crop numbers, and the pooled text
            cross_attention_dim=64,  # both encoders' hidden states, side by side
        )
        torch.manual_seed(_WEIGHT_SEED)
        vae = _tiny_vae(4)
        torch.manual_seed(_WEIGHT_SEED)
        text_encoder = CLIPTextModel(_clip_text_config(tokenizer))
        torch.manual_seed(_WEIGHT_SEED + 1)
        text_encoder_2 = CLIPTextModelWithProjection(_clip_text_config(tokenizer))
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1, timestep_spacing="leading"
    )
    return {
        "unet": unet.eval(),
        "vae": vae.eval(),
        "text_encoder": text_encoder.eval(),
        "text_encoder_2": text_encoder_2.eval(),
        "tokenizer": tokenizer,
        "tokenizer_2": tiny_clip_tokenizer(),
        "scheduler": scheduler,
        "image_encoder": None,
        "feature_extractor": None,
    }


def build_tiny_sdxl_pipeline():
    """A ready tiny ``StableDiffusionXLPipeline`` on the CPU, in fp32, without a watermarker."""
    drop_torchvision_fallback_notices()
    from diffusers import StableDiffusionXLPipeline

    return StableDiffusionXLPipeline(**build_tiny_sdxl_components(), add_watermarker=False)


# The tiny stand-in of each family. Stable Diffusion 1 and 2 share tiny-sd's pipeline class.
TINY_PIPELINES: dict[str, Callable] = {
    "tiny": build_tiny_sd_pipeline,
    "sd1": build_tiny_sd_pipeline,
    "sd2-base": build_tiny_sd_pipeline,
    "sd2": build_tiny_sd_pipeline,
    "sdxl": build_tiny_sdxl_pipeline,
    "flux": build_tiny_flux_pipeline,
}
# The catalog id each family's stand-in is served as where it is registered (tests, bench/families.py):
# tiny-sd is the tiny family's own, and built in.
STAND_IN_IDS = {name: "tiny-sd" if name == "tiny" else f"tiny-{name}" for name in FAMILY_NAMES}


def stand_in_entries() -> list[CatalogEntry]:
    """A catalog entry for each family's stand-in but tiny-sd's (catalog/models.yaml holds that one):
    ``source: builtin`` makes catalog/pipelines.py build it from TINY_PIPELINES."""
    return [
        CatalogEntry(
            id=model_id,
            source="builtin",
            family=name,
            resolution=TINY_RESOLUTION,
            description=f"A tiny random {name} pipeline for tests (catalog/tiny_families.py).",
        )
        for name, model_id in STAND_IN_IDS.items()
        if model_id != "tiny-sd"
    ]
