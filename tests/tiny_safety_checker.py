"""A tiny safety checker built in code, whose verdict a test chooses: it flags every image, or none.

Test tooling beside tests/serving_finetunes.py: real diffusers ``StableDiffusionSafetyChecker`` and
CLIP image processor classes with a tiny random CLIP vision model, saved as a Stable Diffusion repo
holds them, so the server and the packer load it exactly as they load the real one.
"""

from __future__ import annotations

from pathlib import Path

from serving.safety import SafetyChecker

# Cosine similarities lie in [-1, 1], and the checker flags an image whose similarity to a concept
# exceeds that concept's threshold: below -1 every image is flagged, above 1 none is.
FLAG_EVERYTHING = -2.0
FLAG_NOTHING = 2.0


def tiny_safety_checker(*, flag_everything: bool) -> SafetyChecker:
    import torch
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPConfig, CLIPImageProcessor

    config = CLIPConfig(
        text_config={"hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 1, "num_attention_heads": 4},
        vision_config={
            "hidden_size": 32,
            "intermediate_size": 37,
            "num_hidden_layers": 1,
            "num_attention_heads": 4,
            "image_size": 32,
            "patch_size": 8,
        },
        projection_dim=16,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        checker = StableDiffusionSafetyChecker(config).eval()
    with torch.no_grad():
        checker.concept_embeds_weights.fill_(FLAG_EVERYTHING if flag_everything else FLAG_NOTHING)
        checker.special_care_embeds_weights.fill_(FLAG_NOTHING)  # the verdict rests on the 17 concepts alone
    feature_extractor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    return SafetyChecker(checker, feature_extractor)


def save_tiny_safety_checker(directory: Path, *, flag_everything: bool) -> Path:
    """Write the tiny checker into ``directory`` (its safety_checker and feature_extractor subfolders)."""
    tiny_safety_checker(flag_everything=flag_everything).save(directory)
    return directory
