"""The safety checker (TXT2IMG_SAFETY_CHECKER): flagged images are replaced by black ones and reported.

It is diffusers' ``StableDiffusionSafetyChecker`` (a CLIP image model compared with 17 concept
embeddings) with the CLIP image processor that prepares its input, as Stable Diffusion 1.x repos
ship them in their ``safety_checker`` and ``feature_extractor`` subfolders. The server loads one
checker, from TXT2IMG_SAFETY_CHECKER_REPO, and runs it on every generated image whatever model drew
it, so pipelines are loaded without their own (serving/manager.py).
"""

from __future__ import annotations

from pathlib import Path

SAFETY_CHECKER_FOLDER = "safety_checker"
FEATURE_EXTRACTOR_FOLDER = "feature_extractor"


class SafetyChecker:
    """Checks PIL images; ``check`` gives them back with the flagged ones black, and the flags."""

    def __init__(self, checker, feature_extractor, device: str = "cpu"):
        self.checker = checker.to(device).eval()
        self.feature_extractor = feature_extractor
        self.device = device

    @classmethod
    def load(cls, location: str, *, device: str = "cpu", dtype=None, local_files_only: bool = False) -> SafetyChecker:
        """The checker in ``location`` (a Hub repo or a folder): its ``safety_checker`` and ``feature_extractor``."""
        from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
        from transformers import CLIPImageProcessor

        checker = StableDiffusionSafetyChecker.from_pretrained(
            location,
            subfolder=SAFETY_CHECKER_FOLDER,
            torch_dtype=dtype,
            use_safetensors=True,
            local_files_only=local_files_only,
        )
        feature_extractor = CLIPImageProcessor.from_pretrained(
            location, subfolder=FEATURE_EXTRACTOR_FOLDER, local_files_only=local_files_only
        )
        return cls(checker, feature_extractor, device)

    def save(self, directory: Path) -> None:
        """Write the checker as ``load`` reads it (and as a diffusers pipeline folder holds it)."""
        self.checker.save_pretrained(Path(directory) / SAFETY_CHECKER_FOLDER, safe_serialization=True)
        self.feature_extractor.save_pretrained(Path(directory) / FEATURE_EXTRACTOR_FOLDER)

    def check(self, images: list) -> tuple[list, list[bool]]:
        """``images`` with each flagged one replaced by a black image of its size, and which were flagged."""
        import numpy as np
        import torch
        from PIL import Image

        if not images:
            return [], []
        pixels = self.feature_extractor([image.convert("RGB") for image in images], return_tensors="pt").pixel_values
        dtype = next(self.checker.parameters()).dtype
        # The checker blacks out flagged arrays itself; it is handed copies, and only its verdicts are used.
        arrays = np.stack([np.asarray(image.convert("RGB"), dtype=np.float32) / 255 for image in images])
        with torch.inference_mode():
            _, flagged = self.checker(images=arrays, clip_input=pixels.to(self.device, dtype))
        flags = [bool(flag) for flag in flagged]
        checked = [Image.new("RGB", image.size) if flag else image for image, flag in zip(images, flags)]
        return checked, flags
